"""Numeric helpers shared by the codec kernels, ported from ggml (ggml-impl.h, ggml-quants.c).

Everything here is ``@njit(cache=True, nogil=True)`` without fastmath: bit-exactness with ggml needs IEEE
float32 evaluation in C's order.  C float literals are float32, so literals are wrapped in ``np.float32``
wherever the C code computes in float; a bare Python float would widen the arithmetic to float64.

Ownership while the codec families are being written (append only, never rewrite another's function):
  fp16/bf16 conversion, nearest_int ............ initial skeleton
  make_qx_quants, make_q3_quants, make_qkx2_quants, get_scale_min_k4 ... k-quant reference port
  make_qkx3_quants, make_qp_quants ............. importance-matrix (_impl) port
"""

from __future__ import annotations

import numpy as np
from numba import njit

# ---------------------------------------------------------------------------------------------------
# fp16 <-> fp32   (ggml_compute_fp32_to_fp16 / ggml_compute_fp16_to_fp32, ggml-impl.h)
#
#   fp16 bits:  [15] sign | [14:10] exponent (bias 15) | [9:0] mantissa
#   fp32 bits:  [31] sign | [30:23] exponent (bias 127) | [22:0] mantissa
# Rounding is to nearest, ties to even; NaN becomes 0x7E00 (with the sign); overflow becomes +-inf.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def fp32_to_fp16_bits(f):
    """float32 -> uint16 bits of the nearest fp16 (ggml_compute_fp32_to_fp16, bit for bit)."""
    f = np.float32(f)
    scale_to_inf = np.uint32(0x77800000).view(np.float32)  # 0x1.0p+112f
    scale_to_zero = np.uint32(0x08800000).view(np.float32)  # 0x1.0p-110f
    base = (np.float32(abs(f)) * scale_to_inf) * scale_to_zero
    w = f.view(np.uint32)
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(np.float32) + base
    bits = np.float32(base).view(np.uint32)
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@njit(cache=True, nogil=True)
def fp16_bits_to_fp32(h):
    """uint16 fp16 bits -> float32 (ggml_compute_fp16_to_fp32; exact)."""
    w = np.uint32(h) << np.uint32(16)
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w + w)
    exp_offset = np.uint32(0xE0) << np.uint32(23)
    exp_scale = np.uint32(0x7800000).view(np.float32)  # 0x1.0p-112f
    normalized_value = np.uint32((two_w >> np.uint32(4)) + exp_offset).view(np.float32) * exp_scale
    magic_mask = np.uint32(126) << np.uint32(23)
    magic_bias = np.float32(0.5)
    denormalized_value = np.uint32((two_w >> np.uint32(17)) | magic_mask).view(np.float32) - magic_bias
    denormalized_cutoff = np.uint32(1) << np.uint32(27)
    if two_w < denormalized_cutoff:
        result = sign | np.float32(denormalized_value).view(np.uint32)
    else:
        result = sign | np.float32(normalized_value).view(np.uint32)
    return np.uint32(result).view(np.float32)


