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


# ------------------------------------------------------------------------------------------------------
# imatrix convert: the bytes llama-imatrix writes (tools/imatrix/imatrix.cpp)
# ------------------------------------------------------------------------------------------------------
def _ggml_save_imatrix(path, entries, datasets, last_chunk, chunk_size):
    """IMatrixCollector::save_imatrix through ggml's own gguf API (the oracle library): the same calls, in
    the same order, with the collector state ``entries`` name -> (float32 values, int counts)."""
    import ctypes

    from oracle import ggml

    lib = ggml()

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_init.restype, lib.ggml_init.argtypes = vp, [InitParams]
    lib.ggml_new_tensor_2d.restype = vp
    lib.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_set_name.restype, lib.ggml_set_name.argtypes = vp, [vp, cp]
    lib.ggml_get_data.restype, lib.ggml_get_data.argtypes = vp, [vp]
    lib.gguf_init_empty.restype = vp
    lib.gguf_set_val_str.argtypes = [vp, cp, cp]
    lib.gguf_set_arr_str.argtypes = [vp, cp, ctypes.POINTER(cp), ctypes.c_size_t]
    lib.gguf_set_val_u32.argtypes = [vp, cp, ctypes.c_uint32]
    lib.gguf_add_tensor.argtypes = [vp, vp]
    lib.gguf_write_to_file.restype, lib.gguf_write_to_file.argtypes = ctypes.c_bool, [vp, cp, ctypes.c_bool]
    lib.gguf_free.argtypes = [vp]
    lib.ggml_free.argtypes = [vp]

    size = sum(2 * lib.ggml_tensor_overhead() + 4 * (v.size + len(c)) + 64 for v, c in entries.values())
    ctx = lib.ggml_init(InitParams(size, None, False))
    g = lib.gguf_init_empty()
    lib.gguf_set_val_str(g, b"general.type", b"imatrix")
    arr = (cp * max(len(datasets), 1))(*[d.encode() for d in datasets])
    lib.gguf_set_arr_str(g, b"imatrix.datasets", arr, len(datasets))
    lib.gguf_set_val_u32(g, b"imatrix.chunk_count", last_chunk)
    lib.gguf_set_val_u32(g, b"imatrix.chunk_size", chunk_size)
    for name in sorted(entries, key=str.encode):
        values, counts = entries[name]
        nmat = len(counts)
        s = lib.ggml_new_tensor_2d(ctx, 0, values.size // nmat, nmat)
        c = lib.ggml_new_tensor_2d(ctx, 0, 1, nmat)
        lib.ggml_set_name(s, f"{name}.in_sum2".encode())
        lib.ggml_set_name(c, f"{name}.counts".encode())
        ctypes.memmove(lib.ggml_get_data(s), np.ascontiguousarray(values, np.float32).ctypes.data, 4 * values.size)
        ctypes.memmove(lib.ggml_get_data(c), np.asarray(counts, np.float32).ctypes.data, 4 * nmat)
        lib.gguf_add_tensor(g, s)
        lib.gguf_add_tensor(g, c)
    assert lib.gguf_write_to_file(g, str(path).encode(), False)
    lib.gguf_free(g)
    lib.ggml_free(ctx)


def _legacy_entry(name, ncall, values):
    b = name.encode()
    return struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(values)) + np.asarray(values, "<f4").tobytes()


def test_convert_legacy_to_gguf_equals_llama_imatrix(tmp_path):
    from gguf_kquant.cli import main

    rng = np.random.default_rng(7)
    q, up = rng.random(64, dtype=np.float32) * 3, rng.random(32, dtype=np.float32)
    dat = tmp_path / "in.dat"
    write_legacy_imatrix(dat, {"blk.0.attn_q.weight": q, "blk.0.ffn_up.weight": up, "output.weight": np.ones(32)},
                         ncall=3, chunk_count=7, dataset="wiki.train.raw")
    # load_imatrix (legacy): values = sums * chunk_size, counts = {ncall * chunk_size}; last chunk = max // chunk
    for chunk in (512, 4096):
        want = tmp_path / f"want{chunk}.gguf"
        _ggml_save_imatrix(want, {"blk.0.attn_q.weight": (q * np.float32(chunk), [3 * chunk]),
                                  "blk.0.ffn_up.weight": (up * np.float32(chunk), [3 * chunk]),
                                  "output.weight": (np.full(32, chunk, np.float32), [3 * chunk])},
                           ["wiki.train.raw"], 3, chunk)
        out = tmp_path / f"out{chunk}.gguf"
        assert main(["imatrix", "convert", str(dat), str(out), "-c", str(chunk), "-q"]) == 0
        assert out.read_bytes() == want.read_bytes()
    im_dat, im_gguf = load_imatrix(dat), load_imatrix(tmp_path / "out512.gguf")
    assert im_gguf.entries.keys() == im_dat.entries.keys()
    for k in im_dat.entries:
        np.testing.assert_allclose(im_gguf.entries[k], im_dat.entries[k], rtol=1e-6)


