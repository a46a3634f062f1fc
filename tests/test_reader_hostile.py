"""Hostile and corrupt GGUF files: every one must raise a GGUFError quickly, never crash, hang or allocate.

Files are made byte by byte with :func:`build_gguf` (independent of our writer), then truncated, extended,
mutated or made to lie.  Each open is timed (< 1 s).
"""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gguf_kquant
from gguf_kquant.container.values import GGUFValueType as VT
from gguf_kquant.errors import (
    BadMagicError,
    DuplicateError,
    GGUFError,
    LimitExceededError,
    MalformedFileError,
    TruncatedFileError,
    UnsupportedVersionError,
)

_FMT = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
        VT.FLOAT32: "f", VT.BOOL: "B", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}


# ------------------------------------------------------------------------------------------------------
# An independent byte-level GGUF builder (also used by test_reader.py)
# ------------------------------------------------------------------------------------------------------
def enc_str(s, bo="<") -> bytes:
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack(bo + "Q", len(b)) + b


def enc_value(vt, value, bo="<", *, with_type=True) -> bytes:
    """``value`` for ARRAY is ``(element_type, items)``; items of an ARRAY of ARRAYs are such pairs too."""
    out = struct.pack(bo + "I", int(vt)) if with_type else b""
    if vt == VT.STRING:
        return out + enc_str(value, bo)
    if vt == VT.ARRAY:
        et, items = value
        out += struct.pack(bo + "IQ", int(et), len(items))
        return out + b"".join([enc_value(et, item, bo, with_type=False) for item in items])
    return out + struct.pack(bo + _FMT[vt], value)