@njit(cache=True, nogil=True)
def fp16_round(f):
    """The float32 value ggml gets back after storing ``f`` as fp16 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f)))."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(f))


@njit(cache=True, nogil=True)
def store_fp16(out, pos, f):
    """Write ``f`` as little-endian fp16 into the uint8 array ``out`` at byte ``pos``."""
    h = fp32_to_fp16_bits(f)
    out[pos] = np.uint8(h & np.uint16(0xFF))
    out[pos + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True, nogil=True)
def load_fp16(raw, pos):
    """Read little-endian fp16 at byte ``pos`` of the uint8 array ``raw`` as float32."""
    return fp16_bits_to_fp32(np.uint16(raw[pos]) | (np.uint16(raw[pos + 1]) << np.uint16(8)))


# ---------------------------------------------------------------------------------------------------
# bf16 <-> fp32   (ggml_compute_fp32_to_bf16 / ggml_compute_bf16_to_fp32)
#   bf16 = the upper 16 bits of fp32; rounding to nearest even on the bit pattern; NaN forced quiet.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def fp32_to_bf16_bits(f):
    u = np.float32(f).view(np.uint32)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@njit(cache=True, nogil=True)
def bf16_bits_to_fp32(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# nearest_int (ggml-quants.c): round half to even through the float32 mantissa.
#   Adding 1.5 * 2^23 (12582912.f) pushes the fraction out of the mantissa with the FPU's
#   round-to-nearest-even; the low 22 bits then hold the integer offset by 2^22.
#   Valid for |fval| <= 4194303 (ggml asserts this).
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def nearest_int(fval):
    val = np.float32(np.float32(fval) + np.float32(12582912.0))
    i = np.int32(val.view(np.int32))
    return np.int32((i & np.int32(0x007FFFFF)) - np.int32(0x00400000))


# ---------------------------------------------------------------------------------------------------
# k-quant scale searches (ggml-quants.c, "Helper functions" of the 2-6 bit super-block section).
#
# Every expression is evaluated in float32 in C's order: ints are converted with np.float32(...) before
# they meet a float (numba would otherwise promote int * float32 to float64), and sums accumulate
# left to right exactly as the C loops do (ggml is built without -ffast-math, so no reassociation).
# ---------------------------------------------------------------------------------------------------

GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: #define GROUP_MAX_EPS 1e-15f


@njit(cache=True, nogil=True)
def make_qx_quants(x, nmax, L, rmse_type, qw):
    """Port of ggml's ``make_qx_quants``: symmetric scale search for ``n = len(x)`` values.

    Writes ``L[i]`` in ``[0, 2*nmax-1]`` (int8) and returns the float32 scale.  ``qw`` of length 0
    stands for C's NULL (then the weight depends on ``rmse_type``: 1 x^2, 2 one, 3 |x|, else sqrt|x|).
    ``rmse_type == 0``: plain rounding; ``< 0``: one weighted refit, returned early.

    >>> import numpy as np
    >>> L = np.empty(16, np.int8)
    >>> s = make_qx_quants(np.linspace(-1, 1, 16).astype(np.float32), 32, L, 1, np.empty(0, np.float32))
    """
    n = x.shape[0]
    have_qw = qw.shape[0] > 0
    fmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = np.float32(abs(x[i]))
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    fnmax = np.float32(nmax)
    iscale = np.float32(-fnmax / fmax)
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return np.float32(np.float32(1.0) / iscale)
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _qx_weight(x[i], rmse_type, qw, i, have_qw)
        fl = np.float32(l)
        sumlx = np.float32(sumlx + w * x[i] * fl)
        suml2 = np.float32(suml2 + w * fl * fl)
    scale = np.float32(sumlx / suml2) if suml2 != np.float32(0.0) else np.float32(0.0)
    if return_early:
        if suml2 > np.float32(0.0):
            return np.float32(np.float32(0.5) * (scale + np.float32(1.0) / iscale))
        return np.float32(np.float32(1.0) / iscale)
    best = np.float32(scale * sumlx)
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        # -(nmax + 0.1f*is) / max : all float32
        iscale = np.float32(-(fnmax + np.float32(0.1) * np.float32(is_)) / fmax)
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(x[i], rmse_type, qw, i, have_qw)
            fl = np.float32(l)
            sumlx = np.float32(sumlx + w * x[i] * fl)
            suml2 = np.float32(suml2 + w * fl * fl)
        if suml2 > np.float32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@njit(cache=True, nogil=True, inline="always")
def _qx_weight(xi, rmse_type, qw, i, have_qw):
    # w = qw ? qw[i] : rmse_type == 1 ? x*x : rmse_type == 2 ? 1 : rmse_type == 3 ? fabsf(x) : sqrtf(fabsf(x))
    if have_qw:
        return np.float32(qw[i])
    if rmse_type == 1:
        return np.float32(xi * xi)
    if rmse_type == 2:
        return np.float32(1.0)
    if rmse_type == 3:
        return np.float32(abs(xi))
    return np.float32(np.sqrt(np.float32(abs(xi))))


@njit(cache=True, nogil=True)
def make_q3_quants(x, nmax, L, do_rmse):
    """Port of ggml's ``make_q3_quants`` (Q3_K's reference sub-block scale); ``L`` int8, returns the scale.

    >>> import numpy as np
    >>> L = np.empty(16, np.int8)
    >>> s = make_q3_quants(np.linspace(-1, 1, 16).astype(np.float32), 4, L, True)
    """
    n = x.shape[0]
    fmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = np.float32(abs(x[i]))
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(-np.float32(nmax) / fmax)
    if do_rmse:
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = np.float32(x[i] * x[i])
            fl = np.float32(l)
            sumlx = np.float32(sumlx + w * x[i] * fl)
            suml2 = np.float32(suml2 + w * fl * fl)
        for _itry in range(5):
            n_changed = 0
            for i in range(n):
                w = np.float32(x[i] * x[i])
                fLi = np.float32(L[i])
                slx = np.float32(sumlx - w * x[i] * fLi)
                if slx > np.float32(0.0):
                    sl2 = np.float32(suml2 - w * fLi * fLi)
                    new_l = nearest_int(np.float32(x[i] * sl2) / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fnl = np.float32(new_l)
                        slx = np.float32(slx + w * x[i] * fnl)
                        sl2 = np.float32(sl2 + w * fnl * fnl)
                        if sl2 > np.float32(0.0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return np.float32(sumlx / suml2) if suml2 > np.float32(0.0) else np.float32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return np.float32(np.float32(1.0) / iscale)


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx2_quants(x, weights, nmax, L, Laux, rmin, rdelta, nstep, use_mad):
    """Port of ggml's ``make_qkx2_quants``: asymmetric (scale, min) search, ``x ~ scale * L - the_min``.

    ``L``/``Laux`` uint8 of ``len(x)``; returns ``(scale, the_min)`` (C returns the scale and writes
    ``*the_min``).  ``rmin``/``rdelta`` are float32 like C's ``float`` parameters.

    With weights given, ggml's make_qkx2_quants and make_qkx3_quants perform the same float operations in
    the same order (qkx2 gives up when ``max == min``, qkx3 when ``max <= min``, and ``max >= min`` always
    holds), so this is make_qkx3_quants with C's argument order.

    >>> import numpy as np
    >>> x = np.linspace(-1, 2, 32).astype(np.float32)
    >>> L, Laux = np.empty(32, np.uint8), np.empty(32, np.uint8)
    >>> scale, the_min = make_qkx2_quants(x, np.abs(x), 15, L, Laux, -1.0, 0.1, 20, False)
    """
    return make_qkx3_quants(x, nmax, weights, L, Laux, rmin, rdelta, nstep, use_mad)


@njit(cache=True, nogil=True)
def get_scale_min_k4(j, q, pos):
    """Port of ggml's ``get_scale_min_k4``: the 6-bit (scale, min) pair ``j`` of the 12-byte ``q[pos:pos+12]``.

    Layout of Q4_K / Q5_K ``scales`` (8 six-bit scales s0..s7 and mins m0..m7), k = 0..3:
      byte k     : | s(k+4)[5:4] (bits 7-6) | s(k)[5:0] (bits 5-0) |
      byte k + 4 : | m(k+4)[5:4] (bits 7-6) | m(k)[5:0] (bits 5-0) |
      byte k + 8 : | m(k+4)[3:0] (bits 7-4) | s(k+4)[3:0] (bits 3-0) |
    """
    if j < 4:
        d = q[pos + j] & np.uint8(63)
        m = q[pos + j + 4] & np.uint8(63)
    else:
        d = (q[pos + j + 4] & np.uint8(0xF)) | ((q[pos + j - 4] >> np.uint8(6)) << np.uint8(4))
        m = (q[pos + j + 4] >> np.uint8(4)) | ((q[pos + j] >> np.uint8(6)) << np.uint8(4))
    return np.uint8(d), np.uint8(m)


# ---------------------------------------------------------------------------------------------------
# Importance-matrix scale searches (ggml-quants.c: make_qkx3_quants, make_qp_quants), used by the
# quantize_row_*_impl paths.  Plain ports, argument order as C's minus ``n`` (= len(x)); arrays for
# C's output pointers; C's ``*the_min`` comes back as a second return value.  Same float32 rules as
# above.  C stores ints into ``uint8_t L[]``: a negative ``nearest_int`` keeps its low byte (& 0xFF)
# and later reads of ``L[i]`` see that byte, while make_qp_quants' running sums use the unwrapped int.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")  # IEEE x/0 (inf/NaN) as in C, not ZeroDivisionError
def make_qkx3_quants(x, nmax, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Port of ggml's ``make_qkx3_quants``: weighted (scale, min) search, ``x ~ scale * L - the_min``.

    ``weights`` float32 of ``len(x)``, or length 0 for C's NULL (then ``w = x*x``); ``L``/``Laux`` uint8
    of ``len(x)`` (outputs / scratch); ``rmin``/``rdelta`` float32 like C's ``float`` parameters.
    Returns ``(scale, the_min)``.  Differs from make_qkx2_quants in its weights default, in giving up
    when ``max <= min`` (not ``==``) and in callers' parameters (rmin -0.9, rdelta 0.05, 36 steps).

    >>> import numpy as np
    >>> x = np.linspace(-1, 2, 32).astype(np.float32)
    >>> L, Laux = np.empty(32, np.uint8), np.empty(32, np.uint8)
    >>> scale, the_min = make_qkx3_quants(x, 15, np.ones(32, np.float32), L, Laux,
    ...                                   np.float32(-0.9), np.float32(0.05), 36, False)
    """
    n = x.shape[0]
    have_w = weights.shape[0] > 0
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    fmin = x[0]
    fmax = x[0]
    sum_w = np.float32(weights[0]) if have_w else np.float32(x[0] * x[0])
    sum_x = np.float32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < fmin:
            fmin = x[i]
        if x[i] > fmax:
            fmax = x[i]
        w = np.float32(weights[i]) if have_w else np.float32(x[i] * x[i])
        sum_w = np.float32(sum_w + w)
        sum_x = np.float32(sum_x + w * x[i])
    if fmin > np.float32(0.0):
        fmin = np.float32(0.0)
    if fmax <= fmin:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0), np.float32(-fmin)
    fnmax = np.float32(nmax)
    iscale = np.float32(fnmax / (fmax - fmin))
    scale = np.float32(np.float32(1.0) / iscale)
    best_mad = np.float32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - fmin))
        L[i] = max(0, min(nmax, l))
        diff = np.float32(scale * np.float32(L[i]) + fmin - x[i])
        diff = np.float32(abs(diff)) if use_mad else np.float32(diff * diff)
        w = np.float32(weights[i]) if have_w else np.float32(x[i] * x[i])
        best_mad = np.float32(best_mad + w * diff)
    if nstep < 1:
        return scale, np.float32(-fmin)
    for is_ in range(nstep + 1):
        iscale = np.float32((rmin + rdelta * np.float32(is_) + fnmax) / (fmax - fmin))
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - fmin))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = np.float32(weights[i]) if have_w else np.float32(x[i] * x[i])
            fl = np.float32(l)
            sum_l = np.float32(sum_l + w * fl)
            sum_l2 = np.float32(sum_l2 + w * fl * fl)
            sum_xl = np.float32(sum_xl + w * fl * x[i])
        D = np.float32(sum_w * sum_l2 - sum_l * sum_l)
        if D > np.float32(0.0):
            this_scale = np.float32((sum_w * sum_xl - sum_x * sum_l) / D)
            this_min = np.float32((sum_l2 * sum_x - sum_l * sum_xl) / D)
            if this_min > np.float32(0.0):
                this_min = np.float32(0.0)
                this_scale = np.float32(sum_xl / sum_l2)
            mad = np.float32(0.0)
            for i in range(n):
                diff = np.float32(this_scale * np.float32(Laux[i]) + this_min - x[i])
                diff = np.float32(abs(diff)) if use_mad else np.float32(diff * diff)
                w = np.float32(weights[i]) if have_w else np.float32(x[i] * x[i])
                mad = np.float32(mad + w * diff)
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                fmin = this_min
    return scale, np.float32(-fmin)


