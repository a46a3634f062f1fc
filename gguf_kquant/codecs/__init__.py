"""Public quantize / dequantize API: validate, convert, allocate, then call the type table's kernel.

Kernels (in the family modules ``floats``, ``legacy``, ``kquants``) assume valid input; every check lives
here so that errors are uniform and name the row and column at fault.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np

from ..errors import BadTensorDataError, ImatrixError, ShapeError
from ..types import Imatrix, TypeLike, type_info

__all__ = ["quantize", "dequantize", "set_num_threads", "get_num_threads", "to_float32"]

_num_threads: Optional[int] = None  # None: all cores (numba's default)


def set_num_threads(n: Optional[int]) -> None:
    """Threads used by the codec kernels (``None``: all cores).  Results never depend on it."""
    global _num_threads
    if n is not None and int(n) < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _num_threads = None if n is None else int(n)


def get_num_threads() -> int:
    return _num_threads or (os.cpu_count() or 1)


@contextlib.contextmanager
def _threads(n: Optional[int]):
    import numba

    wanted = min(n or _num_threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    numba.set_num_threads(wanted)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def to_float32(x) -> np.ndarray:
    """Convert to float32 the way ggml does: float16 and bfloat16 exactly, float64 by rounding to nearest."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        return x
    if x.dtype.name == "bfloat16":  # ml_dtypes / torch-exported arrays: bf16 is the top half of fp32
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if x.dtype.kind in "fiu":
        return x.astype(np.float32)
    raise BadTensorDataError(f"cannot quantize an array of dtype {x.dtype}; expected float32/float16/bfloat16/float64")


def _first_nonfinite(x2d: np.ndarray) -> tuple[int, int]:
    bad = ~np.isfinite(x2d)
    row = int(np.argmax(bad.any(axis=1)))
    col = int(np.argmax(bad[row]))
    return row, col


def _check_fp16_scales(out: np.ndarray, info, n_rows: int) -> None:
    """Raise if a block's fp16 scale overflowed (ggml would silently store inf)."""
    if info.name in ("F16", "BF16"):  # finite float32 beyond the type's range rounds to inf
        bits = out.view("<u2").reshape(n_rows, -1)
        overflow = (bits & 0x7FFF) == (0x7C00 if info.name == "F16" else 0x7F80)
        if overflow.any():
            row = int(np.argmax(overflow.any(axis=1)))
            col = int(np.argmax(overflow[row]))
            raise BadTensorDataError(f"{info.name}: value at row {row}, column {col} overflows {info.name}")
        return
    dt = info.block_dtype
    if dt.fields is None:
        return
    blocks = out.reshape(-1).view(dt)
    for name, (fdt, *_rest) in dt.fields.items():
        if fdt == np.dtype("<f2"):
            vals = blocks[name]
            if not np.isfinite(vals).all():
                idx = int(np.argmax(~np.isfinite(vals)))
                per_row = blocks.size // max(n_rows, 1)
                row, blk = divmod(idx, per_row)
                raise BadTensorDataError(
                    f"{info.name}: scale {name!r} of row {row}, block {blk} overflows fp16 "
                    f"(values too large to quantize to {info.name})"
                )


def quantize(x, qtype: TypeLike, imatrix=None, *, threads: Optional[int] = None) -> np.ndarray:
    """Quantize rows of ``x`` (shape ``(..., n_per_row)``) to ggml type ``qtype``, bytes identical to ggml.

    Returns a uint8 array of shape ``(n_rows, row_bytes)``.  With ``imatrix`` (one weight per column) types
    that take one use ggml's importance-matrix algorithm (``quantize_row_*_impl``).

    >>> import numpy as np, gguf_kquant
    >>> q = gguf_kquant.quantize(np.ones((2, 256), np.float32), "Q4_K")
    >>> q.shape
    (2, 144)
    """
    info = type_info(qtype)
    x = to_float32(x)
    if x.ndim == 0:
        raise ShapeError("cannot quantize a scalar; expected shape (..., n_per_row)")
    n_per_row = int(x.shape[-1])
    if n_per_row % info.block_size:
        raise ShapeError(
            f"row length {n_per_row} is not a multiple of {info.name}'s block size {info.block_size}"
        )
    x2d = x.reshape(-1, n_per_row) if n_per_row else x.reshape(-1, 0)
    if not x2d.flags.c_contiguous:
        x2d = np.ascontiguousarray(x2d)
    n_rows = x2d.shape[0]
    if x2d.size and not np.isfinite(x2d).all():
        row, col = _first_nonfinite(x2d)
        raise BadTensorDataError(f"non-finite value {float(x2d[row, col])!r} at row {row}, column {col}")

    weights = None
    if imatrix is not None and info.imatrix is not Imatrix.IGNORED:
        weights = np.ascontiguousarray(to_float32(imatrix)).reshape(-1)
        if weights.size != n_per_row:
            raise ImatrixError(f"imatrix has {weights.size} values but rows have {n_per_row} columns")
        if not np.isfinite(weights).all():
            col = int(np.argmax(~np.isfinite(weights)))
            raise ImatrixError(f"imatrix value at column {col} is {float(weights[col])!r}")
    elif info.imatrix is Imatrix.REQUIRED:
        raise ImatrixError(f"{info.name} cannot be quantized without an importance matrix")

    out = np.empty((n_rows, info.row_bytes(n_per_row)), dtype=np.uint8)
    if n_rows == 0 or n_per_row == 0:
        return out
    with _threads(threads):
        if weights is None:
            info.kernel("quantize")(x2d, out)
        else:
            info.kernel("quantize_imatrix")(x2d, weights, out)
    _check_fp16_scales(out, info, n_rows)
    return out


def dequantize(raw, qtype: TypeLike, shape, *, threads: Optional[int] = None) -> np.ndarray:
    """Decode ggml blocks to float32 of numpy ``shape`` (last axis = row length), as ggml's ``to_float``.

    ``raw`` is anything exposing bytes (uint8 array, memoryview of a mapped file, bytes).

    >>> import numpy as np, gguf_kquant
    >>> x = np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)
    >>> y = gguf_kquant.dequantize(gguf_kquant.quantize(x, "Q8_0"), "Q8_0", x.shape)
    >>> float(abs(x - y).max()) < 0.01
    True
    """
    info = type_info(qtype)
    shape = tuple(int(d) for d in (shape if np.ndim(shape) else (shape,)))
    if any(d < 0 for d in shape):
        raise ShapeError(f"negative dimension in shape {shape}")
    expected = info.nbytes(shape) if shape else info.type_size
    data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
    if data.size != expected:
        raise BadTensorDataError(
            f"{info.name} tensor of shape {shape} needs {expected} bytes, got {data.size}"
        )
    n_per_row = shape[-1] if shape else 1
    n_rows = (int(np.prod(shape, dtype=object)) // n_per_row) if n_per_row else 0
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    if out.size:
        with _threads(threads):
            info.kernel("dequantize")(data.reshape(n_rows, -1), out)
    return out.reshape(shape)
