"""MixtralForCausalLM -> llama.cpp ``llama`` with experts (convert_hf_to_gguf.py's LlamaModel, which stacks
``block_sparse_moe.experts.{x}.w1/w2/w3`` into ``ffn_gate_exps`` / ``ffn_down_exps`` / ``ffn_up_exps``)."""

from __future__ import annotations

from .experts import ExpertStacker
from .llama import LlamaConverter
from ..base import register


@register
class MixtralConverter(ExpertStacker, LlamaConverter):
    hf_architectures = ("MixtralForCausalLM",)
    tested_mixes = ("Q4_K_M",)
    required_hparams = LlamaConverter.required_hparams + ("num_local_experts",)
    expert_count_keys = ("num_local_experts",)
    expert_re = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight"
    expert_weights = ("w1", "w2", "w3")
    merged_name = "layers.{bid}.feed_forward.experts.{w}.weight"
    expert_ff_key, down_weight = "intermediate_size", "w2"

    def plan_tensor(self, name, t, bid):
        stacked = self.expert_tensor(name, t, bid)
        return super().plan_tensor(name, t, bid) if stacked is None else stacked
