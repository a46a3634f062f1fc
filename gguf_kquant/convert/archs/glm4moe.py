"""Glm4MoeForCausalLM (GLM-4.5, GLM-4.5-Air) -> llama.cpp ``glm4moe`` (convert_hf_to_gguf.py's Glm4MoeModel,
conversion/glm.py).

What differs from a plain MoE llama: the first ``first_k_dense_replace`` layers are dense, MoE layers add
``n_shared_experts`` shared experts and a sigmoid router with a score-correction bias (``exp_probs_b``), RoPE
covers ``partial_rotary_factor`` of each head (NeoX order already: no q/k permutation), and the checkpoint
appends ``num_nextn_predict_layers`` multi-token-prediction layers after ``num_hidden_layers``
(``blk.N.nextn.*``).  The script counts those layers in ``block_count`` whether or not their tensors are
present, as we do; llama.cpp loads a file without them ("trunk only").
"""

from __future__ import annotations

from pathlib import Path

import gguf

from ...errors import ConversionError
from ..base import Converter, check_counts, check_real, register
from ..vocab import SpecialVocab, check_not_byte_fallback, checked_pre_tokenizer, pre_tokenizer_name, vocab_base
from .experts import ExpertStacker

# transformers' Glm4MoeConfig defaults: convert_hf_to_gguf.py reads config.json through AutoConfig, so a key
# the file omits still reaches the GGUF with this value
HPARAM_DEFAULTS = {
    "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 128,
    "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": True, "num_nextn_predict_layers": 1, "rope_theta": 10000.0,
}

POSITIVE_KEYS = ("moe_intermediate_size", "n_routed_experts", "n_group", "topk_group")
NON_NEGATIVE_KEYS = ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")


@register
class Glm4MoeConverter(ExpertStacker, Converter):
    hf_architectures = ("Glm4MoeForCausalLM",)
    tested_mixes = ("Q4_K_M",)
    arch = gguf.MODEL_ARCH.GLM4_MOE
    required_hparams = ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers")
    expert_count_keys = ("n_routed_experts",)
    expert_re = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight"
    expert_weights = ("down_proj", "gate_proj", "up_proj")
    merged_name = "model.layers.{bid}.mlp.experts.{w}.weight"
    expert_ff_key, down_weight = "moe_intermediate_size", "down_proj"

    def __init__(self, model_dir, hparams, checkpoint):
        h = {**HPARAM_DEFAULTS, **hparams}
        check_counts(Path(model_dir) / "config.json", h, POSITIVE_KEYS, 1)
        check_counts(Path(model_dir) / "config.json", h, NON_NEGATIVE_KEYS, 0)
        check_real(Path(model_dir) / "config.json", "routed_scaling_factor", h["routed_scaling_factor"])
        super().__init__(model_dir, h, checkpoint)
        # the MTP layers follow the main ones (model.layers.{num_hidden_layers}...)
        self.block_count = h["num_hidden_layers"] + h["num_nextn_predict_layers"]
        self.tensor_map = gguf.get_tensor_name_map(self.arch, self.block_count)
        # TextModel mirrors a top-level partial_rotary_factor (older config.json files) into rope_parameters
        self.partial_rotary_factor = self.rope_parameters.get("partial_rotary_factor",
                                                              h.get("partial_rotary_factor", 0.5))

    def head_dim(self) -> int:
        h = self.hparams
        return h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head, hd = h["hidden_size"], h["num_attention_heads"], self.head_dim()
        n_kv = h["num_key_value_heads"]
        n_expert, n_ff_exp = h["n_routed_experts"], h["moe_intermediate_size"]
        want = {
            "embed_tokens.weight": (h["vocab_size"], n_embd),
            "self_attn.q_proj.weight": (n_head * hd, n_embd),
            "self_attn.k_proj.weight": (n_kv * hd, n_embd),
            "self_attn.v_proj.weight": (n_kv * hd, n_embd),
            "mlp.up_proj.weight": (h["intermediate_size"], n_embd),
            "mlp.gate.weight": (n_expert, n_embd),
            "mlp.gate.e_score_correction_bias": (n_expert,),
            "mlp.shared_experts.up_proj.weight": (n_ff_exp * h["n_shared_experts"], n_embd),
            "eh_proj.weight": (n_embd, 2 * n_embd),
        }
        for name, t in self.ckpt.items():
            for suffix, shape in want.items():
                if name.endswith("." + suffix):
                    self.expect_shape(t, shape)
            if (bid := _layer(name)) is not None and bid >= self.block_count:
                raise ConversionError(f"{t.file.path}: tensor {name!r} is past the {self.block_count} layers "
                                      f"config.json gives (num_hidden_layers + num_nextn_predict_layers)")
        # a main MoE layer without experts at all (ExpertStacker names the missing ones of a partial layer);
        # the MTP layers may be absent as a whole
        for i in range(h["first_k_dense_replace"], h["num_hidden_layers"]):
            for w_name in self.expert_weights:
                if (name := f"model.layers.{i}.mlp.experts.0.{w_name}.weight") not in self.ckpt:
                    raise ConversionError(f"{self.dir}: expert tensor {name!r} missing (layer {i} is a MoE layer: "
                                          f"first_k_dense_replace is {h['first_k_dense_replace']})")

    def filter_name(self, name):
        name = super().filter_name(name)
        if name is not None and name.endswith("e_score_correction_bias"):  # the tensor map knows it as a bias
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        return name

    def plan_tensor(self, name, t, bid):
        stacked = self.expert_tensor(name, t, bid)
        return super().plan_tensor(name, t, bid) if stacked is None else stacked

    def set_parameters(self, w):
        super().set_parameters(w)  # with TextModel's expert-group and scoring keys
        h = self.hparams
        w.add_rope_dimension_count(int(self.head_dim() * self.partial_rotary_factor))
        w.add_expert_count(h["n_routed_experts"])  # again, as the script does (the value and place are kept)
        w.add_expert_feed_forward_length(h["moe_intermediate_size"])
        w.add_expert_shared_count(h["n_shared_experts"])
        w.add_leading_dense_block_count(h["first_k_dense_replace"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(h["routed_scaling_factor"])
        w.add_expert_weights_norm(h["norm_topk_prob"])
        w.add_nextn_predict_layers(h["num_nextn_predict_layers"])

    def set_vocab(self, w):
        """The script's ``_set_vocab_glm``: GPT-2 BPE, then bos/eot/unk/eom from GLM's chat tokens."""
        tokens, types, tj = vocab_base(self)
        check_not_byte_fallback(self, tj)
        pre = checked_pre_tokenizer(self) or pre_tokenizer_name(self.dir, tj)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        added = {a.get("content"): a.get("id") for a in tj.get("added_tokens") or []}
        special = SpecialVocab(self.dir, load_merges=True)
        # the script notes that <|endoftext|> as eot makes generation endless: <|user|> ends a turn
        for typ, tok in (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"),
                         ("eom", "<|observation|>")):
            if tok not in added:
                raise ConversionError(f"{self.dir / 'tokenizer.json'}: GLM's added token {tok!r} (the {typ} "
                                      f"token) is missing")
            special._set_special_token(typ, added[tok])
        special.add_to_gguf(w)
        self.pre_tokenizer = pre


def _layer(name: str):
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdecimal():
        return int(parts[2])
    return None
