"""IQ3_XXS and IQ3_S codecs (ggml-quants.c, "3.0625 bpw" / "3.4375 bpw"), bit for bit.

Both snap groups of 4 scaled magnitudes to points of a lattice grid (coordinates 1, 3, .., 15) and keep the
signs apart.  ``ggml_quantize_init`` builds, once per grid size, the tables the quantizers search
(``iq3xs_init_impl(grid_size)``, ported in :func:`iq3_grid_tables`):

    grid_size  kgrid table (grids.py)  nwant  type      decode table (grids.py)
    ---------  ----------------------  -----  --------  -----------------------
          256  kgrid_256                   2  IQ3_XXS   iq3xxs_grid
          512  kgrid_512                   3  IQ3_S     iq3s_grid

* ``grid``: uint32[grid_size], byte i of entry k = ``2*l + 1`` with ``l`` the i-th 3-bit field of kgrid[k].
  For IQ3_S it equals the decode table; IQ3_XXS decodes the same points with coordinates 1, 3, .., 13, 15
  stored as 4, 12, .., 52, 62 (tests/test_codecs_iq3.py checks both).
* ``kmap``: int32[4096], indexed by a point's code ``sum(l_i << 3*i)``.  ``>= 0``: the grid entry;
  ``< 0``: off the grid, and its neighbour record starts at ``neighbours[-kmap[code] - 1]``.
* ``neighbours``: uint16, one record ``[n, j_1, .., j_n]`` per off-grid code in code order: the grid entries at
  the ``nwant`` smallest distinct squared distances, ordered by (distance, index) as ggml's ``qsort`` with
  ``iq3_compare_func`` leaves them.  The searches keep the first strictly better candidate, so this order
  decides ties.

Quantization (``quantize_row_iq3_xxs_impl(256, ..)`` / ``quantize_row_iq3_s_impl``), per 32-value sub-block:
weights ``x^2`` (or ``qw * sqrt(sigma2 + x^2)`` with an importance matrix), magnitudes ``xval = |x|``, then
31 (XXS) or 19 (S) trial scales; each rounds the groups of 4 to the lattice and replaces off-grid groups by
their best neighbour (``iq3_find_best_neighbour``, weighted by ``sqrt(weight)``); the trial with the best
``sumqx^2/sumq2`` wins.  Off-grid groups are re-snapped at the winning scale, then the scale is refit.
Differences between the two that matter for bytes: XXS stores 7 sign bits per 8 values (an odd number of
negatives flips the least important value, whose ``xval`` then stays negative), treats ``max < 1e-8`` as zero,
starts "on grid" true and re-snaps only off-grid groups; S stores 8 sign bits, tests ``max == 0``, starts
false and re-snaps every group — and, as in ggml, an all-zero sub-block does not advance S's ``qs`` / ``signs``
write positions (later sub-blocks shift down, the tail stays zero; ``qh`` bits are indexed by sub-block).

Float evaluation follows C: float32 throughout, left to right (``w*xval[i]*q`` is ``(w*xval[i])*q``), ints
converted before they meet a float, no FMA; ``nearest_int`` rounds half to even.

Speed-ups that keep every rounding (2-3x ggml's speed on one thread): the trial scales of a sub-block are
rounded and summed side by side, one vector lane per trial, and only compared in C's order; the neighbour
search reads coordinate planes (float32, exact small ints) so its distances vectorize; its indices are
unsigned, or into views, so that Numba's negative-index wraparound does not turn loads into gathers.

Layouts::

    IQ3_XXS (98 bytes):  d fp16 | qs[64]: grid index per group of 4 | 8 x uint32 scales_and_signs
        scales_and_signs[ib] = signs0 | signs1 << 7 | signs2 << 14 | signs3 << 21 | scale4 << 28
        (7 sign bits per 8 values; the 8th is the parity, ksigns_iq2xs restores it)
        x = d * (0.5 + scale4) * 0.5 * grid[qs] * sign
    IQ3_S (110 bytes):   d fp16 | qs[64]: low 8 bits of grid index | qh[8]: bit k of qh[ib] = bit 8 of the
        index of group k of sub-block ib | signs[32]: 1 bit per value | scales[4]: two 4-bit scales per byte
        x = d * (1 + 2*scale4) * grid[index] * sign
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from . import grids
from ..types import QK_K, register_kernel, type_info
from .chunks import run_chunks
from .helpers import load_fp16, nearest_int, store_fp16

KMAP_SIZE = 4096  # 4 coordinates of 3 bits
MAX_NEIGHBOURS = 64  # longest neighbour record the kernels' scratch holds (ggml's tables: 36 and 38)
_F32 = np.float32

_XXS = type_info("IQ3_XXS")
_S = type_info("IQ3_S")
XXS_QS = _XXS.field_offset("qs")
S_QS, S_QH, S_SIGNS, S_SCALES = (_S.field_offset(f) for f in ("qs", "qh", "signs", "scales"))
_XXS_BYTES = _XXS.type_size
_S_BYTES = _S.type_size


# ---------------------------------------------------------------------------------------------------
# iq3xs_init_impl(grid_size)
# ---------------------------------------------------------------------------------------------------


@functools.cache
def iq3_grid_tables(grid_size: int):
    """``(grid, kmap, neighbours)`` as ``iq3xs_init_impl(grid_size)`` builds them (256: IQ3_XXS, 512: IQ3_S).

    >>> grid, kmap, neighbours = iq3_grid_tables(256)
    >>> grid.shape, kmap.shape
    ((256,), (4096,))
    """
    if grid_size not in (256, 512):
        raise ValueError(f"IQ3 grids have 256 or 512 entries, not {grid_size}")
    kgrid = grids.kgrid_256 if grid_size == 256 else grids.kgrid_512
    grid, kmap, neighbours = _iq3xs_init_impl(kgrid, 2 if grid_size == 256 else 3)
    for a in (grid, kmap, neighbours):
        a.flags.writeable = False
    return grid, kmap, neighbours


@functools.cache
def _search_tables(grid_size: int):
    """The kernels' arguments, derived from :func:`iq3_grid_tables`.

    ``kmap``, ``neighbours`` (int32), the grid as float32 coordinates and as int8 levels ``(c - 1) / 2``, and
    the neighbour records re-laid as coordinate planes for :func:`_best_neighbour_planes`: the record of an
    off-grid code u has ``n = rec_n[u]`` entries, padded to ``n8`` (a multiple of 8, NaN coordinates);
    coordinate i of entry e is ``rc[rec_at[u] + i*n8 + e]`` and its grid index ``rg[rec_at[u] // 4 + e]``.
    """
    grid, kmap, neighbours = iq3_grid_tables(grid_size)
    coords = grid.view(np.int8).reshape(grid_size, 4)
    levels = ((coords - 1) // 2).astype(np.int8)
    off = np.flatnonzero(kmap < 0)
    heads = -kmap[off] - 1
    rec_n = np.zeros(KMAP_SIZE, np.int32)
    rec_n[off] = neighbours[heads]
    assert rec_n.max() <= MAX_NEIGHBOURS
    n8 = (rec_n + 7) // 8 * 8
    rec_at = (4 * (np.cumsum(n8) - n8)).astype(np.int32)
    rc = np.full(4 * n8.sum(), np.nan, np.float32)
    rg = np.zeros(n8.sum(), np.int32)
    for u, h in zip(off, heads):
        g = neighbours[h + 1:h + 1 + rec_n[u]]
        for i in range(4):
            rc[rec_at[u] + i * n8[u]:rec_at[u] + i * n8[u] + rec_n[u]] = coords[g, i]
        rg[rec_at[u] // 4:rec_at[u] // 4 + rec_n[u]] = g
    return (kmap, neighbours.astype(np.int32), coords.astype(np.float32), levels,
            rec_n, rec_at, rc, rg)


@njit(cache=True, nogil=True)
def _iq3xs_init_impl(kgrid, nwant):
    grid_size = kgrid.shape[0]
    grid = np.zeros(grid_size, dtype=np.uint32)
    for k in range(grid_size):
        v = np.uint32(0)
        for i in range(4):
            l = (np.int64(kgrid[k]) >> (3 * i)) & 7
            v |= np.uint32(2 * l + 1) << np.uint32(8 * i)
        grid[k] = v
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int32)
    for k in range(grid_size):
        index = 0
        for i in range(4):
            b = np.int64((grid[k] >> np.uint32(8 * i)) & np.uint32(0xFF))
            index |= ((b - 1) // 2) << (3 * i)
        kmap[index] = k
    # ggml sorts (d2, j) pairs with qsort and a total order; sorting d2 * grid_size + j is the same order.
    neighbours = np.zeros(KMAP_SIZE * (grid_size + 1), dtype=np.uint16)
    keys = np.empty(grid_size, dtype=np.int64)
    counter = 0
    for code in range(KMAP_SIZE):
        if kmap[code] >= 0:
            continue
        for j in range(grid_size):
            d2 = 0
            for k in range(4):
                diff = np.int64((grid[j] >> np.uint32(8 * k)) & np.uint32(0xFF)) - (2 * ((code >> (3 * k)) & 7) + 1)
                d2 += diff * diff
            keys[j] = d2 * grid_size + j
        keys.sort()
        kmap[code] = -(counter + 1)
        start = counter
        counter += 1
        d2 = keys[0] // grid_size
        n = 0
        nhave = 1
        for j in range(grid_size):
            if keys[j] // grid_size > d2:
                if nhave == nwant:
                    break
                d2 = keys[j] // grid_size
                nhave += 1
            neighbours[counter] = keys[j] % grid_size
            counter += 1
            n += 1
        neighbours[start] = n
    return grid, kmap, neighbours[:counter].copy()


# ---------------------------------------------------------------------------------------------------
# Shared search (the part of quantize_row_iq3_xxs_impl and quantize_row_iq3_s_impl both run per sub-block)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def iq3_find_best_neighbour(nbrs, at, coords, xval, x0, weight, scale):
    """Port of ggml's ``iq3_find_best_neighbour`` for the record at ``nbrs[at]`` and ``xval[x0:x0+4]``.

    Returns the grid index of the first neighbour with the smallest weighted distance (the caller writes its
    levels).  ggml asserts a winner exists (a NaN distance never wins); here the first neighbour stands in.
    """
    best_d2 = _F32(3.4028234663852886e38)  # FLT_MAX
    grid_index = -1
    for j in range(1, nbrs[at] + 1):
        g = nbrs[at + j]
        d2 = _F32(0.0)
        for i in range(4):
            diff = _F32(scale * coords[g, i] - xval[x0 + i])
            d2 = _F32(d2 + weight[x0 + i] * diff * diff)
        if d2 < best_d2:
            best_d2 = d2
            grid_index = g
    return grid_index if grid_index >= 0 else nbrs[at + 1]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _best_neighbour_planes(u, rec_n, rec_at, rc, rg, xval, x0, weight, scale, dd):
    """iq3_find_best_neighbour for off-grid code ``u`` (tables of :func:`_search_tables`): same result, faster.

    The distances to the record's neighbours (each C's exact chain of operations) are computed side by side
    from coordinate planes — a loop that vectorizes, where C's loop reads the grid point by point — then
    scanned in C's order ("first strictly smaller wins", so NaN never wins; ggml asserts a winner exists,
    here the first entry stands in).
    """
    n = rec_n[u]
    n8 = (n + 7) & ~7
    b = rec_at[u]
    ch = rc[b:]
    m = np.uint64(n8)  # unsigned indices: Numba adds no negative-index wraparound, so the loop vectorizes
    x_0, x_1, x_2, x_3 = xval[x0], xval[x0 + 1], xval[x0 + 2], xval[x0 + 3]
    w_0, w_1, w_2, w_3 = weight[x0], weight[x0 + 1], weight[x0 + 2], weight[x0 + 3]
    for j in range(m):
        diff = _F32(scale * ch[j] - x_0)
        d = _F32(_F32(0.0) + w_0 * diff * diff)
        diff = _F32(scale * ch[m + j] - x_1)
        d = _F32(d + w_1 * diff * diff)
        diff = _F32(scale * ch[m + m + j] - x_2)
        d = _F32(d + w_2 * diff * diff)
        diff = _F32(scale * ch[m + m + m + j] - x_3)
        dd[j] = _F32(d + w_3 * diff * diff)
    best_d2 = _F32(3.4028234663852886e38)  # FLT_MAX
    best = 0
    for j in range(n):
        if dd[j] < best_d2:
            best_d2 = dd[j]
            best = j
    return rg[rec_at[u] // 4 + best]


@njit(cache=True, nogil=True, error_model="numpy")
def _iq3_search(xval, weight, waux, max_, nis, recheck_all, tables, L, on_grid, Lt, ogt, tid, tsc, sqx, sq2, dd):
    """The scale search of one 32-value sub-block (``max_ > 0``).  Leaves levels in ``L``; returns the scale.

    ``nis``: trial steps ``is = -nis..nis`` (XXS 15, S 9); ``recheck_all``: S re-snaps every group at the
    final scale and starts with "on grid" false, XXS only the off-grid groups and starts true; ``tables``:
    :func:`_search_tables`.

    ggml runs the trials one after another; each trial's sums are a chain of dependent float additions.
    The trials are independent until the "best so far" comparison, so here all trials are rounded and
    summed side by side — trial t in column t of ``Lt`` (int32, 32 x 32) and ``ogt`` (bool, 8 x 32) and in
    ``tid``/``tsc``/``sqx``/``sq2`` (float32, 32) — each lane doing C's exact operations; the comparisons
    then run in C's order.  Columns nt..31 are padding: rounded and summed (so the loops have a whole
    vector's width) but never searched or compared.
    """
    kmap, nbrs, coords, levels, rec_n, rec_at, rc, rg = tables
    kMaxQ = 8
    nt = 2 * nis + 1
    lanes = Lt.shape[1]  # 32, a run-time value on purpose: LLVM would fully unroll a constant trip count
    for t in range(lanes):
        tid[t] = _F32(_F32(_F32(2 * kMaxQ - 1) + _F32(_F32(t - nis) * _F32(0.2))) / max_)
        tsc[t] = _F32(_F32(1.0) / tid[t])
    for i in range(32):
        xv = xval[i]
        for t in range(lanes):
            l = nearest_int(_F32(0.5) * _F32(_F32(tid[t] * xv) - _F32(1.0)))
            Lt[i, t] = max(0, min(kMaxQ - 1, l))
    for k in range(8):
        for t in range(nt):
            u = Lt[4 * k, t] | (Lt[4 * k + 1, t] << 3) | (Lt[4 * k + 2, t] << 6) | (Lt[4 * k + 3, t] << 9)
            g = kmap[u]
            ogt[k, t] = g >= 0
            if g < 0:
                g = _best_neighbour_planes(u, rec_n, rec_at, rc, rg, xval, 4 * k, waux, tsc[t], dd)
                for i in range(4):
                    Lt[4 * k + i, t] = levels[g, i]
    for t in range(lanes):
        sqx[t] = _F32(0.0)
        sq2[t] = _F32(0.0)
    for i in range(32):
        w = weight[i]
        wx = _F32(w * xval[i])  # C's w*xval[i]*q is (w*xval[i])*q
        for t in range(lanes):
            q = _F32(2 * Lt[i, t] + 1)
            sqx[t] = _F32(sqx[t] + wx * q)
            sq2[t] = _F32(sq2[t] + _F32(w * q) * q)
    best = _F32(0.0)
    scale = _F32(max_ / _F32(2 * kMaxQ - 1))
    win = -1
    for t in range(nt):
        if sq2[t] > _F32(0.0) and sqx[t] * sqx[t] > best * sq2[t]:
            scale = _F32(sqx[t] / sq2[t])
            best = _F32(scale * sqx[t])
            win = t
    for i in range(32):
        L[i] = 0 if win < 0 else Lt[i, win]
    for k in range(8):
        on_grid[k] = (not recheck_all) if win < 0 else ogt[k, win]
    n_not_ongrid = 0
    for k in range(8):
        if not on_grid[k]:
            n_not_ongrid += 1
    if n_not_ongrid > 0 and scale > _F32(0.0):
        id_ = _F32(_F32(1.0) / scale)
        for k in range(8):
            if on_grid[k] and not recheck_all:
                continue
            u = 0
            for i in range(4):
                l = nearest_int(_F32(0.5) * _F32(_F32(id_ * xval[4 * k + i]) - _F32(1.0)))
                u |= max(0, min(kMaxQ - 1, l)) << (3 * i)
            grid_index = kmap[u]
            if grid_index < 0:
                grid_index = iq3_find_best_neighbour(nbrs, -grid_index - 1, coords, xval, 4 * k, waux, scale)
            for i in range(4):
                L[4 * k + i] = levels[grid_index, i]
        sumqx = _F32(0.0)
        sumq2 = _F32(0.0)
        for i in range(32):
            w = weight[i]
            q = _F32(2 * L[i] + 1)
            sumqx = _F32(sumqx + w * xval[i] * q)
            sumq2 = _F32(sumq2 + w * q * q)
        if sumq2 > _F32(0.0):
            scale = _F32(sumqx / sumq2)
    return scale


@njit(cache=True, nogil=True, error_model="numpy")
def _iq3_weights(x, x0, qw, have_qw, q0, sigma2, weight, waux):
    """weight = x^2, or qw * sqrt(sigma2 + x^2) with an importance matrix; waux = sqrt(weight)."""
    for i in range(32):
        xi = x[x0 + i]
        if have_qw:
            weight[i] = _F32(qw[q0 + i] * np.sqrt(_F32(sigma2 + xi * xi)))
        else:
            weight[i] = _F32(xi * xi)
    for i in range(32):
        waux[i] = np.sqrt(weight[i])


@njit(cache=True, nogil=True, error_model="numpy")
def _sigma2(x, x0):
    sumx2 = _F32(0.0)
    for i in range(QK_K):
        sumx2 = _F32(sumx2 + x[x0 + i] * x[x0 + i])
    return _F32(_F32(_F32(2.0) * sumx2) / _F32(QK_K))


# ---------------------------------------------------------------------------------------------------
# IQ3_XXS
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_iq3_xxs_impl(x, qw, have_qw, y, tables):
    """Port of ``quantize_row_iq3_xxs_impl(256, x, y, n, qw or NULL)`` for one row ``x`` into bytes ``y``."""
    kmap = tables[0]
    bs = _XXS_BYTES
    scales = np.empty(8, np.float32)
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.empty(32, np.int32)
    on_grid = np.empty(8, np.bool_)
    Lt = np.empty((32, 32), np.int32)  # trial lanes of _iq3_search (31 trials at most)
    ogt = np.empty((8, 32), np.bool_)
    tid = np.empty(32, np.float32)
    tsc = np.empty(32, np.float32)
    sqx = np.empty(32, np.float32)
    sq2 = np.empty(32, np.float32)
    dd = np.empty(MAX_NEIGHBOURS, np.float32)
    block_signs = np.empty(4, np.int64)
    q3 = np.empty(96, np.uint8)  # 64 grid indices, then 8 little-endian uint32 scales_and_signs
    sas = np.empty(8, np.uint32)
    for ibl in range(x.shape[0] // QK_K):
        x0 = QK_K * ibl
        y0 = bs * ibl
        for i in range(64):
            q3[i] = 0
        for ib in range(8):
            sas[ib] = 0
        max_scale = _F32(0.0)
        sigma2 = _sigma2(x, x0)
        for ib in range(8):
            xb = x0 + 32 * ib
            _iq3_weights(x, xb, qw, have_qw, xb, sigma2, weight, waux)
            for k in range(4):
                nflip = 0
                s = 0
                for i in range(8):
                    v = x[xb + 8 * k + i]
                    if v >= _F32(0.0):
                        xval[8 * k + i] = v
                    else:
                        xval[8 * k + i] = -v
                        nflip += 1
                        s |= 1 << i
                if nflip % 2:  # 7 sign bits only: make the count even by flipping the least important value
                    imin = 0
                    v = x[xb + 8 * k]
                    vmin = _F32(weight[8 * k] * v * v)
                    for i in range(1, 8):
                        v = x[xb + 8 * k + i]
                        ax = _F32(weight[8 * k + i] * v * v)
                        if ax < vmin:
                            vmin = ax
                            imin = i
                    xval[8 * k + imin] = -xval[8 * k + imin]
                    s ^= 1 << imin
                block_signs[k] = s & 127
            max_ = xval[0]
            for i in range(1, 32):
                max_ = max_ if max_ > xval[i] else xval[i]  # MAX(max, xval[i])
            if max_ < _F32(1e-8):  # GROUP_MAX_EPS_IQ3_XXS
                scales[ib] = _F32(0.0)
                continue
            scale = _iq3_search(xval, weight, waux, max_, 15, False, tables, L, on_grid, Lt, ogt, tid, tsc, sqx, sq2,
                                dd)
            if scale < _F32(0.0):
                scale = -scale
                for k in range(4):
                    block_signs[k] = (~block_signs[k]) & 127
            for k in range(8):
                u = 0
                for i in range(4):
                    u |= np.int64(L[4 * k + i]) << (3 * i)
                q3[8 * ib + k] = kmap[u]  # always on the grid here (ggml aborts otherwise)
            sas[ib] = np.uint32(block_signs[0] | (block_signs[1] << 7) | (block_signs[2] << 14)
                                | (block_signs[3] << 21))
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        store_fp16(y, y0, _F32(0.0))
        if not max_scale:
            for i in range(bs - 2):
                y[y0 + XXS_QS + i] = 0
            continue
        d = _F32(max_scale / _F32(31.0))
        store_fp16(y, y0, _F32(d * _F32(1.0125)))
        id_ = _F32(_F32(1.0) / d)
        for ib in range(8):
            l = nearest_int(_F32(0.5) * _F32(_F32(id_ * scales[ib]) - _F32(1.0)))
            l = max(0, min(15, l))
            sas[ib] |= np.uint32(l) << np.uint32(28)
        for i in range(64):
            y[y0 + XXS_QS + i] = q3[i]
        for ib in range(8):
            for b in range(4):
                y[y0 + XXS_QS + 64 + 4 * ib + b] = np.uint8((sas[ib] >> np.uint32(8 * b)) & np.uint32(0xFF))


def _quantize_iq3_xxs(x, qw, have_qw, out, tables):
    run_chunks(_quantize_iq3_xxs_rows, x.shape[0], x, qw, have_qw, out, tables)


@njit(cache=True, nogil=True)
def _quantize_iq3_xxs_rows(x, qw, have_qw, out, tables, r0, r1):
    for r in range(r0, r1):
        quantize_row_iq3_xxs_impl(x[r], qw, have_qw, out[r], tables)


@register_kernel("IQ3_XXS", "quantize")
def quantize_iq3_xxs(x, out):
    """IQ3_XXS of float32 rows ``x`` into ``out``: bytes of ggml_quantize_chunk(IQ3_XXS, .., imatrix NULL).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    >>> out = np.empty((2, 98), np.uint8); quantize_iq3_xxs(x, out)
    """
    _quantize_iq3_xxs(x, np.empty(0, np.float32), False, out, _search_tables(256))


@register_kernel("IQ3_XXS", "quantize_imatrix")
def quantize_imatrix_iq3_xxs(x, qw, out):
    """IQ3_XXS with importance matrix ``qw`` (n_per_row,) (quantize_iq3_xxs with quant_weights)."""
    _quantize_iq3_xxs(x, qw, True, out, _search_tables(256))


@njit(cache=True, nogil=True, error_model="numpy")
def dequantize_row_iq3_xxs(raw, y, grid8, ksigns, kmask):
    """Port of ``dequantize_row_iq3_xxs`` for one row: ``grid8`` is iq3xxs_grid viewed as bytes."""
    for i in range(y.shape[0] // QK_K):
        r0 = _XXS_BYTES * i
        d = load_fp16(raw, r0)
        qs = r0 + XXS_QS
        sas = qs + QK_K // 4
        y0 = QK_K * i
        for ib32 in range(8):
            p = sas + 4 * ib32
            aux32 = (np.uint32(raw[p]) | (np.uint32(raw[p + 1]) << np.uint32(8))
                     | (np.uint32(raw[p + 2]) << np.uint32(16)) | (np.uint32(raw[p + 3]) << np.uint32(24)))
            db = _F32(_F32(d * _F32(_F32(0.5) + _F32(aux32 >> np.uint32(28)))) * _F32(0.5))
            for l in range(4):
                signs = ksigns[(aux32 >> np.uint32(7 * l)) & np.uint32(127)]
                g1 = 4 * np.int64(raw[qs + 8 * ib32 + 2 * l])
                g2 = 4 * np.int64(raw[qs + 8 * ib32 + 2 * l + 1])
                o = y0 + 32 * ib32 + 8 * l
                for j in range(4):
                    v1 = _F32(db * _F32(grid8[g1 + j]))
                    v2 = _F32(db * _F32(grid8[g2 + j]))
                    y[o + j] = _F32(v1 * (_F32(-1.0) if signs & kmask[j] else _F32(1.0)))
                    y[o + j + 4] = _F32(v2 * (_F32(-1.0) if signs & kmask[j + 4] else _F32(1.0)))


def _dequantize_iq3_xxs(raw, out, grid8, ksigns, kmask):
    run_chunks(_dequantize_iq3_xxs_rows, out.shape[0], raw, out, grid8, ksigns, kmask)


@njit(cache=True, nogil=True)
def _dequantize_iq3_xxs_rows(raw, out, grid8, ksigns, kmask, r0, r1):
    for r in range(r0, r1):
        dequantize_row_iq3_xxs(raw[r], out[r], grid8, ksigns, kmask)


@register_kernel("IQ3_XXS", "dequantize")
def dequantize_iq3_xxs(raw, out):
    """Decode IQ3_XXS rows ``raw`` (n_rows, row_bytes) into float32 ``out`` as ggml's dequantize_row_iq3_xxs."""
    _dequantize_iq3_xxs(raw, out, grids.iq3xxs_grid.view(np.uint8), grids.ksigns_iq2xs, grids.kmask_iq2xs)


