"""GGUF metadata values: the 13 value types, typed values, and the typed metadata mapping.

The reader returns a :class:`Metadata` — a plain ``dict`` of key -> Python value that also remembers each
value's GGUF type (``metadata.typed(key)`` -> :class:`Value`), so that writing it back reproduces the file
byte for byte.  The writer accepts plain values too and types them with :func:`to_value`:

=====================  ==========================================================================
Python value           GGUF type chosen by default (pass a :class:`Value` to choose another)
=====================  ==========================================================================
``bool``               BOOL
``int``                UINT32 if 0 <= v < 2**32 (llama.cpp's counts, sizes and token ids are u32);
                       INT32 if -2**31 <= v < 0; else INT64, else UINT64
``float``              FLOAT32 (llama.cpp reads its hyper-parameters as f32)
``str``                STRING (UTF-8)
numpy scalar           its own dtype (``np.uint8(3)`` -> UINT8, ``np.float64`` -> FLOAT64, ...)
numpy 1-d array        ARRAY of its dtype
``list``/``tuple``     ARRAY: of STRING if all str, BOOL if all bool, INT32 if all ints fit (else
                       INT64, else UINT64), FLOAT32 if floats; a list of lists is an ARRAY of ARRAYs
gguf-py ``ReaderField`` the types it was read with (see :mod:`gguf_kquant.interop`)
=====================  ==========================================================================

Numeric arrays read from a file are numpy arrays; gguf-py's ``GGUFWriter`` wants sequences:
``gguf_kquant.interop.add_to_gguf_writer(gguf_writer, metadata)`` adds a whole Metadata with exact types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import MetadataTypeError, WriteError

MAX_ARRAY_NESTING = 16  # arrays of arrays nest at most this deep (ours: ggml has no arrays of arrays at all)


class GGUFValueType(enum.IntEnum):
    """``enum gguf_type`` (ggml/include/gguf.h); agrees with ``gguf.GGUFValueType``."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types and their little-endian numpy dtypes (BOOL is one byte, 0 or 1).
SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}

_DTYPE_TO_VALUE_TYPE = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.bool_): GGUFValueType.BOOL,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
}


@dataclass(frozen=True, eq=False)
class Value:
    """A metadata value with an explicit GGUF type.

    ``Value(3, GGUFValueType.UINT8)``; arrays: ``Value([1, 2], GGUFValueType.ARRAY, GGUFValueType.INT16)``;
    an array of arrays holds a list of :class:`Value` (each inner array keeps its own element type).
    """

    value: Any
    type: GGUFValueType
    element_type: Optional[GGUFValueType] = None

    def __post_init__(self):
        object.__setattr__(self, "type", GGUFValueType(self.type))
        if self.type == GGUFValueType.ARRAY:
            if self.element_type is None:
                raise WriteError("an ARRAY value needs an element_type")
            object.__setattr__(self, "element_type", GGUFValueType(self.element_type))
            if self.element_type == GGUFValueType.UINT64 and isinstance(self.value, (list, tuple)):
                object.__setattr__(self, "value", _uint64_items(self.value))


def _uint64_items(items):
    """A list of Python ints with one >= 2**63 -> a list of ``np.uint64`` (``np.asarray`` would turn the
    Python ints into float64, losing the low bits); any other list is left for the writer to check."""
    if not any(isinstance(v, int) and not isinstance(v, bool) and v >= 2**63 for v in items):
        return items
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
        return items
    lo, hi = min(int(v) for v in items), max(int(v) for v in items)
    if lo < 0 or hi >= 2**64:
        raise WriteError(f"values [{lo}, {hi}] do not fit UINT64 [0, {2**64 - 1}]")
    return [np.uint64(int(v)) for v in items]


