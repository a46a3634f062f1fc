"""The GGUF writer: pinned bytes, metadata round-trips, refusals, atomicity, streaming, split output."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gguf_kquant
from gguf_kquant import GGUFValueType as V
from gguf_kquant import Value, safeio
from gguf_kquant.container.writer import GGUFWriter, TensorSpec, parse_size
from gguf_kquant.errors import WriteError


def read_bytes(p) -> bytes:
    return Path(p).read_bytes()


def leftovers(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------------
# The exact bytes of a tiny file, worked out by hand from the GGUF spec (not produced by our writer)
# ------------------------------------------------------------------------------------------------------
PINNED = bytes.fromhex(
    "47475546"  # magic "GGUF"
    "03000000"  # version 3
    "0100000000000000"  # 1 tensor
    "0100000000000000"  # 1 key-value pair
    "0100000000000000" "6b"  # key: length 1, "k"
    "04000000" "07000000"  # UINT32, 7
    "0100000000000000" "74"  # tensor name: length 1, "t"
    "01000000" "0200000000000000"  # 1 dim, ne0 = 2
    "00000000" "0000000000000000"  # type F32, offset 0
    + "00" * 22  # 74 bytes of header padded to 96 (alignment 32)
    + "0000803f" "00000040"  # 1.0f, 2.0f
    + "00" * 24  # data padded to 32
)


def test_pinned_bytes(tmp_path):
    assert len(PINNED) == 128
    p = tmp_path / "pinned.gguf"
    gguf_kquant.write(p, {"k": 7}, {"t": np.array([1.0, 2.0], np.float32)})
    assert read_bytes(p) == PINNED


def test_plan_matches_file(tmp_path):
    w = GGUFWriter(tmp_path / "p.gguf", {"k": 7})
    w.add_tensor("t", np.array([1.0, 2.0], np.float32))
    w.add_tensor("u", b"\1" * 18, shape=(32,), ggml_type="Q4_0")
    (plan,) = w.plan()
    assert (plan.data_offset, plan.offsets, plan.file_size) == (128, [0, 32], 128 + 64)
    assert w.close() == [tmp_path / "p.gguf"]
    assert (tmp_path / "p.gguf").stat().st_size == plan.file_size


# ------------------------------------------------------------------------------------------------------
# Metadata round-trips (hypothesis), against gguf-py's reader and ours
# ------------------------------------------------------------------------------------------------------
_INT_RANGES = {
    V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1), V.UINT16: (0, 2**16 - 1), V.INT16: (-(2**15), 2**15 - 1),
    V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1), V.UINT64: (0, 2**64 - 1),
    V.INT64: (-(2**63), 2**63 - 1),
}
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


def _element(t):
    if t in _INT_RANGES:
        return st.integers(*_INT_RANGES[t])
    if t == V.FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if t == V.FLOAT64:
        return st.floats(allow_nan=False)
    if t == V.BOOL:
        return st.booleans()
    return _text


_scalar_types = [t for t in V if t != V.ARRAY]


@st.composite
def typed_values(draw, depth=0):
    kind = draw(st.sampled_from(["scalar", "array"] + (["nested"] if depth == 0 else [])))
    if kind == "scalar":
        t = draw(st.sampled_from(_scalar_types))
        return Value(draw(_element(t)), t)
    if kind == "array":
        t = draw(st.sampled_from(_scalar_types))
        return Value(draw(st.lists(_element(t), max_size=5)), V.ARRAY, t)
    return Value(draw(st.lists(typed_values(depth=1).filter(lambda v: v.type == V.ARRAY), max_size=3)),
                 V.ARRAY, V.ARRAY)


def _norm(typed: Value):
    """(type, element type, comparable value) of a Value, recursively."""
    if typed.type == V.ARRAY:
        if typed.element_type == V.ARRAY:
            return (V.ARRAY, V.ARRAY, [_norm(v) for v in typed.value])
        items = typed.value.tolist() if isinstance(typed.value, np.ndarray) else list(typed.value)
        return (V.ARRAY, typed.element_type, [bool(v) if typed.element_type == V.BOOL else v for v in items])
    return (typed.type, None, typed.value)


@settings(max_examples=60, deadline=None)
@example(md={"a": Value([0, 2**63], V.ARRAY, V.UINT64)}, byte_order="<")  # numpy made this list float64
@given(st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10),
                       typed_values(), max_size=6),
       st.sampled_from(["<", ">"]))
def test_metadata_roundtrip(tmp_path_factory, md, byte_order):
    md.pop("general.alignment", None)
    p = tmp_path_factory.mktemp("md") / "m.gguf"
    gguf_kquant.write(p, md, {"t": np.arange(4, dtype=np.float32)}, byte_order=byte_order, fsync=False)
    with gguf_kquant.open(p) as f:
        assert list(f.metadata) == list(md)
        for k, v in md.items():
            assert _norm(f.metadata.typed(k)) == _norm(v), k
        assert f.byte_order == byte_order
        assert f.tensors["t"].numpy().tolist() == [0, 1, 2, 3]
    r = gguf.GGUFReader(p)
    for k, v in md.items():
        field = r.fields[k]
        assert field.types[0] == v.type
        if v.type != V.ARRAY:
            assert field.contents() == v.value
        elif v.element_type != V.ARRAY:
            assert field.contents() == _norm(v)[2]
            if v.value:
                assert field.types[1] == v.element_type
    assert r.tensors[0].data.tolist() == [0, 1, 2, 3]


def test_default_typing(tmp_path):
    p = tmp_path / "d.gguf"
    md = {"u": 3, "i": -3, "big": 2**40, "f": 0.5, "b": True, "s": "x", "l": [1, 2], "fl": [0.5],
          "ls": ["a"], "nested": [[1], [2, 3]], "np8": np.uint8(4), "arr": np.array([1, 2], np.int16)}
    gguf_kquant.write(p, md)
    with gguf_kquant.open(p) as f:
        types = {k: (f.metadata.typed(k).type, f.metadata.typed(k).element_type) for k in md}
    assert types == {"u": (V.UINT32, None), "i": (V.INT32, None), "big": (V.INT64, None), "f": (V.FLOAT32, None),
                     "b": (V.BOOL, None), "s": (V.STRING, None), "l": (V.ARRAY, V.INT32),
                     "fl": (V.ARRAY, V.FLOAT32), "ls": (V.ARRAY, V.STRING), "nested": (V.ARRAY, V.ARRAY),
                     "np8": (V.UINT8, None), "arr": (V.ARRAY, V.INT16)}


def _ggml_accepts(oracle, path) -> bool:
    lib = oracle.ggml()

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    if ctx:
        lib.gguf_free(ctx)
    return bool(ctx)


def test_empty_arrays_like_ggml(tmp_path, oracle):
    # ggml reads and writes zero-length arrays; so do we (an explicit element type is needed)
    p = tmp_path / "e.gguf"
    md = {"e.i32": Value([], V.ARRAY, V.INT32), "e.str": Value([], V.ARRAY, V.STRING),
          "e.bool": Value([], V.ARRAY, V.BOOL)}
    gguf_kquant.write(p, md, {"t": np.zeros(32, np.float32)})
    assert _ggml_accepts(oracle, p)
    with gguf_kquant.open(p) as f:
        assert [(f.metadata.typed(k).element_type, len(f.metadata[k])) for k in md] == [
            (V.INT32, 0), (V.STRING, 0), (V.BOOL, 0)]
    assert gguf.GGUFReader(p).fields["e.str"].contents() == []
    with pytest.raises(WriteError, match="empty"):
        gguf_kquant.write(tmp_path / "x.gguf", {"e": []})


# ------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------
def _bad_value_type():
    v = Value(1, V.UINT32)
    object.__setattr__(v, "type", 13)
    return v


@pytest.mark.parametrize("metadata, tensors, match", [
    ({}, [("n" * 64, np.zeros(32, np.float32))], "n{64}.*64 bytes"),
    ({}, [("x", np.zeros((1, 1, 1, 1, 32), np.float32))], "'x'.*5 dimensions"),
    ({}, [("x", np.zeros(32, np.float32)), ("x", np.zeros(32, np.float32))], "duplicate tensor name 'x'"),
    ([("k", 1), ("k", 2)], {}, "duplicate metadata key 'k'"),
    ({}, [("q", 48, "Q4_0", b"\0" * 27)], "'q'.*row length 48.*block size 32"),
    ({}, [("q", (2, 3), "Q4_0", b"\0" * 27)], "'q'.*row length 3"),
    ({"general.alignment": Value(48, V.UINT32)}, {}, "general.alignment.*48.*power of two"),
    ({"general.alignment": Value(0, V.UINT32)}, {}, "power of two"),
    ({"general.alignment": 64.0}, {}, "general.alignment.*UINT32"),
    ({"general.alignment": Value(64, V.INT32)}, {}, "general.alignment.*UINT32"),
    ({"k": Value(300, V.UINT8)}, {}, "'k'.*300.*UINT8"),
    ({"k": Value(-1, V.UINT64)}, {}, "'k'.*UINT64"),
    ({"k": Value(1e39, V.FLOAT32)}, {}, "'k'.*FLOAT32"),
    ({"k": Value([1, 2**40], V.ARRAY, V.INT32)}, {}, "'k'.*INT32"),
    ({"k": Value([0.5], V.ARRAY, V.INT32)}, {}, "'k'.*integers expected"),
    ({"k": Value(2, V.BOOL)}, {}, "'k'.*BOOL"),
    ({"k": Value("\ud800", V.STRING)}, {}, "'k'.*UTF-8"),
    ({"k": _bad_value_type()}, {}, "'k'.*unknown GGUF value type 13"),
    ({"k": {1: 2}}, {}, "'k'.*dict"),
    ({"": 1}, {}, "non-empty"),
    ({}, [("x", (32,), 4, b"\0" * 128)], "'x'.*unknown ggml type id 4"),
    ({}, [("x", (32,), 99, b"\0" * 128)], "'x'.*unknown ggml type id 99"),
    ({}, [("x", np.zeros(32, np.uint8))], "'x'.*uint8 array needs an explicit ggml_type"),
    ({}, [("x", (32,), "Q8_0", np.zeros(32, np.float32))], "'x'.*float32 array cannot be written as Q8_0"),
    ({}, [("x", (32,), "F32", b"\0" * 100)], "'x'.*holds 100 bytes.*takes 128"),
    ({}, [("x", (-1, 32), "F32", b"")], "'x'.*dimension"),
])
def test_refusals(tmp_path, metadata, tensors, match):
    p = tmp_path / "r.gguf"
    with pytest.raises(WriteError, match=match):
        gguf_kquant.write(p, metadata, tensors)
    assert not p.exists() and leftovers(tmp_path) == []


def test_refused_options(tmp_path):
    for opts, match in [({"alignment": 48}, "48 is not a power of two"), ({"version": 1}, "version 1"),
                        ({"byte_order": "x"}, "byte_order"), ({"split_max_size": "10K"}, "M or G"),
                        ({"split_max_size": 0}, "positive"), ({"split_max_tensors": 0}, "positive"),
                        ({"version": 2, "byte_order": ">"}, "version 3")]:
        with pytest.raises(WriteError, match=match):
            gguf_kquant.write(tmp_path / "o.gguf", {}, {}, **opts)
    with pytest.raises(WriteError, match="alignment=64 disagrees"):
        gguf_kquant.write(tmp_path / "o.gguf", {"general.alignment": Value(32, V.UINT32)}, {}, alignment=64)


def test_name_of_63_bytes_and_4_dims_are_fine(tmp_path):
    p = tmp_path / "ok.gguf"
    gguf_kquant.write(p, {}, [("n" * 63, np.zeros((1, 2, 1, 32), np.float16))])
    with gguf_kquant.open(p) as f:
        t = f.tensors["n" * 63]
        assert (t.shape, t.ggml_type.name) == ((1, 2, 1, 32), "F16")


def test_alignment_option_adds_the_key(tmp_path):
    p = tmp_path / "a.gguf"
    gguf_kquant.write(p, {"a": 1}, {"t": np.ones(3, np.float32), "u": np.ones(5, np.float32)}, alignment=128)
    with gguf_kquant.open(p) as f:
        assert f.alignment == 128 and f.metadata.typed("general.alignment").type == V.UINT32
        assert [t.offset % 128 for t in f.tensors] == [0, 0]
        assert f.tensors["u"].offset - f.tensors["t"].offset == 128
    assert p.stat().st_size % 128 == 0


# ------------------------------------------------------------------------------------------------------
# Tensor data sources and byte order
# ------------------------------------------------------------------------------------------------------
def test_data_sources(tmp_path):
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    q = np.arange(2 * 34, dtype=np.uint8).reshape(2, 34)  # two Q8_0 blocks of raw bytes
    p = tmp_path / "s.gguf"
    with GGUFWriter(p) as w:
        w.add_tensor("array", x)
        w.add_tensor("noncontig", x.T.copy().T)
        w.add_tensor("bytes", x.tobytes(), shape=x.shape, ggml_type="F32")
        w.add_tensor("callable", lambda: x, shape=x.shape, ggml_type="F32")
        w.add_tensor("generator", (x[i].tobytes() for i in range(2)), shape=x.shape, ggml_type="F32")
        w.add_tensor("genfunc", lambda: (bytes(r) for r in q), shape=(2, 32), ggml_type="Q8_0")
        w.add_tensor("raw_inferred", q, ggml_type="Q8_0")
        w.add_tensor("f16", x.astype(np.float16))
        w.add_tensor("i32", np.arange(8, dtype=np.int32))
        w.add_tensor("be", x.astype(">f4"))
        w.add_tensor("bf16", (x.view(np.uint32) >> 16).astype(np.uint16), ggml_type="BF16")
    with gguf_kquant.open(p) as f:
        for name in ("array", "noncontig", "bytes", "callable", "generator", "be"):
            np.testing.assert_array_equal(f.tensors[name].numpy(), x, err_msg=name)
        assert f.tensors["genfunc"].raw().tobytes() == q.tobytes()
        assert f.tensors["raw_inferred"].shape == (2, 32)
        assert f.tensors["raw_inferred"].raw().tobytes() == q.tobytes()
        np.testing.assert_array_equal(f.tensors["f16"].numpy(), x)
        np.testing.assert_array_equal(f.tensors["i32"].numpy(), np.arange(8))
        np.testing.assert_array_equal(f.tensors["bf16"].numpy(), x)


def test_tensor_spec_iterable_forms(tmp_path):
    x = np.ones((2, 32), np.float32)
    specs = [TensorSpec.make("a", x), ("b", x), ("c", (2, 32), "F32", x.tobytes())]
    p = tmp_path / "t.gguf"
    gguf_kquant.write(p, {}, specs)
    with gguf_kquant.open(p) as f:
        assert f.tensors.names() == ["a", "b", "c"]


def test_big_endian(tmp_path):
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    md = {"u16": Value(513, V.UINT16), "s": "hi", "arr": np.array([1, -2, 3], np.int64), "f": 0.25}
    p = tmp_path / "be.gguf"
    gguf_kquant.write(p, md, {"x": x, "h": x.astype(np.float16)}, byte_order=">")
    assert read_bytes(p)[4:8] == b"\0\0\0\3"
    r = gguf.GGUFReader(p)
    assert r.endianess == gguf.GGUFEndian.BIG
    assert r.fields["u16"].contents() == 513 and r.fields["arr"].contents() == [1, -2, 3]
    np.testing.assert_array_equal(np.asarray(r.tensors[0].data).astype(np.float32), x)
    with gguf_kquant.open(p) as f:
        assert f.byte_order == ">"
        np.testing.assert_array_equal(f.tensors["x"].numpy(), x)
        np.testing.assert_array_equal(f.tensors["h"].numpy(), x.astype(np.float16).astype(np.float32))
        # copying keeps the source's byte order (byte-identical) unless told otherwise
        gguf_kquant.write(tmp_path / "be2.gguf", f.metadata, f.tensors)
        gguf_kquant.write(tmp_path / "le.gguf", f.metadata, f.tensors, byte_order="<")
    assert read_bytes(tmp_path / "be2.gguf") == read_bytes(p)
    with gguf_kquant.open(tmp_path / "le.gguf") as f:
        assert f.byte_order == "<"
        np.testing.assert_array_equal(f.tensors["x"].numpy(), x)
        assert f.metadata["u16"] == 513


# ------------------------------------------------------------------------------------------------------
# Atomicity
# ------------------------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def _raising(n_ok, exc):
    def gen():
        for _ in range(n_ok):
            yield b"\0" * 1024
        raise exc
    return gen


@pytest.mark.parametrize("producer, exc_type, match", [
    (_raising(3, Boom("mid-stream")), Boom, "mid-stream"),
    (_raising(2, KeyboardInterrupt()), KeyboardInterrupt, None),
    (lambda: (b"\0" * 1024 for _ in range(3)), WriteError, r"'big'.*yielded 3072 bytes.*takes 4096"),
    (lambda: (b"\0" * 1024 for _ in range(5)), WriteError, r"'big'.*more than the 4096 bytes"),
    (lambda: iter([b"\0" * 4096, "text"]), WriteError, "'big'.*yielded a str"),
])
def test_failure_leaves_target_untouched(tmp_path, producer, exc_type, match):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(exc_type, match=match):
        with GGUFWriter(target, {"k": 1}) as w:
            w.add_tensor("small", np.zeros(32, np.float32))
            w.add_tensor("big", producer, shape=(1024,), ggml_type="F32")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_exception_in_with_block_writes_nothing(tmp_path):
    target = tmp_path / "m.gguf"
    with pytest.raises(Boom):
        with GGUFWriter(target) as w:
            w.add_tensor("t", np.zeros(32, np.float32))
            raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_split_failure_replaces_no_shard(tmp_path):
    def fail_late():
        yield b"\0" * 64
        raise Boom()

    with pytest.raises(Boom):
        gguf_kquant.write(tmp_path / "m.gguf", {}, [("a", np.zeros(32, np.float16)), ("b", (32,), "F16", fail_late)],
                          split_max_tensors=1)
    assert list(tmp_path.iterdir()) == []


def test_replaces_existing_file_with_normal_permissions(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    gguf_kquant.write(target, {"k": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert target.read_bytes()[:4] == b"GGUF"


# ------------------------------------------------------------------------------------------------------
# Streaming: peak memory is one chunk, not one tensor
# ------------------------------------------------------------------------------------------------------
def test_streaming_peak_memory(tmp_path):
    mb, n_chunks = 1 << 20, 256

    def chunks():
        for i in range(n_chunks):
            yield np.full(mb, i % 251, np.uint8)

    p = tmp_path / "big.gguf"
    tracemalloc.start()
    try:
        gguf_kquant.write(p, {"k": 1}, [("big", (n_chunks * mb // 4,), "F32", chunks)], fsync=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * mb, f"peak {peak / mb:.1f} MiB while writing a {n_chunks} MiB tensor"
    with gguf_kquant.open(p) as f:
        raw = f.tensors["big"].raw()
        assert raw.size == n_chunks * mb
        assert [int(raw[i * mb + 7]) for i in (0, 1, 250, 251, 255)] == [0, 1, 250, 0, 4]


def test_a_tensor_made_by_a_producer_is_released_before_the_next_is_made(tmp_path):
    """Whole-model writes hold one tensor at a time: the writer drops its last view of a tensor's data before
    calling the next producer (the peak was two tensors when it kept it)."""
    mb, n = 1 << 20, 8
    made = []

    def producer(i):
        def make():
            made.append(tracemalloc.get_traced_memory()[0])  # what is still held when the next is made
            return np.full(8 * mb // 4, i, np.float32)  # 8 MiB
        return make

    tracemalloc.start()
    try:
        gguf_kquant.write(tmp_path / "t.gguf", {"k": 1},
                          [(f"t{i}", (8 * mb // 4,), "F32", producer(i)) for i in range(n)], fsync=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(made) < 4 * mb and peak < 12 * mb, (made, peak)


def test_parse_size_names_the_argument():
    from gguf_kquant.errors import QuantizeError

    with pytest.raises(WriteError, match="split_max_size 'big'"):
        parse_size("big")
    with pytest.raises(QuantizeError, match="target_size '0'"):
        parse_size("0", "target_size", QuantizeError)


# ------------------------------------------------------------------------------------------------------
# Split output in gguf-split's format
# ------------------------------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("500M") == 500_000_000 and parse_size("2G") == 2_000_000_000 and parse_size(7) == 7


def _model(n=5):
    md = {"general.architecture": "llama", "general.name": "s", "a.list": [1, 2, 3]}
    tensors = [(f"t{i}", np.full((i + 1, 32), i, np.float32)) for i in range(n)]
    return md, tensors


def test_split_by_tensor_count(tmp_path):
    md, tensors = _model(5)
    paths = gguf_kquant.write(tmp_path / "m.gguf", md, tensors, split_max_tensors=2)
    assert [p.name for p in paths] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with gguf_kquant.open(paths[0], split=False) as f:
        assert list(f.metadata) == list(md) + ["split.no", "split.tensors.count", "split.count"]
        assert [f.metadata.typed(k).type for k in list(f.metadata)[-3:]] == [V.UINT16, V.INT32, V.UINT16]
        assert [f.metadata[k] for k in list(f.metadata)[-3:]] == [0, 5, 3]
    with gguf_kquant.open(paths[2], split=False) as f:
        assert dict(f.metadata) == {"split.no": 2, "split.tensors.count": 5, "split.count": 3}
        assert f.tensors.names() == ["t4"]
    with gguf_kquant.open(paths[0]) as f:
        assert f.tensors.names() == [f"t{i}" for i in range(5)]
        for i, t in enumerate(f.tensors):
            # like gguf-split (ggml_n_dims), a leading dim of 1 is dropped
            assert (t.numpy() == i).all() and t.shape == ((i + 1, 32) if i else (32,))


def test_split_by_size(tmp_path):
    md, tensors = _model(5)  # padded sizes 128, 256, 384, 512, 640
    paths = gguf_kquant.write(tmp_path / "m", md, tensors, split_max_size=800)
    with gguf_kquant.open(paths[0]) as f:
        groups = [[t.name for t in f.tensors if t.path == p] for p in paths]
    assert groups == [["t0", "t1", "t2"], ["t3"], ["t4"]]
    # a tensor above the limit gets a shard of its own (gguf-split would refuse)
    paths = gguf_kquant.write(tmp_path / "n.gguf", md, tensors, split_max_size=200)
    assert len(paths) == 5


def test_single_file_from_split_metadata_is_merged(tmp_path):
    md, tensors = _model(3)
    paths = gguf_kquant.write(tmp_path / "m.gguf", md, tensors, split_max_tensors=1)
    with gguf_kquant.open(paths[0]) as f:
        gguf_kquant.write(tmp_path / "merged.gguf", f.metadata, f.tensors)
    with gguf_kquant.open(tmp_path / "merged.gguf") as f:
        assert list(f.metadata)[-1] == "split.count" and f.metadata["split.count"] == 0
        assert f.tensors.names() == ["t0", "t1", "t2"]


def _gguf_split_like(oracle, src: Path, prefix: str, max_tensors: int) -> list:
    """What gguf-split --split-max-tensors does, through ggml's own gguf API (split_strategy in gguf-split.cpp)."""
    lib = oracle.ggml()

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, res, args in [
        ("gguf_init_from_file", vp, [cp, Params]), ("gguf_init_empty", vp, []), ("gguf_free", None, [vp]),
        ("gguf_set_kv", None, [vp, vp]), ("gguf_set_val_u16", None, [vp, cp, ctypes.c_uint16]),
        ("gguf_set_val_i32", None, [vp, cp, ctypes.c_int32]), ("gguf_get_n_tensors", ctypes.c_int64, [vp]),
        ("gguf_get_tensor_name", cp, [vp, ctypes.c_int64]), ("ggml_get_tensor", vp, [vp, cp]),
        ("gguf_add_tensor", None, [vp, vp]), ("gguf_write_to_file", ctypes.c_bool, [vp, cp, ctypes.c_bool]),
        ("ggml_free", None, [vp]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    data_ctx = ctypes.c_void_p()
    ctx_in = lib.gguf_init_from_file(str(src).encode(), Params(False, ctypes.pointer(data_ctx)))
    assert ctx_in
    n = lib.gguf_get_n_tensors(ctx_in)
    outs = []
    for i in range(n):
        if i % max_tensors == 0:
            ctx = lib.gguf_init_empty()
            if not outs:
                lib.gguf_set_kv(ctx, ctx_in)
            lib.gguf_set_val_u16(ctx, b"split.no", len(outs))
            lib.gguf_set_val_u16(ctx, b"split.count", 0)
            lib.gguf_set_val_i32(ctx, b"split.tensors.count", n)
            outs.append(ctx)
        lib.gguf_add_tensor(outs[-1], lib.ggml_get_tensor(data_ctx, lib.gguf_get_tensor_name(ctx_in, i)))
    paths = []
    for i, ctx in enumerate(outs):
        lib.gguf_set_val_u16(ctx, b"split.count", len(outs))
        path = Path(f"{prefix}-{i + 1:05d}-of-{len(outs):05d}.gguf")
        assert lib.gguf_write_to_file(ctx, str(path).encode(), False)
        paths.append(path)
        lib.gguf_free(ctx)
    lib.gguf_free(ctx_in)
    lib.ggml_free(data_ctx)
    return paths


def test_split_matches_gguf_split_byte_for_byte(tmp_path, oracle):
    md, tensors = _model(5)
    src = tmp_path / "src.gguf"
    gguf_kquant.write(src, md, tensors)
    (tmp_path / "ref").mkdir()
    ref = _gguf_split_like(oracle, src, str(tmp_path / "ref" / "m"), 2)
    with gguf_kquant.open(src) as f:
        ours = gguf_kquant.write(tmp_path / "m.gguf", f.metadata, f.tensors, split_max_tensors=2)
    assert [p.name for p in ours] == [p.name for p in ref]
    for a, b in zip(ours, ref):
        assert read_bytes(a) == read_bytes(b), a.name


@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_rewriting_the_file_being_read_is_refused(tmp_path, alias):
    # the target names the file the tensors are copied from: refused before anything is written
    p = tmp_path / "m.gguf"
    gguf_kquant.write(p, {"k": 1}, {"t": np.arange(64, dtype=np.float32)})
    before = p.read_bytes()
    target = {"same": p, "symlink": tmp_path / "l.gguf", "hardlink": tmp_path / "h.gguf"}[alias]
    if alias == "symlink":
        target.symlink_to(p.name)
    elif alias == "hardlink":
        os.link(p, target)
    with gguf_kquant.open(p) as f:
        with pytest.raises(WriteError, match="refusing to write over an input"):
            gguf_kquant.write(target, f.metadata, f.tensors)
    assert p.read_bytes() == before and leftovers(tmp_path) == []


def test_split_shard_name_colliding_with_a_source_shard_is_refused(tmp_path):
    md, tensors = {"k": 1}, [(f"t{i}", np.full(32, i, np.float32)) for i in range(3)]
    shards = gguf_kquant.write(tmp_path / "m.gguf", md, tensors, split_max_tensors=1)
    before = [s.read_bytes() for s in shards]
    with gguf_kquant.open(shards[0]) as f:
        with pytest.raises(WriteError, match="m-00002-of-00003.gguf: refusing to write over an input"):
            gguf_kquant.write(tmp_path / "m-00002-of-00003.gguf", f.metadata, f.tensors)
        with pytest.raises(WriteError, match="m-00001-of-00003.gguf: refusing"):  # same shard names again
            gguf_kquant.write(tmp_path / "m.gguf", f.metadata, f.tensors, split_max_tensors=1)
    assert [s.read_bytes() for s in shards] == before and leftovers(tmp_path) == []


def test_side_files_are_committed_with_the_model(tmp_path):
    target, side = tmp_path / "m.gguf", tmp_path / "m.json"
    paths = gguf_kquant.write(target, {"k": 1}, {"t": np.zeros(32, np.float32)}, side_files=[(side, lambda: b"{}")])
    assert paths == [target] and side.read_bytes() == b"{}"
    target.write_bytes(b"old model")
    side.write_bytes(b"old report")

    def failing():
        raise Boom("report")

    with pytest.raises(Boom):
        gguf_kquant.write(target, {"k": 2}, {"t": np.zeros(32, np.float32)}, side_files=[(side, failing)])
    assert target.read_bytes() == b"old model" and side.read_bytes() == b"old report"
    with pytest.raises(WriteError, match="written twice"):
        gguf_kquant.write(target, {"k": 2}, {}, side_files=[(target, lambda: b"")])
    assert target.read_bytes() == b"old model" and leftovers(tmp_path) == []


def test_overwrite_false_and_bad_destinations(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep")
    with pytest.raises(WriteError, match="destination exists; pass overwrite=True"):
        gguf_kquant.write(target, {"k": 1}, overwrite=False)
    with pytest.raises(WriteError, match="is a folder"):
        gguf_kquant.write(tmp_path, {"k": 1})
    with pytest.raises(WriteError, match="folder .*nope does not exist"):
        gguf_kquant.write(tmp_path / "nope" / "m.gguf", {"k": 1})
    with pytest.raises(WriteError, match="cannot contain a NUL byte"):
        gguf_kquant.write(tmp_path / "m\0.gguf", {"k": 1})
    assert target.read_bytes() == b"keep" and leftovers(tmp_path) == []
    gguf_kquant.write(tmp_path / "new.gguf", {"k": 1}, overwrite=False)


def test_glob_characters_in_names_are_plain_characters(tmp_path):
    for name in ("m[x].gguf", "m*.gguf", "m?.gguf"):
        gguf_kquant.write(tmp_path / name, {"k": 1}, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m*.gguf", "m?.gguf", "m[x].gguf"]


def test_any_shard_of_a_split_destination_counts_as_existing(tmp_path):
    md, tensors = {"k": 1}, [(f"t{i}", np.full(32, i, np.float32)) for i in range(3)]
    (tmp_path / "mx-00001-of-00002.gguf").write_bytes(b"other")  # m[x] as a glob would match this name
    three = gguf_kquant.write(tmp_path / "m[x].gguf", md, tensors, split_max_tensors=1, overwrite=False)
    with pytest.raises(WriteError, match=r"m\[x\]-00001-of-00002.gguf: a shard of the same split output exists"):
        gguf_kquant.write(tmp_path / "m[x].gguf", md, tensors, split_max_tensors=2, overwrite=False)
    two = gguf_kquant.write(tmp_path / "m[x].gguf", md, tensors, split_max_tensors=2, overwrite=True)
    assert all(p.exists() for p in three + two) and (tmp_path / "mx-00001-of-00002.gguf").read_bytes() == b"other"


def test_destination_name_of_255_bytes(tmp_path):
    # the longest legal name (NAME_MAX): the temp file name must not be longer than the target's
    for n in (242, 255):
        target = tmp_path / ("é" * ((n - 5) // 2) + "x" * ((n - 5) % 2) + ".gguf")
        assert len(target.name.encode()) == n
        gguf_kquant.write(target, {"k": 1}, {"t": np.zeros(32, np.float32)})
        assert target.read_bytes()[:4] == b"GGUF"
    assert leftovers(tmp_path) == []


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(WriteError, match="'x'.*Python objects"):
        gguf_kquant.write(tmp_path / "o.gguf", {}, [("x", (1,), "F64", np.array([object()]))])


def test_fifo_destination_is_refused_and_symlink_destination_followed(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(WriteError, match="pipe.gguf: is not a regular file"):
        gguf_kquant.write(fifo, {"k": 1})
    real = tmp_path / "real.gguf"
    real.write_bytes(b"old")
    link = tmp_path / "link.gguf"
    link.symlink_to(real.name)
    assert gguf_kquant.write(link, {"k": 1}) == [link]
    assert link.is_symlink() and real.read_bytes()[:4] == b"GGUF" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------------
# Signals: handlers only while writing, in the main thread; previous ones restored; ignored stays ignored
# ------------------------------------------------------------------------------------------------------
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _probe(seen: list, then=None):
    def gen():
        seen.append({s: signal.getsignal(s) for s in SIGNALS})
        if then is not None:
            then()
        yield b"\0" * 128
    return gen


def test_handlers_installed_while_writing_and_restored(tmp_path):
    before = {s: signal.getsignal(s) for s in SIGNALS}
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    try:
        seen = []
        gguf_kquant.write(tmp_path / "m.gguf", {}, [("t", (32,), "F32", _probe(seen))])
        during = seen[0]
        assert during[signal.SIGHUP] == signal.SIG_IGN  # an ignored signal stays ignored
        assert during[signal.SIGTERM] not in (before[signal.SIGTERM], signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old_hup)
    assert {s: signal.getsignal(s) for s in SIGNALS} == before


def test_no_handlers_from_another_thread(tmp_path):
    before = {s: signal.getsignal(s) for s in SIGNALS}
    seen = []
    t = threading.Thread(target=gguf_kquant.write, args=(tmp_path / "m.gguf", {}, [("t", (32,), "F32", _probe(seen))]))
    t.start()
    t.join()
    assert seen == [before] and (tmp_path / "m.gguf").exists()


def test_sigint_in_library_use_raises_keyboard_interrupt(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    # Python's own SIGINT handling, as in an interactive program: a shell starts background jobs with SIGINT
    # ignored, and the library rightly leaves an ignored signal alone (the CI run was one such job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            gguf_kquant.write(target, {}, [("t", (32,), "F32",
                                             _probe([], lambda: os.kill(os.getpid(), signal.SIGINT)))])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_sigterm_with_a_program_handler_cleans_up_then_calls_it(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    calls = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append((signum, leftovers(tmp_path))))
    try:
        with pytest.raises(safeio.Interrupted, match="SIGTERM"):
            gguf_kquant.write(target, {}, [("t", (32,), "F32",
                                             _probe([], lambda: os.kill(os.getpid(), signal.SIGTERM)))])
        assert calls == [(signal.SIGTERM, [])]  # called once, after the temp file was removed
    finally:
        signal.signal(signal.SIGTERM, old)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_more_shards_than_open_files_allowed(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        paths = gguf_kquant.write(tmp_path / "m.gguf", {}, [(f"t{i}", np.full(32, i, np.float32)) for i in range(100)],
                                  split_max_tensors=1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(paths) == 100 and leftovers(tmp_path) == []
    with gguf_kquant.open(paths[0]) as f:
        assert (f.tensors["t99"].numpy() == 99).all()


def test_write_shards_needs_files():
    from gguf_kquant.container.writer import write_shards

    with pytest.raises(WriteError, match="no files given"):
        write_shards([])
