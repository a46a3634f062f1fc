"""Numeric helpers shared by the codec kernels, ported from ggml (ggml-impl.h, ggml-quants.c).

Everything here is ``@njit(cache=True, nogil=True)`` without fastmath: bit-exactness with ggml needs IEEE
float32 evaluation in C's order.  C float literals are float32, so literals are wrapped in ``np.float32``
wherever the C code computes in float; a bare Python float would widen the arithmetic to float64.

Format-level pieces that both algorithm paths of a family use (ggml's ``_ref`` and ``_impl`` quantizers
write the same block layouts) live here too, once: the fp16 store, ``nearest_int``, the k-quant 6-bit
scale packing, the 2-bit / Q3_K / Q5 / Q6_K quant packers.
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


@njit(cache=True, nogil=True, inline="always")
def store_fp16(out, pos, f):
    """Write ``f`` as little-endian fp16 into the uint8 array ``out`` at byte ``pos``.

    Returns the float32 that ggml reads back (``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))``), which the
    k-quants use to requantize against the stored scale.
    """
    h = fp32_to_fp16_bits(f)
    out[pos] = np.uint8(h & np.uint16(0xFF))
    out[pos + 1] = np.uint8(h >> np.uint16(8))
    return fp16_bits_to_fp32(h)


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")  # inlined at numba level: the hot loops call it per element
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


# ---------------------------------------------------------------------------------------------------
# Block pieces shared by the reference (_ref) and importance-matrix (_impl) quantizers: both paths end
# with integer quants L and scales and write them into the same layout (drawn in kquants.py / legacy.py),
# and both requantize against the scales as stored.  Field offsets are passed in by the callers, which
# take them from the type table.  C's uint8_t stores keep the low byte: reproduced by ``& 0xFF``.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def pack_q5_0_pair(y, qso, j, a, b):
    """Q5_0 / Q5_1: store ``qs[j]`` from the quants a = q[j], b = q[j+16] (low byte of each) and return
    their ``qh`` bits (bit j: bit 4 of a, bit j+16: bit 4 of b), to be OR-ed and stored by :func:`store_u32`.

        qs[j] = a & 15 | (b & 15) << 4
    """
    a = np.uint32(a & 0xFF)
    b = np.uint32(b & 0xFF)
    y[qso + j] = np.uint8((a & np.uint32(0x0F)) | ((b & np.uint32(0x0F)) << np.uint32(4)))
    return (((a & np.uint32(0x10)) >> np.uint32(4)) << np.uint32(j)) | (
        ((b & np.uint32(0x10)) >> np.uint32(4)) << np.uint32(j + 16))


@njit(cache=True, nogil=True, inline="always")
def store_u32(y, pos, v):
    """Write the uint32 ``v`` little-endian at y[pos] (Q5_0 / Q5_1 ``qh``)."""
    for k in range(4):
        y[pos + k] = np.uint8((v >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(cache=True, nogil=True, inline="always")
def pack_q5_0(y, qho, qso, L):
    """Q5_0 / Q5_1 ``qs`` (16 bytes at y[qso]) and ``qh`` (u32 LE at y[qho]) from 32 quants L."""
    qh = np.uint32(0)
    for j in range(16):
        qh |= pack_q5_0_pair(y, qso, j, L[j], L[j + 16])
    store_u32(y, qho, qh)


@njit(cache=True, nogil=True, inline="always")
def pack_2bit_k(y, qo, L):
    """Q2_K / Q3_K ``qs`` (64 bytes at y[qo]): 2-bit planes of two 128-value halves (L already < 4).

        qs[32h + l] = L[128h+l] | L[128h+l+32] << 2 | L[128h+l+64] << 4 | L[128h+l+96] << 6
    """
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            y[qo + 32 * h + l] = np.uint8((L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def requantize_q2_k(x, xo, y, so, d_all, dmin_all, L):
    """Q2_K's final quants against the stored 4-bit scale/min bytes at y[so] and fp16 d/dmin (L in [0, 3])."""
    for j in range(16):
        sc = np.int64(y[so + j])
        d = np.float32(d_all * np.float32(sc & 0xF))
        if d == np.float32(0.0):
            continue  # keep the scale search's L
        dm = np.float32(dmin_all * np.float32(sc >> 4))
        for ii in range(16):
            l = nearest_int(np.float32(x[xo + 16 * j + ii] + dm) / d)
            L[16 * j + ii] = max(0, min(3, l))


