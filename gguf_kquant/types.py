"""The ggml type table: the single source of truth for every tensor type.

One row per ggml type id (``ggml/include/ggml.h``; ids and names agree with ggml and with ``gguf.GGMLQuantizationType``,
see tests/test_types.py).  Each row says how many elements a block holds, how many bytes it takes, the numpy
structured dtype of one block, which codec modules implement it, whether ggml's quantizer reads an importance
matrix, and which type llama-quantize falls back to when a row is not a multiple of the block size.

Reader, writer, codecs, the mix planner and the CLI all ask this table; adding a type means one row here (and
its block dtype) plus one codec module.

Kernels register themselves with the row they implement (checked when the module is imported)::

    @register_kernel("Q4_K", "quantize")          # in gguf_kquant/codecs/kquants.py
    @njit(cache=True, nogil=True, parallel=True)
    def quantize_q4_k(x, out): ...

* ``quantize(x, out)``               x: float32 (n_rows, n_per_row), possibly read-only; out: uint8
                                      (n_rows, row_bytes) — ggml's ``_ref`` path (``ggml_quantize_chunk``
                                      without an importance matrix)
* ``quantize_imatrix(x, qw, out)``   qw: float32 (n_per_row,) — ggml's ``_impl`` path
* ``dequantize(raw, out)``           raw: uint8 (n_rows, row_bytes), out: float32 (n_rows, n_per_row)

The row names the modules that register its kernels; :meth:`TypeInfo.kernel` imports them on first use, so
nothing is imported or compiled for a type that is not used.  A failing import raises its own error.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from .errors import UnknownTypeError


class GGMLType(enum.IntEnum):
    """ggml's ``enum ggml_type``.  Ids 4, 5, 31-33 and 36-38 were removed from ggml and are not valid in files."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


class Imatrix(enum.Enum):
    """How ggml's ``ggml_quantize_chunk`` treats an importance matrix for a type."""

    IGNORED = "ignored"  # accepted and ignored (float types, Q8_0)
    OPTIONAL = "optional"  # without: the _ref algorithm; with: the _impl algorithm
    REQUIRED = "required"  # ggml_quantize_requires_imatrix() is true


def _blocks(*fields) -> np.dtype:
    return np.dtype(list(fields))


_F16 = "<f2"
QK_K = 256  # elements per k-quant super-block

