"""Round-trip fidelity: ``write(dst, f.metadata, f.tensors)`` reproduces a file byte for byte, for files
written by gguf-py (an independent producer) and by llama.cpp itself (llama_model_quantize); gguf-py's
reader agrees with what we write; llama.cpp loads and evaluates models we wrote (single file and split)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))

import gguf_kquant  # noqa: E402
from gguf_kquant import GGUFValueType as V  # noqa: E402
import oracle  # noqa: E402
from make_example_model import build_llama_gguf  # noqa: E402


def roundtrip(src: Path, dst: Path, **opts) -> None:
    with gguf_kquant.open(src) as f:
        gguf_kquant.write(dst, f.metadata, f.tensors, **opts)
    assert dst.read_bytes() == src.read_bytes()


# ------------------------------------------------------------------------------------------------------
# (a) files written by gguf-py
# ------------------------------------------------------------------------------------------------------
def _gguf_py_file(path: Path, endian) -> None:
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 3.25)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 1e300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.arr_i", [1, -2, 3])
    w.add_array("t.arr_f", [0.5, 1.5])
    w.add_array("t.arr_s", ["a", "", "ü"])
    w.add_array("t.arr_b", [True, False])
    w.add_array("t.nested", [[1, 2], [3], ["x", "y"]])
    w.add_key_value("t.arr_u16", [1, 2], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("f64", x[:1].astype(np.float64))
    w.add_tensor("i8", np.arange(-16, 16, dtype=np.int8))
    w.add_tensor("i16", np.arange(48, dtype=np.int16).reshape(3, 16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    w.add_tensor("i64", np.arange(5, dtype=np.int64))
    w.add_tensor("bf16", gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16),
                 raw_dtype=gguf.GGMLQuantizationType.BF16)
    for qt in ("Q8_0", "Q4_0", "Q4_K", "Q6_K"):  # block bytes made by ggml (the oracle)
        t = gguf.GGMLQuantizationType[qt]
        w.add_tensor(qt.lower(), oracle.quantize_chunk(int(t), x), raw_dtype=t)
    w.add_tensor("one", np.ones((1, 1, 32), np.float32))  # leading dims of 1 are kept by gguf-py
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_py_file_roundtrips_byte_for_byte(tmp_path, endian):
    src = tmp_path / "src.gguf"
    _gguf_py_file(src, endian)
    roundtrip(src, tmp_path / "dst.gguf")
    with gguf_kquant.open(src) as f:
        assert f.alignment == 64 and len(f.tensors) == 13
        assert f.metadata.typed("t.nested").element_type == V.ARRAY


def test_gguf_py_reads_what_we_write(tmp_path):
    # a file built by us from plain values (not a byte copy), compared field by field with gguf-py's reader
    src = tmp_path / "src.gguf"
    _gguf_py_file(src, gguf.GGUFEndian.LITTLE)
    dst = tmp_path / "dst.gguf"
    with gguf_kquant.open(src) as f:
        md = gguf_kquant.container.values.Metadata()
        for k in f.metadata:
            md.set_typed(k, f.metadata.typed(k), f.metadata[k])
        tensors = [(t.name, t.shape, t.ggml_type, t.raw().tobytes()) for t in reversed(f.tensors)]
        gguf_kquant.write(dst, md, tensors)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert [(f.name, f.types, f.contents()) for f in a.fields.values() if not f.name.startswith("GGUF.")] == \
           [(f.name, f.types, f.contents()) for f in b.fields.values() if not f.name.startswith("GGUF.")]
    ta = {t.name: t for t in a.tensors}
    assert [t.name for t in b.tensors] == [t.name for t in reversed(a.tensors)]
    for t in b.tensors:
        assert (t.tensor_type, list(t.shape)) == (ta[t.name].tensor_type, list(ta[t.name].shape))
        assert bytes(t.data.tobytes()) == bytes(ta[t.name].data.tobytes()), t.name


# ------------------------------------------------------------------------------------------------------
# (b) a file written by llama.cpp (llama_model_quantize)
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import llama_cpp

    d = tmp_path_factory.mktemp("models")
    f32 = build_llama_gguf(d / "f32.gguf", n_layer=1, n_vocab=512)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    q = d / "q4km.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(q).encode(), ctypes.byref(params)) == 0
    return {"f32": f32, "q4km": q}


def test_llama_cpp_file_roundtrips_byte_for_byte(models, tmp_path):
    roundtrip(models["q4km"], tmp_path / "q.gguf")
    with gguf_kquant.open(models["q4km"]) as f:
        assert {t.type_name for t in f.tensors} >= {"Q4_K", "Q6_K", "F32"}


def test_gguf_py_reads_llama_cpp_roundtrip_identically(models, tmp_path):
    dst = tmp_path / "q.gguf"
    with gguf_kquant.open(models["q4km"]) as f:
        gguf_kquant.write(dst, f.metadata, f.tensors)
    a, b = gguf.GGUFReader(models["q4km"]), gguf.GGUFReader(dst)
    assert [(f.name, f.types, f.contents()) for f in a.fields.values()] == \
           [(f.name, f.types, f.contents()) for f in b.fields.values()]
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in a.tensors] == \
           [(t.name, t.tensor_type, t.data.tobytes()) for t in b.tensors]


# ------------------------------------------------------------------------------------------------------
# (c) llama.cpp loads and evaluates what we write
# ------------------------------------------------------------------------------------------------------
TOKENS = [1, 300, 301, 302]


def llama_logits(path: Path, out: Path) -> np.ndarray:
    return oracle.llama_logits(path, TOKENS, out)


def test_llama_cpp_evaluates_models_we_wrote(models, tmp_path):
    # from plain values and numpy arrays (default typing, not byte copies), tensors reordered, alignment 64
    fresh = tmp_path / "fresh.gguf"
    with gguf_kquant.open(models["f32"]) as f:
        md = dict(f.metadata)
        tensors = {t.name: t.numpy() for t in sorted(f.tensors, key=lambda t: t.name)}
    gguf_kquant.write(fresh, md, tensors, alignment=64)
    with gguf_kquant.open(fresh) as f:
        assert f.alignment == 64 and f.tensors.names() == sorted(tensors)
    ref = llama_logits(models["f32"], tmp_path / "ref.npy")
    assert ref.shape == (4, 512) and np.isfinite(ref).all()
    np.testing.assert_array_equal(llama_logits(fresh, tmp_path / "fresh.npy"), ref)

    # a quantized model written as gguf-split shards: llama.cpp loads it from the first shard
    with gguf_kquant.open(models["q4km"]) as f:
        paths = gguf_kquant.write(tmp_path / "split.gguf", f.metadata, f.tensors, split_max_tensors=5)
    assert len(paths) == 3 and paths[0].name == "split-00001-of-00003.gguf"
    q_ref = llama_logits(models["q4km"], tmp_path / "q.npy")
    np.testing.assert_array_equal(llama_logits(paths[0], tmp_path / "split.npy"), q_ref)