def build_gguf(kvs=(), tensors=(), *, version=3, bo="<", alignment=32, n_tensors=None, n_kv=None,
               magic=b"GGUF", offsets=None, tail=True, body=True) -> bytes:
    """A GGUF file.  kvs: (key, type, value) with raw keys allowed (bytes); tensors: (name, ne, type_id,
    data bytes).  ``offsets`` overrides tensor data offsets; ``tail=False`` drops the padding after the last
    tensor so the file ends with tensor data; ``body=False`` writes no tensor data at all."""
    tensors = list(tensors)
    head = bytearray(magic + struct.pack(bo + "I", version))
    head += struct.pack(bo + "q", len(tensors) if n_tensors is None else n_tensors)
    head += struct.pack(bo + "q", len(kvs) if n_kv is None else n_kv)
    for key, vt, value in kvs:
        head += enc_str(key, bo) + enc_value(vt, value, bo)
    rel, planned = 0, []
    for name, ne, type_id, data in tensors:
        planned.append(rel)
        rel += -(-len(data) // alignment) * alignment
    if offsets is not None:
        planned = list(offsets)
    for (name, ne, type_id, data), off in zip(tensors, planned):
        head += enc_str(name, bo) + struct.pack(bo + "I", len(ne)) + struct.pack(f"{bo}{len(ne)}q", *ne)
        head += struct.pack(bo + "iQ", type_id, off)
    if tensors:
        head += b"\0" * (-len(head) % alignment)
    data_section = bytearray()
    for (name, ne, type_id, data), off in zip(tensors if body else (), planned):
        data_section += b"\0" * max(off - len(data_section), 0)
        data_section += data
        if tail:
            data_section += b"\0" * (-len(data_section) % alignment)
    return bytes(head + data_section)


def small_valid_file() -> bytes:
    """Every value kind and three tensors; ends exactly with tensor data (so every prefix is invalid)."""
    kvs = [
        ("general.architecture", VT.STRING, "llama"),
        ("a.u8", VT.UINT8, 7), ("a.i8", VT.INT8, -7), ("a.u16", VT.UINT16, 700), ("a.i16", VT.INT16, -700),
        ("a.u32", VT.UINT32, 70000), ("a.i32", VT.INT32, -70000), ("a.f32", VT.FLOAT32, 1.5),
        ("a.bool", VT.BOOL, 1), ("a.u64", VT.UINT64, 2**40), ("a.i64", VT.INT64, -(2**40)),
        ("a.f64", VT.FLOAT64, 0.25),
        ("a.arr_i32", VT.ARRAY, (VT.INT32, [1, -2, 3])),
        ("a.arr_str", VT.ARRAY, (VT.STRING, ["x", "yz", ""])),
        ("a.nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, [1, 2]), (VT.STRING, ["q"])])),
        ("a.many", VT.ARRAY, (VT.STRING, [f"tok{i}" for i in range(100)])),  # lazily decoded
    ]
    tensors = [
        ("t.f32", [4, 2], 0, np.arange(8, dtype="<f4").tobytes()),
        ("t.q8_0", [32], 8, bytes(range(34))),
        ("t.f16", [3], 1, np.ones(3, "<f2").tobytes()),
    ]
    return build_gguf(kvs, tensors, tail=False)


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def open_bytes(tmp_path, data: bytes, name="hostile.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# The reader's work on a hostile file, in CPU seconds of this thread: a runaway loop or walk shows there, while
# wall time also counts the host's stalls (1.4 s once on a shared 2-core VM, for a file read in 14 ms alone).
_work_clock = time.thread_time


def exercise(path):
    """Open and touch everything; return normally or raise GGUFError — nothing else — within 1 s of CPU."""
    t0 = _work_clock()
    try:
        with gguf_kquant.open(path) as f:
            for key in list(f.metadata):
                f.metadata[key]
                f.metadata.typed(key)
            for t in f.tensors:
                assert t.raw().size == t.nbytes
    except GGUFError as exc:
        assert str(path) in str(exc)
        return exc
    finally:
        assert _work_clock() - t0 < 1.0, "reader too slow on a hostile file"
    return None


def expect(tmp_path, data, cls, *fragments):
    path = open_bytes(tmp_path, data)
    t0 = _work_clock()
    with pytest.raises(cls) as info:
        gguf_kquant.open(path)
    assert _work_clock() - t0 < 1.0
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------------
# truncations and garbage
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hdir(tmp_path_factory):
    """A folder for hypothesis examples (function-scoped tmp_path is not reset between examples anyway)."""
    return tmp_path_factory.mktemp("hostile")


def test_small_valid_file_is_valid(tmp_path):
    path = open_bytes(tmp_path, small_valid_file())
    assert exercise(path) is None
    with gguf_kquant.open(path) as f:
        assert f.metadata["a.many"][99] == "tok99"
        assert f.tensors[-1].offset + f.tensors[-1].nbytes == path.stat().st_size


def test_every_truncation_raises(tmp_path):
    data = small_valid_file()
    for n in range(len(data)):
        exc = exercise(open_bytes(tmp_path, data[:n]))
        assert isinstance(exc, GGUFError), f"prefix of {n} bytes opened without error"
        assert isinstance(exc, (TruncatedFileError, LimitExceededError)), (n, exc)
        if n >= 4:
            assert "offset" in str(exc)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 10_000), garbage=st.binary(max_size=300))
def test_garbage_after_valid_prefix(hdir, cut, garbage):
    data = small_valid_file()
    cut = cut % (len(data) + 1)
    exercise(open_bytes(hdir, data[:cut] + garbage))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_random_byte_mutations(hdir, data):
    raw = bytearray(small_valid_file())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    exercise(open_bytes(hdir, bytes(raw)))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_u64_lies(hdir, data):
    """Overwrite an aligned-anywhere 8-byte field with a huge or edge value: counts, lengths, ne, offsets."""
    raw = bytearray(small_valid_file())
    pos = data.draw(st.integers(0, len(raw) - 8))
    value = data.draw(st.sampled_from([2**62, 2**63, 2**63 - 1, 2**64 - 1, 2**32, 2**30 + 1, 2**31, 255]))
    raw[pos:pos + 8] = struct.pack("<Q", value)
    exercise(open_bytes(hdir, bytes(raw)))


# ------------------------------------------------------------------------------------------------------
# each rule
# ------------------------------------------------------------------------------------------------------
def test_empty_and_bad_magic(tmp_path):
    expect(tmp_path, b"", TruncatedFileError, "empty")
    expect(tmp_path, b"GG", TruncatedFileError, "magic")
    expect(tmp_path, b"PK\x03\x04" + b"\0" * 40, BadMagicError, "offset 0", "magic")
    expect(tmp_path, b"GGUF\x03\0", TruncatedFileError, "offset 4", "version")


@pytest.mark.parametrize("version", [0, 1, 4, 0x7FFF0000, 0x01000000])
def test_bad_versions(tmp_path, version):
    expect(tmp_path, build_gguf(version=version), UnsupportedVersionError, "offset 4", "version")


def test_lying_counts(tmp_path):
    expect(tmp_path, build_gguf(n_tensors=2**63 - 1), LimitExceededError, "offset 8", "tensor count")
    expect(tmp_path, build_gguf(n_tensors=-1), LimitExceededError, "tensor count -1")
    two_63 = b"GGUF" + struct.pack("<IQq", 3, 2**63, 0) + b"\0" * 64  # 2**63 tensors: negative as int64
    expect(tmp_path, two_63, LimitExceededError, "offset 8", f"tensor count {-(2**63)}")
    expect(tmp_path, build_gguf(n_kv=2**62), LimitExceededError, "offset 16")
    expect(tmp_path, build_gguf([("a", VT.UINT8, 1)], n_kv=5), LimitExceededError, "impossible")
    expect(tmp_path, build_gguf([("a", VT.UINT8, 1)], n_kv=2) + struct.pack("<Q", 100) + b"abcdef",
           TruncatedFileError, "key of metadata entry 1", "offset 46")


def _array_header(et, count):
    return b"GGUF" + struct.pack("<Iqq", 3, 0, 1) + enc_str("k") + struct.pack("<IIQ", 9, et, count)


@pytest.mark.parametrize("et", [VT.UINT8, VT.FLOAT64, VT.STRING, VT.ARRAY, VT.BOOL])
def test_array_count_2_62_fails_fast(tmp_path, et):
    expect(tmp_path, _array_header(et, 2**62) + b"\0" * 64, LimitExceededError, "'k'", str(2**62))
    expect(tmp_path, _array_header(et, 2**30 + 1), LimitExceededError, "limit")
    expect(tmp_path, _array_header(et, 2**29) + b"\0" * 64, TruncatedFileError, "'k'")


def test_huge_string_lengths(tmp_path):
    head = b"GGUF" + struct.pack("<Iqq", 3, 0, 1)
    expect(tmp_path, head + struct.pack("<Q", 2**64 - 1) + b"abc" * 9, LimitExceededError, "offset 24")
    expect(tmp_path, head + struct.pack("<Q", 2**30) + b"abc" * 9, TruncatedFileError, "offset 32")
    s = enc_str("k") + struct.pack("<I", 8) + struct.pack("<Q", 2**63)
    expect(tmp_path, head + s, LimitExceededError, "value of metadata key 'k'")
    # a string array whose third element lies about its length
    arr = enc_str("k") + struct.pack("<IIQ", 9, 8, 100) + enc_str("a") + enc_str("b") + struct.pack("<Q", 2**62)
    expect(tmp_path, head + arr + b"\0" * 900, LimitExceededError, "element 2 of metadata key 'k'")
    arr = enc_str("k") + struct.pack("<IIQ", 9, 8, 100) + enc_str("a") * 99 + struct.pack("<Q", 2**20) + b"x"
    expect(tmp_path, head + arr, TruncatedFileError, "element 99 of metadata key 'k'")


def test_keys_and_value_types(tmp_path):
    expect(tmp_path, build_gguf([("a", VT.UINT8, 1), ("a", VT.UINT8, 2)]), DuplicateError, "'a'", "offset 38")
    expect(tmp_path, build_gguf([("", VT.UINT8, 1)]), MalformedFileError, "empty key")
    expect(tmp_path, build_gguf([(b"\xff\xfe", VT.UINT8, 1)]), MalformedFileError, "UTF-8", "offset 32")
    head = b"GGUF" + struct.pack("<Iqq", 3, 0, 1) + enc_str("k")
    expect(tmp_path, head + struct.pack("<IQ", 13, 0), MalformedFileError, "invalid value type 13", "offset 33")
    expect(tmp_path, head + struct.pack("<IIQ", 9, 99, 0), MalformedFileError, "invalid value type 99")
    expect(tmp_path, head + struct.pack("<IB", 7, 2), MalformedFileError, "BOOL byte is 2")
    expect(tmp_path, head + struct.pack("<IIQ3B", 9, 7, 3, 1, 0, 5), MalformedFileError, "element 2", "offset 51")
    expect(tmp_path, build_gguf([("s", VT.STRING, b"ok\xc3")]), MalformedFileError, "UTF-8", "'s'")


def test_invalid_utf8_in_lazy_array_is_reported_on_access(tmp_path):
    items = ["a"] * 80 + [b"\xe2\x82"] + ["b"] * 10
    path = open_bytes(tmp_path, build_gguf([("toks", VT.ARRAY, (VT.STRING, items))]))
    with gguf_kquant.open(path) as f:
        with pytest.raises(MalformedFileError, match=r"element 80 of metadata key 'toks' is not valid UTF-8"):
            f.metadata["toks"]


def test_array_nesting_limit(tmp_path):
    value = (VT.UINT8, [1])
    for _ in range(20):
        value = (VT.ARRAY, [value])
    expect(tmp_path, build_gguf([("deep", VT.ARRAY, value)]), LimitExceededError, "nests arrays")
    # a crafted chain of 100k nested one-element arrays fails at the limit, not with RecursionError
    body = struct.pack("<IQ", 9, 1) * 100_000
    data = b"GGUF" + struct.pack("<Iqq", 3, 0, 1) + enc_str("k") + struct.pack("<I", 9) + body
    expect(tmp_path, data, LimitExceededError, "nests arrays")


@pytest.mark.parametrize("alignment,vt,frag", [
    (0, VT.UINT32, "power of two"), (3, VT.UINT32, "power of two"), (48, VT.UINT32, "power of two"),
    (32, VT.UINT64, "type UINT32"), (32, VT.INT32, "type UINT32"),
])
def test_bad_alignment(tmp_path, alignment, vt, frag):
    data = build_gguf([("general.alignment", vt, alignment)], [("t", [8], 0, b"\0" * 32)])
    expect(tmp_path, data, MalformedFileError, "general.alignment", frag, "offset 24")


def test_custom_alignment_is_used(tmp_path):
    data = build_gguf([("general.alignment", VT.UINT32, 64)],
                      [("a", [3], 0, b"\1" * 12), ("b", [2], 0, b"\2" * 8)], alignment=64)
    with gguf_kquant.open(open_bytes(tmp_path, data)) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert f.tensors["b"].offset - f.tensors["a"].offset == 64
        assert bytes(f.tensors["b"].raw()) == b"\2" * 8


def _t(name="t", ne=(8,), type_id=0, nbytes=None):
    return (name, list(ne), type_id, b"\0" * (32 if nbytes is None else nbytes))


def test_tensor_rules(tmp_path):
    expect(tmp_path, build_gguf([], [_t("x" * 64)]), LimitExceededError, "64 bytes", "offset 24")
    assert exercise(open_bytes(tmp_path, build_gguf([], [_t("x" * 63)]))) is None
    expect(tmp_path, build_gguf([], [_t("a"), _t("a")]), DuplicateError, "'a'")
    expect(tmp_path, build_gguf([], [_t(ne=(1, 1, 1, 1, 8))]), LimitExceededError, "5 dimensions")
    expect(tmp_path, build_gguf([], [_t(ne=(8, -1))]), MalformedFileError, "dimension 1 is -1")
    expect(tmp_path, build_gguf([], [_t(ne=(2**62, 4))]), LimitExceededError, "2**63-1 elements")
    expect(tmp_path, build_gguf([], [_t(ne=(2**62, 4, 0))]), LimitExceededError, "2**63-1")  # as ggml
    expect(tmp_path, build_gguf([], [_t(ne=(2**61,))]), TruncatedFileError, "past the end")
    expect(tmp_path, build_gguf([], [_t(ne=(2**59, 1, 1, 8), type_id=30)]), TruncatedFileError)
    expect(tmp_path, build_gguf([], [_t(ne=(2**62,), type_id=28)]), LimitExceededError, "2**64-1")
    expect(tmp_path, build_gguf([], [_t(ne=(33,), type_id=8)]), MalformedFileError, "block size 32")
    expect(tmp_path, build_gguf([], [(b"\xc0", [8], 0, b"\0" * 32)]), MalformedFileError, "UTF-8")
    for bad in (-1, 4, 5, 31, 33, 36, 38, 1024, 2**31 - 1):
        expect(tmp_path, build_gguf([], [_t(type_id=bad)]), MalformedFileError, f"invalid ggml type id {bad}")


def test_offsets_must_be_the_running_padded_sum(tmp_path):
    two = [_t("a", nbytes=32), _t("b", nbytes=32)]
    expect(tmp_path, build_gguf([], two, offsets=[0, 0]), MalformedFileError, "'b'", "expected 32")  # overlap
    expect(tmp_path, build_gguf([], two, offsets=[0, 64]), MalformedFileError, "expected 32")  # gap
    expect(tmp_path, build_gguf([], two, offsets=[32, 0]), MalformedFileError, "'a'", "expected 0")  # order
    expect(tmp_path, build_gguf([], [_t("a", ne=(3,), nbytes=12), _t("b")], offsets=[0, 12]),
           MalformedFileError, "expected 32")  # misaligned
    data = build_gguf([], [_t("a", ne=(16,), nbytes=64)])
    expect(tmp_path, data[:-1], TruncatedFileError, "past the end")


def test_unknown_type_offsets_checked(tmp_path):
    tensors = [_t("new", type_id=50, nbytes=40), _t("b")]
    expect(tmp_path, build_gguf([], tensors, offsets=[64, 32]), MalformedFileError, "'b'", "before the previous")
    expect(tmp_path, build_gguf([], tensors, offsets=[16, 64]), MalformedFileError, "unknown type 50")
    expect(tmp_path, build_gguf([], tensors, offsets=[0, 16]), MalformedFileError, "expected")
    data = build_gguf([], [_t("new", type_id=50)], offsets=[1 << 40], body=False)
    expect(tmp_path, data, TruncatedFileError, "after the end of the file")


def test_no_struct_or_index_errors_on_every_field_boundary(tmp_path):
    """Cut a big-endian file at every byte too (different code path for the byte order)."""
    data = build_gguf(
        [("k", VT.ARRAY, (VT.STRING, ["abc"] * 70)), ("n", VT.ARRAY, (VT.ARRAY, [(VT.INT16, [1, 2])]))],
        [_t("a")], bo=">", tail=False)
    with gguf_kquant.open(open_bytes(tmp_path, data)) as f:
        assert f.byte_order == ">" and f.metadata["k"][69] == "abc"
    for n in range(len(data)):
        assert isinstance(exercise(open_bytes(tmp_path, data[:n])), GGUFError), n


# ------------------------------------------------------------------------------------------------------
# resource bombs: tiny in the file, huge as Python objects (issue 9, item 7)
# ------------------------------------------------------------------------------------------------------
def _bomb(kind: str, n: int) -> bytes:
    head = b"GGUF" + struct.pack("<I", 3)
    if kind == "nested":  # one key: an ARRAY of n empty UINT8 arrays (12 bytes each)
        return (head + struct.pack("<qq", 0, 1) + enc_str("a") + struct.pack("<IIQ", VT.ARRAY, VT.ARRAY, n)
                + struct.pack("<IQ", VT.UINT8, 0) * n)
    if kind == "kv":  # n one-byte keys
        return head + struct.pack("<qq", 0, n) + b"".join(enc_str(f"{i:x}") + struct.pack("<IB", VT.UINT8, 1)
                                                         for i in range(n))
    if kind == "tensors":  # n empty F32 tensors
        out = (head + struct.pack("<qq", n, 0)
               + b"".join(enc_str(f"{i:x}") + struct.pack("<IqiQ", 1, 0, 0, 0) for i in range(n)))
        return out + b"\0" * (-len(out) % 32)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,n", [("nested", 2_000_000), ("kv", 2_000_000), ("tensors", 1_000_000)])
def test_resource_bombs_are_refused_before_they_are_built(tmp_path, kind, n):
    import tracemalloc

    path = open_bytes(tmp_path, _bomb(kind, n))
    tracemalloc.start()
    try:
        t0 = _work_clock()
        with pytest.raises(LimitExceededError, match="resource bomb"):
            gguf_kquant.open(path)
        elapsed = _work_clock() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 8 << 20, (elapsed, peak)


@pytest.mark.parametrize("kind,n", [("nested", 40_000), ("kv", 40_000), ("tensors", 30_000)])
def test_header_memory_stays_within_the_budget(tmp_path, kind, n):
    """Just under the budget the file opens, and what it holds stays below the budget the reader charged."""
    import tracemalloc

    from gguf_kquant.container.reader import HEADER_MEMORY_FACTOR, HEADER_MEMORY_MIN

    data = _bomb(kind, n)
    path = open_bytes(tmp_path, data)
    tracemalloc.start()
    try:
        f = gguf_kquant.open(path)
        peak = tracemalloc.get_traced_memory()[1]
        f.close()
    finally:
        tracemalloc.stop()
    assert peak < max(HEADER_MEMORY_MIN, HEADER_MEMORY_FACTOR * len(data)), peak
