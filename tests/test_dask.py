"""Quantization on a Dask cluster (gguf_kquant/model/distributed.py): a LocalCluster of two single-threaded
worker processes writes the same bytes as a local run — large tensors split into row ranges, an imatrix, a
split output with a report, a worker killed in the middle of a task — and refuses, in one line and before
any work, an unreachable scheduler, a worker that cannot see the source, and a worker with other versions.

Models and imatrices come from tests/test_model_quantize.py (where local runs are compared with llama.cpp).
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import BadTensorDataError
from gguf_kquant.model import distributed as D
from gguf_kquant.safeio import TEMP_PREFIX
from test_model_quantize import _check_same, imatrices, make_imatrix, models, oracle_quantize  # noqa: F401

from distributed import Client, LocalCluster


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            c.wait_for_workers(2)
            yield c


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks of at most 32 KiB of source, so the test models' larger tensors become several row ranges; the
    tasks made are recorded."""
    made = []
    tasks = D._tasks

    def recorded(*a, **k):
        made.extend(tasks(*a, **k))
        return made

    monkeypatch.setattr(D, "TASK_BYTES", 32 << 10)
    monkeypatch.setattr(D, "MIN_TASK_BYTES", 32 << 10)
    monkeypatch.setattr(D, "_tasks", recorded)
    return made


def _no_leftovers(folder, expected):
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    assert not list(folder.glob(TEMP_PREFIX + "*"))


def _same_report(ours, theirs):
    """The local run's report (BLAS on one thread in a worker: the statistics' last bits may differ)."""
    a, b = json.loads(ours.read_text()), json.loads(theirs.read_text())
    assert len(a["tensors"]) > 10
    assert {k: v for k, v in a.items() if k != "tensors"} == {k: v for k, v in b.items() if k != "tensors"}
    nums = ("rmse", "max_abs_error", "cosine")
    for x, y in zip(a["tensors"], b["tensors"], strict=True):
        assert {k: x[k] for k in x if k not in nums} == {k: y[k] for k in y if k not in nums}
        assert [x[k] for k in nums] == pytest.approx([y[k] for k in nums], rel=1e-12), x["name"]


CASES = [  # model, mix, imatrix, options
    ("gqa", "Q4_K_M", False, {}),
    ("moe", "Q4_K_S", True, {}),  # per-expert imatrix; row ranges that cross expert boundaries
    ("odd", "Q3_K_M", False, {}),  # fallbacks (rows of 320)
    ("tied", "Q5_K_M", True, {"split_max_tensors": 9}),  # F16 source, split output, report
]