@njit(cache=True, nogil=True, error_model="numpy")
def make_qp_quants(x, nmax, L, quant_weights):
    """Port of ggml's ``make_qp_quants``: weighted scale for non-negative ``x`` (k-quants' scales/mins).

    Writes ``L`` (uint8 of ``len(x)``, values in ``[0, nmax]`` for ``x >= 0``) and returns the float32
    scale, ``x ~ scale * L``.  ``quant_weights`` float32 of ``len(x)`` (C dereferences it: not optional).

    >>> import numpy as np
    >>> L = np.empty(8, np.uint8)
    >>> d = make_qp_quants(np.linspace(0, 1, 8).astype(np.float32), 63, L, np.ones(8, np.float32))
    """
    n = x.shape[0]
    fmax = np.float32(0.0)
    for i in range(n):
        fmax = fmax if fmax > x[i] else x[i]  # MAX(max, x[i])
    if fmax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    fnmax = np.float32(nmax)
    iscale = np.float32(fnmax / fmax)
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF  # uint8_t store (no clamp here in C)
    scale = np.float32(np.float32(1.0) / iscale)
    best_mse = np.float32(0.0)
    for i in range(n):
        diff = np.float32(x[i] - scale * np.float32(L[i]))
        best_mse = np.float32(best_mse + quant_weights[i] * diff * diff)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = np.float32((np.float32(0.1) * np.float32(is_) + fnmax) / fmax)
        scale_is = np.float32(np.float32(1.0) / iscale_is)
        mse = np.float32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = np.float32(x[i] - scale_is * np.float32(l))
            mse = np.float32(mse + quant_weights[i] * diff * diff)
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = np.float32(quant_weights[i])
        fl = np.float32(l)  # the sums see the int, not the stored byte
        sumlx = np.float32(sumlx + w * x[i] * fl)
        suml2 = np.float32(suml2 + w * fl * fl)
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = np.float32(quant_weights[i])
            fLi = np.float32(L[i])
            slx = np.float32(sumlx - w * x[i] * fLi)
            sl2 = np.float32(suml2 - w * fLi * fLi)
            if slx > np.float32(0.0) and sl2 > np.float32(0.0):
                new_l = min(nmax, nearest_int(np.float32(x[i] * sl2) / slx))
                if new_l != np.int64(L[i]):
                    fnl = np.float32(new_l)
                    slx = np.float32(slx + w * x[i] * fnl)
                    sl2 = np.float32(sl2 + w * fnl * fnl)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return np.float32(sumlx / suml2) if suml2 > np.float32(0.0) else np.float32(0.0)
