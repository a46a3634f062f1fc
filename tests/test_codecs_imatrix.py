"""Importance-matrix kernels (ggml's quantize_row_*_impl) beyond the shared oracle harness.

tests/test_codecs_oracle.py checks Q4_0..Q5_1 and Q2_K..Q6_K with plausible importance matrices against
ggml_quantize_chunk(.., imatrix).  Here: hostile importance matrices (all zero, 1e-30..1e30, subnormal, one-hot,
negative), the exact fast searches against the plain helper ports make_qx_quants / make_qkx3_quants,
make_qp_quants' uint8 wrap, and that the public API really takes the _impl path.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gguf_kquant
from codec_corpus import rows
from gguf_kquant.codecs import helpers
from gguf_kquant.codecs.kquants_imatrix import qkx3_fast, qx_weighted
from gguf_kquant.types import type_info

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TYPES = LEGACY + KQUANTS


def _ours(name, x, qw):
    info = type_info(name)
    out = np.empty((x.shape[0], info.row_bytes(x.shape[1])), np.uint8)
    info.kernel("quantize_imatrix")(x, qw, out)
    return out


def _assert_same(name, ours, ref):
    """Equal bytes, or fail naming the first differing row, block and byte within the block."""
    assert ours.shape == ref.shape
    bad = np.argwhere(ours != ref)
    if bad.size:
        row, col = (int(v) for v in bad[0])
        size = type_info(name).type_size
        rows_bad = np.unique(bad[:, 0]).size
        pytest.fail(f"{name}: {rows_bad} row(s) differ; first at row {row}, block {col // size}, "
                    f"byte {col % size} of the block: ours {ours[row, col]:#04x}, ggml {ref[row, col]:#04x}")


def _imatrix(kind, n, seed):
    """Importance matrices of the kinds llama-imatrix can produce, plus hostile ones."""
    rng = np.random.default_rng(seed)
    if kind == "positive":
        w = np.exp(rng.standard_normal(n) * 2)
    elif kind == "zeros":
        w = np.zeros(n)
    elif kind == "some_zeros":
        w = rng.random(n) * (rng.random(n) < 0.5)
    elif kind == "huge_range":
        w = 10.0 ** rng.uniform(-30, 30, n)
    elif kind == "all_equal":
        w = np.full(n, rng.uniform(0.01, 100))
    elif kind == "tiny":
        w = rng.random(n) * 1e-38
    elif kind == "one_hot":
        w = np.zeros(n)
        w[rng.integers(0, n)] = 1.0
    elif kind == "signed":  # not from llama-imatrix, but the API accepts any finite values
        w = rng.standard_normal(n)
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(w, dtype=np.float32)


IMATRIX_KINDS = ["positive", "zeros", "some_zeros", "huge_range", "all_equal", "tiny", "one_hot", "signed"]
# the oracle harness draws plausible, all-ones, uniform and sparse matrices; these are the others
HOSTILE_KINDS = [k for k in IMATRIX_KINDS if k != "positive"]


def _check_random(oracle, name, x, data):
    kind = data.draw(st.sampled_from(HOSTILE_KINDS), label="imatrix kind")
    qw = _imatrix(kind, x.shape[1], data.draw(st.integers(0, 2**32 - 1), label="imatrix seed"))
    _assert_same(name, _ours(name, x, qw), oracle.quantize_chunk(type_info(name).id, x, qw))


@pytest.mark.parametrize("name", LEGACY)
@settings(max_examples=60, deadline=None)
@given(x=rows(block_size=32, max_blocks=8), data=st.data())
def test_legacy_hostile_imatrices(oracle, name, x, data):
    _check_random(oracle, name, x, data)


@pytest.mark.parametrize("name", KQUANTS)
@settings(max_examples=60, deadline=None)
@given(x=rows(block_size=256, max_blocks=3), data=st.data())
def test_kquants_hostile_imatrices(oracle, name, x, data):
    _check_random(oracle, name, x, data)


# --- the fast searches are exact re-statements of the plain helper ports -----------------------------

_vals = st.sampled_from([1.0, 1e-3, 1e3, 1e-20, 3e4, 1e-40])


@st.composite
def _block(draw, n):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    how = draw(st.sampled_from(["normal", "positive", "negative", "ties", "constant", "zeros", "outlier"]))
    if how == "normal":
        x = rng.standard_normal(n)
    elif how == "positive":
        x = np.abs(rng.standard_normal(n))
    elif how == "negative":
        x = -np.abs(rng.standard_normal(n))
    elif how == "ties":  # values on rounding boundaries of small grids
        x = rng.integers(-8, 8, n) / 2.0
    elif how == "constant":
        x = np.full(n, rng.standard_normal())
    elif how == "zeros":
        x = np.zeros(n)
    else:
        x = rng.standard_normal(n) * 0.01
        x[rng.integers(0, n)] = 50.0
    x = (x * draw(_vals)).astype(np.float32)
    wkind = draw(st.sampled_from(IMATRIX_KINDS))
    w = _imatrix(wkind, n, seed + 1)
    return x, w


@pytest.mark.parametrize("n,nmax", [(16, 4), (32, 8), (32, 16), (16, 32)])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_qx_weighted_equals_make_qx_quants(n, nmax, data):
    x, w = data.draw(_block(n))
    L_ref = np.empty(n, np.int8)
    s_ref = helpers.make_qx_quants(x, nmax, L_ref, 1, w)
    L = np.empty(n, np.int32)
    s = qx_weighted(x, 0, n, nmax, L, 0, w, np.empty(n, np.float32), np.empty((3, 18), np.float32))
    assert np.float32(s).tobytes() == np.float32(s_ref).tobytes()
    assert (L == L_ref).all()


@pytest.mark.parametrize("n,nmax", [(16, 3), (32, 15), (32, 31)])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_qkx3_fast_equals_make_qkx3_quants(n, nmax, data):
    x, w = data.draw(_block(n))
    L_ref = np.empty(n, np.uint8)
    s_ref, m_ref = helpers.make_qkx3_quants(x, nmax, w, L_ref, np.empty(n, np.uint8),
                                            np.float32(-0.9), np.float32(0.05), 36, False)
    L = np.empty(n, np.int32)
    nonneg = bool(((w >= 0) | np.isnan(w)).all())
    s, m = qkx3_fast(x, 0, n, w, nmax, L, 0, np.empty(n, np.int32), np.empty(n, np.float32), nonneg)
    assert np.float32(s).tobytes() == np.float32(s_ref).tobytes()
    assert np.float32(m).tobytes() == np.float32(m_ref).tobytes()
    assert (L == L_ref).all()


def test_make_qp_quants_negative_input_keeps_low_byte():
    # C stores nearest_int into uint8_t L[]: a negative value wraps (the path Q4_K's packing ORs in).
    x = np.array([1.0, -0.5, 0.25, 0.0, 0.75, 0.5, -1.0, 0.9], np.float32)
    L = np.empty(8, np.uint8)
    d = helpers.make_qp_quants(x, 63, L, np.ones(8, np.float32))
    assert d > 0 and L[0] == 63 and L[6] > 63  # -63 & 0xFF == 193
    L_zero = np.full(8, 9, np.uint8)
    assert helpers.make_qp_quants(np.zeros(8, np.float32), 63, L_zero, np.ones(8, np.float32)) == 0
    assert (L_zero == 0).all()


def test_make_qkx3_quants_without_weights_uses_x_squared():
    x = np.linspace(-1, 2, 32).astype(np.float32)
    La, Lb, aux = np.empty(32, np.uint8), np.empty(32, np.uint8), np.empty(32, np.uint8)
    a = helpers.make_qkx3_quants(x, 15, np.empty(0, np.float32), La, aux, -0.9, 0.05, 36, False)
    b = helpers.make_qkx3_quants(x, 15, x * x, Lb, aux, -0.9, 0.05, 36, False)
    assert a == b and (La == Lb).all() and La.max() == 15


# --- public API -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q2_K", "Q4_K", "Q6_K"])
def test_public_api_uses_imatrix(oracle, name):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    w = _imatrix("positive", 512, 4)
    got = gguf_kquant.quantize(x, name, imatrix=w)
    ref = oracle.quantize_chunk(type_info(name).id, x, w)
    _assert_same(name, got, ref)
    assert (got != oracle.quantize_chunk(type_info(name).id, x)).any()  # really the _impl algorithm
    assert (gguf_kquant.quantize(x, name, imatrix=w, threads=1) == got).all()


@pytest.mark.parametrize("name", TYPES)
def test_kernels_accept_read_only_input(oracle, name):
    # memory-mapped tensors and imatrices are read-only: a separate numba specialization of every kernel
    x = np.random.default_rng(8).standard_normal((3, 512)).astype(np.float32)
    w = _imatrix("positive", 512, 9)
    x.setflags(write=False)
    w.setflags(write=False)
    _assert_same(name, _ours(name, x, w), oracle.quantize_chunk(type_info(name).id, x, w))
