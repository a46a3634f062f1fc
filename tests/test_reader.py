"""The reader against an independent producer (gguf-py's GGUFWriter) and reader (gguf.GGUFReader).

Covers every value type incl. arrays of arrays, v2 and v3, little- and big-endian, tensors of several types
(quantized bytes made by ggml itself through tests/oracle.py), zero-copy raw(), lazy opening, split models,
unknown tensor type ids and the lazily decoded string arrays.
"""

from __future__ import annotations

import copy
import json
import pickle
import resource
import struct
import time

import gguf
import numpy as np
import pytest
from gguf import GGUFEndian, GGUFReader, GGUFWriter
from gguf import GGUFValueType as GT
from hypothesis import example, given, settings, strategies as st

import gguf_kquant
from gguf_kquant import GGMLType
from gguf_kquant.container.reader import LAZY_STRING_ARRAY, LazyMetadata
from gguf_kquant.container.values import SCALAR_DTYPES, GGUFValueType as VT, Metadata
from gguf_kquant.errors import DuplicateError, SplitError, UnknownTypeError
from test_reader_hostile import build_gguf

LONG_STRINGS = [f"tok{i}-\u00e9\u65e5{'x' * (i % 13)}" for i in range(1000)]

# key, value, gguf-py type, gguf-py sub type
VALUES = [
    ("v.u8", 200, GT.UINT8, None),
    ("v.i8", -100, GT.INT8, None),
    ("v.u16", 60000, GT.UINT16, None),
    ("v.i16", -30000, GT.INT16, None),
    ("v.u32", 4_000_000_000, GT.UINT32, None),
    ("v.i32", -2_000_000_000, GT.INT32, None),
    ("v.f32", 1.1, GT.FLOAT32, None),
    ("v.bool_t", True, GT.BOOL, None),
    ("v.bool_f", False, GT.BOOL, None),
    ("v.str", "h\u00e9llo \u2713 \U0001f600", GT.STRING, None),
    ("v.str_empty", "", GT.STRING, None),
    ("v.u64", 2**64 - 1, GT.UINT64, None),
    ("v.i64", -(2**63), GT.INT64, None),
    ("v.f64", 1e-300, GT.FLOAT64, None),
    ("a.u8", [0, 255, 7], GT.ARRAY, GT.UINT8),
    ("a.i8", [-128, 127], GT.ARRAY, GT.INT8),
    ("a.u16", [1, 65535], GT.ARRAY, GT.UINT16),
    ("a.i16", [-32768, 5], GT.ARRAY, GT.INT16),
    ("a.u32", [1, 2**32 - 1], GT.ARRAY, GT.UINT32),
    ("a.i32", [-(2**31), 2**31 - 1], GT.ARRAY, GT.INT32),
    ("a.f32", [0.5, -1.25, 3e38], GT.ARRAY, GT.FLOAT32),
    ("a.bool", [True, False, True], GT.ARRAY, GT.BOOL),
    ("a.u64", [2**64 - 1, 0], GT.ARRAY, GT.UINT64),
    ("a.i64", [-(2**63), 1], GT.ARRAY, GT.INT64),
    ("a.f64", [1e300, -2.5], GT.ARRAY, GT.FLOAT64),
    ("a.str", ["a", "", "\u00fc"], GT.ARRAY, GT.STRING),
    ("a.str_long", LONG_STRINGS, GT.ARRAY, GT.STRING),
    ("a.nested", [[1, 2], [3.5], ["x", "y"]], GT.ARRAY, None),
    ("a.nested2", [[[1], [2, 3]], [[4]]], GT.ARRAY, None),
]

_NP_DTYPE = {GT.UINT8: np.uint8, GT.INT8: np.int8, GT.UINT16: np.uint16, GT.INT16: np.int16,
             GT.UINT32: np.uint32, GT.INT32: np.int32, GT.FLOAT32: np.float32, GT.BOOL: np.bool_,
             GT.UINT64: np.uint64, GT.INT64: np.int64, GT.FLOAT64: np.float64}


