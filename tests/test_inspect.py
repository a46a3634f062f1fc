"""`gguf-kquant inspect` and inspect_file: JSON schema, text output, long-array summaries, speed."""

from __future__ import annotations

import json
import time

import pytest

from gguf_kquant.cli import main
from gguf_kquant.container.values import GGUFValueType as VT
from gguf_kquant.inspect import inspect_file
from test_reader_hostile import build_gguf

TOP_KEYS = {"schema_version", "file", "shards", "file_size", "version", "byte_order", "alignment", "data_offset",
            "tensor_count", "kv_count", "architecture", "name", "file_type", "totals", "types", "metadata",
            "tensors"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    kvs = [
        ("general.architecture", VT.STRING, "llama"),
        ("general.name", VT.STRING, "tiny"),
        ("general.file_type", VT.UINT32, 15),
        ("llama.rope.freq_base", VT.FLOAT32, 10000.0),
        ("x.nan", VT.FLOAT32, float("nan")),
        ("x.flag", VT.BOOL, 1),
        ("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, [f"tok{i}" for i in range(300)])),
        ("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.5] * 300)),
        ("x.short", VT.ARRAY, (VT.INT32, [1, 2, 3])),
        ("x.nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, list(range(20))), (VT.STRING, ["a"])])),
    ]
    tensors = [
        ("token_embd.weight", [64, 4], 8, b"\1" * (34 * 2 * 4)),  # Q8_0: 2 blocks per row, 4 rows
        ("output_norm.weight", [64], 0, b"\0" * 256),  # F32
        ("blk.0.attn_q.weight", [256, 2], 12, b"\2" * (144 * 2)),  # Q4_K
    ]
    path = tmp_path_factory.mktemp("inspect") / "small.gguf"
    path.write_bytes(build_gguf(kvs, tensors))
    return path


def test_schema_and_values(small):
    info = inspect_file(small)
    assert set(info) == TOP_KEYS
    assert json.loads(json.dumps(info, allow_nan=False)) == info  # strictly JSON (no NaN literals)
    assert info["schema_version"] == 1 and info["file"] == str(small) and info["shards"] == [str(small)]
    assert info["file_size"] == small.stat().st_size
    assert (info["version"], info["byte_order"], info["alignment"]) == (3, "little", 32)
    assert (info["tensor_count"], info["kv_count"]) == (3, 10)
    assert info["architecture"] == "llama" and info["name"] == "tiny"
    assert info["file_type"] == {"id": 15, "name": "MOSTLY_Q4_K_M"}

    md = {r["key"]: r for r in info["metadata"]}
    assert list(md) == [r["key"] for r in info["metadata"]]
    assert md["general.file_type"] == {"key": "general.file_type", "type": "UINT32", "element_type": None,
                                       "count": None, "value": 15, "truncated": False}
    assert md["x.nan"]["value"] == "nan" and md["x.flag"]["value"] is True
    toks = md["tokenizer.ggml.tokens"]
    assert (toks["type"], toks["element_type"], toks["count"], toks["truncated"]) == ("ARRAY", "STRING", 300, True)
    assert toks["value"] == [f"tok{i}" for i in range(8)]
    assert md["tokenizer.ggml.scores"]["value"] == [0.5] * 8
    assert md["x.short"]["value"] == [1, 2, 3] and md["x.short"]["truncated"] is False
    nested = md["x.nested"]
    assert nested["element_type"] == "ARRAY" and nested["count"] == 2
    assert nested["value"][0] == {"element_type": "UINT8", "count": 20, "value": list(range(8)), "truncated": True}
    assert nested["value"][1] == {"element_type": "STRING", "count": 1, "value": ["a"], "truncated": False}

    t = {r["name"]: r for r in info["tensors"]}
    assert t["token_embd.weight"] == {"name": "token_embd.weight", "shape": [4, 64], "type": "Q8_0", "type_id": 8,
                                      "shard": 0, "offset": t["token_embd.weight"]["offset"], "bytes": 272,
                                      "elements": 256, "bits_per_weight": 8.5}
    assert t["blk.0.attn_q.weight"]["bits_per_weight"] == 4.5
    assert t["output_norm.weight"]["offset"] == info["data_offset"] + 288  # after the padded Q8_0 tensor

    types = {r["type"]: r for r in info["types"]}
    assert [r["type"] for r in info["types"]] == ["Q4_K", "Q8_0", "F32"]  # most bytes first
    assert types["Q8_0"] == {"type": "Q8_0", "count": 1, "elements": 256, "bytes": 272,
                             "share": 272 / (272 + 256 + 288), "bits_per_weight": 8.5}
    assert abs(sum(r["share"] for r in info["types"]) - 1) < 1e-12
    assert info["totals"] == {"tensors": 3, "elements": 832, "bytes": 816, "bits_per_weight": 8 * 816 / 832}


def test_optional_sections(small):
    info = inspect_file(small, tensors=False, metadata=False)
    assert set(info) == TOP_KEYS - {"metadata", "tensors"}
    assert info["types"] and info["file_type"]["name"] == "MOSTLY_Q4_K_M"
    assert inspect_file(small, max_items=2)["metadata"][6]["value"] == ["tok0", "tok1"]


def test_cli_default_shows_header_and_summary(small, capsys):
    assert main(["inspect", str(small)]) == 0
    out = capsys.readouterr().out
    assert "v3, little-endian, alignment 32" in out
    assert "3 tensors, 10 metadata keys" in out
    assert "MOSTLY_Q4_K_M (15)" in out
    assert "Q8_0" in out and "8.500" in out
    assert "tokenizer.ggml.tokens" not in out and "token_embd.weight" not in out


def test_cli_metadata_summarizes_long_arrays(small, capsys):
    assert main(["inspect", str(small), "--metadata"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("tokenizer.ggml.tokens"))
    assert line.endswith('[300 × STRING] "tok0", "tok1", "tok2", "tok3", "tok4", "tok5", …')
    assert "tok6" not in out and "tok299" not in out
    assert "[3 × INT32] 1, 2, 3" in out and "FLOAT32 10000.0" in out and "BOOL    true" in out
    assert "token_embd.weight" not in out


def test_cli_tensors_table(small, capsys):
    assert main(["inspect", str(small), "--tensors"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("token_embd.weight"))
    assert row.split() == ["token_embd.weight", "4×64", "Q8_0", "272", "8.500"]
    assert "general.name" not in out


def test_cli_json_is_everything(small, capsys):
    assert main(["inspect", str(small), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == inspect_file(small)


def test_cli_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x07\0\0\0" + b"\0" * 16)
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "gguf-kquant inspect: error:" in err and str(bad) in err and "version 7" in err
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 1
    assert "missing.gguf" in capsys.readouterr().err


def test_fast_on_a_262k_vocabulary(tmp_path):
    n = 262_144
    path = tmp_path / "vocab.gguf"
    path.write_bytes(build_gguf([("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, [f"t{i}" for i in range(n)])),
                                 ("tokenizer.ggml.token_type", VT.ARRAY, (VT.INT32, [1] * n))],
                                [("t", [8], 0, b"\0" * 32)]))
    inspect_file(path)  # warm the page cache
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        info = inspect_file(path)
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.3, times
    assert info["metadata"][0]["count"] == n and info["metadata"][0]["value"][:2] == ["t0", "t1"]


def test_split_model(tmp_path, capsys):
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama", split_max_tensors=1)
    for i in range(2):
        w.add_tensor(f"t{i}", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    first, second = sorted(tmp_path.glob("m-*.gguf"))
    info = inspect_file(first)
    assert info["shards"] == [str(first), str(second)]
    assert info["file_size"] == first.stat().st_size + second.stat().st_size
    assert [(t["name"], t["shard"]) for t in info["tensors"]] == [("t0", 0), ("t1", 1)]
    assert main(["inspect", str(first), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "2 shards" in out and out.splitlines()[-1].split() == ["t1", "2×4", "F32", "32", "32.000", "2"]
    assert main(["inspect", str(second), "--no-split", "--json"]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)["tensors"]] == ["t1"]


# ------------------------------------------------------------------------------------------------------
# hostile terminals: closed stdout, encodings that cannot show the metadata, pipes closed early
# ------------------------------------------------------------------------------------------------------
def _cli(args: str, env_extra=None, redirect: str = ""):
    import os
    import subprocess
    import sys

    env = dict(os.environ, **(env_extra or {}))
    encoding = env.get("PYTHONIOENCODING", "utf-8")
    return subprocess.run(["bash", "-c", f"{sys.executable} -m gguf_kquant {args} {redirect}"],
                          capture_output=True, encoding=encoding, env=env, timeout=120)


@pytest.fixture(scope="module")
def unicode_file(tmp_path_factory):
    import numpy as np

    import gguf_kquant

    p = tmp_path_factory.mktemp("u") / "u.gguf"
    gguf_kquant.write(p, {"general.name": "modèle 日本 🦙", "t.arr": ["ü"] * 3}, {"w": np.zeros(4, np.float32)},
                      fsync=False)
    return p


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
@pytest.mark.parametrize("flags", ["--metadata", "--json"])
def test_cli_non_utf8_terminal(unicode_file, encoding, flags):
    proc = _cli(f"inspect {unicode_file} {flags}", {"PYTHONIOENCODING": encoding})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "general.name" in proc.stdout and "\\u65e5" in proc.stdout  # unencodable characters escaped


def test_cli_closed_stdout_is_one_line(unicode_file):
    proc = _cli(f"inspect {unicode_file}", redirect=">&-")
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "gguf-kquant inspect: error: [Errno 9] cannot write to standard output: it is closed"


def test_cli_closed_stdout_and_stderr_no_crash(unicode_file):
    proc = _cli(f"inspect {unicode_file}", redirect=">&- 2>&-")
    assert proc.returncode == 1


def test_cli_pipe_closed_early(unicode_file):
    proc = _cli(f"inspect {unicode_file} --metadata --tensors", redirect="| head -c 10; exit ${PIPESTATUS[0]}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------------
# --full and --markdown
# ------------------------------------------------------------------------------------------------------
def test_json_full_prints_whole_arrays(small, capsys):
    assert main(["inspect", str(small), "--json", "--full"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["metadata"]}
    tokens = rows["tokenizer.ggml.tokens"]
    assert tokens["value"] == [f"tok{i}" for i in range(300)] and not tokens["truncated"]
    assert rows["tokenizer.ggml.scores"]["value"] == [0.5] * 300
    assert main(["inspect", str(small), "--json"]) == 0  # default: the first 8
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["metadata"]}
    assert len(rows["tokenizer.ggml.tokens"]["value"]) == 8 and rows["tokenizer.ggml.tokens"]["truncated"]
    assert main(["inspect", str(small), "--metadata", "--full"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tokenizer.ggml.tokens"))
    assert '"tok299"' in line and "…" not in line


def test_markdown_equals_gguf_dump_on_the_example_model(example_model, capsys):
    import subprocess
    import sys

    want = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", "--markdown", str(example_model)],
                          capture_output=True, text=True, check=True).stdout
    assert main(["inspect", str(example_model), "--markdown"]) == 0
    got = capsys.readouterr().out
    assert got == want and "| T_ID |" in got and "Total BPW for tiny-llama-f16.gguf" in got


def _gguf_dump_markdown(path) -> str:
    import argparse
    import contextlib
    import io

    import gguf
    from gguf.scripts.gguf_dump import dump_markdown_metadata

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dump_markdown_metadata(gguf.GGUFReader(str(path)), argparse.Namespace(model=str(path), no_tensors=False))
    return buf.getvalue()


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_markdown_equals_gguf_dump_on_every_value_type(tmp_path, byte_order):
    """Scalars and arrays of every type, strings cut at 60/30 characters, backticks, the enc/dec/blk/base
    tensor groups, a quantized type and a big-endian file."""
    import numpy as np

    import gguf_kquant
    from gguf_kquant.container.values import Value

    md = [("general.architecture", "t5"), ("s.long", "a" * 40 + "`x`" + "b" * 40), ("s.tick", "`start"),
          ("f32", Value(1e-5, VT.FLOAT32)), ("f64", Value(0.1, VT.FLOAT64)), ("b", Value(True, VT.BOOL)),
          ("i8", Value(-3, VT.INT8)), ("u64", Value(2**63, VT.UINT64)), ("i64", Value(-2**40, VT.INT64)),
          ("a.bool", Value([True, False], VT.ARRAY, VT.BOOL)),
          ("a.i16", Value(list(range(-5, 5)), VT.ARRAY, VT.INT16)),
          ("a.f32", Value([0.1, 2.5, -1e30], VT.ARRAY, VT.FLOAT32)),
          ("a.str", Value(["x" * 31, "``", "é", "a", "b", "c"], VT.ARRAY, VT.STRING)),
          ("a.empty", Value([], VT.ARRAY, VT.UINT8)),
          ("a.nested", Value([Value([1, 2], VT.ARRAY, VT.INT32), Value([3], VT.ARRAY, VT.INT32)], VT.ARRAY, VT.ARRAY)),
          ("a.nested_str", Value([Value(["x", "y"], VT.ARRAY, VT.STRING)], VT.ARRAY, VT.ARRAY))]
    rng = np.random.default_rng(0)
    q8 = gguf_kquant.quantize(rng.standard_normal((3, 64), dtype=np.float32), "Q8_0")
    tensors = [("enc.blk.0.attn_q.weight", np.ones((4, 8), np.float32)),
               ("enc.output_norm.weight", np.ones(8, np.float32)),
               ("dec.blk.1.ffn_up.weight", (3, 64), "Q8_0", q8),
               ("blk.3.attn_k.bias", np.ones((2, 2, 2), np.float16)),
               ("token_embd.weight", np.ones((16, 32), np.float32))]
    path = tmp_path / "m.gguf"
    gguf_kquant.write(path, md, tensors, byte_order=byte_order)
    from gguf_kquant.inspect import format_markdown

    assert format_markdown(path) + "\n" == _gguf_dump_markdown(path)
