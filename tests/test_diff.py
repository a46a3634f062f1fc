"""gguf-kquant diff: metadata and tensor-table differences, and B's error against A after dequantization,
checked against numpy on values decoded by llama.cpp itself."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
import oracle
from gguf_kquant.cli import main
from gguf_kquant.container.values import GGUFValueType as VT, Value
from gguf_kquant.tools import diff, split

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama-f16.gguf"
Q8_0 = int(gguf_kquant.GGMLType.Q8_0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A (F32) and B (llama.cpp's Q8_0 of the same values, plus metadata and table differences)."""
    d = tmp_path_factory.mktemp("diff")
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    w[3] = 0.0
    v = (rng.standard_normal((4, 32)) * 3).astype(np.float32)
    zero = np.zeros((2, 32), np.float32)
    a = {"general.architecture": "llama", "general.name": "A", "x.removed": 1,
         "x.retyped": Value(5, VT.UINT32), "x.arr": [1, 2, 3]}
    b = {"general.architecture": "llama", "general.name": "B", "x.added": "new",
         "x.retyped": Value(5, VT.INT32), "x.arr": [1, 2, 4]}
    gguf_kquant.write(d / "a.gguf", a, {"w": w, "v": v, "zero": zero, "only_a": w, "reshaped": w})
    q = oracle.quantize_chunk(Q8_0, w)
    gguf_kquant.write(d / "b.gguf", b, [("w", w.shape, "Q8_0", q), ("v", v.astype(np.float16)), ("zero", zero),
                                        ("reshaped", w.reshape(32, 32)), ("only_b", v)])
    return d / "a.gguf", d / "b.gguf", {"w": (w, oracle.to_float(Q8_0, q, 64).reshape(w.shape)),
                                        "v": (v, v.astype(np.float16).astype(np.float32))}


def test_metadata_and_table_differences(pair):
    a, b, _ = pair
    d = diff(a, b)
    md = d["metadata"]
    assert [e["key"] for e in md["added"]] == ["x.added"] and [e["key"] for e in md["removed"]] == ["x.removed"]
    changed = {e["key"]: e for e in md["changed"]}
    assert sorted(changed) == ["general.name", "x.arr", "x.retyped"]
    assert (changed["x.retyped"]["type_a"], changed["x.retyped"]["type_b"]) == ("UINT32", "INT32")
    assert changed["x.arr"]["value_b"] == [1, 2, 4] and changed["x.arr"]["type_a"] == "ARRAY[INT32]"
    t = d["tensors"]
    assert t["only_a"] == ["only_a"] and t["only_b"] == ["only_b"]
    assert t["different_shape"] == [{"name": "reshaped", "shape_a": [16, 64], "shape_b": [32, 32],
                                     "type_a": "F32", "type_b": "F32"}]
    assert t["different_type"] == ["w", "v"]
    assert not d["summary"]["identical"]


def test_errors_match_numpy_on_llama_cpp_decoded_values(pair):
    a, b, ref = pair
    rows = {r["name"]: r for r in diff(a, b, threads=2)["tensors"]["compared"]}
    assert sorted(rows) == ["v", "w", "zero"]
    for name, (x, y) in ref.items():
        x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        r = rows[name]
        assert r["n_elements"] == x.size
        assert r["rmse"] == pytest.approx(math.sqrt(np.mean((y64 - x64) ** 2)), rel=1e-12)
        assert r["max_abs"] == np.max(np.abs(y64 - x64)) > 0
        assert r["cosine"] == pytest.approx(x64 @ y64 / np.linalg.norm(x64) / np.linalg.norm(y64), rel=1e-12)
        assert r["rms_a"] == pytest.approx(math.sqrt(np.mean(x64 ** 2)), rel=1e-12)
    assert rows["zero"] == {"name": "zero", "type_a": "F32", "type_b": "F32", "n_elements": 64, "rmse": 0.0,
                            "max_abs": 0.0, "cosine": 1.0, "rms_a": 0.0}


def test_identical_and_split_model(tmp_path):
    d = diff(FIXTURE, FIXTURE)
    assert d["summary"]["identical"] and d["summary"]["rmse"] == 0.0 and d["summary"]["min_cosine"] == 1.0
    shards = split(FIXTURE, tmp_path / "m", max_tensors=20)
    d = diff(FIXTURE, shards[0], tensors=False)  # a split model compares as a whole
    assert [e["key"] for e in d["metadata"]["added"]] == ["split.no", "split.tensors.count", "split.count"]
    assert not any(d["tensors"][k] for k in ("only_a", "only_b", "different_shape", "compared"))


def test_cli_text_and_json(pair, capsys):
    a, b, _ = pair
    assert main(["diff", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(diff(a, b)))
    assert main(["diff", str(a), str(b)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert "- x.removed (UINT32) = 1" in text and "+ tensor only_b" in text
    assert "~ x.retyped: (UINT32) 5 -> (INT32) 5" in text
    row = next(line for line in text if line.startswith("w "))
    assert row.split()[:3] == ["w", "F32", "Q8_0"]
    assert text[-1].startswith("3 tensors compared (1216 elements)") and text[-1].endswith("different")


def test_cli_misuse(pair, tmp_path, capsys):
    a, _, _ = pair
    assert main(["diff", str(a), str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.gguf" in err
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + bytes(40))
    assert main(["diff", str(tmp_path / "bad.gguf"), str(a)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["diff", str(a), str(a), "-t", "0"]) == 1


def test_sums_over_slabs(monkeypatch):
    diff_module = importlib.import_module("gguf_kquant.tools.diff")  # the package's `diff` is the function

    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)
    y[999] = np.nan  # only in the last element: the first 999 are finite
    whole = diff_module.tensor_error(x[:999], y[:999])
    monkeypatch.setattr(diff_module, "SLAB_ELEMENTS", 7)
    sliced = diff_module.tensor_error(x[:999], y[:999])
    d = y[:999].astype(np.float64) - x[:999]
    assert whole["sse"] == pytest.approx(d @ d, rel=1e-12) and sliced["sse"] == pytest.approx(d @ d, rel=1e-12)
    assert whole["max_abs"] == sliced["max_abs"] == np.max(np.abs(d))
    assert math.isnan(diff_module.tensor_error(x, y)["max_abs"])  # a NaN is not hidden by max()
    monkeypatch.setattr(diff_module, "SLAB_ELEMENTS", 7)
    assert math.isnan(diff_module.tensor_error(x, y)["max_abs"])


def test_json_of_non_finite_values(tmp_path, capsys):
    x = np.ones((2, 32), np.float32)
    gguf_kquant.write(tmp_path / "a.gguf", {"general.architecture": "llama"}, {"t": x})
    x[1, 5] = np.inf
    gguf_kquant.write(tmp_path / "b.gguf", {"general.architecture": "llama"}, {"t": x})
    assert main(["diff", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["tensors"]["compared"][0]
    assert row["rmse"] == "inf" and row["max_abs"] == "inf"
