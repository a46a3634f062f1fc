"""Non-linear 4-bit codecs: IQ4_NL and IQ4_XS (ggml-quants.c, "4-bit non-linear quants").

Both map each element to one of the 16 values of ``kvalues_iq4nl`` times a block scale.  ggml quantizes them
with one function, ``quantize_row_iq4_nl_impl``, ported here bit for bit:

* IQ4_NL — one 32-element block per call (``super_block_size = block_size = 32``), fp16 scale;
* IQ4_XS — a 256-element super-block of eight 32-element blocks: fp16 super scale and 6-bit block scales.

``ggml_quantize_chunk`` runs ``quantize_iq4_nl`` / ``quantize_iq4_xs``, which call the _impl with
``ntry = 7`` whether or not an importance matrix is given; the matrix only changes the weights
(``qw[j] * sqrtf(sigma2 + x[j]^2)`` instead of ``x[j]^2``).  (``quantize_row_iq4_nl_ref``, with
``ntry = -1``, is not what llama-quantize runs and is not ported.)

Same float rules as the other codecs: float32 in C's order, int8 table values converted to float32 where C
mixes them with floats, no FMA.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK_K, TYPES, GGMLType, register_kernel
from .chunks import run_chunks

from .grids import kvalues_iq4nl
from .helpers import GROUP_MAX_EPS, load_fp16, nearest_int, store_fp16

_F32 = np.float32
_U = np.uint64  # unsigned indices: no negative-index wraparound, so LLVM can vectorize the loops

_NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs: scale candidates (itry + values[0]) / max, itry = -7..7
_BLOCK = 32  # elements per scale

_NL = TYPES[GGMLType.IQ4_NL]
QK4_NL = _NL.block_size
_NL_BYTES = _NL.type_size
_NL_D = _NL.field_offset("d")
_NL_QS = _NL.field_offset("qs")

_XS = TYPES[GGMLType.IQ4_XS]
_XS_BYTES = _XS.type_size
_XS_D = _XS.field_offset("d")
_XS_SCALES_H = _XS.field_offset("scales_h")
_XS_SCALES_L = _XS.field_offset("scales_l")
_XS_QS = _XS.field_offset("qs")


@njit(cache=True, nogil=True, inline="always")
def best_index_int8(n, val, x):
    """Index of the entry of the sorted int8 table ``val[:n]`` nearest to ``x`` (ties: the upper one).

    ggml's binary search, ported as written; the quantizers call :func:`_best_index_16`, its branch-free
    equivalent, and tests/test_codecs_small_types.py checks that the two agree.
    """
    if x <= _F32(val[0]):
        return 0
    if x >= _F32(val[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < _F32(val[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if _F32(x - _F32(val[mu - 1])) < _F32(_F32(val[mu]) - x) else mu


@njit(cache=True, nogil=True, inline="always")
def _best_index_16(fval, x):
    """best_index_int8(16, values, x) without branches; ``fval`` = the 16 values as float32.

    Counts the midpoint tests ``!(x - v[k] < v[k+1] - x)`` that pass, k = 0..14.  For k below the interval
    [v[ml], v[ml+1]) holding x the test passes by sign alone, above it fails by sign alone, and at k = ml it
    is C's final comparison; x <= v[0], x >= v[15] and NaN give 0, 15, 15 as in C.  Unlike the binary
    search this vectorizes over the elements of a block (see tests/test_codecs_small_types.py).
    """
    n = 0
    for k in range(15):
        n += not (_F32(x - fval[k]) < _F32(fval[k + 1] - x))
    return n


@njit(cache=True, nogil=True, inline="always")
def _pick_levels(fval, x, xb, idd, L, lb):
    """L[lb + j] = best_index_int8(16, values, idd * x[xb + j]) for the 32 elements of a block."""
    for j in range(_BLOCK):
        L[lb + j] = _best_index_16(fval, _F32(idd * x[xb + j]))


@njit(cache=True, nogil=True, inline="always")
def _weighted_sums(fval, x, xb, weight, L, lb):
    """(sumqx, sumq2) = sums of w*q*x and w*q*q over the block, q = values[L], accumulated in C's order."""
    sumqx = _F32(0.0)
    sumq2 = _F32(0.0)
    for j in range(_BLOCK):
        q = fval[L[lb + j]]
        w = weight[j]
        sumqx = _F32(sumqx + _F32(w * q) * x[xb + j])
        sumq2 = _F32(sumq2 + _F32(w * q) * q)
    return sumqx, sumq2


