"""k-quant kernels (reference path, Q2_K..Q8_K): what the shared oracle harness does not check.

tests/test_codecs_oracle.py compares every type with ggml (corpus, hypothesis rows, random blocks).  Here: the
lane-interleaved scale searches against the plain one-sub-block ports, read-only input, thread-count
independence of the chunked drivers, and all-zero / lone-subnormal super-blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from codec_corpus import fixed_corpus
from gguf_kquant.codecs import dequantize, kquants, quantize
from gguf_kquant.codecs.helpers import make_q3_quants, make_qkx2_quants, make_qx_quants
from gguf_kquant.types import type_info

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"]


def ggml_quantize(name: str, x: np.ndarray) -> np.ndarray:
    if name == "Q8_K":  # ggml_quantize_chunk has no Q8_K; its from_float_ref is the reference
        return oracle.quantize_row_symbol("quantize_row_q8_K_ref", 15, x)
    return oracle.quantize_chunk(type_info(name).id, x)


def ggml_dequantize(name: str, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    if name == "Q8_K":
        return oracle.dequantize_row_symbol("dequantize_row_q8_K", raw, n_per_row)
    return oracle.to_float(type_info(name).id, raw, n_per_row)


def assert_same_bytes(name: str, ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    if np.array_equal(ours, ref):
        return
    size = type_info(name).type_size
    row = int(np.argmax((ours != ref).any(axis=1)))
    byte = int(np.argmax(ours[row] != ref[row]))
    blk = byte // size
    raise AssertionError(
        f"{name}: {int((ours != ref).any(axis=1).sum())} rows differ; first: row {row}, block {blk}, "
        f"byte {byte - blk * size} of the block\n ours {ours[row, blk * size:(blk + 1) * size].tolist()}\n"
        f" ggml {ref[row, blk * size:(blk + 1) * size].tolist()}"
    )


def assert_same_floats(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    if not same.all():
        r, c = np.argwhere(~same)[0]
        raise AssertionError(f"row {r}, column {c}: ours {ours[r, c]!r}, ggml {ref[r, c]!r}")


@pytest.mark.parametrize("name", TYPES)
def test_kernels_accept_read_only_input(name):
    x = np.random.default_rng(3).standard_normal((3, 512)).astype(np.float32)
    x.setflags(write=False)
    info = type_info(name)
    out = np.empty((3, info.row_bytes(512)), np.uint8)
    info.kernel("quantize")(x, out)
    assert_same_bytes(name, out, ggml_quantize(name, x))
    out.setflags(write=False)
    y = np.empty((3, 512), np.float32)
    info.kernel("dequantize")(out, y)
    assert_same_floats(y, ggml_dequantize(name, out, 512))


def test_output_does_not_depend_on_thread_count():
    x = fixed_corpus(64, 1024)
    for name in TYPES:
        one = quantize(x, name, threads=1)
        assert np.array_equal(one, quantize(x, name, threads=2)), name
        assert np.array_equal(dequantize(one, name, x.shape, threads=1), dequantize(one, name, x.shape, threads=2))


def test_zero_rows_and_tiny_blocks(oracle):
    x = np.zeros((2, 512), np.float32)
    x[1, 300] = np.float32(1e-30)  # a lone subnormal-scale value: scales below GROUP_MAX_EPS
    for name in TYPES:
        assert_same_bytes(name, quantize(x, name), ggml_quantize(name, x))


# The kernels run the scale searches on all sub-blocks of a super-block at once ("lanes"); they must agree
# with the plain one-sub-block ports in helpers.py (which the importance-matrix path shares).


def lane_inputs(seed, n, nl, scale, shift):
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((nl, n)) + shift) * scale).astype(np.float32)
    kinds = rng.integers(0, 4, nl)  # some lanes all-zero, constant, or single non-zero
    x[kinds == 1] = 0.0
    x[kinds == 2] = x[kinds == 2, :1]
    x[kinds == 3, 1:] = 0.0
    return x


def bits(v) -> int:
    return int(np.float32(v).view(np.uint32))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(16, 16, 3, -0.5, 15, True), (32, 8, 15, -1.0, 20, False), (32, 8, 31, -0.5, 15, False)]),
    scale=st.sampled_from([1.0, 1e-3, 1e4, 1e-30]),
    shift=st.sampled_from([0.0, 1.0, -1.0]),
)
def test_qkx2_lanes_match_helper(seed, shape, scale, shift):
    n, nl, nmax, rmin, nstep, use_mad = shape
    x = lane_inputs(seed, n, nl, scale, shift)
    w = (np.abs(x) + np.float32(np.random.default_rng(seed).random())).astype(np.float32)
    Lt, Lat, xm = np.empty(n * nl, np.int32), np.empty(n * nl, np.int32), np.empty(n * nl, np.float32)
    st_ = np.empty((16, nl), np.float32)
    kquants._qkx2_lanes(np.ascontiguousarray(x.T).reshape(-1), np.ascontiguousarray(w.T).reshape(-1), n, nl,
                        nmax, Lt, Lat, xm, st_, np.float32(rmin), np.float32(0.1), nstep, use_mad)
    for j in range(nl):
        L, Laux = np.empty(n, np.uint8), np.empty(n, np.uint8)
        s, m = make_qkx2_quants(x[j], w[j], nmax, L, Laux, np.float32(rmin), np.float32(0.1), nstep, use_mad)
        assert (bits(s), bits(m)) == (bits(st_[kquants._S_SCALE, j]), bits(-st_[kquants._S_MIN, j])), j
        assert np.array_equal(L.astype(np.int32), Lt.reshape(n, nl)[:, j]), j


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.0, 1e-3, 1e4, 1e-30]),
       shift=st.sampled_from([0.0, 1.0]), q3=st.booleans())
def test_qx_and_q3_lanes_match_helpers(seed, scale, shift, q3):
    n, nl = 16, 16
    x = lane_inputs(seed, n, nl, scale, shift)
    xt = np.ascontiguousarray(x.T).reshape(-1)
    Lt, Lat, w, wx = (np.empty(n * nl, np.int32), np.empty(n * nl, np.int32),
                      np.empty(n * nl, np.float32), np.empty(n * nl, np.float32))
    st_ = np.empty((16, nl), np.float32)
    if q3:
        kquants._q3_lanes(xt, n, nl, 4, Lt, w, wx, st_)
    else:
        kquants._qx_rmse1_lanes(xt, n, nl, 32, Lt, Lat, w, wx, st_)
    for j in range(nl):
        L = np.empty(n, np.int8)
        s = make_q3_quants(x[j], 4, L, True) if q3 else make_qx_quants(x[j], 32, L, 1, np.empty(0, np.float32))
        assert bits(s) == bits(st_[kquants._S_SCALE, j]), j
        assert np.array_equal(L.astype(np.int32), Lt.reshape(n, nl)[:, j]), j
