"""IQ2_XXS, IQ2_XS and IQ2_S: 2-bit lattice quants, bit-exact with ggml-quants.c.

Each 256-value super-block has one fp16 ``d``; each group of 8 values is a point of a grid of 8-vectors with
coordinates in {8, 25, 43} (grids.iq2*_grid), times a per-sub-block scale, with per-value signs.

Quantizing (``quantize_row_iq2_{xxs,xs,s}_impl``): per sub-block (32 values for XXS, 16 for XS/S) the signs
are taken off (XXS/XS keep an even number of minus signs, flipping the least important value), then a scan
of trial scales rounds each group of 8 to lattice coordinates ``l`` in {0,1,2}; an ``l`` code off the grid is
replaced by the best of its precomputed neighbours (``iq2_find_best_neighbour``, tables from
:mod:`.iq_grids`).  The scale with the best weighted fit wins, is refined once, and the sub-block scales are
stored as 4 bits relative to ``d = max_scale/31``.  XXS starts the scan from ``make_qp_quants``.

* IQ2_XXS, IQ2_XS: ggml requires an importance matrix (``ggml_quantize_requires_imatrix``): only
  ``quantize_imatrix`` and ``dequantize`` are registered.
* IQ2_S: ``quantize`` is ``quantize_iq2_s`` with ``quant_weights == NULL`` (weights ``sigma2/4 + x*x``).

Float evaluation follows the C exactly: float32, left to right, no FMA (``w*xval*q`` is ``(w*xval)*q``,
``weight*diff*diff`` is ``(weight*diff)*diff``, ``(2*kMaxQ-1 + is*0.1f)/max`` in float32).  Where ggml aborts
("found point not on grid", ``GGML_ASSERT(scale >= 0)`` on a NaN scale) the kernels flag the block and the
registered function raises :class:`~gguf_kquant.errors.QuantizeError`.

Kernels take the search tables as one tuple argument (``_search_tables``: the grid points' lattice
coordinates, their packed term positions, kmap, neighbours).  Exact speed-ups (same bytes, less work):

* the neighbour search computes its 24 possible ``w*diff*diff`` terms once and adds 8 of them per neighbour,
  in C's order (see :func:`iq2_find_best_neighbour`);
* a trial scale whose groups all land on the grid with the same codes as the previous such trial has the
  same sums, so it cannot change the search state: skipped (see :func:`_round_trial`).

Layouts (little-endian):

  IQ2_XXS (66 B): d fp16 | qs u16[32], read as 8 pairs of u32 (a0, a1) per 32 values:
                  a0 = byte k: grid index (of 256) of group k         (k = 0..3)
                  a1 = bits 7k..7k+6: signs of group k (7 bits; the 8th makes the parity even)
                       bits 28..31: 4-bit scale s, sub-block scale = d * (0.5 + s) / 4
  IQ2_XS  (74 B): d fp16 | qs u16[32]: grid index (9 bits, of 512) | 7 sign bits << 9
                  | scales[8]: low nibble for the first 16 values of each 32, high nibble for the second
  IQ2_S   (82 B): d fp16 | qs[64]: bytes 0..31 low 8 bits of the grid index (of 1024) of group i8,
                                   bytes 32..63 the 8 sign bits of group i8
                  | qh[8]: bits 2(i8%4)..+1 of qh[i8/4] = grid index bits 8..9 | scales[8] as IQ2_XS
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ..errors import QuantizeError
from ..types import QK_K, TYPES, GGMLType, register_kernel
from .chunks import run_chunks
from . import grids
from .helpers import GROUP_MAX_EPS, load_fp16, make_qp_quants, nearest_int, store_fp16
from .iq_grids import iq2_grid_tables

_F = np.float32

GROUP_MAX_EPS_IQ2_S = np.float32(1e-8)  # ggml-quants.c: GROUP_MAX_EPS_IQ2_S

_XXS = TYPES[GGMLType.IQ2_XXS]
_XS = TYPES[GGMLType.IQ2_XS]
_S = TYPES[GGMLType.IQ2_S]
XXS_BYTES, XXS_D, XXS_QS = _XXS.type_size, _XXS.field_offset("d"), _XXS.field_offset("qs")
XS_BYTES, XS_D, XS_QS, XS_SCALES = (_XS.type_size, _XS.field_offset("d"), _XS.field_offset("qs"),
                                    _XS.field_offset("scales"))
S_BYTES, S_D, S_QS, S_QH, S_SCALES = (_S.type_size, _S.field_offset("d"), _S.field_offset("qs"),
                                      _S.field_offset("qh"), _S.field_offset("scales"))
S_SIGNS = S_QS + QK_K // 8  # y->qs + QK_K/8: the sign bytes follow the 32 grid-index bytes


# --------------------------------------------------------------------------------------------------------
# shared pieces of the three quantizers
# --------------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always")  # inlined: numba then drops the per-call refcounting
def iq2_find_best_neighbour(tables, start, xval, o, waux, scale, L, terms):
    """ggml's iq2_find_best_neighbour: of the record at ``neighbours[start]``, the grid point nearest to
    ``xval[o:o+8]`` at ``scale`` under weights ``waux`` (first strictly best wins); writes its lattice
    coordinates to ``L[o:o+8]`` and returns its grid index (-1 if none: every distance NaN or >= FLT_MAX,
    where ggml's GGML_ASSERT(grid_index >= 0) aborts).

    ggml sums ``d2 += w[i]*diff*diff`` with ``diff = scale*q - x[i]`` and q in {1, 3, 5}: each term takes one
    of 3 values per i, so they are computed once (``terms``, 8x4 scratch) and each neighbour's d2 adds its 8
    terms in the same order — the same float32 operations on the same operands, hence the same bits.
    ``term_index[g]`` packs grid point g's 8 term positions ``4*i + l_i`` as bytes.
    """
    lattice, term_index, _kmap, neighbours = tables
    for i in range(8):
        w = waux[o + i]
        xi = xval[o + i]
        for l in range(3):
            diff = scale * _F(2 * l + 1) - xi
            terms[4 * i + l] = w * diff * diff
    n = np.int64(neighbours[start])
    best_d2 = _F(3.4028234663852886e38)  # FLT_MAX
    grid_index = -1
    for j in range(1, n + 1):
        g = np.int64(neighbours[start + j])
        v = term_index[g]
        d2 = _F(0.0)
        for i in range(8):
            d2 = d2 + terms[(v >> np.uint64(8 * i)) & np.uint64(0xFF)]
        if d2 < best_d2:
            best_d2 = d2
            grid_index = g
    if grid_index >= 0:
        for i in range(8):
            L[o + i] = lattice[grid_index, i]
    return grid_index


@njit(cache=True, nogil=True, inline="always")
def _trial_group(xval, o, idv, L):
    """Laux[o+i] = clamp(nearest_int(0.5f*(id*xval-1)), 0, kMaxQ-1) for one group; returns its code u."""
    u = 0
    for i in range(8):
        l = nearest_int(_F(0.5) * (idv * xval[o + i] - _F(1.0)))
        l = max(0, min(2, l))
        L[o + i] = l
        u |= l << (2 * i)
    return u


@njit(cache=True, nogil=True, inline="always")
def _round_trial(xval, ngroups, idv, scale, Laux, waux, tables, terms, prev, on_grid):
    """ggml's inner loop for one trial scale: round each group of 8 at 1/``idv`` into ``Laux`` and move a group
    that is off the grid to its best neighbour at ``scale``; ``on_grid[k]``: group k needed no move.

    Returns -1 where ggml aborts (no neighbour fits), 0 when every group is on the grid with the same codes as
    the previous such trial (``prev``) — its sums, hence the search state, would not change, so the caller
    skips it — and 1 otherwise.  Only on-grid repeats are skipped: a moved group depends on ``scale``.
    """
    kmap = tables[2]
    all_on = True
    same = True
    for k in range(ngroups):
        u = _trial_group(xval, 8 * k, idv, Laux)
        gi = kmap[u]
        on_grid[k] = gi >= 0
        if gi < 0:
            all_on = False
            if iq2_find_best_neighbour(tables, -gi - 1, xval, 8 * k, waux, scale, Laux, terms) < 0:
                return -1
        same = same and u == prev[k]
        prev[k] = u
    if not all_on:
        for k in range(ngroups):
            prev[k] = -1
        return 1
    return 0 if same else 1


@njit(cache=True, nogil=True, inline="always")
def _fit(weight, xval, L, n):
    """sumqx, sumq2 of q = 2L+1 (C order: (w*xval)*q, (w*q)*q)."""
    sumqx = _F(0.0)
    sumq2 = _F(0.0)
    for i in range(n):
        w = weight[i]
        q = _F(2 * L[i] + 1)
        sumqx = sumqx + w * xval[i] * q
        sumq2 = sumq2 + w * q * q
    return sumqx, sumq2


@njit(cache=True, nogil=True, inline="always")
def _group_code(L, o):
    u = 0
    for i in range(8):
        u |= np.int64(L[o + i]) << (2 * i)
    return u


@njit(cache=True, nogil=True, inline="always")
def _take_signs_even(xb, weight, o, xval):
    """xval = |x| for one group of 8 with an even number of sign flips: if odd, the value with the least
    w*x*x keeps its sign (its xval goes negative).  Returns the 7 stored sign bits."""
    nflip = 0
    s = 0
    for i in range(8):
        v = xb[o + i]
        if v >= _F(0.0):
            xval[o + i] = v
        else:
            xval[o + i] = -v
            nflip += 1
            s |= 1 << i
    if nflip % 2:
        imin = 0
        vmin = weight[o] * xb[o] * xb[o]
        for i in range(1, 8):
            ax = weight[o + i] * xb[o + i] * xb[o + i]
            if ax < vmin:
                vmin = ax
                imin = i
        xval[o + imin] = -xval[o + imin]
        s ^= 1 << imin
    return s & 127


@njit(cache=True, nogil=True, inline="always")
def _fmax(a, b):
    return a if a > b else b  # C's MAX(a, b): NaN in b wins, NaN in a loses


@njit(cache=True, nogil=True, inline="always")
def _sub_block_weights(x, xo, qw, qo, has_qw, sigma2, n, weight, waux, xb):
    """weight = qw*sqrtf(sigma2 + x*x) (imatrix) or 0.25f*sigma2 + x*x (IQ2_S without); waux = sqrtf(weight)."""
    for i in range(n):
        v = x[xo + i]
        xb[i] = v
        if has_qw:
            weight[i] = qw[qo + i] * np.sqrt(sigma2 + v * v)
        else:
            weight[i] = _F(0.25) * sigma2 + v * v
        waux[i] = np.sqrt(weight[i])


@njit(cache=True, nogil=True, inline="always")
def _sumx2(x, xo):
    s = _F(0.0)
    for i in range(QK_K):
        s = s + x[xo + i] * x[xo + i]
    return s


# --------------------------------------------------------------------------------------------------------
# IQ2_XXS: quantize_row_iq2_xxs_impl
# --------------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy")
def quantize_block_iq2_xxs(x, xo, qw, qo, out, oo, tables, terms,
                           scales, weight, xval, xb, L, Laux, Lq, waux, block_signs, q2, prev, on_grid):
    """One super-block of ``quantize_row_iq2_xxs_impl``; returns False where ggml aborts."""
    kMaxQ = 3
    for i in range(16):
        q2[i] = 0
    max_scale = _F(0.0)
    sigma2 = _sumx2(x, xo) / _F(QK_K)
    for ib in range(QK_K // 32):
        _sub_block_weights(x, xo + 32 * ib, qw, qo + 32 * ib, True, sigma2, 32, weight, waux, xb)
        for k in range(4):
            block_signs[k] = _take_signs_even(xb, weight, 8 * k, xval)
        vmax = xval[0]
        for i in range(1, 32):
            vmax = _fmax(vmax, xval[i])
        if vmax < GROUP_MAX_EPS:
            scales[ib] = 0
            continue
        scale = make_qp_quants(xval, kMaxQ + 1, Lq, weight)
        for i in range(32):
            L[i] = Lq[i]
        eff_max = scale * _F(kMaxQ)
        if eff_max <= _F(0.0):
            scales[ib] = 0
            continue
        best = _F(0.0)
        for k in range(4):
            prev[k] = -1
        for is_ in range(-6, 7):
            idv = (_F(2 * kMaxQ - 1) + _F(is_) * _F(0.1)) / eff_max
            this_scale = _F(1.0) / idv
            status = _round_trial(xval, 4, idv, this_scale, Laux, waux, tables, terms, prev, on_grid)
            if status < 0:
                return False  # GGML_ASSERT(grid_index >= 0)
            if status == 0:
                continue
            sumqx, sumq2 = _fit(weight, xval, Laux, 32)
            if sumq2 > _F(0.0) and sumqx * sumqx > best * sumq2:
                scale = sumqx / sumq2
                best = scale * sumqx
                for i in range(32):
                    L[i] = Laux[i]
        if scale > _F(0.0):
            idv = _F(1.0) / scale
            for k in range(4):
                u = _trial_group(xval, 8 * k, idv, Laux)
                gi = tables[2][u]
                if gi < 0:
                    gi = iq2_find_best_neighbour(tables, -gi - 1, xval, 8 * k, waux, scale, L, terms)
                    if gi < 0:
                        return False  # GGML_ASSERT(grid_index >= 0)
                for i in range(8):
                    L[8 * k + i] = tables[0][gi, i]
            sumqx, sumq2 = _fit(weight, xval, L, 32)
            if sumq2 > _F(0.0):
                scale = sumqx / sumq2
        if scale < _F(0.0):
            scale = -scale
            for k in range(4):
                block_signs[k] = (~block_signs[k]) & 127
        for k in range(4):
            gi = tables[2][_group_code(L, 8 * k)]
            if gi < 0:
                return False  # "Oops: found point not on grid"
            q2[2 * ib] |= np.uint32(gi) << np.uint32(8 * k)
            q2[2 * ib + 1] |= np.uint32(block_signs[k]) << np.uint32(7 * k)
        if not scale >= _F(0.0):
            return False  # GGML_ASSERT(scale >= 0)
        scales[ib] = scale
        max_scale = _fmax(max_scale, scale)

    for i in range(XXS_BYTES):
        out[oo + i] = 0
    if max_scale == _F(0.0):
        return True
    d = max_scale / _F(31.0)
    store_fp16(out, oo + XXS_D, d)
    idv = _F(1.0) / d
    for ib in range(QK_K // 32):
        l = nearest_int(_F(0.5) * (idv * scales[ib] - _F(1.0)))
        l = max(0, min(15, l))
        q2[2 * ib + 1] |= np.uint32(l) << np.uint32(28)
    for j in range(16):
        for b in range(4):
            out[oo + XXS_QS + 4 * j + b] = np.uint8((q2[j] >> np.uint32(8 * b)) & np.uint32(0xFF))
    return True


def _quantize_iq2_xxs(x, qw, out, tables, ok):
    run_chunks(_quantize_iq2_xxs_rows, x.shape[0], x, qw, out, tables, ok)


@njit(cache=True, nogil=True)
def _quantize_iq2_xxs_rows(x, qw, out, tables, ok, r0, r1):
    nb = x.shape[1] // QK_K
    for r in range(r0, r1):
        scales = np.empty(8, np.float32)
        weight = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        xb = np.empty(32, np.float32)
        L = np.empty(32, np.int8)
        Laux = np.empty(32, np.int8)
        Lq = np.empty(32, np.uint8)
        waux = np.empty(32, np.float32)
        block_signs = np.empty(4, np.int64)
        q2 = np.empty(16, np.uint32)
        terms = np.empty(32, np.float32)
        prev = np.empty(4, np.int64)
        on_grid = np.empty(4, np.bool_)
        xr = x[r]
        outr = out[r]
        for ibl in range(nb):
            ok[r, ibl] = quantize_block_iq2_xxs(xr, QK_K * ibl, qw, QK_K * ibl, outr, XXS_BYTES * ibl,
                                                tables, terms, scales, weight, xval, xb, L, Laux,
                                                Lq, waux, block_signs, q2, prev, on_grid)


# --------------------------------------------------------------------------------------------------------
# IQ2_XS and IQ2_S: quantize_row_iq2_xs_impl / quantize_row_iq2_s_impl (one search, two packings)
# --------------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _search_sub_block_16(xval, weight, waux, L, Laux, on_grid, on_grid_aux, prev, vmax, tables, terms):
    """The scale search of the XS/S quantizers for one sub-block of 16; returns (scale, ok)."""
    kMaxQ = 3
    best = _F(0.0)
    scale = vmax / _F(2 * kMaxQ - 1)
    on_grid[0] = True
    on_grid[1] = True
    prev[0] = -1
    prev[1] = -1
    for is_ in range(-9, 10):
        idv = (_F(2 * kMaxQ - 1) + _F(is_) * _F(0.1)) / vmax
        this_scale = _F(1.0) / idv
        status = _round_trial(xval, 2, idv, this_scale, Laux, waux, tables, terms, prev, on_grid_aux)
        if status < 0:
            return scale, False  # GGML_ASSERT(grid_index >= 0)
        if status == 0:
            continue
        sumqx, sumq2 = _fit(weight, xval, Laux, 16)
        if sumq2 > _F(0.0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(16):
                L[i] = Laux[i]
            on_grid[0] = on_grid_aux[0]
            on_grid[1] = on_grid_aux[1]
    if (not on_grid[0] or not on_grid[1]) and scale > _F(0.0):
        idv = _F(1.0) / scale
        for k in range(2):
            if on_grid[k]:
                continue
            u = _trial_group(xval, 8 * k, idv, L)
            gi = tables[2][u]
            if gi < 0:
                if iq2_find_best_neighbour(tables, -gi - 1, xval, 8 * k, waux, scale, L, terms) < 0:
                    return scale, False  # GGML_ASSERT(grid_index >= 0)
        sumqx, sumq2 = _fit(weight, xval, L, 16)
        if sumq2 > _F(0.0):
            scale = sumqx / sumq2
    return scale, True


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_block_iq2_xs(x, xo, qw, qo, out, oo, tables, terms,
                          scales, weight, xval, xb, L, Laux, waux, block_signs, q2, on_grid, on_grid_aux, prev):
    """One super-block of ``quantize_row_iq2_xs_impl``; returns False where ggml aborts."""
    for i in range(32):
        q2[i] = 0
    max_scale = _F(0.0)
    sigma2 = _sumx2(x, xo) / _F(QK_K)
    for ib in range(QK_K // 16):
        _sub_block_weights(x, xo + 16 * ib, qw, qo + 16 * ib, True, sigma2, 16, weight, waux, xb)
        for k in range(2):
            block_signs[k] = _take_signs_even(xb, weight, 8 * k, xval)
        vmax = xval[0]
        for i in range(1, 16):
            vmax = _fmax(vmax, xval[i])
        for i in range(16):
            L[i] = 0
        if vmax < GROUP_MAX_EPS:
            scales[ib] = 0
            continue
        scale, ok = _search_sub_block_16(xval, weight, waux, L, Laux, on_grid, on_grid_aux, prev, vmax,
                                         tables, terms)
        if not ok:
            return False
        if scale < _F(0.0):
            scale = -scale
            for k in range(2):
                block_signs[k] = (~block_signs[k]) & 127
        for k in range(2):
            gi = tables[2][_group_code(L, 8 * k)]
            if gi < 0:
                return False  # "Oops: found point not on grid"
            q2[2 * ib + k] = np.uint16(gi | (block_signs[k] << 9))
        if not scale >= _F(0.0):
            return False  # GGML_ASSERT(scale >= 0)
        scales[ib] = scale
        max_scale = _fmax(max_scale, scale)

    for i in range(XS_BYTES):
        out[oo + i] = 0
    if max_scale == _F(0.0):
        return True
    d = max_scale / _F(31.0)
    store_fp16(out, oo + XS_D, d)
    idv = _F(1.0) / d
    for ib in range(QK_K // 16):
        l = nearest_int(_F(0.5) * (idv * scales[ib] - _F(1.0)))
        l = max(0, min(15, l))
        out[oo + XS_SCALES + ib // 2] |= np.uint8(l << (4 * (ib % 2)))
    for j in range(32):
        out[oo + XS_QS + 2 * j] = np.uint8(q2[j] & np.uint16(0xFF))
        out[oo + XS_QS + 2 * j + 1] = np.uint8(q2[j] >> np.uint16(8))
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_block_iq2_s(x, xo, qw, qo, has_qw, out, oo, tables, terms,
                         scales, weight, xval, xb, L, Laux, waux, block_signs, on_grid, on_grid_aux, prev):
    """One super-block of ``quantize_row_iq2_s_impl`` (``has_qw`` False: quant_weights == NULL)."""
    for i in range(S_BYTES):
        out[oo + i] = 0
    max_scale = _F(0.0)
    sigma2 = _F(2.0) * _sumx2(x, xo) / _F(QK_K)
    for ib in range(QK_K // 16):
        _sub_block_weights(x, xo + 16 * ib, qw, qo + 16 * ib, has_qw, sigma2, 16, weight, waux, xb)
        for k in range(2):
            s = 0
            for i in range(8):
                v = xb[8 * k + i]
                if v >= _F(0.0):
                    xval[8 * k + i] = v
                else:
                    xval[8 * k + i] = -v
                    s |= 1 << i
            block_signs[k] = s
        vmax = xval[0]
        for i in range(1, 16):
            vmax = _fmax(vmax, xval[i])
        for i in range(16):
            L[i] = 0
        if vmax < GROUP_MAX_EPS_IQ2_S:
            scales[ib] = 0
            continue
        scale, ok = _search_sub_block_16(xval, weight, waux, L, Laux, on_grid, on_grid_aux, prev, vmax,
                                         tables, terms)
        if not ok:
            return False
        if scale < _F(0.0):
            scale = -scale
            for k in range(2):
                block_signs[k] = (~block_signs[k]) & 255
        for k in range(2):
            gi = tables[2][_group_code(L, 8 * k)]
            if gi < 0:
                return False  # "Oops: found point not on grid"
            i8 = 2 * ib + k
            out[oo + S_QS + i8] = np.uint8(gi & 255)
            out[oo + S_QH + i8 // 4] |= np.uint8((gi >> 8) << (2 * (i8 % 4)))
            out[oo + S_SIGNS + i8] = np.uint8(block_signs[k])
        if not scale >= _F(0.0):
            return False  # GGML_ASSERT(scale >= 0)
        scales[ib] = scale
        max_scale = _fmax(max_scale, scale)

    if max_scale == _F(0.0):
        return True  # the grid and sign bytes written above stay, with d = 0
    d = max_scale / _F(31.0)
    store_fp16(out, oo + S_D, d * _F(0.9875))
    idv = _F(1.0) / d
    for ib in range(QK_K // 16):
        l = nearest_int(_F(0.5) * (idv * scales[ib] - _F(1.0)))
        l = max(0, min(15, l))
        out[oo + S_SCALES + ib // 2] |= np.uint8(l << (4 * (ib % 2)))
    return True


def _quantize_iq2_xs(x, qw, out, tables, ok):
    run_chunks(_quantize_iq2_xs_rows, x.shape[0], x, qw, out, tables, ok)


@njit(cache=True, nogil=True)
def _quantize_iq2_xs_rows(x, qw, out, tables, ok, r0, r1):
    nb = x.shape[1] // QK_K
    for r in range(r0, r1):
        scales = np.empty(16, np.float32)
        weight = np.empty(16, np.float32)
        xval = np.empty(16, np.float32)
        xb = np.empty(16, np.float32)
        L = np.empty(16, np.int8)
        Laux = np.empty(16, np.int8)
        waux = np.empty(16, np.float32)
        block_signs = np.empty(2, np.int64)
        q2 = np.empty(32, np.uint16)
        on_grid = np.empty(2, np.bool_)
        on_grid_aux = np.empty(2, np.bool_)
        prev = np.empty(2, np.int64)
        terms = np.empty(32, np.float32)
        xr = x[r]
        outr = out[r]
        for ibl in range(nb):
            ok[r, ibl] = quantize_block_iq2_xs(xr, QK_K * ibl, qw, QK_K * ibl, outr, XS_BYTES * ibl,
                                               tables, terms, scales, weight, xval, xb, L, Laux,
                                               waux, block_signs, q2, on_grid, on_grid_aux, prev)


def _quantize_iq2_s(x, qw, has_qw, out, tables, ok):
    run_chunks(_quantize_iq2_s_rows, x.shape[0], x, qw, has_qw, out, tables, ok)


@njit(cache=True, nogil=True)
def _quantize_iq2_s_rows(x, qw, has_qw, out, tables, ok, r0, r1):
    nb = x.shape[1] // QK_K
    for r in range(r0, r1):
        scales = np.empty(16, np.float32)
        weight = np.empty(16, np.float32)
        xval = np.empty(16, np.float32)
        xb = np.empty(16, np.float32)
        L = np.empty(16, np.int8)
        Laux = np.empty(16, np.int8)
        waux = np.empty(16, np.float32)
        block_signs = np.empty(2, np.int64)
        on_grid = np.empty(2, np.bool_)
        on_grid_aux = np.empty(2, np.bool_)
        prev = np.empty(2, np.int64)
        terms = np.empty(32, np.float32)
        xr = x[r]
        outr = out[r]
        for ibl in range(nb):
            ok[r, ibl] = quantize_block_iq2_s(xr, QK_K * ibl, qw, QK_K * ibl, has_qw, outr, S_BYTES * ibl,
                                              tables, terms, scales, weight, xval, xb, L, Laux,
                                              waux, block_signs, on_grid, on_grid_aux, prev)


# --------------------------------------------------------------------------------------------------------
# registered kernels: pass the tables, turn ggml's aborts into errors
# --------------------------------------------------------------------------------------------------------
@functools.cache
def _search_tables(name):
    """The kernels' ``tables`` tuple: (lattice, term_index, kmap, neighbours).

    lattice[g]: the coordinates l = (p - 1) / 2 in {0, 1, 2} of grid point g; term_index[g]: bytes 4*i + l_i
    (see iq2_find_best_neighbour); kmap and neighbours as :func:`.iq_grids.iq2_grid_tables` builds them.
    """
    grid, kmap, neighbours = iq2_grid_tables(name)
    lattice = ((grid.view(np.int8).reshape(-1, 8) - 1) // 2).astype(np.int8)
    positions = lattice.astype(np.uint64) + np.uint64(4) * np.arange(8, dtype=np.uint64)
    term_index = np.bitwise_or.reduce(positions << (np.uint64(8) * np.arange(8, dtype=np.uint64)), axis=1)
    for a in (lattice, term_index):
        a.flags.writeable = False
    return lattice, term_index, kmap, neighbours


def _raise_on_abort(name, ok):
    if not ok.all():
        r, b = np.argwhere(~ok)[0]
        raise QuantizeError(f"{name}: row {r}, block {b}: ggml aborts on this block (no grid point fits; "
                            f"the values or importance weights are out of range)")


@register_kernel("IQ2_XXS", "quantize_imatrix")
def quantize_imatrix_iq2_xxs(x, qw, out):
    """IQ2_XXS with importance matrix ``qw`` (n_per_row,): bytes of ggml_quantize_chunk(IQ2_XXS, ..., qw).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    >>> out = np.empty((2, 66), np.uint8); quantize_imatrix_iq2_xxs(x, np.ones(256, np.float32), out)
    """
    ok = np.ones((x.shape[0], x.shape[1] // QK_K), np.bool_)
    _quantize_iq2_xxs(x, qw, out, _search_tables("IQ2_XXS"), ok)
    _raise_on_abort("IQ2_XXS", ok)


@register_kernel("IQ2_XS", "quantize_imatrix")
def quantize_imatrix_iq2_xs(x, qw, out):
    """IQ2_XS with importance matrix ``qw`` (quantize_row_iq2_xs_impl)."""
    ok = np.ones((x.shape[0], x.shape[1] // QK_K), np.bool_)
    _quantize_iq2_xs(x, qw, out, _search_tables("IQ2_XS"), ok)
    _raise_on_abort("IQ2_XS", ok)


@register_kernel("IQ2_S", "quantize")
def quantize_iq2_s(x, out):
    """IQ2_S without importance matrix (quantize_iq2_s with quant_weights NULL)."""
    ok = np.ones((x.shape[0], x.shape[1] // QK_K), np.bool_)
    _quantize_iq2_s(x, np.zeros(1, np.float32), False, out, _search_tables("IQ2_S"), ok)
    _raise_on_abort("IQ2_S", ok)


@register_kernel("IQ2_S", "quantize_imatrix")
def quantize_imatrix_iq2_s(x, qw, out):
    """IQ2_S with importance matrix ``qw`` (quantize_row_iq2_s_impl)."""
    ok = np.ones((x.shape[0], x.shape[1] // QK_K), np.bool_)
    _quantize_iq2_s(x, qw, True, out, _search_tables("IQ2_S"), ok)
    _raise_on_abort("IQ2_S", ok)


# --------------------------------------------------------------------------------------------------------
# dequantize_row_iq2_xxs / _xs / _s
# --------------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always")
def _put_group(y, yo, dl, gridb, g, signs, kmask):
    for j in range(8):
        v = dl * _F(gridb[g, j])
        y[yo + j] = -v if signs & kmask[j] else v  # C: v * (sign ? -1.f : 1.f), exact


def _dequantize_iq2_xxs(raw, out, gridb, ksigns, kmask):
    run_chunks(_dequantize_iq2_xxs_rows, out.shape[0], raw, out, gridb, ksigns, kmask)


@njit(cache=True, nogil=True)
def _dequantize_iq2_xxs_rows(raw, out, gridb, ksigns, kmask, r0, r1):
    nb = out.shape[1] // QK_K
    for r in range(r0, r1):
        rr = raw[r]
        y = out[r]
        for i in range(nb):
            bo = i * XXS_BYTES
            d = load_fp16(rr, bo + XXS_D)
            for ib32 in range(QK_K // 32):
                qo = bo + XXS_QS + 8 * ib32
                aux1 = (np.uint32(rr[qo + 4]) | (np.uint32(rr[qo + 5]) << np.uint32(8))
                        | (np.uint32(rr[qo + 6]) << np.uint32(16)) | (np.uint32(rr[qo + 7]) << np.uint32(24)))
                db = d * (_F(0.5) + _F(aux1 >> np.uint32(28))) * _F(0.25)
                for l in range(4):
                    signs = ksigns[(aux1 >> np.uint32(7 * l)) & np.uint32(127)]
                    _put_group(y, i * QK_K + 32 * ib32 + 8 * l, db, gridb, rr[qo + l], signs, kmask)


def _dequantize_iq2_xs(raw, out, gridb, ksigns, kmask):
    run_chunks(_dequantize_iq2_xs_rows, out.shape[0], raw, out, gridb, ksigns, kmask)


@njit(cache=True, nogil=True)
def _dequantize_iq2_xs_rows(raw, out, gridb, ksigns, kmask, r0, r1):
    nb = out.shape[1] // QK_K
    for r in range(r0, r1):
        rr = raw[r]
        y = out[r]
        for i in range(nb):
            bo = i * XS_BYTES
            d = load_fp16(rr, bo + XS_D)
            for ib32 in range(QK_K // 32):
                sc = rr[bo + XS_SCALES + ib32]
                db0 = d * (_F(0.5) + _F(sc & 0xF)) * _F(0.25)
                db1 = d * (_F(0.5) + _F(sc >> 4)) * _F(0.25)
                for l in range(4):
                    qo = bo + XS_QS + 2 * (4 * ib32 + l)
                    q = np.int64(rr[qo]) | (np.int64(rr[qo + 1]) << 8)
                    _put_group(y, i * QK_K + 32 * ib32 + 8 * l, db0 if l < 2 else db1, gridb, q & 511,
                               ksigns[q >> 9], kmask)


def _dequantize_iq2_s(raw, out, gridb, kmask):
    run_chunks(_dequantize_iq2_s_rows, out.shape[0], raw, out, gridb, kmask)


@njit(cache=True, nogil=True)
def _dequantize_iq2_s_rows(raw, out, gridb, kmask, r0, r1):
    nb = out.shape[1] // QK_K
    for r in range(r0, r1):
        rr = raw[r]
        y = out[r]
        for i in range(nb):
            bo = i * S_BYTES
            d = load_fp16(rr, bo + S_D)
            for ib32 in range(QK_K // 32):
                sc = rr[bo + S_SCALES + ib32]
                db0 = d * (_F(0.5) + _F(sc & 0xF)) * _F(0.25)
                db1 = d * (_F(0.5) + _F(sc >> 4)) * _F(0.25)
                qh = np.int64(rr[bo + S_QH + ib32])
                for l in range(4):
                    g = np.int64(rr[bo + S_QS + 4 * ib32 + l]) | ((qh << (8 - 2 * l)) & 0x300)
                    _put_group(y, i * QK_K + 32 * ib32 + 8 * l, db0 if l < 2 else db1, gridb, g,
                               rr[bo + S_SIGNS + 4 * ib32 + l], kmask)


def _grid_bytes(grid):
    return grid.view(np.uint8).reshape(-1, 8)


@register_kernel("IQ2_XXS", "dequantize")
def dequantize_iq2_xxs(raw, out):
    """ggml's dequantize_row_iq2_xxs over every row of ``raw`` into float32 ``out``."""
    _dequantize_iq2_xxs(raw, out, _grid_bytes(grids.iq2xxs_grid), grids.ksigns_iq2xs, grids.kmask_iq2xs)


@register_kernel("IQ2_XS", "dequantize")
def dequantize_iq2_xs(raw, out):
    """ggml's dequantize_row_iq2_xs."""
    _dequantize_iq2_xs(raw, out, _grid_bytes(grids.iq2xs_grid), grids.ksigns_iq2xs, grids.kmask_iq2xs)


@register_kernel("IQ2_S", "dequantize")
def dequantize_iq2_s(raw, out):
    """ggml's dequantize_row_iq2_s."""
    _dequantize_iq2_s(raw, out, _grid_bytes(grids.iq2s_grid), grids.kmask_iq2xs)
