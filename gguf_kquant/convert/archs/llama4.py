"""Llama4ForCausalLM and the text model of Llama4ForConditionalGeneration (Llama 4 Scout, Maverick: the
vision tower and projector are left out) -> llama.cpp ``llama4`` (convert_hf_to_gguf.py's Llama4Model,
conversion/llama.py).

transformers stores each MoE layer's experts fused, input dimension first::

    feed_forward.experts.gate_up_proj  (n_expert, n_embd, 2 * n_ff_exp)   columns [gate | up]
    feed_forward.experts.down_proj     (n_expert, n_ff_exp, n_embd)

llama.cpp wants ``ffn_{gate,up}_exps`` (n_expert, n_ff_exp, n_embd) and ``ffn_down_exps`` (n_expert, n_embd,
n_ff_exp): the script transposes the last two axes and splits gate from up.  ``experts.TransposedExperts``
reads that transpose slab by slab from the mapped checkpoint (peak: one slab, not a layer of experts).

Only every ``interleave_moe_layer_step``-th layer is MoE (the others are dense with ``intermediate_size_mlp``);
RoPE is interleaved already (no q/k permutation); the NoPE layers, chunked attention and attention temperature
tuning are fixed in llama.cpp (every 4th layer, 8192-token chunks) and not written, except that a config whose
layers are all full attention (MobileLLM) gets ``sliding_window = 0``.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from ...errors import ConversionError
from ..base import Converter, check_counts, register
from .experts import TransposedExperts
from .llama import LlamaConverter

# transformers' Llama4TextConfig defaults (convert_hf_to_gguf.py reads config.json through AutoConfig)
HPARAM_DEFAULTS = {
    "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "num_experts_per_tok": 1, "num_local_experts": 16,
    "interleave_moe_layer_step": 1, "rope_theta": 500000.0,
}
FUSED_RE = r"model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)"


@register
class Llama4Converter(LlamaConverter):
    hf_architectures = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
    tested_mixes = ("Q4_K_M",)
    arch = gguf.MODEL_ARCH.LLAMA4
    required_hparams = ("hidden_size", "num_attention_heads", "vocab_size")
    expert_count_keys = ("num_local_experts",)

    def __init__(self, model_dir, hparams, checkpoint):
        h = {**HPARAM_DEFAULTS, **hparams}
        # the script's own fix-up: "intermediate_size" is the experts' width, the dense layers' is
        # "intermediate_size_mlp"; TextModel then writes feed_forward_length from "intermediate_size"
        h["intermediate_size_moe"], h["intermediate_size"] = h["intermediate_size"], h["intermediate_size_mlp"]
        check_counts(Path(model_dir) / "config.json", h, ("interleave_moe_layer_step",))
        super().__init__(model_dir, h, checkpoint)

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head, hd = h["hidden_size"], h["num_attention_heads"], h["head_dim"]
        n_kv, n_expert, n_ff_exp = h["num_key_value_heads"], h["num_local_experts"], h["intermediate_size_moe"]
        want = {
            "embed_tokens.weight": (h["vocab_size"], n_embd),
            "self_attn.q_proj.weight": (n_head * hd, n_embd),
            "self_attn.k_proj.weight": (n_kv * hd, n_embd),
            "self_attn.v_proj.weight": (n_kv * hd, n_embd),
            "feed_forward.up_proj.weight": (h["intermediate_size"], n_embd),
            "feed_forward.router.weight": (n_expert, n_embd),
            "feed_forward.shared_expert.up_proj.weight": (n_ff_exp, n_embd),
            "feed_forward.experts.gate_up_proj": (n_expert, n_embd, 2 * n_ff_exp),
            "feed_forward.experts.down_proj": (n_expert, n_ff_exp, n_embd),
        }
        names = set()
        for name, t in self.ckpt.items():
            if self.filter_name(name) is None:  # the vision tower has attention projections of its own
                continue
            names.add(self.filter_name(name))
            for suffix, shape in want.items():
                if name.endswith("." + suffix):
                    self.expect_shape(t, shape)
        step = h["interleave_moe_layer_step"]
        for i in range(step - 1, self.block_count, step):  # llama.cpp's MoE layers: (i + 1) % step == 0
            for w_name in ("gate_up_proj", "down_proj"):
                if (name := f"model.layers.{i}.feed_forward.experts.{w_name}") not in names:
                    raise ConversionError(f"{self.dir}: expert tensor {name!r} missing (layer {i} is a MoE layer: "
                                          f"interleave_moe_layer_step is {step})")
        self._check_fixed_attention()

    def _check_fixed_attention(self):
        """llama.cpp fixes what transformers reads from config.json: RoPE skipped in every 4th layer, 8192-token
        chunks, temperature tuning with floor 8192 and scale 0.1 (all off when every layer is full attention),
        q/k L2 norm unless there are 128 experts.
        The script writes none of it; a config that differs would load and compute something else: refused,
        as smollm3 refuses its NoPE interval."""
        h, path = self.hparams, self.dir / "config.json"
        full = self._all_full_attention()
        want = [1] * self.block_count if full else [int((i + 1) % 4 != 0) for i in range(self.block_count)]
        if h.get("no_rope_layers") and h["no_rope_layers"] != want:
            raise ConversionError(f"{path}: no_rope_layers {h['no_rope_layers']} differ from llama.cpp's llama4 "
                                  f"pattern {want}")
        if h.get("use_qk_norm", True) != (h["num_local_experts"] != 128):  # llama.cpp: off for 128 experts only
            raise ConversionError(f"{path}: use_qk_norm is {h.get('use_qk_norm')!r}, but llama.cpp's llama4 "
                                  f"decides it from the expert count ({h['num_local_experts']})")
        fixed = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1}
        for key, value in fixed.items():
            if not full and h.get(key, value) != value:
                raise ConversionError(f"{path}: {key} is {h[key]!r}; llama.cpp's llama4 fixes it at {value}")

    def _all_full_attention(self) -> bool:
        return "layer_types" in self.hparams and all(lt == "full_attention" for lt in self.hparams["layer_types"])

    def set_parameters(self, w):
        super().set_parameters(w)
        h = self.hparams
        w.add_interleave_moe_layer_step(h["interleave_moe_layer_step"])
        w.add_expert_feed_forward_length(h["intermediate_size_moe"])
        if self._all_full_attention():
            w.add_sliding_window(0)  # MobileLLM: no chunked attention (and RoPE in every layer)

    def filter_name(self, name):
        # Llama4ForConditionalGeneration: the text model only (TextModel.filter_tensors drops these; the
        # script writes them to the --mmproj file)
        if name.startswith(("vision_model.", "multi_modal_projector.")):
            return None
        return super().filter_name(name)

    set_vocab = Converter.set_vocab  # GPT-2 BPE only (Llama4Model._set_vocab_gpt2)

    def plan_tensor(self, name, t, bid):
        m = re.fullmatch(FUSED_RE, name)
        if m is None:
            yield self.map_name(name), tuple(t.shape), None  # no q/k permutation: RoPE is interleaved already
            return
        n_ff = t.shape[-1] // 2
        prefix = name[:m.start(2)]
        if m.group(2) == "down_proj":
            parts = (("down_proj", slice(None)),)
        else:  # the script splits the transposed tensor: the first half of the rows is gate, then up
            parts = (("gate_proj", slice(0, n_ff)), ("up_proj", slice(n_ff, 2 * n_ff)))
        if not hasattr(self, "_fused"):
            self._fused = {}
        for w_name, cols in parts:
            new_name = self.map_name(f"{prefix}{w_name}.weight")
            self._fused[new_name] = TransposedExperts(new_name, t, cols)
            yield new_name, self._fused[new_name].shape, None

    def plan(self, out_type):
        planned = super().plan(out_type)
        for p in planned:
            if p.name in getattr(self, "_fused", {}):
                p.source = self._fused[p.name]
        return planned
