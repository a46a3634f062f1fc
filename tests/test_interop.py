"""Interoperation: gguf-py's reader objects and torch/DLPack arrays through our API, ours through theirs."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
import gguf_kquant
from gguf_kquant.container.values import GGUFValueType as VT, Value
from gguf_kquant.errors import WriteError
from gguf_kquant.interop import add_to_gguf_writer, as_numpy, field_value

torch = pytest.importorskip("torch")  # a test dependency (pyproject's [test] extra): never missing in CI


def _gguf_py_file(path, endianess=gguf.GGUFEndian.LITTLE, alignment=None):
    """A file written by gguf-py: every value type, an array of arrays, F32/F16/BF16/Q8_0/Q4_K tensors."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 1e-5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo `x`")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -2**40)
    w.add_float64("t.f64", 0.1)
    w.add_array("t.tokens", ["<s>", "</s>", "é"])
    w.add_key_value("t.scores", [0.5, -1.25, 3.0], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    w.add_key_value("t.u16s", [1, 2, 65535], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    x = rng.standard_normal((4, 256), dtype=np.float32)
    w.add_tensor("a.f32", x[:2, :64])
    w.add_tensor("b.f16", x[:3, :32].astype(np.float16))
    bf16 = (x[:2, :32].view(np.uint32) >> 16).astype(np.uint16)
    w.add_tensor("c.bf16", bf16.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
    for name, t in (("d.q8_0", "Q8_0"), ("e.q4_k", "Q4_K")):  # our quantized bytes through gguf-py
        # quantize()'s (n_rows, row_bytes) is gguf-py's byte shape of raw quantized data
        w.add_tensor(name, gguf_kquant.quantize(x, t), raw_dtype=getattr(gguf.GGMLQuantizationType, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("endianess,alignment", [(gguf.GGUFEndian.LITTLE, None), (gguf.GGUFEndian.BIG, 64)])
def test_gguf_reader_copied_through_our_writer_is_byte_identical(tmp_path, endianess, alignment):
    src = _gguf_py_file(tmp_path / "src.gguf", endianess, alignment)
    reader = gguf.GGUFReader(str(src))
    want = src.read_bytes()
    # the reader as the whole source
    gguf_kquant.write(tmp_path / "a.gguf", reader)
    assert (tmp_path / "a.gguf").read_bytes() == want
    # its fields and tensors given separately; a GGUFWriter built from them
    order = ">" if endianess.name == "BIG" else "<"
    with gguf_kquant.GGUFWriter(tmp_path / "b.gguf", reader.fields, byte_order=order) as w:
        for t in reader.tensors:
            w.add_tensor(t.name, t)
    assert (tmp_path / "b.gguf").read_bytes() == want
    # one ReaderField as a value keeps its GGUF type
    assert field_value(reader.fields["t.u16s"]).element_type == VT.UINT16
    nested = field_value(reader.fields["t.nested"])
    assert [list(v.value) for v in nested.value] == [[1, 2], [3]]


def test_reader_tensors_swapped_to_another_byte_order(tmp_path):
    src = _gguf_py_file(tmp_path / "be.gguf", gguf.GGUFEndian.BIG)
    reader = gguf.GGUFReader(str(src))
    gguf_kquant.write(tmp_path / "le.gguf", reader, byte_order="<")
    with gguf_kquant.open(src) as a, gguf_kquant.open(tmp_path / "le.gguf") as b:
        assert b.byte_order == "<" and a.byte_order == ">"
        assert dict(b.metadata).keys() == dict(a.metadata).keys()
        for ta, tb in zip(a.tensors, b.tensors):
            np.testing.assert_array_equal(ta.numpy(), tb.numpy())


def test_writer_refuses_to_overwrite_the_gguf_py_source(tmp_path):
    src = _gguf_py_file(tmp_path / "src.gguf")
    before = src.read_bytes()
    with pytest.raises(WriteError, match="input"):
        gguf_kquant.write(src, gguf.GGUFReader(str(src)))
    assert src.read_bytes() == before


def test_our_metadata_and_tensors_through_gguf_py_writer(tmp_path, example_model):
    """Ours through theirs: our reader's typed metadata (numpy arrays included) and our raw tensor bytes
    give gguf-py's writer the very file we read."""
    out = tmp_path / "gp.gguf"
    with gguf_kquant.open(example_model) as f:
        assert isinstance(f.metadata["tokenizer.ggml.scores"], np.ndarray)  # what gguf-py rejects alone
        w = gguf.GGUFWriter(str(out), f.metadata["general.architecture"])
        add_to_gguf_writer(w, f.metadata)
        for t in f.tensors:  # raw bytes go to gguf-py in its byte shape (n_rows, row_bytes)
            w.add_tensor(t.name, t.raw().reshape(t.shape[:-1] + (-1,)),
                         raw_dtype=gguf.GGMLQuantizationType(int(t.ggml_type)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    assert out.read_bytes() == example_model.read_bytes()
    with pytest.raises(WriteError, match="empty array"):
        add_to_gguf_writer(gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama"),
                           {"k": Value([], VT.ARRAY, VT.INT32)})


def test_our_quantized_bytes_decode_with_gguf_py():
    x = np.random.default_rng(2).standard_normal((3, 256), dtype=np.float32)
    for t in ("Q8_0", "Q4_K", "Q6_K"):
        q = gguf_kquant.quantize(x, t)
        ours = gguf_kquant.dequantize(q, t, x.shape)
        theirs = gguf.quants.dequantize(q, getattr(gguf.GGMLQuantizationType, t))
        np.testing.assert_array_equal(theirs, ours)


def test_raw_shape_and_quantize_shape(tmp_path):
    """quantize() gives (n_rows, row_bytes); TensorInfo.raw() the same bytes flat."""
    x = np.random.default_rng(3).standard_normal((4, 512), dtype=np.float32)
    q = gguf_kquant.quantize(x, "Q4_K")
    gguf_kquant.write(tmp_path / "q.gguf", {"general.architecture": "llama"}, [("w", q.shape[:1] + (512,), "Q4_K", q)])
    gguf_kquant.write(tmp_path / "q2.gguf", {"general.architecture": "llama"}, [("w", None, "Q4_K", q)])  # shape from q
    with gguf_kquant.open(tmp_path / "q.gguf") as f:
        raw = f.tensors[0].raw()
        assert raw.shape == (q.nbytes,) and f.tensors[0].shape == (4, 512)
        np.testing.assert_array_equal(raw.reshape(q.shape), q)
        np.testing.assert_array_equal(gguf_kquant.dequantize(raw, "Q4_K", x.shape),
                                      gguf_kquant.dequantize(q, "Q4_K", x.shape))
    assert (tmp_path / "q.gguf").read_bytes() == (tmp_path / "q2.gguf").read_bytes()


# ------------------------------------------------------------------------------------------------------
# torch and DLPack
# ------------------------------------------------------------------------------------------------------
class _DLPackOnly:
    """An array from some other library: only the DLPack protocol."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_writer_takes_torch_and_dlpack_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    bf = x.to(torch.bfloat16)
    tensors = {"f32": x.requires_grad_(True), "f16": x.detach().half(), "bf16": bf,
               "i32": torch.arange(8, dtype=torch.int32), "dl": _DLPackOnly(x.detach().numpy()),
               "bf16_as_f32": (bf, None)}
    with gguf_kquant.GGUFWriter(tmp_path / "t.gguf", {"general.architecture": "llama"}) as w:
        for name, data in tensors.items():
            if isinstance(data, tuple):
                w.add_tensor(name, data[0], ggml_type="F32")
            else:
                w.add_tensor(name, data)
    with gguf_kquant.open(tmp_path / "t.gguf") as f:
        t = {ti.name: ti for ti in f.tensors}
        assert {k: v.type_name for k, v in t.items()} == {"f32": "F32", "f16": "F16", "bf16": "BF16", "i32": "I32",
                                                          "dl": "F32", "bf16_as_f32": "F32"}
        xn = x.detach().numpy()
        np.testing.assert_array_equal(t["f32"].numpy(), xn)
        np.testing.assert_array_equal(t["dl"].numpy(), xn)
        np.testing.assert_array_equal(t["f16"].numpy(), xn.astype(np.float16).astype(np.float32))
        # BF16 bytes are torch's own bit patterns
        bits = bf.view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(t["bf16"].raw().view(np.uint16).reshape(3, 64), bits)
        np.testing.assert_array_equal(t["bf16_as_f32"].numpy(), bf.float().numpy())
        assert t["bf16"].shape == (3, 64)
        # ours through torch: our arrays go to torch without a copy through DLPack
        back = torch.from_dlpack(t["f32"].numpy())
        assert torch.equal(back, x.detach())


def test_as_numpy_without_importing_torch():
    """as_numpy duck-types torch: it never imports it (the module has no torch import)."""
    import gguf_kquant.interop as interop

    assert "torch" not in interop.__dict__
    src = open(interop.__file__).read()
    assert "import torch" not in src
    bf = torch.tensor([1.5, -2.0, 3.140625], dtype=torch.bfloat16)
    np.testing.assert_array_equal(as_numpy(bf), np.array([1.5, -2.0, 3.140625], np.float32))
    np.testing.assert_array_equal(as_numpy(bf, bf16_bits=True), bf.view(torch.int16).numpy().view(np.uint16))
    f8 = torch.tensor([0.5, -448.0], dtype=torch.float8_e4m3fn)
    np.testing.assert_array_equal(as_numpy(f8), np.array([0.5, -448.0], np.float32))
    assert as_numpy([1, 2]) == [1, 2]  # not array-like: unchanged
    with pytest.raises(gguf_kquant.GGUFError, match="complex"):
        as_numpy(torch.zeros(2, dtype=torch.complex64))


def test_no_torch_import(tmp_path):
    """Quantizing, dequantizing and writing DLPack objects never imports torch (a fresh interpreter)."""
    import subprocess
    import sys

    code = f"""
import sys, numpy as np, gguf_kquant
class D:
    def __init__(self, a): self.a = a
    def __dlpack__(self, **kw): return self.a.__dlpack__(**kw)
    def __dlpack_device__(self): return self.a.__dlpack_device__()
x = np.arange(64, dtype=np.float32).reshape(2, 32)
gguf_kquant.write({str(tmp_path / 'd.gguf')!r}, {{"general.architecture": "llama"}}, {{"x": D(x)}})
with gguf_kquant.open({str(tmp_path / 'd.gguf')!r}) as f:
    assert (f.tensors[0].numpy() == x).all()
q = gguf_kquant.quantize(D(x), "Q8_0")
assert (gguf_kquant.dequantize(D(q), "Q8_0", x.shape) == gguf_kquant.dequantize(q, "Q8_0", x.shape)).all()
assert "torch" not in sys.modules, "torch imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantize_and_dequantize_take_torch_and_dlpack():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 256, generator=g)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = x.to(dt, copy=True).requires_grad_(True)
        exact = t.detach().double().numpy() if dt == torch.float64 else t.detach().float().numpy()
        for qt in ("Q4_K", "Q8_0"):
            np.testing.assert_array_equal(gguf_kquant.quantize(t, qt), gguf_kquant.quantize(exact, qt))
    imatrix = torch.rand(256, generator=g, dtype=torch.float64)
    np.testing.assert_array_equal(gguf_kquant.quantize(x, "Q4_K", imatrix=imatrix),
                                  gguf_kquant.quantize(x.numpy(), "Q4_K", imatrix=imatrix.numpy()))
    q = gguf_kquant.quantize(_DLPackOnly(x.numpy()), "Q8_0")
    np.testing.assert_array_equal(q, gguf_kquant.quantize(x.numpy(), "Q8_0"))
    want = gguf_kquant.dequantize(q, "Q8_0", (4, 256))
    np.testing.assert_array_equal(gguf_kquant.dequantize(torch.from_numpy(q), "Q8_0", (4, 256)), want)
    np.testing.assert_array_equal(gguf_kquant.dequantize(_DLPackOnly(q), "Q8_0", (4, 256)), want)
    # ours through torch
    assert torch.equal(torch.from_dlpack(want), torch.from_numpy(want))
    # a float8 checkpoint tensor quantizes from its exact values
    f8 = x.to(torch.float8_e4m3fn)
    np.testing.assert_array_equal(gguf_kquant.quantize(f8, "Q8_0"), gguf_kquant.quantize(f8.float().numpy(), "Q8_0"))
