"""Decide, for every tensor of a model, the type llama-quantize would give it — without touching tensor data.

Two entry points:

* :func:`plan_model` ``(src, ftype, **options)`` — open a GGUF file and plan it (what ``--dry-run`` prints).
* :func:`plan_tensors` ``(tensors, model, ftype, **options)`` — plan from ``(name, shape, source_type)``
  tuples (numpy-order shape, a :class:`~gguf_kquant.types.GGMLType` or name) and a :class:`ModelInfo`
  (arch, block_count, n_head, n_head_kv, n_expert).  No file is needed: a converter can plan the tensors it
  is about to produce (quantize-on-the-fly).  Example::

      >>> from gguf_kquant.model.planner import ModelInfo, plan_tensors
      >>> m = ModelInfo(arch="llama", n_layer=1, n_head=4, n_head_kv=2)
      >>> rows = plan_tensors([("token_embd.weight", (1024, 256), "F32"),
      ...                      ("blk.0.attn_v.weight", (128, 256), "F32"),
      ...                      ("blk.0.attn_norm.weight", (256,), "F32")], m, "Q4_K_M")
      >>> [(r.name, r.dst_type.name) for r in rows]
      [('token_embd.weight', 'Q6_K'), ('blk.0.attn_norm.weight', 'F32'), ('blk.0.attn_v.weight', 'Q6_K')]

The rows come back in llama-quantize's write order (non-``blk.`` tensors first, then by layer, then by
name) because the per-layer counters of the rules depend on it.  The rules themselves are data in
:mod:`gguf_kquant.model.mixes`; this module only evaluates them (``llama_tensor_get_type`` of
src/llama-quant.cpp, including the ``--tensor-type``/``--pure``/``--output-tensor-type`` options and
``tensor_type_fallback`` for rows that do not fit a 256-element block).  Where llama-quantize fails while
planning (a row length no type fits, a type ggml cannot write) the planner raises, so nothing is done; each
row also says whether it needs an importance matrix, which the quantizer checks before any work.  COPY plans
every tensor unchanged and keeps the source's ``general.file_type`` (:attr:`Plan.file_type`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from ..container.values import uint32_key
from ..errors import QuantizeError
from ..ftypes import LlamaFileType, guess_file_type
from ..types import GGMLType, TYPES, type_info
from . import mixes as M

__all__ = ["ModelInfo", "PlanRow", "Plan", "plan_tensors", "plan_model", "parse_mix", "order_key",
           "parse_tensor_types"]


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters llama-quantize's rules look at."""

    arch: str = "llama"
    n_layer: int = 0  # {arch}.block_count (n_layer_all)
    n_head: int = 0  # layer 0's head count
    n_head_kv: int = 0  # layer 0's KV head count (0: same as n_head)
    n_expert: int = 0
    file_type: Optional[int] = None  # the source's general.file_type (what COPY keeps), None if absent

    @property
    def n_gqa(self) -> int:
        kv = self.n_head_kv or self.n_head
        return self.n_head // kv if kv else 0

    @property
    def is_70b(self) -> bool:
        spec = M.MODEL_70B.get(self.arch)
        if spec is None or self.n_layer != spec[0]:
            return False
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_head != (self.n_head_kv or self.n_head)
        return True

    @classmethod
    def from_metadata(cls, metadata, where: str = "") -> "ModelInfo":
        """Read arch, block_count, head counts and expert count as llama.cpp's loader does: u32 values (per-layer
        head counts may be arrays; layer 0 counts), anything else a MetadataTypeError naming the key."""
        arch = str(metadata.get("general.architecture", ""))
        n_head = uint32_key(metadata, f"{arch}.attention.head_count", 0, per_layer=True, where=where)
        ftype = uint32_key(metadata, "general.file_type", None, where=where)
        return cls(arch=arch, n_layer=uint32_key(metadata, f"{arch}.block_count", 0, where=where), n_head=n_head,
                   n_head_kv=uint32_key(metadata, f"{arch}.attention.head_count_kv", n_head, per_layer=True,
                                        where=where),
                   n_expert=uint32_key(metadata, f"{arch}.expert_count", 0, where=where),
                   file_type=ftype)


