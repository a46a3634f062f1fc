"""4-bit float (E2M1) codecs: MXFP4 (OCP microscaling) and NVFP4 (ggml-quants.c, ggml-impl.h).

Ports of ``quantize_row_mxfp4_ref`` / ``quantize_row_nvfp4_ref``, ``dequantize_row_mxfp4`` /
``dequantize_row_nvfp4`` and of ggml-impl.h's scale conversions (``ggml_e8m0_to_fp32``,
``ggml_e8m0_to_fp32_half``, ``ggml_ue4m3_to_fp32``, ``ggml_fp32_to_ue4m3``), bit for bit.  ggml ignores an
importance matrix for both types.

Both store E2M1 nibbles as indices into ``kvalues_mxfp4`` (:data:`grids.kvalues_fp4`), which holds *twice*
the E2M1 values (0, 1, 2, 3, 4, 6, 8, 12 and negatives) so they are integers; the scale conversions halve
the scale to compensate (``_half``, ``* 0.5f``).

MXFP4's exponent is ``(uint8_t)(floorf(log2f(amax)) - 2 + 127)``: log2f is glibc's (numba calls the same
libm function), and a negative float -> uint8_t conversion keeps the low byte of x86's int32 conversion,
so blocks whose maximum is below 2^-125 get exponents 232..255 exactly as in ggml.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import TYPES, GGMLType, register_kernel
from .chunks import run_chunks

from .grids import kvalues_fp4

_F32 = np.float32
_U = np.uint64  # unsigned indices: no negative-index wraparound, so LLVM can vectorize the loops

_MX = TYPES[GGMLType.MXFP4]
QK_MXFP4 = _MX.block_size
_MX_BYTES = _MX.type_size
_MX_E = _MX.field_offset("e")
_MX_QS = _MX.field_offset("qs")

_NV = TYPES[GGMLType.NVFP4]
QK_NVFP4 = _NV.block_size
_NV_BYTES = _NV.type_size
_NV_D = _NV.field_offset("d")
_NV_QS = _NV.field_offset("qs")
_NV_NSUB = _NV.block_dtype.fields["d"][0].shape[0]  # 4 sub-blocks, one UE4M3 scale each
QK_NVFP4_SUB = QK_NVFP4 // _NV_NSUB  # 16


# ---------------------------------------------------------------------------------------------------
# Scale formats (ggml-impl.h)
#   E8M0  : 8-bit biased exponent, value 2^(e - 127) (e = 0: 2^-127, a float32 subnormal)
#   UE4M3 : unsigned, [6:3] exponent (bias 7), [2:0] mantissa; exponent 0 is subnormal (man * 2^-9);
#           0x00 and 0x7F mean 0 (bit 7 is ignored otherwise)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def ggml_e8m0_to_fp32(x):
    """2^(x - 127) as float32 (x == 0: the subnormal 2^-127)."""
    if x == 0:
        return np.uint32(0x00400000).view(np.float32)
    return np.uint32(np.int32(x) << 23).view(np.float32)


@njit(cache=True, nogil=True)
def ggml_e8m0_to_fp32_half(x):
    """2^(x - 128): ggml_e8m0_to_fp32(x) / 2, exactly (subnormal bit patterns for x < 2)."""
    if x < 2:
        return np.uint32(0x00200000 << np.int32(x)).view(np.float32)
    return np.uint32((np.int32(x) - 1) << 23).view(np.float32)


@njit(cache=True, nogil=True)
def ggml_ue4m3_to_fp32(x):
    """Half the value of the UE4M3 byte ``x`` (kvalues_mxfp4 are doubled E2M1 values)."""
    if x == 0 or x == 0x7F:
        return _F32(0.0)
    e = (np.int32(x) >> 3) & 0xF
    man = np.int32(x) & 0x7
    if e == 0:
        raw = _F32(man) * np.uint32(118 << 23).view(np.float32)  # ldexpf(man, -9): exact
    else:
        # ldexpf(1.0f + man/8.0f, exp - 7): exact, exp - 7 in [-6, 8]
        raw = _F32(_F32(1.0) + _F32(man) / _F32(8.0)) * np.uint32((e - 7 + 127) << 23).view(np.float32)
    return _F32(raw * _F32(0.5))


@njit(cache=True, nogil=True)
def ggml_fp32_to_ue4m3(x):
    """Nearest UE4M3 byte to ``x`` (ties: mantissa rounded up), saturating at 448 (0x7E); x <= 0 or NaN -> 0."""
    if not (x > _F32(0.0)):
        return np.uint8(0)
    if x > _F32(448.0):
        x = _F32(448.0)
    bits = np.float32(x).view(np.uint32)
    fp32_exp = np.int32((bits >> np.uint32(23)) & np.uint32(0xFF)) - 127
    fp32_man = np.int32((bits >> np.uint32(20)) & np.uint32(0x7))
    ue4m3_exp = fp32_exp + 7
    if ue4m3_exp <= 0:
        # subnormal: value = man * 2^-9, man = round(x * 2^9)
        man = np.int32(_F32(_F32(x * _F32(512.0)) + _F32(0.5)))
        if man > 7:
            man = 7
        if man < 1:
            return np.uint8(0)
        return np.uint8(man)
    if ue4m3_exp >= 15:
        return np.uint8(0x7E)
    ue4m3_man = fp32_man + np.int32((bits >> np.uint32(19)) & np.uint32(1))
    if ue4m3_man > 7:
        ue4m3_man = 0
        ue4m3_exp += 1
        if ue4m3_exp >= 15:
            return np.uint8(0x7E)
    return np.uint8((ue4m3_exp << 3) | ue4m3_man)


@njit(cache=True, nogil=True, inline="always")
def best_index_mxfp4(x, e, kvalues):
    """Index of the first kvalues_mxfp4 entry minimizing ``fabsf(kvalues[i]*e - x)``."""
    best_index = 0
    best_err = abs(_F32(_F32(kvalues[0]) * e) - x)
    for i in range(1, 16):
        err = abs(_F32(_F32(kvalues[i]) * e) - x)
        if err < best_err:
            best_index = i
            best_err = err
    return best_index


@njit(cache=True, nogil=True, inline="always")
def _best_indices(x, xo, n, e, kvalues, idx):
    """idx[j] = best_index_mxfp4(x[xo + j], e) for j < n: a loop of its own vectorizes over the elements."""
    for j in range(n):
        idx[j] = best_index_mxfp4(x[xo + j], e, kvalues)


# ---------------------------------------------------------------------------------------------------
# MXFP4 — block_mxfp4, 17 bytes, 32 elements: x = 2^(e-128) * kvalues_mxfp4[q]
#
#   byte  0      e   E8M0 shared exponent
#   byte  1..16  qs  qs[j] = q[j] | q[j + 16] << 4
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _mxfp4_exponent(amax):
    """``amax > 0.0f ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0`` (x86: low byte of the int32)."""
    if not (amax > _F32(0.0)):
        return np.uint8(0)
    v = _F32(_F32(np.floor(np.log2(amax))) - _F32(2.0)) + _F32(127.0)
    return np.uint8(np.int32(v) & 0xFF)


@njit(cache=True, nogil=True)
def quantize_row_mxfp4_ref(x, y, kvalues):
    nb = x.shape[0] // QK_MXFP4
    idx = np.empty(QK_MXFP4, np.uint8)
    for i in range(nb):
        base = i * QK_MXFP4
        amax = _F32(0.0)
        for j in range(QK_MXFP4):
            if amax < abs(x[base + j]):
                amax = abs(x[base + j])
        e = _mxfp4_exponent(amax)
        d = ggml_e8m0_to_fp32_half(e)
        o = i * _MX_BYTES
        y[o + _MX_E] = e
        _best_indices(x, base, QK_MXFP4, d, kvalues, idx)
        for j in range(QK_MXFP4 // 2):
            y[o + _MX_QS + j] = idx[j] | (idx[QK_MXFP4 // 2 + j] << np.uint8(4))


@njit(cache=True, nogil=True)
def dequantize_row_mxfp4(raw, y, kvalues):
    nb = y.shape[0] // QK_MXFP4
    half = _U(QK_MXFP4 // 2)
    for i in range(nb):
        o = _U(i * _MX_BYTES)
        d = ggml_e8m0_to_fp32_half(raw[o + _U(_MX_E)])
        base = _U(i * QK_MXFP4)
        for jj in range(QK_MXFP4 // 2):
            j = _U(jj)
            b = raw[o + _U(_MX_QS) + j]
            y[base + j] = _F32(kvalues[b & np.uint8(0x0F)]) * d
            y[base + half + j] = _F32(kvalues[b >> np.uint8(4)]) * d


# ---------------------------------------------------------------------------------------------------
# NVFP4 — block_nvfp4, 36 bytes, 64 elements in 4 sub-blocks of 16: x = ue4m3(d[s]) * kvalues_mxfp4[q]
#
#   byte  0..3   d   UE4M3 scale of sub-block s (halved when decoded, see the module docstring)
#   byte  4..35  qs  qs[8s + j] = q[16s + j] | q[16s + 8 + j] << 4
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_nvfp4_ref(x, y, kvalues):
    nb = x.shape[0] // QK_NVFP4
    half = QK_NVFP4_SUB // 2
    idx = np.empty(QK_NVFP4_SUB, np.uint8)
    for i in range(nb):
        o = i * _NV_BYTES
        for s in range(_NV_NSUB):
            xb = i * QK_NVFP4 + s * QK_NVFP4_SUB
            amax = _F32(0.0)
            for j in range(QK_NVFP4_SUB):
                if amax < abs(x[xb + j]):
                    amax = abs(x[xb + j])
            ue = ggml_fp32_to_ue4m3(_F32(amax / _F32(6.0)))  # 6.0 = largest E2M1 value
            y[o + _NV_D + s] = ue
            d = ggml_ue4m3_to_fp32(ue)
            _best_indices(x, xb, QK_NVFP4_SUB, d, kvalues, idx)
            for j in range(half):
                y[o + _NV_QS + s * half + j] = idx[j] | (idx[half + j] << np.uint8(4))


@njit(cache=True, nogil=True)
def dequantize_row_nvfp4(raw, y, kvalues):
    nb = y.shape[0] // QK_NVFP4
    half = _U(QK_NVFP4_SUB // 2)
    for i in range(nb):
        o = _U(i * _NV_BYTES)
        for ss in range(_NV_NSUB):
            s = _U(ss)
            d = ggml_ue4m3_to_fp32(raw[o + _U(_NV_D) + s])
            yb = _U(i * QK_NVFP4) + s * _U(QK_NVFP4_SUB)
            qo = o + _U(_NV_QS) + s * half
            for jj in range(QK_NVFP4_SUB // 2):
                j = _U(jj)
                b = raw[qo + j]
                y[yb + j] = _F32(kvalues[b & np.uint8(0x0F)]) * d
                y[yb + half + j] = _F32(kvalues[b >> np.uint8(4)]) * d


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers; the registered kernels pass the table (numba's cache would freeze a global)
# ---------------------------------------------------------------------------------------------------


def _quantize_mxfp4_rows(x, out, kvalues):
    run_chunks(_quantize_mxfp4_row_range, x.shape[0], x, out, kvalues)


@njit(cache=True, nogil=True)
def _quantize_mxfp4_row_range(x, out, kvalues, r0, r1):
    for r in range(r0, r1):
        quantize_row_mxfp4_ref(x[r], out[r], kvalues)


def _dequantize_mxfp4_rows(raw, out, kvalues):
    run_chunks(_dequantize_mxfp4_row_range, out.shape[0], raw, out, kvalues)


@njit(cache=True, nogil=True)
def _dequantize_mxfp4_row_range(raw, out, kvalues, r0, r1):
    for r in range(r0, r1):
        dequantize_row_mxfp4(raw[r], out[r], kvalues)


def _quantize_nvfp4_rows(x, out, kvalues):
    run_chunks(_quantize_nvfp4_row_range, x.shape[0], x, out, kvalues)


@njit(cache=True, nogil=True)
def _quantize_nvfp4_row_range(x, out, kvalues, r0, r1):
    for r in range(r0, r1):
        quantize_row_nvfp4_ref(x[r], out[r], kvalues)


def _dequantize_nvfp4_rows(raw, out, kvalues):
    run_chunks(_dequantize_nvfp4_row_range, out.shape[0], raw, out, kvalues)


@njit(cache=True, nogil=True)
def _dequantize_nvfp4_row_range(raw, out, kvalues, r0, r1):
    for r in range(r0, r1):
        dequantize_row_nvfp4(raw[r], out[r], kvalues)


@register_kernel("MXFP4", "quantize")
def quantize_mxfp4(x, out):
    _quantize_mxfp4_rows(x, out, kvalues_fp4)


@register_kernel("MXFP4", "dequantize")
def dequantize_mxfp4(raw, out):
    _dequantize_mxfp4_rows(raw, out, kvalues_fp4)


@register_kernel("NVFP4", "quantize")
def quantize_nvfp4(x, out):
    _quantize_nvfp4_rows(x, out, kvalues_fp4)


@register_kernel("NVFP4", "dequantize")
def dequantize_nvfp4(raw, out):
    _dequantize_nvfp4_rows(raw, out, kvalues_fp4)
