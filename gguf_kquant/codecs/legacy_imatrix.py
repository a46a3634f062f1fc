"""Legacy 32-element blocks with an importance matrix: Q4_0, Q4_1, Q5_0, Q5_1 (ggml's ``quantize_row_*_impl``).

What ``ggml_quantize_chunk(type, ..., imatrix)`` runs when ``imatrix != NULL`` (``quantize_q4_0`` etc. call
``quantize_row_q4_0_impl`` row by row), bit for bit.  Q8_0 ignores the imatrix and is not here.

The algorithm (ggml-quants.c), per row of ``n`` values and imatrix ``qw`` (one weight per column):

* ``sigma2 = sum(x*x) / n`` over the WHOLE row (float32, summed in index order; ``n`` converted to float);
* per 32-block: ``weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])`` (float32 sqrt, correctly rounded);
* Q4_0 / Q5_0: ``d = make_qx_quants(32, nmax=8/16, x, L, rmse_type=1, weight)`` (symmetric, 19 trial
  scales), ``q = L`` in [0, 15] / [0, 31];
* Q4_1 / Q5_1: ``d = make_qkx3_quants(32, nmax=15/31, x, weight, L, &min, Laux, -0.9f, 0.05f, 36, false)``,
  the block stores ``m = -the_min``.

Evaluation order (read from the C, confirmed bit-exact against the oracle): ``w*x[i]*l`` is
``(w*x[i])*l`` and ``w*l*l`` is ``(w*l)*l`` (so ``w*x[i]`` may be computed once per element), ``scale*L[i] +
min - x[i]`` is ``((scale*L) + min) - x``, ``-(nmax + 0.1f*is)/max`` and ``(rmin + rdelta*is + nmax)/(max -
min)`` keep every literal in float32; no FMA; sums accumulate one rounding per addition, in index order.

The scale searches are :func:`.kquants_imatrix.qx_weighted` / :func:`.kquants_imatrix.qkx3_fast`: exact
re-statements of helpers.make_qx_quants / make_qkx3_quants (same float operations in the same order;
independent trials summed side by side, repeated or provably losing candidates cut short).
tests/test_codecs_imatrix.py checks them against the plain ports and everything against the oracle.

Block layouts are those of the reference path (drawn in :mod:`.legacy`, whose offsets this module uses);
Q5 quants are packed by the same :func:`.helpers.pack_q5_0`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import register_kernel

from .chunks import run_chunks
from .helpers import pack_q5_0, store_fp16
from .kquants_imatrix import qkx3_fast, qx_weighted
from .legacy import (
    Q4_0_BYTES, Q4_0_D, Q4_0_QS, Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS,
    Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS, QK,
)

_F32 = np.float32


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _row_sigma2(x):
    """sum(x*x) / n_per_row in float32, summed in index order (quantize_row_q4_0_impl etc.)."""
    s = _F32(0.0)
    for j in range(x.shape[0]):
        s = _F32(s + x[j] * x[j])
    return _F32(s / _F32(x.shape[0]))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _block_weights(x, xo, qw, sigma2, w):
    """weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]); returns whether all are >= 0 or NaN."""
    nonneg = True
    for j in range(QK):
        v = x[xo + j]
        wj = _F32(qw[xo + j] * np.sqrt(_F32(sigma2 + v * v)))
        w[j] = wj
        if wj < _F32(0.0):
            nonneg = False
    return nonneg


# ---------------------------------------------------------------------------------------------------
# Row kernels (serial): quantize_row_<t>_impl
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_0_impl(x, qw, y, L, tr, w, wx):
    """One row ``x`` -> Q4_0 blocks in ``y`` with imatrix ``qw`` (scratch: L int32[32], tr float32[3, 18], w/wx float32[32])."""
    sigma2 = _row_sigma2(x)
    for ib in range(x.shape[0] // QK):
        xo = ib * QK
        _block_weights(x, xo, qw, sigma2, w)
        d = qx_weighted(x, xo, QK, 8, L, 0, w, wx, tr)
        o = ib * Q4_0_BYTES
        store_fp16(y, o + Q4_0_D, d)
        for j in range(16):
            y[o + Q4_0_QS + j] = np.uint8(L[j] | (L[j + 16] << 4))


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_0_impl(x, qw, y, L, tr, w, wx):
    sigma2 = _row_sigma2(x)
    for ib in range(x.shape[0] // QK):
        xo = ib * QK
        _block_weights(x, xo, qw, sigma2, w)
        d = qx_weighted(x, xo, QK, 16, L, 0, w, wx, tr)
        o = ib * Q5_0_BYTES
        store_fp16(y, o + Q5_0_D, d)
        pack_q5_0(y, o + Q5_0_QH, o + Q5_0_QS, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_1_impl(x, qw, y, L, Laux, w, xm):
    sigma2 = _row_sigma2(x)
    n = Laux.shape[0]  # == QK; not a literal (kquants_imatrix._OPAQUE_N: ~2x faster)
    for ib in range(x.shape[0] // QK):
        xo = ib * QK
        nonneg = _block_weights(x, xo, qw, sigma2, w)
        d, the_min = qkx3_fast(x, xo, n, w, 15, L, 0, Laux, xm, nonneg)
        o = ib * Q4_1_BYTES
        store_fp16(y, o + Q4_1_D, d)
        store_fp16(y, o + Q4_1_M, _F32(-the_min))
        for j in range(16):
            y[o + Q4_1_QS + j] = np.uint8(L[j] | (L[j + 16] << 4))


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_1_impl(x, qw, y, L, Laux, w, xm):
    sigma2 = _row_sigma2(x)
    n = Laux.shape[0]  # == QK; not a literal (kquants_imatrix._OPAQUE_N: ~2x faster)
    for ib in range(x.shape[0] // QK):
        xo = ib * QK
        nonneg = _block_weights(x, xo, qw, sigma2, w)
        d, the_min = qkx3_fast(x, xo, n, w, 31, L, 0, Laux, xm, nonneg)
        o = ib * Q5_1_BYTES
        store_fp16(y, o + Q5_1_D, d)
        store_fp16(y, o + Q5_1_M, _F32(-the_min))
        pack_q5_0(y, o + Q5_1_QH, o + Q5_1_QS, L)


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers (codec convention: quantize_imatrix_<t>(x, qw, out))
# ---------------------------------------------------------------------------------------------------


@register_kernel("Q4_0", "quantize_imatrix")
def quantize_imatrix_q4_0(x, qw, out):
    """Q4_0 with importance matrix ``qw`` (n_per_row,): bytes of ggml_quantize_chunk(Q4_0, ..., qw).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    >>> out = np.empty((2, 36), np.uint8); quantize_imatrix_q4_0(x, np.ones(64, np.float32), out)
    """
    run_chunks(_quantize_imatrix_q4_0_rows, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_q4_0_rows(x, qw, out, r0, r1):
    L = np.empty(QK, np.int32)  # scratch once per range: error feedback calls this with rows of one block
    tr = np.empty((3, 18), np.float32)
    w = np.empty(QK, np.float32)
    wx = np.empty(QK, np.float32)
    for r in range(r0, r1):
        quantize_row_q4_0_impl(x[r], qw, out[r], L, tr, w, wx)


@register_kernel("Q4_1", "quantize_imatrix")
def quantize_imatrix_q4_1(x, qw, out):
    """Q4_1 with importance matrix ``qw`` (quantize_row_q4_1_impl)."""
    run_chunks(_quantize_imatrix_q4_1_rows, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_q4_1_rows(x, qw, out, r0, r1):
    L = np.empty(QK, np.int32)  # scratch once per range: error feedback calls this with rows of one block
    Laux = np.empty(QK, np.int32)
    w = np.empty(QK, np.float32)
    xm = np.empty(QK, np.float32)
    for r in range(r0, r1):
        quantize_row_q4_1_impl(x[r], qw, out[r], L, Laux, w, xm)


@register_kernel("Q5_0", "quantize_imatrix")
def quantize_imatrix_q5_0(x, qw, out):
    """Q5_0 with importance matrix ``qw`` (quantize_row_q5_0_impl)."""
    run_chunks(_quantize_imatrix_q5_0_rows, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_q5_0_rows(x, qw, out, r0, r1):
    L = np.empty(QK, np.int32)  # scratch once per range: error feedback calls this with rows of one block
    tr = np.empty((3, 18), np.float32)
    w = np.empty(QK, np.float32)
    wx = np.empty(QK, np.float32)
    for r in range(r0, r1):
        quantize_row_q5_0_impl(x[r], qw, out[r], L, tr, w, wx)


@register_kernel("Q5_1", "quantize_imatrix")
def quantize_imatrix_q5_1(x, qw, out):
    """Q5_1 with importance matrix ``qw`` (quantize_row_q5_1_impl)."""
    run_chunks(_quantize_imatrix_q5_1_rows, x.shape[0], x, qw, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_imatrix_q5_1_rows(x, qw, out, r0, r1):
    L = np.empty(QK, np.int32)  # scratch once per range: error feedback calls this with rows of one block
    Laux = np.empty(QK, np.int32)
    w = np.empty(QK, np.float32)
    xm = np.empty(QK, np.float32)
    for r in range(r0, r1):
        quantize_row_q5_1_impl(x[r], qw, out[r], L, Laux, w, xm)