def test_convert_gguf_to_legacy_equals_llama_imatrix(tmp_path):
    """A MoE entry with an expert that saw no tokens (stored as 1), an entry with no data (skipped), counts
    rounded with lround, and the bytes save_imatrix_legacy writes."""
    src = tmp_path / "in.gguf"
    moe = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    _ggml_save_imatrix(src, {"blk.0.ffn_up_exps.weight": (moe, [1000, 0, 24]),
                             "blk.0.attn_k.weight": (np.full(4, 2.5, np.float32), [0]),
                             "blk.0.attn_q.weight": (np.full(4, 8, np.float32), [513])},
                       ["a.txt", "b.txt"], 1000 // 512, 512)
    out = tmp_path / "out.dat"
    assert gguf_kquant.model.imatrix.convert_imatrix(src, out) == "dat"
    f32 = np.float32
    # ncall = ceil(max count / 512); value = sum / count * ncall, 1 * ncall where the count is 0
    moe_vals = np.concatenate([moe[0] / f32(1000) * f32(2), np.full(4, 2, f32), moe[2] / f32(24) * f32(2)])
    want = (struct.pack("<i", 2) + _legacy_entry("blk.0.attn_q.weight", 2, np.full(4, f32(8) / f32(513) * f32(2)))
            + _legacy_entry("blk.0.ffn_up_exps.weight", 2, moe_vals)
            + struct.pack("<ii", 1000 // 512, 5) + b"b.txt")
    assert out.read_bytes() == want
    # and back: GGUF -> GGUF is the identity when the chunk size and count agree
    again = tmp_path / "again.gguf"
    gguf_kquant.model.imatrix.convert_imatrix(src, again)
    assert again.read_bytes() == src.read_bytes()


def test_convert_gguf_from_gguf_py_counts_rounded(tmp_path):
    _gguf_imatrix(tmp_path / "i.gguf", {"t": (np.ones((2, 4)) * 3, [2.4, 2.6])})
    gguf_kquant.model.imatrix.convert_imatrix(tmp_path / "i.gguf", tmp_path / "o.gguf")
    want = tmp_path / "w.gguf"
    _ggml_save_imatrix(want, {"t": (np.full(8, 3, np.float32), [2, 3])}, ["wiki.txt", "code.txt"], 0, 512)
    assert (tmp_path / "o.gguf").read_bytes() == want.read_bytes()


def test_convert_misuse_is_one_line_and_touches_nothing(tmp_path, capsys):
    from gguf_kquant.cli import main

    dat = tmp_path / "in.dat"
    write_legacy_imatrix(dat, {"a": np.ones(4)}, ncall=1, chunk_count=1, dataset="d")
    before = dat.read_bytes()
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep")
    cases = [["imatrix", "convert", str(dat), str(dat), "--overwrite"],           # output is the input
             ["imatrix", "convert", str(dat), str(out)],                          # exists, no --overwrite
             ["imatrix", "convert", str(dat), str(tmp_path / "x.gguf"), "-c", "0"],
             ["imatrix", "convert", str(tmp_path / "missing.dat"), str(tmp_path / "y.gguf")],
             ["imatrix", "convert", str(out), str(tmp_path / "z.gguf")]]          # not an imatrix
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gguf-kquant imatrix: error:"), (argv, err)
    assert dat.read_bytes() == before and out.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.dat", "o.gguf"]


def test_convert_legacy_to_legacy_rescales_as_llama_imatrix(tmp_path):
    """dat -> dat: loaded as sums * chunk and count ncall * chunk, stored as sum / count * ceil(count / chunk)."""
    dat = tmp_path / "in.dat"
    v = np.array([0.1, 3.7, 1e-3, 5.0], np.float32)
    write_legacy_imatrix(dat, {"w": v}, ncall=3, chunk_count=3, dataset="")
    gguf_kquant.model.imatrix.convert_imatrix(dat, tmp_path / "o.dat", chunk_size=100)
    f32 = np.float32
    vals = (v * f32(100)) / f32(300) * f32(3)
    assert (tmp_path / "o.dat").read_bytes() == (struct.pack("<i", 1) + _legacy_entry("w", 3, vals)
                                                 + struct.pack("<ii", 3, 0))
