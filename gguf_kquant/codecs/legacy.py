"""Legacy 32-element block codecs: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 (ggml-quants.c, first section).

Ports of ``quantize_row_<type>_ref`` (what ``ggml_quantize_chunk`` runs without an importance matrix) and
``dequantize_row_<type>``, bit for bit:

* every ``float`` expression of the C code is evaluated in float32 (literals wrapped in ``np.float32``), in
  C's order, without FMA contraction (no fastmath);
* ``1.0f/d`` can overflow to inf when ``d`` is subnormal; ``x*id`` is then inf or NaN and C's float->int8
  cast goes through x86's ``cvttss2si`` (NaN / out of range -> INT32_MIN) and keeps the low byte.
  :func:`_cvt_i32` reproduces that, so even those degenerate blocks match ggml byte for byte;
* Q8_0/Q8_1 round with ``roundf`` (half away from zero), Q4/Q5 with ``(int)(v + 0.5f)`` truncation.

Not reproduced: which NaN payload ``q*d + m`` returns when both ``q*d`` and ``m`` are NaN (Q4_1/Q5_1 blocks
whose fp16 scales are NaN — never written by a quantizer); IEEE leaves it open and compilers commute the add.

Each public function follows the codec convention of :mod:`gguf_kquant.types`: ``quantize_<t>(x, out)`` with
``x`` float32 (n_rows, n_per_row) (may be read-only) and ``out`` uint8 (n_rows, row_bytes);
``dequantize_<t>(raw, out)`` the reverse.  Drivers run rows in parallel; per-row kernels are serial, so
results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import TYPES, GGMLType, register_kernel

from .chunks import run_chunks
from .helpers import load_fp16, pack_q5_0_pair, store_fp16, store_u32

# Block sizes and field offsets, from the type table (layouts drawn at each codec below).  Shared with
# legacy_imatrix; numba compiles them in as constants.
_T = {name: TYPES[GGMLType[name]] for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1")}
QK = _T["Q4_0"].block_size  # elements per block, the same for every type in this module
assert all(t.block_size == QK for t in _T.values())
Q4_0_BYTES = _T["Q4_0"].type_size
Q4_0_D, Q4_0_QS = (_T["Q4_0"].field_offset(f) for f in ("d", "qs"))
Q4_1_BYTES = _T["Q4_1"].type_size
Q4_1_D, Q4_1_M, Q4_1_QS = (_T["Q4_1"].field_offset(f) for f in ("d", "m", "qs"))
Q5_0_BYTES = _T["Q5_0"].type_size
Q5_0_D, Q5_0_QH, Q5_0_QS = (_T["Q5_0"].field_offset(f) for f in ("d", "qh", "qs"))
Q5_1_BYTES = _T["Q5_1"].type_size
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = (_T["Q5_1"].field_offset(f) for f in ("d", "m", "qh", "qs"))
Q8_0_BYTES = _T["Q8_0"].type_size
Q8_0_D, Q8_0_QS = (_T["Q8_0"].field_offset(f) for f in ("d", "qs"))
Q8_1_BYTES = _T["Q8_1"].type_size
Q8_1_D, Q8_1_S, Q8_1_QS = (_T["Q8_1"].field_offset(f) for f in ("d", "s", "qs"))

_F32 = np.float32
_U = np.uint64
_INT32_MIN = np.int32(-2147483648)

# _PAIRS_NOTE — why some dequantizers decode two blocks per iteration with unsigned (np.uint64) indices:
# numba cannot mark arrays noalias (C's GGML_RESTRICT), so LLVM only vectorizes a loop it keeps as a loop
# (adding a runtime overlap check).  A 16/32-iteration loop over one block is fully unrolled first and the
# unrolled code stays scalar; two blocks per iteration make the body too large to unroll.  Signed indices
# carry numba's negative-index wraparound, which also blocks vectorization.  Same floats, ~2x faster.


@njit(cache=True, nogil=True, inline="always")
def _cvt_i32(v):
    """C's float -> int conversion as x86 does it (cvttss2si): truncate; NaN or out of range -> INT32_MIN."""
    if v >= _F32(-2147483648.0) and v < _F32(2147483648.0):
        return np.int32(v)
    return _INT32_MIN


