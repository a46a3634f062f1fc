"""Several outputs in one pass (gguf_kquant/model/multi.py): each output byte-identical to llama.cpp's
llama_model_quantize and to its own single run; each source tensor read and converted once and quantized
once per distinct type; every output path checked before any work; all outputs committed together.

Models, imatrices and the oracle come from tests/test_model_quantize.py.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

import gguf_kquant
import gguf_kquant.codecs as codecs
from gguf_kquant.errors import BadTensorDataError, ImatrixError, InvalidArgumentError, QuantizeError
from gguf_kquant.model import multi, quantize as single
from gguf_kquant.safeio import TEMP_PREFIX
from test_model_quantize import (_check_same, _write_split_copy, imatrices, imatrix_kv,  # noqa: F401
                                 models, oracle_quantize)

SIX = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


def _count_work(monkeypatch):
    """Record every source read (tensor, offset, bytes), float32 conversion and codec call."""
    log = {"read": [], "f32": 0, "quantize": []}
    read, to_f32, quantize = single._Converter._read, multi._to_f32, codecs.quantize

    def counted_read(fd, offset, n, t):
        log["read"].append((t.name, offset, n))
        return read(fd, offset, n, t)

    def counted_f32(*a):
        log["f32"] += 1
        return to_f32(*a)

    def counted_quantize(x, qtype, imatrix=None, **kw):
        log["quantize"].append((x.shape, gguf_kquant.types.type_info(qtype).name))
        return quantize(x, qtype, imatrix=imatrix, **kw)

    monkeypatch.setattr(single._Converter, "_read", staticmethod(counted_read))
    monkeypatch.setattr(multi, "_to_f32", counted_f32)
    monkeypatch.setattr(codecs, "quantize", counted_quantize)
    return log


def test_six_mixes_match_llama_quantize_with_one_read_per_tensor(models, imatrices, tmp_path, monkeypatch):
    src = models["gqa"]
    path, values = imatrices["gqa"]
    log = _count_work(monkeypatch)
    outs = {tmp_path / f"m-{m}.gguf": m for m in SIX + ["Q4_K_M"]}  # Q4_K_M twice: two names, same bytes
    outs[tmp_path / "twice-Q4_K_M.gguf"] = outs.pop(tmp_path / "m-Q4_K_M.gguf")
    outs[tmp_path / "m-Q4_K_M.gguf"] = "Q4_K_M"
    outs[tmp_path / "m-COPY.gguf"] = "COPY"  # its file type is guessed from the tensors
    res = gguf_kquant.quantize_model(src, outs, imatrix=path, threads=2)
    monkeypatch.undo()
    assert set(res) == set(outs)
    okw = dict(imatrix=values, imatrix_kv=imatrix_kv(path, values))
    for dst, mix in outs.items():
        if dst.name != "twice-Q4_K_M.gguf":
            _check_same(dst, oracle_quantize(src, tmp_path / f"theirs-{dst.name}", mix, **okw))
        assert res[dst].paths == [dst] and res[dst].plan.mix == mix
    assert (tmp_path / "twice-Q4_K_M.gguf").read_bytes() == (tmp_path / "m-Q4_K_M.gguf").read_bytes()
    with gguf_kquant.open(src) as f:  # every byte of every tensor read exactly once (tiny: one slab each)
        spans = sorted((t.name, t.offset, t.nbytes) for t in f.tensors)
    assert sorted(log["read"]) == spans
    assert log["f32"] == len(spans)  # once per tensor (the copied norms too: their finiteness is checked)
    plans = [r.plan for r in res.values()]
    per_tensor = [{p.rows[i].dst_type for p in plans if p.rows[i].convert} for i in range(len(plans[0].rows))]
    assert len(log["quantize"]) == sum(len(types) for types in per_tensor)  # once per distinct type
    assert len(log["quantize"]) < sum(r.convert for p in plans for r in p.rows)  # the mixes share work

def test_moe_split_and_keep_split_outputs_equal_single_runs_and_reports(models, imatrices, tmp_path):
    src = models["moe"]
    path, _values = imatrices["moe"]
    outs = {tmp_path / "a.gguf": "Q3_K_M", tmp_path / "c.gguf": "Q4_0"}
    res = gguf_kquant.quantize_model(src, outs, imatrix=path, split_max_size=300_000)
    (tmp_path / "single").mkdir()
    for dst, mix in outs.items():
        one = gguf_kquant.quantize_model(src, tmp_path / "single" / dst.name, mix, imatrix=path,
                                         split_max_size=300_000)
        assert [p.name for p in res[dst].paths] == [p.name for p in one.paths] and len(one.paths) > 1
        for a, b in zip(res[dst].paths, one.paths):
            assert a.read_bytes() == b.read_bytes(), a.name
    # --keep-split of a split source, against llama.cpp; one output with a report
    with gguf_kquant.open(models["tied"]) as f:
        n = len(f.tensors)
    _write_split_copy(models["tied"], tmp_path / "s.gguf", n // 2 + 1)
    first = sorted(tmp_path.glob("s-00001-of-*.gguf"))[0]
    k6, k2, rep = tmp_path / "k6.gguf", tmp_path / "k2.gguf", tmp_path / "k6.json"
    res = gguf_kquant.quantize_model(first, {k6: "Q6_K", k2: "Q2_K"}, keep_split=True, report={str(k6): rep})
    for mix, dst in (("Q6_K", k6), ("Q2_K", k2)):
        oracle_quantize(first, tmp_path / f"t{dst.stem}", mix, keep_split=True)
        theirs = sorted(tmp_path.glob(f"t{dst.stem}-*-of-*.gguf"))
        assert len(res[dst].paths) == len(theirs) == 2
        for a, b in zip(res[dst].paths, theirs):
            _check_same(a, b)
    one = gguf_kquant.quantize_model(first, tmp_path / "single" / "k6.gguf", "Q6_K", keep_split=True,
                                     report=tmp_path / "single" / "k6.json")
    assert rep.read_bytes() == (tmp_path / "single" / "k6.json").read_bytes()
    assert json.loads(rep.read_text())["mix"] == "Q6_K" and res[k6].report == one.report and not res[k2].report


def test_optimized_outputs_equal_their_single_runs(models, imatrices, tmp_path, monkeypatch):
    src = models["gqa"]
    path, _values = imatrices["gqa"]
    outs = {tmp_path / "a.gguf": "Q4_K_M", tmp_path / "b.gguf": "Q3_K_M", tmp_path / "c.gguf": "Q4_0"}
    res = gguf_kquant.quantize_model(src, outs, imatrix=path, method="optimized", threads=2)
    (tmp_path / "one").mkdir()
    for dst, mix in outs.items():
        one = gguf_kquant.quantize_model(src, tmp_path / "one" / dst.name, mix, imatrix=path, method="optimized")
        llama = gguf_kquant.quantize_model(src, tmp_path / "one" / f"llama-{dst.name}", mix, imatrix=path)
        assert res[dst].paths == [dst] and dst.read_bytes() == one.paths[0].read_bytes()
        assert dst.read_bytes() != llama.paths[0].read_bytes()  # the refiners did run
        assert dst.stat().st_size == llama.paths[0].stat().st_size
    # refused before any work: optimized without an imatrix, an unknown method
    _no_work(monkeypatch)
    for kw, message in (({}, "needs an imatrix"), ({"imatrix": path, "method": "best"}, "unknown quantization")):
        with pytest.raises((ImatrixError, InvalidArgumentError), match=message):
            gguf_kquant.quantize_model(src, {tmp_path / "x.gguf": "Q4_K_M", tmp_path / "y.gguf": "Q8_0"},
                                       **{"method": "optimized", **kw})
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def _no_work(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a tensor was converted before the refusal")

    monkeypatch.setattr(codecs, "quantize", refuse)


def test_every_output_checked_before_any_work(models, imatrices, tmp_path, monkeypatch):
    src = models["gqa"]
    path, _values = imatrices["gqa"]
    with gguf_kquant.open(src) as f:
        n_tensors = len(f.tensors)
    _no_work(monkeypatch)
    (tmp_path / "old.gguf").write_bytes(b"old")
    (tmp_path / "link.gguf").symlink_to(tmp_path / "b.gguf")
    (tmp_path / "im.gguf").symlink_to(path)
    cases = [
        ({"a.gguf": "Q4_K_M", "im.gguf": "Q8_0"}, {}, "same file as"),  # an output is the imatrix
        ({"a.gguf": "Q4_K_M", "b.gguf": "Q8_0", "link.gguf": "Q6_K"}, {}, "written twice"),
        ({"a.gguf": "Q4_K_M", "old.gguf": "Q8_0"}, {}, "destination exists"),
        ({"a.gguf": "Q4_K_M", "b.gguf": "Q8_0"}, {"a.gguf": "b.gguf"}, "written twice"),  # report = a model
        ({"a.gguf": "Q4_K_M", "b.gguf": "Q8_0"}, {"a.gguf": "b-00001-of-00002.gguf"}, "written twice"),
        ({"a.gguf": "Q4_K_M", "b.gguf": "Q9_X"}, {}, "unknown quantization mix"),
        ({"a.gguf": "Q4_K_M", "b.gguf": "IQ2_XXS"}, {}, "requires an importance matrix"),
        ({"a.gguf": "Q4_K_M"}, {"x.gguf": "x.json"}, "not one of the outputs"),
    ]
    for outs, reports, message in cases:
        outs = {tmp_path / k: v for k, v in outs.items()}
        reports = {tmp_path / k: tmp_path / v for k, v in reports.items()}
        imatrix = path if "IQ2_XXS" not in outs.values() else None
        split = n_tensors // 2 + 1 if any("00001" in str(v) for v in reports.values()) else None
        with pytest.raises((QuantizeError, ImatrixError), match=message):
            gguf_kquant.quantize_model(src, outs, imatrix=imatrix, report=reports or None, split_max_tensors=split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf", "link.gguf", "old.gguf"]
    assert (tmp_path / "old.gguf").read_bytes() == b"old"
    with pytest.raises(QuantizeError, match="not ftype"):
        gguf_kquant.quantize_model(src, {tmp_path / "a.gguf": "Q8_0"}, "Q8_0")
    with pytest.raises(QuantizeError, match="keys of outputs are paths"):
        gguf_kquant.quantize_model(src, {1: "Q8_0"})
    with pytest.raises(QuantizeError, match="no outputs"):
        gguf_kquant.quantize_model(src, {})


def test_a_failure_leaves_no_output(tmp_path):
    """A non-finite weight met while streaming (after other tensors were written) aborts every output."""
    import gguf

    p = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_k.weight", np.ones((4, 256), np.float32))
    x = np.ones((4, 256), np.float32)
    x[3, 5] = np.inf
    w.add_tensor("blk.0.attn_q.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "o8.gguf").write_bytes(b"old")
    outs = {tmp_path / "o4.gguf": "Q4_K_M", tmp_path / "o8.gguf": "Q8_0", tmp_path / "o32.gguf": "F32"}
    with pytest.raises(BadTensorDataError, match=r"blk\.0\.attn_q\.weight.*row 3, column 5"):
        gguf_kquant.quantize_model(p, outs, overwrite=True, report={tmp_path / "o4.gguf": tmp_path / "r.json"})
    assert sorted(q.name for q in tmp_path.iterdir()) == ["nan.gguf", "o8.gguf"]
    assert (tmp_path / "o8.gguf").read_bytes() == b"old"
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_cli_out_progress_quiet_and_dry_run(models, tmp_path, capsys):
    from gguf_kquant.cli import main

    src = models["tied"]
    args = ["quantize", str(src), "--out", f"Q4_K_M={tmp_path / 'a.gguf'}", "--out", f"q8_0={tmp_path / 'b.gguf'}",
            "--out", f"COPY={tmp_path / 'c.gguf'}"]  # an F16 model: COPY's guessed file type is MOSTLY_F16
    assert main(args + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not list(tmp_path.iterdir()) and text.count("quant size") == 3 and "== " in text
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    with gguf_kquant.open(src) as f:
        names = [t.name for t in f.tensors]
    per_tensor = [ln for ln in lines if ln.startswith("[")]
    assert len(per_tensor) == len(names)  # one line per tensor, covering both outputs
    assert any("Q6_K/Q8_0" in ln for ln in per_tensor) and lines[-1].startswith("time")
    for mix, name in (("Q8_0", "b"), ("COPY", "c")):
        one = gguf_kquant.quantize_model(src, tmp_path / f"one-{name}.gguf", mix)
        assert (tmp_path / f"{name}.gguf").read_bytes() == one.paths[0].read_bytes(), mix
    assert main(args + ["--overwrite", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
    assert main(["quantize", str(src), str(tmp_path / "c.gguf"), "--out", f"Q8_0={tmp_path / 'd.gguf'}"]) == 1
    assert main(["quantize", str(src), "--out", "Q8_0"]) == 1
    assert "MIX=PATH" in capsys.readouterr().err


def test_sigterm_midway_touches_no_output(tmp_path):
    """A signal once half of all outputs' bytes are written (tests/test_faults.py's child): every target
    keeps its old content and no temp file is left."""
    from test_faults import CHILD, FIXTURE, PRECIOUS, Job, run_child, temps  # noqa: F401

    ref = tmp_path / "ref"
    ref.mkdir()
    outs = {ref / "a.gguf": "Q4_K_M", ref / "b.gguf": "Q8_0", ref / "c.gguf": "Q2_K"}
    gguf_kquant.quantize_model(FIXTURE, outs, split_max_tensors=20)
    total = sum(p.stat().st_size for p in ref.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    argv = ["quantize", str(FIXTURE), "--split-max-tensors", "20", "--overwrite", "-q"]
    for dst, mix in outs.items():
        argv += ["--out", f"{mix}={out / dst.name}"]
    targets = [out / p.name for p in sorted(ref.iterdir())]
    for t in targets:
        t.write_bytes(PRECIOUS)
    job = Job("quantize", [FIXTURE], targets, sorted(ref.iterdir()), argv=argv)
    r = run_child(job, job.config(point="bytes", at=total // 2, signal=int(signal.SIGTERM)))
    assert "SENT" in r.stdout and r.returncode == -signal.SIGTERM, r.stderr[-500:]
    assert all(t.read_bytes() == PRECIOUS for t in targets) and len(targets) > 3
    assert temps(out) == []