_TRIAL_LANES = 16  # C's 2 * _NTRY + 1 = 15 trial scales, padded to a whole vector of float32
assert 2 * _NTRY + 1 <= _TRIAL_LANES


@njit(cache=True, nogil=True, inline="always")
def _trial_sums(fval, x, xb, weight, vmax, v0, ntry, lanes):
    """C's trial loop, itry = -ntry..ntry: the block's levels at idd = (itry + values[0]) / vmax and their
    sums, sumqx into ``lanes[nl + t]`` and sumq2 into ``lanes[2 * nl + t]`` (t = itry + ntry, nl = len(lanes) / 3;
    ``lanes[t]`` holds the idd).

    All trials at once, as lanes: each lane's sums are added in C's order, so the loop over lanes vectorises
    without reassociation (a trial at a time, each float sum was a chain of 32 dependent adds: IQ4_NL and
    IQ4_XS quantize in 0.65-0.7x the time, the same bytes).  A lane's level is values[n], n the midpoint
    tests of :func:`_best_index_16` that pass (always the first n): values[0] plus the steps of those tests,
    small integers, exact in float32, with no table lookup per lane.  The tests are written out and the lane
    count read from the array: a loop over the tests stayed scalar, and a literal count made LLVM unroll the
    lanes into scalars too.
    """
    nl = lanes.shape[0] // 3
    for t in range(nl):
        lanes[t] = _F32(_F32(t - ntry + v0) / vmax)
        lanes[nl + t] = _F32(0.0)
        lanes[2 * nl + t] = _F32(0.0)
    f0, f1, f2, f3, f4, f5, f6, f7 = fval[0], fval[1], fval[2], fval[3], fval[4], fval[5], fval[6], fval[7]
    f8, f9, f10, f11, f12, f13, f14, f15 = fval[8], fval[9], fval[10], fval[11], fval[12], fval[13], fval[14], fval[15]
    zero = _F32(0.0)
    for j in range(_BLOCK):
        xj = x[xb + j]
        wj = weight[j]
        for t in range(nl):
            v = _F32(lanes[t] * xj)
            q = f0  # + the step of each midpoint test that passes (C's !(x - v[k] < v[k+1] - x))
            q = _F32(q + (zero if _F32(v - f0) < _F32(f1 - v) else _F32(f1 - f0)))
            q = _F32(q + (zero if _F32(v - f1) < _F32(f2 - v) else _F32(f2 - f1)))
            q = _F32(q + (zero if _F32(v - f2) < _F32(f3 - v) else _F32(f3 - f2)))
            q = _F32(q + (zero if _F32(v - f3) < _F32(f4 - v) else _F32(f4 - f3)))
            q = _F32(q + (zero if _F32(v - f4) < _F32(f5 - v) else _F32(f5 - f4)))
            q = _F32(q + (zero if _F32(v - f5) < _F32(f6 - v) else _F32(f6 - f5)))
            q = _F32(q + (zero if _F32(v - f6) < _F32(f7 - v) else _F32(f7 - f6)))
            q = _F32(q + (zero if _F32(v - f7) < _F32(f8 - v) else _F32(f8 - f7)))
            q = _F32(q + (zero if _F32(v - f8) < _F32(f9 - v) else _F32(f9 - f8)))
            q = _F32(q + (zero if _F32(v - f9) < _F32(f10 - v) else _F32(f10 - f9)))
            q = _F32(q + (zero if _F32(v - f10) < _F32(f11 - v) else _F32(f11 - f10)))
            q = _F32(q + (zero if _F32(v - f11) < _F32(f12 - v) else _F32(f12 - f11)))
            q = _F32(q + (zero if _F32(v - f12) < _F32(f13 - v) else _F32(f13 - f12)))
            q = _F32(q + (zero if _F32(v - f13) < _F32(f14 - v) else _F32(f14 - f13)))
            q = _F32(q + (zero if _F32(v - f14) < _F32(f15 - v) else _F32(f15 - f14)))
            wq = _F32(wj * q)
            lanes[nl + t] = _F32(lanes[nl + t] + _F32(wq * xj))
            lanes[2 * nl + t] = _F32(lanes[2 * nl + t] + _F32(wq * q))


