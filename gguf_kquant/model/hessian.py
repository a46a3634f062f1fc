"""Full input covariances ("Hessians") of a model's weight matrices, collected by running llama.cpp.

For a weight ``W`` applied as ``y = W x``, error-feedback (GPTQ-style) rounding needs the whole matrix
``H = sum_t x_t x_t^T`` over calibration tokens ``t``; an importance matrix (llama-imatrix) keeps only its
diagonal divided by the token count.  :func:`collect_hessians` evaluates a text with llama.cpp (through
llama-cpp-python's ctypes API, an optional dependency) exactly as llama-imatrix does — the text is tokenized
with BOS, cut into chunks of ``ctx`` tokens, each chunk starts with BOS and is decoded on its own with logits
for every token — and, from the scheduler's eval callback (``cb_eval``), adds ``X^T X`` (float64) of the
input ``X`` of every ``MUL_MAT`` whose first operand is a model weight.

Mixture-of-experts weights (``MUL_MAT_ID``: a 3-D tensor, one matrix per expert) get one matrix per expert,
over the tokens routed to it (the ``ids`` operand, as llama-imatrix counts them), listed as the weight
``expert_weight(name, e)`` = ``name[e]``; the expert count of each such weight is in ``hessian.expert_weights``
/ ``hessian.expert_counts``.  An expert no token was routed to has no matrix.  Not collected (the quantizer
falls back to the imatrix for them; :attr:`HessianSummary.skipped` says why): other 3-D weights, inputs of
types other than F32/F16/BF16, and inputs wider than ``max_n_in`` (default 16384: an ``n_in``-wide matrix is
``8 n_in^2`` bytes while collecting).  Weights that read one input tensor (``attn_q/k/v``, ``ffn_gate/up``,
``ffn_gate_exps/up_exps`` expert by expert) share one matrix.  Memory: the accumulators (``n_in^2 x 8`` bytes
per distinct input, e.g. ~1.4 GB per layer of a 7B Llama: three 4096-wide inputs and one 11008-wide) and one
chunk's input.  They are held within ``max_memory`` (default: half the memory available) by passes: the first
pass over the text takes the matrices that fit, in graph order, and each further pass the next ones; each
pass's matrices are written before the next starts, and the file does not depend on how many passes there
were.

The file is a GGUF (``general.type = "hessian"``):

* one F32 tensor ``<first weight>.hessian`` per distinct input, for H = the SUM of ``x x^T`` over its tokens
  (not the mean).  By ``hessian.layout``:

  - ``"factor_upper"`` (written by default): V, the upper triangular factor of the dampened matrix,
    ``H + damp * mean(diag H) * I = V V^T`` with ``damp`` = ``hessian.damp`` (FLOAT32), as an upper triangle
    packed by rows (a 1-D tensor of ``n_in (n_in + 1) / 2`` values, row i from its diagonal on).  V is what
    error feedback works with (:mod:`gguf_kquant.codecs.gptq`): factorised once here, not at every
    quantization (on SmolLM2-135M a fifth of a quantization's time).  H's own diagonal, exact, is the 1-D F32
    tensor named in ``hessian.diagonals`` (one name per matrix tensor, in their order); H's other values are
    V V^T's (:meth:`Hessians.matrix`, to float32 rounding);
  - ``"packed_upper"`` (``factor=False``): H's upper triangle packed by rows, half the size of the square;
  - no key (files of earlier versions): the whole ``(n_in, n_in)`` H;
* ``hessian.weights`` / ``hessian.matrices``: string arrays of one length, weight name -> tensor holding its H;
* ``hessian.tokens``: UINT32 array, the token count of each matrix tensor in file order (a single UINT32 is read
  as the count of every one);
* ``hessian.expert_weights`` / ``hessian.expert_counts`` (optional, one length): each 3-D expert weight and its
  number of experts, whose matrices are listed in ``hessian.weights`` as ``name[e]``;
* ``hessian.chunk_size``, ``hessian.chunk_count`` (UINT32), ``hessian.datasets`` (string array: the text).

>>> collect_hessians("model-f16.gguf", "calibration.txt", "model.hessian.gguf", ctx=512)  # doctest: +SKIP
>>> with load_hessians("model.hessian.gguf") as hs:                                     # doctest: +SKIP
...     H, n = hs.for_weight("blk.0.attn_q.weight")        # float32 (n_in, n_in), tokens
...     V, n, damp = hs.factor_for("blk.0.attn_q.weight")  # H + damp * mean(diag H) * I = V V^T
...     im = hs.imatrix()                                  # diag(H)/n: what llama-imatrix would compute
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..container.writer import parse_size
from ..errors import GGUFError, GGUFIOError, InvalidArgumentError
from .progress import Progress

__all__ = ["HessianError", "LlamaCppMissingError", "HessianSummary", "Hessians", "collect_hessians",
           "expert_weight", "factorise_hessians", "load_hessians", "DEFAULT_MAX_N_IN"]

DEFAULT_MAX_N_IN = 16384
GENERAL_TYPE = "hessian"
TENSOR_SUFFIX = ".hessian"
KEY_WEIGHTS = "hessian.weights"
KEY_MATRICES = "hessian.matrices"
KEY_TOKENS = "hessian.tokens"
KEY_CHUNK_SIZE = "hessian.chunk_size"
KEY_CHUNK_COUNT = "hessian.chunk_count"
KEY_DATASETS = "hessian.datasets"
KEY_LAYOUT = "hessian.layout"
KEY_DAMP = "hessian.damp"
KEY_DIAGONALS = "hessian.diagonals"
KEY_EXPERT_WEIGHTS = "hessian.expert_weights"
KEY_EXPERT_COUNTS = "hessian.expert_counts"
# the square matrix H; its upper triangle by rows; the upper triangle of its factor V (H + damp I = V V^T)
LAYOUT_FULL, LAYOUT_PACKED, LAYOUT_FACTOR = "full", "packed_upper", "factor_upper"
_LAYOUTS = (LAYOUT_FULL, LAYOUT_PACKED, LAYOUT_FACTOR)
_UINT32_MAX = 2**32 - 1
_SYMMETRY_TOL = 1e-5  # relative to the largest |H_ij|: files are written exactly symmetric


class HessianError(GGUFError):
    """A Hessian file that is malformed, or a collection that cannot be carried out."""


class LlamaCppMissingError(GGUFError):
    """Collecting Hessians runs the model with llama.cpp, and llama-cpp-python is not installed."""


# ------------------------------------------------------------------------------------------------------
# llama.cpp through ctypes
# ------------------------------------------------------------------------------------------------------
def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppMissingError(f"collecting Hessians runs the model with llama.cpp: pip install "
                                   f"llama-cpp-python ({exc})") from None
    return llama_cpp


# ggml.h (ggml 0.25.3)
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64


class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml.h; :meth:`_GGML.tensor` checks it against ggml's own accessors."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(_GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

# activation types we read, by ggml_type_name: numpy dtype of the stored element
_INPUT_DTYPES = {b"f32": np.dtype(np.float32), b"f16": np.dtype(np.float16), b"bf16": np.dtype(np.uint16)}


class _GGML:
    """The few exported ggml functions the collector calls (names, sizes, backend buffers)."""

    def __init__(self):
        from llama_cpp import _ctypes_extensions, _ggml

        lib = _ctypes_extensions.load_shared_library("ggml-base", _ggml.libggml_base_path)  # own CDLL object
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        for fn, args, res in (("ggml_op_name", [ctypes.c_int], cp), ("ggml_op_desc", [vp], cp),
                              ("ggml_get_name", [vp], cp), ("ggml_type_name", [ctypes.c_int], cp),
                              ("ggml_nelements", [vp], ctypes.c_int64), ("ggml_nbytes", [vp], ctypes.c_size_t),
                              ("ggml_backend_buffer_is_host", [vp], ctypes.c_bool),
                              ("ggml_backend_tensor_get", [vp, vp, ctypes.c_size_t, ctypes.c_size_t], None)):
            f = getattr(lib, fn)
            f.argtypes, f.restype = args, res
        self.lib = lib
        self._op_names: dict = {}

    def op_name(self, op: int) -> bytes:
        name = self._op_names.get(op)
        if name is None:
            name = self._op_names[op] = self.lib.ggml_op_name(op) or b""
        return name

    def tensor(self, ptr: int) -> _GGMLTensor:
        """The tensor at ``ptr``, after checking that our struct reads what ggml's accessors return."""
        t = _GGMLTensor.from_address(ptr)
        lib = self.lib
        ok = t.name == (lib.ggml_get_name(ptr) or b"")
        ne = [t.ne[i] for i in range(GGML_MAX_DIMS)]
        ok = ok and all(n >= 0 for n in ne) and int(np.prod(ne)) == lib.ggml_nelements(ptr)
        # ggml_op_name indexes a table with the op: only once the fields around it read right
        ok = ok and 0 <= t.op < 4096
        op = self.op_name(t.op) if ok else b""
        ok = ok and op != b"" and (op in (b"UNARY", b"GLU") or lib.ggml_op_desc(ptr) == op)
        if not ok:
            raise HessianError(
                "llama.cpp's struct ggml_tensor does not have the layout of ggml.h (ggml 0.25.3) that "
                f"gguf_kquant reads (name {t.name!r} vs ggml_get_name {lib.ggml_get_name(ptr)!r}, ne {ne} vs "
                f"ggml_nelements {lib.ggml_nelements(ptr)}): this llama-cpp-python version is not supported")
        return t

    def rows(self, t: _GGMLTensor) -> np.ndarray:
        """The rows of activation tensor ``t`` (``ne[1]*ne[2]*ne[3]`` rows of ``ne[0]``) as float64."""
        dt = _INPUT_DTYPES[self.lib.ggml_type_name(t.type)]
        x = self.values(t, dt)
        if dt.kind == "u":  # bf16: the high half of a float32
            x = (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float64)

    def values(self, t: _GGMLTensor, dt: np.dtype) -> np.ndarray:
        """Tensor ``t``'s values by its strides, as ``ne[1]*ne[2]*ne[3]`` rows of ``ne[0]`` of type ``dt`` (a
        view of host memory, or a copy of a GPU buffer)."""
        ptr = ctypes.addressof(t)
        ne, nb = list(t.ne)[::-1], list(t.nb)[::-1]
        nbytes = self.lib.ggml_nbytes(ptr)
        if nb[-1] != dt.itemsize or nbytes != dt.itemsize + sum((n - 1) * s for n, s in zip(ne, nb)):
            raise HessianError(f"activation {t.name!r}: strides {nb[::-1]} do not fit its type and shape {ne[::-1]}")
        if not t.buffer or not t.data:
            raise HessianError(f"activation {t.name!r} has no data")
        if self.lib.ggml_backend_buffer_is_host(t.buffer):
            buf = (ctypes.c_char * nbytes).from_address(t.data)
        else:  # a GPU buffer: copy it out, as llama-imatrix does
            buf = ctypes.create_string_buffer(nbytes)
            self.lib.ggml_backend_tensor_get(ptr, buf, 0, nbytes)
        return np.ndarray(tuple(ne), dt, buffer=buf, strides=tuple(nb)).reshape(-1, ne[-1])


