"""Interoperation with gguf-py (llama.cpp's ``gguf`` package) and with array libraries (torch, DLPack).

What goes in — our writer and codecs accept, without importing torch:

* a gguf-py ``GGUFReader`` as the whole source of :func:`gguf_kquant.write` / :class:`GGUFWriter`
  (``write("copy.gguf", gguf.GGUFReader("in.gguf"))`` — metadata, tensors, GGUF version and byte order:
  the copy is byte-identical to the file gguf-py read);
* its ``ReaderField`` objects as metadata values (``reader.fields`` as a whole metadata mapping: the three
  header pseudo-fields ``GGUF.version/tensor_count/kv_count`` are skipped) and its ``ReaderTensor`` objects
  as tensors (copied as raw bytes, swapped if the output's byte order differs);
* torch tensors (CPU; any float dtype — bfloat16 and float8 included — int, bool; ``requires_grad``
  tensors are detached) and anything exposing DLPack (``__dlpack__``) or ``__array__`` (JAX/CuPy-on-host,
  xarray, pandas...), through :func:`as_numpy`.  A bfloat16 tensor is written as BF16 (its 16-bit
  patterns, unchanged) and quantized from its exact float32 values.

What comes out — for gguf-py's ``GGUFWriter``: our reader returns numeric metadata arrays as numpy arrays
(fast, exact dtype), which gguf-py's writer rejects (it wants a ``Sequence``).  One call converts a whole
:class:`~gguf_kquant.container.values.Metadata` with its exact GGUF types::

    gguf_kquant.interop.add_to_gguf_writer(gguf_writer, f.metadata)

and :func:`gguf_py_value` converts one ``Value`` into ``add_key_value``'s ``(val, vtype, sub_type)``.
Our quantized bytes go to gguf-py as they are: ``gw.add_tensor(name, q, raw_shape=shape,
raw_dtype=gguf.GGMLQuantizationType.Q4_K)`` with ``q = gguf_kquant.quantize(x, "Q4_K")``.

Shapes of raw bytes: :func:`gguf_kquant.quantize` returns ``(n_rows, row_bytes)``; a reader's
``TensorInfo.raw()`` is the same bytes as a flat ``(nbytes,)`` view (the file's layout, whatever the tensor's
rank) — ``t.raw().reshape(q.shape)`` equals ``q`` for a 2-D tensor.  :func:`gguf_kquant.dequantize` and the
writer accept either form; give the writer ``shape=`` for flat bytes.
"""

from __future__ import annotations

import numpy as np

from .container.values import SCALAR_DTYPES, GGUFValueType, Value
from .errors import GGUFError, WriteError

__all__ = ["as_numpy", "is_array_like", "add_to_gguf_writer", "gguf_py_value", "field_value",
           "is_gguf_reader", "is_reader_field", "is_reader_tensor"]

_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # gguf-py's pseudo-fields


# ------------------------------------------------------------------------------------------------------
# arrays: torch, DLPack, __array__
# ------------------------------------------------------------------------------------------------------
def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach") and hasattr(x, "dtype")


def is_array_like(x) -> bool:
    """A torch tensor, or an object exposing DLPack or the numpy array protocols (not a numpy array, not
    bytes)."""
    if isinstance(x, (np.ndarray, bytes, bytearray, memoryview, str)):
        return False
    return _is_torch(x) or any(hasattr(x, a) for a in ("__dlpack__", "__array__", "__array_interface__"))


def as_numpy(x, *, bf16_bits: bool = False):
    """``x`` as a numpy array (no copy where the library shares memory); anything that is not array-like
    (numpy arrays, bytes, lists...) is returned unchanged.

    Dtypes numpy lacks: bfloat16 becomes its exact float32 values, or with ``bf16_bits=True`` a uint16
    array of its bit patterns (what a BF16 tensor stores); float8 types become float32 (exact).
    """
    if not is_array_like(x):
        return x
    if _is_torch(x):
        return _torch_to_numpy(x, bf16_bits)
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, ValueError, RuntimeError) as exc:
            if not (hasattr(x, "__array__") or hasattr(x, "__array_interface__")):
                raise GGUFError(f"cannot read a {type(x).__name__} through DLPack: {exc}") from None
    return np.asarray(x)


