"""Input data for codec tests: a fixed mixed-distribution corpus and hypothesis strategies for rows.

Shared by every codec test module so that all types are checked on the same hard cases.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

DISTRIBUTIONS = (
    "normal", "uniform", "heavy_tailed", "outliers", "zeros", "single_nonzero", "subnormal",
    "near_fp16_max", "constant", "positive", "negative", "tiny", "mixed_blocks",
)


def make_rows(kind: str, n_rows: int, n_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """``n_rows`` float32 rows of one distribution (finite by construction)."""
    shape = (n_rows, n_per_row)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif kind == "heavy_tailed":
        x = rng.standard_t(2, shape)
    elif kind == "outliers":
        x = rng.standard_normal(shape) * 0.02
        mask = rng.random(shape) < 0.01
        x[mask] = rng.standard_normal(mask.sum()) * 50
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "single_nonzero":
        x = np.zeros(shape)
        x[np.arange(n_rows), rng.integers(0, n_per_row, n_rows)] = rng.standard_normal(n_rows) * 3
    elif kind == "subnormal":
        x = rng.standard_normal(shape) * 1e-39
    elif kind == "near_fp16_max":
        # scales stay representable in fp16 for every type (Q8_0's d = amax/127 is the tightest)
        x = rng.uniform(-1, 1, shape) * 60000.0
    elif kind == "constant":
        x = np.full(shape, 0.7) * np.sign(rng.standard_normal((n_rows, 1)))
    elif kind == "positive":
        x = np.abs(rng.standard_normal(shape))
    elif kind == "negative":
        x = -np.abs(rng.standard_normal(shape))
    elif kind == "tiny":
        x = rng.standard_normal(shape) * 1e-6
    elif kind == "mixed_blocks":
        # each 32-element block drawn from a different distribution and scale
        x = rng.standard_normal(shape)
        blocks = x.reshape(n_rows, -1, 32)
        scales = 10.0 ** rng.uniform(-4, 3, blocks.shape[:2])
        blocks *= scales[..., None]
        blocks[rng.random(blocks.shape[:2]) < 0.1] = 0.0
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(x, dtype=np.float32)


def fixed_corpus(n_rows: int = 1024, n_per_row: int = 4096, seed: int = 20261124) -> np.ndarray:
    """The fixed corpus: ``n_rows`` rows cycling through every distribution (deterministic)."""
    rng = np.random.default_rng(seed)
    per_kind = -(-n_rows // len(DISTRIBUTIONS))
    parts = [make_rows(k, per_kind, n_per_row, rng) for k in DISTRIBUTIONS]
    return np.concatenate(parts)[:n_rows]


def fixed_imatrix(n_per_row: int, seed: int = 7) -> np.ndarray:
    """A plausible importance matrix: positive, spanning several orders of magnitude, some zeros."""
    rng = np.random.default_rng(seed)
    w = np.exp(rng.standard_normal(n_per_row) * 2).astype(np.float32)
    w[rng.random(n_per_row) < 0.02] = 0.0
    return w


@st.composite
def rows(draw, block_size: int = 256, max_blocks: int = 4, max_rows: int = 3):
    """A hypothesis strategy: float32 array (n_rows, k * block_size) of a drawn distribution and seed."""
    kind = draw(st.sampled_from(DISTRIBUTIONS))
    n_rows = draw(st.integers(1, max_rows))
    n_blocks = draw(st.integers(1, max_blocks))
    n_per_row = n_blocks * block_size
    if kind == "mixed_blocks" and n_per_row % 32:
        kind = "normal"
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-20, 3.0e4]))
    x = make_rows(kind, n_rows, n_per_row, np.random.default_rng(seed))
    if kind not in ("near_fp16_max", "subnormal"):
        x = (x * np.float32(scale)).astype(np.float32)
        x[~np.isfinite(x)] = 0
    return x