def _filter_tensor_name(name: str) -> str:
    """imatrix.cpp's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    parts = name.split("#")
    return parts[1] if len(parts) > 1 else name


def expert_weight(weight: str, expert: int) -> str:
    """How a Hessian file names expert ``expert``'s matrix of the 3-D expert weight ``weight``: ``weight[e]``."""
    return f"{weight}[{int(expert)}]"


def _expert_of(name: str) -> Optional[tuple]:
    """(3-D weight, expert) of a name :func:`expert_weight` made, else None (a model tensor's name)."""
    base, bracket, e = name[:-1].rpartition("[") if name.endswith("]") else ("", "", "")
    return (base, int(e)) if bracket and e.isdigit() else None


# ------------------------------------------------------------------------------------------------------
# The collector (the eval callback)
# ------------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """One matrix: the weights that read the same input, its width, token count and pass; ``h`` is its
    accumulator while its pass runs (None before, and once written)."""

    weights: list
    n: int
    tokens: int = 0  # counted in the first pass, for every matrix
    pass_no: int = -1  # the pass that accumulates it (-1: not planned yet)
    h: Optional[np.ndarray] = None
    rows: int = 0  # rows added in its pass: must come to ``tokens``
    diagonal: Optional[np.ndarray] = None  # H's float32 diagonal, kept from its matrix to its own tensor


def _collect_bytes(widths, rows: int) -> int:
    """Memory the matrices of one pass take while collected: 8 n^2 bytes each (float64), plus, for the
    widest, the product ``X^T X`` before it is added and X itself (``rows`` tokens, read and converted)."""
    widths = list(widths)
    widest = max(widths, default=0)
    return 8 * (sum(n * n for n in widths) + widest * widest + 2 * rows * widest)


class _Collector:
    """``cb_eval`` for llama.cpp's scheduler: asked about every graph node, it wants each ``MUL_MAT`` of a
    weight; called again once the node is computed, it adds ``X^T X`` of the node's input.  An exception
    cannot cross llama.cpp's C frames: it is kept in :attr:`error`, and :attr:`abort` stops the decode.

    Memory is bounded by passes over the text: the first finds every matrix and accumulates those that fit
    ``max_memory`` in graph order; each later pass (:meth:`start_pass`) accumulates the next ones that fit.
    A matrix's sums are the same whichever pass computes them: the file does not depend on ``max_memory``."""

    def __init__(self, llama_cpp, ggml: _GGML, max_n_in: int, max_memory: int, rows: int):
        self.ggml = ggml
        self.rows = rows  # tokens per decode: the rows of an input
        self.max_n_in = max_n_in
        self.max_memory = max_memory
        self.groups: list = []
        self.group_of: dict = {}  # weight name (an expert's: expert_weight) -> _Group
        self.experts_of: dict = {}  # 3-D expert weight name -> its experts' _Groups, by expert
        self.skipped: dict = {}  # weight name -> why it has no matrix
        self.error: Optional[BaseException] = None
        self.chunk = 0
        self.pass_no = 0
        self.n_passes = 1
        self._first_pass_open = True  # the first pass still takes the matrices it meets
        self._inputs: dict = {}  # (input tensor address, data address) -> _Group, within one decode
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._eval)
        self.abort = llama_cpp.ggml_abort_callback(lambda _data: self.error is not None)

    def begin_chunk(self, i: int) -> None:
        self.chunk = i
        self._inputs = {}  # tensor structs and buffers are reused by the next graph

    def _eval(self, ptr, ask, _user_data) -> bool:
        if self.error is not None:
            return False
        try:
            t = self.ggml.tensor(ptr)
            return self._ask(t) if ask else self._collect(t)
        except BaseException as exc:  # noqa: B902 - KeyboardInterrupt too: re-raised after llama_decode
            self.error = exc
            return False

    def _weight(self, t: _GGMLTensor) -> Optional[str]:
        """The name of the model weight ``t`` is (a leaf named ``*.weight``), else None."""
        if self.ggml.op_name(t.op) != b"NONE":
            return None
        name = _filter_tensor_name(t.name.decode("utf-8", "replace"))
        return name if name.endswith(".weight") else None

    def _operands(self, t: _GGMLTensor) -> tuple:
        if not t.src[0] or not t.src[1]:
            return None, None, None
        src0 = self.ggml.tensor(ctypes.addressof(t.src[0].contents))
        src1 = self.ggml.tensor(ctypes.addressof(t.src[1].contents))
        return self._weight(src0), src0, src1

    def _ask(self, t: _GGMLTensor) -> bool:
        op = self.ggml.op_name(t.op)
        if op not in (b"MUL_MAT", b"MUL_MAT_ID"):
            return False
        w, src0, src1 = self._operands(t)
        if w is None:
            return False
        if self.pass_no > 0:  # a later pass: only its own matrices
            groups = self.experts_of.get(w) or [self.group_of.get(w)]
            return any(g is not None and g.pass_no == self.pass_no for g in groups)
        why = self._unsupported(op, src0, src1)
        if why:
            self.skipped.setdefault(w, why)
            return False
        return True

    def _unsupported(self, op: bytes, src0: _GGMLTensor, src1: _GGMLTensor) -> str:
        if op == b"MUL_MAT_ID":
            if src0.ne[3] != 1 or src1.ne[3] != 1:
                return "expert matrices (MUL_MAT_ID) of more than three dimensions"
        elif src0.ne[2] * src0.ne[3] != 1:
            return f"a batch of {src0.ne[2] * src0.ne[3]} matrices (3-D weight)"
        type_name = self.ggml.lib.ggml_type_name(src1.type)
        if type_name not in _INPUT_DTYPES:
            return f"input of type {type_name.decode()}"
        n = src1.ne[0]
        if n > self.max_n_in:
            return f"input width {n} above the limit {self.max_n_in} (H would take {8 * n * n / 2**30:.1f} GiB)"
        return ""

    def _collect(self, t: _GGMLTensor) -> bool:
        w, src0, src1 = self._operands(t)
        if self.ggml.op_name(t.op) == b"MUL_MAT_ID":
            return self._collect_experts(t, w, src0, src1)
        key = (ctypes.addressof(src1), src1.data)
        known = self.group_of.get(w)
        group = self._inputs.get(key)
        if group is not None:  # another weight reading this input was done in this decode
            if known is None:
                group.weights.append(w)
                self.group_of[w] = group
            elif known is not group:
                raise HessianError(f"chunk {self.chunk}: {w} reads the input of {group.weights[0]} but read that "
                                   f"of {known.weights[0]} in earlier chunks")
            return True
        n, rows = src1.ne[0], src1.ne[1] * src1.ne[2] * src1.ne[3]
        if known is None:
            known = self._new_group(w, n)
        elif known.n != n:
            raise HessianError(f"chunk {self.chunk}: the input of {w} is {n} wide, was {known.n}")
        self._inputs[key] = known
        if self.pass_no == 0:
            known.tokens += rows
        if known.pass_no != self.pass_no:
            return True  # a later pass accumulates it
        self._add(known, self._input(w, src1))
        return True

    def _input(self, w: str, src1: _GGMLTensor) -> np.ndarray:
        x = self.ggml.rows(src1)
        if not np.isfinite(x).all():
            row, col = np.argwhere(~np.isfinite(x))[0]
            raise HessianError(f"chunk {self.chunk}: the input of {w} ({src1.name.decode()}) has the non-finite "
                               f"value {x[row, col]!r} at token {row}, column {col}")
        return x

    @staticmethod
    def _add(group: _Group, x: np.ndarray) -> None:
        group.h += x.T @ x  # numpy computes a.T @ a with one symmetric product (syrk): exactly symmetric
        group.rows += x.shape[0]

    def _collect_experts(self, t: _GGMLTensor, w: str, src0: _GGMLTensor, src1: _GGMLTensor) -> bool:
        """``MUL_MAT_ID``: expert e's matrix adds the input rows of the (token, slot) pairs routed to it.  As in
        llama-imatrix: ids is [n_expert_used, n_tokens], src1 [n_in, n_expert_used or 1 (shared), n_tokens]."""
        n, n_slots, n_tokens, n_as = src1.ne[0], src1.ne[1], src1.ne[2], src0.ne[2]
        if not t.src[2]:
            raise HessianError(f"chunk {self.chunk}: the MUL_MAT_ID of {w} has no expert ids")
        ids_t = self.ggml.tensor(ctypes.addressof(t.src[2].contents))
        if self.ggml.lib.ggml_type_name(ids_t.type) != b"i32" or ids_t.ne[1] != n_tokens:
            raise HessianError(f"chunk {self.chunk}: the expert ids of {w} are not i32 [n_used, {n_tokens}]")
        ids = self.ggml.values(ids_t, np.dtype(np.int32)).astype(np.int64)  # [token, slot]
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise HessianError(f"chunk {self.chunk}: an expert id of {w} is outside 0..{n_as - 1}")
        key = (ctypes.addressof(src1), src1.data, "experts")
        done = key in self._inputs  # another weight reading this input was done in this decode
        groups = self._expert_groups(w, n, n_as, key)
        if done:
            return True
        # row of src1 for (token, slot): slot j reads input j of the token (input 0 when it is shared)
        rows = np.arange(n_tokens)[:, None] * n_slots + np.arange(ids.shape[1])[None, :] % n_slots
        x = None
        for e, g in enumerate(groups):
            mine = rows[ids == e]
            if self.pass_no == 0:
                g.tokens += mine.size
            if g.pass_no == self.pass_no and mine.size:
                x = self._input(w, src1) if x is None else x
                self._add(g, x[mine])
        return True

    def _expert_groups(self, w: str, n: int, n_as: int, key: tuple) -> list:
        """The groups of ``w``'s experts: shared with the weights that read the same input in this decode
        (ffn_gate_exps, ffn_up_exps), new in the first pass."""
        names = [expert_weight(w, e) for e in range(n_as)]
        known = self.experts_of.get(w)
        shared = self._inputs.get(key)
        if shared is not None and known is None:
            for name, g in zip(names, shared):
                g.weights.append(name)
                self.group_of[name] = g
            known = self.experts_of[w] = shared
        elif known is None:
            known = self.experts_of[w] = [self._new_group(name, n) for name in names]
        if shared is not None and shared is not known:
            raise HessianError(f"chunk {self.chunk}: {w} reads the input of {shared[0].weights[0]} but read that "
                               f"of {known[0].weights[0]} in earlier chunks")
        if len(known) != n_as or known[0].n != n:
            raise HessianError(f"chunk {self.chunk}: {w} has {n_as} experts of {n} inputs, had {len(known)} of "
                               f"{known[0].n}")
        self._inputs[key] = known
        return known

    def _new_group(self, w: str, n: int) -> _Group:
        """The matrix of weight ``w``'s input, met for the first time (in the first pass)."""
        if self.pass_no > 0:
            raise HessianError(f"chunk {self.chunk}: pass {self.pass_no + 1} meets {w}, which the first pass "
                               f"did not: llama.cpp's graph changed between passes")
        if self._bytes([n]) > self.max_memory:
            raise HessianError(f"chunk {self.chunk}: the input of {w} is {n} wide; collecting its matrix takes "
                               f"{_size(self._bytes([n]))}, above max_memory ({_size(self.max_memory)}): raise "
                               f"max_memory, or lower max_n_in below {n} to skip it")
        group = _Group([w], n)
        fits = self._bytes([g.n for g in self.groups if g.pass_no == 0] + [n]) <= self.max_memory
        self._first_pass_open = self._first_pass_open and fits
        if self._first_pass_open:  # later matrices wait for a later pass, in graph order
            group.pass_no, group.h = 0, np.zeros((n, n), np.float64)
        self.groups.append(group)
        self.group_of[w] = group
        return group

    def _bytes(self, widths) -> int:
        return _collect_bytes(widths, self.rows)

    def plan_passes(self) -> int:
        """After the first pass: the pass of every matrix it could not take (in graph order, as many per pass
        as fit max_memory); the number of passes."""
        widths, pass_no = [], 0
        for g in self.groups:
            if g.pass_no == 0:
                continue
            if pass_no == 0 or self._bytes(widths + [g.n]) > self.max_memory:
                pass_no, widths = pass_no + 1, []
            g.pass_no = pass_no
            widths.append(g.n)
        self.n_passes = pass_no + 1
        return self.n_passes

    def start_pass(self, pass_no: int) -> None:
        """Pass ``pass_no`` (1, 2, ...): its matrices' accumulators; the earlier passes' are written."""
        self.pass_no = pass_no
        for g in self.groups:
            if g.pass_no == pass_no:
                g.h = np.zeros((g.n, g.n), np.float64)

    def end_pass(self) -> None:
        for g in self.groups:
            if g.pass_no == self.pass_no and g.rows != g.tokens:
                raise HessianError(f"{g.weights[0]}: pass {self.pass_no + 1} saw {g.rows} tokens, the first "
                                   f"{g.tokens}: llama.cpp's graph changed between passes")