def _torch_to_numpy(t, bf16_bits: bool) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        raise GGUFError(f"a torch tensor on {t.device} cannot be read in place; move it to the CPU first (.cpu())")
    if t.is_complex():
        raise GGUFError(f"complex tensors ({t.dtype}) have no GGUF type")
    t = t.resolve_conj().resolve_neg()
    name = str(t.dtype).removeprefix("torch.")
    if name == "bfloat16":
        f32 = t.float().numpy()  # bf16 -> f32 is exact: the bits shifted up by 16
        return (f32.view(np.uint32) >> 16).astype(np.uint16) if bf16_bits else f32
    if name.startswith("float8") or name.startswith("float4"):
        return t.float().numpy()
    try:
        return t.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy lacks (uint16..64 in older torch, quantized...)
        if t.is_floating_point():
            return t.float().numpy()
        raise GGUFError(f"torch dtype {t.dtype} has no numpy equivalent") from None


def is_bfloat16(x) -> bool:
    """True for a torch (or other array-library) tensor whose dtype is bfloat16."""
    return str(getattr(x, "dtype", "")).endswith("bfloat16")


# ------------------------------------------------------------------------------------------------------
# gguf-py reader objects
# ------------------------------------------------------------------------------------------------------
def is_gguf_reader(obj) -> bool:
    return hasattr(obj, "fields") and hasattr(obj, "tensors") and hasattr(obj, "data_offset") and \
        hasattr(obj, "endianess")


def is_reader_field(obj) -> bool:
    return all(hasattr(obj, a) for a in ("parts", "data", "types", "name", "offset")) and not isinstance(obj, dict)


def is_reader_tensor(obj) -> bool:
    return all(hasattr(obj, a) for a in ("tensor_type", "n_bytes", "data_offset", "data", "field"))


def _order(dt: np.dtype) -> str:
    """'<' or '>' of a numeric dtype ('=' and '|' are the host's order)."""
    if dt.byteorder in "<>":
        return dt.byteorder
    return "<" if np.little_endian else ">"


def field_value(field) -> Value:
    """A gguf-py ``ReaderField`` as a typed :class:`Value` (its GGUF types kept, arrays of arrays too)."""
    parts = list(field.parts)
    start = 3 if len(parts) > 1 else 0  # [key_len, key, type, value...]; header pseudo-fields: [value]
    if not field.types:
        raise WriteError(f"metadata key {field.name!r}: gguf-py field without a type")
    value, end = _parse(parts, start, GGUFValueType(int(field.types[0])), field.name)
    if end != len(parts):
        raise WriteError(f"metadata key {field.name!r}: gguf-py field has {len(parts) - end} unexplained parts")
    return value


def _parse(parts: list, i: int, vt: GGUFValueType, key: str) -> tuple:
    if vt == GGUFValueType.STRING:
        return Value(_text(parts[i + 1], key), vt), i + 2
    if vt in SCALAR_DTYPES:
        v = parts[i][0]
        return Value(bool(v) if vt == GGUFValueType.BOOL else v.item(), vt), i + 1
    if vt != GGUFValueType.ARRAY:
        raise WriteError(f"metadata key {key!r}: unknown GGUF value type {vt}")
    et = GGUFValueType(int(parts[i][0]))
    n = int(parts[i + 1][0])
    i += 2
    if et == GGUFValueType.STRING:
        items = [_text(parts[i + 2 * k + 1], key) for k in range(n)]
        return Value(items, vt, et), i + 2 * n
    if et in SCALAR_DTYPES:
        native = SCALAR_DTYPES[et].newbyteorder("=")
        items = np.array([p[0] for p in parts[i:i + n]], dtype=native) if n else np.empty(0, native)
        if et == GGUFValueType.BOOL:
            items = [bool(b) for b in items]
        return Value(items, vt, et), i + n
    inner = []
    for _ in range(n):
        v, i = _parse(parts, i, et, key)
        inner.append(v)
    return Value(inner, vt, et), i


