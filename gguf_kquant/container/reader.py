"""Memory-mapped, lazy, strict GGUF reader (GGUF v2 and v3, little- and big-endian, split models).

>>> import gguf_kquant
>>> with gguf_kquant.open("fixtures/tiny-llama-f16.gguf") as f:            # doctest: +SKIP
...     f.metadata["general.architecture"], f.tensors["output.weight"].shape
('llama', (1024, 256))

Opening maps the file and parses only the header; tensor data is touched when ``raw()``/``numpy()`` is
called.  String arrays longer than :data:`LAZY_STRING_ARRAY` elements (a tokenizer's 262,144 tokens and
merges) are *walked* at open time — only their length prefixes are read, to find where the next field
starts — and decoded on first access of the key, so that opening a big-vocabulary model takes about as long
as ggml's C parser.

Validation (at least as strict as ggml's ``gguf_init_from_file_impl``; every violation raises a
:class:`~gguf_kquant.errors.GGUFError` subclass whose message starts with ``"<file>: offset <n>: "``):

* magic ``GGUF``; version 2 or 3, read little-endian; a version whose low 16 bits are zero is read again
  big-endian (that is how ggml tells the byte order) and the whole file is then big-endian;
* tensor and key-value counts non-negative and small enough that each entry could fit in the file;
* strings at most 1 GiB (``GGUF_MAX_STRING_LENGTH``), arrays at most 2**30 elements
  (``GGUF_MAX_ARRAY_ELEMENTS``), and no declared size larger than the bytes left in the file — a count of
  2**62 fails before anything is allocated;
* value types 0..12; keys non-empty, unique, valid UTF-8; string values valid UTF-8 (strict, like gguf-py;
  for lazily decoded arrays the error is raised on first access); BOOL bytes 0 or 1 (ggml reads any non-zero
  byte as true — we refuse, because such a file cannot be reproduced byte for byte);
* arrays of arrays are accepted (gguf-py writes them; ggml rejects them), nested at most
  :data:`MAX_ARRAY_NESTING` deep;
* ``general.alignment``, if present, a UINT32 power of two;
* tensor names unique, valid UTF-8, shorter than 64 bytes (``GGML_MAX_NAME``); at most 4 dims
  (``GGML_MAX_DIMS``); every ``ne >= 0``; element count and byte size representable as ggml checks them
  (int64 / size_t, computed with Python ints so nothing wraps); ``ne0`` a multiple of the type's block size;
* each tensor's offset equal to the running sum of the padded sizes of the tensors before it (ggml requires
  exactly that: aligned, in order, no gap, no overlap), and its data inside the file.
* the parsed header may take at most ``max(64 MiB, 8 x the file size)`` of memory (each key, tensor, array
  and string is charged before it is built), so a small file of millions of tiny entries is refused with
  :class:`~gguf_kquant.errors.LimitExceededError` instead of taking gigabytes (:data:`HEADER_MEMORY_MIN`,
  :data:`HEADER_MEMORY_FACTOR`); long string arrays decoded lazily are charged nothing until accessed.

Inputs that are not files, or change: a FIFO, directory, socket or device is refused when opened, without
blocking (:class:`~gguf_kquant.errors.GGUFIOError`, which is also an ``OSError`` with the errno).  Reading
through a memory map a file that another program truncated raises SIGBUS, which no Python code can catch; so
``numpy()``, ``read()`` and ``chunks()`` read tensor bytes with ``pread`` (a short read raises
:class:`~gguf_kquant.errors.FileChangedError`), and ``raw()``, lazily decoded metadata and ``peek`` check the
file's size with ``fstat`` before touching the map.  What remains: a ``raw()`` view still being read when the
file is truncated, and a truncation during ``open()``'s own header parse (a window of milliseconds), can
still raise SIGBUS — use ``chunks()`` to copy tensors from files that may change.  A file *replaced* (renamed
over) while open is safe: the open descriptor and map keep the old contents.

Tensor type ids: ids ggml removed (4, 5, 31-33, 36-38) and negative ids are rejected like ggml does.  An id
above the last one we know (42) — a type newer than this library — is *listed* (``ggml_type`` is then the
plain int) instead of failing the whole file; its size cannot be computed, so its ``nbytes`` is the span up
to the next tensor's offset (or to the end of the file for the last tensor) — an upper bound that includes
alignment padding — and ``nbytes_exact`` is False.  Offsets around such a tensor are checked for alignment
and order only.  Asking for its values (``numpy()``) raises :class:`~gguf_kquant.errors.UnknownTypeError`.
Ids of 1024 and above are rejected as corrupt.

Split models (``<prefix>-00001-of-0000N.gguf``, gguf-split's ``split.no``/``split.count``/
``split.tensors.count`` keys): opening the first shard opens the whole model.  ``tensors`` lists the tensors
of all shards in shard order (each :class:`TensorInfo` knows its ``path``); ``metadata`` is the first
shard's, *including* its ``split.*`` keys (it is exactly what that file holds, so that it can be rewritten
byte for byte — drop ``split.*`` when writing a merged single file); ``shards`` lists the shard paths.
Opening a later shard raises :class:`~gguf_kquant.errors.SplitError` unless ``split=False``.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from ..errors import (
    BadMagicError,
    DuplicateError,
    FileChangedError,
    GGUFIOError,
    LimitExceededError,
    MalformedFileError,
    SplitError,
    TruncatedFileError,
    UnknownTypeError,
    UnsupportedVersionError,
)
from ..types import TYPES, GGMLType
from . import split as _split
from .values import MAX_ARRAY_NESTING, SCALAR_DTYPES, GGUFValueType, Metadata, Value

__all__ = ["open_gguf", "GGUFFile", "TensorInfo", "TensorList", "LazyMetadata"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
MAX_STRING_LENGTH = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ELEMENTS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME (names must be shorter: the C struct keeps a NUL)
MAX_TYPE_ID = 1023  # ours: type ids above the ones we know but below this are "newer than us"
LAZY_STRING_ARRAY = 64  # string arrays longer than this are decoded on first access
REMOVED_TYPE_IDS = frozenset({4, 5, 31, 32, 33, 36, 37, 38})
_INT64_MAX = (1 << 63) - 1
_LITTLE_ENDIAN = sys.byteorder == "little"
_SIZE_MAX = (1 << 64) - 1

_VT = GGUFValueType
_SCALAR_FMT = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.BOOL: "B", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
# Smallest possible encoding of one key-value pair (key length, type, 1-byte value) and of one tensor info
# (empty name, n_dims, type, offset): used to reject absurd counts before looping over them.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
# Memory the parsed header may take: a file whose header would need more (millions of tiny keys, tensors or
# nested arrays, each a few bytes in the file but hundreds as Python objects) is refused before it is
# built.  Costs are measured upper bounds (CPython 3.11, tracemalloc) of what each parsed item holds.
HEADER_MEMORY_MIN = 64 << 20
HEADER_MEMORY_FACTOR = 8  # times the file size
_COST_KV, _COST_ARRAY, _COST_STRING, _COST_TENSOR = 320, 400, 80, 480


# ------------------------------------------------------------------------------------------------------
# Metadata with lazily decoded string arrays
# ------------------------------------------------------------------------------------------------------
class _Pending:
    """Placeholder for a string array not decoded yet (what C-level ``dict`` access would see)."""

    __slots__ = ("count", "decode", "start", "end")

    def __init__(self, count: int, decode: Callable[[], list], start: int, end: int):
        self.count, self.decode, self.start, self.end = count, decode, start, end

    def __repr__(self):
        return f"<{self.count} strings, not decoded yet>"

    def detach(self) -> None:
        self.decode.detach()


class LazyMetadata(Metadata):
    """:class:`~gguf_kquant.container.values.Metadata` whose long string arrays decode on first access.

    Behaves as a plain ``Metadata``: ``m[key]``, ``m.get``, ``m.typed``, ``items()``, ``values()``,
    ``==``, ``dict(m)``, ``json.dumps(m)``, copying — all see decoded lists.  Only code that bypasses the
    mapping protocol (``dict.__getitem__(m, key)``) can see the placeholder.
    """

    def __init__(self):
        super().__init__()
        self._pending: dict[str, _Pending] = {}

    # -- the reader's entry points
    def _set_pending(self, key: str, pending: _Pending) -> None:
        dict.__setitem__(self, key, pending)
        self._pending[key] = pending

    def _resolve(self, key: str) -> None:
        pending = self._pending.get(key)
        if pending is not None:
            values = pending.decode()
            del self._pending[key]
            Metadata.set_typed(self, key, Value(values, _VT.ARRAY, _VT.STRING), values)

    def _resolve_all(self) -> None:
        for key in list(self._pending):
            self._resolve(key)

    def is_decoded(self, key: str) -> bool:
        """False while ``key`` is a string array that has not been decoded yet."""
        return key not in self._pending

    # -- mapping protocol
    def __getitem__(self, key):
        if key in self._pending:
            self._resolve(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def typed(self, key: str) -> Value:
        if key in self._pending:
            self._resolve(key)
        return Metadata.typed(self, key)

    def __iter__(self) -> Iterator[str]:
        # Overriding __iter__ makes dict(m) / {**m} go through keys() and __getitem__.
        return dict.__iter__(self)

    def items(self):
        self._resolve_all()
        return dict.items(self)

    def values(self):
        self._resolve_all()
        return dict.values(self)

    def __setitem__(self, key, value):
        self._pending.pop(key, None)
        super().__setitem__(key, value)

    def set_typed(self, key, typed, plain_value):
        self._pending.pop(key, None)
        super().set_typed(key, typed, plain_value)

    def __delitem__(self, key):
        if self._pending.pop(key, None) is not None:
            dict.__delitem__(self, key)
        else:
            super().__delitem__(key)

    def pop(self, key, *default):
        if key in self._pending:
            self._resolve(key)
        return super().pop(key, *default)

    def popitem(self):
        self._resolve_all()
        key, value = dict.popitem(self)
        self._typed.pop(key, None)
        return key, value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __eq__(self, other):
        self._resolve_all()
        if isinstance(other, LazyMetadata):
            other._resolve_all()
        return dict.__eq__(self, other)

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None

    def __repr__(self):
        self._resolve_all()
        return dict.__repr__(self)

    def __or__(self, other):
        m = self.copy()
        m.update(other)
        return m

    def __reduce__(self):
        # pickle / deepcopy: a plain Metadata with the same typed values (no file behind it)
        return _rebuild_metadata, ([(k, self.typed(k), self[k]) for k in self.keys()],)

    def _detach(self) -> None:
        # The file is being closed: keep the undecoded bytes (a few MB) so the entries still decode later.
        for pending in self._pending.values():
            pending.detach()


def _rebuild_metadata(items) -> Metadata:
    m = Metadata()
    for key, typed, plain_value in items:
        m.set_typed(key, typed, plain_value)
    return m


# ------------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------------
class TensorInfo:
    """One tensor of a GGUF file: where its bytes are and how to read them.

    ``shape`` is numpy order (ggml's ``ne`` reversed), ``offset`` is absolute in ``path``, ``ggml_type`` a
    :class:`~gguf_kquant.types.GGMLType` or, for a type id newer than this library, the plain int.
    """

    __slots__ = ("name", "shape", "ggml_type", "offset", "nbytes", "nbytes_exact", "path", "byte_order",
                 "_mapping")

    def __init__(self, name, shape, ggml_type, offset, nbytes, nbytes_exact, path, byte_order, mapping):
        self.name: str = name
        self.shape: tuple = shape
        self.ggml_type: Union[GGMLType, int] = ggml_type
        self.offset: int = offset
        self.nbytes: int = nbytes
        self.nbytes_exact: bool = nbytes_exact
        self.path: Path = path
        self.byte_order: str = byte_order
        self._mapping = mapping

    @property
    def ne(self) -> tuple:
        """ggml's ``ne`` (innermost first), as many entries as the file stores."""
        return self.shape[::-1]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        t = self.ggml_type
        return t.name if isinstance(t, GGMLType) else f"UNKNOWN({t})"

    @property
    def is_known_type(self) -> bool:
        return isinstance(self.ggml_type, GGMLType)

    @property
    def bits_per_weight(self) -> Optional[float]:
        n = self.n_elements
        return 8.0 * self.nbytes / n if n and self.nbytes_exact else None

    def raw(self) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array viewing the memory-mapped file (no copy).

        The array is flat, ``(nbytes,)``, whatever the tensor's rank; ``raw().reshape(t.shape[:-1] + (-1,))``
        is the ``(..., row_bytes)`` layout that :func:`gguf_kquant.quantize` returns (``(n_rows, row_bytes)``
        for a 2-D tensor) and gguf-py takes as the byte shape of raw data.

        The file's size is checked first (:class:`~gguf_kquant.errors.FileChangedError` if it shrank).  A
        view is only as safe as the file under it: if another program truncates the file while the view is
        in use, reading it raises SIGBUS, as with any memory map.  :meth:`numpy` and :meth:`chunks` read
        with ``pread`` and are immune.
        """
        mapping = self._mapping
        mm = mapping.mm
        if mm is None:
            raise GGUFIOError(f"{self.path}: the GGUF file is closed", filename=str(self.path))
        if self.nbytes == 0:
            out = np.empty(0, np.uint8)
            out.flags.writeable = False
            return out
        mapping.check(self.offset + self.nbytes, f"tensor {self.name!r}")
        return np.frombuffer(mm, dtype=np.uint8, count=self.nbytes, offset=self.offset)

    def read(self) -> np.ndarray:
        """The tensor's bytes as a new, writable uint8 array, read with ``pread`` (a copy, never the map)."""
        out = np.empty(self.nbytes, np.uint8)
        if self.nbytes:
            self._read_into(out, self.offset)
        return out

    def chunks(self, max_bytes: int = 16 << 20) -> Iterator[np.ndarray]:
        """The tensor's bytes in order, as new uint8 arrays of at most ``max_bytes`` (a multiple of the
        block size when the type is known), read with ``pread``: what a copier should use, because a file
        that shrinks meanwhile raises :class:`~gguf_kquant.errors.FileChangedError` instead of SIGBUS."""
        unit = TYPES[self.ggml_type].type_size if isinstance(self.ggml_type, GGMLType) else 1
        step = max(unit, max_bytes // unit * unit)
        for start in range(0, self.nbytes, step):
            out = np.empty(min(step, self.nbytes - start), np.uint8)
            self._read_into(out, self.offset + start)
            yield out

    def _read_into(self, out: np.ndarray, offset: int) -> None:
        if self._mapping.fd is None:
            raise GGUFIOError(f"{self.path}: the GGUF file is closed", filename=str(self.path))
        self._mapping.read_into(out, offset, f"tensor {self.name!r}")

    def numpy(self, *, threads: Optional[int] = None) -> np.ndarray:
        """The tensor's values: float32 for float and quantized types (``gguf_kquant.dequantize``), the
        stored dtype for I8/I16/I32/I64/F64; native byte order, a new array of shape :attr:`shape`.

        The bytes are read with ``pread`` (not through the map), so a file truncated meanwhile raises
        :class:`~gguf_kquant.errors.FileChangedError` rather than killing the process."""
        if not isinstance(self.ggml_type, GGMLType):
            raise UnknownTypeError(
                f"{self.path}: offset {self.offset}: tensor {self.name!r} has ggml type id {self.ggml_type}, "
                f"newer than this version of gguf_kquant knows; its values cannot be decoded"
            )
        info = TYPES[self.ggml_type]
        block_dtype = info.block_dtype
        native = self.byte_order == "=" or self.byte_order == ("<" if _LITTLE_ENDIAN else ">")
        if native and (not info.codec or info.ggml_type == GGMLType.F32):
            # F32, I8..I64, F64: read straight into the result (one copy, the file's own dtype)
            dt = np.dtype(np.float32) if info.codec else block_dtype.newbyteorder("=")
            out = np.empty(self.nbytes // dt.itemsize, dt)
            if out.size:
                self._read_into(out, self.offset)
            return out.reshape(self.shape)
        data = self.read()
        if self.byte_order == ">":
            data = _swap_blocks(data, info, self)
        if not info.codec:  # I8..I64, F64: keep their own dtype
            return data.view(block_dtype).astype(block_dtype.newbyteorder("=")).reshape(self.shape)
        from ..codecs import dequantize

        return dequantize(data, self.ggml_type, self.shape, threads=threads)

    def __repr__(self):
        return (f"TensorInfo({self.name!r}, shape={self.shape}, type={self.type_name}, offset={self.offset}, "
                f"nbytes={self.nbytes})")


def _swap_blocks(data: np.ndarray, info, tensor: TensorInfo) -> np.ndarray:
    """Big-endian file -> little-endian bytes: swap every multi-byte field of every block (type table layout)."""
    dt = info.block_dtype
    if dt.subdtype is not None:  # opaque bytes: the table has no layout for this type yet
        if info.is_quantized:
            raise UnknownTypeError(
                f"{tensor.path}: offset {tensor.offset}: tensor {tensor.name!r}: no block layout is known for "
                f"{info.name}, so its big-endian data cannot be byte-swapped"
            )
        return data
    if dt.fields is None and dt.itemsize == 1:
        return data
    # Structured blocks swap field by field ('>f2' d -> '<f2' d; uint8 arrays are untouched).
    return data.view(dt.newbyteorder(">")).astype(dt).view(np.uint8)


class TensorList(list):
    """The tensors in file order; also indexable by name: ``tensors["output.weight"]``."""

    def __init__(self, items=()):
        super().__init__(items)
        self._by_name = {t.name: t for t in self}

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"no tensor named {key!r}") from None
        return super().__getitem__(key)

    def __contains__(self, item):
        if isinstance(item, str):
            return item in self._by_name
        return super().__contains__(item)

    def get(self, name: str, default=None):
        return self._by_name.get(name, default)

    def names(self) -> list:
        return [t.name for t in self]


# ------------------------------------------------------------------------------------------------------
# The header parser
# ------------------------------------------------------------------------------------------------------
class _Mapping:
    """The memory map of one file, and its descriptor (kept open for ``fstat`` and ``pread``).

    Bytes read through a map whose file was truncated by another process raise SIGBUS, which kills the
    interpreter; so every bulk read of tensor data (``numpy()``, :meth:`TensorInfo.chunks`) goes through
    ``pread`` instead — a short read becomes :class:`~gguf_kquant.errors.FileChangedError` — and ``raw()``
    and lazily decoded metadata check the file's size with ``fstat`` before touching the map.

    ``close()`` tolerates numpy views still alive (they keep the map alive)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = open_regular(path)
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size == 0:
                raise TruncatedFileError(f"{path}: offset 0: the file is empty")
            try:
                self.mm: Optional[mmap.mmap] = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise GGUFIOError.wrap(path, exc, "cannot map") from None
        except BaseException:
            os.close(self.fd)
            raise

    def check(self, end: int, what: str) -> None:
        """Raise FileChangedError unless the file still holds bytes up to ``end`` (the map is safe to read)."""
        try:
            now = os.fstat(self.fd).st_size if self.fd is not None else self.size
        except OSError as exc:
            raise GGUFIOError.wrap(self.path, exc, f"cannot read {what}") from None
        if now < end:
            raise FileChangedError(
                f"{self.path}: {what}: the file shrank from {self.size} to {now} bytes while it was open; "
                f"bytes up to offset {end} are gone (another program truncated or rewrote it)")

    def read_into(self, out, offset: int, what: str) -> None:
        """Fill the writable buffer ``out`` with the file's bytes at ``offset`` (pread, never the map)."""
        if self.fd is None:
            raise ValueError(f"{self.path}: the GGUF file is closed")
        view = memoryview(out).cast("B")
        done, n = 0, view.nbytes
        while done < n:
            try:
                got = os.preadv(self.fd, [view[done:done + _PREAD_MAX]], offset + done)
            except OSError as exc:
                raise GGUFIOError.wrap(self.path, exc, f"cannot read {what}") from None
            if got == 0:
                self.check(offset + n, what)  # says by how much the file shrank
                raise FileChangedError(f"{self.path}: {what}: the file ends at offset {offset + done} while "
                                       f"reading up to {offset + n}; it changed while open")
            done += got

    def close(self):
        mm, self.mm = self.mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # raw() views exist: the mapping goes away when the last of them does
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


_PREAD_MAX = 1 << 30  # Linux reads at most 0x7ffff000 bytes per call


def open_regular(path) -> int:
    """A read-only descriptor of ``path``, refusing what is not a regular file without blocking on it.

    ``O_NONBLOCK`` lets a FIFO open at once (instead of waiting forever for a writer); ``fstat`` then refuses
    it, like directories, sockets and devices.  Every ``OSError`` becomes
    :class:`~gguf_kquant.errors.GGUFIOError` naming the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise GGUFIOError.wrap(path, exc, "cannot open") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or
                    stat.S_ISBLK(mode) else "not a regular file")
            raise GGUFIOError(f"{path}: cannot read: {kind}, not a regular file", filename=str(path))
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, what: str) -> bytes:
    """The whole content of the regular file ``path`` (:func:`open_regular`'s refusals); an ``OSError`` while
    reading is a :class:`~gguf_kquant.errors.GGUFIOError` saying it could not read ``what``."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise GGUFIOError.wrap(path, exc, f"cannot read {what}") from None


class _Parser:
    """Reads one file's header.  Field readers check bounds first, so no struct.error escapes."""

    def __init__(self, path: Path, mapping: _Mapping):
        self.path = path
        self.label = str(path)
        self.mapping = mapping
        self.buf = mapping.mm
        self.size = mapping.size
        self.pos = 0
        self.bo = "<"
        self.kv_offsets: dict[str, int] = {}
        self.memory_left = max(HEADER_MEMORY_MIN, HEADER_MEMORY_FACTOR * self.size)

    # -- errors
    def fail(self, cls, offset: int, message: str):
        raise cls(f"{self.label}: offset {offset}: {message}")

    def need(self, offset: int, nbytes: int, what: str) -> None:
        if offset + nbytes > self.size:
            left = max(self.size - offset, 0)
            self.fail(TruncatedFileError, offset,
                      f"file ends inside {what} (needs {nbytes} bytes, {left} left; file size {self.size})")

    def spend(self, nbytes: int, offset: int, what: str) -> None:
        """Charge ``nbytes`` of Python memory for ``what``; LimitExceededError once the header's budget is gone."""
        self.memory_left -= nbytes
        if self.memory_left < 0:
            budget = max(HEADER_MEMORY_MIN, HEADER_MEMORY_FACTOR * self.size)
            self.fail(LimitExceededError, offset,
                      f"{what}: the header would take more than {budget} bytes of memory ({HEADER_MEMORY_FACTOR}x "
                      f"the file's {self.size} bytes, at least {HEADER_MEMORY_MIN}); refusing it as a resource bomb")

    # -- primitive fields
    def scalar(self, fmt: str, nbytes: int, what: str):
        p = self.pos
        self.need(p, nbytes, what)
        self.pos = p + nbytes
        return struct.unpack_from(self.bo + fmt, self.buf, p)[0]

    def raw_string(self, what: str) -> tuple[int, int]:
        """(start, length) of a length-prefixed string, after checking both fit."""
        p = self.pos
        n = self.scalar("Q", 8, f"the length of {what}")
        if n > MAX_STRING_LENGTH:
            self.fail(LimitExceededError, p, f"{what} claims {n} bytes, more than the limit of {MAX_STRING_LENGTH}")
        self.need(p + 8, n, f"{what} ({n} bytes)")
        self.pos = p + 8 + n
        return p + 8, n

    def string(self, what: str) -> str:
        start, n = self.raw_string(what)
        return self.decode(start, n, what)

    def decode(self, start: int, n: int, what: str) -> str:
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as exc:
            self.fail(MalformedFileError, start + exc.start, f"{what} is not valid UTF-8 ({exc.reason})")

    # -- the file
    def parse(self) -> dict:
        buf, size = self.buf, self.size
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            if size < 4 and GGUF_MAGIC.startswith(magic):
                self.fail(TruncatedFileError, 0, f"file of {size} bytes ends inside the magic")
            self.fail(BadMagicError, 0, f"not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
        self.pos = 4
        version = self.scalar("I", 4, "the version")
        if version & 0xFFFF == 0 and version != 0:
            # ggml's test for a file of the other byte order: v3 written big-endian reads as 0x03000000.
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in SUPPORTED_VERSIONS:
                self.bo, version = ">", swapped
        if version not in SUPPORTED_VERSIONS:
            why = "GGUF v1 is no longer supported" if version == 1 else "only versions 2 and 3 are supported"
            self.fail(UnsupportedVersionError, 4, f"GGUF version {version} (0x{version:08x}): {why}")
        n_tensors = self.scalar("q", 8, "the tensor count")
        n_kv = self.scalar("q", 8, "the metadata key-value count")
        left = size - self.pos
        if n_tensors < 0 or n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            self.fail(LimitExceededError, 8,
                      f"tensor count {n_tensors} is impossible for a file of {size} bytes")
        if n_kv < 0 or n_kv * _MIN_KV_BYTES > left:
            self.fail(LimitExceededError, 16,
                      f"metadata key-value count {n_kv} is impossible for a file of {size} bytes")
        self.spend(n_kv * _COST_KV + n_tensors * _COST_TENSOR, 8, f"{n_tensors} tensors and {n_kv} key-values")

        metadata = LazyMetadata()
        for i in range(n_kv):
            self.key_value(i, metadata)

        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in metadata:
            typed = metadata.typed("general.alignment")
            if typed.type != _VT.UINT32:
                self.fail(MalformedFileError, self.kv_offsets["general.alignment"],
                          f"general.alignment must be of type UINT32, not {typed.type.name}")
            alignment = typed.value
            if alignment == 0 or alignment & (alignment - 1):
                self.fail(MalformedFileError, self.kv_offsets["general.alignment"],
                          f"general.alignment {alignment} is not a power of two")

        infos = [self.tensor_info(i) for i in range(n_tensors)]
        if len({info[0] for info in infos}) != len(infos):
            seen = set()
            for name, info_offset, *_ in infos:
                if name in seen:
                    self.fail(DuplicateError, info_offset, f"duplicate tensor name {name!r}")
                seen.add(name)

        data_offset = self.pos
        if n_tensors > 0:
            data_offset = -(-self.pos // alignment) * alignment
            if data_offset > size:
                self.fail(TruncatedFileError, self.pos,
                          f"file ends before the data section (aligned to {alignment} at {data_offset})")
        tensors = self.place_tensors(infos, data_offset, alignment)
        return dict(version=version, byte_order=self.bo, alignment=alignment, data_offset=data_offset,
                    metadata=metadata, tensors=tensors, n_kv=n_kv)

    # -- metadata
    def value_type(self, what: str) -> GGUFValueType:
        p = self.pos
        t = self.scalar("I", 4, f"the value type of {what}")
        vt = _VALUE_TYPES.get(t)
        if vt is None:
            self.fail(MalformedFileError, p, f"{what} has invalid value type {t} (valid: 0..12)")
        return vt

    def key_value(self, i: int, metadata: LazyMetadata) -> None:
        offset = self.pos
        key = self.string(f"the key of metadata entry {i}")
        if not key:
            self.fail(MalformedFileError, offset, f"metadata entry {i} has an empty key")
        if key in metadata:
            self.fail(DuplicateError, offset, f"duplicate metadata key {key!r} (entry {i})")
        self.kv_offsets[key] = offset
        what = f"metadata key {key!r}"
        vt = self.value_type(what)
        if vt == _VT.ARRAY:
            typed, value = self.array(what, 0, metadata, key)
            if typed is None:
                return  # stored as pending
        elif vt == _VT.STRING:
            value = self.string(f"the value of {what}")
            typed = Value(value, vt)
        else:
            fmt = _SCALAR_FMT[vt]
            p = self.pos
            value = self.scalar(fmt, SCALAR_DTYPES[vt].itemsize, f"the value of {what}")
            if vt == _VT.BOOL:
                if value > 1:
                    self.fail(MalformedFileError, p, f"{what}: BOOL byte is {value}, not 0 or 1")
                value = bool(value)
            typed = Value(value, vt)
        metadata.set_typed(key, typed, value)

    def array(self, what: str, depth: int, metadata: Optional[LazyMetadata] = None, key: str = ""):
        """Read an ARRAY's element type, count and elements -> (Value, plain value).

        A long string array at top level is stored into ``metadata`` as pending; returns (None, None)."""
        et = self.value_type(f"the elements of {what}")
        p = self.pos
        n = self.scalar("Q", 8, f"the element count of {what}")
        if n > MAX_ARRAY_ELEMENTS:
            self.fail(LimitExceededError, p, f"{what} claims {n} elements, more than the limit of {MAX_ARRAY_ELEMENTS}")
        start = self.pos
        left = self.size - start
        base_cost = _COST_ARRAY if depth == 0 else 0  # an inner array was paid for by its parent
        if et == _VT.STRING:
            if n * 8 > left:
                self.fail(TruncatedFileError, p, f"{what} claims {n} strings but only {left} bytes are left")
            if metadata is not None and n > LAZY_STRING_ARRAY:
                end = self.walk_strings(start, n, what)
                metadata._set_pending(key, _Pending(n, self.string_decoder(start, n, end, what), start, end))
                self.pos = end
                return None, None
            self.spend(base_cost + n * _COST_STRING, p, what)
            items = [self.string(f"element {j} of {what}") for j in range(n)]
            return Value(items, _VT.ARRAY, _VT.STRING), items
        if et == _VT.ARRAY:
            if depth + 1 >= MAX_ARRAY_NESTING:
                self.fail(LimitExceededError, p, f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
            if n * 12 > left:
                self.fail(TruncatedFileError, p, f"{what} claims {n} arrays but only {left} bytes are left")
            self.spend(base_cost + n * _COST_ARRAY, p, what)
            typed_items, plain_items = [], []
            for j in range(n):
                typed, plain = self.array(f"element {j} of {what}", depth + 1)
                typed_items.append(typed)
                plain_items.append(plain)
            return Value(typed_items, _VT.ARRAY, _VT.ARRAY), plain_items
        dt = SCALAR_DTYPES[et]
        if n * dt.itemsize > left:
            self.fail(TruncatedFileError, p,
                      f"{what} claims {n} {et.name} elements ({n * dt.itemsize} bytes) but only {left} bytes are left")
        file_dt = dt if self.bo == "<" else dt.newbyteorder(">")
        self.spend(base_cost + n * dt.itemsize, p, what)
        arr = np.frombuffer(self.buf, dtype=file_dt, count=n, offset=start)
        arr = arr.astype(dt.newbyteorder("="), copy=True)
        if et == _VT.BOOL:
            if n and arr.max() > 1:
                j = int(np.argmax(arr > 1))
                self.fail(MalformedFileError, start + j, f"element {j} of {what}: BOOL byte is {arr[j]}, not 0 or 1")
            arr = arr.astype(np.bool_)
        self.pos = start + n * dt.itemsize
        return Value(arr, _VT.ARRAY, et), arr

    def walk_strings(self, p: int, n: int, what: str) -> int:
        """End offset of ``n`` length-prefixed strings starting at ``p``; reads only the prefixes."""
        buf, start = self.buf, p
        unpack = struct.Struct(self.bo + "Q").unpack_from
        try:
            for _ in range(n):  # the hot loop of opening a big-vocabulary model: keep it bare
                p += 8 + unpack(buf, p)[0]
        except (struct.error, OverflowError):
            p = None
        if p is None or p > self.size or p - start > MAX_STRING_LENGTH:
            # Something is wrong (or a string may exceed the limit): walk again with every check.
            self.pos = start
            for j in range(n):
                self.raw_string(f"element {j} of {what}")
            p = self.pos
        return p

    def string_decoder(self, start: int, n: int, end: int, what: str) -> Callable[[], list]:
        parser = self
        state = {"buf": self.buf, "base": 0}

        def decode() -> list:
            buf, base = state["buf"], state["base"]
            if isinstance(buf, FileChangedError):
                raise buf
            if base == 0:
                parser.mapping.check(end, what)  # still reading the map: is the file still whole?
            unpack = struct.Struct(parser.bo + "Q").unpack_from
            out = []
            append = out.append
            p = start - base
            try:
                for _ in range(n):
                    q = p + 8
                    p = q + unpack(buf, p)[0]
                    append(str(buf[q:p], "utf-8"))
            except UnicodeDecodeError as exc:
                j = len(out)
                parser.fail(MalformedFileError, base + q + exc.start,
                            f"element {j} of {what} is not valid UTF-8 ({exc.reason})")
            return out

        def detach():
            if state["base"] == 0 and state["buf"] is not None:
                try:
                    parser.mapping.check(end, what)
                except GGUFIOError as exc:  # the bytes are gone: decoding later says so
                    state["buf"] = exc if isinstance(exc, FileChangedError) else FileChangedError(str(exc))
                    return
                state["buf"], state["base"] = bytes(state["buf"][start:end]), start

        decode.detach = detach
        return decode

    # -- tensor infos
    def tensor_info(self, i: int):
        offset = self.pos
        start, n = self.raw_string(f"the name of tensor {i}")
        if n >= MAX_NAME:
            self.fail(LimitExceededError, offset, f"tensor {i}'s name is {n} bytes long; the limit is {MAX_NAME - 1}")
        name = self.decode(start, n, f"the name of tensor {i}")
        what = f"tensor {name!r}"
        p = self.pos
        n_dims = self.scalar("I", 4, f"the dimension count of {what}")
        if n_dims > MAX_DIMS:
            self.fail(LimitExceededError, p, f"{what} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}")
        p = self.pos
        self.need(p, 8 * n_dims, f"the shape of {what}")
        ne = struct.unpack_from(f"{self.bo}{n_dims}q", self.buf, p)
        self.pos = p + 8 * n_dims
        for j, d in enumerate(ne):
            if d < 0:
                self.fail(MalformedFileError, p + 8 * j, f"{what} dimension {j} is {d} < 0")
        # ggml's overflow check, reproduced exactly: a running product over ne[1:] of the entries > 1.
        current = ne[0] if ne else 1
        for d in ne[1:]:
            if d > 1 and _INT64_MAX // d < current:
                self.fail(LimitExceededError, p, f"{what} shape {list(ne)} has more than 2**63-1 elements")
            current *= d
        p = self.pos
        type_id = self.scalar("i", 4, f"the type of {what}")
        if type_id < 0 or type_id in REMOVED_TYPE_IDS or type_id > MAX_TYPE_ID:
            self.fail(MalformedFileError, p, f"{what} has invalid ggml type id {type_id}")
        ggml_type = GGMLType._value2member_map_.get(type_id, type_id)
        nbytes = None
        if isinstance(ggml_type, GGMLType):
            info = TYPES[ggml_type]
            ne0 = ne[0] if ne else 1
            if ne0 % info.block_size:
                self.fail(MalformedFileError, p,
                          f"{what} of type {info.name} has {ne0} elements per row, not a multiple of the "
                          f"block size {info.block_size}")
            n_elements = 1
            for d in ne:
                n_elements *= d
            blocks = n_elements // info.block_size
            if blocks > _SIZE_MAX // info.type_size:
                self.fail(LimitExceededError, p, f"{what} shape {list(ne)} has a byte size above 2**64-1")
            nbytes = blocks * info.type_size
        p = self.pos
        rel_offset = self.scalar("Q", 8, f"the data offset of {what}")
        return name, offset, p, tuple(reversed(ne)), ggml_type, nbytes, rel_offset

    def place_tensors(self, infos, data_offset: int, alignment: int) -> list:
        """Check offsets like ggml (each equals the running padded sum) and data inside the file."""
        out = []
        expected = 0
        mask = alignment - 1
        n = len(infos)
        for i, (name, _info_offset, field, shape, ggml_type, nbytes, rel) in enumerate(infos):
            exact = nbytes is not None
            if exact:
                if rel != expected:
                    self.fail(MalformedFileError, field,
                              f"tensor {name!r} has data offset {rel}, expected {expected} (tensors must be "
                              f"stored in order, each aligned to {alignment}, without gaps or overlap)")
            else:
                if rel < expected or rel & mask:
                    self.fail(MalformedFileError, field,
                              f"tensor {name!r} (unknown type {ggml_type}) has data offset {rel}; expected an "
                              f"offset >= {expected} aligned to {alignment}")
                if i + 1 < n:
                    nxt = infos[i + 1][6]
                    if nxt < rel:
                        self.fail(MalformedFileError, infos[i + 1][2],
                                  f"tensor {infos[i + 1][0]!r} has data offset {nxt}, "
                                  f"before the previous tensor's {rel}")
                    nbytes = nxt - rel  # the span to the next tensor: an upper bound, padding included
                else:
                    nbytes = self.size - data_offset - rel
                    if nbytes < 0:
                        self.fail(TruncatedFileError, field,
                                  f"tensor {name!r} starts at {data_offset + rel}, "
                                  f"after the end of the file ({self.size})")
            end = data_offset + rel + nbytes
            if end > self.size:
                self.fail(TruncatedFileError, field,
                          f"tensor {name!r} data [{data_offset + rel}, {end}) extends past the end of the file "
                          f"({self.size} bytes)")
            padded = (nbytes + mask) & ~mask
            expected = rel + padded
            if expected > _SIZE_MAX:
                self.fail(LimitExceededError, field, f"tensor {name!r}: data section size overflows 2**64-1")
            out.append((name, shape, ggml_type, data_offset + rel, nbytes, exact))
        return out


# ------------------------------------------------------------------------------------------------------
# The file
# ------------------------------------------------------------------------------------------------------
class _Shard:
    def __init__(self, path: Path):
        self.path = path
        self.mapping = _Mapping(path)
        try:
            self.header = _Parser(path, self.mapping).parse()
        except BaseException:
            self.mapping.close()
            raise

    def tensor_infos(self) -> list:
        h, path, mapping = self.header, self.path, self.mapping
        bo = h["byte_order"]
        return [TensorInfo(name, shape, t, off, nb, exact, path, bo, mapping)
                for name, shape, t, off, nb, exact in h["tensors"]]


class GGUFFile:
    """An open GGUF file (or split model).  Use :func:`open_gguf` / ``gguf_kquant.open``.

    Attributes: ``path``, ``version``, ``alignment``, ``byte_order`` (``'<'`` or ``'>'``), ``data_offset``
    (absolute start of the tensor data), ``metadata`` (:class:`LazyMetadata`), ``tensors``
    (:class:`TensorList`), ``file_size`` (bytes of the first file), ``shards`` (paths of all files).
    """

    def __init__(self, path, *, split: bool = True):
        self.path = Path(path)
        first = _Shard(self.path)
        self._shards = [first]
        try:
            h = first.header
            self.version: int = h["version"]
            self.alignment: int = h["alignment"]
            self.byte_order: str = h["byte_order"]
            self.data_offset: int = h["data_offset"]
            self.metadata: LazyMetadata = h["metadata"]
            self.n_kv: int = h["n_kv"]
            self.file_size: int = first.mapping.size
            tensors = first.tensor_infos()
            if split:
                tensors = self._open_other_shards(tensors)
            self.tensors = TensorList(tensors)
        except BaseException:
            self.close()
            raise

    # -- split models
    def _split_key(self, metadata, key, vt, path) -> Optional[int]:
        if key not in metadata:
            return None
        typed = metadata.typed(key)
        if typed.type != vt:
            raise SplitError(f"{path}: key {key} must be of type {vt.name}, not {typed.type.name}")
        return typed.value

    def _open_other_shards(self, tensors: list) -> list:
        md = self.metadata
        count = self._split_key(md, _split.KEY_SPLIT_COUNT, _VT.UINT16, self.path)
        if not count or count <= 1:
            return tensors
        no = self._split_key(md, _split.KEY_SPLIT_NO, _VT.UINT16, self.path)
        if no != 0:
            raise SplitError(
                f"{self.path}: this is shard {'?' if no is None else no + 1} of {count} of a split model; "
                f"open the first shard (…-00001-of-{count:05d}.gguf), or pass split=False to read this file alone"
            )
        parsed = _split.parse_shard_path(self.path)
        if parsed is None or parsed[1] != 0 or parsed[2] != count:
            raise SplitError(
                f"{self.path}: split.count is {count} but the file name is not <prefix>-00001-of-{count:05d}.gguf, "
                f"so the other shards cannot be found"
            )
        prefix = parsed[0]
        expected_total = self._split_key(md, _split.KEY_SPLIT_TENSORS_COUNT, _VT.INT32, self.path)
        names = {t.name: self.path for t in tensors}
        out = list(tensors)
        for idx in range(1, count):
            path = _split.shard_path(prefix, idx, count)
            if not path.exists():
                raise SplitError(f"{self.path}: shard {idx + 1} of {count} is missing: {path}")
            shard = _Shard(path)
            self._shards.append(shard)
            smd = shard.header["metadata"]
            s_no = self._split_key(smd, _split.KEY_SPLIT_NO, _VT.UINT16, path)
            s_count = self._split_key(smd, _split.KEY_SPLIT_COUNT, _VT.UINT16, path)
            if s_no != idx or s_count != count:
                raise SplitError(f"{path}: split.no={s_no}, split.count={s_count}; expected {idx} and {count}")
            s_total = self._split_key(smd, _split.KEY_SPLIT_TENSORS_COUNT, _VT.INT32, path)
            if s_total != expected_total:
                raise SplitError(f"{path}: split.tensors.count={s_total}, but the first shard says {expected_total}")
            for t in shard.tensor_infos():
                if t.name in names:
                    raise DuplicateError(f"{path}: tensor {t.name!r} is also in {names[t.name]}")
                names[t.name] = path
                out.append(t)
        if expected_total is not None and expected_total != len(out):
            raise SplitError(f"{self.path}: split.tensors.count is {expected_total} but the {count} shards hold "
                             f"{len(out)} tensors")
        return out

    @property
    def shards(self) -> list:
        return [s.path for s in self._shards]

    @property
    def total_size(self) -> int:
        """Bytes of all files of the model."""
        return sum(s.mapping.size for s in self._shards)

    # -- lazily decoded arrays
    def peek(self, key: str, count: int) -> list:
        """The first ``count`` elements of array ``key`` without decoding the rest (for summaries).

        >>> f.peek("tokenizer.ggml.tokens", 3)                                # doctest: +SKIP
        ['<unk>', '<s>', '</s>']
        """
        md = self.metadata
        pending = md._pending.get(key)
        if pending is None:
            value = md[key]
            return list(value[:count]) if isinstance(value, (list, np.ndarray)) else [value]
        out = []
        mapping = self._shards[0].mapping
        mm = mapping.mm
        if mm is None:
            return md[key][:count]
        mapping.check(pending.end, f"metadata key {key!r}")
        unpack = struct.Struct(self.byte_order + "Q").unpack_from
        p = pending.start
        for _ in range(min(count, pending.count)):
            q = p + 8
            p = q + unpack(mm, p)[0]
            try:
                out.append(str(mm[q:p], "utf-8"))
            except UnicodeDecodeError:
                md[key]  # decoding everything raises the precise error
        return out

    # -- lifetime
    def close(self) -> None:
        md = getattr(self, "metadata", None)
        if md is not None:
            md._detach()
        for shard in self._shards:
            shard.mapping.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        bo = "little" if self.byte_order == "<" else "big"
        return (f"<GGUFFile {str(self.path)!r} v{self.version} {bo}-endian, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors>")


def open_gguf(path, *, split: bool = True) -> GGUFFile:
    """Open a GGUF file (memory-mapped; only the header is read).  A split model opens from its first shard.

    >>> import gguf_kquant
    >>> with gguf_kquant.open("model.gguf") as f:                              # doctest: +SKIP
    ...     for t in f.tensors:
    ...         print(t.name, t.shape, t.ggml_type.name)
    """
    return GGUFFile(path, split=split)