def write_with_gguf_py(path, *, endian=GGUFEndian.LITTLE, values=VALUES, tensors=(), arch="llama"):
    w = GGUFWriter(str(path), arch, endianess=endian)
    for key, value, vt, sub in values:
        w.add_key_value(key, value, vt, sub)
    for name, array, raw_dtype in tensors:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check_value(ours_typed, ours_plain, value, vt, sub):
    assert int(ours_typed.type) == int(vt)
    if vt != GT.ARRAY:
        if vt == GT.FLOAT32:
            assert ours_plain == float(np.float32(value))
        else:
            assert ours_plain == value and type(ours_plain) is type(value)
        return
    if sub is None:  # array of arrays: element types inferred the way gguf-py does
        assert ours_typed.element_type == VT.ARRAY
        assert isinstance(ours_plain, list) and len(ours_plain) == len(value)
        for inner_typed, inner_plain, inner in zip(ours_typed.value, ours_plain, value):
            inner_vt = GT.ARRAY if isinstance(inner[0], list) else GT.get_type(inner[0])
            if inner_vt == GT.ARRAY:
                check_value(inner_typed, inner_plain, inner, GT.ARRAY, None)
            else:
                check_value(inner_typed, inner_plain, inner, GT.ARRAY, inner_vt)
        return
    assert int(ours_typed.element_type) == int(sub)
    if sub == GT.STRING:
        assert type(ours_plain) is list and ours_plain == value
    else:
        assert isinstance(ours_plain, np.ndarray) and ours_plain.dtype == _NP_DTYPE[sub]
        assert ours_plain.dtype.isnative
        np.testing.assert_array_equal(ours_plain, np.array(value, dtype=_NP_DTYPE[sub]))


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=["le", "be"])
def test_every_value_type(tmp_path, endian):
    path = write_with_gguf_py(tmp_path / "values.gguf", endian=endian)
    ref = GGUFReader(str(path))
    with gguf_kquant.open(path) as f:
        assert f.version == 3
        assert f.byte_order == ("<" if endian == GGUFEndian.LITTLE else ">")
        assert list(f.metadata) == ["general.architecture"] + [v[0] for v in VALUES]
        assert not f.metadata.is_decoded("a.str_long")
        for key, value, vt, sub in VALUES:
            check_value(f.metadata.typed(key), f.metadata[key], value, vt, sub)
            field = ref.fields[key]
            assert [int(t) for t in field.types][:2] == [int(f.metadata.typed(key).type)] + (
                [int(f.metadata.typed(key).element_type)] if vt == GT.ARRAY else [])
            if sub is not None or vt != GT.ARRAY:
                theirs = field.contents()
                ours = f.metadata[key]
                assert (list(ours) if isinstance(ours, np.ndarray) else ours) == theirs, key
        assert f.tensors == [] and len(f.tensors) == 0