# 2^30: when every |x*id| of a block is below it, x*id + offset is inside int32 and C's cast is a plain
# truncation; _cast then skips _cvt_i32's range test (Q4_0: 1.89 -> 1.70 ms for 512 x 4096; Q4_1 and the
# Q5 types measured no faster that way and keep _cvt_i32).
_PLAIN_CAST_LIMIT = _F32(1073741824.0)


@njit(cache=True, nogil=True, inline="always")
def _plain_cast_ok(span, idd, has_nan):
    """Whether a block's casts are plain: no NaN, and |x*id| <= fl(span * |id|) < 2^30 (rounding is monotonic)."""
    return not has_nan and _F32(span * abs(idd)) < _PLAIN_CAST_LIMIT


@njit(cache=True, nogil=True, inline="always")
def _cast(v, plain):
    """C's (int) cast of v: a plain truncation when the block allows (see _plain_cast_ok), else _cvt_i32."""
    return np.int32(v) if plain else _cvt_i32(v)


@njit(cache=True, nogil=True, inline="always")
def _roundf(v):
    """C roundf: round half away from zero (exact in float32: v - trunc(v) is representable)."""
    t = np.float32(np.trunc(v))
    if abs(v - t) >= _F32(0.5):
        t = t + (_F32(1.0) if v > _F32(0.0) else _F32(-1.0))
    return t


@njit(cache=True, nogil=True, inline="always")
def _absmax_signed(x, base):
    """(amax, max, NaN seen): largest |v| of the block and the first value attaining it (quantize_row_q4_0_ref)."""
    amax = _F32(0.0)
    vmax = _F32(0.0)
    has_nan = False
    for j in range(QK):
        v = x[base + j]
        has_nan |= v != v
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return amax, vmax, has_nan


@njit(cache=True, nogil=True, inline="always")
def _minmax(x, base):
    vmin = np.finfo(np.float32).max
    vmax = -np.finfo(np.float32).max
    for j in range(QK):
        v = x[base + j]
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
    return vmin, vmax


@njit(cache=True, nogil=True, inline="always")
def _inverse(d):
    """``d ? 1.0f/d : 0.0f``."""
    return _F32(_F32(1.0) / d) if d != _F32(0.0) else _F32(0.0)


@njit(cache=True, nogil=True, inline="always")
def _load_u32(raw, pos):
    return (np.uint32(raw[pos]) | (np.uint32(raw[pos + 1]) << np.uint32(8))
            | (np.uint32(raw[pos + 2]) << np.uint32(16)) | (np.uint32(raw[pos + 3]) << np.uint32(24)))


