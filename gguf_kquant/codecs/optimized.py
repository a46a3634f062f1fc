"""Optimized k-quant block parameters: the same ggml block formats, lower importance-weighted error.

Not ports of ggml: these kernels are *our* algorithm, used only by ``quantize_model(..., method="optimized")``.
They are deliberately kept out of the type table (whose kernels are the byte-exact ones) and reached through
:func:`quantizer` below.  The blocks they write are ordinary Q2_K/Q3_K/Q4_K/Q5_K blocks: any llama.cpp
decodes them with its usual ``dequantize_row_*``.

Method (per 256-value super-block), after ik_llama.cpp's idea of searching the *quantized* sub-block scales
instead of rounding a float scale once:

1. start from ggml's own imatrix block (``ggml_quantize_chunk``), decode its fp16 ``d``/``dmin`` and integer
   sub-block scales/mins;
2. for each sub-block, try every integer (scale, min) within +-R of the current ones, re-rounding its values
   to the nearest level for each candidate, and keep the pair with the least weighted error;
3. with scales, mins and levels fixed, the value ``d*sc*q - dmin*m`` is linear in (d, dmin): solve the 2x2
   weighted least squares, round to fp16, keep it if the (re-rounded) error drops;
4. repeat 2-3 a few times.

The objective is the importance-weighted squared error ``sum(imatrix[col] * (x - deq)^2)`` — the expected
squared error of the layer's output when the imatrix holds mean squared activations.  Every step only
accepts an improvement over the block it starts from, so no block is worse than ggml's under this measure.
Legacy Q4_0/Q4_1/Q5_0/Q5_1 blocks (also what k-quant tensors fall back to when a row is not a multiple of 256)
get a finer search of their one scale (see below).  Types without a refiner here (Q6_K, Q8_0, IQ) are
written exactly as ggml writes them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from ..errors import ImatrixError, InvalidArgumentError
from ..types import QK_K, GGMLType, type_info
from .helpers import (
    get_scale_min_k4,
    load_fp16,
    nearest_int,
    pack_2bit_k,
    pack_q3_k,
    pack_q3_k_scales,
    pack_q4_k,
    pack_q5_0,
    pack_q5_k,
    pack_scale_min_k4,
    q3_k_scale,
    store_fp16,
)
from .legacy import (
    Q4_0_BYTES, Q4_0_D, Q4_0_QS, Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS,
    Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS,
)
from .kquants import (
    Q2_K_BYTES, Q2_K_D, Q2_K_DMIN, Q2_K_QS, Q2_K_SCALES,
    Q3_K_BYTES, Q3_K_D, Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES,
    Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES,
    Q5_K_BYTES, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES,
)

__all__ = ["METHODS", "quantizer", "weighted_error"]

METHODS = ("llama", "optimized")
_F32 = np.float32
_ITERS = 3  # rounds of (sub-block search, d/dmin least squares); the third rarely changes anything


# ---------------------------------------------------------------------------------------------------
# Affine blocks (Q2_K, Q4_K, Q5_K): value = d*sc*q - dmin*m, q in [0, qmax], sc/m in [0, smax]
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _affine_sub_err(x, xo, w, n, d, dmin, sc, m, qmax, L, lo):
    """Weighted error of one sub-block at integer (sc, m), values re-rounded into L[lo:lo+n]."""
    ds = _F32(d * _F32(sc))
    dm = _F32(dmin * _F32(m))
    err = 0.0
    for i in range(n):
        v = x[xo + i]
        q = 0
        if ds != _F32(0.0):
            t = _F32(_F32(v + dm) / ds)  # clamped first: nearest_int's magic-number trick needs |t| < 2**22
            q = max(0, min(qmax, nearest_int(_F32(min(max(t, _F32(-1.0)), _F32(qmax + 1))))))
        L[lo + i] = q
        diff = np.float64(_F32(_F32(ds * _F32(q)) - dm)) - np.float64(v)
        err += np.float64(w[xo + i]) * diff * diff
    return err


@njit(cache=True, nogil=True)
def _refine_affine(x, xo, w, nsub, n, qmax, smax, radius, d, dmin, sc, mn, L, Lt):
    """Steps 2-4 on one super-block; sc/mn/L are updated in place; returns (d, dmin) (fp16 values)."""
    err = np.empty(nsub, np.float64)
    for j in range(nsub):
        err[j] = _affine_sub_err(x, xo + n * j, w, n, d, dmin, sc[j], mn[j], qmax, L, n * j)
    for _it in range(_ITERS):
        for j in range(nsub):  # step 2: integer scale/min neighbourhood
            s0 = sc[j]
            m0 = mn[j]
            for s in range(max(0, s0 - radius), min(smax, s0 + radius) + 1):
                for m in range(max(0, m0 - radius), min(smax, m0 + radius) + 1):
                    if s == s0 and m == m0:
                        continue
                    e = _affine_sub_err(x, xo + n * j, w, n, d, dmin, s, m, qmax, Lt, 0)
                    if e < err[j]:
                        err[j] = e
                        sc[j] = s
                        mn[j] = m
                        for i in range(n):
                            L[n * j + i] = Lt[i]
        # step 3: (d, dmin) by weighted least squares of x ~ d*A - dmin*B, A = sc*q, B = m
        saa = 0.0
        sab = 0.0
        sbb = 0.0
        sax = 0.0
        sbx = 0.0
        for j in range(nsub):
            b = np.float64(mn[j])
            for i in range(n):
                k = n * j + i
                wi = np.float64(w[xo + k])
                a = np.float64(sc[j] * L[k])
                xi = np.float64(x[xo + k])
                saa += wi * a * a
                sab += wi * a * b
                sbb += wi * b * b
                sax += wi * a * xi
                sbx += wi * b * xi
        det = saa * sbb - sab * sab
        if det > 1e-12 * saa * sbb and saa > 0.0:
            nd = (sax * sbb - sab * sbx) / det
            nm = (sab * sax - saa * sbx) / det
        elif saa > 0.0:
            nd = sax / saa
            nm = np.float64(dmin)
        else:
            break
        if not (np.isfinite(nd) and np.isfinite(nm)) or nd <= 0.0 or abs(nd) > 65000.0 or abs(nm) > 65000.0:
            break
        nd16 = load_fp16(_fp16_bytes(_F32(nd)), 0)
        nm16 = load_fp16(_fp16_bytes(_F32(nm)), 0)
        total = 0.0
        tot_new = 0.0
        for j in range(nsub):
            total += err[j]
            tot_new += _affine_sub_err(x, xo + n * j, w, n, nd16, nm16, sc[j], mn[j], qmax, Lt, 0)
        if tot_new >= total:
            break
        d = nd16
        dmin = nm16
        for j in range(nsub):
            err[j] = _affine_sub_err(x, xo + n * j, w, n, d, dmin, sc[j], mn[j], qmax, L, n * j)
    return d, dmin


@njit(cache=True, nogil=True, inline="always")
def _fp16_bytes(f):
    b = np.empty(2, np.uint8)
    store_fp16(b, 0, f)
    return b


@njit(cache=True, nogil=True)
def _optimize_row_k4(x, w, y, nbytes, od, odm, osc, oqs, oqh, qmax, radius):
    """Q4_K (oqh < 0) / Q5_K rows, in place on ggml's blocks y."""
    sc = np.empty(8, np.int64)
    mn = np.empty(8, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(32, np.int64)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    for ib in range(x.shape[0] // QK_K):
        xo = ib * QK_K
        yo = ib * nbytes
        d = load_fp16(y, yo + od)
        dmin = load_fp16(y, yo + odm)
        for j in range(8):
            s, m = get_scale_min_k4(j, y, yo + osc)
            sc[j] = s
            mn[j] = m
        d, dmin = _refine_affine(x, xo, w, 8, 32, qmax, 63, radius, d, dmin, sc, mn, L, Lt)
        for j in range(8):
            Ls[j] = np.uint8(sc[j])
            Lm[j] = np.uint8(mn[j])
        pack_scale_min_k4(y, yo + osc, Ls, Lm)
        store_fp16(y, yo + od, d)
        store_fp16(y, yo + odm, dmin)
        if oqh < 0:
            pack_q4_k(y, yo + oqs, L)
        else:
            pack_q5_k(y, yo + oqh, yo + oqs, L)


@njit(cache=True, nogil=True)
def _optimize_row_q2_k(x, w, y, radius):
    """Q2_K rows, in place: scales byte j = sc | m << 4 (4 bits each), 16 sub-blocks of 16."""
    sc = np.empty(16, np.int64)
    mn = np.empty(16, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(16, np.int64)
    for ib in range(x.shape[0] // QK_K):
        xo = ib * QK_K
        yo = ib * Q2_K_BYTES
        d = load_fp16(y, yo + Q2_K_D)
        dmin = load_fp16(y, yo + Q2_K_DMIN)
        for j in range(16):
            b = np.int64(y[yo + Q2_K_SCALES + j])
            sc[j] = b & 0xF
            mn[j] = b >> 4
        d, dmin = _refine_affine(x, xo, w, 16, 16, 3, 15, radius, d, dmin, sc, mn, L, Lt)
        for j in range(16):
            y[yo + Q2_K_SCALES + j] = np.uint8(sc[j] | (mn[j] << 4))
        store_fp16(y, yo + Q2_K_D, d)
        store_fp16(y, yo + Q2_K_DMIN, dmin)
        pack_2bit_k(y, yo + Q2_K_QS, L)


# ---------------------------------------------------------------------------------------------------
# Symmetric blocks (Q3_K): value = d*s*q, q in [-4, 3], s in [-32, 31] (stored +32)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _sym_sub_err(x, xo, w, n, d, s, qmin, qmax, L, lo):
    ds = _F32(d * _F32(s))
    err = 0.0
    for i in range(n):
        v = x[xo + i]
        q = 0
        if ds != _F32(0.0):
            t = _F32(v / ds)
            q = max(qmin, min(qmax, nearest_int(_F32(min(max(t, _F32(qmin - 1)), _F32(qmax + 1))))))
        L[lo + i] = q
        diff = np.float64(_F32(ds * _F32(q))) - np.float64(v)
        err += np.float64(w[xo + i]) * diff * diff
    return err


@njit(cache=True, nogil=True)
def _refine_sym(x, xo, w, nsub, n, qmin, qmax, smin, smax, radius, d, sc, L, Lt):
    err = np.empty(nsub, np.float64)
    for j in range(nsub):
        err[j] = _sym_sub_err(x, xo + n * j, w, n, d, sc[j], qmin, qmax, L, n * j)
    for _it in range(_ITERS):
        for j in range(nsub):
            s0 = sc[j]
            for s in range(max(smin, s0 - radius), min(smax, s0 + radius) + 1):
                if s == s0:
                    continue
                e = _sym_sub_err(x, xo + n * j, w, n, d, s, qmin, qmax, Lt, 0)
                if e < err[j]:
                    err[j] = e
                    sc[j] = s
                    for i in range(n):
                        L[n * j + i] = Lt[i]
        saa = 0.0
        sax = 0.0
        for k in range(nsub * n):
            wi = np.float64(w[xo + k])
            a = np.float64(sc[k // n] * L[k])
            saa += wi * a * a
            sax += wi * a * np.float64(x[xo + k])
        if saa <= 0.0:
            break
        nd = sax / saa
        if not np.isfinite(nd) or abs(nd) > 65000.0 or nd == 0.0:
            break
        nd16 = load_fp16(_fp16_bytes(_F32(nd)), 0)
        total = 0.0
        tot_new = 0.0
        for j in range(nsub):
            total += err[j]
            tot_new += _sym_sub_err(x, xo + n * j, w, n, nd16, sc[j], qmin, qmax, Lt, 0)
        if tot_new >= total:
            break
        d = nd16
        for j in range(nsub):
            err[j] = _sym_sub_err(x, xo + n * j, w, n, d, sc[j], qmin, qmax, L, n * j)
    return d


@njit(cache=True, nogil=True)
def _optimize_row_q3_k(x, w, y, radius):
    sc = np.empty(16, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(16, np.int64)
    Ls = np.empty(16, np.int64)
    for ib in range(x.shape[0] // QK_K):
        xo = ib * QK_K
        yo = ib * Q3_K_BYTES
        d = load_fp16(y, yo + Q3_K_D)
        for j in range(16):
            sc[j] = q3_k_scale(y, yo + Q3_K_SCALES, j) - 32
        d = _refine_sym(x, xo, w, 16, 16, -4, 3, -32, 31, radius, d, sc, L, Lt)
        for j in range(16):
            Ls[j] = sc[j] + 32
        pack_q3_k_scales(y, yo + Q3_K_SCALES, Ls)
        store_fp16(y, yo + Q3_K_D, d)
        for k in range(QK_K):
            L[k] += 4
        pack_q3_k(y, yo + Q3_K_HMASK, yo + Q3_K_QS, L)


# ---------------------------------------------------------------------------------------------------
# Row-parallel drivers: refine ggml's blocks ``out`` in place; rows independent (thread-count free)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, parallel=True)
def optimize_q2_k(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_q2_k(x[r], w, out[r], 2)


@njit(cache=True, nogil=True, parallel=True)
def optimize_q3_k(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_q3_k(x[r], w, out[r], 3)


@njit(cache=True, nogil=True, parallel=True)
def optimize_q4_k(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_k4(x[r], w, out[r], Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS, -1, 15, 2)


@njit(cache=True, nogil=True, parallel=True)
def optimize_q5_k(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_k4(x[r], w, out[r], Q5_K_BYTES, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QS, Q5_K_QH, 31, 2)


# ---------------------------------------------------------------------------------------------------
# Legacy 32-value blocks: Q4_0/Q5_0 value = d*q, q in [-8, 7] / [-16, 15] (stored +8/+16);
# Q4_1/Q5_1 value = d*q + m, q in [0, 15] / [0, 31].  One fp16 scale (and min) per block, so the search is
# over d itself: ggml's d stretched by up to +-1/8 in steps of 1/64 (all 17 stretches for Q4_1/Q5_1; for
# Q4_0/Q5_0 coarse to fine, 9 per sign, both signs), each candidate followed by a weighted least-squares
# refit of d (and m) for its levels, rounded to fp16.
# ---------------------------------------------------------------------------------------------------
_QK = 32
_STEPS = 8


@njit(cache=True, nogil=True, inline="always")
def _legacy_err(x, xo, w, d, m, qlo, qhi, L):
    err = 0.0
    for i in range(_QK):
        v = x[xo + i]
        q = 0
        if d != _F32(0.0):
            t = _F32(_F32(v - m) / d)
            q = max(qlo, min(qhi, nearest_int(_F32(min(max(t, _F32(qlo - 1)), _F32(qhi + 1))))))
        L[i] = q
        diff = np.float64(_F32(_F32(_F32(q) * d) + m)) - np.float64(v)
        err += np.float64(w[xo + i]) * diff * diff
    return err


@njit(cache=True, nogil=True, inline="always")
def _legacy_fit(x, xo, w, qlo, qhi, affine, d, m):
    """Levels of x at (d, m), then the weighted least squares of x ~ d*L (+ m) for them, in one pass:
    the fp16 values, or the inputs when degenerate."""
    sqq = 0.0
    sq = 0.0
    s1 = 0.0
    sqx = 0.0
    sx = 0.0
    inv = _F32(_F32(1.0) / d)  # the candidate's levels only seed the fit: a reciprocal is close enough
    for i in range(_QK):
        v = x[xo + i]
        t = _F32(_F32(v - m) * inv)
        wi = np.float64(w[xo + i])
        q = np.float64(max(qlo, min(qhi, nearest_int(_F32(min(max(t, _F32(qlo - 1)), _F32(qhi + 1)))))))
        xi = np.float64(v)
        sqq += wi * q * q
        sq += wi * q
        s1 += wi
        sqx += wi * q * xi
        sx += wi * xi
    if affine:
        det = sqq * s1 - sq * sq
        if not det > 1e-12 * sqq * s1:
            return d, m
        nd = (sqx * s1 - sq * sx) / det
        nm = (sqq * sx - sq * sqx) / det
    else:
        if not sqq > 0.0:
            return d, m
        nd = sqx / sqq
        nm = 0.0
    if not (np.isfinite(nd) and np.isfinite(nm)) or abs(nd) > 65000.0 or abs(nm) > 65000.0:
        return d, m
    return load_fp16(_fp16_bytes(_F32(nd)), 0), load_fp16(_fp16_bytes(_F32(nm)), 0)


@njit(cache=True, nogil=True)
def _optimize_row_legacy(x, w, y, nbytes, od, om, oqh, oqs, qlo, qhi):
    """Q4_0 (om < 0, oqh < 0), Q4_1 (oqh < 0), Q5_0 (om < 0), Q5_1 rows, in place on ggml's blocks y."""
    affine = om >= 0
    L = np.empty(_QK, np.int64)
    Lt = np.empty(_QK, np.int64)
    for ib in range(x.shape[0] // _QK):
        xo = ib * _QK
        yo = ib * nbytes
        d0 = load_fp16(y, yo + od)
        m0 = load_fp16(y, yo + om) if affine else _F32(0.0)
        if d0 == _F32(0.0) or not np.isfinite(d0):
            continue  # an all-equal block is exact already
        best_d = d0
        best_m = m0
        best = _legacy_err(x, xo, w, d0, m0, qlo, qhi, L)
        for sign in range(1 if affine else 2):
            # coarse to fine: stretches -8, -4, 0, 4, 8 (/64), then +-1, +-2 around this sign's best
            k_sign = 0
            e_sign = np.inf
            for c in range(2 * _STEPS + 1 if affine else 9):  # one sign only: all 17 stretches
                if affine:
                    k = c - _STEPS
                else:
                    k = c * 4 - _STEPS if c < 5 else k_sign + (c - 7 if c < 7 else c - 6)
                if abs(k) > _STEPS:
                    continue
                dc = _F32(d0 * _F32(1.0 + k / 64.0))
                if sign:
                    dc = -dc
                nd, nm = _legacy_fit(x, xo, w, qlo, qhi, affine, dc, m0)
                e = _legacy_err(x, xo, w, nd, nm, qlo, qhi, Lt)
                if c < 5 and e < e_sign:
                    e_sign = e
                    k_sign = k
                if e < best:
                    best = e
                    best_d = nd
                    best_m = nm
                    for i in range(_QK):
                        L[i] = Lt[i]
        if best_d == d0 and best_m == m0:
            continue  # ggml's block is already the best found: keep its bytes
        store_fp16(y, yo + od, best_d)
        if affine:
            store_fp16(y, yo + om, best_m)
        else:
            for i in range(_QK):
                L[i] -= qlo  # stored unsigned
        if oqh < 0:
            for j in range(16):
                y[yo + oqs + j] = np.uint8((L[j] | (L[j + 16] << 4)) & 0xFF)
        else:
            pack_q5_0(y, yo + oqh, yo + oqs, L)


@njit(cache=True, nogil=True, parallel=True)
def optimize_q4_0(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_legacy(x[r], w, out[r], Q4_0_BYTES, Q4_0_D, -1, -1, Q4_0_QS, -8, 7)


@njit(cache=True, nogil=True, parallel=True)
def optimize_q4_1(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_legacy(x[r], w, out[r], Q4_1_BYTES, Q4_1_D, Q4_1_M, -1, Q4_1_QS, 0, 15)


@njit(cache=True, nogil=True, parallel=True)
def optimize_q5_0(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_legacy(x[r], w, out[r], Q5_0_BYTES, Q5_0_D, -1, Q5_0_QH, Q5_0_QS, -16, 15)


@njit(cache=True, nogil=True, parallel=True)
def optimize_q5_1(x, w, out):
    for r in prange(x.shape[0]):
        _optimize_row_legacy(x[r], w, out[r], Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS, 0, 31)


# The small separate lookup (the type table keeps the byte-exact kernels): ggml type -> in-place refiner.
REFINERS = {
    GGMLType.Q2_K: optimize_q2_k,
    GGMLType.Q3_K: optimize_q3_k,
    GGMLType.Q4_K: optimize_q4_k,
    GGMLType.Q5_K: optimize_q5_k,
    GGMLType.Q4_0: optimize_q4_0,
    GGMLType.Q4_1: optimize_q4_1,
    GGMLType.Q5_0: optimize_q5_0,
    GGMLType.Q5_1: optimize_q5_1,
}


def quantize_optimized(x, qtype, imatrix=None, *, threads: Optional[int] = None) -> np.ndarray:
    """Like :func:`gguf_kquant.quantize`, with blocks refined to a lower imatrix-weighted error.

    Without ``imatrix`` (a tensor the imatrix has no entry for, e.g. a tied ``token_embd``) the plain
    squared error is the objective.  Types without a refiner come back as ggml writes them.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    >>> quantize_optimized(x, "Q4_K", np.ones(256, np.float32)).shape
    (2, 144)
    """
    from . import _threads, quantize, to_float32

    out = quantize(x, qtype, imatrix, threads=threads)
    refine = REFINERS.get(type_info(qtype).ggml_type)
    if refine is None or out.size == 0:
        return out
    x2d = np.ascontiguousarray(to_float32(x)).reshape(out.shape[0], -1)
    if imatrix is None:
        w = np.ones(x2d.shape[1], np.float32)
    else:
        w = np.ascontiguousarray(to_float32(imatrix)).reshape(-1)
    with _threads(threads):
        refine(x2d, w, out)
    return out


def quantizer(method: str, has_imatrix: bool):
    """The per-tensor quantize function for ``method`` (``"llama"``: ggml's own; ``"optimized"``: above).

    Checked before any work: an unknown method is an InvalidArgumentError, and ``"optimized"`` (whose
    objective is the importance-weighted error) refuses to run without an imatrix.
    """
    if method == "llama":
        from . import quantize

        return quantize
    if method == "optimized":
        if not has_imatrix:
            raise ImatrixError("method 'optimized' minimises the imatrix-weighted error and needs an imatrix; "
                               "pass --imatrix (or use method 'llama')")
        return quantize_optimized
    raise InvalidArgumentError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")


def weighted_error(x, raw, qtype, imatrix) -> float:
    """sum(imatrix[col] * (x - dequantize(raw))^2) over all rows: the measure the optimized method lowers."""
    from . import dequantize, to_float32

    x2d = to_float32(x).reshape(raw.shape[0], -1)
    y = dequantize(raw, qtype, x2d.shape)
    w = np.ones(x2d.shape[1]) if imatrix is None else np.asarray(imatrix, np.float64).reshape(-1)
    return float(((x2d.astype(np.float64) - y) ** 2 * w).sum())
