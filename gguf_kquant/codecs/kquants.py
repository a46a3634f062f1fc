"""k-quant codecs, reference path: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K (ggml-quants.c, 2-6 bit super-blocks).

Ports of ``quantize_row_<type>_ref`` — what ``ggml_quantize_chunk`` runs when no importance matrix is given
(``quantize_q4_K(..., quant_weights=NULL)`` calls ``quantize_row_q4_K_ref`` on all rows at once) — and of
``dequantize_row_<type>``, bit for bit.  Q8_K is ``quantize_row_q8_K_ref`` (ggml never stores Q8_K files;
it is the dot-product operand).

Float evaluation, found by reading the C and confirmed against the oracle:

* every C ``float`` expression is float32, evaluated left to right: ``w*x[i]*l`` is ``(w*x[i])*l``,
  ``w*l*l`` is ``(w*l)*l``, ``d * sc[is] * q`` is ``(d*sc)*q``; ints meet floats only after conversion
  to float (exact for the small ints here), so ints are wrapped in ``np.float32`` (numba would promote
  ``int * float32`` to float64);
* ``1/iscale``, ``-nmax/max``, ``63.f/max_scale``, ``max_scale/63.f``, ``sum_x2/32`` are float32 divisions
  (no double anywhere in these functions); ``-(nmax + 0.1f*is)/max`` keeps ``0.1f`` as float32;
* no FMA: ``dl * q - ml`` rounds the product before the subtraction (ggml is built without contraction);
* sums accumulate in index order, one rounding per addition (no vectorized reduction in ggml's build);
* C's narrowing stores are reproduced: Q4_K/Q5_K ``uint8_t ls = nearest_int(..)`` keeps the low byte
  before ``MIN(63, ls)``; Q3_K stores ``nearest_int`` into ``int8_t``; Q6_K's int8 scales and Q2_K's
  nibble ORs likewise keep the low byte.

Speed-ups that keep every rounding identical (so bytes are unchanged):

* the scale searches (make_qkx2_quants, make_qx_quants, make_q3_quants) are latency-bound chains of
  dependent float additions; the sub-blocks of a super-block are independent, so they run as "lanes" in
  lock step (:func:`_qkx2_lanes`), each lane doing C's exact sequence of operations — 2-3x ggml's speed;
* loop invariants are hoisted where C recomputes the same float: ``x[i] - min`` and ``max - min``
  (recomputed whenever a step wins, since C's later steps use the new min), ``w*x[i]`` (C's
  ``w*x[i]*l`` is ``(w*x[i])*l``); candidate quants of a step are kept, not rounded again on a win;
* Q8_K's ``amax`` is an integer max over the bit patterns of ``|x|`` (same order for finite floats);
* inner loops get run-time trip counts (``min(32, n)`` etc.): LLVM fully unrolls constant 16/32-trip
  loops and then fails to vectorize them, so the dequantizers would run at a fifth of ggml's speed.

The plain one-sub-block ports live in :mod:`.helpers` (shared with the importance-matrix path);
tests/test_codecs_kquants.py checks the lane versions against them.

Layouts are drawn next to each codec.  Public functions follow :mod:`gguf_kquant.types`:
``quantize_<t>(x, out)`` (x float32 (n_rows, n_per_row), possibly read-only; out uint8 (n_rows, row_bytes))
and ``dequantize_<t>(raw, out)``.  Quantize drivers split chunks of super-blocks (flattened over rows),
dequantize drivers rows, over threads (:func:`.chunks.run_chunks`: nogil kernels on Python threads, which
compiles in a fraction of a ``prange`` driver's time); each super-block's kernel is serial, so output never
depends on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK_K, TYPES, GGMLType, register_kernel

from .chunks import run_chunks
from .helpers import (
    GROUP_MAX_EPS,
    get_scale_min_k4,
    load_fp16,
    nearest_int,
    pack_2bit_k,
    pack_q3_k,
    pack_q3_k_scales,
    pack_q4_k,
    pack_q5_k,
    pack_scale_min_k4,
    q3_k_scale,
    quantize_q6_k_scales_and_pack,
    requantize_k4,
    requantize_q2_k,
    requantize_q3_k,
    store_fp16,
)

_F32 = np.float32
_CHUNK = 16  # super-blocks per parallel work item

# Block sizes and field offsets, from the type table (layouts drawn at each codec below).  Shared with
# kquants_imatrix; numba compiles them in as constants.
_T = {name: TYPES[GGMLType[name]] for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")}
Q2_K_BYTES = _T["Q2_K"].type_size
Q2_K_SCALES, Q2_K_QS, Q2_K_D, Q2_K_DMIN = (_T["Q2_K"].field_offset(f) for f in ("scales", "qs", "d", "dmin"))
Q3_K_BYTES = _T["Q3_K"].type_size
Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES, Q3_K_D = (_T["Q3_K"].field_offset(f) for f in ("hmask", "qs", "scales", "d"))
Q4_K_BYTES = _T["Q4_K"].type_size
Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS = (_T["Q4_K"].field_offset(f) for f in ("d", "dmin", "scales", "qs"))
Q5_K_BYTES = _T["Q5_K"].type_size
Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QH, Q5_K_QS = (
    _T["Q5_K"].field_offset(f) for f in ("d", "dmin", "scales", "qh", "qs"))
Q6_K_BYTES = _T["Q6_K"].type_size
Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D = (_T["Q6_K"].field_offset(f) for f in ("ql", "qh", "scales", "d"))
Q8_K_BYTES = _T["Q8_K"].type_size
Q8_K_D, Q8_K_QS, Q8_K_BSUMS = (_T["Q8_K"].field_offset(f) for f in ("d", "qs", "bsums"))


# ---------------------------------------------------------------------------------------------------
# small shared pieces
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _clamp(v, lo, hi):
    return max(lo, min(hi, v))


# ---------------------------------------------------------------------------------------------------
# Lane-interleaved scale searches.  ggml runs make_qkx2_quants / make_qx_quants on one sub-block after
# another; each is a chain of dependent float additions, so the CPU waits on add latency.  The sub-blocks
# of a super-block are independent, so these versions run all of them ("lanes") in lock step: element i of
# every lane is at xt[i*nl + j].  Each lane performs exactly the C sequence of float operations (same
# order, same roundings); only the interleaving differs, which cannot change any result.  Data-dependent
# branches become per-lane flags; a lane that C would not touch (D <= 0, an all-zero sub-block) computes
# throw-away values (possibly inf/NaN, hence error_model="numpy") that are never stored.
# ``nl`` is passed in at run time on purpose: with a constant trip count LLVM fully unrolls the lane
# loops and then fails to vectorize them.
# ---------------------------------------------------------------------------------------------------

# rows of the per-lane state array ``st`` (float32, (16, nl))
_S_MIN, _S_MAX, _S_RNG, _S_SUMW, _S_SUMX, _S_SCALE, _S_BEST, _S_ISCALE = 0, 1, 2, 3, 4, 5, 6, 7
_S_SL, _S_SL2, _S_SXL, _S_TSCALE, _S_TMIN, _S_CUR, _S_ACC, _S_DEAD = 8, 9, 10, 11, 12, 13, 14, 15


@njit(cache=True, nogil=True, error_model="numpy")
def _qkx2_lanes(xt, wt, n, nl, nmax, Lt, Lat, xm, st, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants on nl lanes of n values (xt, wt transposed; weights >= 0).

    Leaves scale in st[_S_SCALE], the_min = -st[_S_MIN] and quants in Lt (transposed).
    """
    fmin = st[_S_MIN]
    fmax = st[_S_MAX]
    rng = st[_S_RNG]
    sum_w = st[_S_SUMW]
    sum_x = st[_S_SUMX]
    scale = st[_S_SCALE]
    best = st[_S_BEST]
    iscale = st[_S_ISCALE]
    sum_l = st[_S_SL]
    sum_l2 = st[_S_SL2]
    sum_xl = st[_S_SXL]
    tscale = st[_S_TSCALE]
    tmin = st[_S_TMIN]
    cur = st[_S_CUR]
    acc = st[_S_ACC]
    dead = st[_S_DEAD]
    zero = _F32(0.0)
    for j in range(nl):
        fmin[j] = xt[j]
        fmax[j] = xt[j]
        sum_w[j] = wt[j]
        sum_x[j] = _F32(wt[j] * xt[j])
    for i in range(1, n):
        for j in range(nl):
            v = xt[i * nl + j]
            w = wt[i * nl + j]
            if v < fmin[j]:
                fmin[j] = v
            if v > fmax[j]:
                fmax[j] = v
            sum_w[j] = _F32(sum_w[j] + w)
            sum_x[j] = _F32(sum_x[j] + w * v)
    fnmax = _F32(nmax)
    for j in range(nl):
        if fmin[j] > zero:
            fmin[j] = zero
        dead[j] = _F32(1.0) if fmax[j] == fmin[j] else zero  # C: L = 0, *the_min = -min, return 0
        rng[j] = _F32(fmax[j] - fmin[j])
        iscale[j] = _F32(fnmax / rng[j])
        scale[j] = _F32(_F32(1.0) / iscale[j])
        best[j] = zero
    for i in range(n):
        for j in range(nl):
            k = i * nl + j
            xm[k] = _F32(xt[k] - fmin[j])
            l = _clamp(nearest_int(iscale[j] * xm[k]), 0, nmax)
            Lt[k] = l
            diff = _F32(scale[j] * _F32(l) + fmin[j] - xt[k])
            diff = _F32(abs(diff)) if use_mad else _F32(diff * diff)
            best[j] = _F32(best[j] + wt[k] * diff)
    for is_ in range(nstep + 1):
        num = _F32(rmin + rdelta * _F32(is_) + fnmax)
        for j in range(nl):
            iscale[j] = _F32(num / rng[j])
            sum_l[j] = zero
            sum_l2[j] = zero
            sum_xl[j] = zero
        for i in range(n):
            for j in range(nl):
                k = i * nl + j
                l = _clamp(nearest_int(iscale[j] * xm[k]), 0, nmax)
                Lat[k] = l
                fl = _F32(l)
                wl = _F32(wt[k] * fl)
                sum_l[j] = _F32(sum_l[j] + wl)
                sum_l2[j] = _F32(sum_l2[j] + wl * fl)
                sum_xl[j] = _F32(sum_xl[j] + wl * xt[k])
        for j in range(nl):
            D = _F32(sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j])
            ts = _F32((sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / D)
            tm = _F32((sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / D)
            if tm > zero:
                tm = zero
                ts = _F32(sum_xl[j] / sum_l2[j])
            tscale[j] = ts
            tmin[j] = tm
            acc[j] = _F32(1.0) if D > zero else zero  # C only evaluates the step when D > 0
            cur[j] = zero
        for i in range(n):
            for j in range(nl):
                k = i * nl + j
                diff = _F32(tscale[j] * _F32(Lat[k]) + tmin[j] - xt[k])
                diff = _F32(abs(diff)) if use_mad else _F32(diff * diff)
                cur[j] = _F32(cur[j] + wt[k] * diff)
        n_acc = 0
        for j in range(nl):
            if acc[j] != zero and dead[j] == zero and cur[j] < best[j]:
                best[j] = cur[j]
                scale[j] = tscale[j]
                fmin[j] = tmin[j]
                rng[j] = _F32(fmax[j] - fmin[j])  # later steps use the new min
                n_acc += 1
            else:
                acc[j] = zero
        if n_acc:
            for i in range(n):
                for j in range(nl):
                    k = i * nl + j
                    if acc[j] != zero:
                        Lt[k] = Lat[k]
                        xm[k] = _F32(xt[k] - fmin[j])
    for j in range(nl):
        if dead[j] != zero:
            scale[j] = zero
            for i in range(n):
                Lt[i * nl + j] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def _qx_rmse1_lanes(xt, n, nl, nmax, Lt, Lat, w, wx, st):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) on nl lanes (Q6_K); scale left in st[_S_SCALE]."""
    fmax = st[_S_MAX]
    amax = st[_S_RNG]
    scale = st[_S_SCALE]
    best = st[_S_BEST]
    iscale = st[_S_ISCALE]
    sumlx = st[_S_SL]
    suml2 = st[_S_SL2]
    dead = st[_S_DEAD]
    zero = _F32(0.0)
    for j in range(nl):
        fmax[j] = zero
        amax[j] = zero
    for i in range(n):
        for j in range(nl):
            v = xt[i * nl + j]
            ax = _F32(abs(v))
            if ax > amax[j]:
                amax[j] = ax
                fmax[j] = v
    fnmax = _F32(nmax)
    for j in range(nl):
        dead[j] = _F32(1.0) if amax[j] < GROUP_MAX_EPS else zero  # C: L = 0, return 0
        iscale[j] = _F32(-fnmax / fmax[j])
        sumlx[j] = zero
        suml2[j] = zero
    for i in range(n):
        for j in range(nl):
            k = i * nl + j
            v = xt[k]
            wi = _F32(v * v)
            w[k] = wi
            wx[k] = _F32(wi * v)  # C: w*x[i]*l == (w*x[i])*l, the same product in every step
            l = _clamp(nearest_int(iscale[j] * v), -nmax, nmax - 1)
            Lt[k] = l + nmax
            fl = _F32(l)
            sumlx[j] = _F32(sumlx[j] + wx[k] * fl)
            suml2[j] = _F32(suml2[j] + wi * fl * fl)
    for j in range(nl):
        scale[j] = _F32(sumlx[j] / suml2[j]) if suml2[j] != zero else zero
        best[j] = _F32(scale[j] * sumlx[j])
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        num = _F32(-(fnmax + _F32(0.1) * _F32(is_)))
        for j in range(nl):
            iscale[j] = _F32(num / fmax[j])
            sumlx[j] = zero
            suml2[j] = zero
        for i in range(n):
            for j in range(nl):
                k = i * nl + j
                l = _clamp(nearest_int(iscale[j] * xt[k]), -nmax, nmax - 1)
                Lat[k] = l + nmax
                fl = _F32(l)
                sumlx[j] = _F32(sumlx[j] + wx[k] * fl)
                suml2[j] = _F32(suml2[j] + w[k] * fl * fl)
        n_acc = 0
        for j in range(nl):
            if suml2[j] > zero and sumlx[j] * sumlx[j] > best[j] * suml2[j]:
                scale[j] = _F32(sumlx[j] / suml2[j])
                best[j] = _F32(scale[j] * sumlx[j])
                iscale[j] = _F32(1.0)  # reused as the "accepted" flag below
                n_acc += 1
            else:
                iscale[j] = zero
        if n_acc:
            for i in range(n):
                for j in range(nl):
                    if iscale[j] != zero:
                        Lt[i * nl + j] = Lat[i * nl + j]
    for j in range(nl):
        if dead[j] != zero:
            scale[j] = zero
            for i in range(n):
                Lt[i * nl + j] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def _q3_lanes(xt, n, nl, nmax, Lt, w, wx, st):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on nl lanes (Q3_K); scale left in st[_S_SCALE].

    A lane stops after its first pass without changes, as C's loop does for its sub-block.
    """
    fmax = st[_S_MAX]
    amax = st[_S_RNG]
    scale = st[_S_SCALE]
    iscale = st[_S_ISCALE]
    sumlx = st[_S_SL]
    suml2 = st[_S_SL2]
    dead = st[_S_DEAD]
    active = st[_S_ACC]
    changed = st[_S_CUR]
    zero = _F32(0.0)
    for j in range(nl):
        fmax[j] = zero
        amax[j] = zero
    for i in range(n):
        for j in range(nl):
            v = xt[i * nl + j]
            ax = _F32(abs(v))
            if ax > amax[j]:
                amax[j] = ax
                fmax[j] = v
    fnmax = _F32(nmax)
    n_active = 0
    for j in range(nl):
        dead[j] = _F32(1.0) if amax[j] < GROUP_MAX_EPS else zero
        active[j] = _F32(1.0) - dead[j]
        n_active += 1 - int(dead[j])
        iscale[j] = _F32(-fnmax / fmax[j])
        sumlx[j] = zero
        suml2[j] = zero
    for i in range(n):
        for j in range(nl):
            k = i * nl + j
            v = xt[k]
            l = _clamp(nearest_int(iscale[j] * v), -nmax, nmax - 1)
            Lt[k] = l
            wi = _F32(v * v)
            w[k] = wi
            wx[k] = _F32(wi * v)  # C: w*x[i]*l == (w*x[i])*l
            fl = _F32(l)
            sumlx[j] = _F32(sumlx[j] + wx[k] * fl)
            suml2[j] = _F32(suml2[j] + wi * fl * fl)
    for _itry in range(5):
        if n_active == 0:
            break
        for j in range(nl):
            changed[j] = zero
        for i in range(n):
            for j in range(nl):
                if active[j] == zero:
                    continue
                k = i * nl + j
                Li = Lt[k]
                fLi = _F32(Li)
                slx = _F32(sumlx[j] - wx[k] * fLi)
                sl2 = _F32(suml2[j] - w[k] * fLi * fLi)
                new_l = _clamp(nearest_int(_F32(xt[k] * sl2) / slx), -nmax, nmax - 1)
                fn = _F32(new_l)
                slx2 = _F32(slx + wx[k] * fn)
                sl22 = _F32(sl2 + w[k] * fn * fn)
                # C: if (slx > 0) { ...; if (new_l != L[i]) { ...; if (sl2 > 0 && ...) accept } }
                if (slx > zero and new_l != Li and sl22 > zero
                        and slx2 * slx2 * suml2[j] > sumlx[j] * sumlx[j] * sl22):
                    Lt[k] = new_l
                    sumlx[j] = slx2
                    suml2[j] = sl22
                    changed[j] = _F32(1.0)
        n_active = 0
        for j in range(nl):
            if changed[j] == zero:
                active[j] = zero  # C: if (!n_changed) break;
            else:
                n_active += 1
    for j in range(nl):
        if dead[j] != zero:
            scale[j] = zero
            for i in range(n):
                Lt[i * nl + j] = 0
        else:
            scale[j] = _F32(sumlx[j] / suml2[j]) if suml2[j] > zero else zero
            for i in range(n):
                Lt[i * nl + j] += nmax


# ---------------------------------------------------------------------------------------------------
# Q2_K — block_q2_K, 84 bytes: x = d * sc * q - dmin * m,  q in [0, 3], 16 sub-blocks of 16
#
#   byte  0..15  scales  scales[j] = m_j << 4 | sc_j            (4-bit scale and min of sub-block j)
#   byte 16..79  qs      two 128-element halves h, 32 bytes each:
#                          qs[32h + l] = q[128h+l] | q[128h+l+32] << 2 | q[128h+l+64] << 4 | q[128h+l+96] << 6
#   byte 80..81  d       fp16 (scale of the 4-bit scales)
#   byte 82..83  dmin    fp16 (scale of the 4-bit mins)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _quantize_block_q2_k(x, xo, y, yo, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins):
    for j in range(16):  # nl == 16 lanes: the 16 sub-blocks of 16
        for l in range(16):
            v = x[xo + 16 * j + l]
            xt[l * nl + j] = v
            wt[l * nl + j] = _F32(abs(v))
    _qkx2_lanes(xt, wt, 16, nl, 3, Lt, Lat, xm, st, _F32(-0.5), _F32(0.1), 15, True)
    max_scale = _F32(0.0)  # as the min is deducted, scales are positive
    max_min = _F32(0.0)
    for j in range(16):
        s = st[_S_SCALE, j]
        m = _F32(-st[_S_MIN, j])
        scales[j] = s
        mins[j] = m
        for l in range(16):
            L[16 * j + l] = Lt[l * nl + j]
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    q4scale = _F32(15.0)
    so = yo + Q2_K_SCALES
    if max_scale > _F32(0.0):
        iscale = _F32(q4scale / max_scale)
        for j in range(16):
            y[so + j] = np.uint8(nearest_int(iscale * scales[j]) & 0xFF)  # uint8_t store keeps the low byte
        d = store_fp16(y, yo + Q2_K_D, _F32(max_scale / q4scale))
    else:
        for j in range(16):
            y[so + j] = 0
        d = store_fp16(y, yo + Q2_K_D, _F32(0.0))
    if max_min > _F32(0.0):
        iscale = _F32(q4scale / max_min)
        for j in range(16):
            l = nearest_int(iscale * mins[j])
            y[so + j] = np.uint8(y[so + j] | ((l << 4) & 0xFF))
        dmin = store_fp16(y, yo + Q2_K_DMIN, _F32(max_min / q4scale))
    else:
        dmin = store_fp16(y, yo + Q2_K_DMIN, _F32(0.0))
    requantize_q2_k(x, xo, y, so, d, dmin, L)
    pack_2bit_k(y, yo + Q2_K_QS, L)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q2_k(rb, yb, n16):
    """One block: rb = its 84 bytes, yb = its 256 floats; n16 == 16 (run-time so that LLVM vectorizes)."""
    d = load_fp16(rb, Q2_K_D)
    dmin = load_fp16(rb, Q2_K_DMIN)
    for h in range(2):
        for shift in range(4):  # 2-bit plane
            for half in range(2):
                sc = np.int64(rb[Q2_K_SCALES + 8 * h + 2 * shift + half])
                dl = _F32(d * _F32(sc & 0xF))
                ml = _F32(dmin * _F32(sc >> 4))
                q = rb[Q2_K_QS + 32 * h + 16 * half: Q2_K_QS + 32 * h + 16 * half + n16]
                yy = yb[128 * h + 32 * shift + 16 * half: 128 * h + 32 * shift + 16 * half + n16]
                for l in range(n16):
                    yy[l] = _F32(_F32(dl * _F32((np.int32(q[l]) >> (2 * shift)) & 3)) - ml)


# ---------------------------------------------------------------------------------------------------
# Q3_K — block_q3_K, 110 bytes: x = d * (sc - 32) * (q - 4),  q in [0, 7], 16 sub-blocks of 16
#
#   byte   0..31   hmask   bit b of hmask[m] = high bit (value 4) of q[32b + m]
#   byte  32..95   qs      low 2 bits, packed as Q2_K's qs
#   byte  96..107  scales  sixteen 6-bit scales s0..s15 (stored +32):
#                    byte k      (k = 0..7) : | s(k+8)[3:0] | s(k)[3:0] |
#                    byte 8 + k  (k = 0..3) : | s(k+12)[5:4] | s(k+8)[5:4] | s(k+4)[5:4] | s(k)[5:4] |
#   byte 108..109  d       fp16
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _quantize_block_q3_k(x, xo, y, yo, nl, L, Lt, xt, w, wx, st, scales):
    for j in range(16):  # nl == 16 lanes: the 16 sub-blocks of 16
        for l in range(16):
            xt[l * nl + j] = x[xo + 16 * j + l]
    _q3_lanes(xt, 16, nl, 4, Lt, w, wx, st)
    max_scale = _F32(0.0)
    amax = _F32(0.0)
    for j in range(16):
        s = st[_S_SCALE, j]
        for l in range(16):
            L[16 * j + l] = Lt[l * nl + j]
        scales[j] = s
        a = _F32(abs(s))
        if a > amax:
            amax = a
            max_scale = s
    so = yo + Q3_K_SCALES
    Ls = Lt  # free again: the quants were copied to L
    if max_scale != _F32(0.0):
        iscale = _F32(_F32(-32.0) / max_scale)
        for j in range(16):
            l = np.int32(np.int8(nearest_int(iscale * scales[j])))  # int8_t l = nearest_int(..)
            Ls[j] = _clamp(l, -32, 31) + 32
        pack_q3_k_scales(y, so, Ls)
        d_all = store_fp16(y, yo + Q3_K_D, _F32(_F32(1.0) / iscale))
    else:
        for k in range(12):  # memset(y[i].scales, 0, 12)
            y[so + k] = 0
        d_all = store_fp16(y, yo + Q3_K_D, _F32(0.0))
    requantize_q3_k(x, xo, y, so, d_all, L, nl)  # nl == 16, run-time: lets LLVM vectorize
    pack_q3_k(y, yo + Q3_K_HMASK, yo + Q3_K_QS, L)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q3_k(rb, yb, n16):
    d_all = load_fp16(rb, Q3_K_D)
    for h in range(2):
        for shift in range(4):
            bit = 4 * h + shift
            for half in range(2):
                dl = _F32(d_all * _F32(q3_k_scale(rb, Q3_K_SCALES, 8 * h + 2 * shift + half) - 32))
                q = rb[Q3_K_QS + 32 * h + 16 * half: Q3_K_QS + 32 * h + 16 * half + n16]
                hm = rb[Q3_K_HMASK + 16 * half: Q3_K_HMASK + 16 * half + n16]
                yy = yb[128 * h + 32 * shift + 16 * half: 128 * h + 32 * shift + 16 * half + n16]
                for l in range(n16):
                    # ((q >> shift) & 3) - (hm & m ? 0 : 4)
                    v = ((np.int32(q[l]) >> (2 * shift)) & 3) - 4 + (((np.int32(hm[l]) >> bit) & 1) << 2)
                    yy[l] = _F32(dl * _F32(v))


# ---------------------------------------------------------------------------------------------------
# Q4_K — block_q4_K, 144 bytes: x = d * sc * q - dmin * m,  q in [0, 15], 8 sub-blocks of 32
#
#   byte  0..1    d       fp16
#   byte  2..3    dmin    fp16
#   byte  4..15   scales  eight 6-bit scales s0..s7 and mins m0..m7, k = 0..3:
#                   byte k     : | s(k+4)[5:4] | s(k)[5:0] |
#                   byte k + 4 : | m(k+4)[5:4] | m(k)[5:0] |
#                   byte k + 8 : | m(k+4)[3:0] | s(k+4)[3:0] |
#   byte 16..143  qs      four 64-element chunks c, 32 bytes each: qs[32c + l] = q[64c + l] | q[64c + l + 32] << 4
#
# Q5_K — block_q5_K, 176 bytes: as Q4_K with q in [0, 31]
#   byte  0..15   d, dmin, scales as Q4_K
#   byte 16..47   qh      bit 2c of qh[l] = bit 4 of q[64c + l],  bit 2c+1 = bit 4 of q[64c + l + 32]
#   byte 48..175  qs      low nibbles, packed as Q4_K's qs
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _scale_min_k4_ref(scales, mins, max_scale, max_min, Ls, Lm):
    """The 6-bit scales and mins of quantize_row_q4_K_ref / q5_K_ref (packed by helpers.pack_scale_min_k4)."""
    inv_scale = _F32(_F32(63.0) / max_scale) if max_scale > _F32(0.0) else _F32(0.0)
    inv_min = _F32(_F32(63.0) / max_min) if max_min > _F32(0.0) else _F32(0.0)
    for j in range(8):
        Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t ls = nearest_int(..)
        Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def _scales_q4_k_like(x, xo, nmax, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins, rmin, nstep):
    """Sub-block scales/mins of Q4_K (nmax 15, rmin -1, 20 steps) and Q5_K (31, -0.5, 15); nl == 8 lanes."""
    for j in range(8):
        b = xo + 32 * j
        sum_x2 = _F32(0.0)
        for l in range(32):
            sum_x2 = _F32(sum_x2 + x[b + l] * x[b + l])
        av_x = _F32(np.sqrt(_F32(sum_x2 / _F32(32.0))))
        for l in range(32):
            v = x[b + l]
            xt[l * nl + j] = v
            wt[l * nl + j] = _F32(av_x + _F32(abs(v)))
    _qkx2_lanes(xt, wt, 32, nl, nmax, Lt, Lat, xm, st, rmin, _F32(0.1), nstep, False)
    max_scale = _F32(0.0)
    max_min = _F32(0.0)
    for j in range(8):
        s = st[_S_SCALE, j]
        m = _F32(-st[_S_MIN, j])
        scales[j] = s
        mins[j] = m
        for l in range(32):
            L[32 * j + l] = Lt[l * nl + j]
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    return max_scale, max_min


@njit(cache=True, nogil=True, inline="always")
def _scales_and_requantize_k4(x, xo, y, yo, do, dmo, so, nmax, max_scale, max_min, scales, mins, L, Ls, Lm):
    """Q4_K/Q5_K (ref): 6-bit scales/mins at so, fp16 d/dmin at do/dmo, final quants L in [0, nmax]."""
    _scale_min_k4_ref(scales, mins, max_scale, max_min, Ls, Lm)
    pack_scale_min_k4(y, yo + so, Ls, Lm)
    d_all = store_fp16(y, yo + do, _F32(max_scale / _F32(63.0)))
    dmin_all = store_fp16(y, yo + dmo, _F32(max_min / _F32(63.0)))
    requantize_k4(x, xo, y, yo + so, d_all, dmin_all, nmax, L)


@njit(cache=True, nogil=True)
def _quantize_block_q4_k(x, xo, y, yo, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins):
    max_scale, max_min = _scales_q4_k_like(x, xo, 15, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins,
                                           _F32(-1.0), 20)
    # Lt, Lat are free again (the quants are in L): scratch for the 6-bit scales and mins
    _scales_and_requantize_k4(x, xo, y, yo, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, 15, max_scale, max_min, scales, mins,
                              L, Lt, Lat)
    pack_q4_k(y, yo + Q4_K_QS, L)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q4_k(rb, yb, n32):
    d = load_fp16(rb, Q4_K_D)
    dmin = load_fp16(rb, Q4_K_DMIN)
    for c in range(4):
        sc1, m1i = get_scale_min_k4(2 * c, rb, Q4_K_SCALES)
        sc2, m2i = get_scale_min_k4(2 * c + 1, rb, Q4_K_SCALES)
        d1 = _F32(d * _F32(sc1))
        m1 = _F32(dmin * _F32(m1i))
        d2 = _F32(d * _F32(sc2))
        m2 = _F32(dmin * _F32(m2i))
        q = rb[Q4_K_QS + 32 * c: Q4_K_QS + 32 * c + n32]
        y1 = yb[64 * c: 64 * c + n32]
        y2 = yb[64 * c + 32: 64 * c + 32 + n32]
        for l in range(n32):
            y1[l] = _F32(_F32(d1 * _F32(q[l] & np.uint8(0xF))) - m1)
        for l in range(n32):
            y2[l] = _F32(_F32(d2 * _F32(q[l] >> np.uint8(4))) - m2)


@njit(cache=True, nogil=True)
def _quantize_block_q5_k(x, xo, y, yo, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins):
    max_scale, max_min = _scales_q4_k_like(x, xo, 31, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins,
                                           _F32(-0.5), 15)
    _scales_and_requantize_k4(x, xo, y, yo, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, 31, max_scale, max_min, scales, mins,
                              L, Lt, Lat)
    pack_q5_k(y, yo + Q5_K_QH, yo + Q5_K_QS, L)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q5_k(rb, yb, n32, v):
    """One block in two passes: the 5-bit values into ``v`` (uint8[256]), then d*v - m per sub-block.

    Two short loops of one kind each vectorize better than one loop doing both (0.43 -> 0.33 ms for
    512 x 4096 on one thread).  float(v) equals C's float((q & 0xF) + (qh & u ? 16 : 0)): same integer.
    """
    qh = rb[Q5_K_QH: Q5_K_QH + n32]
    for c in range(4):
        ql = rb[Q5_K_QS + 32 * c: Q5_K_QS + 32 * c + n32]
        v1 = v[64 * c: 64 * c + n32]
        v2 = v[64 * c + 32: 64 * c + 32 + n32]
        shift = np.uint8(2 * c)
        for l in range(n32):
            h = qh[l] >> shift
            q = ql[l]
            v1[l] = (q & np.uint8(0xF)) | ((h & np.uint8(1)) << np.uint8(4))
            v2[l] = (q >> np.uint8(4)) | ((h & np.uint8(2)) << np.uint8(3))
    d = load_fp16(rb, Q5_K_D)
    dmin = load_fp16(rb, Q5_K_DMIN)
    for j in range(8):
        sc, m = get_scale_min_k4(j, rb, Q5_K_SCALES)
        dj = _F32(d * _F32(sc))
        mj = _F32(dmin * _F32(m))
        vv = v[32 * j: 32 * j + n32]
        yy = yb[32 * j: 32 * j + n32]
        for l in range(n32):
            yy[l] = _F32(_F32(dj * _F32(vv[l])) - mj)


# ---------------------------------------------------------------------------------------------------
# Q6_K — block_q6_K, 210 bytes: x = d * sc * (q - 32),  q in [0, 63], sc int8, 16 sub-blocks of 16
#
#   two 128-element halves h; within a half, element e = 32r + l (r = 0..3, l = 0..31):
#   byte   0..127  ql      ql[64h + l]      = q[128h + l][3:0]      | q[128h + l + 64][3:0] << 4
#                          ql[64h + 32 + l] = q[128h + l + 32][3:0] | q[128h + l + 96][3:0] << 4
#   byte 128..191  qh      qh[32h + l] = q[128h+l][5:4] | q[128h+l+32][5:4] << 2
#                                      | q[128h+l+64][5:4] << 4 | q[128h+l+96][5:4] << 6
#   byte 192..207  scales  int8 scale of sub-block j
#   byte 208..209  d       fp16
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _quantize_block_q6_k(x, xo, y, yo, nl, L, Lt, Lat, xt, w, wx, st, scales):
    for ib in range(16):  # nl == 16 lanes: the 16 sub-blocks of 16
        for l in range(16):
            xt[l * nl + ib] = x[xo + 16 * ib + l]
    _qx_rmse1_lanes(xt, 16, nl, 32, Lt, Lat, w, wx, st)
    max_scale = _F32(0.0)
    max_abs_scale = _F32(0.0)
    for ib in range(16):
        s = st[_S_SCALE, ib]
        for l in range(16):
            L[16 * ib + l] = Lt[l * nl + ib]
        scales[ib] = s
        a = _F32(abs(s))
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    quantize_q6_k_scales_and_pack(x, xo, y, yo, Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D, Q6_K_BYTES, L, scales,
                                  max_scale, max_abs_scale)


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q6_k(rb, yb, n16):
    d = load_fp16(rb, Q6_K_D)
    for h in range(2):
        for half in range(2):  # C's is = l/16
            o = 16 * half
            ql1 = rb[Q6_K_QL + 64 * h + o: Q6_K_QL + 64 * h + o + n16]
            ql2 = rb[Q6_K_QL + 64 * h + 32 + o: Q6_K_QL + 64 * h + 32 + o + n16]
            qh = rb[Q6_K_QH + 32 * h + o: Q6_K_QH + 32 * h + o + n16]
            sc = Q6_K_SCALES + 8 * h + half
            s1 = _F32(d * _F32(np.int8(rb[sc])))  # C: d * sc[is] * q == (d * sc[is]) * q
            s2 = _F32(d * _F32(np.int8(rb[sc + 2])))
            s3 = _F32(d * _F32(np.int8(rb[sc + 4])))
            s4 = _F32(d * _F32(np.int8(rb[sc + 6])))
            y1 = yb[128 * h + o: 128 * h + o + n16]
            y2 = yb[128 * h + 32 + o: 128 * h + 32 + o + n16]
            y3 = yb[128 * h + 64 + o: 128 * h + 64 + o + n16]
            y4 = yb[128 * h + 96 + o: 128 * h + 96 + o + n16]
            for l in range(n16):
                hb = np.int32(qh[l])
                a = np.int32(ql1[l])
                b = np.int32(ql2[l])
                y1[l] = _F32(s1 * _F32(((a & 0xF) | ((hb & 3) << 4)) - 32))
                y2[l] = _F32(s2 * _F32(((b & 0xF) | (((hb >> 2) & 3) << 4)) - 32))
                y3[l] = _F32(s3 * _F32(((a >> 4) | (((hb >> 4) & 3) << 4)) - 32))
                y4[l] = _F32(s4 * _F32(((b >> 4) | (((hb >> 6) & 3) << 4)) - 32))


# ---------------------------------------------------------------------------------------------------
# Q8_K — block_q8_K, 292 bytes: x = d * q,  q int8 in [-127, 127]  (dot-product operand)
#
#   byte   0..3    d       float32
#   byte   4..259  qs      int8
#   byte 260..291  bsums   int16 sum of qs[16j .. 16j+15], j = 0..15
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _abs_bits(v):
    return np.float32(v).view(np.int32) & np.int32(0x7FFFFFFF)


@njit(cache=True, nogil=True)
def _quantize_block_q8_k(xb, yb, n256, n16):
    """One block: xb = its 256 floats, yb = its 292 bytes; n256/n16 == 256/16 at run time (vectorizes)."""
    # C: if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); max = x[j]; } — i.e. max is the first x[j] whose
    # |x[j]| equals the final amax.  For finite floats |x| orders like its bit pattern, so an integer
    # max (which vectorizes) finds amax exactly, and a scan finds the first j attaining it.
    abits = np.int32(0)
    for j in range(n256):
        abits = max(abits, _abs_bits(xb[j]))
    if abits == 0:  # !amax: d = 0, qs zeroed; ggml leaves bsums as they were (we write zeros)
        for k in range(Q8_K_BYTES):
            yb[k] = 0
        return
    vmax = _F32(0.0)
    for j in range(n256):
        if _abs_bits(xb[j]) == abits:
            vmax = xb[j]
            break
    # -127.f/max overflows to -inf for a tiny subnormal max; nearest_int's bit trick then gives values
    # whose low byte ggml stores — reproduced exactly by the same trick and the uint8 store.
    iscale = _F32(_F32(-127.0) / vmax)
    q = yb[Q8_K_QS: Q8_K_QS + n256]
    for j in range(n256):
        q[j] = np.uint8(min(np.int32(127), nearest_int(iscale * xb[j])) & np.int32(0xFF))
    for j in range(16):
        acc = np.int32(0)
        qs = q[16 * j: 16 * j + n16]
        for ii in range(n16):
            acc += np.int32(np.int8(qs[ii]))
        yb[Q8_K_BSUMS + 2 * j] = np.uint8(acc & 0xFF)
        yb[Q8_K_BSUMS + 2 * j + 1] = np.uint8((acc >> 8) & 0xFF)
    bits = _F32(_F32(1.0) / iscale).view(np.uint32)
    for k in range(4):
        yb[Q8_K_D + k] = np.uint8((bits >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(cache=True, nogil=True, inline="always")
def _dequantize_block_q8_k(rb, yb, n256):
    o = Q8_K_D
    bits = (np.uint32(rb[o]) | (np.uint32(rb[o + 1]) << np.uint32(8))
            | (np.uint32(rb[o + 2]) << np.uint32(16)) | (np.uint32(rb[o + 3]) << np.uint32(24)))
    d = np.uint32(bits).view(np.float32)
    q = rb[Q8_K_QS: Q8_K_QS + n256]
    for j in range(n256):
        yb[j] = _F32(d * _F32(np.int8(q[j])))


# ---------------------------------------------------------------------------------------------------
# Drivers: chunks of super-blocks (flattened over rows) split over threads by run_chunks, scratch allocated
# once per chunk.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _chunks(n_rows, nb):
    total = n_rows * nb
    return total, (total + _CHUNK - 1) // _CHUNK


def _n_chunks(x) -> int:
    """Work items of a quantize driver (Python side of _chunks)."""
    return (x.shape[0] * (x.shape[1] // QK_K) + _CHUNK - 1) // _CHUNK


@register_kernel("Q2_K", "quantize")
def quantize_q2_k(x, out):
    """Q2_K quantization of float32 rows ``x`` into ``out`` (bytes of ggml's quantize_row_q2_K_ref).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    >>> out = np.empty((2, 84), np.uint8); quantize_q2_k(x, out)
    """
    run_chunks(_quantize_chunks_q2_k, _n_chunks(x), x, out)


@njit(cache=True, nogil=True)
def _quantize_chunks_q2_k(x, out, c0, c1):
    """Super-block chunks c0 <= c < c1 of quantize_q2_k (run by run_chunks on several threads)."""
    nb = x.shape[1] // QK_K
    nl = min(16, x.shape[1])  # == 16; a run-time value on purpose (see _qkx2_lanes)
    total, n_chunks = _chunks(x.shape[0], nb)
    for c in range(c0, c1):
        L = np.empty(QK_K, np.int32)
        Lt = np.empty(QK_K, np.int32)
        Lat = np.empty(QK_K, np.int32)
        xt = np.empty(QK_K, np.float32)
        wt = np.empty(QK_K, np.float32)
        xm = np.empty(QK_K, np.float32)
        st = np.empty((16, 16), np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        for b in range(c * _CHUNK, min(total, (c + 1) * _CHUNK)):
            r = b // nb
            k = b - r * nb
            _quantize_block_q2_k(x[r], k * QK_K, out[r], k * Q2_K_BYTES, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins)

@register_kernel("Q3_K", "quantize")
def quantize_q3_k(x, out):
    """Q3_K quantization (quantize_row_q3_K_ref)."""
    run_chunks(_quantize_chunks_q3_k, _n_chunks(x), x, out)


@njit(cache=True, nogil=True)
def _quantize_chunks_q3_k(x, out, c0, c1):
    """Super-block chunks c0 <= c < c1 of quantize_q3_k (run by run_chunks on several threads)."""
    nb = x.shape[1] // QK_K
    nl = min(16, x.shape[1])  # == 16; a run-time value on purpose (see _qkx2_lanes)
    total, n_chunks = _chunks(x.shape[0], nb)
    for c in range(c0, c1):
        L = np.empty(QK_K, np.int32)
        Lt = np.empty(QK_K, np.int32)
        xt = np.empty(QK_K, np.float32)
        w = np.empty(QK_K, np.float32)
        wx = np.empty(QK_K, np.float32)
        st = np.empty((16, 16), np.float32)
        scales = np.empty(16, np.float32)
        for b in range(c * _CHUNK, min(total, (c + 1) * _CHUNK)):
            r = b // nb
            k = b - r * nb
            _quantize_block_q3_k(x[r], k * QK_K, out[r], k * Q3_K_BYTES, nl, L, Lt, xt, w, wx, st, scales)


@register_kernel("Q4_K", "quantize")
def quantize_q4_k(x, out):
    """Q4_K quantization (quantize_row_q4_K_ref)."""
    run_chunks(_quantize_chunks_q4_k, _n_chunks(x), x, out)


@njit(cache=True, nogil=True)
def _quantize_chunks_q4_k(x, out, c0, c1):
    """Super-block chunks c0 <= c < c1 of quantize_q4_k (run by run_chunks on several threads)."""
    nb = x.shape[1] // QK_K
    nl = min(8, x.shape[1])  # == 8; a run-time value on purpose (see _qkx2_lanes)
    total, n_chunks = _chunks(x.shape[0], nb)
    for c in range(c0, c1):
        L = np.empty(QK_K, np.int32)
        Lt = np.empty(QK_K, np.int32)
        Lat = np.empty(QK_K, np.int32)
        xt = np.empty(QK_K, np.float32)
        wt = np.empty(QK_K, np.float32)
        xm = np.empty(QK_K, np.float32)
        st = np.empty((16, 16), np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        for b in range(c * _CHUNK, min(total, (c + 1) * _CHUNK)):
            r = b // nb
            k = b - r * nb
            _quantize_block_q4_k(x[r], k * QK_K, out[r], k * Q4_K_BYTES, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins)

@register_kernel("Q5_K", "quantize")
def quantize_q5_k(x, out):
    """Q5_K quantization (quantize_row_q5_K_ref)."""
    run_chunks(_quantize_chunks_q5_k, _n_chunks(x), x, out)


@njit(cache=True, nogil=True)
def _quantize_chunks_q5_k(x, out, c0, c1):
    """Super-block chunks c0 <= c < c1 of quantize_q5_k (run by run_chunks on several threads)."""
    nb = x.shape[1] // QK_K
    nl = min(8, x.shape[1])  # == 8; a run-time value on purpose (see _qkx2_lanes)
    total, n_chunks = _chunks(x.shape[0], nb)
    for c in range(c0, c1):
        L = np.empty(QK_K, np.int32)
        Lt = np.empty(QK_K, np.int32)
        Lat = np.empty(QK_K, np.int32)
        xt = np.empty(QK_K, np.float32)
        wt = np.empty(QK_K, np.float32)
        xm = np.empty(QK_K, np.float32)
        st = np.empty((16, 16), np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        for b in range(c * _CHUNK, min(total, (c + 1) * _CHUNK)):
            r = b // nb
            k = b - r * nb
            _quantize_block_q5_k(x[r], k * QK_K, out[r], k * Q5_K_BYTES, nl, L, Lt, Lat, xt, wt, xm, st, scales, mins)

@register_kernel("Q6_K", "quantize")
def quantize_q6_k(x, out):
    """Q6_K quantization (quantize_row_q6_K_ref)."""
    run_chunks(_quantize_chunks_q6_k, _n_chunks(x), x, out)


@njit(cache=True, nogil=True)
def _quantize_chunks_q6_k(x, out, c0, c1):
    """Super-block chunks c0 <= c < c1 of quantize_q6_k (run by run_chunks on several threads)."""
    nb = x.shape[1] // QK_K
    nl = min(16, x.shape[1])  # == 16; a run-time value on purpose (see _qkx2_lanes)
    total, n_chunks = _chunks(x.shape[0], nb)
    for c in range(c0, c1):
        L = np.empty(QK_K, np.int32)
        Lt = np.empty(QK_K, np.int32)
        Lat = np.empty(QK_K, np.int32)
        xt = np.empty(QK_K, np.float32)
        wt = np.empty(QK_K, np.float32)
        xm = np.empty(QK_K, np.float32)
        st = np.empty((16, 16), np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        for b in range(c * _CHUNK, min(total, (c + 1) * _CHUNK)):
            r = b // nb
            k = b - r * nb
            _quantize_block_q6_k(x[r], k * QK_K, out[r], k * Q6_K_BYTES, nl, L, Lt, Lat, xt, wt, xm, st, scales)

@register_kernel("Q8_K", "quantize")
def quantize_q8_k(x, out):
    """Q8_K quantization (quantize_row_q8_K_ref)."""
    run_chunks(_quantize_chunks_q8_k, _n_chunks(x), x, out)


@njit(cache=True, nogil=True)
def _quantize_chunks_q8_k(x, out, c0, c1):
    """Super-block chunks c0 <= c < c1 of quantize_q8_k (run by run_chunks on several threads)."""
    nb = x.shape[1] // QK_K
    n256 = min(256, x.shape[1])  # == 256 / 16; run-time values on purpose (see _qkx2_lanes)
    n16 = min(16, x.shape[1])
    total, n_chunks = _chunks(x.shape[0], nb)
    for c in range(c0, c1):
        for b in range(c * _CHUNK, min(total, (c + 1) * _CHUNK)):
            r = b // nb
            k = b - r * nb
            yb = out[r, k * Q8_K_BYTES: (k + 1) * Q8_K_BYTES]
            _quantize_block_q8_k(x[r, k * QK_K: (k + 1) * QK_K], yb, n256, n16)


# Dequantize drivers: rows split over threads by run_chunks, each range decoded by a serial function.
# Decoding blocks inside a prange body runs ~30% slower on one thread (measured on Q4_K: 322 us vs 233 us
# for 512 x 4096): the parallel lowering keeps LLVM from optimizing the block loop as in a plain function.


@njit(cache=True, nogil=True)
def _dequantize_rows_q2_k(raw, out, r0, r1):
    nb = out.shape[1] // QK_K
    nn = min(16, out.shape[1])  # == 16, run-time on purpose: constant-trip loops are unrolled, not vectorized
    for r in range(r0, r1):
        rr = raw[r]
        oo = out[r]
        for k in range(nb):
            _dequantize_block_q2_k(rr[k * Q2_K_BYTES: (k + 1) * Q2_K_BYTES], oo[k * QK_K: (k + 1) * QK_K], nn)


@register_kernel("Q2_K", "dequantize")
def dequantize_q2_k(raw, out):
    """ggml's dequantize_row_q2_K over every row of ``raw`` into float32 ``out``."""
    run_chunks(_dequantize_rows_q2_k, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_rows_q3_k(raw, out, r0, r1):
    nb = out.shape[1] // QK_K
    nn = min(16, out.shape[1])  # == 16, run-time on purpose: constant-trip loops are unrolled, not vectorized
    for r in range(r0, r1):
        rr = raw[r]
        oo = out[r]
        for k in range(nb):
            _dequantize_block_q3_k(rr[k * Q3_K_BYTES: (k + 1) * Q3_K_BYTES], oo[k * QK_K: (k + 1) * QK_K], nn)


@register_kernel("Q3_K", "dequantize")
def dequantize_q3_k(raw, out):
    """ggml's dequantize_row_q3_K."""
    run_chunks(_dequantize_rows_q3_k, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_rows_q4_k(raw, out, r0, r1):
    nb = out.shape[1] // QK_K
    nn = min(32, out.shape[1])  # == 32, run-time on purpose: constant-trip loops are unrolled, not vectorized
    for r in range(r0, r1):
        rr = raw[r]
        oo = out[r]
        for k in range(nb):
            _dequantize_block_q4_k(rr[k * Q4_K_BYTES: (k + 1) * Q4_K_BYTES], oo[k * QK_K: (k + 1) * QK_K], nn)


@register_kernel("Q4_K", "dequantize")
def dequantize_q4_k(raw, out):
    """ggml's dequantize_row_q4_K."""
    run_chunks(_dequantize_rows_q4_k, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_rows_q5_k(raw, out, r0, r1):
    nb = out.shape[1] // QK_K
    nn = min(32, out.shape[1])  # == 32, run-time on purpose: constant-trip loops are unrolled, not vectorized
    v = np.empty(QK_K, np.uint8)
    for r in range(r0, r1):
        rr = raw[r]
        oo = out[r]
        for k in range(nb):
            _dequantize_block_q5_k(rr[k * Q5_K_BYTES: (k + 1) * Q5_K_BYTES], oo[k * QK_K: (k + 1) * QK_K], nn, v)


@register_kernel("Q5_K", "dequantize")
def dequantize_q5_k(raw, out):
    """ggml's dequantize_row_q5_K."""
    run_chunks(_dequantize_rows_q5_k, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_rows_q6_k(raw, out, r0, r1):
    nb = out.shape[1] // QK_K
    nn = min(16, out.shape[1])  # == 16, run-time on purpose: constant-trip loops are unrolled, not vectorized
    for r in range(r0, r1):
        rr = raw[r]
        oo = out[r]
        for k in range(nb):
            _dequantize_block_q6_k(rr[k * Q6_K_BYTES: (k + 1) * Q6_K_BYTES], oo[k * QK_K: (k + 1) * QK_K], nn)


@register_kernel("Q6_K", "dequantize")
def dequantize_q6_k(raw, out):
    """ggml's dequantize_row_q6_K."""
    run_chunks(_dequantize_rows_q6_k, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_rows_q8_k(raw, out, r0, r1):
    nb = out.shape[1] // QK_K
    nn = min(256, out.shape[1])  # == 256, run-time on purpose: constant-trip loops are unrolled, not vectorized
    for r in range(r0, r1):
        rr = raw[r]
        oo = out[r]
        for k in range(nb):
            _dequantize_block_q8_k(rr[k * Q8_K_BYTES: (k + 1) * Q8_K_BYTES], oo[k * QK_K: (k + 1) * QK_K], nn)


@register_kernel("Q8_K", "dequantize")
def dequantize_q8_k(raw, out):
    """ggml's dequantize_row_q8_K."""
    run_chunks(_dequantize_rows_q8_k, out.shape[0], raw, out)