def test_v2_file(tmp_path):
    path = write_with_gguf_py(tmp_path / "v3.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout (v1 had 32-bit counts)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    with gguf_kquant.open(path) as f3, gguf_kquant.open(v2) as f2:
        assert (f2.version, f3.version) == (2, 3)
        assert list(f2.metadata) == list(f3.metadata)
        assert f2.metadata["a.str_long"] == f3.metadata["a.str_long"] == LONG_STRINGS


def test_example_fixture_agrees_with_gguf_py(example_model):
    ref = GGUFReader(str(example_model))
    with gguf_kquant.open(example_model) as f:
        assert f.data_offset == ref.data_offset and f.alignment == ref.alignment
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            assert int(f.metadata.typed(key).type) == int(field.types[0])
            ours = f.metadata[key]
            assert (list(ours) if isinstance(ours, np.ndarray) else ours) == field.contents(), key
        assert f.tensors.names() == [t.name for t in ref.tensors]
        for ours, theirs in zip(f.tensors, ref.tensors):
            assert ours.shape == tuple(int(d) for d in theirs.shape[::-1])
            assert int(ours.ggml_type) == int(theirs.tensor_type)
            assert (ours.offset, ours.nbytes) == (theirs.data_offset, theirs.n_bytes)
            assert ours.raw().tobytes() == np.asarray(theirs.data).tobytes()


# ------------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------------
def _swap_fp16_fields(raw: np.ndarray, block_bytes: int, fp16_offsets) -> np.ndarray:
    """Big-endian version of quantized blocks: swap the two bytes of each fp16 field (done by hand)."""
    blocks = raw.reshape(-1, block_bytes).copy()
    for off in fp16_offsets:
        blocks[:, [off, off + 1]] = blocks[:, [off + 1, off]]
    return blocks.reshape(raw.shape)


@pytest.fixture(scope="module")
def tensor_set(oracle):
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((3, 64), dtype=np.float32)
    q8 = oracle.quantize_chunk(int(GGMLType.Q8_0), x32)
    xk = rng.standard_normal((2, 512), dtype=np.float32)
    q4k = oracle.quantize_chunk(int(GGMLType.Q4_K), xk)
    return {
        "f32": (rng.standard_normal((3, 5), dtype=np.float32), None),
        "f16": (rng.standard_normal((4, 8)).astype(np.float16), None),
        "i8": (np.arange(-5, 5, dtype=np.int8), None),
        "i16": (np.arange(-6, 6, dtype=np.int16).reshape(3, 4), None),
        "i32": (np.array([-(2**31), 7, 2**31 - 1], dtype=np.int32), None),
        "q8_0": (q8, gguf.GGMLQuantizationType.Q8_0),
        "q4_k": (q4k, gguf.GGMLQuantizationType.Q4_K),
        "scalar": (np.array([2.5], dtype=np.float32), None),
    }


def _write_tensor_file(path, tensor_set, endian):
    tensors = []
    for name, (array, raw_dtype) in tensor_set.items():
        if endian == GGUFEndian.BIG and name == "q8_0":
            array = _swap_fp16_fields(array, 34, [0])  # d
        if endian == GGUFEndian.BIG and name == "q4_k":
            array = _swap_fp16_fields(array, 144, [0, 2])  # d, dmin
        tensors.append((f"t.{name}", array, raw_dtype))
    return write_with_gguf_py(path, endian=endian, values=VALUES[:3], tensors=tensors)


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=["le", "be"])
def test_tensors_agree_with_gguf_py(tmp_path, tensor_set, endian):
    path = _write_tensor_file(tmp_path / "t.gguf", tensor_set, endian)
    ref = GGUFReader(str(path))
    file_bytes = path.read_bytes()
    with gguf_kquant.open(path) as f:
        assert f.tensors.names() == [t.name for t in ref.tensors] == [f"t.{n}" for n in tensor_set]
        for ours, theirs in zip(f.tensors, ref.tensors):
            assert ours.shape == tuple(int(d) for d in theirs.shape[::-1])
            assert ours.ggml_type == GGMLType(int(theirs.tensor_type))
            assert (ours.offset, ours.nbytes) == (theirs.data_offset, theirs.n_bytes)
            assert ours.raw().tobytes() == file_bytes[ours.offset:ours.offset + ours.nbytes]
            assert ours.path == path and ours.byte_order == f.byte_order
        assert f.tensors["t.q4_k"].shape == (2, 512) and f.tensors["t.q8_0"].shape == (3, 64)
        assert f.tensors["t.scalar"].shape == (1,)


ENDIANS = pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=["le", "be"])


@ENDIANS
def test_numpy_integer_tensors_keep_their_dtype(tmp_path, tensor_set, endian):
    path = _write_tensor_file(tmp_path / "t.gguf", tensor_set, endian)
    with gguf_kquant.open(path) as f:
        for name in ("i8", "i16", "i32"):
            got = f.tensors[f"t.{name}"].numpy()
            assert got.dtype == tensor_set[name][0].dtype and got.dtype.isnative
            np.testing.assert_array_equal(got, tensor_set[name][0])


