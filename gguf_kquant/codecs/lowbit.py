"""1- and 2-bit scalar codecs: Q1_0 and Q2_0 (ggml-quants.c, start of the file).

Ports of ``quantize_row_q1_0_ref`` / ``quantize_row_q2_0_ref`` and ``dequantize_row_q1_0`` /
``dequantize_row_q2_0``, bit for bit.  ggml has no importance-matrix variant: ``quantize_q1_0`` /
``quantize_q2_0`` run the ``_ref`` function whether or not ``quant_weights`` is given.

Float rules as in :mod:`gguf_kquant.codecs.legacy`: float32 in C's order, no FMA.  Q2_0's ``1.0f/d`` is inf
for a subnormal ``d``; ``(int)roundf(inf or NaN)`` is x86's INT32_MIN, which the clamp turns into q = 0.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import TYPES, GGMLType, register_kernel

from .chunks import run_chunks
from .helpers import load_fp16, store_fp16

_F32 = np.float32
_U = np.uint64  # unsigned indices: no negative-index wraparound, so LLVM can vectorize the loops

_Q1 = TYPES[GGMLType.Q1_0]
QK1_0 = _Q1.block_size
_Q1_BYTES = _Q1.type_size
_Q1_D = _Q1.field_offset("d")
_Q1_QS = _Q1.field_offset("qs")

_Q2 = TYPES[GGMLType.Q2_0]
QK2_0 = _Q2.block_size
_Q2_BYTES = _Q2.type_size
_Q2_D = _Q2.field_offset("d")
_Q2_QS = _Q2.field_offset("qs")


# ---------------------------------------------------------------------------------------------------
# Q1_0 — block_q1_0, 18 bytes, 128 elements: x = +d if the bit is set else -d;  d = mean(|x|)
#
#   byte  0..1   d   fp16
#   byte  2..17  qs  bit (j % 8) of qs[j / 8] = (x[j] >= 0)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_q1_0_ref(x, y):
    nb = x.shape[0] // QK1_0
    for i in range(nb):
        base = i * QK1_0
        sum_abs = _F32(0.0)
        for j in range(QK1_0):
            sum_abs = _F32(sum_abs + abs(x[base + j]))
        d = _F32(sum_abs / _F32(QK1_0))
        o = i * _Q1_BYTES
        store_fp16(y, o + _Q1_D, d)
        for b in range(QK1_0 // 8):
            byte = 0
            for k in range(8):
                if x[base + 8 * b + k] >= _F32(0.0):
                    byte |= 1 << k
            y[o + _Q1_QS + b] = np.uint8(byte)


@njit(cache=True, nogil=True)
def dequantize_row_q1_0(raw, y):
    nb = y.shape[0] // QK1_0
    for i in range(nb):
        o = _U(i * _Q1_BYTES)
        d = load_fp16(raw, o + _U(_Q1_D))
        neg_d = -d
        base = _U(i * QK1_0)
        for b in range(QK1_0 // 8):
            byte = raw[o + _U(_Q1_QS + b)]
            for k in range(8):
                y[base + _U(8 * b + k)] = d if (byte >> np.uint8(k)) & np.uint8(1) else neg_d


# ---------------------------------------------------------------------------------------------------
# Q2_0 — block_q2_0, 18 bytes, 64 elements: x = d * (q - 1), q in 0..3;  d = max |x|
#
#   byte  0..1   d   fp16
#   byte  2..17  qs  qs[j / 4] bits 2*(j % 4) .. 2*(j % 4) + 1 = q[j]      (00 -d, 01 0, 10 +d, 11 +2d)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _q2_0_level(v):
    """``clamp((int)roundf(v) + 1, 0, 3)`` with x86's float->int on inf/NaN (INT32_MIN, so 0)."""
    if not (v > _F32(-2147483648.0) and v < _F32(2147483648.0)):
        return 0
    t = _F32(np.trunc(v))  # roundf: half away from zero
    if abs(v - t) >= _F32(0.5):
        t = t + (_F32(1.0) if v > _F32(0.0) else _F32(-1.0))
    return min(3, max(0, np.int32(t) + 1))


@njit(cache=True, nogil=True)
def quantize_row_q2_0_ref(x, y):
    nb = x.shape[0] // QK2_0
    for i in range(nb):
        base = i * QK2_0
        amax = _F32(0.0)
        for j in range(QK2_0):
            a = abs(x[base + j])
            if a > amax:
                amax = a
        d = amax
        idd = _F32(_F32(1.0) / d) if d > _F32(0.0) else _F32(0.0)
        o = i * _Q2_BYTES
        store_fp16(y, o + _Q2_D, d)
        for b in range(QK2_0 // 4):
            byte = 0
            for k in range(4):
                byte |= _q2_0_level(_F32(x[base + 4 * b + k] * idd)) << (2 * k)
            y[o + _Q2_QS + b] = np.uint8(byte)


@njit(cache=True, nogil=True)
def dequantize_row_q2_0(raw, y):
    nb = y.shape[0] // QK2_0
    for i in range(nb):
        o = _U(i * _Q2_BYTES)
        d = load_fp16(raw, o + _U(_Q2_D))
        base = _U(i * QK2_0)
        for b in range(QK2_0 // 4):
            byte = np.int32(raw[o + _U(_Q2_QS + b)])
            for k in range(4):
                y[base + _U(4 * b + k)] = _F32(((byte >> (2 * k)) & 3) - 1) * d


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers (the codec convention of gguf_kquant.types)
# ---------------------------------------------------------------------------------------------------


@register_kernel("Q1_0", "quantize")
def quantize_q1_0(x, out):
    run_chunks(_quantize_q1_0_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q1_0_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q1_0_ref(x[r], out[r])


@register_kernel("Q1_0", "dequantize")
def dequantize_q1_0(raw, out):
    run_chunks(_dequantize_q1_0_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q1_0_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q1_0(raw[r], out[r])


@register_kernel("Q2_0", "quantize")
def quantize_q2_0(x, out):
    run_chunks(_quantize_q2_0_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q2_0_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q2_0_ref(x[r], out[r])


@register_kernel("Q2_0", "dequantize")
def dequantize_q2_0(raw, out):
    run_chunks(_dequantize_q2_0_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q2_0_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q2_0(raw[r], out[r])
