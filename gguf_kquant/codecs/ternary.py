"""Ternary codecs for BitNet b1.58 / TriLM weights: TQ1_0 and TQ2_0 (ggml-quants.c, "Ternary (de)-quantization").

Ports of ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` and ``dequantize_row_tq1_0`` /
``dequantize_row_tq2_0``, bit for bit.  Every element becomes a trit t = round(x / d) in {-1, 0, 1} with
d = max |x| of the 256-element block; ggml has no importance-matrix variant (``quantize_tq*_0`` ignore it).

C's ``lroundf`` returns a ``long`` that is stored in an ``int``.  For a subnormal block maximum ``1.0f/d`` is
inf and ``x * id`` inf or NaN; glibc's lroundf then returns LONG_MIN, whose low 32 bits are 0, so the trit
is 0 — :func:`_trit` reproduces that.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK_K, TYPES, GGMLType, register_kernel

from .chunks import run_chunks
from .helpers import load_fp16, store_fp16

_F32 = np.float32
_U = np.uint64  # unsigned indices: no negative-index wraparound, so LLVM can vectorize the loops

_TQ1 = TYPES[GGMLType.TQ1_0]
_TQ1_BYTES = _TQ1.type_size
_TQ1_QS = _TQ1.field_offset("qs")
_TQ1_QH = _TQ1.field_offset("qh")
_TQ1_D = _TQ1.field_offset("d")
_TQ1_NQS = _TQ1.block_dtype.fields["qs"][0].shape[0]  # 48: 32 bytes of 5 trits by 32, then 16 by 16
_TQ1_NQH = _TQ1.block_dtype.fields["qh"][0].shape[0]  # 4: the last 16 elements, 4 trits per byte
_TQ1_N32 = _TQ1_NQS - _TQ1_NQS % 32  # bytes in the "along 32 bytes" part

_TQ2 = TYPES[GGMLType.TQ2_0]
_TQ2_BYTES = _TQ2.type_size
_TQ2_QS = _TQ2.field_offset("qs")
_TQ2_D = _TQ2.field_offset("d")
_TQ2_NQS = _TQ2.block_dtype.fields["qs"][0].shape[0]  # 64


@njit(cache=True, nogil=True, inline="always")
def _trit(v):
    """``(int)lroundf(v) + 1`` for v = x * id: 0, 1, 2 for -1, 0, +1 (inf/NaN: glibc LONG_MIN -> (int) 0 -> 1)."""
    if not (v > _F32(-2147483648.0) and v < _F32(2147483648.0)):
        return np.int32(1)  # only inf/NaN reach here: |x * id| <= ~1 whenever id is finite
    t = _F32(np.trunc(v))  # round half away from zero
    if abs(v - t) >= _F32(0.5):
        t = t + (_F32(1.0) if v > _F32(0.0) else _F32(-1.0))
    return np.int32(t) + np.int32(1)


@njit(cache=True, nogil=True, inline="always")
def _block_absmax(x, base):
    amax = _F32(0.0)
    for j in range(QK_K):
        amax = max(amax, abs(x[base + j]))  # MAX(amax, fabsf(v))
    return amax


@njit(cache=True, nogil=True, inline="always")
def _ceil_div_243(q):
    """``((uint16_t)q * 256 + (243 - 1)) / 243``: the base-3 number q as a fraction of 256 (rounded up)."""
    return np.uint8(((q & 0xFF) * 256 + 242) // 243)


@njit(cache=True, nogil=True, inline="always")
def _trit_of(byte, pow3):
    """Trit n (n-th most significant) of a TQ1_0 byte, minus 1: ``((uint8_t)(q * 3^n) * 3) >> 8`` - 1.

    Evaluated in float32, exact (q * 3 < 2^24 and 3/256 is a power-of-two fraction): the int -> float
    conversion then vectorizes across bytes instead of running in 64-bit integer lanes.
    """
    q = _F32(np.uint8(np.uint32(byte) * np.uint32(pow3)))
    return _F32(np.floor(q * _F32(3.0 / 256.0))) - _F32(1.0)


# ---------------------------------------------------------------------------------------------------
# TQ1_0 — block_tq1_0, 54 bytes, 256 elements: x = d * t, t in {-1, 0, 1}
#
#   byte  0..31   qs[m]       5 trits: x[m + 32n],        n = 0..4 (n = 0 most significant)
#   byte 32..47   qs[32 + m]  5 trits: x[160 + m + 16n],  n = 0..4
#   byte 48..51   qh[j]       4 trits: x[240 + j + 4n],   n = 0..3, then one more *3 (a zero trit last)
#   byte 52..53   d           fp16
# A byte holding the base-3 number q (trits t+1) stores ceil(q * 256 / 243): trit n is then the top
# base-3 digit of the byte times 3^n, read back with one multiply and shift.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_tq1_0_ref(x, y):
    nb = x.shape[0] // QK_K
    for i in range(nb):
        base = i * QK_K
        d = _block_absmax(x, base)
        idd = _F32(_F32(1.0) / d) if d != _F32(0.0) else _F32(0.0)
        o = i * _TQ1_BYTES
        store_fp16(y, o + _TQ1_D, d)
        for m in range(32):  # along 32 bytes
            q = 0
            for n in range(5):
                q = q * 3 + _trit(_F32(x[base + m + 32 * n] * idd))
            y[o + _TQ1_QS + m] = _ceil_div_243(q)
        xb = base + 5 * 32
        for m in range(16):  # along 16 bytes
            q = 0
            for n in range(5):
                q = q * 3 + _trit(_F32(x[xb + m + 16 * n] * idd))
            y[o + _TQ1_QS + _TQ1_N32 + m] = _ceil_div_243(q)
        xb += 5 * 16
        for j in range(_TQ1_NQH):  # 4 elements per byte
            q = 0
            for m in range(4):
                q = q * 3 + _trit(_F32(x[xb + j + m * _TQ1_NQH] * idd))
            y[o + _TQ1_QH + j] = _ceil_div_243(q * 3)  # shift the first trit to the most significant place


@njit(cache=True, nogil=True, inline="always")
def _dequantize_tq1_0_bytes(raw, qo, count, y, yb, d):
    """The 5 trits of ``count`` consecutive qs bytes: trit n of byte m -> y[yb + count*n + m]."""
    # one pass over the bytes with the 5 stores unrolled: the m loop vectorizes (constant multipliers)
    c = _U(count)
    for mm in range(count):
        m = _U(mm)
        b = raw[qo + m]
        y[yb + m] = _trit_of(b, 1) * d
        y[yb + c + m] = _trit_of(b, 3) * d
        y[yb + _U(2) * c + m] = _trit_of(b, 9) * d
        y[yb + _U(3) * c + m] = _trit_of(b, 27) * d
        y[yb + _U(4) * c + m] = _trit_of(b, 81) * d


@njit(cache=True, nogil=True)
def dequantize_row_tq1_0(raw, y):
    nb = y.shape[0] // QK_K
    nqh = _U(_TQ1_NQH)
    for i in range(nb):
        o = _U(i * _TQ1_BYTES)
        d = load_fp16(raw, o + _U(_TQ1_D))
        yb = _U(i * QK_K)
        _dequantize_tq1_0_bytes(raw, o + _U(_TQ1_QS), 32, y, yb, d)
        _dequantize_tq1_0_bytes(raw, o + _U(_TQ1_QS + _TQ1_N32), 16, y, yb + _U(5 * 32), d)
        yb += _U(5 * 32 + 5 * 16)
        for jj in range(_TQ1_NQH):  # qh: 4 trits per byte, trit n of byte j -> y[yb + 4n + j]
            j = _U(jj)
            b = raw[o + _U(_TQ1_QH) + j]
            y[yb + j] = _trit_of(b, 1) * d
            y[yb + nqh + j] = _trit_of(b, 3) * d
            y[yb + _U(2) * nqh + j] = _trit_of(b, 9) * d
            y[yb + _U(3) * nqh + j] = _trit_of(b, 27) * d


# ---------------------------------------------------------------------------------------------------
# TQ2_0 — block_tq2_0, 66 bytes, 256 elements: x = d * t, t in {-1, 0, 1} (stored t + 1 in 2 bits)
#
#   byte  0..63   qs[32h + m]  bits 2n..2n+1 = t[128h + m + 32n] + 1     (h = 0, 1; m = 0..31; n = 0..3)
#   byte 64..65   d            fp16
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_tq2_0_ref(x, y):
    nb = x.shape[0] // QK_K
    for i in range(nb):
        base = i * QK_K
        d = _block_absmax(x, base)
        idd = _F32(_F32(1.0) / d) if d != _F32(0.0) else _F32(0.0)
        o = i * _TQ2_BYTES
        store_fp16(y, o + _TQ2_D, d)
        for j in range(0, _TQ2_NQS, 32):
            xb = base + 4 * j
            for m in range(32):
                q = 0
                for n in range(4):
                    q += (_trit(_F32(x[xb + m + 32 * n] * idd)) & 3) << (2 * n)
                y[o + _TQ2_QS + j + m] = np.uint8(q & 0xFF)


@njit(cache=True, nogil=True)
def dequantize_row_tq2_0(raw, y):
    nb = y.shape[0] // QK_K
    for i in range(nb):
        o = _U(i * _TQ2_BYTES)
        d = load_fp16(raw, o + _U(_TQ2_D))
        for h in range(_TQ2_NQS // 32):
            yb = _U(i * QK_K + 128 * h)
            qo = o + _U(_TQ2_QS + 32 * h)
            for mm in range(32):  # the 4 stores unrolled: the m loop vectorizes
                m = _U(mm)
                b = np.int32(raw[qo + m])
                y[yb + m] = _F32((b & 3) - 1) * d
                y[yb + _U(32) + m] = _F32(((b >> 2) & 3) - 1) * d
                y[yb + _U(64) + m] = _F32(((b >> 4) & 3) - 1) * d
                y[yb + _U(96) + m] = _F32(((b >> 6) & 3) - 1) * d


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers (the codec convention of gguf_kquant.types)
# ---------------------------------------------------------------------------------------------------


@register_kernel("TQ1_0", "quantize")
def quantize_tq1_0(x, out):
    run_chunks(_quantize_tq1_0_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_tq1_0_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_tq1_0_ref(x[r], out[r])


@register_kernel("TQ1_0", "dequantize")
def dequantize_tq1_0(raw, out):
    run_chunks(_dequantize_tq1_0_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_tq1_0_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_tq1_0(raw[r], out[r])


@register_kernel("TQ2_0", "quantize")
def quantize_tq2_0(x, out):
    run_chunks(_quantize_tq2_0_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_tq2_0_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_tq2_0_ref(x[r], out[r])


@register_kernel("TQ2_0", "dequantize")
def dequantize_tq2_0(raw, out):
    run_chunks(_dequantize_tq2_0_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_tq2_0_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_tq2_0(raw[r], out[r])