@dataclass
class PlanRow:
    """One tensor of the plan: what it is now, what it becomes."""

    name: str
    shape: tuple  # numpy order, trailing ggml dims of 1 dropped (what the output file records)
    src_type: GGMLType
    dst_type: GGMLType
    category: str
    allows_quantization: bool
    requires_imatrix: bool = False
    fallback: bool = False  # tensor_type_fallback changed the type
    manual: bool = False  # chosen by --tensor-type

    @property
    def convert(self) -> bool:
        """True if the data changes (llama-quantize copies tensors whose type stays)."""
        return self.src_type != self.dst_type

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def src_nbytes(self) -> int:
        return TYPES[self.src_type].nbytes(self.shape)

    @property
    def dst_nbytes(self) -> int:
        return TYPES[self.dst_type].nbytes(self.shape)


@dataclass
class Plan:
    """The plan of a whole model: rows in write order plus what the summary prints."""

    mix: str
    file_type: int  # general.file_type of the output (a LlamaFileType, or COPY's guess with the GUESSED bit)
    rows: list
    model: ModelInfo
    n_fallback: int = 0
    warnings: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    @property
    def imatrix_required_by(self) -> list:
        """Names of the tensors that cannot be converted without an importance matrix (llama-quantize
        refuses the job without one: the IQ1/IQ2 mixes, Q2_K_S, and IQ3_XXS/IQ3_XS where a tensor becomes
        IQ3_XXS or IQ2_S).  Empty: the mix runs without."""
        return [r.name for r in self.rows if r.allows_quantization and r.requires_imatrix]

    @property
    def src_nbytes(self) -> int:
        return sum(r.src_nbytes for r in self.rows)

    @property
    def dst_nbytes(self) -> int:
        return sum(r.dst_nbytes for r in self.rows)

    @property
    def n_elements(self) -> int:
        return sum(r.n_elements for r in self.rows)

    def format(self) -> str:
        """The table ``--dry-run`` prints: tensor, shape, type before -> after, MiB before -> after."""
        lines = []
        n = len(self.rows)
        for i, r in enumerate(self.rows, 1):
            shape = ", ".join(str(d) for d in r.shape[::-1])
            if r.convert:
                size = f"{r.src_nbytes / 2**20:8.2f} MiB -> {r.dst_nbytes / 2**20:8.2f} MiB"
            else:
                size = f"{r.src_nbytes / 2**20:8.3f} MiB"
            lines.append(f"[{i:4d}/{n:4d}] {r.name:<36s} - [{shape:>18s}], {r.src_type.name:>6s} -> "
                         f"{r.dst_type.name:<6s} {size}")
        ne = max(self.n_elements, 1)
        lines.append(f"model size = {self.src_nbytes / 2**20:8.2f} MiB ({self.src_nbytes * 8.0 / ne:.2f} BPW)")
        lines.append(f"quant size = {self.dst_nbytes / 2**20:8.2f} MiB ({self.dst_nbytes * 8.0 / ne:.2f} BPW)")
        if self.n_fallback:
            lines.append(f"WARNING: {self.n_fallback} of {n} tensor(s) required fallback quantization")
        return "\n".join(lines)


def parse_mix(ftype) -> tuple:
    """``"q4_k_m"``/``15``/:class:`LlamaFileType` -> (mix name, file type, default type).  Unknown -> error
    listing the valid names."""
    if isinstance(ftype, LlamaFileType) or isinstance(ftype, int) and not isinstance(ftype, bool):
        for name, (ft, default) in M.MIXES.items():
            if ft == int(ftype):
                return name, ft, default
    elif isinstance(ftype, str):
        key = ftype.strip().upper()
        key = M.ALIASES.get(key, key)
        if key.startswith("MOSTLY_") or key.startswith("ALL_"):
            key = key.split("_", 1)[1]
        if key in M.MIXES:
            return (key,) + M.MIXES[key]
        if key.isdigit():
            return parse_mix(int(key))
    raise QuantizeError(f"unknown quantization mix {ftype!r}; valid: {', '.join(M.mix_names())}")


_BLK = re.compile(r"blk\.\s*([+-]?\d+)")


def _layer_of(name: str) -> Optional[int]:
    """sscanf(name, "blk.%d.") — None if it does not match."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def order_key(name: str):
    """llama_model_loader's weight_name_comparer: layer (-1 for non-blk tensors), then name."""
    layer = _layer_of(name)
    return (-1 if layer is None else layer, name.encode("utf-8"))


def category_of(name: str) -> str:
    if name in M.CATEGORY_EXACT:
        return M.CATEGORY_EXACT[name]
    for needle, cat in M.CATEGORY_SUBSTRING:
        if needle in name:
            return cat
    return "other"


