"""Float (F32/F16/BF16) and legacy (Q4_0..Q8_1) kernels: the cases the shared oracle harness does not reach.

tests/test_codecs_oracle.py checks every type against ggml on the corpus, hypothesis rows and random blocks;
here: the degenerate blocks of C's float->int casts, every fp16/bf16 bit pattern, NaN/Inf input to the float
kernels, Q8_1's fields (ggml has no Q8_1 dequantizer), read-only input and output bounds.
"""

from __future__ import annotations

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.types import type_info

QUANT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1"]
FLOAT_TYPES = ["F32", "F16", "BF16"]


def _ours_quantize(name, x):
    info = type_info(name)
    out = np.empty((x.shape[0], info.row_bytes(x.shape[1])), np.uint8)
    info.kernel("quantize")(x, out)
    return out


def _ours_dequantize(name, raw, n_per_row):
    out = np.empty((raw.shape[0], n_per_row), np.float32)
    type_info(name).kernel("dequantize")(raw, out)
    return out


def _ggml_quantize(oracle, name, x):
    if name == "Q8_1":  # not reachable through ggml_quantize_chunk; the row function is exported
        return oracle.quantize_row_symbol("quantize_row_q8_1_ref", 9, x)
    return oracle.quantize_chunk(type_info(name).id, x)


def _assert_same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = np.nonzero(a.view(np.uint8).reshape(a.shape[0], -1) != b.view(np.uint8).reshape(b.shape[0], -1))
    assert diff[0].size == 0, f"first difference at row {diff[0][0]}, byte {diff[1][0]}"


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_degenerate_blocks(oracle, name):
    """Blocks where ggml's 1/d overflows to inf (subnormal d), C's float->int8 casts of inf/NaN, ties."""
    x = np.zeros((6, 32), np.float32)
    x[0] = np.float32(1e-39) * np.arange(-16, 16, dtype=np.float32)  # id = inf, 0*inf = NaN
    x[1] = np.float32(1e-39) * np.arange(32, dtype=np.float32)  # id finite but huge
    x[2] = np.arange(-16, 16, dtype=np.float32) + np.float32(0.5)  # rounding ties
    x[3, 5] = np.float32(1.4e-45)  # a single smallest subnormal
    x[4] = np.float32(-127.0)
    x[4, ::2] = np.arange(16, dtype=np.float32) + np.float32(0.5)  # Q8_0 ties at d = 1
    x[5] = np.finfo(np.float32).max * np.float32(0.5)
    x[5, ::3] *= -1  # max - min overflows to inf in Q4_1/Q5_1
    _assert_same_bits(_ours_quantize(name, x), _ggml_quantize(oracle, name, x))


def test_float_kernels_all_fp16_and_bf16_patterns(oracle):
    raw = np.arange(65536, dtype=np.uint32).astype("<u2").view(np.uint8).reshape(256, 512)
    for name in ("F16", "BF16"):
        _assert_same_bits(_ours_dequantize(name, raw, 256), oracle.to_float(type_info(name).id, raw, 256))


def test_float_kernels_nan_inf_subnormal_quantize(oracle):
    """Every 4099th fp32 bit pattern plus the edge cases: NaN payloads, +-inf, fp16/bf16 rounding boundaries."""
    special = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0xFF800001, 0x00000001, 0x80000001,
               0x007FFFFF, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x33000000, 0x33000001, 0x387FC000, 0x38800000,
               0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00000000, 0x80000000]
    bits = np.concatenate([np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32), np.array(special, np.uint32)])
    bits = bits[: bits.size // 256 * 256]
    bits[: len(special)] = special
    x = bits.view(np.float32).reshape(-1, 256)
    x.setflags(write=False)
    for name in FLOAT_TYPES:
        _assert_same_bits(_ours_quantize(name, x), oracle.quantize_chunk(type_info(name).id, x))
        raw = oracle.quantize_chunk(type_info(name).id, x)
        _assert_same_bits(_ours_dequantize(name, raw, 256), oracle.to_float(type_info(name).id, raw, 256))


def test_f16_quantize_matches_numpy_rounding():
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32) * 1000
    np.testing.assert_array_equal(_ours_quantize("F16", x).view("<f2"), x.astype(np.float16))


def test_q8_1_s_field_is_d_times_sum():
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
    blocks = _ours_quantize("Q8_1", x).reshape(-1).view(type_info("Q8_1").block_dtype)
    total = blocks["qs"].astype(np.int32).sum(axis=1).astype(np.float32)
    d = np.abs(x).reshape(-1, 32).max(axis=1) / np.float32(127)  # the float32 d, before its fp16 rounding
    np.testing.assert_array_equal(blocks["s"], (total * d).astype(np.float16))


def test_kernels_write_only_their_rows():
    # the drivers must not touch bytes outside out; check with a guard-padded buffer
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    for name in QUANT_TYPES:
        rb = type_info(name).row_bytes(64)
        buf = np.full((7, rb), 0xAB, np.uint8)
        type_info(name).kernel("quantize")(x, buf[1:6])
        assert (buf[0] == 0xAB).all() and (buf[6] == 0xAB).all()
        np.testing.assert_array_equal(buf[1:6], gguf_kquant.quantize(x, name))


@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_kernels_accept_read_only_input(oracle, name):
    # memory-mapped tensors are read-only: a separate numba specialization of every kernel
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    x.setflags(write=False)
    q = _ours_quantize(name, x)
    _assert_same_bits(q, _ggml_quantize(oracle, name, x))
    q.setflags(write=False)
    _assert_same_bits(_ours_dequantize(name, q, 256), _ours_dequantize(name, q.copy(), 256))


def test_q8_1_dequantize_is_d_times_q():
    # ggml-base has no to_float for Q8_1 (the oracle harness skips it): the format's meaning is x = d * q
    raw = np.random.default_rng(6).integers(0, 256, (4, 8 * type_info("Q8_1").type_size), dtype=np.uint8)
    blocks = raw.reshape(-1).view(type_info("Q8_1").block_dtype)
    blocks["d"] = np.random.default_rng(7).standard_normal(blocks.size).astype(np.float16)
    ref = (blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)).reshape(4, 256)
    _assert_same_bits(_ours_dequantize("Q8_1", raw, 256), ref)
