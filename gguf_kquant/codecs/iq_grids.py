"""The IQ2/IQ1 search tables: a port of ggml-quants.c's ``iq2xs_init_impl(type)``.

ggml's IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M quantizers snap groups of 8 scaled values to points of a
lattice grid.  ``ggml_quantize_init(type)`` builds, once per grid, three tables that the quantizers search:

    grid_size  kgrid table (grids.py)  nwant  types
    ---------  ----------------------  -----  ----------------
          256  kgrid_2bit_256              2  IQ2_XXS
          512  kgrid_2bit_512              2  IQ2_XS
         1024  kgrid_2bit_1024             1  IQ2_S
         2048  kgrid_1bit_2048             3  IQ1_S, IQ1_M (one shared table)

API::

    grid, kmap, neighbours = iq2_grid_tables("IQ2_XXS")     # any TypeLike; built once per grid, then cached

* ``grid``: uint64[grid_size].  Entry k packs 8 int8 lattice coordinates, byte i = ``2*l + 1`` where ``l`` is
  the i-th 2-bit field of ``kgrid[k]`` (so coordinates are 1, 3, 5, 7).  ``grid.view(np.int8).reshape(-1, 8)``
  gives the points.
* ``kmap``: int32[43692], indexed by a point's code ``sum(l_i << 2*i)`` with ``l_i = (coord_i - 1) / 2``.
  ``kmap[code] >= 0``: the point is grid entry ``kmap[code]``.  ``kmap[code] < 0``: it is not on the grid, and
  its nearest grid entries start at ``neighbours[-kmap[code] - 1]``.
* ``neighbours``: uint16, one record per off-grid code, in code order: ``[n, j_1, ..., j_n]``.  The j are the
  grid entries at the ``nwant`` smallest distinct squared distances from the point, ordered by
  (distance, index) — exactly the order of ggml's ``qsort`` with ``iq2_compare_func``, which the quantizers'
  "first strictly better wins" searches depend on for bit-exact ties.

All arrays are read-only.  Kernels take them as arguments (Numba's cache would freeze a global).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from . import grids
from ..errors import UnknownTypeError
from ..types import GGMLType, type_info

KMAP_SIZE = 43692  # ggml: kmap_size; codes of points with coordinates in {1, 3, 5} are < 43692

# ggml type -> (kgrid table name in grids.py, nwant).  IQ1_S and IQ1_M share one grid (iq2_data_index).
_GRID_OF_TYPE = {
    GGMLType.IQ2_XXS: ("kgrid_2bit_256", 2),
    GGMLType.IQ2_XS: ("kgrid_2bit_512", 2),
    GGMLType.IQ2_S: ("kgrid_2bit_1024", 1),
    GGMLType.IQ1_S: ("kgrid_1bit_2048", 3),
    GGMLType.IQ1_M: ("kgrid_1bit_2048", 3),
}


def iq2_grid_tables(ggml_type):
    """``(grid, kmap, neighbours)`` for an IQ2/IQ1 type, as ``iq2xs_init_impl(type)`` builds them.

    >>> grid, kmap, neighbours = iq2_grid_tables("IQ2_XXS")
    >>> grid.shape, kmap.shape
    ((256,), (43692,))
    """
    row = type_info(ggml_type)
    if row.ggml_type not in _GRID_OF_TYPE:
        raise UnknownTypeError(f"{row.name} has no IQ2/IQ1 search grid; one of {[t.name for t in _GRID_OF_TYPE]}")
    return _build(*_GRID_OF_TYPE[row.ggml_type])


@functools.cache
def _build(kgrid_name: str, nwant: int):
    kgrid = getattr(grids, kgrid_name)
    grid = _expand_kgrid(kgrid)
    kmap = _grid_kmap(grid)
    points_t = np.ascontiguousarray(grid.view(np.int8).reshape(-1, 8).T.astype(np.int32))
    n_per_code = _count_neighbours(points_t, kmap, nwant)
    # Serial prefix sum, as ggml's second pass: each off-grid code owns a record [n, j_1..j_n].
    offsets = np.cumsum(np.where(kmap < 0, n_per_code + 1, 0)) - np.where(kmap < 0, n_per_code + 1, 0)
    neighbours = np.zeros(int((n_per_code[kmap < 0] + 1).sum()), dtype=np.uint16)
    _fill_neighbours(points_t, kmap, nwant, offsets.astype(np.int32), neighbours)
    for a in (grid, kmap, neighbours):
        a.flags.writeable = False
    return grid, kmap, neighbours


@njit(cache=True, nogil=True)
def _expand_kgrid(kgrid):
    """the_grid: byte i of entry k is 2*l + 1, l = bits 2i..2i+1 of kgrid[k]."""
    grid = np.zeros(kgrid.shape[0], dtype=np.uint64)
    for k in range(kgrid.shape[0]):
        v = np.uint64(0)
        for i in range(8):
            l = (np.int64(kgrid[k]) >> (2 * i)) & 3
            v |= np.uint64(2 * l + 1) << np.uint64(8 * i)
        grid[k] = v
    return grid


@njit(cache=True, nogil=True)
def _grid_kmap(grid):
    """kmap_q2xs with only the on-grid codes set (the rest -1, filled by _fill_neighbours)."""
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int32)
    for k in range(grid.shape[0]):
        index = 0
        for i in range(8):
            b = np.int64((grid[k] >> np.uint64(8 * i)) & np.uint64(0xFF))
            index |= ((b - 1) // 2) << (2 * i)
        kmap[index] = k
    return kmap


@njit(cache=True, nogil=True)
def _nearest_levels(points_t, code, nwant, dist2, levels):
    """dist2[j] = squared distance from the point of ``code`` to grid point j; levels = its ``nwant`` smallest
    distinct values, ascending.  Returns how many levels exist (< nwant only for a tiny grid) and the count of
    grid points at those levels — the length of ggml's sorted prefix before ``nhave == nwant`` breaks.

    ``points_t`` is the grid transposed, int32 (8, grid_size), so the distance loop vectorizes."""
    size = points_t.shape[1]
    for j in range(size):
        dist2[j] = 0
    for k in range(8):
        pos = 2 * ((code >> (2 * k)) & 3) + 1
        row = points_t[k]
        for j in range(size):
            diff = row[j] - pos
            dist2[j] += diff * diff
    nlev = 0
    floor = -1
    while nlev < nwant:
        lowest = np.int32(0x7FFFFFFF)
        for j in range(size):
            d = dist2[j]
            if d > floor and d < lowest:
                lowest = d
        if lowest == np.int32(0x7FFFFFFF):
            break
        levels[nlev] = lowest
        floor = lowest
        nlev += 1
    n = 0
    for j in range(size):
        if dist2[j] <= floor:
            n += 1
    return nlev, n


@njit(cache=True, nogil=True, parallel=True)
def _count_neighbours(points_t, kmap, nwant):
    """ggml's first pass: n_per_i[code] for every off-grid code (0 for on-grid ones)."""
    n_per_code = np.zeros(KMAP_SIZE, dtype=np.int32)
    for code in prange(KMAP_SIZE):
        if kmap[code] >= 0:
            continue
        dist2 = np.empty(points_t.shape[1], dtype=np.int32)
        levels = np.empty(nwant, dtype=np.int32)
        nlev, n = _nearest_levels(points_t, code, nwant, dist2, levels)
        n_per_code[code] = n
    return n_per_code


@njit(cache=True, nogil=True, parallel=True)
def _fill_neighbours(points_t, kmap, nwant, offsets, neighbours):
    """ggml's third pass: write each off-grid code's record and point kmap at it (kmap = -(offset + 1)).

    qsort by (d2, j) of all grid points, cut after the nwant-th distance level, equals: for each level in
    ascending order, the points at that distance in index order.
    """
    for code in prange(KMAP_SIZE):
        if kmap[code] >= 0:
            continue
        dist2 = np.empty(points_t.shape[1], dtype=np.int32)
        levels = np.empty(nwant, dtype=np.int32)
        nlev, n = _nearest_levels(points_t, code, nwant, dist2, levels)
        at = offsets[code]
        neighbours[at] = n
        at += 1
        for lev in range(nlev):
            for j in range(points_t.shape[1]):
                if dist2[j] == levels[lev]:
                    neighbours[at] = j
                    at += 1
        kmap[code] = -(offsets[code] + 1)