@ENDIANS
def test_numpy_float_tensors(tmp_path, tensor_set, endian):
    """F32/F16 through gguf_kquant.dequantize, compared with numpy's own (exact) conversion."""
    path = _write_tensor_file(tmp_path / "t.gguf", tensor_set, endian)
    with gguf_kquant.open(path) as f:
        for name in ("f32", "f16", "scalar"):
            got = f.tensors[f"t.{name}"].numpy()
            assert got.dtype == np.float32 and got.shape == tensor_set[name][0].shape
            np.testing.assert_array_equal(got, tensor_set[name][0].astype(np.float32))


@ENDIANS
def test_numpy_quantized_tensors_match_ggml(tmp_path, tensor_set, oracle, endian):
    """Big-endian files store the fp16 fields of each block swapped; numpy() must swap them back."""
    path = _write_tensor_file(tmp_path / "t.gguf", tensor_set, endian)
    with gguf_kquant.open(path) as f:
        for name, qtype, n_per_row in (("q8_0", GGMLType.Q8_0, 64), ("q4_k", GGMLType.Q4_K, 512)):
            raw = tensor_set[name][0]
            got = f.tensors[f"t.{name}"].numpy()
            np.testing.assert_array_equal(got, oracle.to_float(int(qtype), raw, n_per_row))


def test_raw_is_read_only_and_zero_copy(tmp_path, tensor_set):
    path = _write_tensor_file(tmp_path / "t.gguf", tensor_set, GGUFEndian.LITTLE)
    with gguf_kquant.open(path) as f:
        a, b = f.tensors[0], f.tensors[3]
        ra, rb = a.raw(), b.raw()
        assert ra.dtype == np.uint8 and ra.shape == (a.nbytes,)
        assert not ra.flags.writeable and not ra.flags.owndata
        with pytest.raises(ValueError):
            ra[0] = 1
        assert np.shares_memory(ra, a.raw())  # two calls: the same mapped bytes, no copy
        assert rb.ctypes.data - ra.ctypes.data == b.offset - a.offset
    # views outlive close(): the mapping stays alive while they do
    assert ra.tobytes() == path.read_bytes()[a.offset:a.offset + a.nbytes]


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar")).split()[1])