def allows_quantization(name: str, n_dims: int, arch: str, quantize_output: bool = True) -> bool:
    """tensor_allows_quantization."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if not quantize_output and name == "output.weight":
        return False
    if name in M.NEVER_QUANTIZED_NAMES:
        return False
    if any(s in name for s in M.NEVER_QUANTIZED_SUBSTRINGS):
        return False
    return not any(s in name for s in M.NEVER_QUANTIZED_BY_ARCH.get(arch, ()))


def requires_imatrix(name: str, dst: GGMLType, mix: str) -> bool:
    """tensor_requires_imatrix: the IQ1/IQ2/IQ3_XXS types, and Q2_K in a Q2_K_S file (token_embd/output
    exempt)."""
    if M.CATEGORY_EXACT.get(name) in ("output", "token_embd"):
        return False
    return dst in M.IMATRIX_REQUIRED[None] or dst in M.IMATRIX_REQUIRED.get(mix, ())


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _Tensor:
    """What the rule predicates look at for one tensor."""

    name: str
    shape: tuple
    model: ModelInfo
    has_imatrix: bool
    default: GGMLType
    i: int = 0  # layer (or running count) and its total, see mixes' docstring
    n: int = 0
    count: int = 0  # the category's running count


# predicate name -> test of (tensor, type chosen so far); the vocabulary of mixes.RULES
PREDICATES = {
    "gqa4": lambda t, _c: t.model.n_gqa >= 4,
    "expert8": lambda t, _c: t.model.n_expert == 8,
    "expert4": lambda t, _c: t.model.n_expert >= 4,
    "experts": lambda t, _c: len(t.shape) >= 3 and t.shape[-3] > 1,
    "falcon": lambda t, _c: t.model.arch == "falcon",
    "bailingmoe3": lambda t, _c: t.model.arch == "bailingmoe3",
    "arch_keeps_q8_0": lambda t, _c: any(s in t.name for s in M.KEEP_Q8_0_BY_ARCH.get(t.model.arch, ())),
    "model70b": lambda t, _c: t.model.is_70b,
    "imatrix": lambda t, _c: t.has_imatrix,
    "ragged": lambda t, _c: t.shape[-1] % TYPES[t.default].block_size != 0,
    "default_q8_0": lambda t, _c: t.default == GGMLType.Q8_0,
    "more_bits": lambda t, _c: _more_bits(t.i, t.n),
    "first_8th": lambda t, _c: t.i < t.n // 8,
    "first_16th": lambda t, _c: t.i < t.n // 16,
    "last_8th": lambda t, _c: t.i >= 7 * t.n // 8,
    "count_first_8th": lambda t, _c: t.count < t.n // 8,
    "i_lt2": lambda t, _c: t.i < 2,
    "i_lt4": lambda t, _c: t.i < 4,
    "q3k_or_q4k": lambda _t, c: c in (GGMLType.Q3_K, GGMLType.Q4_K),
}


def _compile(when: str):
    """``"a & !b | c"`` -> [[(a, True), (b, False)], [(c, True)]] (or of ands); "" always holds."""
    clauses = []
    for clause in when.split("|"):
        terms = []
        for t in clause.split("&"):
            t = t.strip()
            if t:
                terms.append((t[1:], False) if t.startswith("!") else (t, True))
        for name, _want in terms:
            if name not in PREDICATES:
                raise ValueError(f"mixes: unknown predicate {name!r} in {when!r}")
        clauses.append(terms)
    return clauses


def _compile_rules(rules):
    out = []
    for cat, mixes, when, t in rules:
        cats = None if cat == "*" else frozenset((cat,) if isinstance(cat, str) else cat)
        out.append((cats, frozenset(mixes), _compile(when), t))
    return out


_RULES = _compile_rules(M.RULES)
_ADJUST = _compile_rules(M.ADJUST)


def _matches(rule, cat: str, mix: str, tensor: _Tensor, current: GGMLType) -> bool:
    cats, mixes, clauses, _t = rule
    if mix not in mixes or (cats is not None and cat not in cats):
        return False
    return any(all(PREDICATES[name](tensor, current) == want for name, want in terms) for terms in clauses)


def parse_tensor_types(specs) -> list:
    """``["attn_q=q8_0", ...]`` or ``[(regex, type)]`` -> [(compiled regex, GGMLType)] (names lower-cased like
    llama-quantize; the first pattern found anywhere in the tensor name wins)."""
    out = []
    for spec in specs or ():
        if isinstance(spec, str):
            pattern, sep, tname = spec.partition("=")
            if not sep or not pattern or not tname:
                raise QuantizeError(f"malformed --tensor-type {spec!r}; expected NAME_REGEX=TYPE")
        else:
            pattern, tname = spec
            if isinstance(pattern, re.Pattern):
                out.append((pattern, _user_type(tname, "--tensor-type")))
                continue
        try:
            rx = re.compile(pattern.lower())
        except re.error as exc:
            raise QuantizeError(f"--tensor-type pattern {pattern!r} is not a valid regex: {exc}") from None
        out.append((rx, _user_type(tname, "--tensor-type")))
    return out


def _user_type(t, what):
    if t is None:
        return None
    try:
        info = type_info(t)
    except Exception:
        raise QuantizeError(f"{what}: unknown ggml type {t!r}") from None
    return info.ggml_type


def _fallback(name: str, ne0: int, target: GGMLType, warnings: list) -> tuple:
    """tensor_type_fallback: (type, fell_back)."""
    info = TYPES[target]
    if ne0 % info.block_size == 0:
        return target, False
    ret = info.fallback
    if ret is None:
        if info.block_size > 32:  # Q1_0 (128), NVFP4 (64): llama.cpp throws
            raise QuantizeError(f"tensor {name}: rows of {ne0} are not a multiple of {info.block_size} "
                                f"({info.name}'s block) and no tensor type fallback is defined for type "
                                f"{info.name}")
        ret = target
    msg = (f"warning: {name:<36s} - ncols {ne0:6d} not divisible by {info.block_size:3d} "
           f"(required for type {info.name:>7s}) ")
    if ne0 % TYPES[ret].block_size != 0:
        msg += "(WARNING: must use F16 due to unusual shape) "
        ret = GGMLType.F16
    warnings.append(msg + f"-> falling back to {ret.name:>7s}")
    return ret, True


def _normalize_shape(shape) -> tuple:
    """Drop ggml's trailing dims of 1 (numpy's leading), as gguf writes ggml_n_dims() dims."""
    shape = tuple(int(d) for d in shape) or (1,)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def plan_tensors(tensors: Iterable, model: ModelInfo, ftype, *, imatrix: bool = False, pure: bool = False,
                 leave_output_tensor: bool = False, output_tensor_type=None, token_embedding_type=None,
                 tensor_types: Sequence = (), keep_order: bool = False) -> Plan:
    """Plan ``tensors`` — ``(name, numpy shape, source type)`` tuples — for mix ``ftype``.

    ``imatrix``: whether an importance matrix will be used (some rules depend on it).  The other options
    mean what llama-quantize's flags of the same name mean.  Returns a :class:`Plan` in write order.
    Raises :class:`~gguf_kquant.errors.QuantizeError` where llama-quantize would fail or abort: a row length
    with no fallback type, a type ggml cannot write, an ffn tensor of a MoE model without a layer number.
    """
    mix, file_type, default = parse_mix(ftype)
    out_type = _user_type(output_tensor_type, "--output-tensor-type")
    emb_type = _user_type(token_embedding_type, "--token-embedding-type")
    patterns = parse_tensor_types(tensor_types)

    items = []
    seen = set()
    for name, shape, src in tensors:
        if name in seen:
            raise QuantizeError(f"duplicate tensor name {name!r}")
        seen.add(name)
        items.append((name, _normalize_shape(shape), type_info(src).ggml_type))
    if mix in M.ONLY_COPY:  # the output keeps the source's file type (llama_model_loader's ftype)
        file_type = model.file_type
        if file_type is None:
            file_type = guess_file_type(t.name for _n, _s, t in sorted(items, key=lambda it: it[0].encode()))
        file_type = _as_file_type(file_type)
    if not keep_order:  # --keep-split keeps the source order
        items.sort(key=lambda it: order_key(it[0]))

    cats = [category_of(name) for name, _s, _t in items]
    state = _State(n_wv=sum(1 for c in cats if c == "attn_v"), tied="output" not in cats)
    rows = []
    for (name, shape, src), cat in zip(items, cats):
        allowed = mix not in M.ONLY_COPY and allows_quantization(name, len(shape), model.arch,
                                                                 not leave_output_tensor)
        row = PlanRow(name, shape, src, src, cat, allowed)
        if allowed:
            tensor = _Tensor(name, shape, model, bool(imatrix), default)
            row.dst_type = _tensor_type(row, tensor, mix, state, emb_type, out_type, patterns, pure)
            if row.convert:
                _check_writable(row)
        row.requires_imatrix = requires_imatrix(name, row.dst_type, mix)
        rows.append(row)
    return Plan(mix=mix, file_type=file_type, rows=rows, model=model, n_fallback=state.n_fallback,
                warnings=state.warnings)


def _check_writable(row: PlanRow) -> None:
    """Types ggml cannot produce (llama-quantize aborts), and --output-tensor-type/--token-embedding-type
    types that do not fit the rows (no fallback applies to them: llama-quantize writes a file llama.cpp
    cannot load)."""
    info = TYPES[row.dst_type]
    if row.dst_type in M.NOT_WRITABLE:
        raise QuantizeError(f"tensor {row.name}: ggml cannot quantize to type {info.name}")
    if row.shape[-1] % info.block_size:
        raise QuantizeError(f"tensor {row.name}: rows of {row.shape[-1]} are not a multiple of {info.block_size}, "
                            f"the block size of {info.name}")


@dataclass
class _State:
    """quantize_state_impl: the running counters the rules read, and the fallback tally."""

    n_wv: int  # n_attention_wv
    tied: bool  # has_tied_embeddings: no output.weight
    counters: dict = field(default_factory=lambda: {c: 0 for c in M.COUNTED})
    n_fallback: int = 0
    warnings: list = field(default_factory=list)


def _tensor_type(row, tensor, mix, state, emb_type, out_type, patterns, pure) -> GGMLType:
    """llama_tensor_get_type for a tensor that allows quantization."""
    if emb_type is not None and row.category == "token_embd":
        # per_layer_token_embd follows --token-embedding-type unless a --tensor-type pattern names it
        if row.name != "per_layer_token_embd.weight" or not any(rx.search(row.name) for rx, _ in patterns):
            return emb_type
    if out_type is not None and row.category == "output":
        return out_type
    new = tensor.default
    if not TYPES[new].is_quantized:
        return new
    for rx, t in patterns:
        if rx.search(row.name):
            new, row.manual = t, True
            break
    if not row.manual and not pure:
        new = _mix_type(row, tensor, mix, state, out_type)
    new, row.fallback = _fallback(row.name, row.shape[-1], new, state.warnings)
    state.n_fallback += row.fallback
    return new


def _as_file_type(v: int) -> int:
    try:
        return LlamaFileType(int(v))
    except ValueError:
        return int(v)


def _mix_type(row, tensor, mix, state, out_type) -> GGMLType:
    """llama_tensor_get_type_impl for one tensor (advances the running counters)."""
    cat = "output" if row.category == "output" or (state.tied and row.category == "token_embd") else row.category
    if cat == "output" and out_type is not None:
        return out_type
    model, name = tensor.model, row.name
    if cat == "attn_v":
        tensor.i, tensor.n = state.counters["attn_v"], state.n_wv
    elif cat in ("ffn_down", "ffn_gate", "ffn_up"):
        tensor.i = tensor.count = state.counters[cat]
        tensor.n = model.n_layer
        if max(1, model.n_expert) > 1 and mix not in M.LAYER_FROM_NAME_EXEMPT:  # layer_info
            layer = _layer_of(name)
            if layer is None:
                raise QuantizeError(f"Failed to determine layer for tensor {name}")
            if not 0 <= layer < model.n_layer:
                raise QuantizeError(f"Bad layer {layer} for tensor {name}. Must be in [0, {model.n_layer})")
            tensor.i = layer
    current = tensor.default
    for rule in _RULES:
        if _matches(rule, cat, mix, tensor, current):
            current = rule[3]
            break
    for rule in _ADJUST:
        if _matches(rule, cat, mix, tensor, current):
            current = rule[3]
    if cat in state.counters:
        state.counters[cat] += 1
    return current


def plan_model(src, ftype, *, imatrix=None, **options) -> Plan:
    """Plan the quantization of the GGUF file ``src`` (nothing is read but the header).

    ``imatrix``: a path, a loaded :class:`~gguf_kquant.model.imatrix.Imatrix`, a dict, or a bool.

    >>> plan = plan_model("fixtures/tiny-llama-f16.gguf", "Q4_K_M")        # doctest: +SKIP
    >>> plan.rows[0].name, plan.rows[0].dst_type.name                      # doctest: +SKIP
    ('output.weight', 'Q6_K')
    """
    from ..container.reader import open_gguf

    with open_gguf(src) as f:
        model = ModelInfo.from_metadata(f.metadata, where=str(src))
        tensors = [(t.name, t.shape, t.ggml_type) for t in f.tensors]
    return plan_tensors(tensors, model, ftype, imatrix=bool(imatrix), **options)
