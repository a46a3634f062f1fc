"""The ggml type table: the single source of truth for every tensor type.

One row per ggml type id (``ggml/include/ggml.h``; ids and names agree with ggml and with ``gguf.GGMLQuantizationType``,
see tests/test_types.py).  Each row says how many elements a block holds, how many bytes it takes, the numpy
structured dtype of one block, which codec module implements it, whether ggml's quantizer reads an importance
matrix, and which type llama-quantize falls back to when a row is not a multiple of the block size.

Reader, writer, codecs, the mix planner and the CLI all ask this table; adding a type touches only this file
and its codec module.

Codec modules (``gguf_kquant.codecs.<codec>``) export, by convention, for a type named e.g. ``Q4_K``:

* ``quantize_q4_k(x, out)``            x: float32 (n_rows, n_per_row), out: uint8 (n_rows, row_bytes) — ggml's
                                        ``_ref`` path (what ``ggml_quantize_chunk`` does without an imatrix)
* ``quantize_imatrix_q4_k(x, qw, out)`` qw: float32 (n_per_row,) — ggml's ``_impl`` path, in the module
                                        ``<codec>_imatrix`` (e.g. ``kquants_imatrix``)
* ``dequantize_q4_k(raw, out)``        raw: uint8 (n_rows, row_bytes), out: float32 (n_rows, n_per_row)

Kernels are looked up lazily (:meth:`TypeInfo.kernel`) so that nothing is imported or compiled for a type
that is not used.
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
}


@dataclass(frozen=True)
class TypeInfo:
    """One row of the type table.  See the module docstring."""

    ggml_type: GGMLType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    codec: Optional[str] = None  # module under gguf_kquant.codecs, None: no codec yet
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
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def block_dtype(self) -> np.dtype:
        """numpy dtype of one block (structured for quantized types; raw bytes where we have no layout yet)."""
        return _BLOCK_DTYPES.get(self.name, np.dtype((np.uint8, (self.type_size,))))

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

    def kernel(self, op: str) -> Callable:
        """The codec kernel for ``op`` in {"quantize", "quantize_imatrix", "dequantize"}, imported lazily."""
        if self.codec is None:
            raise UnknownTypeError(f"no codec for ggml type {self.name} (id {self.id}) yet")
        # The importance-matrix (_impl) algorithms live beside their family in "<codec>_imatrix".
        module_name = self.codec + ("_imatrix" if op == "quantize_imatrix" else "")
        try:
            module = importlib.import_module(f"gguf_kquant.codecs.{module_name}")
        except ModuleNotFoundError:
            module = None
        fn = getattr(module, f"{op}_{self.name.lower()}", None)
        if fn is None:
            raise UnknownTypeError(f"ggml type {self.name} (id {self.id}) has no {op.replace('_', ' ')} kernel")
        return fn


_T = GGMLType
_OPT = Imatrix.OPTIONAL
_REQ = Imatrix.REQUIRED

# fmt: off
#        type        block  bytes  codec      imatrix     fallback (llama-quant.cpp tensor_type_fallback)
_ROWS = [
    TypeInfo(_T.F32,       1,   4, "floats"),
    TypeInfo(_T.F16,       1,   2, "floats"),
    TypeInfo(_T.BF16,      1,   2, "floats"),
    TypeInfo(_T.F64,       1,   8),
    TypeInfo(_T.I8,        1,   1),
    TypeInfo(_T.I16,       1,   2),
    TypeInfo(_T.I32,       1,   4),
    TypeInfo(_T.I64,       1,   8),
    TypeInfo(_T.Q4_0,     32,  18, "legacy", _OPT),
    TypeInfo(_T.Q4_1,     32,  20, "legacy", _OPT),
    TypeInfo(_T.Q5_0,     32,  22, "legacy", _OPT),
    TypeInfo(_T.Q5_1,     32,  24, "legacy", _OPT),
    TypeInfo(_T.Q8_0,     32,  34, "legacy"),
    TypeInfo(_T.Q8_1,     32,  36, "legacy"),
    TypeInfo(_T.Q2_K,    256,  84, "kquants", _OPT, _T.Q4_0),
    TypeInfo(_T.Q3_K,    256, 110, "kquants", _OPT, _T.Q4_0),
    TypeInfo(_T.Q4_K,    256, 144, "kquants", _OPT, _T.Q5_0),
    TypeInfo(_T.Q5_K,    256, 176, "kquants", _OPT, _T.Q5_1),
    TypeInfo(_T.Q6_K,    256, 210, "kquants", _OPT, _T.Q8_0),
    TypeInfo(_T.Q8_K,    256, 292, "kquants"),
    TypeInfo(_T.IQ2_XXS, 256,  66, None, _REQ, _T.IQ4_NL),
    TypeInfo(_T.IQ2_XS,  256,  74, None, _REQ, _T.IQ4_NL),
    TypeInfo(_T.IQ3_XXS, 256,  98, None, _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ1_S,   256,  50, None, _REQ, _T.IQ4_NL),
    TypeInfo(_T.IQ4_NL,   32,  18, None, _OPT),
    TypeInfo(_T.IQ3_S,   256, 110, None, _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ2_S,   256,  82, None, _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ4_XS,  256, 136, None, _OPT, _T.IQ4_NL),
    TypeInfo(_T.IQ1_M,   256,  56, None, _OPT, _T.IQ4_NL),
    TypeInfo(_T.TQ1_0,   256,  54, None, _OPT, _T.Q4_0),
    TypeInfo(_T.TQ2_0,   256,  66, None, _OPT, _T.Q4_0),
    TypeInfo(_T.MXFP4,    32,  17, None, _OPT),
    TypeInfo(_T.NVFP4,    64,  36, None, _OPT),
    TypeInfo(_T.Q1_0,    128,  18, None, _OPT),
    TypeInfo(_T.Q2_0,     64,  18, None, _OPT, _T.Q4_0),
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
