"""The conversion pipeline shared by every architecture: plan the output (names, shapes, types, metadata)
from the checkpoint's headers alone, then stream one tensor at a time into the GGUF writer.

An architecture module subclasses :class:`Converter`, sets ``hf_architectures`` / ``arch`` and overrides a
few hooks (``set_parameters``, ``set_vocab``, ``filter_name``, ``plan_tensor``); ``register`` puts it in
the table that :func:`gguf_kquant.convert.convert_hf` looks up by ``config.json``'s ``architectures``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

import gguf

from ..errors import ConversionError
from ..types import GGMLType
from .safetensors import FLOAT_DTYPES, Checkpoint, SafeTensor, read_json

logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf-py's SpecialVocab logs every special token

REGISTRY: dict[str, type["Converter"]] = {}


def register(cls):
    """Class decorator: make ``cls`` the converter for each name in ``cls.hf_architectures``."""
    for name in cls.hf_architectures:
        REGISTRY[name] = cls
    return cls


# ---- config.json ---------------------------------------------------------------------------------
# What the converters read from config.json, and what each value must be.  Checked once, when the file is
# loaded, so that the code after it can index and divide without guarding every use.
MAX_DIM = 1 << 24  # sizes, heads, layers: far beyond any model, small enough that products stay sane
MAX_VOCAB = 1 << 22  # 4M tokens; the largest vocabularies known have ~262k
_COUNT_KEYS = (  # positive integers
    "num_hidden_layers", "n_layers", "n_layer", "num_layers", "hidden_size", "n_embd", "dim", "intermediate_size",
    "n_inner", "hidden_dim", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "n_kv_heads",
    "head_dim", "max_position_embeddings", "n_ctx", "n_positions", "max_length", "sliding_window",
    "type_vocab_size", "num_local_experts", "num_experts", "original_max_position_embeddings",
    "sliding_window_pattern", "vocab_size", "vocab_size_per_layer_input",
)
_MAY_BE_ZERO = ("num_local_experts", "num_experts", "sliding_window", "sliding_window_pattern")
_REAL_KEYS = (  # positive numbers that a FLOAT32 value holds (they are written as GGUF FLOAT32 metadata)
    "rope_theta", "rotary_emb_base", "rope_local_base_freq", "rms_norm_eps", "norm_eps", "layer_norm_eps",
    "layer_norm_epsilon", "norm_epsilon", "final_logit_softcapping", "factor", "low_freq_factor",
    "high_freq_factor", "attn_logit_softcapping", "query_pre_attn_scalar",
)
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "full_attention", "sliding_attention")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a config number above it cannot be written as FLOAT32 metadata
# the positive range of float32: below the least subnormal a value is written as 0, above the largest it is refused
_REAL_RANGE = (float(np.finfo(np.float32).smallest_subnormal), FLOAT32_MAX)


def check_counts(path: Path, h: dict, keys: tuple, low: int = 1) -> None:
    """An architecture's own config.json integers (those _COUNT_KEYS does not list): each absent, null or an
    integer in ``low``..MAX_DIM, else ConversionError naming ``path`` and the key."""
    for key in keys:
        v = h.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_DIM):
            raise ConversionError(f"{path}: key {key!r} must be an integer in {low}..{MAX_DIM}, not {v!r:.60}")


def check_real(path: Path, key: str, v) -> None:
    """A config.json number written as GGUF FLOAT32 metadata: positive and within float32's range (see
    _REAL_RANGE), else ConversionError naming ``path`` and the key."""
    low, high = _REAL_RANGE
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not low <= v <= high:
        raise ConversionError(f"{path}: key {key!r} must be a number in {low:.6g}..{high:.6g} (a positive float32), "
                              f"not {v!r:.60}")


def load_config(model_dir: Path) -> dict:
    """``config.json`` (merged with its ``text_config``), every value the converters use type-checked."""
    path = Path(model_dir) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConversionError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    cfg = _drop_nulls(read_json(path))
    if "text_config" in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise ConversionError(f"{path}: key 'text_config' must be an object, not {cfg['text_config']!r:.40}")
        cfg = {**cfg, **cfg["text_config"]}
    check_hparams(path, cfg)
    return cfg


def _drop_nulls(h: dict) -> dict:
    """``"head_dim": null`` means "not set" to transformers: drop such keys (also in nested objects) so that
    ``h.get(key, default)`` gives the default."""
    return {k: _drop_nulls(v) if isinstance(v, dict) else v for k, v in h.items() if v is not None}


def check_hparams(path: Path, h: dict, where: str = "") -> None:
    """Raise ConversionError naming ``path`` and the key for a value of the wrong type or range."""
    archs = h.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConversionError(f"{path}: key 'architectures' must be a list of strings, not {archs!r:.60}")
    for key, v in h.items():
        name = f"{where}{key}"
        if v is None:
            continue
        if key in _COUNT_KEYS:
            limit = MAX_VOCAB if key.startswith("vocab_size") else MAX_DIM
            low = 0 if key in _MAY_BE_ZERO else 1
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= limit:
                raise ConversionError(f"{path}: key {name!r} must be an integer in {low}..{limit}, not {v!r:.60}")
        elif key in _REAL_KEYS:
            check_real(path, name, v)
        elif key in _ROPE_KEYS:
            if not isinstance(v, dict):
                raise ConversionError(f"{path}: key {name!r} must be an object, not {v!r:.60}")
            check_hparams(path, v, f"{name}.")
        elif key in ("rope_type", "type") and where and not isinstance(v, str):
            raise ConversionError(f"{path}: key {name!r} must be a string, not {v!r:.60}")
        elif key in ("_name_or_path", "model_type") and not where and not isinstance(v, str):
            raise ConversionError(f"{path}: key {name!r} must be a string, not {v!r:.60}")
        elif key == "is_causal" and not isinstance(v, bool):
            raise ConversionError(f"{path}: key {name!r} must be true or false, not {v!r:.60}")
    lo, hi = h.get("low_freq_factor"), h.get("high_freq_factor")
    if lo is not None and hi is not None and lo == hi:
        raise ConversionError(f"{path}: keys '{where}low_freq_factor' and '{where}high_freq_factor' are equal ({lo})")


def load_model_card(model_dir: Path, model_name, total_params: int):
    """gguf-py's ``Metadata.load`` (README.md's YAML model card and config.json), as convert_hf_to_gguf.py
    calls it; a file it cannot read (bad YAML, a list where it wants a string, a FIFO) is a ConversionError."""
    model_dir = Path(model_dir)
    for name in ("README.md", "config.json"):
        p = model_dir / name
        if p.exists() and not p.is_file():
            raise ConversionError(f"{p}: not a regular file")
    try:
        meta = gguf.Metadata.load(None, model_dir, model_name, total_params)
        meta.set_gguf_meta_model(gguf.GGUFWriter(path=None, arch="llama"))  # a dry run of what the caller does
        return meta
    except Exception as exc:  # yaml.YAMLError, TypeError/AttributeError on values of unexpected types
        raise ConversionError(f"{model_dir}: gguf-py cannot read the model card (README.md front matter) or "
                              f"config.json: {type(exc).__name__}: {str(exc)[:200]}") from None


# llama.cpp's convert_hf_to_gguf.py outtypes (and ours): the ftype and the type of "big" tensors.
FLOAT_FTYPES = {
    "F32": (gguf.LlamaFileType.ALL_F32, GGMLType.F32),
    "F16": (gguf.LlamaFileType.MOSTLY_F16, GGMLType.F16),
    "BF16": (gguf.LlamaFileType.MOSTLY_BF16, GGMLType.BF16),
    "Q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, GGMLType.Q8_0),
}

# Tensors convert_hf_to_gguf.py always keeps in F32 (besides 1-d tensors, "*_norm.weight" and non-weights).
_F32_KINDS = (
    gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP, gguf.MODEL_TENSOR.POS_EMBD,
    gguf.MODEL_TENSOR.TOKEN_TYPES, gguf.MODEL_TENSOR.SSM_CONV1D,
)


@dataclass
class PlannedTensor:
    """One output tensor: GGUF name, numpy shape (outermost first), ggml type and how to make its values."""

    name: str
    shape: tuple
    source: SafeTensor
    # source values (float32 or float16) -> output values; None: the source values unchanged, which lets the
    # producer read the source slab by slab instead of as a whole
    make: Optional[Callable[[np.ndarray], np.ndarray]]
    qtype: GGMLType = GGMLType.F32
    bid: Optional[int] = None


def _bid(name: str) -> Optional[int]:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


# llama.cpp's llama_expert_gating_func_type, and the config.json keys naming it (TextModel's list)
_GATING_FUNCS = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}
_SCORE_FUNCTION_KEYS = ("score_function", "scoring_func", "score_func", "moe_router_activation",
                        "moe_router_activation_func", "expert_selection_fn")


class Converter:
    """Base class of the per-architecture converters (see the module docstring)."""

    hf_architectures: tuple = ()
    arch: gguf.MODEL_ARCH
    required_hparams: tuple = ()  # config.json keys this architecture reads without a default
    expert_count_keys = ("num_local_experts", "num_experts", "n_routed_experts")  # where MoE configs count experts
    # what the tests compare with llama.cpp (the README's table): convert_hf_to_gguf.py's file at every outtype,
    # and these mixes against convert_hf_to_gguf.py --outtype f16 + llama-quantize
    tested_outtypes = ("F32", "F16", "BF16", "Q8_0")
    tested_mixes: tuple = ()
    untested_architectures: tuple = ()  # of hf_architectures

    def __init__(self, model_dir: Path, hparams: dict, checkpoint: Checkpoint):
        self.dir = Path(model_dir)
        self.hparams = hparams
        self.ckpt = checkpoint
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        check_hparams(self.dir / "config.json", hparams)
        for key in self.required_hparams:
            if hparams.get(key) is None:
                raise ConversionError(f"{self.dir / 'config.json'}: key {key!r} is missing (needed for "
                                      f"{hparams.get('architectures', ['this architecture'])[0]})")
        self.block_count = self.find(["num_hidden_layers", "n_layers", "n_layer", "num_layers"])
        n_tensors = len(getattr(checkpoint, "tensors", ()))
        if n_tensors and self.block_count > n_tensors:  # gguf-py's name map holds every block: memory follows it
            raise ConversionError(f"{self.dir / 'config.json'}: {self.block_count} layers, but the checkpoint holds "
                                  f"{n_tensors} tensors")
        self.tensor_map = gguf.get_tensor_name_map(self.arch, self.block_count)
        rp = self.hparams.get("rope_parameters", self.hparams.get("rope_scaling")) or {}
        self.rope_parameters = dict(rp)
        if "full_attention" not in rp and "sliding_attention" not in rp:
            # transformers >= 5 moves rope_theta into rope_parameters; older configs keep it at the top level
            theta = self.find(["rope_theta", "rotary_emb_base"], optional=True)
            local = self.find(["rope_local_base_freq"], optional=True)
            if local is not None:
                self.rope_parameters["sliding_attention"] = {"rope_theta": local}
            if "rope_theta" not in self.rope_parameters and theta is not None:
                self.rope_parameters["rope_theta"] = theta
            if "rope_type" not in self.rope_parameters and "type" in self.rope_parameters:
                self.rope_parameters["rope_type"] = self.rope_parameters["type"]

    # ---- helpers ------------------------------------------------------------------------------------
    def find(self, keys, optional=False):
        for k in keys:
            if self.hparams.get(k) is not None:
                return self.hparams[k]
        if optional:
            return None
        raise ConversionError(f"{self.dir / 'config.json'}: none of {list(keys)} is set")

    def n_expert(self) -> int:
        """Experts per MoE layer (0: a dense model)."""
        return self.find(self.expert_count_keys, optional=True) or 0

    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConversionError(f"{self.dir}: cannot map tensor {name!r} to a llama.cpp name for {self.arch_name}")
        return new

    def is_kind(self, new_name: str, kind: gguf.MODEL_TENSOR, bid: Optional[int], suffix=".weight") -> bool:
        if kind not in gguf.MODEL_TENSORS[self.arch]:
            return False
        key = gguf.TENSOR_NAMES[kind]
        if "{bid}" in key:
            if bid is None:
                return False
            key = key.format(bid=bid)
        elif bid is not None:
            return False
        return new_name == key + suffix

    def expect_shape(self, t: SafeTensor, shape: tuple) -> None:
        """Refuse a tensor whose shape disagrees with config.json (a wrong config would load but misbehave)."""
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{t.file.path}: tensor {t.name!r} has shape {list(t.shape)} but config.json "
                                  f"implies {list(shape)}")

    # ---- hooks ------------------------------------------------------------------------------------
    def filter_name(self, name: str) -> Optional[str]:
        """Rename or drop (None) a checkpoint tensor before mapping."""
        if name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
            return None
        return name.replace("language_model.", "")

    def plan_tensor(self, name: str, t: SafeTensor, bid: Optional[int]) -> Iterable[tuple]:
        """(gguf name, output shape, transform) for each output made from checkpoint tensor ``name``."""
        yield self.map_name(name), tuple(t.shape), None

    def check_shapes(self) -> None:
        """Compare the checkpoint's shapes with config.json (overridden per architecture)."""

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        """Architecture hyper-parameters; the generic part mirrors TextModel.set_gguf_parameters."""
        h = self.hparams
        w.add_block_count(self.block_count)
        if (n := self.find(["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                  "max_sequence_length", "model_max_length"], True)) is not None:
            w.add_context_length(n)
        if (n := self.find(["hidden_size", "n_embd", "dim"], True)) is not None:
            w.add_embedding_length(n)
        if (n := self.find(["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                                  "n_inner", "hidden_dim"], True)) is not None:
            w.add_feed_forward_length(n)
        if (n := self.find(["num_attention_heads", "n_head", "n_heads"], True)) is not None:
            w.add_head_count(n)
        if (n := self.find(["num_key_value_heads", "n_kv_heads"], True)) is not None:
            w.add_head_count_kv(n)
        if h.get("is_causal") is False:
            w.add_causal_attention(False)
        rope = self.rope_parameters.get("full_attention", self.rope_parameters)
        rope_type = rope.get("rope_type")
        if rope_type == "linear" and rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope_type == "yarn" and rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            if rope.get("original_max_position_embeddings") is None:
                raise ConversionError(f"{self.dir / 'config.json'}: YaRN RoPE scaling needs key "
                                      f"'original_max_position_embeddings'")
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if (x := rope.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(x)
            if (x := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(x)
            if (x := rope.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(x)
            if (x := rope.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(x)
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        elif rope_type not in (None, "default", "dynamic", "llama3", "Llama3"):
            raise ConversionError(f"{self.dir / 'config.json'}: unsupported RoPE type {rope_type!r}")
        if (theta := rope.get("rope_theta")) is not None:
            w.add_rope_freq_base(theta)
        if (local := (self.rope_parameters.get("sliding_attention") or {}).get("rope_theta")) is not None:
            w.add_rope_freq_base_swa(local)
        if (eps := self.find(["rms_norm_eps", "norm_eps"], True)) is not None:
            w.add_layer_norm_rms_eps(eps)
        if (eps := self.find(["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"], True)) is not None:
            w.add_layer_norm_eps(eps)
        if (n := self.find(self.expert_count_keys, True)) is not None:
            w.add_expert_count(n)
        if (n := self.find(["num_experts_per_tok", "num_experts_per_token", "top_k_experts"], True)) is not None:
            w.add_expert_used_count(n)
        if (n := h.get("n_group")) is not None:
            w.add_expert_group_count(n)
        if (n := h.get("topk_group")) is not None:
            w.add_expert_group_used_count(n)
        if (func := self.find(_SCORE_FUNCTION_KEYS, True)) is not None:
            if func not in _GATING_FUNCS:
                raise ConversionError(f"{self.dir / 'config.json'}: unsupported expert scoring function {func!r} "
                                      f"(llama.cpp knows {', '.join(_GATING_FUNCS)})")
            # a plain uint32: the gguf package may lack a newer function's enum member (sqrtsoftplus)
            w.add_uint32(gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=self.arch_name), _GATING_FUNCS[func])
        if (head_dim := h.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_file_type(self.file_type)

    def pooling_type(self):
        """The sentence-transformers pooling of ``modules.json`` (convert_hf_to_gguf's _try_set_pooling_type)."""
        modules = self.dir / "modules.json"
        if not modules.is_file():
            return None
        for mod in read_json(modules, list):
            if not (isinstance(mod, dict) and isinstance(mod.get("type"), str) and isinstance(mod.get("path"), str)):
                raise ConversionError(f"{modules}: each module must be an object with string 'type' and 'path'")
            if mod["type"].endswith("Pooling"):
                sub = Path(mod["path"])
                if sub.is_absolute() or ".." in sub.parts:
                    raise ConversionError(f"{modules}: module path {mod['path']!r} leaves the model folder")
                cfg = read_json(self.dir / sub / "config.json")
                modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS,
                         "lasttoken": gguf.PoolingType.LAST}
                if cfg.get("pooling_mode_mean_tokens"):
                    return gguf.PoolingType.MEAN
                if cfg.get("pooling_mode_cls_token"):
                    return gguf.PoolingType.CLS
                if cfg.get("pooling_mode_lasttoken"):
                    return gguf.PoolingType.LAST
                if cfg.get("pooling_mode") in modes:
                    return modes[cfg["pooling_mode"]]
                raise ConversionError(f"{modules}: only MEAN, CLS and LAST pooling are supported")
        return None

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        from .vocab import set_vocab_gpt2

        set_vocab_gpt2(self, w)

    def extra_tensors(self) -> Iterable[tuple]:
        """Generated tensors (e.g. rope_freqs): (gguf name, float32 array)."""
        return ()

    # ---- planning ----------------------------------------------------------------------------------
    def plan(self, out_type: GGMLType) -> list[PlannedTensor]:
        self.check_shapes()
        planned: list[PlannedTensor] = []
        # convert_hf_to_gguf.py's order: shards by file name, each one's tensors by name (safe_open().keys() is
        # sorted), whatever order the headers list them in
        shard = {f: i for i, f in enumerate(self.ckpt.files)}
        for src_name, t in sorted(self.ckpt.items(), key=lambda kv: (shard[kv[1].file], kv[0])):
            name = self.filter_name(src_name)
            if name is None:
                continue
            if t.dtype not in FLOAT_DTYPES:
                raise ConversionError(f"{t.file.path}: tensor {src_name!r} has dtype {t.dtype}; only "
                                      f"F32, F16 and BF16 checkpoints are supported")
            bid = _bid(name)
            for new_name, shape, fn in self.plan_tensor(name, t, bid):
                planned.append(PlannedTensor(new_name, tuple(shape), t, fn, bid=_bid(new_name)))
        seen = set()
        for p in planned:
            if p.name in seen:
                raise ConversionError(f"{self.dir}: two checkpoint tensors map to {p.name!r}")
            seen.add(p.name)
            p.qtype = self.tensor_type(p.name, len(p.shape), p.bid, out_type)
        return planned

    def tensor_type(self, new_name: str, n_dims: int, bid, out_type: GGMLType) -> GGMLType:
        """convert_hf_to_gguf.py's rule: 1-d tensors, norms, non-weights and a few kinds stay F32."""
        if n_dims <= 1 or new_name.endswith("_norm.weight"):
            return GGMLType.F32
        if any(self.is_kind(new_name, k, bid) for k in _F32_KINDS) or not new_name.endswith(".weight"):
            return GGMLType.F32
        return out_type


def load_source(t: SafeTensor) -> np.ndarray:
    """What convert_hf_to_gguf.py computes with: F16 and F32 as stored, BF16 widened to F32."""
    a = t.array()
    return widen_bf16(a) if t.dtype == "BF16" else a


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32, exactly."""
    u = bits.astype(np.uint32)
    u <<= 16  # in place: no second full-size temporary
    return u.view(np.float32)


def count_parameters(planned: list[PlannedTensor]) -> int:
    return sum(math.prod(p.shape) for p in planned)


def size_label(planned: list[PlannedTensor]) -> str:
    """``general.size_label`` as gguf-py's GGUFWriter.get_total_parameter_count and size_label make it:
    "4x126K" for experts (shared parameters plus one expert's), "273K" otherwise."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for p in planned:
        size = math.prod(p.shape)
        total += size
        if "_exps." in p.name and len(p.shape) >= 3:
            n = p.shape[-2 if ".bias" in p.name else -3]
            expert += size // n
            expert_sum += n
            n_expert_tensors += 1
        else:
            shared += size
    return gguf.size_label(total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0)