@njit(cache=True, nogil=True, inline="always")
def q3_k_scale(raw, so, j):
    """Six-bit scale j (0..63, stored +32) of Q3_K's 12-byte ``scales`` at raw[so].

        byte k      (k = 0..7) : | s(k+8)[3:0] | s(k)[3:0] |
        byte 8 + k  (k = 0..3) : | s(k+12)[5:4] | s(k+8)[5:4] | s(k+4)[5:4] | s(k)[5:4] |
    """
    lo = (np.int64(raw[so + j]) & 0xF) if j < 8 else (np.int64(raw[so + j - 8]) >> 4)
    hi = (np.int64(raw[so + 8 + j % 4]) >> (2 * (j // 4))) & 3
    return lo | (hi << 4)


@njit(cache=True, nogil=True, inline="always")
def pack_q3_k_scales(y, so, Ls):
    """Pack sixteen 6-bit scales Ls (already +32) into Q3_K's 12 bytes at y[so] (layout: :func:`q3_k_scale`)."""
    for k in range(12):
        y[so + k] = 0
    for j in range(16):
        l = np.int64(Ls[j])
        if j < 8:
            y[so + j] = np.uint8(l & 0xF)
        else:
            y[so + j - 8] = np.uint8((np.int64(y[so + j - 8]) | ((l & 0xF) << 4)) & 0xFF)
        y[so + 8 + j % 4] = np.uint8((np.int64(y[so + 8 + j % 4]) | ((l >> 4) << (2 * (j // 4)))) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def requantize_q3_k(x, xo, y, so, d_all, L, n16):
    """Q3_K's final quants against the stored scales: L = clamp(nearest_int(x/d), -4, 3) + 4.

    ``n16`` == 16 at run time (a constant trip count gets unrolled instead of vectorized).
    """
    for j in range(16):
        d = np.float32(d_all * np.float32(q3_k_scale(y, so, j) - 32))
        if d == np.float32(0.0):
            continue
        xs = x[xo + 16 * j: xo + 16 * j + n16]
        Ls = L[16 * j: 16 * j + n16]
        for ii in range(n16):
            Ls[ii] = max(-4, min(3, nearest_int(xs[ii] / d))) + 4


@njit(cache=True, nogil=True, inline="always")
def pack_q3_k(y, hmo, qso, L):
    """Q3_K ``hmask`` (32 bytes at y[hmo]) and ``qs`` (at y[qso]) from 256 quants L in [0, 7] (L is consumed).

    C: ``if (L[j] > 3) { hmask[j % 32] |= 1 << (j / 32); L[j] -= 4; }``, then the 2-bit planes.
    """
    for m in range(32):
        hb = 0
        for b in range(8):
            v = L[32 * b + m]
            hb |= (v >> 2) << b
            L[32 * b + m] = v & 3
        y[hmo + m] = np.uint8(hb & 0xFF)
    pack_2bit_k(y, qso, L)


@njit(cache=True, nogil=True, inline="always")
def pack_scale_min_k4(y, so, Ls, Lm):
    """Pack 8 six-bit scales ``Ls`` and mins ``Lm`` into Q4_K/Q5_K's 12 bytes at y[so] (see get_scale_min_k4).

    C's uint8_t arithmetic: a value above 63 (the importance-matrix Q4_K does not clamp) ORs its low bits in.
    """
    for j in range(8):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if j < 4:
            y[so + j] = np.uint8(ls & 0xFF)
            y[so + j + 4] = np.uint8(lm & 0xFF)
        else:
            y[so + j + 4] = np.uint8(((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF)
            y[so + j - 4] = np.uint8((np.int64(y[so + j - 4]) | ((ls >> 4) << 6)) & 0xFF)
            y[so + j] = np.uint8((np.int64(y[so + j]) | ((lm >> 4) << 6)) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def requantize_k4(x, xo, y, so, d_all, dmin_all, nmax, L):
    """Q4_K/Q5_K final quants against the stored 6-bit scales at y[so] and fp16 d/dmin: L in [0, nmax]."""
    for j in range(8):
        sc, m = get_scale_min_k4(j, y, so)
        d = np.float32(d_all * np.float32(sc))
        if d == np.float32(0.0):
            continue  # keep the scale search's L
        dm = np.float32(dmin_all * np.float32(m))
        for ii in range(32):
            l = nearest_int(np.float32(x[xo + 32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(cache=True, nogil=True, inline="always")
def pack_q4_k(y, qso, L):
    """Q4_K ``qs`` (128 bytes at y[qso]): qs[32c + l] = L[64c + l] | L[64c + l + 32] << 4."""
    for c in range(4):
        for l in range(32):
            y[qso + 32 * c + l] = np.uint8((L[64 * c + l] | (L[64 * c + l + 32] << 4)) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def pack_q5_k(y, qho, qso, L):
    """Q5_K ``qh`` (32 bytes at y[qho]) and ``qs`` (128 at y[qso]) from 256 quants L in [0, 31].

        bit 2c of qh[l] = bit 4 of L[64c + l],  bit 2c+1 = bit 4 of L[64c + l + 32];  qs as Q4_K's
    """
    for l in range(32):
        y[qho + l] = 0
    for c in range(4):
        m1 = 1 << (2 * c)
        for l in range(32):
            l1 = np.int64(L[64 * c + l])
            if l1 > 15:
                l1 -= 16
                y[qho + l] = np.uint8(np.int64(y[qho + l]) | m1)
            l2 = np.int64(L[64 * c + l + 32])
            if l2 > 15:
                l2 -= 16
                y[qho + l] = np.uint8(np.int64(y[qho + l]) | (m1 << 1))
            y[qso + 32 * c + l] = np.uint8((l1 | (l2 << 4)) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def pack_q6_k(y, qlo, qho, L):
    """Q6_K's 6-bit levels L[0:256] (0..63) into ql (at ``qlo``) and qh (at ``qho``), as quantize_row_q6_K:

        ql[64h + l]      = L[128h + l] & 15      | (L[128h + l + 64] & 15) << 4
        ql[64h + 32 + l] = L[128h + l + 32] & 15 | (L[128h + l + 96] & 15) << 4
        qh[32h + l]      = L[128h+l] >> 4 | L[128h+l+32] >> 4 << 2 | L[128h+l+64] >> 4 << 4 | L[128h+l+96] >> 4 << 6
    """
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            q1 = np.int64(L[b])
            q2 = np.int64(L[b + 32])
            q3 = np.int64(L[b + 64])
            q4 = np.int64(L[b + 96])
            y[qlo + 64 * h + l] = np.uint8(((q1 & 0xF) | ((q3 & 0xF) << 4)) & 0xFF)
            y[qlo + 64 * h + 32 + l] = np.uint8(((q2 & 0xF) | ((q4 & 0xF) << 4)) & 0xFF)
            y[qho + 32 * h + l] = np.uint8(((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))
                                           & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def quantize_q6_k_scales_and_pack(x, xo, y, yo, qlo, qho, sco, do, block_bytes, L, scales, max_scale,
                                  max_abs_scale):
    """The common end of quantize_row_q6_K_ref / _impl: int8 scales, fp16 d, final quants, packing
    (:func:`pack_q6_k`)."""
    if max_abs_scale < GROUP_MAX_EPS:  # memset(&y[i], 0, sizeof(block_q6_K)); d = fp16(0) is 0 too
        for k in range(block_bytes):
            y[yo + k] = 0
        return
    iscale = np.float32(np.float32(-128.0) / max_scale)
    d_all = store_fp16(y, yo + do, np.float32(np.float32(1.0) / iscale))
    for ib in range(16):
        y[yo + sco + ib] = np.uint8(min(127, nearest_int(iscale * scales[ib])) & 0xFF)  # int8_t store
    for j in range(16):
        d = np.float32(d_all * np.float32(np.int8(y[yo + sco + j])))
        if d == np.float32(0.0):
            continue
        for ii in range(16):
            l = nearest_int(x[xo + 16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    pack_q6_k(y, yo + qlo, yo + qho, L)
