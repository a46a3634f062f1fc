"""The IQ2/IQ1 search tables (gguf_kquant/codecs/iq_grids.py, ggml's iq2xs_init_impl).

The grids must be ggml-common.h's dequantization grids in search coordinates; kmap and the neighbour records
must be consistent, and each record must be the (distance, index)-sorted prefix that ggml's qsort yields —
checked here against a plain numpy lexsort.  The quantizers' oracle tests then check the tables end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.codecs import grids
from gguf_kquant.errors import ImatrixError, QuantizeError, UnknownTypeError
from gguf_kquant.types import type_info
from gguf_kquant.codecs.iq_grids import KMAP_SIZE, iq2_grid_tables

# type -> (ggml-common.h grid, value of search coordinates 1, 3, 5 in it, nwant)
CASES = {
    "IQ2_XXS": (grids.iq2xxs_grid, (0x08, 0x19, 0x2B), 2),
    "IQ2_XS": (grids.iq2xs_grid, (0x08, 0x19, 0x2B), 2),
    "IQ2_S": (grids.iq2s_grid, (0x08, 0x19, 0x2B), 1),
    "IQ1_S": (grids.iq1s_grid, (-1, 0, 1), 3),
}


def _codes(points: np.ndarray) -> np.ndarray:
    l = (points.astype(np.int64) - 1) // 2
    return (l << (2 * np.arange(8))).sum(axis=1)


def _code_points(codes: np.ndarray) -> np.ndarray:
    return 2 * ((codes[:, None] >> (2 * np.arange(8))) & 3) + 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_grid_is_ggml_common_grid(name):
    common, values, _ = CASES[name]
    grid, _, _ = iq2_grid_tables(name)
    points = grid.view(np.int8).reshape(-1, 8)
    assert set(np.unique(points)) <= {1, 3, 5}
    expanded = np.array(values, dtype=np.int64)[(points - 1) // 2].astype(np.int8)
    assert np.array_equal(expanded.view(np.uint64).ravel(), common)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kmap_and_neighbour_records(name):
    grid, kmap, neighbours = iq2_grid_tables(name)
    assert kmap.dtype == np.int32 and kmap.shape == (KMAP_SIZE,) and neighbours.dtype == np.uint16
    points = grid.view(np.int8).reshape(-1, 8)
    on_grid = _codes(points)
    assert np.array_equal(kmap[on_grid], np.arange(len(grid)))
    off = np.flatnonzero(kmap < 0)
    assert len(off) == KMAP_SIZE - len(grid)
    # records [n, j_1..j_n] are laid out back to back in code order, covering the array exactly
    starts = -kmap[off].astype(np.int64) - 1
    lengths = neighbours[starts].astype(np.int64) + 1
    assert starts[0] == 0 and np.array_equal(starts[1:], starts[:-1] + lengths[:-1])
    assert starts[-1] + lengths[-1] == len(neighbours)
    assert lengths.min() >= 2 and neighbours.max() < len(grid)
    assert not (grid.flags.writeable or kmap.flags.writeable or neighbours.flags.writeable)


@pytest.mark.parametrize("name", sorted(CASES))
def test_neighbours_are_qsort_prefix(name):
    """Each record is ggml's qsort by (d2, j) cut after the nwant-th distinct distance, for a spread of codes."""
    _, _, nwant = CASES[name]
    grid, kmap, neighbours = iq2_grid_tables(name)
    points = grid.view(np.int8).reshape(-1, 8).astype(np.int64)
    off = np.flatnonzero(kmap < 0)
    sample = np.unique(np.concatenate([off[::211], off[:5], off[-5:]]))
    for code, pos in zip(sample, _code_points(sample)):
        d2 = ((points - pos) ** 2).sum(axis=1)
        order = np.lexsort((np.arange(len(points)), d2))
        levels = np.unique(d2)[:nwant]
        want = order[np.isin(d2[order], levels)]
        start = -int(kmap[code]) - 1
        n = int(neighbours[start])
        assert np.array_equal(neighbours[start + 1: start + 1 + n], want), code


def test_iq1_types_share_one_table_and_other_types_refused():
    assert all(a is b for a, b in zip(iq2_grid_tables("IQ1_S"), iq2_grid_tables("IQ1_M")))
    with pytest.raises(UnknownTypeError):
        iq2_grid_tables("Q4_K")


# --- where the neighbour search finds nothing: ggml aborts, the IQ2 quantizers raise ------------------------
_GGML_QUANTIZE = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
import oracle
x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
oracle.quantize_chunk({type_id}, x, np.full(512, {weight}, np.float32))
"""


def _ggml_survives(type_id: int, weight: float) -> bool:
    code = _GGML_QUANTIZE.format(tests=str(Path(__file__).parent), type_id=type_id, weight=weight)
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


@pytest.mark.parametrize("name, weight, aborts", [("IQ2_XS", -1.0, True), ("IQ2_S", 3e38, True),
                                                  ("IQ2_XXS", -1.0, False)])
def test_iq2_raises_exactly_where_ggml_aborts(name, weight, aborts, oracle):
    """Negative importance weights make every neighbour distance NaN, overflowing ones inf or NaN (none below
    FLT_MAX): ggml's GGML_ASSERT(grid_index >= 0) kills the process; we raise QuantizeError — and only then."""
    assert _ggml_survives(type_info(name).id, weight) is not aborts
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    w = np.full(512, weight, np.float32)
    row = type_info(name)
    out = np.empty((2, row.row_bytes(512)), np.uint8)
    # the registered kernel itself (the public API refuses negative importance before any kernel runs)
    if aborts:
        with pytest.raises(QuantizeError, match="row 0, block 0"):
            row.kernel("quantize_imatrix")(x, w, out)
    else:
        row.kernel("quantize_imatrix")(x, w, out)
        assert np.array_equal(out, oracle.quantize_chunk(row.id, x, w))
    if weight < 0:
        with pytest.raises(ImatrixError, match="negative"):
            gguf_kquant.quantize(x, name, imatrix=w)