# ---------------------------------------------------------------------------------------------------
# quantize_row_iq4_nl_impl: per 32-element block, a weighted least-squares scale from 2*ntry+2 candidates;
# with more than one block, the block scales are then quantized to 6 bits against d = -max_scale/32 and
# the elements re-picked with the quantized scale.
#
# IQ4_XS scale packing, block ib = 0..7, l = 6-bit scale + 32:
#   scales_l[ib/2]  low nibble (even ib) / high nibble (odd ib) = l & 0xF
#   scales_h        bits 2ib..2ib+1 = l >> 4                     (uint16, little endian)
# Quants of both types: q4[16i + j] = L[32i + j] | L[32i + 16 + j] << 4
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_row_iq4_nl_impl(super_block_size, x, xo, y, yo, d_off, qs_off, scales_h_off, scales_l_off,
                             scales, weight, L, lanes, values, fval, quant_weights, qwo, ntry):
    """One super-block ``x[xo:xo+super_block_size]`` into the block at ``y[yo:]`` (field offsets given).

    ``quant_weights`` of length 0 stands for C's NULL; otherwise ``quant_weights[qwo + j]`` weighs x[xo + j].
    ``scales``, ``weight``, ``L``, ``lanes``: float32 (super_block_size/32), float32 (32), uint8
    (super_block_size), float32 (3 * _TRIAL_LANES) scratch; ``fval``: ``values`` as float32.
    """
    block_size = _BLOCK
    have_qw = quant_weights.shape[0] > 0
    sigma2 = _F32(0.0)
    for j in range(super_block_size):
        sigma2 = _F32(sigma2 + x[xo + j] * x[xo + j])
    sigma2 = _F32(sigma2 * _F32(_F32(2.0) / _F32(super_block_size)))

    for j in range(super_block_size // 2):
        y[yo + qs_off + j] = 0
    store_fp16(y, yo + d_off, _F32(0.0))

    v0 = _F32(values[0])
    max_scale = _F32(0.0)
    amax_scale = _F32(0.0)
    nb = super_block_size // block_size
    for ib in range(nb):
        xb = xo + ib * block_size
        lb = ib * block_size
        if have_qw:
            for j in range(block_size):
                weight[j] = _F32(quant_weights[qwo + lb + j]
                                 * np.sqrt(_F32(sigma2 + _F32(x[xb + j] * x[xb + j]))))
        else:
            for j in range(block_size):
                weight[j] = _F32(x[xb + j] * x[xb + j])
        amax = _F32(0.0)
        vmax = _F32(0.0)
        for j in range(block_size):
            ax = abs(x[xb + j])
            if ax > amax:
                amax = ax
                vmax = x[xb + j]
        if amax < GROUP_MAX_EPS:
            scales[ib] = _F32(0.0)
            continue
        d = _F32(-vmax / v0) if ntry > 0 else _F32(vmax / v0)
        idd = _F32(_F32(1.0) / d)
        _pick_levels(fval, x, xb, idd, L, lb)
        sumqx, sumq2 = _weighted_sums(fval, x, xb, weight, L, lb)
        d = _F32(sumqx / sumq2) if sumq2 > _F32(0.0) else _F32(0.0)
        best = _F32(d * sumqx)
        _trial_sums(fval, x, xb, weight, vmax, np.int32(values[0]), ntry, lanes)
        for t in range(2 * ntry + 1):  # C's itry = t - ntry, in its order
            sumqx = lanes[_TRIAL_LANES + t]
            sumq2 = lanes[2 * _TRIAL_LANES + t]
            if sumq2 > _F32(0.0) and _F32(sumqx * sumqx) > _F32(best * sumq2):
                d = _F32(sumqx / sumq2)
                best = _F32(d * sumqx)
        scales[ib] = d
        abs_d = abs(d)
        if abs_d > amax_scale:
            amax_scale = abs_d
            max_scale = d

    if nb > 1:
        scales_h = 0
        d = _F32(-max_scale / _F32(32.0))
        store_fp16(y, yo + d_off, d)
        idd = _F32(_F32(1.0) / d) if d != _F32(0.0) else _F32(0.0)
        for ib in range(nb):
            l = nearest_int(_F32(idd * scales[ib]))
            l = max(-32, min(31, l))
            dl = _F32(d * _F32(l))
            idl = _F32(_F32(1.0) / dl) if dl != _F32(0.0) else _F32(0.0)
            xb = xo + ib * block_size
            lb = ib * block_size
            _pick_levels(fval, x, xb, idl, L, lb)
            l += 32
            l_l = l & 0xF
            if ib % 2 == 0:
                y[yo + scales_l_off + ib // 2] = np.uint8(l_l)
            else:
                y[yo + scales_l_off + ib // 2] |= np.uint8(l_l << 4)
            scales_h |= (l >> 4) << (2 * (ib % 8))
        y[yo + scales_h_off] = np.uint8(scales_h & 0xFF)
        y[yo + scales_h_off + 1] = np.uint8((scales_h >> 8) & 0xFF)
    else:
        store_fp16(y, yo + d_off, scales[0])
        if ntry > 0:
            idd = _F32(_F32(1.0) / scales[0]) if scales[0] != _F32(0.0) else _F32(0.0)
            for ib in range(nb):
                _pick_levels(fval, x, xo + ib * block_size, idd, L, ib * block_size)

    for i in range(super_block_size // 32):
        for j in range(16):
            y[yo + qs_off + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << np.uint8(4))


@njit(cache=True, nogil=True)
def quantize_iq4_nl_row(x, y, quant_weights, values):
    """One row of ``quantize_iq4_nl`` (ggml_quantize_chunk's IQ4_NL path)."""
    scales = np.empty(1, np.float32)
    weight = np.empty(_BLOCK, np.float32)
    L = np.empty(QK4_NL, np.uint8)
    lanes = np.empty(3 * _TRIAL_LANES, np.float32)
    fval = values.astype(np.float32)
    for ibl in range(x.shape[0] // QK4_NL):  # the size as L's length, not the literal 32: with it inlined,
        # LLVM specialised the block for 32 and the trials ran 1.5x slower (kquants_imatrix._OPAQUE_N likewise)
        quantize_row_iq4_nl_impl(L.shape[0], x, ibl * QK4_NL, y, ibl * _NL_BYTES, _NL_D, _NL_QS, -1, -1,
                                 scales, weight, L, lanes, values, fval, quant_weights,
                                 ibl * QK4_NL, _NTRY)


@njit(cache=True, nogil=True)
def quantize_iq4_xs_row(x, y, quant_weights, values):
    """One row of ``quantize_iq4_xs`` (ggml_quantize_chunk's IQ4_XS path)."""
    scales = np.empty(QK_K // _BLOCK, np.float32)
    weight = np.empty(_BLOCK, np.float32)
    L = np.empty(QK_K, np.uint8)
    lanes = np.empty(3 * _TRIAL_LANES, np.float32)
    fval = values.astype(np.float32)
    for ibl in range(x.shape[0] // QK_K):
        quantize_row_iq4_nl_impl(QK_K, x, ibl * QK_K, y, ibl * _XS_BYTES, _XS_D, _XS_QS, _XS_SCALES_H,
                                 _XS_SCALES_L, scales, weight, L, lanes, values, fval, quant_weights,
                                 ibl * QK_K, _NTRY)


# ---------------------------------------------------------------------------------------------------
# Dequantization
#   IQ4_NL (18 bytes / 32):   d fp16 | qs[16]                           x = d * kvalues_iq4nl[q]
#   IQ4_XS (136 bytes / 256): d fp16 | scales_h u16 | scales_l[4] | qs[128]
#                             x = d * (ls - 32) * kvalues_iq4nl[q], ls the 6-bit scale of the block
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def dequantize_row_iq4_nl(raw, y, values):
    nb = y.shape[0] // QK4_NL
    half = _U(QK4_NL // 2)
    for i in range(nb):
        o = _U(i * _NL_BYTES)
        d = load_fp16(raw, o + _U(_NL_D))
        base = _U(i * QK4_NL)
        for jj in range(QK4_NL // 2):
            j = _U(jj)
            b = raw[o + _U(_NL_QS) + j]
            y[base + j] = d * _F32(values[b & np.uint8(0xF)])
            y[base + half + j] = d * _F32(values[b >> np.uint8(4)])


@njit(cache=True, nogil=True)
def dequantize_row_iq4_xs(raw, y, values):
    nb = y.shape[0] // QK_K
    for i in range(nb):
        o = _U(i * _XS_BYTES)
        d = load_fp16(raw, o + _U(_XS_D))
        scales_h = np.int32(raw[o + _U(_XS_SCALES_H)]) | (np.int32(raw[o + _U(_XS_SCALES_H + 1)]) << 8)
        for ib in range(QK_K // _BLOCK):
            ls = ((np.int32(raw[o + _U(_XS_SCALES_L + ib // 2)]) >> (4 * (ib % 2))) & 0xF) \
                | (((scales_h >> (2 * ib)) & 3) << 4)
            dl = _F32(d * _F32(ls - 32))
            base = _U(i * QK_K + ib * _BLOCK)
            qo = o + _U(_XS_QS + 16 * ib)
            for jj in range(16):
                j = _U(jj)
                b = raw[qo + j]
                y[base + j] = dl * _F32(values[b & np.uint8(0xF)])
                y[base + _U(16) + j] = dl * _F32(values[b >> np.uint8(4)])


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers; the registered kernels pass the table (numba's cache would freeze a global)
# ---------------------------------------------------------------------------------------------------

_NO_WEIGHTS = np.empty(0, np.float32)  # C's NULL quant_weights


def _quantize_iq4_nl_rows(x, quant_weights, out, values):
    run_chunks(_quantize_iq4_nl_row_range, x.shape[0], x, quant_weights, out, values)


@njit(cache=True, nogil=True)
def _quantize_iq4_nl_row_range(x, quant_weights, out, values, r0, r1):
    for r in range(r0, r1):
        quantize_iq4_nl_row(x[r], out[r], quant_weights, values)


def _quantize_iq4_xs_rows(x, quant_weights, out, values):
    run_chunks(_quantize_iq4_xs_row_range, x.shape[0], x, quant_weights, out, values)


@njit(cache=True, nogil=True)
def _quantize_iq4_xs_row_range(x, quant_weights, out, values, r0, r1):
    for r in range(r0, r1):
        quantize_iq4_xs_row(x[r], out[r], quant_weights, values)


def _dequantize_iq4_nl_rows(raw, out, values):
    run_chunks(_dequantize_iq4_nl_row_range, out.shape[0], raw, out, values)


@njit(cache=True, nogil=True)
def _dequantize_iq4_nl_row_range(raw, out, values, r0, r1):
    for r in range(r0, r1):
        dequantize_row_iq4_nl(raw[r], out[r], values)


def _dequantize_iq4_xs_rows(raw, out, values):
    run_chunks(_dequantize_iq4_xs_row_range, out.shape[0], raw, out, values)


@njit(cache=True, nogil=True)
def _dequantize_iq4_xs_row_range(raw, out, values, r0, r1):
    for r in range(r0, r1):
        dequantize_row_iq4_xs(raw[r], out[r], values)


@register_kernel("IQ4_NL", "quantize")
def quantize_iq4_nl(x, out):
    _quantize_iq4_nl_rows(x, _NO_WEIGHTS, out, kvalues_iq4nl)


@register_kernel("IQ4_NL", "quantize_imatrix")
def quantize_imatrix_iq4_nl(x, qw, out):
    _quantize_iq4_nl_rows(x, qw, out, kvalues_iq4nl)


@register_kernel("IQ4_NL", "dequantize")
def dequantize_iq4_nl(raw, out):
    _dequantize_iq4_nl_rows(raw, out, kvalues_iq4nl)


@register_kernel("IQ4_XS", "quantize")
def quantize_iq4_xs(x, out):
    _quantize_iq4_xs_rows(x, _NO_WEIGHTS, out, kvalues_iq4nl)


@register_kernel("IQ4_XS", "quantize_imatrix")
def quantize_imatrix_iq4_xs(x, qw, out):
    _quantize_iq4_xs_rows(x, qw, out, kvalues_iq4nl)


@register_kernel("IQ4_XS", "dequantize")
def dequantize_iq4_xs(raw, out):
    _dequantize_iq4_xs_rows(raw, out, kvalues_iq4nl)