# ------------------------------------------------------------------------------------------------------
# collect_hessians
# ------------------------------------------------------------------------------------------------------
@dataclass
class HessianSummary:
    """What :func:`collect_hessians` wrote: ``matrices`` maps each tensor to the weights it serves."""

    path: Path
    matrices: dict = field(default_factory=dict)  # tensor name -> [weight names]
    tokens: dict = field(default_factory=dict)  # tensor name -> token count
    skipped: dict = field(default_factory=dict)  # weight name -> why it has no matrix
    n_tokens: int = 0  # tokens evaluated
    chunk_size: int = 0
    chunk_count: int = 0
    seconds: float = 0.0

    @property
    def weights(self) -> list:
        return [w for ws in self.matrices.values() for w in ws]


def _positive(value, what: str, *, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{what} must be a positive integer, not {value!r}")
    return int(value)


def _source(text_path_or_tokens) -> tuple:
    """(text path or None, token array or None) of collect_hessians' second argument."""
    if isinstance(text_path_or_tokens, (str, os.PathLike)):
        return Path(os.fspath(text_path_or_tokens)), None
    try:
        tokens = np.asarray(text_path_or_tokens)
    except (TypeError, ValueError):
        tokens = np.asarray([], dtype=object)
    if tokens.ndim != 1 or tokens.size == 0 or tokens.dtype.kind not in "iu":
        raise InvalidArgumentError("the calibration input must be a text file's path or a non-empty 1-D "
                                   f"sequence of token ids, not {type(text_path_or_tokens).__name__}")
    return None, tokens.astype(np.int64)


def _model_files(model_path: Path) -> list:
    """The model's files (every shard of a split model): a missing or broken one is our error naming it,
    before llama.cpp loads anything."""
    from ..container.reader import open_gguf

    with open_gguf(model_path) as f:
        return list(f.shards)


def _read_text(path: Path) -> bytes:
    from ..container.reader import read_regular  # refuses FIFOs and folders without blocking

    data = read_regular(path, "the calibration text")
    if len(data) >= 2**31 - 16:
        raise HessianError(f"{path}: {len(data)} bytes of text; llama_tokenize takes less than 2 GiB")
    return data


def _tokenize(L, vocab, text: bytes) -> np.ndarray:
    """llama_tokenize(text, add_special=True, parse_special=False): common_tokenize as llama-imatrix calls it."""
    n_max = len(text) + 16
    for _ in range(2):
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(vocab, text, len(text), buf, n_max, True, False)
        if n >= 0:
            return np.array(buf[:n], dtype=np.int64)
        n_max = -n  # too small: it says how many it needs
    raise HessianError(f"llama_tokenize failed ({n})")


@contextlib.contextmanager
def _llama_log(L):
    """llama.cpp's log into a list (its last lines go into error messages), the previous logger restored."""
    lines: list = []

    @L.llama_log_callback
    def keep(_level, text, _user):
        lines.append(text.decode("utf-8", "replace") if text else "")
        del lines[:-50]

    prev_cb, prev_data = L.llama_log_callback(), ctypes.c_void_p()
    L.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_data))
    L.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        L.llama_log_set(prev_cb if prev_cb else None, prev_data)


