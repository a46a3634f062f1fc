"""Public quantize / dequantize API: validate, convert, allocate, then call the type table's kernel.

Kernels (in the family modules ``floats``, ``legacy``, ``kquants``) assume valid input; every check lives
here so that errors are uniform and name the row and column at fault.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numba
import numpy as np
from numba import njit

from ..errors import BadTensorDataError, ImatrixError, InvalidArgumentError, ShapeError
from ..interop import as_numpy
from ..types import GGMLType, Imatrix, TypeInfo, TypeLike, type_info
from .chunks import run_chunks

__all__ = ["quantize", "dequantize", "set_num_threads", "get_num_threads", "to_float32"]

_num_threads: Optional[int] = None  # None: all cores (numba's default)


def check_threads(n) -> Optional[int]:
    """``n`` as a thread count: None (all cores) or an int >= 1; anything else is an InvalidArgumentError."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise InvalidArgumentError(f"threads must be a whole number >= 1 (or None for all cores), not {n!r}")
    return int(n)


def set_num_threads(n: Optional[int]) -> None:
    """Threads used by the codec kernels (``None``: all cores).  Results never depend on it."""
    global _num_threads
    _num_threads = check_threads(n)


def get_num_threads() -> int:
    return _num_threads or (os.cpu_count() or 1)


class _threads:
    """``with _threads(n):`` run numba's parallel kernels on n threads (None: the module setting).

    A plain class, not contextlib: it is entered on every call, and touches numba only when the count changes.
    """

    __slots__ = ("wanted", "before")

    def __init__(self, n: Optional[int]):
        limit = numba.config.NUMBA_NUM_THREADS
        self.wanted = min(check_threads(n) or _num_threads or limit, limit)

    def __enter__(self):
        self.before = numba.get_num_threads()
        if self.wanted != self.before:
            numba.set_num_threads(self.wanted)

    def __exit__(self, *exc):
        if self.wanted != self.before:
            numba.set_num_threads(self.before)


def to_float32(x) -> np.ndarray:
    """Convert to float32 the way ggml does: float16 and bfloat16 exactly, float64 by rounding to nearest."""
    x = np.asarray(as_numpy(x))  # torch tensors (bfloat16, float8 too), DLPack, __array__: gguf_kquant.interop
    if x.dtype == np.float32:
        return x
    if x.dtype.name == "bfloat16":  # ml_dtypes / torch-exported arrays: bf16 is the top half of fp32
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if x.dtype.kind in "fiu":
        return x.astype(np.float32)
    raise BadTensorDataError(f"cannot quantize an array of dtype {x.dtype}; expected float32/float16/bfloat16/float64")


# ---------------------------------------------------------------------------------------------------
# Input and output checks, each one Numba pass over row ranges split over threads by run_chunks (a numpy
# isfinite() pass cost as much as some kernels; prange versions cost ~1.5 s more CPU to compile).  Both
# compare integer bit patterns, which vectorizes: |x| as bits orders like |x| itself.
# ---------------------------------------------------------------------------------------------------

_EXP_F32 = 0x7F800000  # |x| bits >= this: inf or NaN
# The smallest |x| (as fp32 bits) that rounds to inf when stored: fp16 max 65504, ties-to-even from 65520;
# bf16 rounds on the bit pattern (+0x7FFF + lsb), so 0x7F7F8000 and up carry into the exponent.
_OVERFLOW_BITS = {"F16": 0x477FF000, "BF16": 0x7F7F8000}


@njit(cache=True, nogil=True)
def _row_max_abs_bits(xi, out, r0, r1):
    """out[r] (r0 <= r < r1) = max over the row of the int32 bits of |x| (xi: the float32 rows as int32)."""
    n = xi.shape[1]
    for r in range(r0, r1):
        row = xi[r]
        m = np.int32(0)
        for j in range(n):
            m = max(m, row[j] & np.int32(0x7FFFFFFF))
        out[r] = m


def _check_input(x2d: np.ndarray, info: TypeInfo) -> None:
    """Raise, naming row and column, on a non-finite value or one the float type cannot store (inf)."""
    if not x2d.size:
        return
    row_max = np.empty(x2d.shape[0], np.int32)
    run_chunks(_row_max_abs_bits, x2d.shape[0], x2d.view(np.int32), row_max)
    limit = _OVERFLOW_BITS.get(info.name, _EXP_F32)
    if int(row_max.max()) < limit:
        return
    bits = x2d.view(np.int32)
    if int(row_max.max()) >= _EXP_F32:
        row = int(np.argmax(row_max >= _EXP_F32))
        col = int(np.argmax((bits[row] & 0x7FFFFFFF) >= _EXP_F32))
        raise BadTensorDataError(f"non-finite value {float(x2d[row, col])!r} at row {row}, column {col}")
    row = int(np.argmax(row_max >= limit))
    col = int(np.argmax((bits[row] & 0x7FFFFFFF) >= limit))
    raise BadTensorDataError(f"{info.name}: value at row {row}, column {col} overflows {info.name}")


