"""Properties of every codec that has kernels (k-quants and later families join through the type table).

* round trip: |dequantize(quantize(x)) - x| <= REL * max|x over the block| + ABS (ABS covers fp16 scales that
  fall into fp16's subnormal range, where they lose relative precision);
* zeros stay zeros;
* quantize -> dequantize -> quantize is stable (the second encoding decodes to the same floats) for the types
  whose ggml algorithm has that property.  The k-quants' ggml algorithms do NOT have it; for each of them a
  documented counterexample asserts the instability on a fixed input, in ggml itself and in ours.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gguf_kquant
from codec_corpus import make_rows, rows
from gguf_kquant.errors import BadTensorDataError, UnknownTypeError
from gguf_kquant.types import TYPES, type_info

FP16_HALF_ULP_MIN = 2.0**-25  # half the spacing of fp16 subnormals: the absolute error of storing a tiny scale

# type: (REL to block max, largest |multiplier| of the fp16 scale in a decoded value)
ERROR_BOUNDS = {
    "F32": (0.0, 0),
    "F16": (2.0**-11, 1),  # element-relative, see _bound
    "BF16": (2.0**-8, 1),
    "Q4_0": (0.126, 8),  # d/2, or d when +amax clips to q = 7
    "Q4_1": (0.068, 16),  # (max - min)/30, plus fp16 rounding of d and m
    "Q5_0": (0.064, 16),
    "Q5_1": (0.034, 32),
    "Q8_0": (0.0045, 127),  # amax/254 + 127 * fp16 rounding of d
    "Q8_1": (0.0045, 127),
    "Q2_K": (0.6, 15 * 3 + 15),  # scales and mins are 4-bit, quants 2-bit; the optimizer trades max error
    "Q3_K": (0.4, 32 * 4),
    "Q4_K": (0.15, 63 * 15 + 63),
    "Q5_K": (0.08, 63 * 31 + 63),
    "Q6_K": (0.025, 128 * 32),
    "Q8_K": (0.0045, 0),  # d is float32
}

# ggml's algorithm is not idempotent for these: (codec_corpus distribution, seed) of a 256-value row where
# quantize(dequantize(quantize(x))) decodes differently from quantize(x) — in ggml and in ours.
UNSTABLE = {
    "Q2_K": ("outliers", 0),
    "Q3_K": ("normal", 3),
    "Q4_K": ("outliers", 1),
    "Q5_K": ("normal", 1),
    "Q6_K": ("normal", 154),
    "Q8_K": ("normal", 1),  # d = 1/iscale is float32, but 1/(1/iscale) need not give back iscale
}


def _types_with_kernels():
    names = []
    for info in TYPES.values():
        try:
            info.kernel("quantize"), info.kernel("dequantize")
        except UnknownTypeError:
            continue
        names.append(info.name)
    return names


KERNEL_TYPES = _types_with_kernels()
# The round-trip and requantization properties need a bound (and, if unstable, a counterexample) per type:
# they run on the types listed in ERROR_BOUNDS.  Families whose bounds are not written here yet (the i-quant,
# ternary, fp4 and low-bit modules) are checked by the oracle harness and by test_zeros_stay_zeros.
BOUNDED_TYPES = [t for t in KERNEL_TYPES if t in ERROR_BOUNDS]
STABLE_TYPES = [t for t in BOUNDED_TYPES if t not in UNSTABLE]
_BOUNDED_FAMILIES = {"floats", "legacy", "kquants"}


def test_expected_types_have_kernels():
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1"} <= set(KERNEL_TYPES)
    missing = [t for t in KERNEL_TYPES if set(type_info(t).codec) & _BOUNDED_FAMILIES and t not in ERROR_BOUNDS]
    assert not missing, f"add round-trip bounds for {missing}"


def _strategy(name):
    bs = type_info(name).block_size
    return rows(block_size=max(bs, 32), max_blocks=2 if bs >= 256 else 4)


def _quantize_or_reject(x, name):
    """Quantize; data so large that a scale overflows fp16 is rejected by the API (tested elsewhere)."""
    try:
        return gguf_kquant.quantize(x, name)
    except BadTensorDataError as err:
        assert "overflow" in str(err) and np.abs(x).max() > 1000, err
        assume(False)


def _bound(name, x):
    rel, mult = ERROR_BOUNDS[name]
    info = type_info(name)
    if not info.is_quantized:
        floor = {"F16": 2.0**-25, "BF16": 2.0**-134}.get(name, 0.0)  # half the subnormal spacing
        return rel * np.abs(x) + floor
    blocks = np.abs(x).reshape(x.shape[0], -1, info.block_size)
    amax = blocks.max(axis=2, keepdims=True)
    per_block = rel * amax + mult * FP16_HALF_ULP_MIN
    if name == "Q8_K":
        # iscale = -127/max overflows float32 for subnormal blocks: ggml then decodes the block to zeros
        with np.errstate(divide="ignore", over="ignore"):
            overflow = ~np.isfinite(np.float32(127) / amax.astype(np.float32))
        per_block = np.where(overflow, amax, per_block)
    return np.broadcast_to(per_block, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("name", BOUNDED_TYPES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_round_trip_error_bound(name, data):
    x = data.draw(_strategy(name))
    q = _quantize_or_reject(x, name)
    y = gguf_kquant.dequantize(q, name, x.shape)
    err = np.abs(y.astype(np.float64) - x)
    excess = err - _bound(name, x) * (1 + 1e-6)
    worst = np.unravel_index(np.argmax(excess), x.shape)
    assert excess[worst] <= 0, f"{name}: error {err[worst]} at {worst}, bound {_bound(name, x)[worst]}"


@pytest.mark.parametrize("name", KERNEL_TYPES)
def test_zeros_stay_zeros(name):
    bs = max(type_info(name).block_size, 32)
    for x in (np.zeros((3, 2 * bs), np.float32), np.full((1, bs), -0.0, np.float32)):
        y = gguf_kquant.dequantize(gguf_kquant.quantize(x, name), name, x.shape)
        assert (y == 0).all()
    # a zero block next to a non-zero one stays zero too
    x = np.zeros((1, 2 * bs), np.float32)
    x[0, bs:] = np.linspace(-1, 1, bs, dtype=np.float32)
    y = gguf_kquant.dequantize(gguf_kquant.quantize(x, name), name, x.shape)
    assert (y[0, :bs] == 0).all()


def _requantize_twice(name, x):
    y1 = gguf_kquant.dequantize(_quantize_or_reject(x, name), name, x.shape)
    # y1 may decode past what fp16 scales hold (test_requantizing_past_fp16_is_refused_as_ggml_overflows)
    y2 = gguf_kquant.dequantize(_quantize_or_reject(y1, name), name, x.shape)
    return y1, y2


@pytest.mark.parametrize("name", STABLE_TYPES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_requantize_is_stable(name, data):
    x = data.draw(_strategy(name))
    y1, y2 = _requantize_twice(name, x)
    np.testing.assert_array_equal(y2, y1)


def test_requantizing_past_fp16_is_refused_as_ggml_overflows(oracle):
    """Found by a fresh draw of test_requantize_is_stable[Q8_1]: a block whose largest value is just inside fp16
    (-65508) gets d = fp16(65508/127) = 516.0 and decodes to -127 * 516.0 = -65532, past fp16's 65504.
    Quantized again, Q8_1's s = d * sum(q) no longer fits: ggml stores -inf, we refuse the block."""
    x = np.zeros((1, 64), np.float32)
    x[0, 50], x[0, 2], x[0, 11] = -65508.0, 6.0952953e4, -42.5  # the draw's two large values, in two blocks
    y1 = gguf_kquant.dequantize(gguf_kquant.quantize(x, "Q8_1"), "Q8_1", x.shape)
    assert y1[0, 50] == -65532.0
    s = oracle.quantize_row_symbol("quantize_row_q8_1_ref", type_info("Q8_1").id, y1).reshape(-1).view(
        type_info("Q8_1").block_dtype)["s"]
    assert np.isfinite(s[0]) and s[1] == -np.inf
    with pytest.raises(BadTensorDataError, match="row 0, block 1 overflows fp16"):
        gguf_kquant.quantize(y1, "Q8_1")


@pytest.mark.parametrize("name", [t for t in UNSTABLE if t in KERNEL_TYPES])
def test_requantize_instability_counterexample(oracle, name):
    """Documented: ggml's own algorithm for this type is not stable under requantization."""
    kind, seed = UNSTABLE[name]
    x = make_rows(kind, 1, 256, np.random.default_rng(seed))
    info = type_info(name)
    if name == "Q8_K":  # no ggml_quantize_chunk path: the exported row functions
        def g_q(a):
            return oracle.quantize_row_symbol("quantize_row_q8_K_ref", info.id, a)

        def g_d(raw):
            return oracle.dequantize_row_symbol("dequantize_row_q8_K", raw, 256)
    else:
        def g_q(a):
            return oracle.quantize_chunk(info.id, a)

        def g_d(raw):
            return oracle.to_float(info.id, raw, 256)
    g1 = g_d(g_q(x))
    g2 = g_d(g_q(g1))
    assert (g1 != g2).any(), f"ggml's {name} became stable on this input: update UNSTABLE / the docs"
    y1, y2 = _requantize_twice(name, x)
    np.testing.assert_array_equal(y1, g1)
    np.testing.assert_array_equal(y2, g2)