# Block layouts, mirroring ggml-common.h.  Field names follow ggml's structs.
_BLOCK_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    # x = d * q,  q in [-8, 7] (nibbles stored + 8): 4.5 bits per weight
    "Q4_0": _blocks(("d", _F16), ("qs", "u1", 16)),
    # x = d * q + m,  q in [0, 15]: 5 bits per weight
    "Q4_1": _blocks(("d", _F16), ("m", _F16), ("qs", "u1", 16)),
    # x = d * q,  q in [-16, 15]; 5th bits packed in qh: 5.5 bits per weight
    "Q5_0": _blocks(("d", _F16), ("qh", "u1", 4), ("qs", "u1", 16)),
    # x = d * q + m,  q in [0, 31]: 6 bits per weight
    "Q5_1": _blocks(("d", _F16), ("m", _F16), ("qh", "u1", 4), ("qs", "u1", 16)),
    # x = d * q,  q int8: 8.5 bits per weight
    "Q8_0": _blocks(("d", _F16), ("qs", "i1", 32)),
    # Q8_0 plus s = d * sum(q) (used as a matmul operand, never stored by llama-quantize)
    "Q8_1": _blocks(("d", _F16), ("s", _F16), ("qs", "i1", 32)),
    # 16 sub-blocks of 16; 4-bit scale and min per sub-block: 2.625 bits per weight
    "Q2_K": _blocks(("scales", "u1", 16), ("qs", "u1", 64), ("d", _F16), ("dmin", _F16)),
    # 16 sub-blocks of 16; 6-bit scales; high bit in hmask: 3.4375 bits per weight
    "Q3_K": _blocks(("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", _F16)),
    # 8 sub-blocks of 32; 6-bit scales and mins: 4.5 bits per weight
    "Q4_K": _blocks(("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qs", "u1", 128)),
    # as Q4_K plus a 5th bit in qh: 5.5 bits per weight
    "Q5_K": _blocks(("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)),
    # 16 sub-blocks of 16; int8 scales; 6-bit quants: 6.5625 bits per weight
    "Q6_K": _blocks(("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", _F16)),
    # float32 d, int8 quants, int16 sums of 16 (intermediate for dot products)
    "Q8_K": _blocks(("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)),
    # x = d * b,  b in {-1, +1} (bit set: +1): 1.125 bits per weight
    "Q1_0": _blocks(("d", _F16), ("qs", "u1", 16)),
    # x = d * q,  q 2-bit: 2.25 bits per weight
    "Q2_0": _blocks(("d", _F16), ("qs", "u1", 16)),
    # x = 2^(e-127) * e2m1(q)  (OCP microscaling: E8M0 shared exponent, E2M1 nibbles): 4.25 bits per weight
    "MXFP4": _blocks(("e", "u1"), ("qs", "u1", 16)),
    # 4 sub-blocks of 16 with a UE4M3 scale each, E2M1 nibbles: 4.5 bits per weight
    "NVFP4": _blocks(("d", "u1", 4), ("qs", "u1", 32)),
    # ternary {-1, 0, 1}: 5 trits per byte in qs, 4 per byte in qh: 1.6875 bits per weight
    "TQ1_0": _blocks(("qs", "u1", 48), ("qh", "u1", 4), ("d", _F16)),
    # ternary, 2 bits per element: 2.0625 bits per weight
    "TQ2_0": _blocks(("qs", "u1", 64), ("d", _F16)),
    # 8-element groups from a 256-entry E8 lattice grid, signs and scales packed in qs: 2.0625 bits per weight
    "IQ2_XXS": _blocks(("d", _F16), ("qs", "<u2", 32)),
    # 512-entry grid, 4-bit scales: 2.3125 bits per weight
    "IQ2_XS": _blocks(("d", _F16), ("qs", "<u2", 32), ("scales", "u1", 8)),
    # 1024-entry grid: 2.5625 bits per weight
    "IQ2_S": _blocks(("d", _F16), ("qs", "u1", 64), ("qh", "u1", 8), ("scales", "u1", 8)),
    # 4-element groups from a 256-entry grid: 3.0625 bits per weight
    "IQ3_XXS": _blocks(("d", _F16), ("qs", "u1", 96)),
    # 512-entry grid, explicit signs: 3.4375 bits per weight
    "IQ3_S": _blocks(("d", _F16), ("qs", "u1", 64), ("qh", "u1", 8), ("signs", "u1", 32), ("scales", "u1", 4)),
    # 2048-entry ternary grid, 3-bit scales and delta sign in qh: 1.5625 bits per weight
    "IQ1_S": _blocks(("d", _F16), ("qs", "u1", 32), ("qh", "<u2", 8)),
    # as IQ1_S with per-16 deltas; the fp16 super-block scale is spread over the scales' top nibbles: 1.75 bpw
    "IQ1_M": _blocks(("qs", "u1", 32), ("qh", "u1", 16), ("scales", "u1", 8)),
    # x = d * kvalues_iq4nl[q] (non-linear 4-bit): 4.5 bits per weight
    "IQ4_NL": _blocks(("d", _F16), ("qs", "u1", 16)),
    # IQ4_NL values in 256-blocks with 6-bit sub-block scales: 4.25 bits per weight
    "IQ4_XS": _blocks(("d", _F16), ("scales_h", "<u2"), ("scales_l", "u1", 4), ("qs", "u1", 128)),
}


# The kernel operations a codec can register (see the module docstring for their signatures).
OPS = ("quantize", "quantize_imatrix", "dequantize")

# (type, op) -> kernel; filled by the codec modules' @register_kernel as they are imported.
_KERNELS: dict[tuple[GGMLType, str], Callable] = {}


@dataclass(frozen=True)
class TypeInfo:
    """One row of the type table.  See the module docstring."""

    ggml_type: GGMLType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    codec: tuple[str, ...] = ()  # modules under gguf_kquant.codecs that register this type's kernels
    imatrix: Imatrix = Imatrix.IGNORED
    fallback: Optional[GGMLType] = None  # llama-quantize's type when ne0 % block_size != 0 (tensor_type_fallback)

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def id(self) -> int:
        return int(self.ggml_type)

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    @property
    def is_integer(self) -> bool:
        """I8..I64: stored and read as integers, never quantized or decoded to float."""
        return self.name.startswith("I") and not self.name.startswith("IQ")

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def block_dtype(self) -> np.dtype:
        """numpy dtype of one block (structured for quantized types)."""
        return _BLOCK_DTYPES[self.name]

    def field_offset(self, field: str) -> int:
        """Byte offset of ``field`` inside one block (kernels take their offsets from here, not literals)."""
        return self.block_dtype.fields[field][1]

    @property
    def ops(self) -> tuple[str, ...]:
        """The kernel operations this row must have: what ggml can do with the type."""
        if not self.codec:
            return ()
        ops = ["dequantize"]
        if self.imatrix is not Imatrix.REQUIRED:
            ops.append("quantize")
        if self.imatrix is not Imatrix.IGNORED:
            ops.append("quantize_imatrix")
        return tuple(ops)

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of ``n_per_row`` elements (``ggml_row_size``).  Raises if not block-aligned."""
        from .errors import ShapeError

        if n_per_row % self.block_size:
            raise ShapeError(
                f"row length {n_per_row} is not a multiple of {self.name}'s block size {self.block_size}"
            )
        return n_per_row // self.block_size * self.type_size

    def nbytes(self, shape) -> int:
        """Bytes of a tensor of numpy ``shape`` (last axis = ggml's ne0).  Python ints: no overflow."""
        n_elements = 1
        for dim in shape:
            n_elements *= int(dim)
        n_per_row = int(shape[-1]) if len(shape) else 1
        if n_per_row == 0:
            return 0
        return (n_elements // n_per_row) * self.row_bytes(n_per_row)

    def has_kernel(self, op: str) -> bool:
        return op in self.ops

    def kernel(self, op: str) -> Callable:
        """The kernel registered for ``op`` (one of :data:`OPS`), importing this row's codec modules once."""
        if op not in OPS:
            raise ValueError(f"unknown kernel operation {op!r}; one of {OPS}")
        fn = _KERNELS.get((self.ggml_type, op))
        if fn is not None:
            return fn
        if op not in self.ops:
            what = {"quantize": "quantizer", "quantize_imatrix": "importance-matrix quantizer",
                    "dequantize": "dequantizer"}[op]
            why = ("it needs an importance matrix" if op == "quantize" and self.imatrix is Imatrix.REQUIRED
                   else "ggml has none" if self.codec else "no codec implements it")
            raise UnknownTypeError(f"ggml type {self.name} (id {self.id}) has no {what}: {why}")
        for module in self.codec:
            importlib.import_module(f"gguf_kquant.codecs.{module}")  # registers; its own errors propagate
        fn = _KERNELS.get((self.ggml_type, op))
        if fn is None:  # a defect, caught by tests/test_types.py for every row
            raise UnknownTypeError(f"ggml type {self.name}: no module of {self.codec} registers a {op} kernel")
        return fn


def register_kernel(qtype, op: str):
    """Decorator for codec kernels: ``@register_kernel("Q4_K", "quantize")``.  Checked when the module loads.

    The kernel's module must be one the row names, the op one the row has, and each (type, op) is registered
    once — so the table and the codecs cannot drift apart.
    """

    def register(fn):
        row = type_info(qtype)
        module = getattr(fn, "__module__", "") or ""
        short = module.rsplit(".", 1)[-1]
        if short not in row.codec:
            raise ImportError(f"{module} registers a {op} kernel for {row.name}, whose row names {row.codec}")
        if op not in row.ops:
            raise ImportError(f"{module} registers a {op} kernel for {row.name}, whose row has only {row.ops}")
        key = (row.ggml_type, op)
        if key in _KERNELS and _KERNELS[key] is not fn:
            raise ImportError(f"two {op} kernels registered for {row.name}")
        _KERNELS[key] = fn
        return fn

    return register


_T = GGMLType
_OPT = Imatrix.OPTIONAL
_REQ = Imatrix.REQUIRED
_FLOATS = ("floats",)
_LEGACY = ("legacy", "legacy_imatrix")
_KQUANTS = ("kquants", "kquants_imatrix")

# fmt: off
#        type        block  bytes  codec modules  imatrix     fallback (llama-quant.cpp tensor_type_fallback)
_ROWS = [
    TypeInfo(_T.F32,       1,   4, _FLOATS),
    TypeInfo(_T.F16,       1,   2, _FLOATS),
    TypeInfo(_T.BF16,      1,   2, _FLOATS),
    TypeInfo(_T.F64,       1,   8),
    TypeInfo(_T.I8,        1,   1),
    TypeInfo(_T.I16,       1,   2),
    TypeInfo(_T.I32,       1,   4),
    TypeInfo(_T.I64,       1,   8),
    TypeInfo(_T.Q4_0,     32,  18, _LEGACY, _OPT),
    TypeInfo(_T.Q4_1,     32,  20, _LEGACY, _OPT),
    TypeInfo(_T.Q5_0,     32,  22, _LEGACY, _OPT),
    TypeInfo(_T.Q5_1,     32,  24, _LEGACY, _OPT),
    TypeInfo(_T.Q8_0,     32,  34, _LEGACY),
    TypeInfo(_T.Q8_1,     32,  36, _LEGACY),
    TypeInfo(_T.Q2_K,    256,  84, _KQUANTS, _OPT, _T.Q4_0),
    TypeInfo(_T.Q3_K,    256, 110, _KQUANTS, _OPT, _T.Q4_0),
    TypeInfo(_T.Q4_K,    256, 144, _KQUANTS, _OPT, _T.Q5_0),
    TypeInfo(_T.Q5_K,    256, 176, _KQUANTS, _OPT, _T.Q5_1),
    TypeInfo(_T.Q6_K,    256, 210, _KQUANTS, _OPT, _T.Q8_0),
    TypeInfo(_T.Q8_K,    256, 292, _KQUANTS),
    TypeInfo(_T.IQ2_XXS, 256,  66, ("iq2",), _REQ, _T.IQ4_NL),
    TypeInfo(_T.IQ2_XS,  256,  74, ("iq2",), _REQ, _T.IQ4_NL),
    TypeInfo(_T.IQ3_XXS, 256,  98, ("iq3",), _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ1_S,   256,  50, ("iq1",), _REQ, _T.IQ4_NL),
    TypeInfo(_T.IQ4_NL,   32,  18, ("iq4",), _OPT),
    TypeInfo(_T.IQ3_S,   256, 110, ("iq3",), _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ2_S,   256,  82, ("iq2",), _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ4_XS,  256, 136, ("iq4",), _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ1_M,   256,  56, ("iq1",), _OPT, _T.IQ4_NL),
    TypeInfo(_T.TQ1_0,   256,  54, ("ternary",), fallback=_T.Q4_0),
    TypeInfo(_T.TQ2_0,   256,  66, ("ternary",), fallback=_T.Q4_0),
    TypeInfo(_T.MXFP4,    32,  17, ("fp4",)),
    TypeInfo(_T.NVFP4,    64,  36, ("fp4",)),
    TypeInfo(_T.Q1_0,    128,  18, ("lowbit",)),
    TypeInfo(_T.Q2_0,     64,  18, ("lowbit",), fallback=_T.Q4_0),
]
# fmt: on

TYPES: dict[GGMLType, TypeInfo] = {row.ggml_type: row for row in _ROWS}
assert set(TYPES) == set(GGMLType), "every GGMLType needs a table row"
for _row in _ROWS:
    assert _row.block_dtype.itemsize == _row.type_size, f"{_row.name}: block dtype size != type_size"

TypeLike = Union[str, int, GGMLType, TypeInfo]


def type_info(qtype: TypeLike) -> TypeInfo:
    """Look up a row by name (``"q4_k"``, case-insensitive), id (``12``), :class:`GGMLType` or ``gguf``'s enum.

    >>> type_info("Q4_K").type_size
    144
    """
    if isinstance(qtype, TypeInfo):
        return qtype
    if isinstance(qtype, str):
        try:
            return TYPES[GGMLType[qtype.strip().upper()]]
        except KeyError:
            known = ", ".join(t.name for t in GGMLType)
            raise UnknownTypeError(f"unknown ggml type name {qtype!r}; known: {known}") from None
    try:
        return TYPES[GGMLType(int(qtype))]
    except (ValueError, TypeError):
        raise UnknownTypeError(f"unknown ggml type id {qtype!r}") from None


def is_known_type_id(type_id: int) -> bool:
    return type_id in GGMLType._value2member_map_