def _text(part: np.ndarray, key: str) -> str:
    try:
        return part.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WriteError(f"metadata key {key!r}: string is not valid UTF-8 ({exc.reason})") from None


def reader_field_items(fields) -> list:
    """(key, Value) pairs of ``GGUFReader.fields`` (or any mapping/list of ReaderFields), without gguf-py's
    header pseudo-fields."""
    items = fields.values() if hasattr(fields, "values") else fields
    return [(f.name, field_value(f)) for f in items
            if not (f.name in _HEADER_FIELDS and len(f.parts) == 1)]


class ReaderTensorSource:
    """A gguf-py ``ReaderTensor`` seen as the writer sees our TensorInfo: raw bytes in the file's order."""

    def __init__(self, t):
        from .types import GGMLType

        self.name = str(t.name)
        self.shape = tuple(int(d) for d in reversed(list(t.shape)))  # gguf-py keeps ggml's ne order
        self.ggml_type = GGMLType(int(t.tensor_type))
        self.offset = int(t.data_offset)
        self.nbytes = int(t.n_bytes)
        self._data = t.data
        self.byte_order = _order(t.field.parts[2].dtype)  # n_dims, read in the file's order
        filename = getattr(t.data, "filename", None)  # gguf-py maps the file with np.memmap
        if filename is not None:
            self.path = filename  # an input: the writer refuses to write over it

    def raw(self) -> np.ndarray:
        return np.ascontiguousarray(self._data).reshape(-1).view(np.uint8)


def reader_parts(reader) -> dict:
    """What a gguf-py ``GGUFReader`` holds, as :class:`GGUFWriter` options: metadata, tensors, version,
    byte order."""
    version = int(reader.fields["GGUF.version"].parts[0][0]) if "GGUF.version" in reader.fields else 3
    return {"metadata": reader_field_items(reader.fields),
            "tensors": [ReaderTensorSource(t) for t in reader.tensors],
            "version": version,
            "byte_order": ">" if str(getattr(reader.endianess, "name", "LITTLE")) == "BIG" else "<"}


# ------------------------------------------------------------------------------------------------------
# our values into gguf-py's writer
# ------------------------------------------------------------------------------------------------------
def gguf_py_value(typed: Value) -> tuple:
    """``(val, vtype, sub_type)`` for gguf-py's ``GGUFWriter.add_key_value`` (exact GGUF types).

    gguf-py cannot write empty arrays, nor type the inner arrays of an array of arrays (it infers them from
    the first element): both are refused with :class:`~gguf_kquant.errors.WriteError`."""
    import gguf

    vt = gguf.GGUFValueType(int(typed.type))
    if typed.type != GGUFValueType.ARRAY:
        return typed.value, vt, None
    if len(typed.value) == 0:
        raise WriteError("gguf-py's writer cannot write an empty array")
    if typed.element_type == GGUFValueType.ARRAY:
        raise WriteError("gguf-py's writer infers the types of nested arrays; it cannot keep them exactly")
    items = typed.value.tolist() if isinstance(typed.value, np.ndarray) else list(typed.value)
    return items, vt, gguf.GGUFValueType(int(typed.element_type))


def add_to_gguf_writer(writer, metadata, *, skip=("general.architecture",)) -> None:
    """Add every key of ``metadata`` (our reader's :class:`Metadata`, or a mapping typed by default) to
    gguf-py's ``GGUFWriter`` with its exact GGUF type.  ``general.architecture`` is skipped by default: gguf-py's
    writer adds it itself (``GGUFWriter(path, arch)``)."""
    from .container.values import typed_items

    for key, typed in typed_items(metadata):
        if key in skip:
            continue
        try:
            val, vt, sub = gguf_py_value(typed)
        except WriteError as exc:
            raise WriteError(f"metadata key {key!r}: {exc}") from None
        writer.add_key_value(key, val, vt, sub_type=sub)