# ---------------------------------------------------------------------------------------------------
# IQ3_S
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_iq3_s_impl(x, qw, have_qw, y, tables):
    """Port of ``quantize_row_iq3_s_impl(32, x, y, n, qw or NULL, ..)`` for one row ``x`` into bytes ``y``."""
    kmap = tables[0]
    bs = _S_BYTES
    scales = np.empty(8, np.float32)
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.empty(32, np.int32)
    on_grid = np.empty(8, np.bool_)
    Lt = np.empty((32, 32), np.int32)  # trial lanes of _iq3_search (31 trials at most)
    ogt = np.empty((8, 32), np.bool_)
    tid = np.empty(32, np.float32)
    tsc = np.empty(32, np.float32)
    sqx = np.empty(32, np.float32)
    sq2 = np.empty(32, np.float32)
    dd = np.empty(MAX_NEIGHBOURS, np.float32)
    block_signs = np.empty(4, np.uint8)
    for ibl in range(x.shape[0] // QK_K):
        x0 = QK_K * ibl
        y0 = bs * ibl
        for i in range(bs):
            y[y0 + i] = 0
        qs = y0 + S_QS  # advanced only past sub-blocks with a nonzero max, as in ggml
        signs = y0 + S_SIGNS
        max_scale = _F32(0.0)
        sigma2 = _sigma2(x, x0)
        for ib in range(8):
            xb = x0 + 32 * ib
            _iq3_weights(x, xb, qw, have_qw, xb, sigma2, weight, waux)
            for k in range(4):
                s = 0
                for i in range(8):
                    v = x[xb + 8 * k + i]
                    if v >= _F32(0.0):
                        xval[8 * k + i] = v
                    else:
                        xval[8 * k + i] = -v
                        s |= 1 << i
                block_signs[k] = s
            max_ = xval[0]
            for i in range(1, 32):
                max_ = max_ if max_ > xval[i] else xval[i]
            if not max_:
                scales[ib] = _F32(0.0)
                continue
            scale = _iq3_search(xval, weight, waux, max_, 9, True, tables, L, on_grid, Lt, ogt, tid, tsc, sqx, sq2,
                                dd)
            if scale < _F32(0.0):
                scale = -scale
                for k in range(4):
                    block_signs[k] = ~block_signs[k]
            for k in range(8):
                u = 0
                for i in range(4):
                    u |= np.int64(L[4 * k + i]) << (3 * i)
                grid_index = kmap[u]  # always on the grid here (ggml aborts otherwise)
                y[qs + k] = grid_index & 255
                y[y0 + S_QH + ib] |= (grid_index >> 8) << k
            qs += 8
            for k in range(4):
                y[signs + k] = block_signs[k]
            signs += 4
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue
        d = _F32(max_scale / _F32(31.0))
        store_fp16(y, y0, _F32(d * _F32(1.033)))
        id_ = _F32(_F32(1.0) / d)
        for ib in range(0, 8, 2):
            l1 = nearest_int(_F32(0.5) * _F32(_F32(id_ * scales[ib]) - _F32(1.0)))
            l1 = max(0, min(15, l1))
            l2 = nearest_int(_F32(0.5) * _F32(_F32(id_ * scales[ib + 1]) - _F32(1.0)))
            l2 = max(0, min(15, l2))
            y[y0 + S_SCALES + ib // 2] = l1 | (l2 << 4)


def _quantize_iq3_s(x, qw, have_qw, out, tables):
    run_chunks(_quantize_iq3_s_rows, x.shape[0], x, qw, have_qw, out, tables)


@njit(cache=True, nogil=True)
def _quantize_iq3_s_rows(x, qw, have_qw, out, tables, r0, r1):
    for r in range(r0, r1):
        quantize_row_iq3_s_impl(x[r], qw, have_qw, out[r], tables)


@register_kernel("IQ3_S", "quantize")
def quantize_iq3_s(x, out):
    """IQ3_S of float32 rows ``x`` into ``out``: bytes of ggml_quantize_chunk(IQ3_S, .., imatrix NULL).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    >>> out = np.empty((2, 110), np.uint8); quantize_iq3_s(x, out)
    """
    _quantize_iq3_s(x, np.empty(0, np.float32), False, out, _search_tables(512))


@register_kernel("IQ3_S", "quantize_imatrix")
def quantize_imatrix_iq3_s(x, qw, out):
    """IQ3_S with importance matrix ``qw`` (n_per_row,) (quantize_iq3_s with quant_weights)."""
    _quantize_iq3_s(x, qw, True, out, _search_tables(512))


@njit(cache=True, nogil=True, error_model="numpy")
def dequantize_row_iq3_s(raw, y, grid8, kmask):
    """Port of ``dequantize_row_iq3_s`` for one row: ``grid8`` is iq3s_grid viewed as bytes."""
    for i in range(y.shape[0] // QK_K):
        r0 = _S_BYTES * i
        d = load_fp16(raw, r0)
        y0 = QK_K * i
        for ib32 in range(8):
            sc = raw[r0 + S_SCALES + ib32 // 2]
            sc = (sc >> np.uint8(4)) if ib32 & 1 else (sc & np.uint8(0xF))
            db = _F32(d * _F32(1 + 2 * np.int64(sc)))
            qh = np.int64(raw[r0 + S_QH + ib32])
            for l in range(4):
                qs = r0 + S_QS + 8 * ib32 + 2 * l
                g1 = 4 * (np.int64(raw[qs]) | ((qh << (8 - 2 * l)) & 256))
                g2 = 4 * (np.int64(raw[qs + 1]) | ((qh << (7 - 2 * l)) & 256))
                signs = raw[r0 + S_SIGNS + 4 * ib32 + l]
                o = y0 + 32 * ib32 + 8 * l
                for j in range(4):
                    v1 = _F32(db * _F32(grid8[g1 + j]))
                    v2 = _F32(db * _F32(grid8[g2 + j]))
                    y[o + j] = _F32(v1 * (_F32(-1.0) if signs & kmask[j] else _F32(1.0)))
                    y[o + j + 4] = _F32(v2 * (_F32(-1.0) if signs & kmask[j + 4] else _F32(1.0)))


def _dequantize_iq3_s(raw, out, grid8, kmask):
    run_chunks(_dequantize_iq3_s_rows, out.shape[0], raw, out, grid8, kmask)


@njit(cache=True, nogil=True)
def _dequantize_iq3_s_rows(raw, out, grid8, kmask, r0, r1):
    for r in range(r0, r1):
        dequantize_row_iq3_s(raw[r], out[r], grid8, kmask)


@register_kernel("IQ3_S", "dequantize")
def dequantize_iq3_s(raw, out):
    """Decode IQ3_S rows ``raw`` (n_rows, row_bytes) into float32 ``out`` as ggml's dequantize_row_iq3_s."""
    _dequantize_iq3_s(raw, out, grids.iq3s_grid.view(np.uint8), grids.kmask_iq2xs)
