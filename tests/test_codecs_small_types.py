"""Type-specific edge cases of Q1_0, Q2_0, TQ1_0, TQ2_0, MXFP4, NVFP4, IQ4_NL and IQ4_XS, against ggml.

The shared oracle harness checks every type on the corpus and random rows; these tests aim at the cases it
would reach only by luck: every scale byte of the E8M0/UE4M3 formats, block maxima next to powers of two
and to UE4M3 rounding boundaries, subnormal block maxima (1/d = inf) and the branch-free index search
that the IQ4 quantizers use in place of ggml's binary search.
"""

from __future__ import annotations

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.codecs import grids, iq4
from gguf_kquant.types import type_info


def _assert_bytes_equal(ours, ref):
    bad = np.argwhere(ours != ref)
    if bad.size:
        at = tuple(bad[0])
        raise AssertionError(f"{len(bad)} bytes differ; first at (row, byte) {at}: ours {ours[at]}, ggml {ref[at]}")


def _assert_bits_equal(ours, ref):
    bad = np.argwhere(ours.view(np.uint32) != ref.view(np.uint32))
    if bad.size:
        at = tuple(bad[0])
        raise AssertionError(f"{len(bad)} values differ; first at {at}: ours {ours[at]!r}, ggml {ref[at]!r}")


def _quantize_both(oracle, name, x, imatrix=None):
    ours = gguf_kquant.quantize(x, name, imatrix)
    return ours, oracle.quantize_chunk(type_info(name).id, x, imatrix)


def _blocks_with_max(values, block_size, rng):
    """One row per value: block_size elements in (-v, v) with +-v itself at a random place."""
    values = np.asarray(values, dtype=np.float32)
    x = (rng.uniform(-1, 1, (values.size, block_size)) * values[:, None]).astype(np.float32)
    x[np.arange(values.size), rng.integers(0, block_size, values.size)] = values * rng.choice([-1, 1], values.size)
    return x


def _around(values):
    """Each float32 value with its two neighbours."""
    v = np.asarray(values, dtype=np.float32)
    return np.concatenate([np.nextafter(v, np.float32(0)), v, np.nextafter(v, np.float32(np.inf))])


def test_mxfp4_exponent_next_to_powers_of_two(oracle):
    # floorf(log2f(amax)): log2f rounds up to k just below 2^k; below 2^-125 the exponent byte wraps around
    amax = _around(np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32))
    amax = amax[np.isfinite(amax) & (amax > 0)]
    x = _blocks_with_max(amax, 32, np.random.default_rng(0))
    _assert_bytes_equal(*_quantize_both(oracle, "MXFP4", x))


def test_nvfp4_scale_rounding_boundaries(oracle):
    # amax/6 at every UE4M3 value, halfway points and neighbours, the subnormal range and saturation at 448
    codes = np.arange(1, 127)
    exp, man = codes >> 3, codes & 7
    ue = np.where(exp == 0, man * 2.0 ** -9, (1 + man / 8) * 2.0 ** (exp - 7.0))
    halfway = (ue[:-1] + ue[1:]) / 2
    amax = _around(np.concatenate([ue, halfway, [448.0, 449.0, 1e4, 2.0 ** -10, 2.0 ** -12]]) * 6).astype(np.float32)
    x = _blocks_with_max(amax, 16, np.random.default_rng(1))
    x = np.concatenate([x, np.zeros((x.shape[0], 48), np.float32)], axis=1)  # 64-element NVFP4 blocks
    _assert_bytes_equal(*_quantize_both(oracle, "NVFP4", x))


@pytest.mark.parametrize("name, scale_bytes", [("MXFP4", [0]), ("NVFP4", [0, 1, 2, 3])])
def test_fp4_dequantize_every_scale_byte(oracle, name, scale_bytes):
    # E8M0 0..255 (0 and 1 are float32 subnormals, 255 overflows x 12 to inf) and UE4M3 0..255 (0x7F = 0)
    info = type_info(name)
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (256, info.type_size), dtype=np.uint8)
    for b in scale_bytes:
        raw[:, b] = np.arange(256)
    _assert_bits_equal(gguf_kquant.dequantize(raw, name, (256, info.block_size)),
                       oracle.to_float(info.id, raw, info.block_size))


@pytest.mark.parametrize("name", ["Q2_0", "TQ1_0", "TQ2_0"])
def test_subnormal_block_maximum(oracle, name):
    # 1.0f/d = inf: x * id is +-inf, or NaN where x == 0 -> C's roundf/lroundf conversions of inf and NaN
    block = type_info(name).block_size
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 4 * block)) * 1e-40).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0.0
    x[0] = 0.0
    x[1, :] = np.float32(1e-45)
    _assert_bytes_equal(*_quantize_both(oracle, name, x))


def test_q1_0_signs_of_zero(oracle):
    # x >= 0.0f: -0.0 counts as positive
    x = np.zeros((2, 256), np.float32)
    x[0, ::2] = -0.0
    x[1] = np.where(np.arange(256) % 3 == 0, -1e-30, 2.5).astype(np.float32)
    _assert_bytes_equal(*_quantize_both(oracle, "Q1_0", x))


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_zero_blocks_and_imatrix_zeros(oracle, name):
    # all-zero super-blocks (IQ4_XS stores d = -0.0), single zero sub-blocks, and imatrix weights of 0
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    x[0] = 0.0
    x[1, 32:64] = 0.0
    x[2, 256:512] = 1e-16  # below GROUP_MAX_EPS
    x[3, ::7] = 0.0
    imatrix = np.exp(rng.standard_normal(1024)).astype(np.float32)
    imatrix[::5] = 0.0
    _assert_bytes_equal(*_quantize_both(oracle, name, x))
    _assert_bytes_equal(*_quantize_both(oracle, name, x, imatrix))
    _assert_bytes_equal(*_quantize_both(oracle, name, x, np.zeros(1024, np.float32)))


def test_branch_free_index_equals_binary_search():
    # iq4._best_index_16 replaces ggml's best_index_int8 binary search; they must agree on every float,
    # in particular at and next to each midpoint between table values, the ends, +-inf and NaN
    values = grids.kvalues_iq4nl
    fval = values.astype(np.float32)
    v = values.astype(np.float64)
    special = np.concatenate([(v[:-1] + v[1:]) / 2, v, [0.0, -0.0, 1e30, -1e30, 200.0, -200.0]]).astype(np.float32)
    xs = np.concatenate([
        _around(special), _around(-special),
        np.float32([np.inf, -np.inf, np.nan]),
        np.random.default_rng(5).uniform(-140, 130, 20000).astype(np.float32),
    ])
    for x in xs:
        assert iq4._best_index_16(fval, x) == iq4.best_index_int8(16, values, x), x
