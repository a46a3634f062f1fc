"""k-quants with an importance matrix: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (ggml's ``quantize_row_*_K_impl``).

What ``ggml_quantize_chunk(type, ..., imatrix)`` runs when ``imatrix != NULL`` (``quantize_q4_K`` etc. call
``quantize_row_q4_K_impl`` row by row), bit for bit.  Per 256-value super-block, with ``qw`` the imatrix
slice of the block's columns:

* Q2_K: ``sigma2 = sum(x*x)/256``; per 16: ``w = qw*sqrtf(sigma2 + x*x)``, ``sw = sum(w)``,
  ``make_qkx3_quants(16, 3, ..)``; the 16 scales and mins get ``make_qp_quants(16, 15, .., sw)``
  (4-bit each), then the values are re-quantized against the stored fp16 ``d``/``dmin``.
* Q3_K: ``sigma2 = 2*sum(x*x)/256``; per 16: ``w`` as Q2_K, ``make_qx_quants(16, 4, .., rmse 1, w)``; the
  scales get ``make_qx_quants(16, 32, scales, Ls, 1, sw)`` (6-bit, stored +32).  No ``max_scale == 0``
  guard, unlike the reference path.
* Q4_K / Q5_K: ``sigma2 = 2*sum(x*x)/256``; per 32: ``make_qkx3_quants(32, 15 / 31, ..)``; scales and mins
  ``make_qp_quants(8, 63, .., sw)``.  Q5_K clamps ``ls``/``lm`` to 63, Q4_K does not (neither needs to for
  non-negative inputs, but a negative ``nearest_int`` stored in ``uint8_t`` keeps its low byte and the
  packing then ORs that byte in; reproduced).
* Q6_K: per 16: ``make_qx_quants(16, 32, x, L, 1, qw)`` — the RAW imatrix as weights (ggml's sigma2
  weighting is commented out there); int8 scales ``MIN(127, nearest_int(-128/max_scale * s))``.

Evaluation order, read from the C and confirmed bit-exact against the oracle:

* all ``float`` arithmetic is float32, left to right, no FMA; ``2*sumx2/QK_K`` is ``(2.f*sumx2)/256.f``;
* ``w*x[i]*l`` = ``(w*x[i])*l``, ``w*l*l`` = ``(w*l)*l``, ``w*l*x[i]`` = ``(w*l)*x[i]``, ``w*diff*diff`` =
  ``(w*diff)*diff``, ``scale*L[i] + min - x[i]`` = ``((scale*L)+min)-x``, ``x[i]*sl2/slx`` =
  ``(x*sl2)/slx``, ``slx*slx*suml2`` = ``(slx*slx)*suml2``;
* literals ``-0.9f``, ``0.05f``, ``0.1f``, ``-128.f`` are float32, ints are converted to float before
  they meet a float; divisions by zero give inf/NaN as in C (``error_model="numpy"``: numba's default
  raises ZeroDivisionError instead — ``sum_xl/sum_l2`` can be 0/0 with zero weights);
* ``sw[j]``/``sumw`` start at 0 and add the 16/32 weights in order; ``sigma2`` sums all 256 squares first.

Exact speed-ups (same outcome as C, fewer operations):

* ``x[i] - min`` and ``w*x[i]`` are loop invariants (recomputed when ``min`` changes);
* make_qx_quants' 18 trial scales do not depend on each other's outcome (``max`` is fixed), so their
  sums are computed side by side, one SIMD lane per trial, each still in index order; the decisions
  follow one trial at a time in C's order;
* make_qkx3_quants: a step whose rounded quants equal the previous step's yields the same sums, so it
  cannot change the search state (it loses again, or ties the winner it repeats): skipped;
* make_qkx3_quants' error sum adds non-negative terms when the weights are >= 0, so a partial sum that
  reached the best error can only stay there: that candidate's loop stops early (only when all weights
  are >= 0 or NaN; with negative weights the full sum is computed as in C).

Block layouts are those of the reference path (drawn in :mod:`.kquants`); both paths write them with the
same packers (:mod:`.helpers`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK_K, register_kernel

from .chunks import run_chunks
from .helpers import (
    GROUP_MAX_EPS,
    make_qp_quants,
    nearest_int,
    pack_2bit_k,
    pack_q3_k,
    pack_q3_k_scales,
    pack_q4_k,
    pack_q5_k,
    pack_scale_min_k4,
    quantize_q6_k_scales_and_pack,
    requantize_k4,
    requantize_q2_k,
    requantize_q3_k,
    store_fp16,
)
from .kquants import (
    Q2_K_BYTES, Q2_K_D, Q2_K_DMIN, Q2_K_QS, Q2_K_SCALES,
    Q3_K_BYTES, Q3_K_D, Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES,
    Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES,
    Q5_K_BYTES, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES,
    Q6_K_BYTES, Q6_K_D, Q6_K_QH, Q6_K_QL, Q6_K_SCALES,
)

_F32 = np.float32

# _OPAQUE_N: qkx3_fast gets the sub-block length as ``Laux.shape[0]`` rather than a literal 16/32.  With
# both n and nmax literal, LLVM specialises it and it runs ~2x slower (measured: 0.54 s vs 0.28 s for
# Q2_K's searches over 4M values).  Same arithmetic either way.


# ---------------------------------------------------------------------------------------------------
# Exact fast scale searches (same float operations, same order as helpers.make_qx_quants with weights
# and helpers.make_qkx3_quants; tests/test_codecs_imatrix.py checks them against those plain ports)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def qx_weighted(x, xo, n, nmax, L, lo, w, wx, tr):
    """make_qx_quants(n, nmax, x + xo, L + lo, rmse_type=1, qw=w) for weights ``w[0:n]``.

    Writes ``L[lo:lo+n]`` in [0, 2*nmax-1] and returns the scale.  Scratch: ``wx`` float32 of ``n``,
    ``tr`` float32 (3, 18).

    The 18 trial scales of the search are summed side by side: a trial's sums depend only on its own
    ``iscale`` (``max`` is fixed), never on earlier decisions, so the loop over trials inside the loop
    over values vectorizes (one SIMD lane per trial) while every sum still adds in index order.  The
    decisions are then taken one trial at a time in C's order (is = -9..-1, 1..9).
    """
    fmax = _F32(0.0)
    amax = _F32(0.0)
    for i in range(n):
        v = x[xo + i]
        ax = _F32(abs(v))
        if ax > amax:
            amax = ax
            fmax = v
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[lo + i] = 0
        return _F32(0.0)
    fnmax = _F32(nmax)
    lo_l = np.int32(-nmax)
    hi_l = np.int32(nmax - 1)
    iscale = _F32(-fnmax / fmax)
    sumlx = _F32(0.0)
    suml2 = _F32(0.0)
    for i in range(n):
        v = x[xo + i]
        wx[i] = _F32(w[i] * v)  # C: w*x[i]*l == (w*x[i])*l, the same product in every trial
        l = max(lo_l, min(hi_l, nearest_int(iscale * v)))
        L[lo + i] = l + nmax
        fl = _F32(l)
        sumlx = _F32(sumlx + wx[i] * fl)
        suml2 = _F32(suml2 + w[i] * fl * fl)
    scale = _F32(sumlx / suml2) if suml2 != _F32(0.0) else _F32(0.0)
    best = _F32(scale * sumlx)
    isc = tr[0]
    sx = tr[1]
    s2 = tr[2]
    for t in range(18):
        is_ = t - 9 if t < 9 else t - 8
        isc[t] = _F32(-(fnmax + _F32(0.1) * _F32(is_)) / fmax)
        sx[t] = _F32(0.0)
        s2[t] = _F32(0.0)
    for i in range(n):
        v = x[xo + i]
        a = wx[i]
        b = w[i]
        for t in range(18):
            f = _F32(max(lo_l, min(hi_l, nearest_int(isc[t] * v))))
            sx[t] = _F32(sx[t] + a * f)
            s2[t] = _F32(s2[t] + b * f * f)
    for t in range(18):
        sumlx = sx[t]
        suml2 = s2[t]
        if suml2 > _F32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[lo + i] = max(lo_l, min(hi_l, nearest_int(isc[t] * x[xo + i]))) + nmax
            scale = _F32(sumlx / suml2)
            best = _F32(scale * sumlx)
    return scale


@njit(cache=True, nogil=True, error_model="numpy")
def qkx3_fast(x, xo, n, w, nmax, L, lo, Laux, xm, nonneg):
    """make_qkx3_quants(n, nmax, x + xo, w, L + lo, &the_min, Laux, -0.9f, 0.05f, 36, false).

    Every ggml caller uses these parameters (squared error, 36 steps).  ``Laux`` int32 and ``xm`` float32
    are scratch of ``n``.  ``nonneg``: all of ``w[0:n]`` are >= 0 (or NaN), which allows stopping a
    losing error sum early.  Returns ``(scale, the_min)``.
    """
    rmin = _F32(-0.9)
    rdelta = _F32(0.05)
    nstep = 36
    fmin = x[xo]
    fmax = x[xo]
    sum_w = w[0]
    sum_x = _F32(sum_w * x[xo])
    for i in range(1, n):
        v = x[xo + i]
        if v < fmin:
            fmin = v
        if v > fmax:
            fmax = v
        sum_w = _F32(sum_w + w[i])
        sum_x = _F32(sum_x + w[i] * v)
    if fmin > _F32(0.0):
        fmin = _F32(0.0)
    if fmax <= fmin:
        for i in range(n):
            L[lo + i] = 0
        return _F32(0.0), _F32(-fmin)
    fnmax = _F32(nmax)
    rng = _F32(fmax - fmin)
    for i in range(n):
        xm[i] = _F32(x[xo + i] - fmin)  # x[i] - min: changes only when min does
    iscale = _F32(fnmax / rng)
    scale = _F32(_F32(1.0) / iscale)
    best_mad = _F32(0.0)
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * xm[i])))
        L[lo + i] = l
        diff = _F32(scale * _F32(l) + fmin - x[xo + i])
        best_mad = _F32(best_mad + w[i] * _F32(diff * diff))  # C: diff = diff*diff; mad += w*diff
    have_prev = False
    for is_ in range(nstep + 1):
        iscale = _F32((rmin + rdelta * _F32(is_) + fnmax) / rng)
        changed = np.int32(0)
        for i in range(n):
            l = np.int32(max(0, min(nmax, nearest_int(iscale * xm[i]))))
            changed |= l ^ Laux[i]
            Laux[i] = l
        if have_prev and changed == 0:
            continue  # same quants as the previous step: same sums, same candidate, same decision
        have_prev = True
        sum_l = _F32(0.0)
        sum_l2 = _F32(0.0)
        sum_xl = _F32(0.0)
        for i in range(n):
            fl = _F32(Laux[i])
            wl = _F32(w[i] * fl)  # C: w*l*l == (w*l)*l, w*l*x[i] == (w*l)*x[i]
            sum_l = _F32(sum_l + wl)
            sum_l2 = _F32(sum_l2 + wl * fl)
            sum_xl = _F32(sum_xl + wl * x[xo + i])
        D = _F32(sum_w * sum_l2 - sum_l * sum_l)
        if D > _F32(0.0):
            this_scale = _F32((sum_w * sum_xl - sum_x * sum_l) / D)
            this_min = _F32((sum_l2 * sum_x - sum_l * sum_xl) / D)
            if this_min > _F32(0.0):
                this_min = _F32(0.0)
                this_scale = _F32(sum_xl / sum_l2)
            mad = _F32(0.0)
            lost = False
            for i in range(n):
                diff = _F32(this_scale * _F32(Laux[i]) + this_min - x[xo + i])
                mad = _F32(mad + w[i] * _F32(diff * diff))  # C: diff = diff*diff; mad += w*diff
                if nonneg and not mad < best_mad:  # the sum can only grow (or be NaN): it loses
                    lost = True
                    break
            if not lost and mad < best_mad:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_mad = mad
                scale = this_scale
                fmin = this_min
                rng = _F32(fmax - fmin)  # C's later steps use the new min in (max - min) and x[i] - min
                for i in range(n):
                    xm[i] = _F32(x[xo + i] - fmin)
    return scale, _F32(-fmin)


# ---------------------------------------------------------------------------------------------------
# small shared pieces
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _sum_squares(x, xo):
    s = _F32(0.0)
    for j in range(QK_K):
        v = x[xo + j]
        s = _F32(s + v * v)
    return s


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _sub_weights(x, xo, qw, sigma2, n, w):
    """w[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l]) for the n values at xo; returns (sum of w, all w >= 0)."""
    sumw = _F32(0.0)
    nonneg = True
    for l in range(n):
        v = x[xo + l]
        wl = _F32(qw[xo + l] * np.sqrt(_F32(sigma2 + v * v)))
        w[l] = wl
        sumw = _F32(sumw + wl)
        if wl < _F32(0.0):
            nonneg = False
    return sumw, nonneg


# ---------------------------------------------------------------------------------------------------
# Row kernels (serial): quantize_row_<t>_K_impl
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q2_k_impl(x, qw, y, L, Laux, w, xm, scales, mins, sw, Ls, Lm):
    """One row -> Q2_K blocks (scratch: L int32[256], Laux int32[16], w/xm/scales/mins/sw f32[16], Ls/Lm u8[16])."""
    n = Laux.shape[0]  # sub-block length; not a literal: see _OPAQUE_N
    for i in range(x.shape[0] // QK_K):
        xo = i * QK_K
        yo = i * Q2_K_BYTES
        sigma2 = _F32(_sum_squares(x, xo) / _F32(QK_K))
        for j in range(16):
            sumw, nonneg = _sub_weights(x, xo + 16 * j, qw, sigma2, 16, w)
            sw[j] = sumw
            scales[j], mins[j] = qkx3_fast(x, xo + 16 * j, n, w, 3, L, 16 * j, Laux, xm, nonneg)
        dm = make_qp_quants(scales, 15, Ls, sw)
        mm = make_qp_quants(mins, 15, Lm, sw)
        dm = store_fp16(y, yo + Q2_K_D, dm)
        mm = store_fp16(y, yo + Q2_K_DMIN, mm)
        so = yo + Q2_K_SCALES
        for j in range(16):
            y[so + j] = np.uint8((np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF)
        requantize_q2_k(x, xo, y, so, dm, mm, L)
        pack_2bit_k(y, yo + Q2_K_QS, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q3_k_impl(x, qw, y, L, tr, w, wx, scales, sw, Ls):
    """One row -> Q3_K blocks (scratch: L/Ls int32[256]/[16], tr f32[3, 18], w/wx/scales/sw f32[16])."""
    for i in range(x.shape[0] // QK_K):
        xo = i * QK_K
        yo = i * Q3_K_BYTES
        sigma2 = _F32(_F32(_F32(2.0) * _sum_squares(x, xo)) / _F32(QK_K))
        for j in range(16):
            sumw, _nonneg = _sub_weights(x, xo + 16 * j, qw, sigma2, 16, w)
            sw[j] = sumw
            scales[j] = qx_weighted(x, xo + 16 * j, 16, 4, L, 16 * j, w, wx, tr)
        so = yo + Q3_K_SCALES
        d_block = qx_weighted(scales, 0, 16, 32, Ls, 0, sw, wx, tr)
        pack_q3_k_scales(y, so, Ls)
        d_all = store_fp16(y, yo + Q3_K_D, d_block)
        requantize_q3_k(x, xo, y, so, d_all, L, Ls.shape[0])  # Ls.shape[0] == 16, opaque: vectorizes
        pack_q3_k(y, yo + Q3_K_HMASK, yo + Q3_K_QS, L)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _q4_k_like_scales(x, xo, qw, nmax, L, Laux, w, xm, scales, mins, sw, Ls, Lm):
    n = Laux.shape[0]  # sub-block length; not a literal: see _OPAQUE_N
    sigma2 = _F32(_F32(_F32(2.0) * _sum_squares(x, xo)) / _F32(QK_K))
    for j in range(8):
        sumw, nonneg = _sub_weights(x, xo + 32 * j, qw, sigma2, 32, w)
        sw[j] = sumw
        scales[j], mins[j] = qkx3_fast(x, xo + 32 * j, n, w, nmax, L, 32 * j, Laux, xm, nonneg)
    d_block = make_qp_quants(scales, 63, Ls, sw)
    m_block = make_qp_quants(mins, 63, Lm, sw)
    return d_block, m_block


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_k_impl(x, qw, y, L, Laux, w, xm, scales, mins, sw, Ls, Lm):
    """One row -> Q4_K blocks (scratch: L int32[256], Laux int32[32], w/xm f32[32], scales/mins/sw f32[8], Ls/Lm u8[8])."""
    for i in range(x.shape[0] // QK_K):
        xo = i * QK_K
        yo = i * Q4_K_BYTES
        d_block, m_block = _q4_k_like_scales(x, xo, qw, 15, L, Laux, w, xm, scales, mins, sw, Ls, Lm)
        pack_scale_min_k4(y, yo + Q4_K_SCALES, Ls, Lm)
        d_all = store_fp16(y, yo + Q4_K_D, d_block)
        dmin_all = store_fp16(y, yo + Q4_K_DMIN, m_block)
        requantize_k4(x, xo, y, yo + Q4_K_SCALES, d_all, dmin_all, 15, L)
        pack_q4_k(y, yo + Q4_K_QS, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_k_impl(x, qw, y, L, Laux, w, xm, scales, mins, sw, Ls, Lm):
    """One row -> Q5_K blocks (scratch as quantize_row_q4_k_impl)."""
    for i in range(x.shape[0] // QK_K):
        xo = i * QK_K
        yo = i * Q5_K_BYTES
        d_block, m_block = _q4_k_like_scales(x, xo, qw, 31, L, Laux, w, xm, scales, mins, sw, Ls, Lm)
        for j in range(8):  # uint8_t ls = MIN(63, ls), likewise lm
            Ls[j] = min(np.uint8(63), Ls[j])
            Lm[j] = min(np.uint8(63), Lm[j])
        pack_scale_min_k4(y, yo + Q5_K_SCALES, Ls, Lm)
        d_all = store_fp16(y, yo + Q5_K_D, d_block)
        dmin_all = store_fp16(y, yo + Q5_K_DMIN, m_block)
        requantize_k4(x, xo, y, yo + Q5_K_SCALES, d_all, dmin_all, 31, L)
        pack_q5_k(y, yo + Q5_K_QH, yo + Q5_K_QS, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q6_k_impl(x, qw, y, L, tr, w, wx, scales):
    """One row -> Q6_K blocks (scratch: L int32[256], tr f32[3, 18], w/wx/scales f32[16])."""
    for i in range(x.shape[0] // QK_K):
        xo = i * QK_K
        yo = i * Q6_K_BYTES
        max_scale = _F32(0.0)
        max_abs_scale = _F32(0.0)
        for ib in range(16):
            for l in range(16):
                w[l] = qw[xo + 16 * ib + l]  # the raw imatrix: Q6_K does not use sigma2 weights
            s = qx_weighted(x, xo + 16 * ib, 16, 32, L, 16 * ib, w, wx, tr)
            scales[ib] = s
            a = _F32(abs(s))
            if a > max_abs_scale:
                max_abs_scale = a
                max_scale = s
        quantize_q6_k_scales_and_pack(x, xo, y, yo, Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D, Q6_K_BYTES, L,
                                      scales, max_scale, max_abs_scale)


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers (codec convention: quantize_imatrix_<t>(x, qw, out)); rows are independent, each is
# quantized serially, and row ranges are split over threads by run_chunks (see .chunks: a prange driver
# compiles several times slower), so output never depends on the thread count.
# ---------------------------------------------------------------------------------------------------


@register_kernel("Q2_K", "quantize_imatrix")
def quantize_imatrix_q2_k(x, qw, out):
    """Q2_K with importance matrix ``qw`` (n_per_row,): bytes of ggml_quantize_chunk(Q2_K, ..., qw).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    >>> out = np.empty((2, 84), np.uint8); quantize_imatrix_q2_k(x, np.ones(256, np.float32), out)
    """
    run_chunks(_quantize_imatrix_rows_q2_k, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_rows_q2_k(x, qw, out, r0, r1):
    # scratch once per row range, not per row: error feedback's rows are one block
    scratch = (np.empty(QK_K, np.int32), np.empty(16, np.int32), np.empty(16, np.float32),
               np.empty(16, np.float32), np.empty(16, np.float32), np.empty(16, np.float32),
               np.empty(16, np.float32), np.empty(16, np.uint8), np.empty(16, np.uint8))
    for r in range(r0, r1):
        quantize_row_q2_k_impl(x[r], qw, out[r], *scratch)


@register_kernel("Q3_K", "quantize_imatrix")
def quantize_imatrix_q3_k(x, qw, out):
    """Q3_K with importance matrix ``qw`` (quantize_row_q3_K_impl)."""
    run_chunks(_quantize_imatrix_rows_q3_k, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_rows_q3_k(x, qw, out, r0, r1):
    # scratch once per row range, not per row: error feedback's rows are one block
    scratch = (np.empty(QK_K, np.int32), np.empty((3, 18), np.float32), np.empty(16, np.float32),
               np.empty(16, np.float32), np.empty(16, np.float32), np.empty(16, np.float32),
               np.empty(16, np.int32))
    for r in range(r0, r1):
        quantize_row_q3_k_impl(x[r], qw, out[r], *scratch)


@register_kernel("Q4_K", "quantize_imatrix")
def quantize_imatrix_q4_k(x, qw, out):
    """Q4_K with importance matrix ``qw`` (quantize_row_q4_K_impl)."""
    run_chunks(_quantize_imatrix_rows_q4_k, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_rows_q4_k(x, qw, out, r0, r1):
    # scratch once per row range, not per row: error feedback's rows are one block
    scratch = (np.empty(QK_K, np.int32), np.empty(32, np.int32), np.empty(32, np.float32),
               np.empty(32, np.float32), np.empty(8, np.float32), np.empty(8, np.float32),
               np.empty(8, np.float32), np.empty(8, np.uint8), np.empty(8, np.uint8))
    for r in range(r0, r1):
        quantize_row_q4_k_impl(x[r], qw, out[r], *scratch)


@register_kernel("Q5_K", "quantize_imatrix")
def quantize_imatrix_q5_k(x, qw, out):
    """Q5_K with importance matrix ``qw`` (quantize_row_q5_K_impl)."""
    run_chunks(_quantize_imatrix_rows_q5_k, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_rows_q5_k(x, qw, out, r0, r1):
    # scratch once per row range, not per row: error feedback's rows are one block
    scratch = (np.empty(QK_K, np.int32), np.empty(32, np.int32), np.empty(32, np.float32),
               np.empty(32, np.float32), np.empty(8, np.float32), np.empty(8, np.float32),
               np.empty(8, np.float32), np.empty(8, np.uint8), np.empty(8, np.uint8))
    for r in range(r0, r1):
        quantize_row_q5_k_impl(x[r], qw, out[r], *scratch)


@register_kernel("Q6_K", "quantize_imatrix")
def quantize_imatrix_q6_k(x, qw, out):
    """Q6_K with importance matrix ``qw`` (quantize_row_q6_K_impl)."""
    run_chunks(_quantize_imatrix_rows_q6_k, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_rows_q6_k(x, qw, out, r0, r1):
    # scratch once per row range, not per row: error feedback's rows are one block
    scratch = (np.empty(QK_K, np.int32), np.empty((3, 18), np.float32), np.empty(16, np.float32),
               np.empty(16, np.float32), np.empty(16, np.float32))
    for r in range(r0, r1):
        quantize_row_q6_k_impl(x[r], qw, out[r], *scratch)
