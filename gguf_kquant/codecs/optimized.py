"""Optimized block parameters: the same ggml block formats, lower importance-weighted error.

Not ports of ggml: these kernels are *our* algorithm, used only by ``quantize_model(..., method="optimized")``.
They are deliberately kept out of the type table (whose kernels are the byte-exact ones) and reached through
:func:`quantizer` below.  The blocks they write are ordinary Q2_K/Q3_K/Q4_K/Q5_K/Q6_K, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
and IQ4_NL/IQ4_XS blocks: any llama.cpp decodes them with its usual ``dequantize_row_*``.

Method for the k-quants (per 256-value super-block), after ik_llama.cpp's idea of searching the *quantized*
sub-block scales instead of rounding a float scale once:

1. start from ggml's own imatrix block (``ggml_quantize_chunk``), decode its fp16 ``d``/``dmin`` and integer
   sub-block scales/mins;
2. for each sub-block, try every integer (scale, min) within +-R of the current ones, re-rounding its values
   to the nearest level for each candidate, and keep the pair with the least weighted error;
3. with scales, mins and levels fixed, the value ``d*sc*q - dmin*m`` is linear in (d, dmin): solve the 2x2
   weighted least squares, round to fp16, keep it if the error of the current levels (closed form) drops;
4. repeat 2-3 up to three times.

The objective is the importance-weighted squared error ``sum(imatrix[col] * (x - deq)^2)`` — the expected
squared error of the layer's output when the imatrix holds mean squared activations.  Every step only
accepts an improvement over the block it starts from, so no block is worse than ggml's under this measure.
Q3_K and Q6_K (symmetric: value = d*s*q) search their signed sub-block scales alone.  Legacy blocks (also
what k-quant tensors fall back to when a row is not a multiple of 256: Q6_K falls back to Q8_0) and IQ4_NL get
a search of their one scale, IQ4_XS a search of its 6-bit block scales (see their sections).  Types without a
refiner (the 1-3 bit IQ types, TQ, MXFP4, ...) are written exactly as ggml writes them.

Speed (the goal: at most 3x the default's quantize time).  Candidates are evaluated side by side: one pass
over a block's values with the candidates in the inner loop, whose accumulators are independent, so LLVM
vectorises it without reassociating a sum (no fastmath); the lanes are float32, multiply by a reciprocal and
round by the magic number — they only rank, and the winner's error is recomputed exactly before it is kept.
The exact errors re-round the same way, without a branch (a division per value cost more than the search),
the levels in a loop of their own: in the same loop as the float64 sum they did not vectorise (IQ4_NL's exact
error took 8.4 ns a value, 2.9 apart).
A candidate d/dmin's error for fixed levels is a quadratic form of sums already at hand.  Rows run on
run_chunks' threads, not prange (no OpenMP threads spinning on a loaded machine).  Measured per codec on
SmolLM2-135M tensors (CPU time, one thread), refine time as a multiple of ggml's imatrix quantize of the same
rows: Q4_0/Q5_0 1.1x, Q4_1/Q5_1 0.35x, Q2_K 0.9x, Q3_K 1.5x, Q4_K/Q5_K 1.15x, IQ4_NL 0.5x, IQ4_XS 0.85x,
Q6_K 1.7x (three ffn_down tensors; weighted error 0.78 of ggml's); Q8_0 ~5.3 ns a value, 5x ggml's Q8_0,
which is one trivial pass (the former Q8_0 search took ~16; see its section).  Whole SmolLM2-135M, warm kernel cache,
2 threads, quantize_model in one process, best of 3 interleaved runs on a shared machine (load ~5 on its 2 cores),
wall time as a multiple of the default's, with the former refiners' in the same runs in brackets: Q8_0 2.8x (5.3x),
Q6_K 2.5x (4.2x), Q5_K_M 1.5x (1.6x), Q5_K_S 1.7x (1.8x), Q4_K_M 2.2x (2.3x), Q3_K_M 1.7x (2.7x), Q2_K 2.1x (2.4x),
IQ4_XS 1.7x (1.8x; its refiners are unchanged).  Q8_0's default is mostly I/O (0.5 s), so there the CPU-time ratio is
higher, 3.3x (6.4x).  SmolLM2's 576-wide rows make Q6_K mostly Q8_0 fallback and Q5_K Q5_1.  The refiners' first
compilation takes ~17 s for all of them (then cached).

Quality (benchmarks/bench_quality.py, SmolLM2-135M, same imatrix, equal file sizes): mean KL divergence
-28.1% at Q2_K, -25.5% at Q3_K_M, -29.1% at Q4_K_M, -18.5% at IQ4_XS against llama-quantize's files.

Error feedback (GPTQ, :mod:`.gptq`) needs more than an imatrix: with only the diagonal of the Hessian, the
update of the not-yet-quantized columns is zero.  When the imatrix file also holds each weight's full input
covariance (``gguf-kquant hessian``), :func:`quantizer` returns the error-feedback quantizer, which runs ggml's
quantizer and this module's refiner block column by block column (for the legacy types ggml's plain quantizer
and a wider search: :data:`FEEDBACK_REFINERS`; for IQ4_NL a max-abs block of its own, :data:`FEEDBACK_STARTS`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import literal_unroll, njit

from ..errors import ImatrixError, InvalidArgumentError
from ..types import QK_K, GGMLType, type_info
from .chunks import run_chunks
from .grids import kvalues_iq4nl
from .helpers import (
    GROUP_MAX_EPS,
    fp16_bits_to_fp32,
    fp32_to_fp16_bits,
    get_scale_min_k4,
    load_fp16,
    pack_2bit_k,
    pack_q3_k,
    pack_q3_k_scales,
    pack_q4_k,
    pack_q5_0,
    pack_q5_k,
    pack_q6_k,
    pack_scale_min_k4,
    q3_k_scale,
    store_fp16,
)
from .iq4 import _best_index_16  # the branch-free nearest level, which vectorises
from .legacy import (
    Q4_0_BYTES, Q4_0_D, Q4_0_QS, Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS,
    Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS,
    Q8_0_BYTES, Q8_0_D, Q8_0_QS,
)
from .kquants import (
    Q2_K_BYTES, Q2_K_D, Q2_K_DMIN, Q2_K_QS, Q2_K_SCALES,
    Q3_K_BYTES, Q3_K_D, Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES,
    Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES,
    Q5_K_BYTES, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES,
    Q6_K_BYTES, Q6_K_D, Q6_K_QH, Q6_K_QL, Q6_K_SCALES,
)

__all__ = ["METHODS", "quantizer", "weighted_error"]

METHODS = ("llama", "optimized")
_F32 = np.float32
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds a float32 half to even
_ITERS = 3  # rounds of (sub-block search, d/dmin least squares); the third rarely changes anything


# ---------------------------------------------------------------------------------------------------
# Affine blocks (Q2_K, Q4_K, Q5_K): value = d*sc*q - dmin*m, q in [0, qmax], sc/m in [0, smax]
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _affine_sub_err(x, xo, w, n, d, dmin, sc, m, qmax, L, lo):
    """Weighted error of one sub-block at integer (sc, m), values re-rounded into L[lo:lo+n]."""
    ds = _F32(d * _F32(sc))
    dm = _F32(dmin * _F32(m))
    inv = _F32(_F32(1.0) / ds) if ds != _F32(0.0) else _F32(0.0)  # a reciprocal, no branch: as the lanes round
    for i in range(n):  # the levels apart from the float64 sum: this loop vectorises, the sum cannot
        L[lo + i] = np.int64(min(max(_F32(_F32(_F32(_F32(x[xo + i] + dm) * inv) + _MAGIC) - _MAGIC),
                                     _F32(0.0)), _F32(qmax)))
    err = 0.0
    for i in range(n):
        diff = np.float64(_F32(_F32(ds * _F32(L[lo + i])) - dm)) - np.float64(x[xo + i])
        err += np.float64(w[xo + i]) * diff * diff
    return err


@njit(cache=True, nogil=True)
def _affine_lanes(x, xo, w, n, d, dmin, qmax, cs, cm, nc, ds, dm, inv, ce):
    """ce[c] = weighted error of one sub-block at (cs[c], cm[c]), c < nc, in one pass over its values: the
    inner loop runs across candidates (independent accumulators, so it vectorises without reassociation)."""
    fq = _F32(qmax)
    for c in range(nc):
        ds[c] = _F32(d * _F32(cs[c]))
        dm[c] = _F32(dmin * _F32(cm[c]))
        inv[c] = _F32(_F32(1.0) / ds[c]) if ds[c] != _F32(0.0) else _F32(0.0)  # scale 0: every q is 0
        ce[c] = _F32(0.0)
    for i in range(n):
        v = x[xo + i]
        wi = w[xo + i]
        for c in range(nc):  # nearest level, half to even by the float magic number, then clamped
            t = _F32(_F32(v + dm[c]) * inv[c])
            q = min(max(_F32(_F32(t + _F32(12582912.0)) - _F32(12582912.0)), _F32(0.0)), fq)
            diff = _F32(_F32(_F32(ds[c] * q) - dm[c]) - v)
            ce[c] += _F32(_F32(wi * diff) * diff)


@njit(cache=True, nogil=True)
def _affine_scratch(nsub, radius):
    """Scratch of :func:`_refine_affine`: err (one per sub-block), then per candidate ds, dm, inv, cs, cm, ce
    (float32 lanes only rank: the exact error decides).  Made once per row range, not per block."""
    nc = (2 * radius + 1) ** 2
    ds = np.empty(nc, np.float32)
    return (np.empty(nsub, np.float64), ds, np.empty_like(ds), np.empty_like(ds), np.empty(nc, np.int64),
            np.empty(nc, np.int64), np.empty_like(ds))


@njit(cache=True, nogil=True)
def _refine_affine(x, xo, w, nsub, n, qmax, smax, radius, d, dmin, sc, mn, L, Lt, scratch):
    """Steps 2-4 on one super-block; sc/mn/L are updated in place; returns (d, dmin) (fp16 values)."""
    err, ds, dm, inv, cs, cm, ce = scratch
    for j in range(nsub):
        err[j] = _affine_sub_err(x, xo + n * j, w, n, d, dmin, sc[j], mn[j], qmax, L, n * j)
    err0 = err.sum()
    for _it in range(_ITERS):
        for j in range(nsub):  # step 2: integer scale/min neighbourhood, all candidates in one pass
            nc = 0
            for s in range(max(0, sc[j] - radius), min(smax, sc[j] + radius) + 1):
                for m in range(max(0, mn[j] - radius), min(smax, mn[j] + radius) + 1):
                    if s != sc[j] or m != mn[j]:
                        cs[nc] = s
                        cm[nc] = m
                        nc += 1
            _affine_lanes(x, xo + n * j, w, n, d, dmin, qmax, cs, cm, nc, ds, dm, inv, ce)
            c = np.argmin(ce[:nc])
            if ce[c] < err[j] * (1.0 + 1e-5):  # lanes round in float32 and by a reciprocal: the exact error decides
                e = _affine_sub_err(x, xo + n * j, w, n, d, dmin, cs[c], cm[c], qmax, Lt, 0)
                if e < err[j]:
                    err[j] = e
                    sc[j] = cs[c]
                    mn[j] = cm[c]
                    for i in range(n):
                        L[n * j + i] = Lt[i]
        # step 3: (d, dmin) by weighted least squares of x ~ d*A - dmin*B, A = sc*q, B = m
        saa = 0.0
        sab = 0.0
        sbb = 0.0
        sax = 0.0
        sbx = 0.0
        sxx = 0.0
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
                sxx += wi * xi * xi
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
        nd16 = _to_fp16(_F32(nd))
        nm16 = _to_fp16(_F32(nm))
        # the error of the current levels at (nd16, nm16), in closed form: re-rounding can only lower it
        a = np.float64(nd16)
        b = np.float64(nm16)
        tot_new = sxx - 2.0 * a * sax + 2.0 * b * sbx + a * a * saa - 2.0 * a * b * sab + b * b * sbb
        if not tot_new < err.sum() * (1.0 - 1e-6):
            break
        d = nd16
        dmin = nm16
        for j in range(nsub):
            err[j] = _affine_sub_err(x, xo + n * j, w, n, d, dmin, sc[j], mn[j], qmax, L, n * j)
    return d, dmin, err.sum() < err0


@njit(cache=True, nogil=True, inline="always")
def _to_fp16(f):
    """The float32 that ggml reads back after storing f as fp16 (no byte buffer: this runs once a block)."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(f))