@njit(cache=True, nogil=True)
def _first_inf_fp16_rows(out, type_size, o1, o2, first, r0, r1):
    """first[r] (r0 <= r < r1) = first block of row r whose fp16 at byte o1 or o2 has exponent 31, else -1."""
    nb = out.shape[1] // type_size
    top = np.uint8(0x7C)  # high byte of an fp16: s eeeee mm
    for r in range(r0, r1):
        row = out[r]
        bad = False
        for b in range(nb):  # branch-free scan (vectorizes); the rare hit is located below
            bad |= ((row[b * type_size + o1 + 1] & top) == top) | ((row[b * type_size + o2 + 1] & top) == top)
        first[r] = -1
        if bad:
            for b in range(nb):
                if ((row[b * type_size + o1 + 1] & top) == top) or ((row[b * type_size + o2 + 1] & top) == top):
                    first[r] = b
                    break


_FP16_FIELDS: dict = {}


def _fp16_fields(info: TypeInfo) -> list:
    """[(name, byte offset)] of every fp16 value in one block of a quantized type (from its block dtype)."""
    if info.ggml_type not in _FP16_FIELDS:
        found = []
        for name, (fdt, off, *_rest) in (info.block_dtype.fields or {}).items():
            if fdt.base == np.dtype("<f2"):
                found += [(name, off + 2 * k) for k in range(int(np.prod(fdt.shape, dtype=int)))]
        _FP16_FIELDS[info.ggml_type] = found
    return _FP16_FIELDS[info.ggml_type]


def _check_fp16_scales(out: np.ndarray, info: TypeInfo) -> None:
    """Raise if a block's fp16 scale overflowed (ggml would silently store inf)."""
    if info.ggml_type is GGMLType.IQ1_M:  # its fp16 scale is spread over the scales' top nibbles: no field
        from .iq1 import iq1_m_scale_bits

        bad = (iq1_m_scale_bits(out) & 0x7C00) == 0x7C00
        if bad.any():
            row, blk = divmod(int(np.argmax(bad)), max(out.shape[1] // info.type_size, 1))
            raise BadTensorDataError(f"{info.name}: the scale of row {row}, block {blk} overflows fp16 "
                                     f"(values too large to quantize to {info.name})")
        return
    fields = _fp16_fields(info) if info.is_quantized else []
    if not fields or not out.size:
        return
    offsets = [o for _n, o in fields]
    first = np.empty(out.shape[0], np.int64)
    found = None
    for k in range(0, len(offsets), 2):  # two fp16 fields per pass (every type has at most two)
        o1 = offsets[k]
        run_chunks(_first_inf_fp16_rows, out.shape[0], out, info.type_size, o1,
                   offsets[min(k + 1, len(offsets) - 1)], first)
        if int(first.max()) >= 0:
            hit = np.where(first >= 0, first, np.iinfo(np.int64).max)
            found = hit if found is None else np.minimum(found, hit)
    if found is None:
        return
    row = int(np.argmax(found < np.iinfo(np.int64).max))
    blk = int(found[row])
    block = out[row, blk * info.type_size:(blk + 1) * info.type_size]
    name = next(n for n, o in fields if (block[o + 1] & 0x7C) == 0x7C)
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
    with _threads(threads):
        _check_input(x2d, info)

    weights = None
    if imatrix is not None and info.imatrix is not Imatrix.IGNORED:
        weights = np.ascontiguousarray(to_float32(imatrix)).reshape(-1)
        if weights.size != n_per_row:
            raise ImatrixError(f"imatrix has {weights.size} values but rows have {n_per_row} columns")
        if not np.isfinite(weights).all():
            col = int(np.argmax(~np.isfinite(weights)))
            raise ImatrixError(f"imatrix value at column {col} is {float(weights[col])!r}")
        if (weights < 0).any():  # mean squared activations; ggml's grid searches abort or misbehave on < 0
            col = int(np.argmax(weights < 0))
            raise ImatrixError(f"imatrix value at column {col} is negative ({float(weights[col])!r}); "
                               f"importance values are mean squared activations")
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
        _check_fp16_scales(out, info)
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
    raw = as_numpy(raw)  # a torch uint8 tensor, a DLPack object (bytes and buffers pass unchanged)
    data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
    if data.size != expected:
        raise BadTensorDataError(
            f"{info.name} tensor of shape {shape} needs {expected} bytes, got {data.size}"
        )
    n_per_row = shape[-1] if shape else 1
    n_rows = (math.prod(shape) // n_per_row) if n_per_row else 0
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    if out.size:
        with _threads(threads):
            info.kernel("dequantize")(data.reshape(n_rows, -1), out)
    return out.reshape(shape)