def test_open_is_lazy(tmp_path):
    """A 4 GiB tensor region (a sparse file) is neither read nor mapped into memory by opening."""
    n = 1 << 30  # F32 elements: 4 GiB
    head = build_gguf([("general.architecture", VT.STRING, "llama")], [("big", [n], 0, b"")], body=False)
    path = tmp_path / "big.gguf"
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + 4 * n)
    rss0, rchar0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rchar(), time.perf_counter()
    with gguf_kquant.open(path) as f:
        t = f.tensors["big"]
        raw = t.raw()
        assert t.nbytes == 4 * n and raw.size == 4 * n
        assert raw[-1] == 0  # touching one byte is fine
        del raw
    assert time.perf_counter() - t0 < 1.0
    assert _rchar() - rchar0 < (1 << 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 256 * 1024  # KiB


def test_unknown_type_id_is_listed(tmp_path):
    data = build_gguf([], [("new", [8], 50, b"\1" * 40), ("f", [8], 0, np.arange(8, dtype="<f4").tobytes()),
                           ("last", [4], 60, b"\2" * 16)])
    path = tmp_path / "new.gguf"
    path.write_bytes(data)
    with gguf_kquant.open(path) as f:
        new, ok, last = f.tensors
        assert new.ggml_type == 50 and not isinstance(new.ggml_type, GGMLType)
        assert new.type_name == "UNKNOWN(50)" and not new.is_known_type
        assert (new.nbytes, new.nbytes_exact) == (64, False)  # span to the next tensor (padding included)
        assert new.raw().tobytes() == b"\1" * 40 + b"\0" * 24
        assert last.ggml_type == 60 and last.nbytes == path.stat().st_size - last.offset
        assert ok.nbytes_exact and ok.raw().view("<f4").tolist() == list(range(8))
        for t in (new, last):
            with pytest.raises(UnknownTypeError, match=rf"{path}: offset {t.offset}: tensor '{t.name}'.*type id"):
                t.numpy()


# ------------------------------------------------------------------------------------------------------
# split models
# ------------------------------------------------------------------------------------------------------
def _write_split(folder, n_tensors=5, per_shard=2):
    w = GGUFWriter(str(folder / "m.gguf"), "llama", split_max_tensors=per_shard)
    w.add_uint32("llama.block_count", 1)
    for i in range(n_tensors):
        w.add_tensor(f"t{i}", np.full((3, 4), i, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(folder.glob("m-*.gguf"))


def test_split_model_opens_as_one(tmp_path):
    shards = _write_split(tmp_path)
    assert [p.name for p in shards] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with gguf_kquant.open(shards[0]) as f:
        assert f.shards == shards
        assert f.tensors.names() == [f"t{i}" for i in range(5)]
        assert [t.path for t in f.tensors] == [shards[0]] * 2 + [shards[1]] * 2 + [shards[2]]
        for i, t in enumerate(f.tensors):
            assert t.raw().view("<f4").tolist() == [float(i)] * 12
            assert t.offset + t.nbytes <= t.path.stat().st_size
        assert f.metadata["split.count"] == 3 and f.metadata["llama.block_count"] == 1  # shard 1's keys
        assert f.total_size == sum(p.stat().st_size for p in shards)
    with pytest.raises(SplitError, match="shard 2 of 3.*open the first shard"):
        gguf_kquant.open(shards[1])
    with gguf_kquant.open(shards[1], split=False) as f:
        assert f.tensors.names() == ["t2", "t3"] and f.shards == [shards[1]]


def test_split_errors(tmp_path):
    shards = _write_split(tmp_path)
    shards[2].rename(tmp_path / "gone.gguf")
    with pytest.raises(SplitError, match="shard 3 of 3 is missing"):
        gguf_kquant.open(shards[0])
    (tmp_path / "gone.gguf").rename(shards[2])
    renamed = tmp_path / "model.gguf"
    renamed.write_bytes(shards[0].read_bytes())
    with pytest.raises(SplitError, match="file name"):
        gguf_kquant.open(renamed)
    # shard 3 claims a different total tensor count
    data = bytearray(shards[2].read_bytes())
    key = b"split.tensors.count"
    at = data.index(key) + len(key) + 4
    data[at:at + 4] = struct.pack("<i", 6)
    shards[2].write_bytes(bytes(data))
    with pytest.raises(SplitError, match="split.tensors.count=6"):
        gguf_kquant.open(shards[0])


def test_split_duplicate_tensor_across_shards(tmp_path):
    shards = _write_split(tmp_path)
    data = shards[1].read_bytes().replace(b"t2", b"t0")
    shards[1].write_bytes(data)
    with pytest.raises(DuplicateError, match="'t0' is also in"):
        gguf_kquant.open(shards[0])


# ------------------------------------------------------------------------------------------------------
# lazily decoded string arrays
# ------------------------------------------------------------------------------------------------------
def test_lazy_string_arrays_behave_like_lists(tmp_path):
    path = write_with_gguf_py(tmp_path / "lazy.gguf", values=[("a.str_long", LONG_STRINGS, GT.ARRAY, GT.STRING),
                                                             ("b.str_long", LONG_STRINGS[::-1], GT.ARRAY, GT.STRING)])
    assert len(LONG_STRINGS) > LAZY_STRING_ARRAY
    with gguf_kquant.open(path) as f:
        md = f.metadata
        assert isinstance(md, LazyMetadata) and isinstance(md, Metadata) and isinstance(md, dict)
        assert not md.is_decoded("a.str_long")
        assert f.peek("a.str_long", 3) == LONG_STRINGS[:3] and not md.is_decoded("a.str_long")
        assert md["a.str_long"] == LONG_STRINGS
        assert md.is_decoded("a.str_long") and not md.is_decoded("b.str_long")
        assert md.typed("b.str_long").value == LONG_STRINGS[::-1] and md.typed("b.str_long").element_type == VT.STRING
    with gguf_kquant.open(path) as f:
        md = f.metadata
        assert json.loads(json.dumps(md))["b.str_long"] == LONG_STRINGS[::-1]
    with gguf_kquant.open(path) as f:
        md = f.metadata
        assert md == {"general.architecture": "llama", "a.str_long": LONG_STRINGS, "b.str_long": LONG_STRINGS[::-1]}
    with gguf_kquant.open(path) as f:
        md = f.metadata
        assert {**md}["b.str_long"][5] == LONG_STRINGS[-6]  # {**m} and dict(m) go through __getitem__
    with gguf_kquant.open(path) as f:
        assert dict(f.metadata)["a.str_long"] == LONG_STRINGS
    with gguf_kquant.open(path) as f:
        md = f.metadata
        plain_copy = md.copy()
        assert type(plain_copy) is Metadata and plain_copy["a.str_long"] == LONG_STRINGS
        assert plain_copy.typed("a.str_long").element_type == VT.STRING
    with gguf_kquant.open(path) as f:
        md = f.metadata
    # after close the undecoded bytes were kept: still decodable
    assert md["a.str_long"] == LONG_STRINGS and md.get("b.str_long") == LONG_STRINGS[::-1]
    with gguf_kquant.open(path) as f:
        md = f.metadata
        md["a.str_long"] = ["replaced"]
        del md["b.str_long"]
        assert dict(md) == {"general.architecture": "llama", "a.str_long": ["replaced"]}
    with gguf_kquant.open(path) as f:
        for clone in (pickle.loads(pickle.dumps(f.metadata)), copy.deepcopy(f.metadata)):
            assert type(clone) is Metadata and clone == f.metadata
            assert clone.typed("b.str_long").value == LONG_STRINGS[::-1]


def test_big_vocabulary_opens_fast(tmp_path):
    """262,144 tokens + 260,000 merges: open well under a second (the benchmark measures it exactly)."""
    n = 262_144
    toks = [f"\u0120t{i}" for i in range(n)]
    merges = [f"\u0120t{i} t{i + 1}" for i in range(260_000)]
    data = build_gguf([("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, toks)),
                       ("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.0] * n)),
                       ("tokenizer.ggml.merges", VT.ARRAY, (VT.STRING, merges))], [("t", [8], 0, b"\0" * 32)])
    path = tmp_path / "vocab.gguf"
    path.write_bytes(data)
    gguf_kquant.open(path).close()  # warm the page cache
    best = min(_time_open(path) for _ in range(3))
    assert best < 0.3, best
    with gguf_kquant.open(path) as f:
        assert f.metadata["tokenizer.ggml.tokens"][n - 1] == toks[-1]
        assert f.metadata["tokenizer.ggml.merges"] == merges
        assert f.metadata["tokenizer.ggml.scores"].shape == (n,)


def _time_open(path) -> float:
    t0 = time.perf_counter()
    with gguf_kquant.open(path) as f:
        [(t.name, t.shape, t.ggml_type) for t in f.tensors]
        list(f.metadata)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------
# property: whatever an independent byte-level builder writes, the reader returns with its types
# ------------------------------------------------------------------------------------------------------
_INT_RANGES = {VT.UINT8: (0, 2**8 - 1), VT.INT8: (-(2**7), 2**7 - 1), VT.UINT16: (0, 2**16 - 1),
               VT.INT16: (-(2**15), 2**15 - 1), VT.UINT32: (0, 2**32 - 1), VT.INT32: (-(2**31), 2**31 - 1),
               VT.UINT64: (0, 2**64 - 1), VT.INT64: (-(2**63), 2**63 - 1)}
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def _scalar_strategy(vt):
    if vt in _INT_RANGES:
        return st.integers(*_INT_RANGES[vt])
    if vt == VT.FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if vt == VT.FLOAT64:
        return st.floats(allow_nan=False)
    if vt == VT.BOOL:
        return st.integers(0, 1)
    return _TEXT


def _value_strategy(depth=0):
    scalar_types = [t for t in VT if t != VT.ARRAY]
    plain = st.sampled_from(scalar_types).flatmap(lambda vt: st.tuples(st.just(vt), _scalar_strategy(vt)))
    arrays = st.sampled_from(scalar_types).flatmap(
        lambda et: st.tuples(st.just(VT.ARRAY), st.tuples(
            st.just(et), st.lists(_scalar_strategy(et), max_size=80 if et == VT.STRING else 6))))
    if depth < 2:
        nested = st.lists(_value_strategy(depth + 1).filter(lambda v: v[0] == VT.ARRAY), max_size=3).map(
            lambda items: (VT.ARRAY, (VT.ARRAY, [v for _, v in items])))
        return st.one_of(plain, arrays, nested)
    return st.one_of(plain, arrays)


def _check_against_built(typed, plain, vt, value):
    assert typed.type == vt
    if vt != VT.ARRAY:
        expected = bool(value) if vt == VT.BOOL else value
        if vt == VT.FLOAT32:
            expected = float(np.float32(value))
        assert plain == expected and type(plain) is type(expected)
        return
    et, items = value
    assert typed.element_type == et
    if et == VT.ARRAY:
        assert len(plain) == len(items)
        for inner_typed, inner_plain, inner in zip(typed.value, plain, items):
            _check_against_built(inner_typed, inner_plain, VT.ARRAY, inner)
    elif et == VT.STRING:
        assert plain == items
    else:
        assert plain.dtype == (np.bool_ if et == VT.BOOL else np.dtype(SCALAR_DTYPES[et]).newbyteorder("="))
        np.testing.assert_array_equal(plain, np.array(items, dtype=plain.dtype))


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prop")


@settings(max_examples=120, deadline=None)
@given(kvs=st.lists(st.tuples(_TEXT.filter(bool), _value_strategy()), max_size=8, unique_by=lambda kv: kv[0]),
       bo=st.sampled_from("<>"), version=st.sampled_from([2, 3]))
# drawn in CI: split.* keys make a file a shard (opened alone here; the split rules are tested with the shards)
@example(kvs=[("split.count", (VT.UINT16, 2))], bo="<", version=3)
@example(kvs=[("split.count", (VT.ARRAY, (VT.UINT8, [])))], bo="<", version=3)
def test_any_metadata_reads_back(prop_dir, kvs, bo, version):
    path = prop_dir / "prop.gguf"
    path.write_bytes(build_gguf([(k, vt, v) for k, (vt, v) in kvs], [("t", [2], 0, b"\0" * 8)], bo=bo,
                                version=version))
    with gguf_kquant.open(path, split=False) as f:  # the file alone, whatever split.* keys it holds
        assert (f.version, f.byte_order) == (version, bo)
        assert list(f.metadata) == [k for k, _ in kvs]
        for key, (vt, value) in kvs:
            _check_against_built(f.metadata.typed(key), f.metadata[key], vt, value)


def test_uint64_array_beyond_int64_roundtrips(tmp_path):
    # numpy turns [0, 2**63] into float64; the value layer must keep every bit (issue 9, item 10)
    from gguf_kquant.container.values import Value

    p = tmp_path / "u64.gguf"
    md = {"explicit": Value([0, 2**63, 2**64 - 1], VT.ARRAY, VT.UINT64), "inferred": [1, 2**63 + 1]}
    gguf_kquant.write(p, md, {"t": np.zeros(4, np.float32)}, fsync=False)
    with gguf_kquant.open(p) as f:
        assert f.metadata["explicit"].tolist() == [0, 2**63, 2**64 - 1]
        assert f.metadata.typed("inferred").element_type == VT.UINT64
        assert f.metadata["inferred"].tolist() == [1, 2**63 + 1]
    with pytest.raises(gguf_kquant.GGUFError, match="UINT64"):
        Value([-1, 2**63], VT.ARRAY, VT.UINT64)


def test_deeply_nested_lists_are_a_write_error_not_a_recursion_error(tmp_path):
    v = 1
    for _ in range(5000):
        v = [v]
    with pytest.raises(gguf_kquant.GGUFError, match="nested more than 16 deep"):
        gguf_kquant.write(tmp_path / "deep.gguf", {"a": v}, {}, fsync=False)