@njit(cache=True, nogil=True)
def _optimize_row_k4(x, w, y, nbytes, od, odm, osc, oqs, oqh, qmax, radius, sc, mn, L, Lt, Ls, Lm, scratch):
    """Q4_K (oqh < 0) / Q5_K rows, in place on ggml's blocks y (scratch: :func:`_rows_k4`)."""
    for ib in range(x.shape[0] // QK_K):
        xo = ib * QK_K
        yo = ib * nbytes
        d = load_fp16(y, yo + od)
        dmin = load_fp16(y, yo + odm)
        for j in range(8):
            s, m = get_scale_min_k4(j, y, yo + osc)
            sc[j] = s
            mn[j] = m
        d, dmin, better = _refine_affine(x, xo, w, 8, 32, qmax, 63, radius, d, dmin, sc, mn, L, Lt, scratch)
        if not better:
            continue  # keep ggml's bytes
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
def _optimize_row_q2_k(x, w, y, radius, sc, mn, L, Lt, scratch):
    """Q2_K rows, in place: scales byte j = sc | m << 4 (4 bits each), 16 sub-blocks of 16 (scratch:
    :func:`_rows_q2_k`)."""
    for ib in range(x.shape[0] // QK_K):
        xo = ib * QK_K
        yo = ib * Q2_K_BYTES
        d = load_fp16(y, yo + Q2_K_D)
        dmin = load_fp16(y, yo + Q2_K_DMIN)
        for j in range(16):
            b = np.int64(y[yo + Q2_K_SCALES + j])
            sc[j] = b & 0xF
            mn[j] = b >> 4
        d, dmin, better = _refine_affine(x, xo, w, 16, 16, 3, 15, radius, d, dmin, sc, mn, L, Lt, scratch)
        if not better:
            continue
        for j in range(16):
            y[yo + Q2_K_SCALES + j] = np.uint8(sc[j] | (mn[j] << 4))
        store_fp16(y, yo + Q2_K_D, d)
        store_fp16(y, yo + Q2_K_DMIN, dmin)
        pack_2bit_k(y, yo + Q2_K_QS, L)


# ---------------------------------------------------------------------------------------------------
# Symmetric blocks: Q3_K value = d*s*q, q in [-4, 3], s in [-32, 31] (stored +32);
# Q6_K value = d*s*q, q in [-32, 31] (stored +32), s an int8 in [-128, 127]; 16 sub-blocks of 16 values
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _sym_sub_err(x, xo, w, n, d, s, qmin, qmax, L, lo):
    ds = _F32(d * _F32(s))
    inv = _F32(_F32(1.0) / ds) if ds != _F32(0.0) else _F32(0.0)  # a reciprocal, no branch: as the lanes round
    for i in range(n):  # as in _affine_sub_err: levels first, then the sum
        L[lo + i] = np.int64(min(max(_F32(_F32(_F32(x[xo + i] * inv) + _MAGIC) - _MAGIC), _F32(qmin)),
                                 _F32(qmax)))
    err = 0.0
    for i in range(n):
        diff = np.float64(_F32(ds * _F32(L[lo + i]))) - np.float64(x[xo + i])
        err += np.float64(w[xo + i]) * diff * diff
    return err


@njit(cache=True, nogil=True)
def _sym_lanes(x, xo, w, n, d, qmin, qmax, cs, nc, ds, inv, ce):
    """As :func:`_affine_lanes`, for value = d*s*q."""
    flo = _F32(qmin)
    fhi = _F32(qmax)
    for c in range(nc):
        ds[c] = _F32(d * _F32(cs[c]))
        inv[c] = _F32(_F32(1.0) / ds[c]) if ds[c] != _F32(0.0) else _F32(0.0)
        ce[c] = _F32(0.0)
    for i in range(n):
        v = x[xo + i]
        wi = w[xo + i]
        for c in range(nc):
            t = _F32(v * inv[c])
            q = min(max(_F32(_F32(t + _F32(12582912.0)) - _F32(12582912.0)), flo), fhi)
            diff = _F32(_F32(ds[c] * q) - v)
            ce[c] += _F32(_F32(wi * diff) * diff)


@njit(cache=True, nogil=True)
def _sym_scratch(nsub, radius):
    """Scratch of :func:`_refine_sym`: err (one per sub-block), then per candidate ds, inv, cs, ce (float32
    lanes only rank: the exact error decides).  Made once per row range, not per block."""
    nc = 2 * radius + 1
    ds = np.empty(nc, np.float32)
    return np.empty(nsub, np.float64), ds, np.empty_like(ds), np.empty(nc, np.int64), np.empty_like(ds)


@njit(cache=True, nogil=True)
def _refine_sym(x, xo, w, nsub, n, qmin, qmax, smin, smax, radius, d, sc, L, Lt, scratch):
    err, ds, inv, cs, ce = scratch
    for j in range(nsub):
        err[j] = _sym_sub_err(x, xo + n * j, w, n, d, sc[j], qmin, qmax, L, n * j)
    err0 = err.sum()
    for _it in range(_ITERS):
        for j in range(nsub):
            nc = 0
            for s in range(max(smin, sc[j] - radius), min(smax, sc[j] + radius) + 1):
                if s != sc[j]:
                    cs[nc] = s
                    nc += 1
            _sym_lanes(x, xo + n * j, w, n, d, qmin, qmax, cs, nc, ds, inv, ce)
            c = np.argmin(ce[:nc])
            if ce[c] < err[j] * (1.0 + 1e-5):
                e = _sym_sub_err(x, xo + n * j, w, n, d, cs[c], qmin, qmax, Lt, 0)
                if e < err[j]:
                    err[j] = e
                    sc[j] = cs[c]
                    for i in range(n):
                        L[n * j + i] = Lt[i]
        saa = 0.0
        sax = 0.0
        sxx = 0.0
        for k in range(nsub * n):
            wi = np.float64(w[xo + k])
            a = np.float64(sc[k // n] * L[k])
            xi = np.float64(x[xo + k])
            saa += wi * a * a
            sax += wi * a * xi
            sxx += wi * xi * xi
        if saa <= 0.0:
            break
        nd = sax / saa
        if not np.isfinite(nd) or abs(nd) > 65000.0 or nd == 0.0:
            break
        nd16 = _to_fp16(_F32(nd))
        a = np.float64(nd16)
        if not sxx - 2.0 * a * sax + a * a * saa < err.sum() * (1.0 - 1e-6):  # as in _refine_affine
            break
        d = nd16
        for j in range(nsub):
            err[j] = _sym_sub_err(x, xo + n * j, w, n, d, sc[j], qmin, qmax, L, n * j)
    return d, err.sum() < err0


@njit(cache=True, nogil=True)
def _optimize_row_q3_k(x, w, y, radius, sc, L, Lt, Ls, scratch):
    for ib in range(x.shape[0] // QK_K):
        xo = ib * QK_K
        yo = ib * Q3_K_BYTES
        d = load_fp16(y, yo + Q3_K_D)
        for j in range(16):
            sc[j] = q3_k_scale(y, yo + Q3_K_SCALES, j) - 32
        d, better = _refine_sym(x, xo, w, 16, 16, -4, 3, -32, 31, radius, d, sc, L, Lt, scratch)
        if not better:
            continue
        for j in range(16):
            Ls[j] = sc[j] + 32
        pack_q3_k_scales(y, yo + Q3_K_SCALES, Ls)
        store_fp16(y, yo + Q3_K_D, d)
        for k in range(QK_K):
            L[k] += 4
        pack_q3_k(y, yo + Q3_K_HMASK, yo + Q3_K_QS, L)


@njit(cache=True, nogil=True)
def _optimize_row_q6_k(x, w, y, radius, sc, L, Lt, scratch):
    """Q6_K rows, in place: value = d*s*q, q in [-32, 31] (stored +32), s an int8 per 16 values."""
    for ib in range(x.shape[0] // QK_K):
        xo = ib * QK_K
        yo = ib * Q6_K_BYTES
        d = load_fp16(y, yo + Q6_K_D)
        for j in range(16):
            sc[j] = np.int64(np.int8(y[yo + Q6_K_SCALES + j]))
        d, better = _refine_sym(x, xo, w, 16, 16, -32, 31, -128, 127, radius, d, sc, L, Lt, scratch)
        if not better:
            continue
        for j in range(16):
            y[yo + Q6_K_SCALES + j] = np.uint8(sc[j] & 0xFF)  # int8_t store
        store_fp16(y, yo + Q6_K_D, d)
        for k in range(QK_K):
            L[k] += 32
        pack_q6_k(y, yo + Q6_K_QL, yo + Q6_K_QH, L)


# ---------------------------------------------------------------------------------------------------
# Row-range kernels, run on threads by run_chunks (no prange: see codecs/chunks.py); they refine ggml's
# blocks ``out`` in place, each row by one serial call, so the bytes never depend on the thread count.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _rows_q2_k(x, w, out, radius, r0, r1):
    sc = np.empty(16, np.int64)  # scratch once per range: error feedback's rows are one block
    mn = np.empty(16, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(16, np.int64)
    scratch = _affine_scratch(16, radius)
    for r in range(r0, r1):
        _optimize_row_q2_k(x[r], w, out[r], radius, sc, mn, L, Lt, scratch)


@njit(cache=True, nogil=True)
def _rows_q3_k(x, w, out, radius, r0, r1):
    sc = np.empty(16, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(16, np.int64)
    Ls = np.empty(16, np.int64)
    scratch = _sym_scratch(16, radius)
    for r in range(r0, r1):
        _optimize_row_q3_k(x[r], w, out[r], radius, sc, L, Lt, Ls, scratch)


@njit(cache=True, nogil=True)
def _rows_q6_k(x, w, out, radius, r0, r1):
    sc = np.empty(16, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(16, np.int64)
    scratch = _sym_scratch(16, radius)
    for r in range(r0, r1):
        _optimize_row_q6_k(x[r], w, out[r], radius, sc, L, Lt, scratch)


@njit(cache=True, nogil=True)
def _rows_k4(x, w, out, nbytes, od, odm, osc, oqs, oqh, qmax, radius, r0, r1):
    sc = np.empty(8, np.int64)
    mn = np.empty(8, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(32, np.int64)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    scratch = _affine_scratch(8, radius)
    for r in range(r0, r1):
        _optimize_row_k4(x[r], w, out[r], nbytes, od, odm, osc, oqs, oqh, qmax, radius, sc, mn, L, Lt, Ls, Lm,
                         scratch)


# Search radii R, measured on two SmolLM2 ffn_down tensors (weighted error as a fraction of ggml's): Q3_K's
# per-call overhead dominates, so R = 8 (0.982, 0.964; R = 3: 0.986, 0.974) costs what R = 3 does; Q2_K and
# Q4_K's (2R+1)^2 pairs grow with R: R = 3 (Q2_K 0.919, 0.892 at +6% time; R = 5: 0.915, 0.881 at +70%).


# Q6_K's int8 scales are ~8x finer than Q3_K's 6-bit ones: on four SmolLM2 ffn_down tensors R = 16 gives 0.766
# of ggml's weighted error (R = 8: 0.842, R = 32: 0.718) at about the time of R = 8.
_Q6_K_RADIUS = 16


def optimize_q2_k(x, w, out):
    run_chunks(_rows_q2_k, x.shape[0], x, w, out, 3)


def optimize_q3_k(x, w, out):
    run_chunks(_rows_q3_k, x.shape[0], x, w, out, 8)


def optimize_q6_k(x, w, out):
    run_chunks(_rows_q6_k, x.shape[0], x, w, out, _Q6_K_RADIUS)


def optimize_q4_k(x, w, out):
    run_chunks(_rows_k4, x.shape[0], x, w, out, Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS, -1, 15, 3)


def optimize_q5_k(x, w, out):
    run_chunks(_rows_k4, x.shape[0], x, w, out, Q5_K_BYTES, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QS, Q5_K_QH,
               31, 3)


# ---------------------------------------------------------------------------------------------------
# Legacy 32-value blocks: Q4_0/Q5_0 value = d*q, q in [-8, 7] / [-16, 15] (stored +8/+16);
# Q4_1/Q5_1 value = d*q + m, q in [0, 15] / [0, 31] (Q8_0: see below).  One fp16 scale (and min) per block,
# so the search is over d itself: ggml's d times 11/32 to 7/4 in steps of 3/32 (16 stretches; both signs for
# Q4_0/Q5_0), all in one pass; the candidate whose levels admit the least error under their own least-squares
# (d, m) wins, and that fit, rounded to fp16, replaces ggml's if its (re-rounded) error is lower.
# These kernels take numpy's error model: Python's checks every float division for zero, and that branch kept
# the lanes' reciprocals and gains scalar (refine time 0.9x without it; every divisor is tested non-zero).
# ---------------------------------------------------------------------------------------------------
_QK = 32
_REACH = 48  # in 1/64: candidates up to 1.75d; ggml's d, fitted to other weights, is often far off
_STEP = 6  # on SmolLM2 tensors, mean weighted error of Q5_0 0.72 of ggml's, 0.85 within +-1/8


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _legacy_err(x, xo, w, d, m, qlo, qhi, L):
    inv = _F32(_F32(1.0) / d) if d != _F32(0.0) else _F32(0.0)  # a reciprocal, no branch: as the lanes round
    for i in range(_QK):  # as in _affine_sub_err: levels first, then the sum
        L[i] = np.int64(min(max(_F32(_F32(_F32(_F32(x[xo + i] - m) * inv) + _MAGIC) - _MAGIC), _F32(qlo)),
                            _F32(qhi)))
    err = 0.0
    for i in range(_QK):
        diff = np.float64(_F32(_F32(_F32(L[i]) * d) + m)) - np.float64(x[xo + i])
        err += np.float64(w[xo + i]) * diff * diff
    return err


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _legacy_refit(x, xo, w, L, affine, d, m):
    """The fp16 (d, m) of the weighted least squares x ~ d*L (+ m) for fixed levels L; (d, m) if degenerate."""
    sqq = 0.0
    sq = 0.0
    s1 = 0.0
    sqx = 0.0
    sx = 0.0
    for i in range(_QK):
        wi = np.float64(w[xo + i])
        q = np.float64(L[i])
        xi = np.float64(x[xo + i])
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
    if not (np.isfinite(nd) and np.isfinite(nm)) or nd == 0.0 or abs(nd) > 65000.0 or abs(nm) > 65000.0:
        return d, m
    return _to_fp16(_F32(nd)), _to_fp16(_F32(nm)) if affine else _F32(0.0)


@njit(cache=True, nogil=True, error_model="numpy")
def _optimize_row_legacy(x, w, y, nbytes, od, om, oqh, oqs, qlo, qhi, stretch, inv, sqq, sqx, sq, L, Lt):
    """Q4_0 (om < 0, oqh < 0), Q4_1 (oqh < 0), Q5_0 (om < 0), Q5_1 rows, in place on y.  Scratch: inv, sqq, sqx,
    sq (float32, one per candidate), L, Lt (int64, 32).

    Every candidate scale ``d0 * stretch[c]`` is evaluated in the same pass over the block (the inner loop
    runs across candidates, so its accumulators are independent and vectorise without reassociation); a
    candidate's score is the least error of its levels under the best real (d, m), in closed form.  Only the
    winner is refitted, rounded to fp16, re-rounded and compared with ggml's block.
    """
    affine = om >= 0
    nc = stretch.shape[0]
    flo = _F32(qlo)
    fhi = _F32(qhi)
    for ib in range(x.shape[0] // _QK):
        xo = ib * _QK
        yo = ib * nbytes
        d0 = load_fp16(y, yo + od)
        m0 = load_fp16(y, yo + om) if affine else _F32(0.0)
        if d0 == _F32(0.0) or not np.isfinite(d0):
            continue  # an all-equal block is exact already
        for c in range(nc):
            inv[c] = _F32(_F32(1.0) / _F32(d0 * stretch[c]))
            sqq[c] = _F32(0.0)
            sqx[c] = _F32(0.0)
            sq[c] = _F32(0.0)
        s1 = 0.0
        sx = 0.0
        for i in range(_QK):
            v = x[xo + i]
            vm = _F32(v - m0)
            wi = w[xo + i]
            wx = _F32(wi * v)
            s1 += np.float64(wi)
            sx += np.float64(wx)
            for c in range(nc):  # round half to even by the float magic number; clamped to the levels
                t = _F32(vm * inv[c])
                q = min(max(_F32(_F32(t + _F32(12582912.0)) - _F32(12582912.0)), flo), fhi)
                wq = _F32(wi * q)
                sqq[c] += _F32(wq * q)
                sqx[c] += _F32(wx * q)
                sq[c] += wq
        best = -np.inf
        nd = 0.0
        nm = 0.0
        for c in range(nc):
            qq = np.float64(sqq[c])
            qx = np.float64(sqx[c])
            q1 = np.float64(sq[c])
            if affine:  # x ~ d*q + m: the 2x2 weighted normal equations
                det = qq * s1 - q1 * q1
                if not det > 1e-6 * qq * s1:
                    continue
                a = (qx * s1 - q1 * sx) / det
                b = (qq * sx - q1 * qx) / det
                gain = a * qx + b * sx  # the error is sum(w x^2) - gain
            else:
                if not qq > 0.0:
                    continue
                a = qx / qq
                b = 0.0
                gain = a * qx
            if gain > best:
                best = gain
                nd = a
                nm = b
        if best == -np.inf or not (np.isfinite(nd) and np.isfinite(nm)) or abs(nd) > 65000.0 \
                or abs(nm) > 65000.0:
            continue
        d1 = _to_fp16(_F32(nd))
        m1 = _to_fp16(_F32(nm)) if affine else _F32(0.0)
        if d1 == _F32(0.0):
            continue
        e1 = _legacy_err(x, xo, w, d1, m1, qlo, qhi, L)
        # re-rounding at the fitted (d, m) moves a few levels: one more fit for them, kept if better
        d2, m2 = _legacy_refit(x, xo, w, L, affine, d1, m1)
        if d2 != d1 or m2 != m1:
            e2 = _legacy_err(x, xo, w, d2, m2, qlo, qhi, Lt)
            if e2 < e1:
                e1 = e2
                d1 = d2
                m1 = m2
                for i in range(_QK):
                    L[i] = Lt[i]
        if e1 >= _legacy_err(x, xo, w, d0, m0, qlo, qhi, Lt):
            continue  # ggml's block is at least as good: keep its bytes
        store_fp16(y, yo + od, d1)
        if affine:
            store_fp16(y, yo + om, m1)
        else:
            for i in range(_QK):
                L[i] -= qlo  # stored unsigned
        if oqh < 0:
            for j in range(16):
                y[yo + oqs + j] = np.uint8((L[j] | (L[j + 16] << 4)) & 0xFF)
        else:
            pack_q5_0(y, yo + oqh, yo + oqs, L)


@njit(cache=True, nogil=True, error_model="numpy")
def _rows_legacy(x, w, out, nbytes, od, om, oqh, oqs, qlo, qhi, stretch, r0, r1):
    nc = stretch.shape[0]
    inv = np.empty(nc, np.float32)  # scratch once per range, not per row (error feedback's rows are one block)
    sqq = np.empty(nc, np.float32)  # float32 lanes: twice as many per vector; they only rank candidates
    sqx = np.empty(nc, np.float32)
    sq = np.empty(nc, np.float32)
    L = np.empty(_QK, np.int64)
    Lt = np.empty(_QK, np.int64)
    for r in range(r0, r1):
        _optimize_row_legacy(x[r], w, out[r], nbytes, od, om, oqh, oqs, qlo, qhi, stretch, inv, sqq, sqx, sq, L, Lt)


def _stretches(signs, reach=_REACH, step=_STEP):
    """Candidate scales as multiples of ggml's d: 1 + k/64, k in (-reach, reach] by ``step``; both signs for
    the symmetric types (their levels are lopsided, [-8, 7]: which end the largest value takes matters).

    -reach itself is left out so that a sign's candidates fill whole vectors (16; IQ4_NL's 8): the lanes'
    remainder runs scalar, each lane as dear as a vector.  On 9 SmolLM2 tensors and as many heavy-tailed ones
    the weighted error was the same to 4 digits (Q4_0 / Q5_0 / Q4_1, IQ4_NL: 0.7889 against 0.7887) and the
    refiners took 8-20% less time."""
    k = np.arange(-reach + step, reach + 1, step)
    s = np.float32(1.0) + k.astype(np.float32) / np.float32(64.0)
    return np.concatenate([s, -s] if signs == 2 else [s]).astype(np.float32)


# 1 + k/64, k = +-1..4: beside a plain max-abs start, these stand in for ggml's search of the scales near it
_NEAR = (np.float32(1.0) + np.array([-4, -3, -2, -1, 1, 2, 3, 4], np.float32) / np.float32(64.0)).astype(np.float32)


def _fine_stretches(signs):
    """For a start that is ggml's plain max-abs block: 1 + k/64 for k = -reach .. reach - step (the coarse
    steps but the largest) and :data:`_NEAR`, which stand in for ggml's imatrix search (19 scales within ~6%
    of the max-abs one, make_qx_quants).  24 per sign, a whole number of vectors: 27 (k up to +-5, all coarse
    ones) cost a fifth more on Q5_0 blocks for the same error (this set's, on heavy-tailed rows: 1.000 / 1.001 /
    0.999 / 1.003 of it at Q4_0 / Q5_0 / Q4_1 / Q5_1)."""
    coarse = np.float32(1.0) + np.arange(-_REACH, _REACH, _STEP, dtype=np.float32) / np.float32(64.0)
    one = np.concatenate([coarse, _NEAR])
    return np.concatenate([one, -one] if signs == 2 else [one]).astype(np.float32)


# each legacy type's block as _rows_legacy takes it: (bytes, d, m, qh, qs, lowest level, highest level), signs
_LEGACY = {
    GGMLType.Q4_0: ((Q4_0_BYTES, Q4_0_D, -1, -1, Q4_0_QS, -8, 7), 2),
    GGMLType.Q4_1: ((Q4_1_BYTES, Q4_1_D, Q4_1_M, -1, Q4_1_QS, 0, 15), 1),
    GGMLType.Q5_0: ((Q5_0_BYTES, Q5_0_D, -1, Q5_0_QH, Q5_0_QS, -16, 15), 2),
    GGMLType.Q5_1: ((Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS, 0, 31), 1),
}


def _legacy_refiner(ggml_type, stretch):
    """The in-place refiner of a legacy type's blocks with candidate scales ``stretch`` (x ggml's d)."""
    layout = _LEGACY[ggml_type][0]

    def refine(x, w, out):
        run_chunks(_rows_legacy, x.shape[0], x, w, out, *layout, stretch)

    return refine


# ---------------------------------------------------------------------------------------------------
# Q8_0 (value = d*q, q an int8 in [-128, 127]) has its own kernel: its default is one trivial pass (~1 ns a
# value), so the refiner must be cheap.  Same idea as the legacy search with less of it: 8 stretches of
# ggml's d from 0.92 to 1.08 side by side, the winner's least-squares d rounded to fp16 and re-rounded once,
# kept if its exact error is below that of ggml's stored levels.  At 8 bits the error is mostly the rounding
# of the few heavily weighted columns, a fast oscillation in d, so a coarse-to-fine search would miss it.
# Weighted error / ggml's, mean over six SmolLM2 tensors: 0.49 (the former 17 stretches by 1/64 and a second
# refit: 0.38, at 3x the time; ggml's d refitted alone: 0.81); over heavy-tailed random values of seven
# tensors' shapes with their real imatrices: 0.58 (former: 0.54).  Both are given because that SmolLM2 F32
# file was dequantized from a quantized one (~13 distinct values per 32 in its blk tensors; its token_embd is
# exactly Q8_0), a lattice that favours scale searches.
# ---------------------------------------------------------------------------------------------------
_Q8_0_STRETCH = np.linspace(0.92, 1.08, 8).astype(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _q8_0_level(v, inv):
    return min(max(_F32(_F32(_F32(v * inv) + _MAGIC) - _MAGIC), _F32(-128.0)), _F32(127.0))


@njit(cache=True, nogil=True)
def _optimize_row_q8_0(x, w, y, stretch, inv, sqq, sqx, gain, Lq, dd):
    """One Q8_0 row, in place.  Scratch: inv/sqq/sqx (2 per candidate), gain (1 per candidate), Lq/dd (32).

    A pass over a block's values waits on its accumulators (stored and reloaded at every value): 4 candidates
    cost what 8 do.  So each candidate has two lanes, values i and 16 + i side by side: 16 steps, not 32
    (measured: 2.8 ns a value instead of 3.9).
    """
    nc = stretch.shape[0]
    n2 = 2 * nc
    for ib in range(x.shape[0] // _QK):
        xo = ib * _QK
        yo = ib * Q8_0_BYTES
        d0 = load_fp16(y, yo + Q8_0_D)
        if d0 == _F32(0.0) or not np.isfinite(d0):
            continue  # an all-zero block is exact already
        for c in range(nc):
            t = _F32(_F32(1.0) / _F32(d0 * stretch[c]))
            inv[c] = t
            inv[c + nc] = t
        for c in range(n2):
            sqq[c] = _F32(0.0)
            sqx[c] = _F32(0.0)
        for i in range(_QK // 2):
            va = x[xo + i]
            vb = x[xo + _QK // 2 + i]
            wa = w[xo + i]
            wb = w[xo + _QK // 2 + i]
            xa = _F32(wa * va)
            xb = _F32(wb * vb)
            for c in range(n2):  # a select between two broadcasts, not a gather: it vectorises
                hi = c >= nc
                q = _q8_0_level(vb if hi else va, inv[c])
                sqq[c] += _F32(_F32((wb if hi else wa) * q) * q)
                sqx[c] += _F32((xb if hi else xa) * q)
        for c in range(nc):  # the error at the levels' best d is sum(w x^2) - sqx^2/sqq: no branch, it vectorises
            qq = np.float64(sqq[c]) + np.float64(sqq[c + nc])
            qx = np.float64(sqx[c]) + np.float64(sqx[c + nc])
            gain[c] = qx * qx / max(qq, 1e-300)
        c = np.argmax(gain)
        qq = np.float64(sqq[c]) + np.float64(sqq[c + nc])
        nd = (np.float64(sqx[c]) + np.float64(sqx[c + nc])) / qq if qq > 0.0 else 0.0
        if not (np.isfinite(nd) and abs(nd) < 65000.0):
            continue
        d1 = _to_fp16(_F32(nd))
        if d1 == _F32(0.0):
            continue
        inv1 = _F32(_F32(1.0) / d1)
        for i in range(_QK):  # per value: our weighted squared error at d1 minus that of ggml's stored block
            v = np.float64(x[xo + i])
            q = _q8_0_level(x[xo + i], inv1)
            Lq[i] = q
            a = np.float64(_F32(d0 * _F32(np.int8(y[yo + Q8_0_QS + i])))) - v
            b = np.float64(_F32(d1 * q)) - v
            dd[i] = np.float64(w[xo + i]) * (b * b - a * a)
        s0 = s1 = s2 = s3 = 0.0  # four partial sums: short dependency chains
        for i in range(0, _QK, 4):
            s0 += dd[i]
            s1 += dd[i + 1]
            s2 += dd[i + 2]
            s3 += dd[i + 3]
        if not (s0 + s1) + (s2 + s3) < 0.0:
            continue  # ggml's block is at least as good: keep its bytes
        store_fp16(y, yo + Q8_0_D, d1)
        for i in range(_QK):
            y[yo + Q8_0_QS + i] = np.uint8(np.int64(Lq[i]) & 0xFF)  # int8_t store


@njit(cache=True, nogil=True)
def _rows_q8_0(x, w, out, stretch, r0, r1):
    nc = stretch.shape[0]
    inv = np.empty(2 * nc, np.float32)  # scratch once per range, not per row
    sqq = np.empty(2 * nc, np.float32)
    sqx = np.empty(2 * nc, np.float32)
    gain = np.empty(nc, np.float64)
    Lq = np.empty(_QK, np.float32)
    dd = np.empty(_QK, np.float64)
    for r in range(r0, r1):
        _optimize_row_q8_0(x[r], w, out[r], stretch, inv, sqq, sqx, gain, Lq, dd)


def optimize_q8_0(x, w, out):
    run_chunks(_rows_q8_0, x.shape[0], x, w, out, _Q8_0_STRETCH)


# ---------------------------------------------------------------------------------------------------
# Non-linear blocks: value = s * kvalues_iq4nl[q], q in [0, 15] (levels -127..113, lopsided); IQ4_NL:
# s = d, one fp16 per 32 values (searched as the legacy scales are); IQ4_XS: s = d * (ls - 32), fp16 d per
# 256 and a 6-bit ls per 32 (searched as Q3_K's sub-block scales are).  Levels are the nearest by iq4's
# branch-free best_index; ggml's block is decoded as stored to decide which block is kept.
# ---------------------------------------------------------------------------------------------------
_IQ4_NL = type_info("IQ4_NL")
_IQ4_XS = type_info("IQ4_XS")
IQ4_NL_BYTES, IQ4_NL_D, IQ4_NL_QS = _IQ4_NL.type_size, _IQ4_NL.field_offset("d"), _IQ4_NL.field_offset("qs")
IQ4_XS_BYTES = _IQ4_XS.type_size
IQ4_XS_D, IQ4_XS_SCALES_H, IQ4_XS_SCALES_L, IQ4_XS_QS = (
    _IQ4_XS.field_offset(f) for f in ("d", "scales_h", "scales_l", "qs"))


_LANE_RANGE = 256  # |t| the lanes round; levels are within [-127, 113]
# The lanes' level value is kvalues[0] plus the step to each next level whose midpoint round(t) reaches (a
# midpoint itself goes up): compares and adds with these constants, unrolled, vectorise across the candidates,
# where indexing a table is a gather that LLVM leaves scalar here (the IQ4_NL refiner took 0.6x the time).
_NL_FIRST = np.float32(kvalues_iq4nl[0])
_NL_STEPS = tuple((np.float32((float(a) + float(b)) / 2), np.float32(float(b) - float(a)))
                  for a, b in zip(kvalues_iq4nl[:-1], kvalues_iq4nl[1:]))  # (midpoint, step) per level


@njit(cache=True, nogil=True, inline="always")
def _lane_round(t):
    """t clamped to the lanes' range and rounded half to even (by the magic number)."""
    return _F32(_F32(min(max(t, _F32(-_LANE_RANGE)), _F32(_LANE_RANGE - 1)) + _MAGIC) - _MAGIC)


@njit(cache=True, nogil=True, inline="always")
def _lane_level(t):
    """The lanes' level value of t (kvalue units): the nearest to round(t), ties up (only ranks candidates)."""
    r = _lane_round(t)
    k = _NL_FIRST
    for mid_step in literal_unroll(_NL_STEPS):
        k = _F32(k + (mid_step[1] if r >= mid_step[0] else _F32(0.0)))
    return k


@njit(cache=True, nogil=True, inline="always")
def _table_level(table, t):
    """:func:`_lane_level` read from a table (:func:`_level_table`): cheaper where lanes are too few to fill a
    vector (IQ4_XS's 4), so they run scalar either way."""
    return table[np.int64(_lane_round(t)) + _LANE_RANGE]


def _level_table():
    """:func:`_lane_level` of every integer in [-_LANE_RANGE, _LANE_RANGE)."""
    t = np.arange(-_LANE_RANGE, _LANE_RANGE, dtype=np.float32)
    return kvalues_iq4nl.astype(np.float32)[(t[:, None] >= np.array([m for m, _ in _NL_STEPS])).sum(1)]


@njit(cache=True, nogil=True, inline="always")
def _nl_err(x, xo, w, s, fval, L, lo):
    """Weighted error of 32 values at scale s, each at its nearest level (indices into L[lo:lo+32])."""
    inv = _F32(_F32(1.0) / s) if s != _F32(0.0) else _F32(0.0)
    for i in range(_QK):  # as in _affine_sub_err: levels first, then the sum
        L[lo + i] = _best_index_16(fval, _F32(x[xo + i] * inv))
    err = 0.0
    for i in range(_QK):
        diff = np.float64(_F32(s * fval[L[lo + i]])) - np.float64(x[xo + i])
        err += np.float64(w[xo + i]) * diff * diff
    return err


@njit(cache=True, nogil=True, inline="always")
def _nl_stored_err(x, xo, w, s, fval, y, qo):
    """Weighted error of 32 values as a stored block decodes them (quants q4[j] = L[j] | L[j+16] << 4)."""
    err = 0.0
    for j in range(16):
        b = y[qo + j]
        for h in range(2):
            q = (b >> np.uint8(4 * h)) & np.uint8(0xF)
            diff = np.float64(_F32(s * fval[q])) - np.float64(x[xo + j + 16 * h])
            err += np.float64(w[xo + j + 16 * h]) * diff * diff
    return err


@njit(cache=True, nogil=True, inline="always")
def _pack_nl(y, qo, L, lo):
    for j in range(16):
        y[qo + j] = np.uint8(L[lo + j] | (L[lo + j + 16] << 4))


@njit(cache=True, nogil=True)
def _optimize_row_iq4_nl(x, w, y, fval, stretch, inv, sqq, sqx, L):
    """IQ4_NL rows, in place: candidate scales side by side as in :func:`_optimize_row_legacy` (same scratch)."""
    nc = stretch.shape[0]
    for ib in range(x.shape[0] // _QK):
        xo = ib * _QK
        yo = ib * IQ4_NL_BYTES
        d0 = load_fp16(y, yo + IQ4_NL_D)
        if d0 == _F32(0.0) or not np.isfinite(d0):
            continue
        for c in range(nc):
            inv[c] = _F32(_F32(1.0) / _F32(d0 * stretch[c]))
            sqq[c] = _F32(0.0)
            sqx[c] = _F32(0.0)
        for i in range(_QK):
            v = x[xo + i]
            wi = w[xo + i]
            wx = _F32(wi * v)
            for c in range(nc):
                k = _lane_level(_F32(v * inv[c]))
                sqq[c] += _F32(_F32(wi * k) * k)
                sqx[c] += _F32(wx * k)
        best = -np.inf
        nd = 0.0
        for c in range(nc):
            qq = np.float64(sqq[c])
            qx = np.float64(sqx[c])
            if qq > 0.0 and qx * qx / qq > best:
                best = qx * qx / qq
                nd = qx / qq
        if best == -np.inf or not np.isfinite(nd) or abs(nd) > 65000.0:
            continue
        d1 = _to_fp16(_F32(nd))
        if d1 == _F32(0.0) or _nl_err(x, xo, w, d1, fval, L, 0) >= _nl_stored_err(
                x, xo, w, d0, fval, y, yo + IQ4_NL_QS):
            continue
        store_fp16(y, yo + IQ4_NL_D, d1)
        _pack_nl(y, yo + IQ4_NL_QS, L, 0)


@njit(cache=True, nogil=True)
def _nl_lanes(x, xo, w, d, cs, nc, table, ds, inv, ce):
    """As :func:`_sym_lanes`, for value = d*s*kvalues[q]."""
    for c in range(nc):
        ds[c] = _F32(d * _F32(cs[c]))
        inv[c] = _F32(_F32(1.0) / ds[c]) if ds[c] != _F32(0.0) else _F32(0.0)
        ce[c] = _F32(0.0)
    for i in range(_QK):
        v = x[xo + i]
        wi = w[xo + i]
        for c in range(nc):
            diff = _F32(_F32(ds[c] * _table_level(table, _F32(v * inv[c]))) - v)
            ce[c] += _F32(_F32(wi * diff) * diff)


@njit(cache=True, nogil=True)
def _iq4_xs_scale(y, yo, ib):
    """The 6-bit ls of block ib (scales_l nibble | scales_h bits << 4), minus 32."""
    lo = (np.int64(y[yo + IQ4_XS_SCALES_L + ib // 2]) >> (4 * (ib % 2))) & 0xF
    hi = (np.int64(y[yo + IQ4_XS_SCALES_H + ib // 4]) >> (2 * (ib % 4))) & 3
    return (lo | (hi << 4)) - 32


@njit(cache=True, nogil=True)
def _optimize_row_iq4_xs(x, w, y, fval, table, radius, sc, L, Lt, scratch):
    """IQ4_XS rows, in place: ls searched per block of 32 and d refitted, as :func:`_refine_sym` does (same
    scratch)."""
    nsub = QK_K // _QK
    err, ds, inv, cs, ce = scratch
    for ibl in range(x.shape[0] // QK_K):
        xo = ibl * QK_K
        yo = ibl * IQ4_XS_BYTES
        d = load_fp16(y, yo + IQ4_XS_D)
        if d == _F32(0.0) or not np.isfinite(d):
            continue
        e0 = 0.0
        for j in range(nsub):
            sc[j] = _iq4_xs_scale(y, yo, j)
            s = _F32(d * _F32(sc[j]))
            e0 += _nl_stored_err(x, xo + _QK * j, w, s, fval, y, yo + IQ4_XS_QS + 16 * j)
            err[j] = _nl_err(x, xo + _QK * j, w, s, fval, L, _QK * j)
        for _it in range(_ITERS):
            for j in range(nsub):
                nc = 0
                for s in range(max(-32, sc[j] - radius), min(31, sc[j] + radius) + 1):
                    if s != sc[j]:
                        cs[nc] = s
                        nc += 1
                _nl_lanes(x, xo + _QK * j, w, d, cs, nc, table, ds, inv, ce)
                c = np.argmin(ce[:nc])
                if ce[c] < err[j] * (1.0 + 1e-5):
                    e = _nl_err(x, xo + _QK * j, w, _F32(d * _F32(cs[c])), fval, Lt, 0)
                    if e < err[j]:
                        err[j] = e
                        sc[j] = cs[c]
                        for i in range(_QK):
                            L[_QK * j + i] = Lt[i]
            saa = 0.0
            sax = 0.0
            sxx = 0.0
            for k in range(QK_K):
                wi = np.float64(w[xo + k])
                a = np.float64(sc[k // _QK]) * np.float64(fval[L[k]])
                xi = np.float64(x[xo + k])
                saa += wi * a * a
                sax += wi * a * xi
                sxx += wi * xi * xi
            if saa <= 0.0:
                break
            nd = sax / saa
            if not np.isfinite(nd) or abs(nd) > 65000.0 or nd == 0.0:
                break
            nd16 = _to_fp16(_F32(nd))
            a = np.float64(nd16)
            if not sxx - 2.0 * a * sax + a * a * saa < err.sum() * (1.0 - 1e-6):
                break
            d = nd16
            for j in range(nsub):
                err[j] = _nl_err(x, xo + _QK * j, w, _F32(d * _F32(sc[j])), fval, L, _QK * j)
        if not err.sum() < e0:
            continue  # keep ggml's bytes
        store_fp16(y, yo + IQ4_XS_D, d)
        scales_h = 0
        for j in range(nsub):
            ls = sc[j] + 32
            if j % 2 == 0:
                y[yo + IQ4_XS_SCALES_L + j // 2] = np.uint8(ls & 0xF)
            else:
                y[yo + IQ4_XS_SCALES_L + j // 2] |= np.uint8((ls & 0xF) << 4)
            scales_h |= (ls >> 4) << (2 * j)
            _pack_nl(y, yo + IQ4_XS_QS + 16 * j, L, _QK * j)
        y[yo + IQ4_XS_SCALES_H] = np.uint8(scales_h & 0xFF)
        y[yo + IQ4_XS_SCALES_H + 1] = np.uint8((scales_h >> 8) & 0xFF)


@njit(cache=True, nogil=True)
def _rows_iq4_nl(x, w, out, fval, stretch, r0, r1):
    nc = stretch.shape[0]
    inv = np.empty(nc, np.float32)
    sqq = np.empty(nc, np.float32)
    sqx = np.empty(nc, np.float32)
    L = np.empty(_QK, np.int64)
    for r in range(r0, r1):
        _optimize_row_iq4_nl(x[r], w, out[r], fval, stretch, inv, sqq, sqx, L)


@njit(cache=True, nogil=True)
def _rows_iq4_xs(x, w, out, fval, table, radius, r0, r1):
    nsub = QK_K // _QK
    sc = np.empty(nsub, np.int64)
    L = np.empty(QK_K, np.int64)
    Lt = np.empty(_QK, np.int64)
    scratch = _sym_scratch(nsub, radius)
    for r in range(r0, r1):
        _optimize_row_iq4_xs(x[r], w, out[r], fval, table, radius, sc, L, Lt, scratch)


@njit(cache=True, nogil=True)
def _plain_iq4_nl_rows(x, out, fval, r0, r1):
    """IQ4_NL blocks of rows [r0, r1) at the max-abs scale (the largest value on kvalues[0]), each value at its
    nearest level: what error feedback refines (ggml's IQ4_NL quantizer has no such plain form: without an
    imatrix it still searches 16 scales).  A block below GROUP_MAX_EPS is d = 0 with every value at the level
    nearest 0, as ggml writes it."""
    L = np.empty(_QK, np.int64)
    for r in range(r0, r1):
        xr = x[r]
        y = out[r]
        for ib in range(xr.shape[0] // _QK):
            xo = ib * _QK
            yo = ib * IQ4_NL_BYTES
            amax = _F32(0.0)
            vmax = _F32(0.0)
            for i in range(_QK):
                if abs(xr[xo + i]) > amax:
                    amax = abs(xr[xo + i])
                    vmax = xr[xo + i]
            d = _to_fp16(_F32(vmax / fval[0])) if amax >= GROUP_MAX_EPS else _F32(0.0)
            inv = _F32(_F32(1.0) / d) if d != _F32(0.0) else _F32(0.0)
            for i in range(_QK):
                L[i] = _best_index_16(fval, _F32(xr[xo + i] * inv))
            store_fp16(y, yo + IQ4_NL_D, d)
            _pack_nl(y, yo + IQ4_NL_QS, L, 0)


_NL_VALUES = kvalues_iq4nl.astype(np.float32)
_LEVEL_TABLE = _level_table()
_NL_STRETCHES = _stretches(2, 32, 8)
_NL_FEEDBACK_STRETCHES = np.concatenate([_NL_STRETCHES, _NEAR, -_NEAR]).astype(np.float32)


def optimize_iq4_nl(x, w, out):
    # 5d/8 to 1.5d in steps of 1/8 (8 per sign): on SmolLM2 tensors, mean weighted error 0.77 of ggml's
    # (0.84 within +-1/8)
    run_chunks(_rows_iq4_nl, x.shape[0], x, w, out, _NL_VALUES, _NL_STRETCHES)


def plain_iq4_nl(x, out):
    """The max-abs IQ4_NL blocks of the rows x (float32, C-contiguous) into out (:func:`_plain_iq4_nl_rows`)."""
    run_chunks(_plain_iq4_nl_rows, x.shape[0], x, out, _NL_VALUES)


def _feedback_iq4_nl(x, w, out):
    """Error feedback's IQ4_NL refiner, from :func:`plain_iq4_nl`'s blocks: the coarse stretches and
    :data:`_NEAR` of both signs, which stand in for ggml's search of 16 scales within ~6% of the max-abs one (32
    lanes, two whole vectors)."""
    run_chunks(_rows_iq4_nl, x.shape[0], x, w, out, _NL_VALUES, _NL_FEEDBACK_STRETCHES)


def optimize_iq4_xs(x, w, out):
    run_chunks(_rows_iq4_xs, x.shape[0], x, w, out, _NL_VALUES, _LEVEL_TABLE, 2)


# The small separate lookup (the type table keeps the byte-exact kernels): ggml type -> in-place refiner.
REFINERS = {
    GGMLType.Q2_K: optimize_q2_k,
    GGMLType.Q3_K: optimize_q3_k,
    GGMLType.Q4_K: optimize_q4_k,
    GGMLType.Q5_K: optimize_q5_k,
    GGMLType.Q6_K: optimize_q6_k,
    **{t: _legacy_refiner(t, _stretches(signs)) for t, (_layout, signs) in _LEGACY.items()},
    GGMLType.Q8_0: optimize_q8_0,
    GGMLType.IQ4_NL: optimize_iq4_nl,
    GGMLType.IQ4_XS: optimize_iq4_xs,
}

# Error feedback (:mod:`.gptq`) quantizes a block column at a time, each block's target new.  For the legacy
# types it starts from ggml's plain block (one max-abs pass) instead of its imatrix search, and refines with
# the fine stretches.  Output error with real Hessians relative to the imatrix start with the coarse
# stretches, on heavy-tailed rows of 16 SmolLM2 tensors' shapes: Q4_0 0.997, Q5_0 0.997, Q4_1 1.003, Q5_1
# 0.993, in 0.70x / 0.72x / 0.31x / 0.32x the time (the affine types' imatrix search is ggml's costliest);
# Gemma 3's shapes: Q4_0 0.995, Q5_0 1.000; SmolLM2's own rows (which lie on a Q4_1 grid): Q4_0 0.998, Q5_0
# 1.033 (fine stretches to +-5/64: 0.998).  From the plain start with the coarse stretches alone: 1.000,
# 1.020, 1.076, 1.115.
# IQ4_NL from plain_iq4_nl's max-abs blocks (ggml's quantizer, imatrix or not, is its 16-scale search, half of
# the type's feedback time) with _feedback_iq4_nl's stretches: output error 0.995 / 0.994 of the imatrix start
# with the coarse stretches on 12 SmolLM2 tensors / as many heavy-tailed ones, Gemma 3: 0.993 / 0.993, in
# 0.65x / 0.69x the time.
FEEDBACK_REFINERS = {**{t: _legacy_refiner(t, _fine_stretches(signs)) for t, (_layout, signs) in _LEGACY.items()},
                     GGMLType.IQ4_NL: _feedback_iq4_nl}
# the start of those types whose ggml quantizer is a search even without an imatrix (else ggml's plain one)
FEEDBACK_STARTS = {GGMLType.IQ4_NL: plain_iq4_nl}


def feedback_start(info) -> tuple:
    """(op, takes the imatrix) of the quantizer error feedback starts a block of type ``info`` from: ggml's
    ``"quantize_imatrix"``, its plain ``"quantize"`` where the refiner stands in for that search (the legacy
    types; Q8_0's has no imatrix form), or ``"start"``: :data:`FEEDBACK_STARTS`, compiled with the type's
    optimized refiner."""
    from ..types import Imatrix

    if info.ggml_type in FEEDBACK_STARTS:
        return "start", False
    if info.imatrix is Imatrix.IGNORED or info.ggml_type in FEEDBACK_REFINERS:
        return "quantize", False
    return "quantize_imatrix", True


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


def quantizer(method: str, has_imatrix: bool, hessians=None):
    """The per-tensor quantize function for ``method`` (``"llama"``: ggml's own; ``"optimized"``: above, with
    error feedback (:mod:`.gptq`) where ``hessians`` — the imatrix file's full input covariances — has a
    weight's; pass it through :func:`.gptq.for_tensor` with the tensor's name).

    Checked before any work: an unknown method is an InvalidArgumentError, and ``"optimized"`` (whose
    objective is the importance-weighted error) refuses to run without an imatrix.
    """
    if method == "llama":
        from . import quantize

        return quantize
    if method == "optimized":
        if not has_imatrix:
            raise ImatrixError("method 'optimized' minimises the imatrix-weighted error and needs an imatrix "
                               "(or use method 'llama')")
        if hessians is not None:
            from .gptq import ErrorFeedback

            return ErrorFeedback(hessians)
        return quantize_optimized
    raise InvalidArgumentError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")


def weighted_error(x, raw, qtype, imatrix) -> float:
    """sum(imatrix[col] * (x - dequantize(raw))^2) over all rows: the measure the optimized method lowers."""
    from . import dequantize, to_float32

    x2d = to_float32(x).reshape(raw.shape[0], -1)
    y = dequantize(raw, qtype, x2d.shape)
    w = np.ones(x2d.shape[1]) if imatrix is None else np.asarray(imatrix, np.float64).reshape(-1)
    return float(((x2d.astype(np.float64) - y) ** 2 * w).sum())