def _int_type(v: int) -> GGUFValueType:
    if 0 <= v < 2**32:
        return GGUFValueType.UINT32
    if -(2**31) <= v < 0:
        return GGUFValueType.INT32
    if -(2**63) <= v < 2**63:
        return GGUFValueType.INT64
    if 0 <= v < 2**64:
        return GGUFValueType.UINT64
    raise WriteError(f"integer {v} does not fit any GGUF integer type")


def to_value(v: Any, key: str = "?", _depth: int = 0) -> Value:
    """Type a Python value with the documented defaults (see the module docstring)."""
    if _depth > MAX_ARRAY_NESTING:
        raise WriteError(f"metadata key {key!r}: lists nested more than {MAX_ARRAY_NESTING} deep")
    if isinstance(v, Value):
        return v
    if hasattr(v, "parts") and hasattr(v, "types"):  # a gguf-py ReaderField: its own GGUF types
        from ..interop import field_value, is_reader_field

        if is_reader_field(v):
            return field_value(v)
    if isinstance(v, (bool, np.bool_)):
        return Value(bool(v), GGUFValueType.BOOL)
    if isinstance(v, np.generic) and v.dtype in _DTYPE_TO_VALUE_TYPE:
        return Value(v.item(), _DTYPE_TO_VALUE_TYPE[v.dtype])
    if isinstance(v, int):
        return Value(v, _int_type(v))
    if isinstance(v, float):
        return Value(v, GGUFValueType.FLOAT32)
    if isinstance(v, str):
        return Value(v, GGUFValueType.STRING)
    if isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise WriteError(f"metadata key {key!r}: arrays must be 1-D, got shape {v.shape}")
        if v.dtype.kind in "US":
            return Value([str(s) for s in v], GGUFValueType.ARRAY, GGUFValueType.STRING)
        if v.dtype.newbyteorder("=") not in _DTYPE_TO_VALUE_TYPE and v.dtype not in _DTYPE_TO_VALUE_TYPE:
            raise WriteError(f"metadata key {key!r}: unsupported array dtype {v.dtype}")
        return Value(v, GGUFValueType.ARRAY, _DTYPE_TO_VALUE_TYPE[np.dtype(v.dtype.newbyteorder("="))])
    if isinstance(v, (list, tuple)):
        items = list(v)
        if all(isinstance(i, str) for i in items) and items:
            return Value(items, GGUFValueType.ARRAY, GGUFValueType.STRING)
        if items and all(isinstance(i, (list, tuple, np.ndarray, Value)) for i in items):
            return Value([to_value(i, key, _depth + 1) for i in items], GGUFValueType.ARRAY, GGUFValueType.ARRAY)
        if items and all(isinstance(i, (bool, np.bool_)) for i in items):
            return Value(items, GGUFValueType.ARRAY, GGUFValueType.BOOL)
        if items and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in items):
            lo, hi = min(int(i) for i in items), max(int(i) for i in items)
            if -(2**31) <= lo and hi < 2**31:
                return Value(items, GGUFValueType.ARRAY, GGUFValueType.INT32)
            return Value(items, GGUFValueType.ARRAY, GGUFValueType.UINT64 if hi >= 2**63 else GGUFValueType.INT64)
        if items and all(isinstance(i, (int, float, np.integer, np.floating)) for i in items):
            return Value(items, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        if not items:
            raise WriteError(f"metadata key {key!r}: cannot infer the element type of an empty list; pass a Value")
        raise WriteError(f"metadata key {key!r}: a list mixing {sorted({type(i).__name__ for i in items})}")
    raise WriteError(f"metadata key {key!r}: cannot store a {type(v).__name__} in GGUF")


class Metadata(dict):
    """``dict`` of key -> Python value that remembers each value's GGUF type.

    ``metadata["general.architecture"]`` -> ``"llama"``; ``metadata.typed("llama.block_count")`` ->
    ``Value(32, GGUFValueType.UINT32)``.  Assigning a plain value types it with :func:`to_value`; assigning a
    :class:`Value` stores its plain value and keeps its type.
    """

    def __init__(self, items=()):
        super().__init__()
        self._typed: dict[str, Value] = {}
        for k, v in (items.items() if hasattr(items, "items") else items):
            self[k] = v

    def __setitem__(self, key: str, v: Any) -> None:
        typed = to_value(v, key)
        self._typed[key] = typed
        super().__setitem__(key, plain(typed))

    def set_typed(self, key: str, typed: Value, plain_value: Any) -> None:
        """Store an already decoded value (the reader's fast path, no re-inference)."""
        self._typed[key] = typed
        super().__setitem__(key, plain_value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        del self._typed[key]

    def typed(self, key: str) -> Value:
        return self._typed[key]

    def pop(self, key, *default):
        if key in self:
            self._typed.pop(key, None)
        return super().pop(key, *default)

    def update(self, other=(), **kw):
        for k, v in (other.items() if hasattr(other, "items") else other):
            if isinstance(other, Metadata):
                self.set_typed(k, other.typed(k), other[k])
            else:
                self[k] = v
        for k, v in kw.items():
            self[k] = v

    def __reduce__(self):
        # dict subclasses pickle their items before __init__ state; rebuild from typed pairs instead.
        return (_metadata_from_typed, (list(typed_items(self)),))

    def copy(self) -> "Metadata":
        m = Metadata()
        m.update(self)
        return m


def plain(typed: Value) -> Any:
    """The Python value of a :class:`Value` (arrays of arrays become lists of plain values)."""
    if typed.type == GGUFValueType.ARRAY and typed.element_type == GGUFValueType.ARRAY:
        return [plain(v) for v in typed.value]
    return typed.value


def typed_items(metadata) -> list[tuple[str, Value]]:
    """(key, Value) pairs of a :class:`Metadata` (keeping its types) or of any mapping (typed by default)."""
    if isinstance(metadata, Metadata):
        return [(k, metadata.typed(k)) for k in metadata]
    return [(k, to_value(v, k)) for k, v in metadata.items()]


def _metadata_from_typed(pairs) -> Metadata:
    m = Metadata()
    for k, typed in pairs:
        m.set_typed(k, typed, plain(typed))
    return m


_INT_ELEMENTS = ("UINT32", "INT32")


def uint32_key(metadata, key: str, default: Optional[int] = None, *, per_layer: bool = False,
               where: str = "") -> Optional[int]:
    """``metadata[key]`` read the way llama.cpp's model loader reads a u32 hyper-parameter.

    ``GGUFMeta::GKV<uint32_t>`` throws unless the value is a UINT32; with ``per_layer`` (``get_key_or_arr``,
    e.g. ``attention.head_count`` of hybrid models) an ARRAY of UINT32/INT32 is accepted too and its first
    element returned (llama.cpp's ``n_gqa()`` looks at layer 0).  Anything else raises
    :class:`~gguf_kquant.errors.MetadataTypeError` naming the key; an absent key gives ``default``.

    >>> uint32_key(f.metadata, "llama.block_count")                        # doctest: +SKIP
    32
    """
    if key not in metadata:
        return default
    typed = metadata.typed(key) if hasattr(metadata, "typed") else to_value(metadata[key], key)
    prefix = f"{where}: " if where else ""
    if typed.type == GGUFValueType.UINT32:
        return int(typed.value)
    if per_layer and typed.type == GGUFValueType.ARRAY and typed.element_type.name in _INT_ELEMENTS:
        items = list(typed.value)
        if items and all(0 <= int(v) < 2**32 for v in items):
            return int(items[0])
        got = "an empty array" if not items else "negative values"
    else:
        got = typed.type.name + (f" of {typed.element_type.name}" if typed.element_type is not None else "")
    want = "UINT32" + (" or an ARRAY of UINT32/INT32 (one per layer)" if per_layer else "")
    raise MetadataTypeError(f"{prefix}metadata key {key} must be {want}, not {got}")