def _tail(lines: list) -> str:
    text = "".join(lines[-8:]).strip()
    return f"; llama.cpp said: {text}" if text else ""


def collect_hessians(model_path, text_path_or_tokens, out_path, *, ctx: int = 512, chunks: Optional[int] = None,
                     threads: Optional[int] = None, overwrite: bool = False, quiet: bool = False, stream=None,
                     max_n_in: int = DEFAULT_MAX_N_IN, max_memory=None, factor: bool = True) -> HessianSummary:
    """Run the GGUF model ``model_path`` over a calibration text with llama.cpp and write the input
    covariance H of each weight matrix to ``out_path`` (see the module docstring for the file).

    ``text_path_or_tokens``: a text file (tokenized with BOS; each chunk starts with BOS, as llama-imatrix
    does) or a sequence of token ids (evaluated as given).  ``ctx``: tokens per chunk (each chunk is one
    llama_decode with an empty KV cache); ``chunks``: at most this many (default: all whole chunks);
    ``threads``: llama.cpp's threads (default: all cores); ``max_n_in``: widest input collected.
    ``max_memory``: bytes (or "500M", "8G") the matrices may take while collected (default: half the memory
    available); when they do not all fit, the text is evaluated again for the rest, as many passes as
    needed — the file is the same.  llama.cpp's own model and buffers come on top, and while a matrix is
    written, its float32 copy and factor (``12 n_in^2`` bytes).  ``factor``: store each matrix's factor for
    error feedback (layout ``factor_upper``), else H itself (``packed_upper``).  The output is written
    atomically and may not be the model or the text; an existing one is replaced only with ``overwrite``.
    Progress goes to ``stream`` (default stderr) unless ``quiet``.

    >>> s = collect_hessians("m.gguf", "wiki.txt", "m.hessian.gguf", ctx=512, chunks=100)  # doctest: +SKIP
    >>> s.matrices["blk.0.attn_q.weight.hessian"]                                          # doctest: +SKIP
    ['blk.0.attn_q.weight', 'blk.0.attn_v.weight', 'blk.0.attn_k.weight']
    """
    from ..codecs.chunks import one_blas_thread
    from ..safeio import check_outputs

    t0 = time.perf_counter()
    ctx = _positive(ctx, "ctx")
    chunks = _positive(chunks, "chunks", optional=True)
    threads = _positive(threads, "threads", optional=True) or os.cpu_count() or 1
    max_n_in = _positive(max_n_in, "max_n_in")
    max_memory = _memory_limit(max_memory)
    text_path, given = _source(text_path_or_tokens)
    model_path, out_path = Path(os.fspath(model_path)), Path(os.fspath(out_path))
    inputs = _model_files(model_path) + [text_path]
    check_outputs([out_path], inputs, overwrite=overwrite, error=HessianError)
    text = _read_text(text_path) if text_path is not None else None
    L = _llama_cpp()
    progress = Progress(0, quiet=quiet, stream=stream, bar=False)
    # one BLAS thread for the sums: OpenBLAS's own would spin beside llama.cpp's (on two cores the collection
    # took twice as long: SmolLM2, 8 chunks of 128 tokens, 23.6 s against 11.5 s), and their floats would
    # depend on the machine's core count
    with _llama_log(L) as log, _Session(L, model_path, log) as run, one_blas_thread():
        collector = _Collector(L, _GGML(), max_n_in, max_memory, ctx)
        run.start(text, given, ctx, chunks, threads, collector, progress)
        run.decode()
        if not collector.groups:
            raise HessianError(f"{model_path}: no weight's matrix multiplication could be collected"
                               + "".join(f"; {w}: {why}" for w, why in list(collector.skipped.items())[:5]))
        if collector.plan_passes() > 1:
            progress.total = run.n_chunk * collector.n_passes
            need = _collect_bytes([g.n for g in collector.groups], ctx)
            progress.say(f"the matrices take {_size(need)}, above max_memory ({_size(max_memory)}): "
                         f"{collector.n_passes} passes")

        def accumulated(group: _Group) -> None:  # the writer asks for the matrices in order, so by pass
            while group.h is None:
                collector.start_pass(collector.pass_no + 1)
                run.decode()

        summary = HessianSummary(out_path, {}, {}, dict(collector.skipped), run.n_chunk * ctx, ctx, run.n_chunk)
        for g in collector.groups:
            if not g.tokens:  # an expert no token was routed to: its weights fall back to the imatrix
                summary.skipped.update((w, "no calibration token was routed to this expert") for w in g.weights)
        experts = {w: len(groups) for w, groups in collector.experts_of.items()}
        _write(out_path, [g for g in collector.groups if g.tokens], summary, inputs,
               [os.fspath(text_path)] if text_path is not None else [], overwrite, accumulated, factor, experts)
    summary.seconds = time.perf_counter() - t0
    for w, why in summary.skipped.items():
        progress.say(f"skipped {w}: {why}")
    progress.say(f"wrote {out_path}: {len(summary.matrices)} matrices for {len(summary.weights)} weights, "
                 f"{summary.n_tokens} tokens in {run.n_chunk} chunks, {collector.n_passes} pass"
                 f"{'es' if collector.n_passes > 1 else ''}, "
                 f"{summary.seconds:.2f} s")
    return summary