# ---------------------------------------------------------------------------------------------------
# Q4_0 — block_q4_0, 18 bytes: x = d * (q - 8)
#
#   byte  0..1   d   fp16
#   byte  2..17  qs  qs[j] = q[j] | q[j + 16] << 4      (low nibble: first half of the block)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_q4_0_ref(x, y):
    nb = x.shape[0] // QK
    n16 = min(16, x.shape[0])  # == 16 at run time: a constant trip count is unrolled, not vectorized
    for i in range(nb):
        base = i * QK
        amax, vmax, has_nan = _absmax_signed(x, base)
        d = _F32(vmax / _F32(-8.0))
        idd = _inverse(d)
        plain = _plain_cast_ok(amax, idd, has_nan)
        o = i * Q4_0_BYTES
        store_fp16(y, o + Q4_0_D, d)
        for j in range(n16):
            x0 = _F32(x[base + j] * idd)
            x1 = _F32(x[base + 16 + j] * idd)
            # (int8_t)(x + 8.5f), then MIN(15, .) as signed, then uint8
            q0 = min(np.int32(15), np.int32(np.int8(_cast(_F32(x0 + _F32(8.5)), plain)))) & 0xFF
            q1 = min(np.int32(15), np.int32(np.int8(_cast(_F32(x1 + _F32(8.5)), plain)))) & 0xFF
            y[o + Q4_0_QS + j] = np.uint8((q0 | (q1 << 4)) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q4_0(raw, y, i):
    o = _U(i * Q4_0_BYTES)
    d = load_fp16(raw, o + _U(Q4_0_D))
    base = _U(i * QK)
    for jj in range(16):
        j = _U(jj)
        b = np.int32(raw[o + _U(Q4_0_QS) + j])
        y[base + j] = _F32((b & np.int32(0x0F)) - np.int32(8)) * d
        y[base + _U(16) + j] = _F32((b >> np.int32(4)) - np.int32(8)) * d


@njit(cache=True, nogil=True)
def dequantize_row_q4_0(raw, y):
    # Two blocks per iteration and unsigned indices: see _PAIRS_NOTE.
    nb = y.shape[0] // QK
    for p in range(nb // 2):
        o = _U(p * 2 * Q4_0_BYTES)
        d0 = load_fp16(raw, o + _U(Q4_0_D))
        d1 = load_fp16(raw, o + _U(Q4_0_BYTES + Q4_0_D))
        base = _U(p * 2 * QK)
        for jj in range(16):
            j = _U(jj)
            b = np.int32(raw[o + _U(Q4_0_QS) + j])
            c = np.int32(raw[o + _U(Q4_0_BYTES + Q4_0_QS) + j])
            y[base + j] = _F32((b & np.int32(0x0F)) - np.int32(8)) * d0
            y[base + _U(16) + j] = _F32((b >> np.int32(4)) - np.int32(8)) * d0
            y[base + _U(32) + j] = _F32((c & np.int32(0x0F)) - np.int32(8)) * d1
            y[base + _U(48) + j] = _F32((c >> np.int32(4)) - np.int32(8)) * d1
    if nb % 2:
        _dequantize_block_q4_0(raw, y, nb - 1)


# ---------------------------------------------------------------------------------------------------
# Q4_1 — block_q4_1, 20 bytes: x = d * q + m
#
#   byte  0..1   d   fp16
#   byte  2..3   m   fp16
#   byte  4..19  qs  qs[j] = q[j] | q[j + 16] << 4
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_q4_1_ref(x, y):
    nb = x.shape[0] // QK
    for i in range(nb):
        base = i * QK
        vmin, vmax = _minmax(x, base)
        d = _F32(_F32(vmax - vmin) / _F32(15.0))
        idd = _inverse(d)
        o = i * Q4_1_BYTES
        store_fp16(y, o + Q4_1_D, d)
        store_fp16(y, o + Q4_1_M, vmin)
        for j in range(16):
            x0 = _F32(_F32(x[base + j] - vmin) * idd)
            x1 = _F32(_F32(x[base + 16 + j] - vmin) * idd)
            q0 = min(np.int32(15), np.int32(np.int8(_cvt_i32(_F32(x0 + _F32(0.5)))))) & 0xFF
            q1 = min(np.int32(15), np.int32(np.int8(_cvt_i32(_F32(x1 + _F32(0.5)))))) & 0xFF
            y[o + Q4_1_QS + j] = np.uint8((q0 | (q1 << 4)) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q4_1(raw, y, i):
    o = _U(i * Q4_1_BYTES)
    d = load_fp16(raw, o + _U(Q4_1_D))
    m = load_fp16(raw, o + _U(Q4_1_M))
    base = _U(i * QK)
    for jj in range(16):
        j = _U(jj)
        b = np.int32(raw[o + _U(Q4_1_QS) + j])
        y[base + j] = _F32(_F32(b & np.int32(0x0F)) * d) + m
        y[base + _U(16) + j] = _F32(_F32(b >> np.int32(4)) * d) + m


@njit(cache=True, nogil=True)
def dequantize_row_q4_1(raw, y):
    # Two blocks per iteration and unsigned indices: see _PAIRS_NOTE.
    nb = y.shape[0] // QK
    for p in range(nb // 2):
        o = _U(p * 2 * Q4_1_BYTES)
        d0 = load_fp16(raw, o + _U(Q4_1_D))
        m0 = load_fp16(raw, o + _U(Q4_1_M))
        d1 = load_fp16(raw, o + _U(Q4_1_BYTES + Q4_1_D))
        m1 = load_fp16(raw, o + _U(Q4_1_BYTES + Q4_1_M))
        base = _U(p * 2 * QK)
        for jj in range(16):
            j = _U(jj)
            b = np.int32(raw[o + _U(Q4_1_QS) + j])
            c = np.int32(raw[o + _U(Q4_1_BYTES + Q4_1_QS) + j])
            y[base + j] = _F32(_F32(b & np.int32(0x0F)) * d0) + m0
            y[base + _U(16) + j] = _F32(_F32(b >> np.int32(4)) * d0) + m0
            y[base + _U(32) + j] = _F32(_F32(c & np.int32(0x0F)) * d1) + m1
            y[base + _U(48) + j] = _F32(_F32(c >> np.int32(4)) * d1) + m1
    if nb % 2:
        _dequantize_block_q4_1(raw, y, nb - 1)


# ---------------------------------------------------------------------------------------------------
# Q5_0 — block_q5_0, 22 bytes: x = d * (q - 16)
#
#   byte  0..1   d   fp16
#   byte  2..5   qh  uint32 LE; bit j = bit 4 of q[j]  (j = 0..31)
#   byte  6..21  qs  qs[j] = (q[j] & 15) | (q[j + 16] & 15) << 4
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_q5_0_ref(x, y):
    nb = x.shape[0] // QK
    for i in range(nb):
        base = i * QK
        _amax, vmax, _has_nan = _absmax_signed(x, base)
        d = _F32(vmax / _F32(-16.0))
        idd = _inverse(d)
        o = i * Q5_0_BYTES
        store_fp16(y, o + Q5_0_D, d)
        qh = np.uint32(0)
        for j in range(16):
            x0 = _F32(x[base + j] * idd)
            x1 = _F32(x[base + 16 + j] * idd)
            # (int8_t)(x + 16.5f), then MIN(31, .) as signed, then uint8
            q0 = min(np.int32(31), np.int32(np.int8(_cvt_i32(_F32(x0 + _F32(16.5))))))
            q1 = min(np.int32(31), np.int32(np.int8(_cvt_i32(_F32(x1 + _F32(16.5))))))
            qh |= pack_q5_0_pair(y, o + Q5_0_QS, j, q0, q1)
        store_u32(y, o + Q5_0_QH, qh)


@njit(cache=True, nogil=True)
def dequantize_row_q5_0(raw, y):
    nb = y.shape[0] // QK
    for i in range(nb):
        o = i * Q5_0_BYTES
        d = load_fp16(raw, o + Q5_0_D)
        qh = _load_u32(raw, o + Q5_0_QH)
        base = i * QK
        for j in range(16):
            b = np.uint32(raw[o + Q5_0_QS + j])
            h0 = ((qh >> np.uint32(j)) << np.uint32(4)) & np.uint32(0x10)
            h1 = (qh >> np.uint32(j + 12)) & np.uint32(0x10)
            y[base + j] = _F32(np.int32((b & np.uint32(0x0F)) | h0) - 16) * d
            y[base + 16 + j] = _F32(np.int32((b >> np.uint32(4)) | h1) - 16) * d


# ---------------------------------------------------------------------------------------------------
# Q5_1 — block_q5_1, 24 bytes: x = d * q + m
#
#   byte  0..1   d   fp16
#   byte  2..3   m   fp16
#   byte  4..7   qh  uint32 LE; bit j = bit 4 of q[j]
#   byte  8..23  qs  qs[j] = (q[j] & 15) | (q[j + 16] & 15) << 4
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_q5_1_ref(x, y):
    nb = x.shape[0] // QK
    for i in range(nb):
        base = i * QK
        vmin, vmax = _minmax(x, base)
        d = _F32(_F32(vmax - vmin) / _F32(31.0))
        idd = _inverse(d)
        o = i * Q5_1_BYTES
        store_fp16(y, o + Q5_1_D, d)
        store_fp16(y, o + Q5_1_M, vmin)
        qh = np.uint32(0)
        for j in range(16):
            x0 = _F32(_F32(x[base + j] - vmin) * idd)
            x1 = _F32(_F32(x[base + 16 + j] - vmin) * idd)
            # (uint8_t)(x + 0.5f): no MIN() here in ggml
            q0 = _cvt_i32(_F32(x0 + _F32(0.5)))
            q1 = _cvt_i32(_F32(x1 + _F32(0.5)))
            qh |= pack_q5_0_pair(y, o + Q5_1_QS, j, q0, q1)
        store_u32(y, o + Q5_1_QH, qh)


@njit(cache=True, nogil=True)
def dequantize_row_q5_1(raw, y):
    nb = y.shape[0] // QK
    for i in range(nb):
        o = i * Q5_1_BYTES
        d = load_fp16(raw, o + Q5_1_D)
        m = load_fp16(raw, o + Q5_1_M)
        qh = _load_u32(raw, o + Q5_1_QH)
        base = i * QK
        for j in range(16):
            b = np.uint32(raw[o + Q5_1_QS + j])
            h0 = ((qh >> np.uint32(j)) << np.uint32(4)) & np.uint32(0x10)
            h1 = (qh >> np.uint32(j + 12)) & np.uint32(0x10)
            y[base + j] = _F32(_F32(np.int32((b & np.uint32(0x0F)) | h0)) * d) + m
            y[base + 16 + j] = _F32(_F32(np.int32((b >> np.uint32(4)) | h1)) * d) + m


# ---------------------------------------------------------------------------------------------------
# Q8_0 — block_q8_0, 34 bytes: x = d * q
#
#   byte  0..1   d   fp16
#   byte  2..33  qs  int8 q[j]
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _absmax(x, base):
    amax = _F32(0.0)
    for j in range(QK):
        amax = max(amax, abs(x[base + j]))  # MAX(amax, fabsf(v))
    return amax


@njit(cache=True, nogil=True)
def quantize_row_q8_0_ref(x, y):
    nb = x.shape[0] // QK
    for i in range(nb):
        base = i * QK
        d = _F32(_absmax(x, base) / _F32(127.0))
        idd = _inverse(d)
        o = i * Q8_0_BYTES
        store_fp16(y, o + Q8_0_D, d)
        for j in range(QK):
            y[o + Q8_0_QS + j] = np.uint8(_cvt_i32(_roundf(_F32(x[base + j] * idd))) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_q8_blocks(raw, y, block_bytes, d_off, qs_off):
    """x = d * q for Q8_0 and Q8_1 (blocks of ``block_bytes`` with d and qs at the given offsets)."""
    # Two blocks per iteration and unsigned indices: see _PAIRS_NOTE.
    nb = y.shape[0] // QK
    bb = _U(block_bytes)
    do = _U(d_off)
    qo = _U(qs_off)
    for p in range(nb // 2):
        o = _U(p) * (bb + bb)
        d0 = load_fp16(raw, o + do)
        d1 = load_fp16(raw, o + bb + do)
        base = _U(p * 2 * QK)
        for jj in range(QK):
            j = _U(jj)
            y[base + j] = _F32(np.int8(raw[o + qo + j])) * d0
            y[base + _U(QK) + j] = _F32(np.int8(raw[o + bb + qo + j])) * d1
    if nb % 2:
        o = _U(nb - 1) * bb
        d = load_fp16(raw, o + do)
        base = _U((nb - 1) * QK)
        for jj in range(QK):
            j = _U(jj)
            y[base + j] = _F32(np.int8(raw[o + qo + j])) * d


@njit(cache=True, nogil=True)
def dequantize_row_q8_0(raw, y):
    _dequantize_q8_blocks(raw, y, Q8_0_BYTES, Q8_0_D, Q8_0_QS)


# ---------------------------------------------------------------------------------------------------
# Q8_1 — block_q8_1, 36 bytes: x = d * q; s = d * sum(q) (a matmul helper; llama-quantize never writes it)
#
#   byte  0..1   d   fp16
#   byte  2..3   s   fp16
#   byte  4..35  qs  int8 q[j]
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_q8_1_ref(x, y):
    nb = x.shape[0] // QK
    for i in range(nb):
        base = i * QK
        d = _F32(_absmax(x, base) / _F32(127.0))
        idd = _inverse(d)
        o = i * Q8_1_BYTES
        store_fp16(y, o + Q8_1_D, d)
        total = np.int32(0)
        for j in range(QK):
            q = np.int8(_cvt_i32(_roundf(_F32(x[base + j] * idd))))
            y[o + Q8_1_QS + j] = np.uint8(np.int32(q) & 0xFF)
            total += np.int32(q)
        store_fp16(y, o + Q8_1_S, _F32(_F32(total) * d))


@njit(cache=True, nogil=True)
def dequantize_row_q8_1(raw, y):
    # ggml-base has no dequantize_row_q8_1; the format's meaning is x = d * q (s is redundant)
    _dequantize_q8_blocks(raw, y, Q8_1_BYTES, Q8_1_D, Q8_1_QS)


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers (the codec convention)
# ---------------------------------------------------------------------------------------------------


@register_kernel("Q4_0", "quantize")
def quantize_q4_0(x, out):
    run_chunks(_quantize_q4_0_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q4_0_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q4_0_ref(x[r], out[r])


@register_kernel("Q4_1", "quantize")
def quantize_q4_1(x, out):
    run_chunks(_quantize_q4_1_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q4_1_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q4_1_ref(x[r], out[r])


@register_kernel("Q5_0", "quantize")
def quantize_q5_0(x, out):
    run_chunks(_quantize_q5_0_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q5_0_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q5_0_ref(x[r], out[r])


@register_kernel("Q5_1", "quantize")
def quantize_q5_1(x, out):
    run_chunks(_quantize_q5_1_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q5_1_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q5_1_ref(x[r], out[r])


@register_kernel("Q8_0", "quantize")
def quantize_q8_0(x, out):
    run_chunks(_quantize_q8_0_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q8_0_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q8_0_ref(x[r], out[r])


@register_kernel("Q8_1", "quantize")
def quantize_q8_1(x, out):
    run_chunks(_quantize_q8_1_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_q8_1_rows(x, out, r0, r1):
    for r in range(r0, r1):
        quantize_row_q8_1_ref(x[r], out[r])


@register_kernel("Q4_0", "dequantize")
def dequantize_q4_0(raw, out):
    run_chunks(_dequantize_q4_0_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q4_0_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q4_0(raw[r], out[r])


@register_kernel("Q4_1", "dequantize")
def dequantize_q4_1(raw, out):
    run_chunks(_dequantize_q4_1_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q4_1_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q4_1(raw[r], out[r])


@register_kernel("Q5_0", "dequantize")
def dequantize_q5_0(raw, out):
    run_chunks(_dequantize_q5_0_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q5_0_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q5_0(raw[r], out[r])


@register_kernel("Q5_1", "dequantize")
def dequantize_q5_1(raw, out):
    run_chunks(_dequantize_q5_1_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q5_1_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q5_1(raw[r], out[r])


@register_kernel("Q8_0", "dequantize")
def dequantize_q8_0(raw, out):
    run_chunks(_dequantize_q8_0_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q8_0_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q8_0(raw[r], out[r])


@register_kernel("Q8_1", "dequantize")
def dequantize_q8_1(raw, out):
    run_chunks(_dequantize_q8_1_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_q8_1_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        dequantize_row_q8_1(raw[r], out[r])
