"""Numeric helpers shared by the codec kernels, ported from ggml (ggml-impl.h, ggml-quants.c).

Everything here is ``@njit(cache=True, nogil=True)`` without fastmath: bit-exactness with ggml needs IEEE
float32 evaluation in C's order.  C float literals are float32, so literals are wrapped in ``np.float32``
wherever the C code computes in float; a bare Python float would widen the arithmetic to float64.

Ownership while the codec families are being written (append only, never rewrite another's function):
  fp16/bf16 conversion, nearest_int ............ initial skeleton
  make_qx_quants, make_q3_quants, make_qkx2_quants, get_scale_min_k4 ... k-quant reference port
  make_qkx3_quants, make_qp_quants ............. importance-matrix (_impl) port
"""

from __future__ import annotations

import numpy as np
from numba import njit

# ---------------------------------------------------------------------------------------------------
# fp16 <-> fp32   (ggml_compute_fp32_to_fp16 / ggml_compute_fp16_to_fp32, ggml-impl.h)
#
#   fp16 bits:  [15] sign | [14:10] exponent (bias 15) | [9:0] mantissa
#   fp32 bits:  [31] sign | [30:23] exponent (bias 127) | [22:0] mantissa
# Rounding is to nearest, ties to even; NaN becomes 0x7E00 (with the sign); overflow becomes +-inf.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def fp32_to_fp16_bits(f):
    """float32 -> uint16 bits of the nearest fp16 (ggml_compute_fp32_to_fp16, bit for bit)."""
    f = np.float32(f)
    scale_to_inf = np.uint32(0x77800000).view(np.float32)  # 0x1.0p+112f
    scale_to_zero = np.uint32(0x08800000).view(np.float32)  # 0x1.0p-110f
    base = (np.float32(abs(f)) * scale_to_inf) * scale_to_zero
    w = f.view(np.uint32)
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(np.float32) + base
    bits = np.float32(base).view(np.uint32)
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@njit(cache=True, nogil=True)
def fp16_bits_to_fp32(h):
    """uint16 fp16 bits -> float32 (ggml_compute_fp16_to_fp32; exact)."""
    w = np.uint32(h) << np.uint32(16)
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w + w)
    exp_offset = np.uint32(0xE0) << np.uint32(23)
    exp_scale = np.uint32(0x7800000).view(np.float32)  # 0x1.0p-112f
    normalized_value = np.uint32((two_w >> np.uint32(4)) + exp_offset).view(np.float32) * exp_scale
    magic_mask = np.uint32(126) << np.uint32(23)
    magic_bias = np.float32(0.5)
    denormalized_value = np.uint32((two_w >> np.uint32(17)) | magic_mask).view(np.float32) - magic_bias
    denormalized_cutoff = np.uint32(1) << np.uint32(27)
    if two_w < denormalized_cutoff:
        result = sign | np.float32(denormalized_value).view(np.uint32)
    else:
        result = sign | np.float32(normalized_value).view(np.uint32)
    return np.uint32(result).view(np.float32)


@njit(cache=True, nogil=True)
def fp16_round(f):
    """The float32 value ggml gets back after storing ``f`` as fp16 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f)))."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(f))


@njit(cache=True, nogil=True)
def store_fp16(out, pos, f):
    """Write ``f`` as little-endian fp16 into the uint8 array ``out`` at byte ``pos``."""
    h = fp32_to_fp16_bits(f)
    out[pos] = np.uint8(h & np.uint16(0xFF))
    out[pos + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True, nogil=True)
def load_fp16(raw, pos):
    """Read little-endian fp16 at byte ``pos`` of the uint8 array ``raw`` as float32."""
    return fp16_bits_to_fp32(np.uint16(raw[pos]) | (np.uint16(raw[pos + 1]) << np.uint16(8)))


# ---------------------------------------------------------------------------------------------------
# bf16 <-> fp32   (ggml_compute_fp32_to_bf16 / ggml_compute_bf16_to_fp32)
#   bf16 = the upper 16 bits of fp32; rounding to nearest even on the bit pattern; NaN forced quiet.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def fp32_to_bf16_bits(f):
    u = np.float32(f).view(np.uint32)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@njit(cache=True, nogil=True)
def bf16_bits_to_fp32(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# nearest_int (ggml-quants.c): round half to even through the float32 mantissa.
#   Adding 1.5 * 2^23 (12582912.f) pushes the fraction out of the mantissa with the FPU's
#   round-to-nearest-even; the low 22 bits then hold the integer offset by 2^22.
#   Valid for |fval| <= 4194303 (ggml asserts this).
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def nearest_int(fval):
    val = np.float32(np.float32(fval) + np.float32(12582912.0))
    i = np.int32(val.view(np.int32))
    return np.int32((i & np.int32(0x007FFFFF)) - np.int32(0x00400000))