def factorise_hessians(src, out_path, *, overwrite: bool = False, quiet: bool = True,
                       stream=None) -> HessianSummary:
    """Write, from a Hessian file that holds the matrices H (``packed_upper``, or the squares of earlier
    versions), the file :func:`collect_hessians` writes today from the same collection (``factor_upper``): each
    H factorised once, so that quantizing does not.  One matrix is read at a time.

    >>> factorise_hessians("model.hessian-old.gguf", "model.hessian.gguf")                 # doctest: +SKIP
    """
    from ..safeio import check_outputs

    t0 = time.perf_counter()
    src, out_path = Path(os.fspath(src)), Path(os.fspath(out_path))
    check_outputs([out_path], [src], overwrite=overwrite, error=HessianError)
    progress = Progress(0, quiet=quiet, stream=stream, bar=False)
    with load_hessians(src) as hs:
        if hs.layout == LAYOUT_FACTOR:
            raise HessianError(f"hessian {src}: holds factors already")
        weights_of: dict = {}
        for weight, name in hs.matrix_of.items():  # in the file's order: each matrix's weights as collected
            weights_of.setdefault(name, []).append(weight)
        names = list(hs.widths)  # the matrix tensors in file order
        groups = [_Group(weights_of[name], hs.widths[name], hs.tokens[name]) for name in names]
        name_of = {id(g): name for g, name in zip(groups, names)}

        def read(group: _Group) -> None:
            group.h = hs.matrix(name_of[id(group)])

        summary = HessianSummary(out_path, {}, {}, {}, hs.chunk_size * hs.chunk_count, hs.chunk_size,
                                 hs.chunk_count)
        _write(out_path, groups, summary, [src], hs.datasets, overwrite, read, True, hs.expert_counts)
    summary.seconds = time.perf_counter() - t0
    progress.say(f"wrote {out_path}: {len(names)} matrices factorised in {summary.seconds:.2f} s")
    return summary


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _memory_limit(max_memory) -> int:
    """``max_memory`` in bytes; None: half the memory available now (Linux's MemAvailable, else the free
    physical pages)."""
    if max_memory is not None:
        return parse_size(max_memory, "max_memory", InvalidArgumentError)
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return 4 << 30


class _Session:
    """The model loaded in llama.cpp and one context of ``ctx`` tokens: :meth:`decode` evaluates every chunk
    once (one pass of the collector).  Kept open while the file is written: later passes run from there."""

    def __init__(self, L, model_path: Path, log):
        self.L, self.model_path, self.log = L, model_path, log
        self.model = self.context = self.batch = None

    def __enter__(self) -> "_Session":
        L = self.L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False  # CPU "repack" buffers crash on small quantized models on some CPUs
        self.model = L.llama_model_load_from_file(os.fsencode(self.model_path), mp)
        if not self.model:
            raise HessianError(f"{self.model_path}: llama.cpp cannot load the model{_tail(self.log)}")
        return self

    def __exit__(self, *exc) -> None:
        L = self.L
        if self.batch is not None:
            L.llama_batch_free(self.batch)
        if self.context:
            L.llama_free(self.context)
        L.llama_model_free(self.model)

    def start(self, text, given, ctx, chunks, threads, collector, progress) -> None:
        """Tokenize, check the tokens and create the context with ``collector``'s callbacks."""
        L, model_path = self.L, self.model_path
        vocab = L.llama_model_get_vocab(self.model)
        tokens = given if text is None else _tokenize(L, vocab, text)
        n_chunk = len(tokens) // ctx
        if n_chunk == 0:
            raise HessianError(f"{len(tokens)} token(s) do not fill one chunk of ctx={ctx} tokens")
        n_vocab = L.llama_vocab_n_tokens(vocab)
        if tokens.min() < 0 or tokens.max() >= n_vocab:
            raise InvalidArgumentError(f"token ids must lie in [0, {n_vocab}) for {model_path}; got "
                                       f"{tokens.min()}..{tokens.max()}")
        self.n_chunk = min(n_chunk, chunks or n_chunk)
        self.tokens, self.ctx, self.collector, self.progress = tokens, ctx, collector, progress
        self.bos = L.llama_vocab_bos(vocab) if text is not None and L.llama_vocab_get_add_bos(vocab) else None
        progress.total = self.n_chunk
        progress.say(f"hessian: {len(tokens)} tokens, {self.n_chunk} chunks of {ctx}, {threads} threads")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = ctx  # one graph per chunk
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.cb_eval, cp.cb_eval_user_data = collector.callback, None
        cp.abort_callback, cp.abort_callback_data = collector.abort, None
        cp.no_perf = True
        self.context = L.llama_init_from_model(self.model, cp)
        if not self.context:
            raise HessianError(f"{model_path}: llama.cpp cannot create a context of {ctx} tokens{_tail(self.log)}")
        self.batch = L.llama_batch_init(ctx, 0, 1)

    def decode(self) -> None:
        """One pass: every chunk decoded with an empty KV cache, the collector called on its nodes."""
        L, ctx, batch, collector = self.L, self.ctx, self.batch, self.collector
        passes = f"pass {collector.pass_no + 1}/{collector.n_passes}, " if collector.n_passes > 1 else ""
        for i in range(self.n_chunk):
            t0 = time.perf_counter()
            chunk = self.tokens[i * ctx:(i + 1) * ctx].copy()
            if self.bos is not None:  # llama-imatrix: "add BOS token for the first batch of each chunk"
                chunk[0] = self.bos
            for k, tok in enumerate(chunk.tolist()):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, k, 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = 1  # every token's output, so output.weight sees them all
            batch.n_tokens = ctx
            L.llama_memory_clear(L.llama_get_memory(self.context), True)
            collector.begin_chunk(i)
            rc = L.llama_decode(self.context, batch)
            if collector.error is not None:
                error, collector.error = collector.error, None
                raise error
            if rc != 0:
                raise HessianError(f"chunk {i}: llama_decode failed with status {rc}{_tail(self.log)}")
            self.progress.advance(0, f"{passes}chunk {i + 1}: {ctx} tokens, {time.perf_counter() - t0:.2f} s, "
                                     f"{len(collector.groups)} matrices")
        collector.end_pass()


