"""Streaming, atomic GGUF writer (single files and gguf-split shards).

The writer first *plans* every file: it types and encodes the metadata, checks every tensor the way
ggml's ``gguf_init_from_file_impl`` / llama.cpp's loader would, and computes each tensor's offset (the
running sum of sizes padded to the alignment).  Only then does it write: the header, then each tensor's
bytes, one tensor at a time, pulled from its producer — so peak memory is one tensor (or one chunk, for a
streaming producer).  After each tensor the file position must equal the plan, otherwise
:class:`~gguf_kquant.errors.WriteError` names the tensor.  Output goes through :mod:`gguf_kquant.safeio`:
no target may name a file being read (the files of TensorInfo sources, ``inputs=``); every file is written
to a temporary file in its target's folder, fsync'ed, and all are renamed into place together at the end
(then the folders are fsync'ed); on any exception — a producer raising mid-stream, disk full (a
:class:`~gguf_kquant.errors.GGUFIOError` naming the file), ``KeyboardInterrupt``, SIGTERM or SIGHUP — no
target is touched and the temporary files are removed.

>>> import numpy as np, gguf_kquant
>>> gguf_kquant.write("tiny.gguf", {"general.architecture": "llama"},
...                   {"w": np.zeros((2, 32), np.float32)})                 # doctest: +SKIP
[PosixPath('tiny.gguf')]

Copy a file without decoding anything (metadata keeps its GGUF types, tensors are copied from ``raw()``)::

    with gguf_kquant.open("in.gguf") as f:
        gguf_kquant.write("out.gguf", f.metadata, f.tensors)   # byte-identical to in.gguf

Streaming a tensor that is produced lazily (a quantizer, say)::

    def q4k_rows():                       # yields bytes-like chunks, in order
        for rows in np.array_split(weights, 64):
            yield gguf_kquant.quantize(rows, "Q4_K")
    with gguf_kquant.GGUFWriter("model.gguf", metadata) as w:
        w.add_tensor("blk.0.ffn_up.weight", q4k_rows, shape=weights.shape, ggml_type="Q4_K")
    # the file is written when the ``with`` block ends without an exception

Tensor data (``data`` of :meth:`GGUFWriter.add_tensor`) may be

* a numpy array: float32 -> F32, float16 -> F16, float64 -> F64, int8/16/32/64 -> I8/I16/I32/I64,
  ``ml_dtypes.bfloat16`` -> BF16 (the type is implied; byte-swapped for a big-endian file).  Any other
  dtype is taken as the raw *file bytes* and needs an explicit ``ggml_type`` (``uint8`` quantized blocks,
  ``uint16`` BF16 bits...); the shape is then given, or inferred from a byte array of shape
  ``(..., row_bytes)``;
* a bytes-like object (raw file bytes);
* a :class:`~gguf_kquant.container.reader.TensorInfo` of an open file (copied from its memory map), or a
  gguf-py ``ReaderTensor`` (copied as raw bytes);
* a torch tensor or any DLPack / ``__array__`` object, taken as the numpy array it converts to (torch's
  bfloat16 as BF16 bit patterns); torch is never imported (:mod:`gguf_kquant.interop`);
* a callable, called when the tensor is written, returning any of the above or an iterator;
* an iterator / generator of bytes-like chunks (numpy arrays included), consumed while writing.

Rules (what llama.cpp rejects is refused with :class:`~gguf_kquant.errors.WriteError`, naming the key or
tensor): keys non-empty, unique, UTF-8; tensor names unique and shorter than 64 bytes (``GGML_MAX_NAME``);
at most 4 dimensions; row length (``shape[-1]``) a multiple of the type's block size; known ggml types;
``general.alignment`` a UINT32 power of two (the alignment is taken from it, else the ``alignment=`` option,
else 32; a non-default ``alignment=`` adds the key); values in range for their GGUF type; strings at most
1 GiB and arrays at most 2**30 elements (``GGUF_MAX_STRING_LENGTH`` / ``GGUF_MAX_ARRAY_ELEMENTS``).

*Empty arrays* are written: ggml's parser accepts a zero-length array of any element type and
``gguf_set_arr_data`` writes them (gguf-py's writer refuses them; its reader reads them).  A plain empty
list has no element type, so pass ``Value([], GGUFValueType.ARRAY, GGUFValueType.INT32)``.
*Arrays of arrays* are written the way gguf-py writes them (inner arrays as element type, count,
elements); note that ggml's own parser rejects them, so a file meant for llama.cpp should not use them.

Split output follows gguf-split (tools/gguf-split/gguf-split.cpp): ``split_max_tensors=N`` starts a new
shard every N tensors, ``split_max_size`` (bytes, or ``"500M"`` / ``"2G"`` — decimal units, as gguf-split)
starts one when the shard's tensor data (padded sizes, metadata not counted) would exceed it; both may be
given.  Shards are named ``{prefix}-00001-of-0000N.gguf`` where ``prefix`` is the path without ``.gguf``
(even when everything fits one shard, as gguf-split does).  Like gguf-split, which rewrites tensor infos with
ggml's writer, leading dims of 1 are dropped (shape ``(1, 32)`` is stored as ``(32,)``: ``ggml_n_dims``).
The first shard holds all metadata, every shard ends with ``split.no`` (u16), ``split.tensors.count`` (i32),
``split.count`` (u16) — in that order, as gguf-split's remove-then-append leaves them.  Differences from
gguf-split, only where gguf-split would write a broken file or fail: a tensor larger than the limit gets a
shard of its own, and with a non-default alignment every shard carries ``general.alignment``.
Writing a *single* file from metadata whose ``split.count`` is above 1 (e.g. the first shard of a split
model) does what ``gguf-split --merge`` does: ``split.count`` becomes 0 (moved to the end), so llama.cpp
does not look for other shards.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import GGUFError, WriteError
from ..safeio import AtomicFiles, check_outputs
from ..types import GGMLType, TYPES, type_info
from .. import interop
from . import split as _split
from .values import MAX_ARRAY_NESTING, SCALAR_DTYPES, GGUFValueType, Metadata, Value, to_value, typed_items

__all__ = ["GGUFWriter", "write", "write_shards", "TensorSpec", "ShardPlan", "Value", "GGUFValueType",
           "parse_size", "DEFAULT_ALIGNMENT"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
MAX_NAME = 64  # GGML_MAX_NAME: names must be shorter (the C struct keeps a NUL)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING_LENGTH = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ELEMENTS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
KEY_ALIGNMENT = "general.alignment"
CHUNK_BYTES = 16 << 20  # size of the pieces arrays and mapped tensors are written in
_INT64_MAX = (1 << 63) - 1
_SIZE_MAX = (1 << 64) - 1
_SPLIT_KEYS = (_split.KEY_SPLIT_NO, _split.KEY_SPLIT_COUNT, _split.KEY_SPLIT_TENSORS_COUNT)

_VT = GGUFValueType
_SCALAR_FMT = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
}

# Default ggml type of an array's dtype (the element dtypes of the type table's unquantized rows).
_DTYPE_TYPES = {
    np.dtype(np.float32): GGMLType.F32,
    np.dtype(np.float16): GGMLType.F16,
    np.dtype(np.float64): GGMLType.F64,
    np.dtype(np.int8): GGMLType.I8,
    np.dtype(np.int16): GGMLType.I16,
    np.dtype(np.int32): GGMLType.I32,
    np.dtype(np.int64): GGMLType.I64,
}


def _is_bfloat16(dt: np.dtype) -> bool:
    return dt.name == "bfloat16" and dt.itemsize == 2  # ml_dtypes.bfloat16


# ------------------------------------------------------------------------------------------------------
# Metadata encoding
# ------------------------------------------------------------------------------------------------------
class _Encoder:
    """Encodes typed metadata values in one byte order; errors name the key."""

    def __init__(self, byte_order: str):
        self.bo = byte_order
        self.u64 = struct.Struct(byte_order + "Q").pack
        self.u32 = struct.Struct(byte_order + "I").pack

    def string(self, s, what: str) -> bytes:
        if isinstance(s, (bytes, bytearray, memoryview)):
            b = bytes(s)
            try:
                b.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise WriteError(f"{what}: string is not valid UTF-8 ({exc.reason})") from None
        elif isinstance(s, str):
            try:
                b = s.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise WriteError(f"{what}: string cannot be encoded as UTF-8 ({exc.reason})") from None
        else:
            raise WriteError(f"{what}: expected a str for a STRING value, got {type(s).__name__}")
        if len(b) > MAX_STRING_LENGTH:
            raise WriteError(f"{what}: string of {len(b)} bytes is longer than the limit {MAX_STRING_LENGTH}")
        return self.u64(len(b)) + b

    def value(self, typed: Value, what: str) -> bytes:
        """Type tag + payload of a top-level value."""
        vt = self._vtype(typed.type, what)
        if vt == _VT.ARRAY:
            return self.u32(int(_VT.ARRAY)) + self.array(typed, what, 0)
        return self.u32(int(vt)) + self.scalar(vt, typed.value, what)

    @staticmethod
    def _vtype(t, what: str) -> GGUFValueType:
        try:
            return GGUFValueType(int(t))
        except (ValueError, TypeError):
            raise WriteError(f"{what}: unknown GGUF value type {t!r} (valid: 0..12)") from None

    def scalar(self, vt: GGUFValueType, v, what: str) -> bytes:
        if vt == _VT.STRING:
            return self.string(v, what)
        if vt == _VT.BOOL:
            if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and int(v) in (0, 1)):
                return b"\x01" if v else b"\x00"
            raise WriteError(f"{what}: {v!r} is not a BOOL (True/False)")
        fmt = _SCALAR_FMT.get(vt)
        if fmt is None:
            raise WriteError(f"{what}: value type {vt.name} is not a scalar type")
        if fmt in "fd":
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
                raise WriteError(f"{what}: {v!r} is not a number for a {vt.name} value")
        elif not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            raise WriteError(f"{what}: {v!r} is not an integer for a {vt.name} value")
        try:
            return struct.pack(self.bo + fmt, v)
        except (struct.error, OverflowError):
            raise WriteError(f"{what}: {v!r} does not fit a {vt.name} value") from None

    def array(self, typed: Value, what: str, depth: int) -> bytes:
        """Element type + count + elements (the part after the ARRAY tag; also the inner-array encoding)."""
        if depth > MAX_ARRAY_NESTING:
            raise WriteError(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        et = self._vtype(typed.element_type, what)
        items = typed.value
        if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
            raise WriteError(f"{what}: an ARRAY value needs a sequence, got {type(items).__name__}")
        n = len(items)
        if n > MAX_ARRAY_ELEMENTS:
            raise WriteError(f"{what}: array of {n} elements exceeds the limit {MAX_ARRAY_ELEMENTS}")
        head = self.u32(int(et)) + self.u64(n)
        if et == _VT.STRING:
            u64 = self.u64
            try:  # the fast path for tokenizer vocabularies
                return head + b"".join([u64(len(b)) + b for b in (s.encode("utf-8") for s in items)])
            except (AttributeError, UnicodeEncodeError):
                pass
            return head + b"".join(self.string(s, f"element {j} of {what}") for j, s in enumerate(items))
        if et == _VT.ARRAY:
            parts = [head]
            for j, item in enumerate(items):
                inner = item if isinstance(item, Value) else to_value(item, what)
                if inner.type != _VT.ARRAY:
                    raise WriteError(f"element {j} of {what}: an ARRAY of ARRAYs holds arrays, not {inner.type.name}")
                parts.append(self.array(inner, f"element {j} of {what}", depth + 1))
            return b"".join(parts)
        if et == _VT.BOOL:
            arr = np.asarray(items) if n else np.zeros(0, np.bool_)
            if arr.ndim != 1 or (n and not (arr.dtype == np.bool_ or (arr.dtype.kind in "iu"
                                                                        and np.isin(arr, (0, 1)).all()))):
                raise WriteError(f"{what}: a BOOL array must hold True/False values")
            return head + arr.astype(np.uint8).tobytes()
        return head + self._numeric(et, items, n, what)

    def _numeric(self, et: GGUFValueType, items, n: int, what: str) -> bytes:
        target = SCALAR_DTYPES[et]
        if n == 0:
            return b""
        if isinstance(items, np.ndarray):
            arr = items
        else:
            try:
                arr = np.asarray(items)
            except (ValueError, OverflowError, TypeError):
                raise WriteError(f"{what}: cannot make a {et.name} array of these values") from None
            if arr.dtype == object and target.kind in "iu":  # Python ints beyond int64
                arr = np.asarray([int(v) for v in items], dtype=object)
        if arr.ndim != 1:
            raise WriteError(f"{what}: a {et.name} array must be 1-D, got shape {arr.shape}")
        kind = arr.dtype.kind
        if target.kind in "iu":
            if kind == "b" or kind not in "iuO":
                raise WriteError(f"{what}: {arr.dtype} values in a {et.name} array (integers expected)")
            info = np.iinfo(target)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise WriteError(f"{what}: values [{lo}, {hi}] do not fit {et.name} [{info.min}, {info.max}]")
            out = arr.astype(target.newbyteorder(self.bo))
        else:
            if kind not in "iuf":
                raise WriteError(f"{what}: {arr.dtype} values in a {et.name} array (numbers expected)")
            out = arr.astype(target.newbyteorder(self.bo))
            if kind == "f" and (np.isinf(out) & np.isfinite(arr)).any():
                raise WriteError(f"{what}: a value overflows {et.name}")
        return out.tobytes()


# ------------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------------
@dataclass
class TensorSpec:
    """One tensor to write: ``name``, numpy-order ``shape``, ``ggml_type``, the producer of its bytes
    (``data``, see the module docstring) and its exact byte size ``nbytes`` (from the type table).

    >>> TensorSpec.make("w", np.zeros((2, 32), np.float32)).nbytes
    256
    """

    name: str
    shape: tuple
    ggml_type: GGMLType
    data: Any
    nbytes: int

    @classmethod
    def make(cls, name, data, *, shape=None, ggml_type=None, nbytes=None) -> "TensorSpec":
        """Infer what is not given (type from the dtype, shape from the array), then check it all."""
        what = f"tensor {name!r}"
        if not isinstance(name, str):
            raise WriteError(f"tensor names must be str, got {type(name).__name__} {name!r}")
        if data is None:
            raise WriteError(f"{what}: no data given")
        data, ggml_type = _foreign_data(data, ggml_type, what)
        if ggml_type is None and shape is None and _is_tensor_info(data):
            shape, ggml_type = tuple(data.shape), data.ggml_type
        if isinstance(data, np.ndarray):
            if data.dtype.hasobject:
                raise WriteError(f"{what}: cannot write an array of Python objects ({data.dtype})")
            dt = data.dtype.newbyteorder("=") if data.dtype.byteorder in "<>" else data.dtype
            implied = _DTYPE_TYPES.get(dt, GGMLType.BF16 if _is_bfloat16(dt) else None)  # F32 is 0: no `or`
            if ggml_type is None:
                if implied is None:
                    raise WriteError(f"{what}: a {data.dtype} array needs an explicit ggml_type (only float32, "
                                     f"float16, float64, bfloat16 and int8..int64 imply one)")
                ggml_type = implied
            info = _type(ggml_type, what)
            if implied is not None and implied != info.ggml_type:
                raise WriteError(f"{what}: a {data.dtype} array cannot be written as {info.name} "
                                 f"(convert or quantize it first, e.g. gguf_kquant.quantize)")
            if shape is None:
                if implied is not None:
                    shape = data.shape
                else:  # raw bytes of shape (..., row_bytes): elements per row from the type table
                    nb = data.dtype.itemsize * (data.shape[-1] if data.ndim else 1)
                    if data.ndim == 0 or nb % info.type_size:
                        raise WriteError(f"{what}: cannot infer the shape of {info.name} data from a byte array of "
                                         f"shape {data.shape}; pass shape=")
                    shape = data.shape[:-1] + (nb // info.type_size * info.block_size,)
        if ggml_type is None or shape is None:
            raise WriteError(f"{what}: pass shape= and ggml_type= for {type(data).__name__} data")
        info = _type(ggml_type, what)
        shape = _check_shape(shape, info, what)
        size = info.nbytes(shape)
        if size > _SIZE_MAX:
            raise WriteError(f"{what}: shape {shape} has a byte size above 2**64-1")
        if nbytes is not None and int(nbytes) != size:
            raise WriteError(f"{what}: nbytes={nbytes} but a {info.name} tensor of shape {shape} takes {size} bytes")
        known = _known_size(data)
        if known is not None and known != size:
            raise WriteError(f"{what}: the data holds {known} bytes but a {info.name} tensor of shape {shape} "
                             f"takes {size} bytes")
        return cls(name, shape, info.ggml_type, data, size)


def _foreign_data(data, ggml_type, what: str) -> tuple:
    """gguf-py ReaderTensors, torch tensors and DLPack/``__array__`` objects as data we write
    (:mod:`gguf_kquant.interop`): (data, ggml_type) — bfloat16 becomes its bit patterns, typed BF16."""
    if interop.is_reader_tensor(data):
        return interop.ReaderTensorSource(data), ggml_type
    if not interop.is_array_like(data) or _is_tensor_info(data):
        return data, ggml_type
    try:
        if interop.is_bfloat16(data) and (ggml_type is None or _type(ggml_type, what).ggml_type == GGMLType.BF16):
            return interop.as_numpy(data, bf16_bits=True), GGMLType.BF16
        return interop.as_numpy(data), ggml_type
    except WriteError:
        raise
    except GGUFError as exc:
        raise WriteError(f"{what}: {exc}") from None


def _is_tensor_info(obj) -> bool:
    return hasattr(obj, "raw") and hasattr(obj, "ggml_type") and hasattr(obj, "shape") and hasattr(obj, "offset")


def _known_size(data) -> Optional[int]:
    if isinstance(data, np.ndarray):
        return data.nbytes
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(data, memoryview):
        return data.nbytes
    if _is_tensor_info(data):
        return int(data.nbytes)
    return None


def _type(t, what: str):
    try:
        return type_info(t)
    except GGUFError as exc:
        raise WriteError(f"{what}: {exc}") from None


def _check_shape(shape, info, what: str) -> tuple:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise WriteError(f"{what}: shape {shape!r} is not a sequence of integers") from None
    if len(dims) > MAX_DIMS:
        raise WriteError(f"{what}: {len(dims)} dimensions {dims}; ggml allows at most {MAX_DIMS}")
    if any(d < 0 or d > _INT64_MAX for d in dims):
        raise WriteError(f"{what}: dimension out of range [0, 2**63-1] in shape {dims}")
    ne = dims[::-1]
    current = ne[0] if ne else 1  # ggml's overflow check on the element count
    for d in ne[1:]:
        if d > 1 and _INT64_MAX // d < current:
            raise WriteError(f"{what}: shape {dims} has more than 2**63-1 elements")
        current *= d
    ne0 = ne[0] if ne else 1
    if ne0 % info.block_size:
        raise WriteError(f"{what}: row length {ne0} (shape[-1]) is not a multiple of {info.name}'s block size "
                         f"{info.block_size}")
    return dims


# Producers: everything becomes an iterator of uint8 memoryviews in file byte order.
def _array_chunks(arr: np.ndarray, byte_order: str) -> Iterator[memoryview]:
    """Numeric arrays (float32, int16, ...) are converted to the file's byte order; any other dtype is
    raw file bytes and written as it is in memory."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    dt = flat.dtype
    numeric = dt.kind in "iuf" or _is_bfloat16(dt.newbyteorder("=") if dt.byteorder in "<>" else dt)
    order = {"=": "<" if np.little_endian else ">", "|": byte_order}.get(dt.byteorder, dt.byteorder)
    swap = numeric and dt.itemsize > 1 and order != byte_order
    step = max(1, CHUNK_BYTES // max(dt.itemsize, 1))
    for i in range(0, flat.size, step):
        piece = flat[i:i + step]
        if swap:
            piece = piece.byteswap()
        yield memoryview(piece.view(np.uint8))


def _bytes_chunks(buf) -> Iterator[memoryview]:
    mv = memoryview(buf).cast("B")
    for i in range(0, mv.nbytes, CHUNK_BYTES):
        yield mv[i:i + CHUNK_BYTES]


def _tensor_info_chunks(t, byte_order: str) -> Iterator[memoryview]:
    # The reader's chunks() are whole blocks read with pread: a source file that shrinks while it is copied
    # raises FileChangedError naming it, where touching the map would kill the process with SIGBUS.
    pieces = t.chunks(CHUNK_BYTES) if hasattr(t, "chunks") else _bytes_chunks(t.raw())
    src = getattr(t, "byte_order", "<")
    if src == byte_order:
        for piece in pieces:
            yield memoryview(piece).cast("B")
        return
    info = TYPES[GGMLType(int(t.ggml_type))]
    dt = info.block_dtype
    if dt.fields is None and dt.itemsize == 1:
        yield from (memoryview(piece).cast("B") for piece in pieces)
        return
    for piece in pieces:
        blocks = np.frombuffer(piece, np.uint8).view(dt.newbyteorder(src))
        yield memoryview(blocks.astype(dt.newbyteorder(byte_order)).view(np.uint8))


def _chunks(data, byte_order: str, what: str, depth: int = 0) -> Iterator:
    if isinstance(data, np.ndarray):
        return _array_chunks(data, byte_order)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _bytes_chunks(data)
    if _is_tensor_info(data):
        return _tensor_info_chunks(data, byte_order)
    if callable(data) and depth == 0:
        return _chunks(data(), byte_order, what, 1)
    if hasattr(data, "__iter__") and not isinstance(data, (str, dict)):
        return _iter_chunks(iter(data), byte_order, what)
    raise WriteError(f"{what}: cannot write data of type {type(data).__name__} (expected an array, bytes, "
                     f"a TensorInfo, a callable or an iterator of chunks)")


def _iter_chunks(it: Iterator, byte_order: str, what: str) -> Iterator[memoryview]:
    for chunk in it:
        if isinstance(chunk, np.ndarray):
            yield from _array_chunks(chunk, byte_order)
        elif isinstance(chunk, (bytes, bytearray, memoryview)):
            try:
                yield memoryview(chunk).cast("B")
            except TypeError:  # a non-contiguous memoryview
                yield memoryview(bytes(chunk))
        else:
            raise WriteError(f"{what}: the producer yielded a {type(chunk).__name__}, not bytes or an array")


# ------------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------------
@dataclass
class ShardPlan:
    """Everything about one output file, decided before a byte is written.

    ``offsets[i]`` is tensor i's offset relative to ``data_offset`` (absolute start of the data section);
    ``file_size`` is the final size.
    """

    path: Path
    metadata: list  # [(key, Value)] in file order
    tensors: list  # [TensorSpec]
    alignment: int
    header: bytes = b""  # magic .. tensor infos, padded to the alignment
    offsets: list = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0


def _pad(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def _encode_header(plan: ShardPlan, version: int, byte_order: str) -> None:
    enc = _Encoder(byte_order)
    bo = byte_order
    parts = [GGUF_MAGIC, struct.pack(bo + "IqQ", version, len(plan.tensors), len(plan.metadata))]
    for key, typed in plan.metadata:
        parts.append(enc.string(key, f"metadata key {key!r}"))
        parts.append(enc.value(typed, f"metadata key {key!r}"))
    offsets, off = [], 0
    for t in plan.tensors:
        ne = t.shape[::-1]
        parts.append(enc.string(t.name, f"tensor {t.name!r}"))
        parts.append(struct.pack(f"{bo}I{len(ne)}qiQ", len(ne), *ne, int(t.ggml_type), off))
        offsets.append(off)
        off = _pad(off + t.nbytes, plan.alignment)
    head = b"".join(parts)
    plan.header = head + b"\0" * (-len(head) % plan.alignment)
    plan.offsets = offsets
    plan.data_offset = len(plan.header)
    plan.file_size = plan.data_offset + off


def _alignment_of(pairs, alignment: Optional[int]) -> tuple:
    """(alignment, pairs) — the alignment from ``general.alignment``, checked, or from the option."""
    d = dict(pairs)
    if KEY_ALIGNMENT in d:
        typed = d[KEY_ALIGNMENT]
        if typed.type != _VT.UINT32:
            raise WriteError(f"metadata key {KEY_ALIGNMENT!r} must be UINT32 (llama.cpp rejects {typed.type.name})")
        a = typed.value
        if not isinstance(a, (int, np.integer)) or a <= 0 or a & (a - 1) or a >= 1 << 32:
            raise WriteError(f"metadata key {KEY_ALIGNMENT!r}: {a!r} is not a power of two")
        if alignment is not None and int(alignment) != int(a):
            raise WriteError(f"alignment={alignment} disagrees with {KEY_ALIGNMENT}={a}")
        return int(a), pairs
    if alignment is None or int(alignment) == DEFAULT_ALIGNMENT:
        return DEFAULT_ALIGNMENT, pairs
    a = alignment
    if not isinstance(a, (int, np.integer)) or a <= 0 or a & (a - 1) or a >= 1 << 32:
        raise WriteError(f"alignment {a!r} is not a power of two below 2**32")
    return int(a), list(pairs) + [(KEY_ALIGNMENT, Value(int(a), _VT.UINT32))]


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([MG]?)\s*$", re.IGNORECASE)


def parse_size(size, what: str = "split_max_size", error=WriteError) -> int:
    """Bytes of a size such as ``split_max_size``: an int, or a string with gguf-split's decimal units.
    ``what`` names the argument in the ``error`` raised for anything else.

    >>> parse_size("500M"), parse_size("2G"), parse_size(1024)
    (500000000, 2000000000, 1024)
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        n = int(size)
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise error(f"{what} {size!r}: expected bytes or a number with M or G (e.g. '500M', '2G')")
        n = int(m.group(1)) * {"": 1, "M": 1000**2, "G": 1000**3}[m.group(2).upper()]
    if n <= 0:
        raise error(f"{what} {size!r}: size must be a positive value")
    return n


def _split_prefix(path: Path) -> str:
    s = str(path)
    return s[:-5] if s.endswith(".gguf") else s


def _partition(tensors: list, alignment: int, max_size: Optional[int], max_tensors: Optional[int]) -> list:
    """gguf-split's split_strategy: [[TensorSpec]] per shard."""
    shards, cur, cur_size = [], [], 0
    for i, t in enumerate(tensors):
        n = _pad(t.nbytes, alignment)
        new = bool(cur) and (
            (max_tensors is not None and i % max_tensors == 0)
            or (max_size is not None and cur_size + n > max_size))
        if new:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(t)
        cur_size += n
    shards.append(cur)
    return shards


# ------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------
def _write_one(fh, plan: ShardPlan, byte_order: str) -> None:
    fh.write(plan.header)
    if fh.tell() != plan.data_offset:
        raise WriteError(f"{plan.path}: header ends at {fh.tell()}, planned {plan.data_offset}")
    for t, off in zip(plan.tensors, plan.offsets):
        what = f"{plan.path}: tensor {t.name!r}"
        written = 0
        for chunk in _chunks(t.data, byte_order, what):
            n = chunk.nbytes
            if written + n > t.nbytes:
                raise WriteError(f"{what}: the producer yielded more than the {t.nbytes} bytes of a "
                                 f"{t.ggml_type.name} tensor of shape {t.shape}")
            fh.write(chunk)
            written += n
        chunk = None  # a view of the tensor's data: released before the next producer makes its own
        if written != t.nbytes:
            raise WriteError(f"{what}: the producer yielded {written} bytes; a {t.ggml_type.name} tensor of "
                             f"shape {t.shape} takes {t.nbytes}")
        fh.write(b"\0" * (-written % plan.alignment))
        end = plan.data_offset + _pad(off + t.nbytes, plan.alignment)
        if fh.tell() != end:
            raise WriteError(f"{what}: file position {fh.tell()} after the tensor, planned {end}")
    if fh.tell() != plan.file_size:
        raise WriteError(f"{plan.path}: file size {fh.tell()}, planned {plan.file_size}")


def _source_paths(plans: list) -> list:
    """Files the tensors are copied from (TensorInfo sources): inputs the outputs must not overwrite."""
    return [t.data.path for p in plans for t in p.tensors if _is_tensor_info(t.data) and hasattr(t.data, "path")]


def _write_plans(plans: list, byte_order: str, fsync: bool, *, inputs=(), overwrite: bool = True,
                 side_files=()) -> list:
    """Check the paths, write every plan and side file to a temp file, then rename them all into place
    (:class:`~gguf_kquant.safeio.AtomicFiles`: nothing is replaced on failure or on SIGINT/SIGTERM/SIGHUP)."""
    side_files = list(side_files)
    targets = [p.path for p in plans] + [Path(path) for path, _ in side_files]
    check_outputs(targets, list(inputs) + _source_paths(plans), overwrite=overwrite)
    with AtomicFiles(targets, fsync=fsync) as out:
        for i, plan in enumerate(plans):
            with out.writing(i) as fh:
                _write_one(fh, plan, byte_order)
        for j, (_, make) in enumerate(side_files):
            out.write_bytes(len(plans) + j, make())
        out.commit()
    return [p.path for p in plans]


class GGUFWriter:
    """Collect metadata and tensors, then write them (planned, streamed, atomic) when closed.

    >>> with GGUFWriter("out.gguf", {"general.architecture": "llama"}) as w:      # doctest: +SKIP
    ...     w.add_metadata("llama.block_count", Value(2, GGUFValueType.UINT32))
    ...     w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    ...     w.add_tensor("q", raw_q4k_bytes, shape=(8, 256), ggml_type="Q4_K")
    >>> w.paths                                                                 # doctest: +SKIP
    [PosixPath('out.gguf')]

    ``metadata`` may also be a gguf-py ``GGUFReader``: its fields, tensors, GGUF version and byte order are
    the whole source (a copy is byte-identical to the file it read).

    Nothing is written if the ``with`` block raises.  Options: ``alignment`` (default: ``general.alignment``
    or 32), ``version`` (3, or 2 — same layout, little-endian only; default: a GGUFReader source's, else 3),
    ``byte_order`` (``"<"``, ``">"``, or None: that of a GGUFReader or of the TensorInfo sources, else
    little-endian), ``split_max_size`` / ``split_max_tensors``
    (gguf-split output, see the module docstring), ``fsync`` (default True).

    Safety options (:mod:`gguf_kquant.safeio`): ``inputs`` — paths this job reads, which no output may
    name (the files of TensorInfo sources are added automatically, so ``write(f.path, f.metadata,
    f.tensors)`` is refused); ``overwrite`` — replace existing targets (default True, like ``open(path,
    "wb")``; ``quantize_model`` and ``convert_hf`` default to False); ``side_files`` — ``[(path, make)]``,
    files committed together with the model (``make()`` returns their bytes and is called after the last
    tensor is written, e.g. a report of the tensors' errors).
    """

    def __init__(self, path, metadata=None, *, alignment: Optional[int] = None, version: Optional[int] = None,
                 byte_order: Optional[str] = None, split_max_size=None, split_max_tensors: Optional[int] = None,
                 fsync: bool = True, inputs=(), overwrite: bool = True, side_files=()):
        source_tensors = ()
        if metadata is not None and interop.is_gguf_reader(metadata):  # a gguf-py GGUFReader: the whole file
            try:
                parts = interop.reader_parts(metadata)
            except GGUFError as exc:
                raise WriteError(str(exc)) from None
            metadata, source_tensors = parts["metadata"], parts["tensors"]
            version = parts["version"] if version is None else version
            byte_order = parts["byte_order"] if byte_order is None else byte_order
        version = 3 if version is None else version
        self.path = Path(path)
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.side_files = list(side_files)
        self._plans: Optional[list] = None
        if version not in (2, 3):
            raise WriteError(f"GGUF version {version!r}: only 2 and 3 can be written")
        if byte_order not in (None, "<", ">", "little", "big"):
            raise WriteError(f"byte_order {byte_order!r}: use '<' or '>'")
        self.byte_order = {"little": "<", "big": ">"}.get(byte_order, byte_order)
        if self.byte_order == ">" and version < 3:
            raise WriteError("big-endian files need GGUF version 3")
        self.version = version
        self.alignment = alignment
        self.split_max_size = None if split_max_size is None else parse_size(split_max_size)
        self.split_max_tensors = _positive_int(split_max_tensors, "split_max_tensors")
        self.fsync = fsync
        self._metadata: list = []
        self._keys: set = set()
        self._tensors: list = []
        self._names: set = set()
        self.paths: Optional[list] = None
        if metadata is not None:
            self.add_metadata_from(metadata)
        self.add_tensors(source_tensors)

    # -- collecting
    def add_metadata(self, key: str, value) -> None:
        """Add one key (plain values are typed by :func:`~gguf_kquant.container.values.to_value`)."""
        if not isinstance(key, str) or not key:
            raise WriteError(f"metadata keys must be non-empty str, got {key!r}")
        if key in self._keys:
            raise WriteError(f"duplicate metadata key {key!r}")
        try:
            typed = to_value(value, key)
        except GGUFError as exc:
            raise WriteError(str(exc)) from None
        self._keys.add(key)
        self._metadata.append((key, typed))
        self._plans = None

    def add_metadata_from(self, metadata) -> None:
        """Add every key of a mapping (a reader's ``Metadata`` keeps its types) or of (key, value) pairs;
        gguf-py's ``GGUFReader.fields`` (or the reader itself) too, without its header pseudo-fields."""
        if interop.is_gguf_reader(metadata):
            metadata = metadata.fields
        if (hasattr(metadata, "items") and not isinstance(metadata, Metadata)  # (no decoding of a lazy vocabulary)
                and any(interop.is_reader_field(v) for v in metadata.values())):
            try:
                pairs = interop.reader_field_items(metadata)
            except GGUFError as exc:
                raise WriteError(str(exc)) from None
        else:
            pairs = typed_items(metadata) if hasattr(metadata, "items") else list(metadata)
        for key, value in pairs:
            self.add_metadata(key, value)

    def add_tensor(self, name: str, data, *, shape=None, ggml_type=None, nbytes=None) -> TensorSpec:
        """Add a tensor; ``data`` is produced when the file is written (see the module docstring).

        >>> w.add_tensor("w", np.ones((4, 32), np.float16))                       # doctest: +SKIP
        >>> w.add_tensor("q", lambda: quantize(x, "Q8_0"), shape=x.shape, ggml_type="Q8_0")  # doctest: +SKIP
        """
        spec = TensorSpec.make(name, data, shape=shape, ggml_type=ggml_type, nbytes=nbytes)
        return self._add_spec(spec)

    def _add_spec(self, spec: TensorSpec) -> TensorSpec:
        try:
            n = len(spec.name.encode("utf-8"))
        except UnicodeEncodeError:
            raise WriteError(f"tensor name {spec.name!r} cannot be encoded as UTF-8") from None
        if n >= MAX_NAME:
            raise WriteError(f"tensor name {spec.name!r} is {n} bytes long; llama.cpp allows at most {MAX_NAME - 1}")
        if spec.name in self._names:
            raise WriteError(f"duplicate tensor name {spec.name!r}")
        self._names.add(spec.name)
        self._tensors.append(spec)
        self._plans = None
        return spec

    def add_tensors(self, tensors) -> None:
        """Add many: a mapping name -> data, or an iterable of TensorInfo, TensorSpec, ``(name, data)`` or
        ``(name, shape, ggml_type, data)``."""
        if hasattr(tensors, "items") and not isinstance(tensors, (list, tuple)):
            for name, data in tensors.items():
                if isinstance(data, TensorSpec):
                    self._add_spec(TensorSpec.make(name, data.data, shape=data.shape, ggml_type=data.ggml_type))
                else:
                    self.add_tensor(name, data)
            return
        if interop.is_gguf_reader(tensors):
            tensors = tensors.tensors
        for item in tensors:
            if interop.is_reader_tensor(item):
                item = interop.ReaderTensorSource(item)
            if isinstance(item, TensorSpec):
                self._add_spec(TensorSpec.make(item.name, item.data, shape=item.shape, ggml_type=item.ggml_type,
                                               nbytes=item.nbytes))
            elif _is_tensor_info(item):
                self.add_tensor(item.name, item)
            elif isinstance(item, tuple) and len(item) == 2:
                self.add_tensor(item[0], item[1])
            elif isinstance(item, tuple) and len(item) == 4:
                name, shape, ggml_type, data = item
                self.add_tensor(name, data, shape=shape, ggml_type=ggml_type)
            else:
                raise WriteError(f"cannot add {type(item).__name__} {item!r:.80} as a tensor (expected a "
                                 f"TensorInfo, TensorSpec, (name, data) or (name, shape, ggml_type, data))")

    # -- planning and writing
    def _resolved_byte_order(self) -> str:
        if self.byte_order is not None:
            return self.byte_order
        orders = {getattr(t.data, "byte_order", None) for t in self._tensors if _is_tensor_info(t.data)}
        return orders.pop() if len(orders) == 1 else "<"

    def plan(self) -> list:
        """The :class:`ShardPlan` of every output file (validates everything; writes nothing)."""
        if self._plans is None:
            self._plans = self._make_plans()
        return self._plans

    def output_paths(self) -> list:
        """Every path :meth:`close` will write: the GGUF file(s), then the side files."""
        return [p.path for p in self.plan()] + [Path(path) for path, _ in self.side_files]

    def _make_plans(self) -> list:
        bo = self._resolved_byte_order()
        alignment, pairs = _alignment_of(self._metadata, self.alignment)
        split = self.split_max_size is not None or self.split_max_tensors is not None
        if not split:
            pairs = _merged_split_keys(pairs)
            plans = [ShardPlan(self.path, pairs, list(self._tensors), alignment)]
        else:
            groups = _partition(self._tensors, alignment, self.split_max_size, self.split_max_tensors)
            count = len(groups)
            if count > 0xFFFF:
                raise WriteError(f"{count} shards; split.count is a u16")
            total = len(self._tensors)
            if total > 0x7FFFFFFF:
                raise WriteError(f"{total} tensors; split.tensors.count is an i32")
            base = [(k, v) for k, v in pairs if k not in _SPLIT_KEYS]
            prefix = _split_prefix(self.path)
            plans = []
            for i, group in enumerate(groups):
                md = list(base) if i == 0 else (
                    [] if alignment == DEFAULT_ALIGNMENT else [(KEY_ALIGNMENT, Value(alignment, _VT.UINT32))])
                md += [(_split.KEY_SPLIT_NO, Value(i, _VT.UINT16)),
                       (_split.KEY_SPLIT_TENSORS_COUNT, Value(total, _VT.INT32)),
                       (_split.KEY_SPLIT_COUNT, Value(count, _VT.UINT16))]
                group = [_ggml_n_dims(t) for t in group]
                plans.append(ShardPlan(_split.shard_path(prefix, i, count), md, group, alignment))
        for p in plans:
            _encode_header(p, self.version, bo)
        return plans

    def close(self) -> list:
        """Plan and write every file; returns their paths.  Calling it again does nothing."""
        if self.paths is None:
            plans = self.plan()
            self.paths = _write_plans(plans, self._resolved_byte_order(), self.fsync, inputs=self.inputs,
                                      overwrite=self.overwrite, side_files=self.side_files)
        return self.paths

    def __enter__(self) -> "GGUFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def _positive_int(n, what: str) -> Optional[int]:
    if n is None:
        return None
    if isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and n >= 1:
        return int(n)
    raise WriteError(f"{what} {n!r} must be a positive integer")


def _ggml_n_dims(t: TensorSpec) -> TensorSpec:
    """gguf-split rewrites tensor infos with ggml's ``ggml_n_dims``: trailing ne of 1 (leading numpy dims)
    are dropped, at least one dim kept."""
    shape = tuple(t.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    if not shape:
        shape = (1,)
    return t if shape == tuple(t.shape) else TensorSpec(t.name, shape, t.ggml_type, t.data, t.nbytes)


def _merged_split_keys(pairs: list) -> list:
    d = dict(pairs)
    typed = d.get(_split.KEY_SPLIT_COUNT)
    if typed is None or not isinstance(typed.value, (int, np.integer)) or typed.value <= 1:
        return pairs
    # gguf-split --merge: gguf_set_val_u16(split.count, 0) removes the key and appends it.
    return [(k, v) for k, v in pairs if k != _split.KEY_SPLIT_COUNT] + [
        (_split.KEY_SPLIT_COUNT, Value(0, _VT.UINT16))]


def write(path, metadata=None, tensors=(), **options) -> list:
    """Write a GGUF file (or gguf-split shards) in one call; returns the paths written.

    ``metadata``: a mapping (a reader's ``Metadata`` keeps its GGUF types) or (key, value) pairs;
    ``tensors``: anything :meth:`GGUFWriter.add_tensors` takes; ``options``: those of :class:`GGUFWriter`.

    >>> with gguf_kquant.open("in.gguf") as f:                                   # doctest: +SKIP
    ...     gguf_kquant.write("copy.gguf", f.metadata, f.tensors)
    [PosixPath('copy.gguf')]
    """
    w = GGUFWriter(path, metadata, **options)
    w.add_tensors(tensors)
    return w.close()


def write_shards(files, *, alignment: Optional[int] = None, version: int = 3, byte_order: str = "<",
                 fsync: bool = True, inputs=(), overwrite: bool = True, side_files=()) -> list:
    """Write several files with explicit per-file metadata and tensors, all or nothing.

    ``files``: [(path, metadata, tensors)].  No ``split.*`` keys are added or changed (for callers such as
    llama-quantize's ``--keep-split``, which decide them).  Temp files are renamed only after all are written.
    ``inputs``, ``overwrite``, ``side_files``: as for :class:`GGUFWriter`.
    """
    plans = []
    names: dict = {}
    for path, metadata, tensors in files:
        w = GGUFWriter(path, metadata, alignment=alignment, version=version, byte_order=byte_order, fsync=fsync)
        w.add_tensors(tensors)
        for t in w._tensors:
            if t.name in names:
                raise WriteError(f"tensor {t.name!r} is in both {names[t.name]} and {path}")
            names[t.name] = path
        alignment_, pairs = _alignment_of(w._metadata, alignment)
        plan = ShardPlan(Path(path), pairs, list(w._tensors), alignment_)
        _encode_header(plan, version, w._resolved_byte_order())
        plans.append(plan)
    if not plans:
        raise WriteError("write_shards: no files given")
    return _write_plans(plans, w._resolved_byte_order(), fsync, inputs=inputs, overwrite=overwrite,
                        side_files=side_files)
