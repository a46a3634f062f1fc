"""IQ3_XXS / IQ3_S specifics: the search tables of iq3xs_init_impl and the quantizers' corner paths.

The shared oracle harness (tests/test_codecs_oracle.py) checks both types on the corpus, hypothesis rows and
random blocks; here are the tables (which the oracle cannot show: ggml keeps them static) and inputs built to
reach paths random rows rarely do.
"""

from __future__ import annotations

import numpy as np
import pytest

import oracle
from gguf_kquant.codecs import dequantize, grids, iq3, quantize
from gguf_kquant.types import type_info

GRIDS = {"IQ3_XXS": 256, "IQ3_S": 512}
NWANT = {256: 2, 512: 3}


def test_grid_is_the_decode_grid():
    """iq3xs_init_impl's grid holds the points the dequantizers decode (IQ3_XXS stores 15 as 62, not 60)."""
    grid_s, _, _ = iq3.iq3_grid_tables(512)
    assert np.array_equal(grid_s, grids.iq3s_grid)
    grid_xxs, _, _ = iq3.iq3_grid_tables(256)
    decode = {1: 4, 3: 12, 5: 20, 7: 28, 9: 36, 11: 44, 13: 52, 15: 62}
    expected = np.vectorize(decode.get)(grid_xxs.view(np.uint8)).astype(np.uint8)
    assert np.array_equal(expected, grids.iq3xxs_grid.view(np.uint8))


@pytest.mark.parametrize("grid_size", [256, 512])
def test_kmap_and_neighbours_match_brute_force(grid_size):
    """Every code: on-grid codes map to their entry; off-grid ones to the grid points at the nwant smallest
    distances, in (distance, index) order — what ggml's qsort with iq3_compare_func leaves."""
    grid, kmap, neighbours = iq3.iq3_grid_tables(grid_size)
    points = grid.view(np.uint8).reshape(-1, 4).astype(np.int32)
    codes = np.arange(iq3.KMAP_SIZE)
    pos = 2 * ((codes[:, None] >> (3 * np.arange(4))) & 7) + 1
    d2 = ((points[None, :, :] - pos[:, None, :]) ** 2).sum(-1)  # (4096, grid_size)
    on_grid = d2.min(axis=1) == 0
    assert on_grid.sum() == grid_size
    assert np.array_equal(kmap[on_grid], d2[on_grid].argmin(axis=1))
    at = 0
    for code in np.flatnonzero(~on_grid):
        levels = np.unique(d2[code])[:NWANT[grid_size]]
        order = np.lexsort((np.arange(grid_size), d2[code]))
        record = [j for j in order if d2[code, j] <= levels[-1]]
        assert kmap[code] == -(at + 1)
        assert neighbours[at] == len(record)
        assert neighbours[at + 1:at + 1 + len(record)].tolist() == record
        at += 1 + len(record)
    assert at == len(neighbours)


@pytest.mark.parametrize("grid_size", [256, 512])
def test_plane_search_is_find_best_neighbour(grid_size):
    """The kernels' plane-wise neighbour search picks what the plain port of iq3_find_best_neighbour picks,
    ties included (small integer inputs make equal distances common)."""
    grid, kmap, neighbours = iq3.iq3_grid_tables(grid_size)
    _, nbrs, coords, _, rec_n, rec_at, rc, rg = iq3._search_tables(grid_size)
    rng = np.random.default_rng(grid_size)
    dd = np.empty(iq3.MAX_NEIGHBOURS, np.float32)
    off = np.flatnonzero(kmap < 0)
    for trial in range(3000):
        u = int(rng.choice(off))
        if trial % 2:
            xval = rng.integers(0, 16, 4).astype(np.float32)
            weight = rng.integers(0, 3, 4).astype(np.float32)
            scale = np.float32(rng.choice([0.5, 1.0, 2.0]))
        else:
            xval = rng.uniform(0, 15, 4).astype(np.float32)
            weight = rng.uniform(0, 2, 4).astype(np.float32)
            scale = np.float32(rng.uniform(0.5, 1.5))
        plain = iq3.iq3_find_best_neighbour(nbrs, -kmap[u] - 1, coords, xval, 0, weight, scale)
        planes = iq3._best_neighbour_planes(u, rec_n, rec_at, rc, rg, xval, 0, weight, scale, dd)
        assert plain == planes, (u, xval, weight, scale)


def _corner_rows(rng) -> np.ndarray:
    """Rows of 512 (two super-blocks) reaching the quantizers' rarely taken paths."""
    rows = []
    x = rng.standard_normal((8, 512)).astype(np.float32)
    # all-zero sub-blocks: IQ3_S then stops advancing its qs/signs write positions
    x[0, 32:64] = 0
    x[1, 0:32] = 0
    x[1, 96:160] = 0
    x[2, 224:256] = 0
    x[3, :256] = 0  # a whole zero super-block
    x[4, ::2] = 0
    # XXS: max below 1e-8 is "zero"; odd sign counts flip the least important value
    x[5, 64:96] *= np.float32(1e-9)
    x[6] = -np.abs(x[6])
    x[6, ::3] = -x[6, ::3]
    x[7, :] = np.float32(1e-39) * rng.standard_normal(512).astype(np.float32)  # denormals
    rows.append(x)
    rows.append(rng.integers(-2, 3, (4, 512)).astype(np.float32))  # ties everywhere
    rows.append(np.full((1, 512), 0.75, np.float32))
    y = np.zeros((2, 512), np.float32)
    y[0, 7] = 1e-45  # the smallest denormal: IQ3_S's sub-block max is nonzero, its scale underflows
    y[1, 300] = -2.0  # one nonzero value
    rows.append(y)
    return np.concatenate(rows)


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("imatrix", ["none", "ones", "sparse", "huge"])
def test_corner_rows_match_ggml(name, imatrix, oracle):
    rng = np.random.default_rng(7)
    x = _corner_rows(rng)
    w = {"none": None, "ones": np.ones(512, np.float32),
         "sparse": (rng.random(512) * (rng.random(512) < 0.3)).astype(np.float32),
         "huge": rng.uniform(0, 1e6, 512).astype(np.float32)}[imatrix]
    ref = oracle.quantize_chunk(type_info(name).id, x, w)
    assert np.array_equal(quantize(x, name, w), ref)


@pytest.mark.parametrize("name", GRIDS)
def test_thread_count_and_read_only_input(name):
    x = np.random.default_rng(3).standard_normal((6, 1024)).astype(np.float32)
    x.flags.writeable = False
    one = quantize(x, name, threads=1)
    assert np.array_equal(one, quantize(x, name, threads=2))
    raw = one.copy()
    raw.flags.writeable = False
    assert np.array_equal(dequantize(raw, name, x.shape, threads=1).view(np.uint32),
                          dequantize(raw, name, x.shape, threads=2).view(np.uint32))