def _tensor_name(wanted: str, fallback: str, taken: set) -> str:
    """``wanted``, or ``fallback`` if it is taken or too long (GGUF names are shorter than 64 bytes)."""
    name = fallback if len(wanted.encode()) >= GGML_MAX_NAME or wanted in taken else wanted
    taken.add(name)
    return name


def _write(out_path: Path, groups: list, summary: HessianSummary, inputs: list, datasets: list,
           overwrite: bool, accumulated, factor: bool, experts: dict) -> None:
    """One F32 tensor per group (``factor``: V, then H's diagonals at the end), each accumulator dropped once
    written; ``accumulated(group)`` runs the passes its matrix waits for.  ``experts``: 3-D expert weight ->
    its number of experts."""
    from ..codecs.gptq import DEFAULT_DAMP
    from ..container.values import GGUFValueType as V, Value
    from ..container.writer import GGUFWriter

    taken: set = set()
    names = [_tensor_name(g.weights[0] + TENSOR_SUFFIX, f"hessian.{i}", taken) for i, g in enumerate(groups)]
    for name, g in zip(names, groups):
        if g.tokens > _UINT32_MAX:
            raise HessianError(f"{name}: {g.tokens} tokens do not fit the file's UINT32 count")
        summary.matrices[name] = list(g.weights)
        summary.tokens[name] = g.tokens
    weights = summary.weights
    mapped = [n for n, g in zip(names, groups) for _ in g.weights]
    metadata = [("general.type", Value(GENERAL_TYPE, V.STRING)),
                (KEY_DATASETS, Value(list(datasets), V.ARRAY, V.STRING)),
                (KEY_CHUNK_SIZE, Value(summary.chunk_size, V.UINT32)),
                (KEY_CHUNK_COUNT, Value(summary.chunk_count, V.UINT32)),
                (KEY_WEIGHTS, Value(weights, V.ARRAY, V.STRING)),
                (KEY_MATRICES, Value(mapped, V.ARRAY, V.STRING)),
                (KEY_TOKENS, Value([g.tokens for g in groups], V.ARRAY, V.UINT32)),
                (KEY_LAYOUT, Value(LAYOUT_FACTOR if factor else LAYOUT_PACKED, V.STRING))]
    if experts:
        metadata += [(KEY_EXPERT_WEIGHTS, Value(list(experts), V.ARRAY, V.STRING)),
                     (KEY_EXPERT_COUNTS, Value(list(experts.values()), V.ARRAY, V.UINT32))]
    diagonals = []
    if factor:
        diagonals = [_tensor_name(name + ".diagonal", f"hessian.diagonal.{i}", taken) for i, name in enumerate(names)]
        metadata += [(KEY_DAMP, Value(DEFAULT_DAMP, V.FLOAT32)), (KEY_DIAGONALS, Value(diagonals, V.ARRAY, V.STRING))]

    def producer(name: str, g: _Group):
        def make():  # the packed rows in float32 pieces of ~4 MiB; the accumulator is dropped at the end
            accumulated(g)
            h, g.h = g.h, None
            if factor:  # of the float32 H a packed_upper file holds: the factor error feedback would compute
                h = np.asarray(h, np.float32)  # a float32 H (factorise_hessians) is not copied
                g.diagonal = np.diagonal(h).copy()
                h = _factor_of(name, h)
            step = max(1, (1 << 20) // g.n)
            for i0 in range(0, g.n, step):
                yield np.concatenate([h[i, i:] for i in range(i0, min(i0 + step, g.n))]).astype(np.float32)
        return make

    w = GGUFWriter(out_path, metadata, inputs=[p for p in inputs if p is not None], overwrite=overwrite)
    for name, g in zip(names, groups):
        w.add_tensor(name, producer(name, g), shape=(_packed_size(g.n),), ggml_type="F32")
    for name, g in zip(diagonals, groups):  # written after every matrix: each diagonal is kept from its matrix
        w.add_tensor(name, (lambda g=g: iter([g.diagonal])), shape=(g.n,), ggml_type="F32")
    w.close()


def _factor_of(name: str, h: np.ndarray) -> np.ndarray:
    """V of H + damp * mean(diag H) * I = V V^T, as error feedback computes it from a packed_upper file."""
    from ..codecs.gptq import DEFAULT_DAMP, Factor
    from ..errors import ImatrixError

    try:
        return Factor(h, damp=DEFAULT_DAMP).v
    except ImatrixError as exc:
        raise HessianError(f"{name}: {exc}") from None


def _packed_size(n: int) -> int:
    return n * (n + 1) // 2


def _row_offsets(n: int) -> np.ndarray:
    """Where each row of the packed upper triangle starts (its diagonal value): row i holds columns i..n-1."""
    i = np.arange(n, dtype=np.int64)
    return i * n - i * (i - 1) // 2


# ------------------------------------------------------------------------------------------------------
# The loader
# ------------------------------------------------------------------------------------------------------
def _unpack_upper(packed: np.ndarray, n: int, tile: int = 128) -> np.ndarray:
    """The symmetric n x n float32 matrix of its packed upper triangle: a slab of rows, then its transpose
    into the matching columns."""
    h = np.empty((n, n), np.float32)
    starts = _row_offsets(n)
    for i0 in range(0, n, tile):
        i1 = min(i0 + tile, n)
        for i in range(i0, i1):
            h[i, i:] = packed[starts[i]:starts[i] + n - i]
        h[i1:, i0:i1] = h[i0:i1, i1:].T
        h[i0:i1, i0:i1] = np.triu(h[i0:i1, i0:i1]) + np.triu(h[i0:i1, i0:i1], 1).T
    return h


def _packed_place(n: int, k: int) -> tuple:
    """(row, column) of value k of a packed upper triangle."""
    starts = _row_offsets(n)
    i = int(np.searchsorted(starts, k, side="right")) - 1
    return i, i + int(k - starts[i])


def _asymmetry(h: np.ndarray, tile: int = 128) -> float:
    """max |H - H^T|, a slab of rows against the matching slab of columns at a time (the whole transpose at
    once strides through memory: 5x slower at n = 1536)."""
    worst = 0.0
    for i in range(0, h.shape[0], tile):
        worst = max(worst, float(np.abs(h[i:i + tile, i:] - h[i:, i:i + tile].T).max()))
    return worst


class Hessians:
    """An open Hessian file: the weight -> matrix map is read at once, each matrix only when asked for
    (read with ``pread``, checked: finite, symmetric, non-negative diagonal; a factor's diagonal positive).
    Close it, or use ``with``."""

    def __init__(self, path: Path, f, matrix_of: dict, tokens: dict, datasets: list, chunk_size: int,
                 chunk_count: int, widths: dict, layout: str, damp: Optional[float], diagonal_of: dict,
                 expert_counts: dict):
        self.path = path
        self.expert_counts = expert_counts  # 3-D expert weight -> number of experts (matrices: expert_weight)
        self.widths = widths  # tensor name -> n
        self.layout = layout
        self.packed = layout != LAYOUT_FULL  # upper triangles, else square matrices
        self.damp = damp  # LAYOUT_FACTOR: the dampening of the stored factors
        self._diagonal_of = diagonal_of  # LAYOUT_FACTOR: matrix tensor -> the tensor of H's diagonal
        self._f = f
        self._by_name = {t.name: t for t in f.tensors}
        self.matrix_of = matrix_of  # weight name -> tensor name
        self.tokens = tokens  # tensor name -> token count
        self.datasets = datasets
        self.chunk_size = chunk_size
        self.chunk_count = chunk_count
        self._last: Optional[tuple] = None  # (tensor name, H): attn_q/k/v ask for one matrix in a row

    @property
    def weights(self) -> list:
        return list(self.matrix_of)

    def __contains__(self, weight: str) -> bool:
        return weight in self.matrix_of

    def for_weight(self, weight: str) -> Optional[tuple]:
        """``(H, n_tokens)`` for ``weight``: float32 ``(n_in, n_in)`` as stored (:meth:`matrix`), the sum over
        ``n_tokens`` tokens of ``x x^T``; None for a weight without a matrix (experts, skipped ones: use the
        imatrix)."""
        name = self.matrix_of.get(weight)
        if name is None:
            return None
        if self._last is None or self._last[0] != name:
            self._last = (name, self.matrix(name))
        return self._last[1], self.tokens[name]

    def factor_for(self, weight: str) -> Optional[tuple]:
        """``(V, n_tokens, damp)`` for ``weight`` in a ``factor_upper`` file: float32 upper triangular
        ``(n_in, n_in)`` with ``H + damp * mean(diag H) * I = V V^T``; None for a weight without a matrix, or
        a file that holds H itself."""
        name = self.matrix_of.get(weight)
        if name is None or self.layout != LAYOUT_FACTOR:
            return None
        return self._factor(name), self.tokens[name], self.damp

    def matrix(self, name: str) -> np.ndarray:
        """Tensor ``name``'s H as a checked float32 matrix: the file's values, or, from a factor, V V^T with H's
        stored diagonal (the dampening is on the diagonal only)."""
        n = self.widths[name]
        if self.layout == LAYOUT_FACTOR:
            v = self._factor(name).astype(np.float64)
            h = v @ v.T
            h[np.diag_indices(n)] = self._diagonal(name)
            return h.astype(np.float32)
        stored = self._stored(name)
        if self.packed:
            h = _unpack_upper(stored, n)  # symmetric by construction
        else:
            h = stored
            scale = float(np.abs(h).max()) if h.size else 0.0
            asym = _asymmetry(h)
            if asym > _SYMMETRY_TOL * scale:
                raise HessianError(f"hessian {self.path}: tensor {name!r} is not symmetric (max |H - H^T| = "
                                   f"{asym:.6g}, max |H| = {scale:.6g})")
        self._check_diagonal(name, np.diagonal(h))
        return h

    def _factor(self, name: str) -> np.ndarray:
        from ..codecs.gptq import upper_from_packed

        v = upper_from_packed(self._stored(name), _row_offsets(self.widths[name]))
        d = np.diagonal(v)
        if not (d > 0).all():
            i = int(np.argmax(~(d > 0)))
            raise HessianError(f"hessian {self.path}: tensor {name!r} has the diagonal value {float(d[i])!r} at "
                               f"[{i}, {i}]; a factor's diagonal is positive")
        return v

    def _diagonal(self, name: str) -> np.ndarray:
        """H's diagonal, float64: stored on its own in a factor_upper file, else read from the matrix."""
        diagonal = self._diagonal_of.get(name)
        t = self._by_name[diagonal or name]
        values = self._values(t)
        if diagonal is None:  # touches n values of the map, not n^2
            n = self.widths[name]
            values = values[_row_offsets(n)] if self.packed else np.diagonal(values.reshape(n, n))
        d = values.astype(np.float64)
        self._check_diagonal(t.name, d)
        return d

    def _values(self, t) -> np.ndarray:
        """Tensor ``t``'s float32 values as mapped (not copied, not checked)."""
        try:
            raw = t.raw()
        except GGUFIOError:
            raise
        except GGUFError as exc:
            raise HessianError(f"hessian {self.path}: tensor {t.name!r}: {exc}") from None
        return raw.view(np.dtype(np.float32).newbyteorder(t.byte_order)).reshape(-1)

    def _stored(self, name: str) -> np.ndarray:
        """Matrix tensor ``name``'s values as float32, refused with the [row, column] of a non-finite one."""
        t = self._by_name[name]
        try:
            stored = np.asarray(t.numpy(), np.float32)
        except GGUFIOError:
            raise
        except GGUFError as exc:
            raise HessianError(f"hessian {self.path}: tensor {name!r}: {exc}") from None
        n = self.widths[name]
        if not np.isfinite(stored).all():
            k = np.argwhere(~np.isfinite(stored.reshape(-1)))[0][0]
            i, j = _packed_place(n, k) if self.packed else divmod(int(k), n)
            raise HessianError(f"hessian {self.path}: tensor {name!r} has the non-finite value "
                               f"{float(stored.reshape(-1)[k])!r} at [{i}, {j}]")
        return stored

    def _check_diagonal(self, name: str, d: np.ndarray) -> None:
        if not np.isfinite(d).all() or (d < 0).any():
            i = int(np.argmax(~np.isfinite(d) | (d < 0)))
            raise HessianError(f"hessian {self.path}: tensor {name!r} has the diagonal value {float(d[i])!r} at "
                               f"[{i}, {i}]; a sum of squares is finite and not negative")

    def imatrix(self, *, process_output: bool = False):
        """An :class:`~gguf_kquant.model.imatrix.Imatrix` of ``diag(H) / n_tokens`` per weight (``entries``:
        name -> float32), the mean squared input llama-imatrix computes; only the diagonals are read.  Like
        llama-imatrix it has the ``blk.*`` weights, and ``output.weight`` with ``process_output`` (its
        ``--process-output``); other weights (a tied ``token_embd``) are left out."""
        from .imatrix import Imatrix

        entries = {}
        diagonals: dict = {}

        def mean_square(name: str) -> np.ndarray:
            if name not in diagonals:
                diagonals[name] = (self._diagonal(name) / self.tokens[name]).astype(np.float32)
            return diagonals[name]

        for weight, name in self.matrix_of.items():
            if _expert_of(weight):  # an expert's matrix: in its 3-D weight's entry below
                continue
            if weight.startswith("blk.") or (process_output and weight == "output.weight"):
                entries[weight] = mean_square(name)
        for weight, count in self.expert_counts.items():  # one entry, expert after expert
            names = [self.matrix_of.get(expert_weight(weight, e)) for e in range(count)]
            n = next((self.widths[m] for m in names if m is not None), 0)
            if weight.startswith("blk.") and n:  # an expert no token reached: 1, llama-imatrix's "partial data"
                entries[weight] = np.concatenate([mean_square(m) if m is not None else np.ones(n, np.float32)
                                                  for m in names])
        return Imatrix(entries, list(self.datasets), self.chunk_count, path=os.fspath(self.path))

    def close(self) -> None:
        self._last = None
        self._f.close()

    def __reduce__(self):  # pickled (to Dask workers) as its path: the worker opens the file itself
        return load_hessians, (self.path,)

    def __enter__(self) -> "Hessians":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        return f"Hessians({os.fspath(self.path)!r}, {len(self.matrix_of)} weights, {len(self.tokens)} matrices)"


def load_hessians(path) -> Hessians:
    """Open a Hessian file written by :func:`collect_hessians`, checking its keys and tensors.

    >>> with load_hessians("m.hessian.gguf") as hs:                                    # doctest: +SKIP
    ...     H, n = hs.for_weight("blk.3.ffn_down.weight")
    """
    from ..container.reader import open_gguf

    p = Path(os.fspath(path))
    try:
        f = open_gguf(p, split=False)
    except GGUFIOError:
        raise
    except GGUFError as exc:
        raise HessianError(f"hessian {p}: {exc}") from None
    try:
        return Hessians(p, f, *_read_index(p, f))
    except BaseException:
        f.close()
        raise


def _typed(p: Path, md, key: str, want: str):
    """The value of ``key``: ``want`` is "UINT32", "FLOAT32", "STRING", "ARRAY of STRING" or "ARRAY of UINT32"."""
    if key not in md:
        raise HessianError(f"hessian {p}: missing key {key}")
    typed = md.typed(key)
    got = typed.type.name + (f" of {typed.element_type.name}" if typed.element_type is not None else "")
    if got != want:
        raise HessianError(f"hessian {p}: key {key} must be of type {want}, not {got}")
    return typed.value


def _read_index(p: Path, f) -> tuple:
    """(weight -> tensor, tensor -> tokens, datasets, chunk size, chunk count), every fact checked."""
    md = f.metadata
    kind = md.get("general.type")
    if kind != GENERAL_TYPE:
        raise HessianError(f"hessian {p}: general.type is {kind!r}, not {GENERAL_TYPE!r}")
    weights = [str(w) for w in _typed(p, md, KEY_WEIGHTS, "ARRAY of STRING")]
    matrices = [str(m) for m in _typed(p, md, KEY_MATRICES, "ARRAY of STRING")]
    if len(weights) != len(matrices):
        raise HessianError(f"hessian {p}: {KEY_WEIGHTS} has {len(weights)} names but {KEY_MATRICES} {len(matrices)}")
    by_name = {t.name: t for t in f.tensors}
    matrix_of: dict = {}
    for w, m in zip(weights, matrices):
        if w in matrix_of:
            raise HessianError(f"hessian {p}: weight {w!r} is listed twice in {KEY_WEIGHTS}")
        if m not in by_name:
            raise HessianError(f"hessian {p}: the matrix {m!r} of weight {w!r} is not a tensor of the file")
        matrix_of[w] = m
    layout = _layout(p, md)
    matrix_names = set(matrices)
    matrix_tensors = [t for t in f.tensors if t.name in matrix_names]
    damp, diagonal_of = _factor_keys(p, md, layout, matrix_tensors, by_name)
    known = matrix_names | set(diagonal_of.values())
    unused = [t.name for t in f.tensors if t.name not in known]
    if unused:
        raise HessianError(f"hessian {p}: tensor {unused[0]!r} is the matrix of no weight in {KEY_MATRICES}")
    widths = {t.name: _width(p, t, layout != LAYOUT_FULL) for t in matrix_tensors}
    for m, d in diagonal_of.items():
        t = by_name[d]
        if t.type_name != "F32" or list(t.shape) != [widths[m]]:
            raise HessianError(f"hessian {p}: tensor {d!r}, the diagonal of {m!r}, must be {widths[m]} F32 values, "
                               f"not {t.type_name} of shape {list(t.shape)}")
    tokens = _tokens(p, md, matrix_tensors)
    datasets = [str(d) for d in _typed(p, md, KEY_DATASETS, "ARRAY of STRING")]
    chunk_size = int(_typed(p, md, KEY_CHUNK_SIZE, "UINT32"))
    chunk_count = int(_typed(p, md, KEY_CHUNK_COUNT, "UINT32"))
    experts = _expert_keys(p, md, weights)
    return matrix_of, tokens, datasets, chunk_size, chunk_count, widths, layout, damp, diagonal_of, experts


def _expert_keys(p: Path, md, weights: list) -> dict:
    """3-D expert weight -> expert count (both keys or neither); every ``name[e]`` weight of one has e < count."""
    if KEY_EXPERT_WEIGHTS not in md and KEY_EXPERT_COUNTS not in md:
        return {}
    names = [str(w) for w in _typed(p, md, KEY_EXPERT_WEIGHTS, "ARRAY of STRING")]
    counts = [int(c) for c in _typed(p, md, KEY_EXPERT_COUNTS, "ARRAY of UINT32")]
    if len(names) != len(counts) or len(set(names)) != len(names):
        raise HessianError(f"hessian {p}: {KEY_EXPERT_WEIGHTS} ({len(names)} names) and {KEY_EXPERT_COUNTS} "
                           f"({len(counts)} counts) must list each weight once, with its count")
    experts = dict(zip(names, counts))
    for w in weights:
        base, e = _expert_of(w) or ("", 0)
        if base in experts and e >= experts[base]:
            raise HessianError(f"hessian {p}: weight {w!r} is not one of the {experts[base]} experts of {base!r}")
    return experts


def _factor_keys(p: Path, md, layout: str, matrix_tensors: list, by_name: dict) -> tuple:
    """(damp, matrix tensor -> its diagonal's tensor) of a factor_upper file; (None, {}) otherwise."""
    if layout != LAYOUT_FACTOR:
        return None, {}
    damp = float(_typed(p, md, KEY_DAMP, "FLOAT32"))
    if not (math.isfinite(damp) and damp > 0):
        raise HessianError(f"hessian {p}: {KEY_DAMP} is {damp!r}; a dampening is positive")
    diagonals = [str(d) for d in _typed(p, md, KEY_DIAGONALS, "ARRAY of STRING")]
    if len(diagonals) != len(matrix_tensors):
        raise HessianError(f"hessian {p}: {KEY_DIAGONALS} has {len(diagonals)} names for {len(matrix_tensors)} "
                           f"matrices")
    matrix_names = {t.name for t in matrix_tensors}
    for t, d in zip(matrix_tensors, diagonals):
        if d not in by_name or d in matrix_names:
            raise HessianError(f"hessian {p}: the diagonal {d!r} of matrix {t.name!r} is not a tensor of its own")
    if len(set(diagonals)) != len(diagonals):
        raise HessianError(f"hessian {p}: {KEY_DIAGONALS} names a tensor twice")
    return damp, {t.name: d for t, d in zip(matrix_tensors, diagonals)}


def _layout(p: Path, md) -> str:
    if KEY_LAYOUT not in md:
        return LAYOUT_FULL  # files written before the key
    layout = str(_typed(p, md, KEY_LAYOUT, "STRING"))
    if layout not in _LAYOUTS:
        raise HessianError(f"hessian {p}: {KEY_LAYOUT} is {layout!r}, not one of {', '.join(map(repr, _LAYOUTS))}")
    return layout


def _width(p: Path, t, packed: bool) -> int:
    """n of tensor ``t``'s n x n matrix: a square F32 tensor, or a 1-D one of n (n + 1) / 2 values (packed)."""
    shape = list(t.shape)
    if packed and t.type_name == "F32" and len(shape) == 1 and shape[0] > 0:
        n = (math.isqrt(8 * shape[0] + 1) - 1) // 2
        if _packed_size(n) == shape[0]:
            return n
    elif not packed and t.type_name == "F32" and len(shape) == 2 and shape[0] == shape[1] and shape[0] > 0:
        return shape[0]
    want = "an F32 upper triangle of n (n + 1) / 2 values" if packed else "a square F32 matrix"
    raise HessianError(f"hessian {p}: tensor {t.name!r} must be {want}, not {t.type_name} of shape {shape}")


def _tokens(p: Path, md, tensors) -> dict:
    """tensor name -> token count, from a UINT32 per tensor (file order) or one for all."""
    if KEY_TOKENS in md and md.typed(KEY_TOKENS).type.name == "UINT32":
        counts = [int(md[KEY_TOKENS])] * len(tensors)
    else:
        counts = [int(c) for c in _typed(p, md, KEY_TOKENS, "ARRAY of UINT32")]
        if len(counts) != len(tensors):
            raise HessianError(f"hessian {p}: {KEY_TOKENS} has {len(counts)} counts for {len(tensors)} tensors")
    for t, c in zip(tensors, counts):
        if c < 1:
            raise HessianError(f"hessian {p}: tensor {t.name!r} has a token count of {c}")
    return {t.name: c for t, c in zip(tensors, counts)}
