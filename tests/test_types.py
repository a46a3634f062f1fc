"""The type table (gguf_kquant/types.py) against ggml itself, gguf-py's enums and llama-quant.cpp's fallbacks."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import UnknownTypeError
from gguf_kquant import types as types_module
from gguf_kquant.types import TYPES, GGMLType, Imatrix, TypeInfo, register_kernel, type_info

# gguf 0.19.0 disagrees with ggml here; asserted explicitly below so the test notices when gguf is fixed.
GGUF_PY_WRONG_SIZES = {GGMLType.Q8_1: (32, 40)}  # ggml: (32, 36) — gguf-py counts an fp32 s
GGUF_PY_MISSING = {GGMLType.Q2_0}


def test_table_matches_ggml_type_traits(oracle):
    for t in GGMLType:
        tr = oracle.type_traits(int(t))
        info = TYPES[t]
        assert tr.type_name.decode().upper() == t.name, t
        assert (tr.blck_size, tr.type_size) == (info.block_size, info.type_size), t
        assert bool(tr.is_quantized) == info.is_quantized, t
        assert oracle.ggml().ggml_type_name(int(t)).decode().upper() == t.name


def test_removed_ids_are_not_types(oracle):
    for type_id in (4, 5, 31, 32, 33, 36, 37, 38):
        assert not gguf_kquant.types.is_known_type_id(type_id)
        assert oracle.type_traits(type_id).blck_size == 0  # ggml keeps empty rows for removed ids
        with pytest.raises(UnknownTypeError):
            type_info(type_id)


def test_requires_imatrix_matches_ggml(oracle):
    for t, info in TYPES.items():
        assert bool(oracle.ggml().ggml_quantize_requires_imatrix(int(t))) == (info.imatrix is Imatrix.REQUIRED), t


def test_ids_and_names_match_gguf_py():
    ours = {t.name: int(t) for t in GGMLType}
    theirs = {t.name: int(t) for t in gguf.GGMLQuantizationType}
    assert {k: v for k, v in ours.items() if GGMLType[k] not in GGUF_PY_MISSING} == theirs
    for t in GGUF_PY_MISSING:
        assert t.name not in theirs and int(t) not in theirs.values()


def test_sizes_match_gguf_py_except_known_errors():
    for t, info in TYPES.items():
        if t in GGUF_PY_MISSING:
            assert int(t) not in {int(k) for k in gguf.GGML_QUANT_SIZES}
            continue
        theirs = tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))])
        if t in GGUF_PY_WRONG_SIZES:
            assert theirs == GGUF_PY_WRONG_SIZES[t] != (info.block_size, info.type_size)
        else:
            assert theirs == (info.block_size, info.type_size), t


def test_block_dtypes():
    for info in TYPES.values():
        assert info.block_dtype.itemsize == info.type_size, info.name
    # spot-check field offsets against ggml-common.h
    assert TYPES[GGMLType.Q4_K].block_dtype.fields["qs"][1] == 16
    assert TYPES[GGMLType.Q6_K].block_dtype.fields["d"][1] == 208
    assert TYPES[GGMLType.Q8_K].block_dtype.fields["bsums"][1] == 260
    assert TYPES[GGMLType.Q5_0].block_dtype.fields["qs"][1] == 6


def _llama_quant_source() -> str:
    import oracle

    root = oracle.vendor_llama_cpp()
    path = root / "src" / "llama-quant.cpp"
    assert path.exists(), f"llama.cpp source tree lacks {path}"
    return path.read_text()


def test_fallback_matches_llama_quant_tensor_type_fallback():
    src = _llama_quant_source()
    body = src[src.index("static ggml_type tensor_type_fallback"):]
    body = body[body.index("switch (target_type)"): body.index("default:")]
    expected: dict[str, str] = {}
    pending: list[str] = []
    for m in re.finditer(r"case GGML_TYPE_(\w+):|return_type = GGML_TYPE_(\w+);", body):
        if m.group(1):
            pending.append(m.group(1))
        else:
            expected.update({name: m.group(2) for name in pending})
            pending = []
    assert len(expected) >= 13 and not pending
    for t, info in TYPES.items():
        want = expected.get(t.name)
        got = info.fallback.name if info.fallback is not None else None
        # not in the switch: a <= 32-block type keeps its type (then F16); others have no fallback (ggml throws)
        assert got == want, t


def test_type_info_lookups():
    info = TYPES[GGMLType.Q4_0]
    for key in ("Q4_0", "q4_0", " Q4_0 ", 2, GGMLType.Q4_0, gguf.GGMLQuantizationType.Q4_0, info, np.int32(2)):
        assert type_info(key) is info, key
    assert gguf_kquant.type_info("bf16").id == 30
    assert type_info("Q4_K").bits_per_weight == 4.5
    assert TYPES[GGMLType.Q6_K].row_bytes(512) == 420
    assert TYPES[GGMLType.Q4_0].nbytes((3, 64)) == 3 * 2 * 18


@pytest.mark.parametrize("bad", ["Q4_3", "", "float32", 4, 31, 99, -1, None, 2.5j])
def test_unknown_types(bad):
    with pytest.raises(UnknownTypeError):
        type_info(bad)


def test_kernel_lookup_errors():
    with pytest.raises(UnknownTypeError, match="needs an importance matrix"):
        type_info("IQ2_XXS").kernel("quantize")
    with pytest.raises(UnknownTypeError, match="no importance-matrix quantizer"):
        type_info("F16").kernel("quantize_imatrix")
    with pytest.raises(UnknownTypeError, match="no codec"):
        type_info("I32").kernel("dequantize")
    with pytest.raises(ValueError, match="unknown kernel operation"):
        type_info("Q8_0").kernel("encode")
    assert callable(type_info("Q8_0").kernel("dequantize"))
    assert isinstance(type_info("q8_0"), TypeInfo)


@pytest.mark.parametrize("row", [r for r in TYPES.values() if r.codec], ids=lambda r: r.name)
def test_every_row_has_its_registered_kernels(row):
    """Importing the modules a row names registers exactly the kernels the row says it has."""
    for op in row.ops:
        assert callable(row.kernel(op)), (row.name, op)
    registered = {op for (t, op) in types_module._KERNELS if t is row.ggml_type}
    assert registered == set(row.ops), row.name


def test_rows_without_codec_are_the_integer_and_f64_types():
    assert {r.name for r in TYPES.values() if not r.codec} == {"I8", "I16", "I32", "I64", "F64"}


def test_registration_is_checked():
    def quantize_fake(x, out):
        pass

    quantize_fake.__module__ = "gguf_kquant.codecs.elsewhere"
    with pytest.raises(ImportError, match="whose row names"):
        register_kernel("Q4_K", "quantize")(quantize_fake)
    quantize_fake.__module__ = "gguf_kquant.codecs.legacy"
    with pytest.raises(ImportError, match="whose row has only"):
        register_kernel("Q8_0", "quantize_imatrix")(quantize_fake)
    quantize_fake.__module__ = "gguf_kquant.codecs.kquants"
    type_info("Q4_K").kernel("quantize")
    with pytest.raises(ImportError, match="two quantize kernels"):
        register_kernel("Q4_K", "quantize")(quantize_fake)


def test_field_offsets_come_from_the_block_dtype():
    assert type_info("Q4_K").field_offset("qs") == 16
    assert type_info("Q2_K").field_offset("d") == 80
    assert type_info("IQ4_XS").field_offset("qs") == 8