@pytest.mark.parametrize("model,mix,use_im,options", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_same_bytes_as_a_local_run(client, models, imatrices, tmp_path, small_tasks, model, mix, use_im, options):
    src = models[model]
    im = imatrices[model][0] if use_im else None
    split = "split_max_tensors" in options
    report = {"report": tmp_path / "r.json"} if split else {}
    report_local = {"report": tmp_path / "r-local.json"} if split else {}
    local = gguf_kquant.quantize_model(src, tmp_path / "local.gguf", mix, imatrix=im, **report_local, **options)
    log = io.StringIO()
    res = gguf_kquant.quantize_model(src, tmp_path / "dask.gguf", mix, imatrix=im, client=client, **report,
                                     **options, quiet=False, stream=log)
    lines = [line for line in log.getvalue().splitlines() if line.startswith("[")]  # progress: one per tensor
    assert sorted(re.search(r"MiB\s+(\S+)", line).group(1) for line in lines) == sorted(r.name for r in res.plan)
    assert "100.0%" in lines[-1]
    assert len(res.paths) == len(local.paths) and (len(res.paths) > 1) == split
    for ours, theirs in zip(res.paths, local.paths):
        _check_same(ours, theirs)
    assert res.dst_nbytes == local.dst_nbytes
    if split:
        _same_report(tmp_path / "r.json", tmp_path / "r-local.json")
    else:
        assert any(t.work.rows is not None and t.work.rows[0] > 0 for t in small_tasks)  # some tensors were split
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_same_bytes_as_llama_quantize(client, models, tmp_path, small_tasks):
    src = models["gqa"]
    res = gguf_kquant.quantize_model(src, tmp_path / "dask.gguf", "Q5_K_M", client=client)
    _check_same(res.paths[0], oracle_quantize(src, tmp_path / "oracle.gguf", "Q5_K_M"))


def test_method_optimized_on_the_cluster(client, models, imatrices, tmp_path, small_tasks):
    """method="optimized" travels with the tasks: the cluster's file is the local optimized run's, row ranges
    included, and not llama-quantize's."""
    src, im = models["gqa"], imatrices["gqa"][0]
    local = gguf_kquant.quantize_model(src, tmp_path / "local.gguf", "Q4_K_M", imatrix=im, method="optimized")
    plain = gguf_kquant.quantize_model(src, tmp_path / "plain.gguf", "Q4_K_M", imatrix=im)
    res = gguf_kquant.quantize_model(src, tmp_path / "dask.gguf", "Q4_K_M", imatrix=im, method="optimized",
                                     client=client)
    _check_same(res.paths[0], local.paths[0])
    assert res.paths[0].read_bytes() != plain.paths[0].read_bytes()
    assert any(t.work.rows is not None and t.work.rows[0] > 0 for t in small_tasks)  # some tensors were split


def test_error_feedback_on_the_cluster(client, example_model, example_hessians, tmp_path, small_tasks):
    """An imatrix file with Hessians travels to the workers (by path): row ranges give the local run's bytes."""
    local = gguf_kquant.quantize_model(example_model, tmp_path / "local.gguf", "Q4_K_M", imatrix=example_hessians,
                                       method="optimized")
    res = gguf_kquant.quantize_model(example_model, tmp_path / "dask.gguf", "Q4_K_M", imatrix=example_hessians,
                                     method="optimized", client=client)
    _check_same(res.paths[0], local.paths[0])
    assert any(t.work.rows is not None and t.work.rows[0] > 0 and t.work.hessians is not None
               for t in small_tasks)  # some tensors were split, with their Hessians


def test_worker_killed_mid_task_is_retried(client, models, tmp_path, small_tasks):
    """The first task to write kills its worker process after scribbling over its range (a marker file makes
    it happen once); Dask reruns it and the file is still the local run's."""
    marker = tmp_path / "killed"
    src = models["gqa"]
    local = gguf_kquant.quantize_model(src, tmp_path / "local.gguf", "Q4_K_M")
    pids = set(client.run(os.getpid).values())

    def install(path=str(marker)):
        import os as _os

        from gguf_kquant.model import distributed as d

        real = d._pwrite

        def dying(fd, chunk, pos, out):
            try:
                _os.close(_os.open(path, _os.O_CREAT | _os.O_EXCL | _os.O_WRONLY))
            except FileExistsError:
                return real(fd, chunk, pos, out)
            _os.pwrite(fd, b"\xab" * len(memoryview(chunk).cast("B")), pos)
            _os._exit(1)

        dying.real = real
        d._pwrite = dying

    def uninstall():
        from gguf_kquant.model import distributed as d

        d._pwrite = getattr(d._pwrite, "real", d._pwrite)

    client.run(install)
    try:
        res = gguf_kquant.quantize_model(src, tmp_path / "dask.gguf", "Q4_K_M", client=client)
    finally:
        client.run(uninstall)
    assert marker.exists()
    _check_same(res.paths[0], local.paths[0])
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != pids  # one worker process died and was replaced


def test_bad_data_fails_the_run_with_its_error_and_no_output(client, tmp_path):
    import gguf

    p = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_k.weight", np.ones((64, 256), np.float32))
    x = np.ones((64, 256), np.float32)
    x[37, 5] = np.nan
    w.add_tensor("blk.0.attn_q.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "out.gguf").write_bytes(b"old")
    with pytest.raises(BadTensorDataError, match=r"blk\.0\.attn_q\.weight.*nan at row 37, column 5"):
        gguf_kquant.quantize_model(p, tmp_path / "out.gguf", "Q4_K_M", overwrite=True, client=client)
    _no_leftovers(tmp_path, ["nan.gguf", "out.gguf"])
    assert (tmp_path / "out.gguf").read_bytes() == b"old"


def _refused(src, dst, client, match):
    with pytest.raises(D.ClusterError, match=match) as info:
        gguf_kquant.quantize_model(src, dst, "Q4_K_M", client=client)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unreachable_scheduler_refused_in_one_line(models, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "CONNECT_TIMEOUT", 2.0)
    _refused(models["gqa"], tmp_path / "out.gguf", "tcp://127.0.0.1:9", r"cannot reach the Dask scheduler at "
                                                                        r"tcp://127\.0\.0\.1:9")
    _no_leftovers(tmp_path, [])


def test_worker_that_cannot_see_the_source_refused_before_work(client, models, tmp_path):
    """/proc/self/fd/N names the client's open file only in the client's process."""
    with open(models["gqa"], "rb") as fh:
        src = f"/proc/self/fd/{fh.fileno()}"
        msg = _refused(src, tmp_path / "out.gguf", client, r"^Dask worker \S+ (cannot read the source file|sees "
                                                           r"another file at the source path) /proc/self/fd/")
    assert "Errno" in msg or "differ" in msg
    _no_leftovers(tmp_path, [])


def test_worker_with_other_versions_refused_before_work(client, models, tmp_path):
    def pretend(version):
        import gguf_kquant as g

        g.__version__ = version

    client.run(pretend, "0.0.0+elsewhere")
    try:
        _refused(models["gqa"], tmp_path / "out.gguf", client,
                 rf"^Dask worker \S+ has gguf_kquant 0\.0\.0\+elsewhere, this client {gguf_kquant.__version__}")
    finally:
        client.run(pretend, gguf_kquant.__version__)
    _no_leftovers(tmp_path, [])


@pytest.mark.parametrize("arch,mix,split", [("llama", "Q4_K_M", None), ("mixtral", "F16", 60000)])
def test_convert_hf_on_the_cluster(client, tmp_path, arch, mix, split):
    """convert_hf's per-tensor transformations (q/k permutation, experts stacked) run on the workers."""
    from gguf_kquant.convert import convert_hf
    from test_convert_helpers import make_model

    d = tmp_path / "hf"
    make_model(arch, d, seed=5)
    kw = {"split_max_size": split}
    if mix != "F16":  # with an imatrix: each task gets its tensor's values
        f16 = convert_hf(d, tmp_path / "f16.gguf", "F16")[0]
        kw["imatrix"] = tmp_path / "m.imatrix"
        make_imatrix(f16, kw["imatrix"], seed=9)
        f16.unlink()
    local = convert_hf(d, tmp_path / "local.gguf", mix, **kw)
    ours = convert_hf(d, tmp_path / "dask.gguf", mix, client=client, **kw)
    assert len(ours) == len(local) and (len(ours) > 1) == (split is not None)
    for a, b in zip(ours, local):
        _check_same(a, b)
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_cli_dask(client, models, tmp_path, capsys):
    from gguf_kquant.cli import main

    src = models["odd"]
    local = gguf_kquant.quantize_model(src, tmp_path / "local.gguf", "Q4_K_M")
    assert main(["quantize", str(src), str(tmp_path / "dask.gguf"), "Q4_K_M", "--dask", client.scheduler.address,
                 "--quiet"]) == 0
    _check_same(tmp_path / "dask.gguf", local.paths[0])
    capsys.readouterr()
    D_timeout = D.CONNECT_TIMEOUT
    D.CONNECT_TIMEOUT = 2.0
    try:
        assert main(["quantize", str(src), str(tmp_path / "no.gguf"), "Q4_K_M", "--dask", "tcp://127.0.0.1:9"]) == 1
    finally:
        D.CONNECT_TIMEOUT = D_timeout
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err
    assert not (tmp_path / "no.gguf").exists()


def test_several_outputs_in_one_pass(client, models, imatrices, tmp_path, monkeypatch):
    """quantize_model({path: mix}, client=...): one task per source tensor writes every output (split); each
    output is its own local run's bytes."""
    from gguf_kquant.model import multi

    with monkeypatch.context() as m:  # the cluster's streaming, not the local one
        m.setattr(multi, "_stream_all", lambda *a: pytest.fail("several outputs streamed locally"))
        res = _several_outputs(client, models, imatrices, tmp_path)
    _check_several_outputs(res, models, imatrices, tmp_path)


def _outputs(tmp_path) -> dict:
    return {tmp_path / "a.gguf": "Q4_K_M", tmp_path / "b.gguf": "Q6_K", tmp_path / "c.gguf": "Q4_K_S"}


def _several_outputs(client, models, imatrices, tmp_path):
    src, im, outs = models["moe"], imatrices["moe"][0], _outputs(tmp_path)
    return gguf_kquant.quantize_model(src, outs, imatrix=im, split_max_tensors=20, client=client,
                                      report={tmp_path / "a.gguf": tmp_path / "a.json"})


def _check_several_outputs(res, models, imatrices, tmp_path):
    src, im = models["moe"], imatrices["moe"][0]
    for dst, mix in _outputs(tmp_path).items():
        report = {"report": tmp_path / "local.json"} if mix == "Q4_K_M" else {}
        local = gguf_kquant.quantize_model(src, tmp_path / f"local-{mix}.gguf", mix, imatrix=im, split_max_tensors=20,
                                           **report)
        assert len(res[dst].paths) == len(local.paths) > 1
        for a, b in zip(res[dst].paths, local.paths):
            _check_same(a, b)
    _same_report(tmp_path / "a.json", tmp_path / "local.json")
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_worker_that_cannot_see_the_destination_refused_before_work(client, models, tmp_path):
    """/proc/self/fd/N/out.gguf: a folder only the client's process can reach through its open descriptor."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        _refused(models["gqa"], f"/proc/self/fd/{fd}/m.gguf", client,
                 rf"^Dask worker \S+ (cannot write the output's temp file /proc/self/fd/{fd}/\.gguf-kquant-\w+\.tmp "
                 r"in the destination folder|sees another file at the output temp file)")
    finally:
        os.close(fd)
    assert list(out_dir.iterdir()) == []


def test_split_source_keep_split(client, models, tmp_path, small_tasks):
    """A source in three shards (each worker reads every shard) and --keep-split's one output per shard."""
    from test_model_quantize import _write_split_copy

    _write_split_copy(models["gqa"], tmp_path / "src.gguf", 30)
    src = tmp_path / "src-00001-of-00003.gguf"
    local = gguf_kquant.quantize_model(src, tmp_path / "local", "Q6_K", keep_split=True)
    res = gguf_kquant.quantize_model(src, tmp_path / "dask", "Q6_K", keep_split=True, client=client)
    assert len(res.paths) == len(local.paths) == 3
    for a, b in zip(res.paths, local.paths):
        _check_same(a, b)
