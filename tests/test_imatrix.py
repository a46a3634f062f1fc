"""Importance-matrix files: both of llama-imatrix's formats, normalised as llama-quantize does."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.container.values import GGUFValueType as V, Value
from gguf_kquant.errors import GGUFIOError, ImatrixError
from gguf_kquant.model.imatrix import load_imatrix, write_legacy_imatrix


def _gguf_imatrix(path, entries, keys=("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")):
    import gguf

    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_string("general.type", "imatrix")
    if "imatrix.datasets" in keys:
        w.add_array("imatrix.datasets", ["wiki.txt", "code.txt"])
    if "imatrix.chunk_count" in keys:
        w.add_uint32("imatrix.chunk_count", 12)
    if "imatrix.chunk_size" in keys:
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        if sums is not None:
            w.add_tensor(name + ".in_sum2", np.asarray(sums, np.float32))
        if counts is not None:
            w.add_tensor(name + ".counts", np.asarray(counts, np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_format_divides_by_counts_per_expert(tmp_path):
    sums = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    _gguf_imatrix(tmp_path / "i.gguf", {"blk.0.ffn_up_exps.weight": (sums, [2.0, 0.0, 2.6])})
    im = load_imatrix(tmp_path / "i.gguf")
    v = im.entries["blk.0.ffn_up_exps.weight"]
    np.testing.assert_array_equal(v[:4], sums[0] / np.float32(2))
    np.testing.assert_array_equal(v[4:8], np.ones(4, np.float32))  # count 0 -> 1
    np.testing.assert_array_equal(v[8:], sums[2] / np.float32(3))  # counts are rounded (lround)
    assert im.datasets == ["wiki.txt", "code.txt"] and im.chunk_count == 12
    kv = dict((k, v.value) for k, v in im.kv())
    assert kv["quantize.imatrix.dataset"] == "wiki.txt" and kv["quantize.imatrix.entries_count"] == 1
    assert kv["quantize.imatrix.chunks_count"] == 12


def test_gguf_format_needs_metadata_and_pairs(tmp_path):
    _gguf_imatrix(tmp_path / "a.gguf", {"x": (np.ones((1, 4)), [1.0])}, keys=("imatrix.datasets",))
    with pytest.raises(ImatrixError, match="missing imatrix metadata"):
        load_imatrix(tmp_path / "a.gguf")
    _gguf_imatrix(tmp_path / "b.gguf", {"x": (np.ones((1, 4)), None)})
    with pytest.raises(ImatrixError, match="mismatched sums and counts"):
        load_imatrix(tmp_path / "b.gguf")


def test_legacy_format(tmp_path):
    p = tmp_path / "i.dat"
    write_legacy_imatrix(p, {"b": np.full(4, 6.0), "a": np.arange(8)}, ncall=3, chunk_count=5, dataset="d.txt")
    im = load_imatrix(p)
    assert im.is_legacy and im.chunk_count == 5 and im.datasets == ["d.txt"]
    np.testing.assert_array_equal(im.entries["b"], np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(im.entries["a"], np.arange(8, dtype=np.float32) / np.float32(3))
    # the trailer is optional
    write_legacy_imatrix(p, {"a": np.ones(4)}, ncall=0)
    im = load_imatrix(p)
    assert im.chunk_count == 0 and not im.datasets and (im.entries["a"] == 1).all()
    assert [k for k, _ in im.kv()] == ["quantize.imatrix.file", "quantize.imatrix.entries_count"]


@pytest.mark.parametrize("blob", [b"", b"\x00\x00\x00\x00", struct.pack("<ii", 1, 1000),
                                  struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 0),
                                  struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 4) + b"\0" * 8])
def test_legacy_truncated_or_empty_is_refused(tmp_path, blob):
    p = tmp_path / "bad.dat"
    p.write_bytes(blob)
    with pytest.raises(ImatrixError):
        load_imatrix(p)


def test_include_exclude_and_nonfinite(tmp_path):
    p = tmp_path / "i.dat"
    write_legacy_imatrix(p, {"blk.0.attn_q.weight": np.ones(4), "blk.0.ffn_up.weight": np.ones(4)})
    assert list(load_imatrix(p, include=["ffn"]).entries) == ["blk.0.ffn_up.weight"]
    assert list(load_imatrix(p, exclude=["ffn"]).entries) == ["blk.0.attn_q.weight"]
    with pytest.raises(ImatrixError, match="cannot be used together"):
        load_imatrix(p, include=["a"], exclude=["b"])
    write_legacy_imatrix(p, {"t": np.array([1, np.nan, 1, 1])})
    with pytest.raises(ImatrixError, match="'t'.*index 1"):
        load_imatrix(p).check_finite()


def test_missing_file(tmp_path):
    with pytest.raises(GGUFIOError, match=r"nope.dat: cannot open: \[Errno 2\]"):
        load_imatrix(tmp_path / "nope.dat")
    with pytest.raises(GGUFIOError, match="a directory"):
        load_imatrix(tmp_path)


@pytest.mark.parametrize("key,value,why", [
    ("imatrix.chunk_count", "ten", "imatrix.chunk_count must be of type UINT32, not STRING"),
    ("imatrix.chunk_count", Value(-3, V.INT32), "imatrix.chunk_count must be of type UINT32, not INT32"),
    ("imatrix.chunk_size", 1.5, "imatrix.chunk_size must be of type UINT32, not FLOAT32"),
    ("imatrix.datasets", Value([1], V.ARRAY, V.INT32), "must be of type ARRAY of STRING, not ARRAY of INT32"),
])
def test_metadata_of_the_wrong_type(tmp_path, key, value, why):
    md = {"imatrix.datasets": ["d"], "imatrix.chunk_count": 10, "imatrix.chunk_size": 512, key: value}
    p = tmp_path / "im.gguf"
    gguf_kquant.write(p, md, {"t.in_sum2": np.ones(4, np.float32), "t.counts": np.ones(1, np.float32)},
                      fsync=False)
    with pytest.raises(ImatrixError, match=why):
        load_imatrix(p)


def test_legacy_entry_count_lies(tmp_path):
    from gguf_kquant.errors import LimitExceededError

    p = tmp_path / "lie.dat"
    p.write_bytes(struct.pack("<i", 2**31 - 1) + b"\0" * 64)
    with pytest.raises(LimitExceededError, match="2147483647 entries"):
        load_imatrix(p)
