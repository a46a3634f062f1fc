"""Ernie4_5_MoeForCausalLM -> ``ernie4_5-moe`` (convert_hf_to_gguf.py's Ernie4_5MoeModel).

Layers before ``moe_layer_start_index`` are dense; each later one has ``moe_num_experts`` routed experts
(one tensor per expert, stacked here into ``ffn_{gate,up,down}_exps``), shared experts (``shared_experts``,
one dense feed-forward as wide as all of them) and the router's selection bias
``moe_statics.e_score_correction_bias`` (llama.cpp's ``exp_probs_b``).  The vocabulary is SentencePiece.
No q/k permutation: Ernie's rotary embedding already pairs adjacent dimensions, as llama.cpp's does.
"""

from __future__ import annotations

import re

import gguf

from ...errors import ConversionError
from .experts import ExpertStacker
from ..base import Converter, check_counts, register
from ..vocab import read_json, set_vocab_sentencepiece

# transformers' Ernie4_5_MoeConfig defaults, which convert_hf_to_gguf.py (through AutoConfig) sees for keys a
# config.json leaves out
DEFAULTS = {"moe_layer_start_index": 1, "moe_layer_interval": 1, "moe_num_shared_experts": 2,
            "moe_intermediate_size": 1536, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
_MOE_COUNTS = ("moe_num_experts", "moe_k", "moe_layer_interval", "moe_intermediate_size")  # integers >= 1
# Multi-token-prediction tensors, which the script skips (its patterns, matched at the start of the name)
_MTP = re.compile(r"model.mtp_block.(\d+)|model.mtp_emb_norm.(\d+)|model.mtp_hidden_norm.(\d+)|"
                  r"model.mtp_linear_proj.(\d+)")


@register
class Ernie45MoeConverter(ExpertStacker, Converter):
    hf_architectures = ("Ernie4_5_MoeForCausalLM",)
    tested_mixes = ("Q4_K_M",)
    arch = gguf.MODEL_ARCH.ERNIE4_5_MOE
    required_hparams = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                        "vocab_size", "moe_num_experts", "moe_k")
    expert_count_keys = ()  # moe_num_experts: written with the other MoE keys, after the generic ones
    expert_re = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
    expert_weights = ("gate_proj", "up_proj", "down_proj")
    merged_name = "model.layers.{bid}.mlp.experts.{w}.weight"
    expert_ff_key, down_weight = "moe_intermediate_size", "down_proj"

    def __init__(self, model_dir, hparams, checkpoint):
        h = {**DEFAULTS, **hparams}
        if "rope_parameters" not in h and "rope_scaling" not in h:
            h.setdefault("rope_theta", 500000.0)
        super().__init__(model_dir, h, checkpoint)
        cfg = self.dir / "config.json"
        check_counts(cfg, h, _MOE_COUNTS)
        check_counts(cfg, h, ("moe_layer_start_index", "moe_num_shared_experts"), 0)
        if h["moe_k"] > h["moe_num_experts"]:
            raise ConversionError(f"{cfg}: moe_k {h['moe_k']} exceeds moe_num_experts {h['moe_num_experts']}")

    def n_expert(self) -> int:
        return self.hparams["moe_num_experts"]

    def shared_ff(self) -> int:
        """The shared experts' width as the script writes it: intermediate_size // num_key_value_heads (right
        for the released models, where it equals moe_intermediate_size * moe_num_shared_experts)."""
        return self.hparams["intermediate_size"] // self.hparams["num_key_value_heads"]

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head, n_kv = h["hidden_size"], h["num_attention_heads"], h["num_key_value_heads"]
        head_dim = h.get("head_dim") or n_embd // n_head
        start, step, n_layer = h["moe_layer_start_index"], h["moe_layer_interval"], self.block_count
        end = h.get("moe_layer_end_index", n_layer - 1)
        end = n_layer - 1 if end == -1 else end
        # transformers' MoE layers must be llama.cpp's: it loads experts for every layer from the start index
        moe = [start <= i <= end and (i + 1) % step == 0 for i in range(n_layer)]
        if moe != [i >= start for i in range(n_layer)]:
            raise ConversionError(f"{self.dir / 'config.json'}: MoE layers {[i for i in range(n_layer) if moe[i]]} "
                                  f"(start {start}, end {end}, interval {step}); llama.cpp's ernie4_5-moe needs "
                                  f"every layer from moe_layer_start_index on")
        kept = {new: t for n, t in self.ckpt.items() if (new := self.filter_name(n)) is not None}  # no MTP
        for i in range(n_layer):  # a router in each MoE layer, a plain feed-forward in each dense one
            need = f"model.layers.{i}.mlp.{'gate' if moe[i] else 'up_proj'}.weight"
            if need not in kept:
                raise ConversionError(f"{self.dir}: tensor {need!r} is missing: config.json makes layer {i} "
                                      f"{'a MoE' if moe[i] else 'a dense'} layer (moe_layer_start_index {start})")
        n_ff_sh = self.shared_ff()
        want = {
            "model.embed_tokens.weight": (h["vocab_size"], n_embd),
            "self_attn.q_proj.weight": (n_head * head_dim, n_embd),
            "self_attn.k_proj.weight": (n_kv * head_dim, n_embd),
            "self_attn.v_proj.weight": (n_kv * head_dim, n_embd),
            "mlp.up_proj.weight": (h["intermediate_size"], n_embd),
            "mlp.gate.weight": (self.n_expert(), n_embd),
            "mlp.moe_statics.e_score_correction_bias": (1, self.n_expert()),
            "mlp.shared_experts.gate_proj.weight": (n_ff_sh, n_embd),
            "mlp.shared_experts.up_proj.weight": (n_ff_sh, n_embd),
            "mlp.shared_experts.down_proj.weight": (n_embd, n_ff_sh),
        }
        for name, t in kept.items():
            for suffix, shape in want.items():
                if name.endswith(suffix):
                    self.expect_shape(t, shape)

    def set_parameters(self, w):
        super().set_parameters(w)
        h = self.hparams
        w.add_expert_count(h["moe_num_experts"])
        w.add_expert_used_count(h["moe_k"])
        w.add_interleave_moe_layer_step(h["moe_layer_interval"])
        w.add_leading_dense_block_count(h["moe_layer_start_index"])
        w.add_expert_feed_forward_length(h["moe_intermediate_size"])
        w.add_expert_shared_count(h["moe_num_shared_experts"])
        if h["moe_num_shared_experts"] > 0:
            w.add_expert_shared_feed_forward_length(self.shared_ff())

    def set_vocab(self, w):
        set_vocab_sentencepiece(self, w)
        cfg_path = self.dir / "tokenizer_config.json"
        if cfg_path.is_file() and "add_prefix_space" in (cfg := read_json(cfg_path)):
            w.add_add_space_prefix(cfg["add_prefix_space"])

    def filter_name(self, name):
        if _MTP.match(name):  # checked before the "ernie." rename, as the script does
            return None
        return super().filter_name(name.replace("ernie.", "model."))

    def plan_tensor(self, name, t, bid):
        # The script's MoE class maps every other tensor as it is: unlike dense Ernie 4.5 it does not split a
        # fused qkv_proj / up_gate_proj, so such a checkpoint fails in map_name, as it fails there.
        stacked = self.expert_tensor(name, t, bid)
        if stacked is not None:
            return stacked
        if name.endswith("mlp.moe_statics.e_score_correction_bias"):
            # kept (1, n_expert), as stored; llama.cpp reads it as {n_expert}
            new = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_EXP_PROBS_B].format(bid=bid) + ".bias"
            return iter([(new, tuple(t.shape), None)])
        return super().plan_tensor(name, t, bid)
