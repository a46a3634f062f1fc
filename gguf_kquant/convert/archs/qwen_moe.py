"""Qwen2MoeForCausalLM -> ``qwen2moe`` (routed experts, a shared expert and its sigmoid gate) and
Qwen3MoeForCausalLM -> ``qwen3moe`` (convert_hf_to_gguf.py's Qwen2MoeModel / Qwen3MoeModel)."""

from __future__ import annotations

import gguf

from .experts import ExpertStacker
from .qwen import Qwen2Converter
from ..base import Converter, register


@register
class Qwen2MoeConverter(ExpertStacker, Qwen2Converter):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    tested_mixes = ("Q4_K_M",)
    arch = gguf.MODEL_ARCH.QWEN2MOE
    expert_re = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight"
    expert_weights = ("down_proj", "gate_proj", "up_proj")
    merged_name = "model.layers.{bid}.mlp.experts.{w}.weight"
    expert_ff_key, down_weight = "moe_intermediate_size", "down_proj"

    def set_parameters(self, w):
        super(Qwen2Converter, self).set_parameters(w)  # no pooling type: not an embedding model
        h = self.hparams
        if (n := h.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n)
        if (n := h.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n)

    set_vocab = Converter.set_vocab  # GPT-2 BPE only (Qwen2MoeModel is a plain TextModel)

    def plan_tensor(self, name, t, bid):
        stacked = self.expert_tensor(name, t, bid)
        return super().plan_tensor(name, t, bid) if stacked is None else stacked


@register
class Qwen3MoeConverter(Qwen2MoeConverter):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    arch = gguf.MODEL_ARCH.QWEN3MOE
