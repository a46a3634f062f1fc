"""The public codec API: gguf_kquant.quantize / dequantize — inputs it accepts, errors it raises."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest

import gguf_kquant
from gguf_kquant import BadTensorDataError, GGUFError, ImatrixError, ShapeError, UnknownTypeError
from gguf_kquant.types import TYPES, GGMLType, type_info


def _types_with_kernels():
    found = []
    for info in TYPES.values():
        try:
            info.kernel("quantize"), info.kernel("dequantize")
        except UnknownTypeError:
            continue
        found.append(info.name)
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} <= set(found)
    return found


KERNEL_TYPES = _types_with_kernels()


def _x(n_rows=4, n_per_row=256, seed=0):
    return np.random.default_rng(seed).standard_normal((n_rows, n_per_row)).astype(np.float32)


def test_type_spellings_give_same_bytes():
    x = _x()
    ref = gguf_kquant.quantize(x, "Q4_0")
    for t in ("q4_0", 2, GGMLType.Q4_0, gguf.GGMLQuantizationType.Q4_0, type_info("Q4_0")):
        np.testing.assert_array_equal(gguf_kquant.quantize(x, t), ref)
        y = gguf_kquant.dequantize(ref, t, x.shape)
        np.testing.assert_array_equal(y, gguf_kquant.dequantize(ref, "Q4_0", x.shape))


def test_unknown_type():
    with pytest.raises(UnknownTypeError):
        gguf_kquant.quantize(_x(), "Q4_2")
    with pytest.raises(UnknownTypeError, match="no codec"):
        gguf_kquant.quantize(_x(), "F64")
    assert issubclass(UnknownTypeError, GGUFError) and issubclass(GGUFError, ValueError)


def test_input_dtypes():
    """float16 converts exactly, float64 rounds to the nearest float32; integers are taken as values."""
    x = _x()
    ref = gguf_kquant.quantize(x, "Q8_0")
    np.testing.assert_array_equal(gguf_kquant.quantize(x.astype(np.float64), "Q8_0"), ref)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(gguf_kquant.quantize(h, "Q8_0"), gguf_kquant.quantize(h.astype(np.float32), "Q8_0"))
    d = x.astype(np.float64) + 1e-12  # rounds back to x
    np.testing.assert_array_equal(gguf_kquant.quantize(d, "Q8_0"), ref)
    ints = np.arange(64, dtype=np.uint16).reshape(2, 32)  # uint16 is numbers, not bf16 bit patterns
    np.testing.assert_array_equal(gguf_kquant.quantize(ints, "F32").view(np.float32), ints.astype(np.float32))
    np.testing.assert_array_equal(gguf_kquant.quantize(x.tolist(), "Q8_0"), ref)  # nested lists
    with pytest.raises(BadTensorDataError, match="dtype"):
        gguf_kquant.quantize(np.array([["a"] * 32]), "Q8_0")
    with pytest.raises(BadTensorDataError, match="dtype"):
        gguf_kquant.quantize(np.ones((1, 32), np.complex64), "Q8_0")


def test_shapes():
    x = _x(6, 64)
    ref = gguf_kquant.quantize(x, "Q5_1")
    assert ref.shape == (6, 2 * 24) and ref.dtype == np.uint8
    np.testing.assert_array_equal(gguf_kquant.quantize(x.reshape(2, 3, 64), "Q5_1"), ref)
    np.testing.assert_array_equal(gguf_kquant.quantize(x[0], "Q5_1"), ref[:1])  # 1-D: one row
    y = gguf_kquant.dequantize(ref, "Q5_1", (2, 3, 64))
    assert y.shape == (2, 3, 64) and y.dtype == np.float32
    np.testing.assert_array_equal(y.reshape(6, 64), gguf_kquant.dequantize(ref, "Q5_1", (6, 64)))
    np.testing.assert_array_equal(gguf_kquant.quantize(x[:, ::-1], "Q5_1"),  # non-contiguous input
                                  gguf_kquant.quantize(np.ascontiguousarray(x[:, ::-1]), "Q5_1"))
    assert gguf_kquant.quantize(np.zeros((0, 64), np.float32), "Q4_0").shape == (0, 36)
    assert gguf_kquant.dequantize(b"", "Q4_0", (0, 64)).shape == (0, 64)


def test_bad_row_length():
    with pytest.raises(ShapeError, match=r"row length 48 .* block size 32"):
        gguf_kquant.quantize(np.zeros((2, 48), np.float32), "Q4_0")
    with pytest.raises(ShapeError, match="scalar"):
        gguf_kquant.quantize(np.float32(1.0), "F32")
    with pytest.raises(ShapeError):
        gguf_kquant.dequantize(np.zeros(36, np.uint8), "Q4_0", (1, 48))
    with pytest.raises(ShapeError):
        gguf_kquant.dequantize(np.zeros(36, np.uint8), "Q4_0", (-1, 64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_row_and_column(bad):
    x = _x(5, 64)
    x[3, 17] = bad
    with pytest.raises(BadTensorDataError, match=r"row 3, column 17"):
        gguf_kquant.quantize(x, "Q8_0")
    with pytest.raises(BadTensorDataError, match=r"row 4, column 17"):  # rows of (..., n) count flattened
        gguf_kquant.quantize(np.concatenate([x[:1], x]).reshape(3, 2, 64), "F16")


def test_imatrix_validation():
    x = _x(2, 64)
    with pytest.raises(ImatrixError, match="63 values .* 64 columns"):
        gguf_kquant.quantize(x, "Q4_0", imatrix=np.ones(63, np.float32))
    w = np.ones(64, np.float32)
    w[9] = np.nan
    with pytest.raises(ImatrixError, match="column 9"):
        gguf_kquant.quantize(x, "Q4_1", imatrix=w)
    # types whose ggml quantizer ignores an imatrix ignore it here too (even a malformed one)
    np.testing.assert_array_equal(gguf_kquant.quantize(x, "Q8_0", imatrix=w[:3]), gguf_kquant.quantize(x, "Q8_0"))
    np.testing.assert_array_equal(gguf_kquant.quantize(x, "F16", imatrix=w), gguf_kquant.quantize(x, "F16"))


@pytest.mark.parametrize(
    "name,value", [("Q8_0", 1e10), ("Q4_0", 1e10), ("Q5_1", -1e10), ("F16", 7e4), ("BF16", 3.4e38)]
)
def test_fp16_overflow_is_an_error(name, value):
    x = _x(3, 64)
    x[2, 40] = value
    with pytest.raises(BadTensorDataError, match=r"row 2") as err:
        gguf_kquant.quantize(x, name)
    assert "overflow" in str(err.value)
    if name in ("F16", "BF16"):
        assert "column 40" in str(err.value)
    else:
        assert re.search(r"block 1\b", str(err.value))


def test_largest_values_that_fit():
    x = np.full((1, 32), 65504.0 * 127 / 128, np.float32)  # Q8_0's d stays below the fp16 maximum
    y = gguf_kquant.dequantize(gguf_kquant.quantize(x, "Q8_0"), "Q8_0", x.shape)
    assert np.isfinite(y).all()
    assert np.isfinite(gguf_kquant.dequantize(gguf_kquant.quantize(x, "F16"), "F16", x.shape)).all()


def test_read_only_memmapped_input(tmp_path):
    x = _x(8, 256)
    path = tmp_path / "x.f32"
    x.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    assert not mm.flags.writeable
    # read-only arrays are a separate numba specialization (compiled once per kernel): a few types keep it quick
    for name in [t for t in ("F16", "BF16", "Q4_0", "Q5_1", "Q8_0", "Q4_K") if t in KERNEL_TYPES]:
        q = gguf_kquant.quantize(mm, name)
        np.testing.assert_array_equal(q, gguf_kquant.quantize(x, name))
        qpath = tmp_path / f"{name}.bin"
        q.tofile(qpath)
        qmm = np.memmap(qpath, dtype=np.uint8, mode="r")
        y = gguf_kquant.dequantize(q, name, x.shape)
        np.testing.assert_array_equal(gguf_kquant.dequantize(qmm, name, x.shape), y)
    del mm, qmm


def test_dequantize_accepts_bytes_like():
    x = _x(2, 64)
    q = gguf_kquant.quantize(x, "Q4_1")
    y = gguf_kquant.dequantize(q, "Q4_1", x.shape)
    for raw in (q.tobytes(), memoryview(q.tobytes()), bytearray(q.tobytes()), q.reshape(-1)):
        np.testing.assert_array_equal(gguf_kquant.dequantize(raw, "Q4_1", x.shape), y)


@pytest.mark.parametrize("delta", [-1, 1, -40])
def test_dequantize_wrong_byte_count(delta):
    q = gguf_kquant.quantize(_x(2, 64), "Q4_1").reshape(-1)
    raw = np.concatenate([q, np.zeros(max(delta, 0), np.uint8)])[: q.size + delta]
    with pytest.raises(BadTensorDataError, match=rf"needs {q.size} bytes, got {q.size + delta}"):
        gguf_kquant.dequantize(raw, "Q4_1", (2, 64))


def test_result_independent_of_thread_count():
    x = _x(37, 512, seed=3)
    before = gguf_kquant.get_num_threads()
    try:
        for name in KERNEL_TYPES:
            ref = gguf_kquant.quantize(x, name, threads=1)
            np.testing.assert_array_equal(gguf_kquant.quantize(x, name, threads=2), ref)
            gguf_kquant.set_num_threads(2)
            np.testing.assert_array_equal(gguf_kquant.quantize(x, name), ref)
            y = gguf_kquant.dequantize(ref, name, x.shape, threads=1)
            np.testing.assert_array_equal(gguf_kquant.dequantize(ref, name, x.shape, threads=2), y)
            gguf_kquant.set_num_threads(None)
    finally:
        gguf_kquant.set_num_threads(None)
    assert gguf_kquant.get_num_threads() == before
    with pytest.raises(ValueError):
        gguf_kquant.set_num_threads(0)


@pytest.mark.parametrize("threads", [0, -1, "2", True, 1.5])
def test_bad_thread_counts_are_typed_errors(threads):
    from gguf_kquant.errors import InvalidArgumentError

    x = np.ones((1, 32), np.float32)
    with pytest.raises(InvalidArgumentError, match="threads must be a whole number"):
        gguf_kquant.quantize(x, "Q8_0", threads=threads)
    with pytest.raises(InvalidArgumentError):
        gguf_kquant.dequantize(gguf_kquant.quantize(x, "Q8_0"), "Q8_0", x.shape, threads=threads)
    with pytest.raises(InvalidArgumentError):
        gguf_kquant.set_num_threads(threads)


def test_negative_importance_is_refused_naming_the_column():
    x = np.ones((1, 256), np.float32)
    w = np.ones(256, np.float32)
    w[17] = -0.5
    for name in ("Q4_K", "IQ2_XXS", "IQ4_NL"):
        with pytest.raises(ImatrixError, match="column 17 is negative"):
            gguf_kquant.quantize(x, name, imatrix=w)


def test_iq1_m_scale_overflow_is_refused_like_every_fp16_scale():
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    x[2] *= 1e6  # IQ1_M's super-block scale is an fp16 spread over four nibbles: it overflows to inf
    with pytest.raises(BadTensorDataError, match="row 2, block 0 overflows fp16"):
        gguf_kquant.quantize(x, "IQ1_M")
    assert gguf_kquant.quantize(x[:2], "IQ1_M").shape == (2, 112)
