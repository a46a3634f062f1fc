"""1-bit i-quants: IQ1_S (1.5625 bpw) and IQ1_M (1.75 bpw) (ggml-quants.c, "1.5 bpw").

Ports of ``quantize_row_iq1_s_impl`` / ``quantize_row_iq1_m_impl`` (with ``iq1_find_best_neighbour2``,
``iq1_sort_helper``) and ``dequantize_row_iq1_s`` / ``dequantize_row_iq1_m``, bit for bit.

Every group of 8 values is a point of ggml's 2048-entry ternary grid (``iq1s_grid``: coordinates -1, 0, 1)
plus a shift ``delta = +-IQ1S_DELTA`` (0.125), times a block scale ``d * (2*l + 1)`` with a 3-bit ``l``.
The quantizers take their search tables (grid with coordinates 1, 3, 5, the code -> grid map and the
neighbour lists) from :func:`.iq_grids.iq2_grid_tables` (ggml's ``iq2xs_init_impl(GGML_TYPE_IQ1_S)``).

* IQ1_S: blocks of 32 with one shift each; ggml requires an importance matrix (``quantize_imatrix`` only).
* IQ1_M: blocks of 16, a shift per 8; without an importance matrix ggml weighs by ``x*x``
  (``quant_weights == NULL`` is handled, not asserted), so both ``quantize`` and ``quantize_imatrix``.

Layouts (little-endian)::

  IQ1_S (50 B): d fp16 | qs[32] | qh uint16[8]
      block of 32 ``ib``: grid index of group l (0..3) = qs[4ib+l] | ((qh[ib] >> 3l) & 7) << 8
      qh[ib]:  15     14..12     11..9  8..6   5..3   2..0
              sign  l (scale)   hi(3)  hi(2)  hi(1)  hi(0)       sign set: delta = -0.125
      value = d * (2l+1) * (grid + delta)

  IQ1_M (56 B): qs[32] | qh[16] | scales uint16[4]
      block of 16 ``ib``: grid index of group k (0, 1) = qs[2ib+k] | ((qh[ib] >> 4k) & 7) << 8
      qh[ib]:    7       6..4      3       2..0
              sign(1)   hi(1)   sign(0)   hi(0)
      scales as 4 uint16 sc[0..3]; the fp16 super-block scale s is spread over their top nibbles:
      sc[i]:  15..12        11..9         8..6          5..3        2..0
              s[4i+3..4i]   l(4i+3)       l(4i+2)       l(4i+1)     l(4i)
      value = fp16(s) * (2l+1) * (grid + delta)

C evaluation order (float32, left to right, no FMA) kept throughout: ``sigma2 = (2.f*sumx2)/256.f``,
``w = qw*sqrtf(sigma2 + x*x)``, ``(s*x_p[0])*x_p[0]``, ``(w*diff)*diff``, ``(w*q)*x``.  ggml sorts each block
with ``qsort``; glibc's qsort is a merge sort here (stable), so ties keep index order — as our insertion sort.

Exact speed-ups (the same floats, in the same order, fewer operations):

* ggml's split search evaluates every (i1, i2) and keeps the first strictly better score; the candidate sums
  of one i1 row do not depend on the running best, so they are computed first (vectorized), then compared
  in C's order — and only if one of them passes C's test against the best at the row's start (otherwise
  none can: the best changes only when a candidate passes);
* a neighbour's error is a sum of 8 terms ``(w*diff)*diff`` whose value depends only on the element and its
  level (3 choices): the 24 terms are computed once per group, each neighbour adds 8 of them in C's order.

``dequantize_row_iq1_m`` uses ``IQ1S_DELTA`` (equal to ``IQ1M_DELTA``); kept as in ggml.

Inputs whose weighted sums overflow float32 (values beyond ~1e9, or with large importance weights) reach
code paths where ggml aborts (``GGML_ASSERT(scale >= 0)`` on a NaN scale; no grid point found) or, in
``iq1_find_best_neighbour2``'s full-grid fallback, reads ``xval[i]`` with the grid index ``i`` (up to 2047
values further into its source buffer: later rows).  The fallback is reproduced by giving the kernels the
flat input buffer; where ggml aborts, or would read past the end of the input, the row is flagged and the
wrapper raises :class:`~gguf_kquant.errors.BadTensorDataError`.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ..errors import BadTensorDataError
from ..types import QK_K, TYPES, GGMLType, register_kernel
from .chunks import run_chunks

from . import grids
from .helpers import fp16_bits_to_fp32, fp32_to_fp16_bits, load_fp16, nearest_int, store_fp16
from .iq_grids import iq2_grid_tables

_F32 = np.float32
_U = np.uint64  # unsigned loop indices: no negative-index wraparound, so LLVM can vectorize the loop
_FLT_MAX = np.float32(np.finfo(np.float32).max)

IQ1S_DELTA = _F32(0.125)  # ggml-common.h
IQ1M_DELTA = _F32(0.125)
GROUP_MAX_EPS_IQ1_S = _F32(1e-12)  # ggml-quants.c
GROUP_MAX_EPS_IQ1_M = _F32(1e-7)
IQ1S_BLOCK_SIZE = 32
IQ1M_BLOCK_SIZE = 16

_S = TYPES[GGMLType.IQ1_S]
_S_BYTES = _S.type_size
_S_D = _S.field_offset("d")
_S_QS = _S.field_offset("qs")
_S_QH = _S.field_offset("qh")

_M = TYPES[GGMLType.IQ1_M]
_M_BYTES = _M.type_size
_M_QS = _M.field_offset("qs")
_M_QH = _M.field_offset("qh")
_M_SC = _M.field_offset("scales")


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _dequant_grid():
    """iq1s_grid as float32 [2048, 8]: the int8 coordinates, converted once (exact)."""
    g = grids.iq1s_grid.view(np.int8).reshape(-1, 8).astype(np.float32)
    g.flags.writeable = False
    return g


@functools.cache
def _search_tables():
    """(levels int8 [2048, 8], kmap, neighbours): levels = (coord - 1) / 2 in {0, 1, 2} of ggml's search grid."""
    grid, kmap, neighbours = iq2_grid_tables(GGMLType.IQ1_S)  # IQ1_M shares the table (iq2_data_index)
    levels = ((grid.view(np.int8).reshape(-1, 8).astype(np.int32) - 1) // 2).astype(np.int8)
    levels.flags.writeable = False
    return levels, kmap, neighbours


@functools.cache
def _shifted(delta):
    """(x_p, x_m) = ({-1 + delta, delta, 1 + delta}, {-1 - delta, -delta, 1 - delta}) in float32."""
    one = _F32(1.0)
    x_p = np.array([-one + delta, delta, one + delta], dtype=np.float32)
    x_m = np.array([-one - delta, -delta, one - delta], dtype=np.float32)
    x_p.flags.writeable = False
    x_m.flags.writeable = False
    return x_p, x_m


def _raise_if_failed(name, failed):
    """Raise for the first row where ggml aborts (status 1) or its output depends on memory past the input (2)."""
    if failed.any():
        row = int(np.argmax(failed != 0))
        what = ("ggml aborts on a GGML_ASSERT there" if failed[row] == 1 else
                "ggml's result then depends on memory past the end of the input")
        raise BadTensorDataError(
            f"{name}: row {row} cannot be quantized: its values or importance weights are so large that "
            f"ggml's weighted sums overflow ({what})"
        )


# ---------------------------------------------------------------------------------------------------
# shared search pieces
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _sort_indices(x, xo, n, idx):
    """idx[0..n) = positions of x[xo..xo+n) in ascending order, ties in index order.

    ggml: qsort(pairs, n, 8, iq1_sort_helper); glibc's qsort merge-sorts arrays this small (stable).
    """
    for j in range(n):
        v = x[xo + j]
        p = j
        while p > 0 and x[xo + idx[p - 1]] > v:
            idx[p] = idx[p - 1]
            p -= 1
        idx[p] = j


@njit(cache=True, nogil=True, error_model="numpy")
def _find_best_neighbour2(neighbours, at, levels, x, xo, weight, wo, scale, xx, L, lo, term):
    """iq1_find_best_neighbour2 for x[xo:xo+8] over the neighbour record at ``neighbours[at]``.

    Returns the grid index, -1 where ggml aborts (no point found), -2 where ggml's result depends on memory
    past the end of the input ``x`` (the flat input buffer: see the fallback below).
    """
    # term[i, l] = w*diff*diff of value i at level l (scratch (8, 3)): the floats C computes per neighbour
    for i in range(8):
        for l in range(3):
            diff = _F32(scale * xx[l]) - x[xo + i]
            term[i, l] = _F32(weight[wo + i] * diff) * diff
    num = np.int64(neighbours[at])
    best_score = _FLT_MAX
    grid_index = -1
    for j in range(1, num + 1):
        g = np.int64(neighbours[at + j])
        d2 = _F32(0.0)
        for i in range(8):
            d2 = d2 + term[i, levels[g, i]]
        if d2 < best_score:
            best_score = d2
            grid_index = g
    if grid_index < 0:
        # Every neighbour's d2 overflowed (or is NaN).  ggml then scans the whole grid, but its loop reads
        # xval[i] for grid index i, not xval[j]: input values up to 2047 places further on, in the same
        # buffer (later rows) — reproduced while that stays inside the input.
        for i in range(levels.shape[0]):
            if xo + i >= x.shape[0]:
                return -2
            xi = x[xo + i]
            d2 = _F32(0.0)
            for j in range(8):
                w = weight[wo + j]
                q = xx[levels[i, j]]
                diff = _F32(scale * q) - xi
                d2 = d2 + _F32(w * diff) * diff
            if d2 < best_score:
                best_score = d2
                grid_index = i
        if grid_index < 0:
            return -1
    for i in range(8):
        L[lo + i] = levels[grid_index, i]
    return grid_index


@njit(cache=True, nogil=True, inline="always")
def _code(L, lo):
    """The kmap code of 8 levels: sum L[i] << 2i."""
    u = 0
    for j in range(8):
        u |= np.int64(L[lo + j]) << (2 * j)
    return u


# ---------------------------------------------------------------------------------------------------
# IQ1_S
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _split_search_iq1_s(sumx, sumw, n, x_p, x_m, max_, cand):
    """The exhaustive (i1, i2) split search of quantize_row_iq1_s_impl: (scale, besti1, besti2, best_shift).

    ``cand``: scratch (4, n + 1) for one i1 row's candidate sums.
    """
    p0, p1, p2 = x_p[0], x_p[1], x_p[2]
    m0, m1, m2 = x_m[0], x_m[1], x_m[2]
    best_score = -_FLT_MAX
    scale = max_
    besti1 = -1
    besti2 = -1
    best_shift = 0
    tx = sumx[n]
    tw = sumw[n]
    qxp = cand[0]
    q2p = cand[1]
    qxm = cand[2]
    q2m = cand[3]
    for i1 in range(n + 1):
        a = sumx[i1]  # sumx[i1] - sumx[0], sumx[0] == 0
        aw = sumw[i1]
        ap = a * p0
        am = a * m0
        awp = _F32(aw * p0) * p0
        awm = _F32(aw * m0) * m0
        # candidate sums of this row, independent of the running best (unsigned index: vectorized)
        for i2 in range(_U(i1), _U(n + 1)):
            b = sumx[i2] - a
            c = tx - sumx[i2]
            bw = sumw[i2] - aw
            cw = tw - sumw[i2]
            qxp[i2] = (ap + b * p1) + c * p2
            q2p[i2] = (awp + _F32(bw * p1) * p1) + _F32(cw * p2) * p2
            qxm[i2] = (am + b * m1) + c * m2
            q2m[i2] = (awm + _F32(bw * m1) * m1) + _F32(cw * m2) * m2
        # C's test in C's order against the running best — only if some candidate of the row passes against
        # the best at its start (until one passes, the best does not change)
        hit = False
        for i2 in range(_U(i1), _U(n + 1)):  # vectorized
            hit |= (((q2p[i2] > 0) & (qxp[i2] * qxp[i2] > best_score * q2p[i2]))
                    | ((q2m[i2] > 0) & (qxm[i2] * qxm[i2] > best_score * q2m[i2])))
        if not hit:
            continue
        for i2 in range(i1, n + 1):
            sumqx = qxp[i2]
            sumq2 = q2p[i2]
            if (sumq2 > 0) & (sumqx * sumqx > best_score * sumq2):
                scale = sumqx / sumq2
                best_score = scale * sumqx
                besti1 = i1
                besti2 = i2
                best_shift = 1
            sumqx = qxm[i2]
            sumq2 = q2m[i2]
            if (sumq2 > 0) & (sumqx * sumqx > best_score * sumq2):
                scale = sumqx / sumq2
                best_score = scale * sumqx
                besti1 = i1
                besti2 = i2
                best_shift = -1
    return scale, besti1, besti2, best_shift


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_block_iq1_s(x, xo, qw, qo, y, yo, levels, kmap, neighbours, x_p, x_m,
                          weight, scales, shifts, L, idx, sumx, sumw, cand, index, term):
    """quantize_row_iq1_s_impl for the super-block x[xo:xo+256] (x: the flat input, qw[qo:] its importance) into
    y[yo:yo+50].  Returns 0, or the status of :func:`_find_best_neighbour2` where ggml aborts (or reads past x)."""
    bs = IQ1S_BLOCK_SIZE
    nsub = QK_K // bs
    for j in range(_S_BYTES):
        y[yo + j] = 0
    max_scale = _F32(0.0)
    sumx2 = _F32(0.0)
    for i in range(QK_K):
        sumx2 = sumx2 + x[xo + i] * x[xo + i]
    sigma2 = _F32(_F32(2.0) * sumx2) / _F32(QK_K)
    for ib in range(nsub):
        xb = xo + bs * ib
        for i in range(bs):
            weight[i] = qw[qo + bs * ib + i] * np.sqrt(sigma2 + x[xb + i] * x[xb + i])
        max_ = abs(x[xb])
        for i in range(1, bs):
            a = abs(x[xb + i])
            max_ = max_ if max_ > a else a
        if max_ < GROUP_MAX_EPS_IQ1_S:
            scales[ib] = 0
            shifts[ib] = 1
            continue
        _sort_indices(x, xb, bs, idx)
        sumx[0] = 0
        sumw[0] = 0
        for j in range(bs):
            i = idx[j]
            sumx[j + 1] = sumx[j] + weight[i] * x[xb + i]
            sumw[j + 1] = sumw[j] + weight[i]
        scale, besti1, besti2, best_shift = _split_search_iq1_s(sumx, sumw, bs, x_p, x_m, max_, cand)
        if besti1 < 0 or besti2 < 0 or best_shift == 0:
            scales[ib] = 0
            shifts[ib] = 1
            continue
        for j in range(bs):
            L[idx[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
        if scale < 0:
            for j in range(bs):
                L[j] = 2 - L[j]
            scale = -scale
            best_shift = -best_shift
        all_on_grid = True
        xx = x_p if best_shift == 1 else x_m
        for k in range(bs // 8):
            grid_index = np.int64(kmap[_code(L, 8 * k)])
            if grid_index < 0:
                all_on_grid = False
                at = -grid_index - 1
                grid_index = _find_best_neighbour2(neighbours, at, levels, x, xb + 8 * k, weight, 8 * k,
                                                   scale, xx, L, 8 * k, term)
                if grid_index < 0:
                    return -grid_index
            index[k] = grid_index
        if not all_on_grid:
            sumqx = _F32(0.0)
            sumq2 = _F32(0.0)
            for k in range(bs // 8):
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[levels[index[k], j]]
                    sumqx = sumqx + _F32(w * q) * x[xb + 8 * k + j]
                    sumq2 = sumq2 + _F32(w * q) * q
            if sumqx > 0 and sumq2 > 0:
                scale = sumqx / sumq2
        h = 0
        for k in range(bs // 8):
            y[yo + _S_QS + (bs // 8) * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        if not scale >= 0:  # GGML_ASSERT(scale >= 0): a NaN scale
            return 1
        y[yo + _S_QH + 2 * ib] = h & 255
        y[yo + _S_QH + 2 * ib + 1] = h >> 8
        scales[ib] = scale
        shifts[ib] = best_shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == 0:
        return 0
    d = max_scale / _F32(15.0)
    store_fp16(y, yo + _S_D, d * _F32(1.125))  # 1.125f: ggml's fudge factor
    id_ = _F32(1.0) / d
    for ib in range(nsub):
        l = nearest_int(_F32(0.5) * (id_ * scales[ib] - _F32(1.0)))
        l = max(0, min(7, l))
        if shifts[ib] == -1:
            l |= 8
        y[yo + _S_QH + 2 * ib + 1] |= np.uint8(l << 4)  # qh[ib] |= l << 12
    return 0


def _quantize_iq1_s(x, n, qw, out, levels, kmap, neighbours, x_p, x_m, failed):
    """x: the rows, flattened (ggml's src buffer), n per row."""
    run_chunks(_quantize_iq1_s_rows, out.shape[0], x, n, qw, out, levels, kmap, neighbours, x_p, x_m, failed)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_iq1_s_rows(x, n, qw, out, levels, kmap, neighbours, x_p, x_m, failed, r0, r1):
    nb = n // QK_K
    for r in range(r0, r1):
        weight = np.empty(IQ1S_BLOCK_SIZE, np.float32)
        scales = np.empty(QK_K // IQ1S_BLOCK_SIZE, np.float32)
        shifts = np.empty(QK_K // IQ1S_BLOCK_SIZE, np.int32)
        L = np.empty(IQ1S_BLOCK_SIZE, np.int8)
        idx = np.empty(IQ1S_BLOCK_SIZE, np.int64)
        sumx = np.empty(IQ1S_BLOCK_SIZE + 1, np.float32)
        sumw = np.empty(IQ1S_BLOCK_SIZE + 1, np.float32)
        cand = np.empty((4, IQ1S_BLOCK_SIZE + 1), np.float32)
        index = np.empty(IQ1S_BLOCK_SIZE // 8, np.int64)
        term = np.empty((8, 3), np.float32)
        for k in range(nb):
            status = _quantize_block_iq1_s(x, r * n + k * QK_K, qw, k * QK_K, out[r], k * _S_BYTES, levels, kmap,
                                           neighbours, x_p, x_m, weight, scales, shifts, L, idx, sumx, sumw, cand,
                                           index, term)
            if status:
                failed[r] = status


@register_kernel("IQ1_S", "quantize_imatrix")
def quantize_iq1_s_imatrix(x, qw, out):
    """ggml's quantize_iq1_s (quantize_row_iq1_s_impl per row) with importance weights ``qw``."""
    levels, kmap, neighbours = _search_tables()
    x_p, x_m = _shifted(IQ1S_DELTA)
    failed = np.zeros(x.shape[0], np.uint8)
    _quantize_iq1_s(x.reshape(-1), x.shape[1], qw, out, levels, kmap, neighbours, x_p, x_m, failed)
    _raise_if_failed("IQ1_S", failed)


def _dequantize_iq1_s(raw, out, grid):
    run_chunks(_dequantize_iq1_s_rows, out.shape[0], raw, out, grid)


@njit(cache=True, nogil=True)
def _dequantize_iq1_s_rows(raw, out, grid, r0, r1):
    nb = out.shape[1] // QK_K
    for r in range(r0, r1):
        rr = raw[r]
        y = out[r]
        for i in range(nb):
            bo = i * _S_BYTES
            d = load_fp16(rr, bo + _S_D)
            yo = i * QK_K
            for ib in range(QK_K // 32):
                qh = np.int64(rr[bo + _S_QH + 2 * ib]) | (np.int64(rr[bo + _S_QH + 2 * ib + 1]) << 8)
                dl = d * _F32(2 * ((qh >> 12) & 7) + 1)
                delta = -IQ1S_DELTA if qh & 0x8000 else IQ1S_DELTA
                for l in range(4):
                    g = np.int64(rr[bo + _S_QS + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                    for j in range(8):
                        y[yo + j] = dl * (grid[g, j] + delta)
                    yo += 8


@register_kernel("IQ1_S", "dequantize")
def dequantize_iq1_s(raw, out):
    """ggml's dequantize_row_iq1_s over every row of ``raw`` into float32 ``out``."""
    _dequantize_iq1_s(raw, out, _dequant_grid())


# ---------------------------------------------------------------------------------------------------
# IQ1_M
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _split_search_iq1_m(px, pw, n, x_p, x_m, max_, sumqx, sumq2):
    """The split search of quantize_row_iq1_m_impl over per-half prefix sums: (scale, besti1, besti2, best_k).

    best_k: shifts of the two halves, 0: (+, +), 1: (+, -), 2: (-, +), 3: (-, -).
    """
    txs0 = px[0, n]
    txs1 = px[1, n]
    tws0 = pw[0, n]
    tws1 = pw[1, n]
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    tp0 = txs0 * p2
    tm0 = txs0 * m2
    tp1 = txs1 * p2
    tm1 = txs1 * m2
    wp0 = _F32(tws0 * p2) * p2
    wm0 = _F32(tws0 * m2) * m2
    wp1 = _F32(tws1 * p2) * p2
    wm1 = _F32(tws1 * m2) * m2
    best_score = -_FLT_MAX
    scale = max_
    besti1 = -1
    besti2 = -1
    best_k = -1
    for i1 in range(n + 1):
        a0 = px[0, i1]
        a1 = px[1, i1]
        b0p = pw[0, i1] * cp1
        b0m = pw[0, i1] * cm1
        b1p = pw[1, i1] * cp1
        b1m = pw[1, i1] * cm1
        for i2 in range(_U(i1), _U(n + 1)):  # unsigned index: vectorized
            sx0 = a0 + px[0, i2]
            sx1 = a1 + px[1, i2]
            qx_p0 = tp0 - sx0
            qx_m0 = tm0 - sx0
            qx_p1 = tp1 - sx1
            qx_m1 = tm1 - sx1
            q2_p0 = (wp0 + b0p) + pw[0, i2] * cp2
            q2_m0 = (wm0 + b0m) + pw[0, i2] * cm2
            q2_p1 = (wp1 + b1p) + pw[1, i2] * cp2
            q2_m1 = (wm1 + b1m) + pw[1, i2] * cm2
            sumqx[0, i2] = qx_p0 + qx_p1
            sumqx[1, i2] = qx_p0 + qx_m1
            sumqx[2, i2] = qx_m0 + qx_p1
            sumqx[3, i2] = qx_m0 + qx_m1
            sumq2[0, i2] = q2_p0 + q2_p1
            sumq2[1, i2] = q2_p0 + q2_m1
            sumq2[2, i2] = q2_m0 + q2_p1
            sumq2[3, i2] = q2_m0 + q2_m1
        # C's test in C's order (i2, then k) against the running best — needed only if some candidate of the
        # row passes against the best at its start (until one passes, the best does not change)
        hit = False
        for i2 in range(_U(i1), _U(n + 1)):  # vectorized
            hit |= (((sumq2[0, i2] > 0) & (sumqx[0, i2] * sumqx[0, i2] > best_score * sumq2[0, i2]))
                    | ((sumq2[1, i2] > 0) & (sumqx[1, i2] * sumqx[1, i2] > best_score * sumq2[1, i2]))
                    | ((sumq2[2, i2] > 0) & (sumqx[2, i2] * sumqx[2, i2] > best_score * sumq2[2, i2]))
                    | ((sumq2[3, i2] > 0) & (sumqx[3, i2] * sumqx[3, i2] > best_score * sumq2[3, i2])))
        if not hit:
            continue
        for i2 in range(i1, n + 1):
            for k in range(4):
                sx = sumqx[k, i2]
                s2 = sumq2[k, i2]
                if (s2 > 0) & (sx * sx > best_score * s2):
                    scale = sx / s2
                    best_score = scale * sx
                    besti1 = i1
                    besti2 = i2
                    best_k = k
    return scale, besti1, besti2, best_k


@njit(cache=True, nogil=True, inline="always")
def _half_shift(k, best_k, x_p, x_m):
    """The value set of group k (0: first 8, 1: second 8) for shift code best_k."""
    if k == 0:
        return x_p if best_k < 2 else x_m
    return x_p if best_k % 2 == 0 else x_m


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_block_iq1_m(x, xo, qw, qo, y, yo, levels, kmap, neighbours, x_p, x_m,
                          weight, scales, shifts, L, idx, px, pw, sumqx, sumq2, index, term):
    """quantize_row_iq1_m_impl for the super-block x[xo:xo+256] (x: the flat input, qw[qo:] its importance) into
    y[yo:yo+56].  Returns 0, or the status of :func:`_find_best_neighbour2` where ggml aborts (or reads past x).

    ``qw`` of length 0 is C's NULL (weights x*x).  ``weight`` holds all 256 weights: ggml computes them twice,
    identically.
    """
    bs = IQ1M_BLOCK_SIZE
    nsub = QK_K // bs
    have_qw = qw.shape[0] > 0
    for j in range(_M_BYTES):
        y[yo + j] = 0
    max_scale = _F32(0.0)
    sumx2 = _F32(0.0)
    for i in range(QK_K):
        sumx2 = sumx2 + x[xo + i] * x[xo + i]
    sigma2 = _F32(_F32(2.0) * sumx2) / _F32(QK_K)
    for i in range(QK_K):
        v = x[xo + i]
        weight[i] = qw[qo + i] * np.sqrt(sigma2 + v * v) if have_qw else v * v
    for ib in range(nsub):
        xb = xo + bs * ib
        wb = bs * ib
        max_ = abs(x[xb])
        for i in range(1, bs):
            a = abs(x[xb + i])
            max_ = max_ if max_ > a else a
        if max_ < GROUP_MAX_EPS_IQ1_M:
            scales[ib] = 0
            shifts[ib] = 0
            continue
        _sort_indices(x, xb, bs, idx)
        px[0, 0] = 0
        px[1, 0] = 0
        pw[0, 0] = 0
        pw[1, 0] = 0
        for j in range(bs):
            i = idx[j]
            h = 0 if i < bs // 2 else 1
            px[h, j + 1] = px[h, j] + weight[wb + i] * x[xb + i]
            px[1 - h, j + 1] = px[1 - h, j]
            pw[h, j + 1] = pw[h, j] + weight[wb + i]
            pw[1 - h, j + 1] = pw[1 - h, j]
        scale, besti1, besti2, best_k = _split_search_iq1_m(px, pw, bs, x_p, x_m, max_, sumqx, sumq2)
        if besti1 < 0 or besti2 < 0 or best_k < 0:
            scales[ib] = 0
            shifts[ib] = 0
            continue
        for j in range(bs):
            L[idx[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
        if scale < 0:
            for j in range(bs):
                L[j] = 2 - L[j]
            scale = -scale
            best_k = 3 - best_k  # 0 <-> 3, 1 <-> 2
        all_on_grid = True
        for k in range(bs // 8):
            xx = _half_shift(k, best_k, x_p, x_m)
            grid_index = np.int64(kmap[_code(L, 8 * k)])
            if grid_index < 0:
                all_on_grid = False
                at = -grid_index - 1
                grid_index = _find_best_neighbour2(neighbours, at, levels, x, xb + 8 * k, weight, wb + 8 * k,
                                                   scale, xx, L, 8 * k, term)
                if grid_index < 0:
                    return -grid_index
            index[k] = grid_index
        if not all_on_grid:
            sumqx_f = _F32(0.0)
            sumq2_f = _F32(0.0)
            for k in range(bs // 8):
                xx = _half_shift(k, best_k, x_p, x_m)
                for j in range(8):
                    w = weight[wb + 8 * k + j]
                    q = xx[levels[index[k], j]]
                    sumqx_f = sumqx_f + _F32(w * q) * x[xb + 8 * k + j]
                    sumq2_f = sumq2_f + _F32(w * q) * q
            if sumqx_f > 0 and sumq2_f > 0:
                scale = sumqx_f / sumq2_f
        y[yo + _M_QS + 2 * ib] = index[0] & 255
        y[yo + _M_QS + 2 * ib + 1] = index[1] & 255
        y[yo + _M_QH + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
        if not scale >= 0:  # GGML_ASSERT(scale >= 0): a NaN scale
            return 1
        scales[ib] = scale
        shifts[ib] = best_k
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == 0:
        return 0
    _pack_scales_iq1_m(x, xo, y, yo, levels, x_p, x_m, weight, scales, shifts, max_scale)
    return 0


@njit(cache=True, nogil=True, error_model="numpy")
def _pack_scales_iq1_m(x, xo, y, yo, levels, x_p, x_m, weight, scales, shifts, max_scale):
    """The tail of quantize_row_iq1_m_impl: 3-bit block scales, shift bits, and the refitted fp16 scale."""
    bs = IQ1M_BLOCK_SIZE
    d = max_scale / _F32(15.0)
    id_ = _F32(1.0) / d
    sumqx_f = _F32(0.0)
    sumq2_f = _F32(0.0)
    sc = np.zeros(4, np.int64)
    for ib in range(QK_K // bs):
        l = nearest_int(_F32(0.5) * (id_ * scales[ib] - _F32(1.0)))
        l = max(0, min(7, l))
        sc[ib // 4] |= l << (3 * (ib % 4))
        # masks[shifts]: bit 7 = second 8 use x_m, bit 3 = first 8 use x_m
        qh = np.int64(y[yo + _M_QH + ib]) | (0x80 if shifts[ib] & 1 else 0) | (0x08 if shifts[ib] & 2 else 0)
        y[yo + _M_QH + ib] = qh
        fl = _F32(2 * l + 1)
        for k in range(bs // 8):
            xx = _half_shift(k, shifts[ib], x_p, x_m)
            g = np.int64(y[yo + _M_QS + 2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
            for j in range(8):
                w = weight[bs * ib + 8 * k + j]
                q = xx[levels[g, j]] * fl
                sumqx_f = sumqx_f + _F32(w * q) * x[xo + bs * ib + 8 * k + j]
                sumq2_f = sumq2_f + _F32(w * q) * q
    if sumq2_f > 0:
        d = sumqx_f / sumq2_f
    s = np.int64(fp32_to_fp16_bits(d * _F32(1.1125)))  # 1.1125f: ggml's fudge factor
    sc[0] |= (s & 0x000F) << 12
    sc[1] |= (s & 0x00F0) << 8
    sc[2] |= (s & 0x0F00) << 4
    sc[3] |= s & 0xF000
    for i in range(4):
        y[yo + _M_SC + 2 * i] = sc[i] & 255
        y[yo + _M_SC + 2 * i + 1] = (sc[i] >> 8) & 255


def _quantize_iq1_m(x, n, qw, out, levels, kmap, neighbours, x_p, x_m, failed):
    """x: the rows, flattened (ggml's src buffer), n per row."""
    run_chunks(_quantize_iq1_m_rows, out.shape[0], x, n, qw, out, levels, kmap, neighbours, x_p, x_m, failed)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_iq1_m_rows(x, n, qw, out, levels, kmap, neighbours, x_p, x_m, failed, r0, r1):
    nb = n // QK_K
    for r in range(r0, r1):
        weight = np.empty(QK_K, np.float32)
        scales = np.empty(QK_K // IQ1M_BLOCK_SIZE, np.float32)
        shifts = np.empty(QK_K // IQ1M_BLOCK_SIZE, np.int64)
        L = np.empty(IQ1M_BLOCK_SIZE, np.int8)
        idx = np.empty(IQ1M_BLOCK_SIZE, np.int64)
        px = np.empty((2, IQ1M_BLOCK_SIZE + 1), np.float32)
        pw = np.empty((2, IQ1M_BLOCK_SIZE + 1), np.float32)
        sumqx = np.empty((4, IQ1M_BLOCK_SIZE + 1), np.float32)
        sumq2 = np.empty((4, IQ1M_BLOCK_SIZE + 1), np.float32)
        index = np.empty(IQ1M_BLOCK_SIZE // 8, np.int64)
        term = np.empty((8, 3), np.float32)
        for k in range(nb):
            status = _quantize_block_iq1_m(x, r * n + k * QK_K, qw, k * QK_K, out[r], k * _M_BYTES, levels, kmap,
                                           neighbours, x_p, x_m, weight, scales, shifts, L, idx, px, pw, sumqx,
                                           sumq2, index, term)
            if status:
                failed[r] = status


def _run_iq1_m(x, qw, out):
    levels, kmap, neighbours = _search_tables()
    x_p, x_m = _shifted(IQ1M_DELTA)
    failed = np.zeros(x.shape[0], np.uint8)
    _quantize_iq1_m(x.reshape(-1), x.shape[1], qw, out, levels, kmap, neighbours, x_p, x_m, failed)
    _raise_if_failed("IQ1_M", failed)


@register_kernel("IQ1_M", "quantize")
def quantize_iq1_m(x, out):
    """ggml's quantize_iq1_m with quant_weights NULL (weights x*x)."""
    _run_iq1_m(x, np.empty(0, np.float32), out)


@register_kernel("IQ1_M", "quantize_imatrix")
def quantize_iq1_m_imatrix(x, qw, out):
    """ggml's quantize_iq1_m (quantize_row_iq1_m_impl per row) with importance weights ``qw``."""
    _run_iq1_m(x, qw, out)


def _dequantize_iq1_m(raw, out, grid):
    run_chunks(_dequantize_iq1_m_rows, out.shape[0], raw, out, grid)


@njit(cache=True, nogil=True)
def _dequantize_iq1_m_rows(raw, out, grid, r0, r1):
    nb = out.shape[1] // QK_K
    for r in range(r0, r1):
        rr = raw[r]
        y = out[r]
        for i in range(nb):
            bo = i * _M_BYTES
            sc0 = np.int64(rr[bo + _M_SC]) | (np.int64(rr[bo + _M_SC + 1]) << 8)
            sc1 = np.int64(rr[bo + _M_SC + 2]) | (np.int64(rr[bo + _M_SC + 3]) << 8)
            sc2 = np.int64(rr[bo + _M_SC + 4]) | (np.int64(rr[bo + _M_SC + 5]) << 8)
            sc3 = np.int64(rr[bo + _M_SC + 6]) | (np.int64(rr[bo + _M_SC + 7]) << 8)
            s = (sc0 >> 12) | ((sc1 >> 8) & 0x00F0) | ((sc2 >> 4) & 0x0F00) | (sc3 & 0xF000)
            d = fp16_bits_to_fp32(np.uint16(s))
            yo = i * QK_K
            for ib in range(QK_K // 32):
                sc = np.int64(rr[bo + _M_SC + 2 * (ib // 2)]) | (np.int64(rr[bo + _M_SC + 2 * (ib // 2) + 1]) << 8)
                dl1 = d * _F32(2 * ((sc >> (6 * (ib % 2))) & 7) + 1)
                dl2 = d * _F32(2 * ((sc >> (6 * (ib % 2) + 3)) & 7) + 1)
                for l in range(4):
                    qh = np.int64(rr[bo + _M_QH + 2 * ib + l // 2])
                    hi = (qh << 8) & 0x700 if l % 2 == 0 else (qh << 4) & 0x700
                    g = np.int64(rr[bo + _M_QS + 4 * ib + l]) | hi
                    delta = -IQ1S_DELTA if qh & (0x08 if l % 2 == 0 else 0x80) else IQ1S_DELTA
                    dl = dl1 if l < 2 else dl2
                    for j in range(8):
                        y[yo + j] = dl * (grid[g, j] + delta)
                    yo += 8


def iq1_m_scale_bits(raw) -> np.ndarray:
    """The fp16 bits of every IQ1_M block's super-block scale (spread over the top nibbles of ``scales``).

    ``raw``: uint8 IQ1_M blocks (any shape whose size is a multiple of 56).  ggml has no fp16 field to check
    for an overflowed (inf) scale in IQ1_M; this is it.

    >>> int(iq1_m_scale_bits(np.zeros(56, np.uint8))[0])
    0
    """
    sc = np.ascontiguousarray(raw).reshape(-1).view(_M.block_dtype)["scales"].view("<u2").reshape(-1, 4)
    return (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)


@register_kernel("IQ1_M", "dequantize")
def dequantize_iq1_m(raw, out):
    """ggml's dequantize_row_iq1_m over every row of ``raw`` into float32 ``out``."""
    _dequantize_iq1_m(raw, out, _dequant_grid())
