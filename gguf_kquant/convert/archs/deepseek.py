"""DeepseekV2ForCausalLM and DeepseekV3ForCausalLM -> llama.cpp ``deepseek2`` (convert_hf_to_gguf.py's
DeepseekV2Model, ``conversion/deepseek.py``).

Multi-head latent attention: queries come from ``q_proj`` (V2-Lite) or the low-rank ``q_a_proj`` /
``q_a_layernorm`` / ``q_b_proj``; keys and values from ``kv_a_proj_with_mqa`` (the compressed latent plus the
shared rotary key) and ``kv_b_proj``, which llama.cpp wants split per head into ``attn_k_b`` (transposed) and
``attn_v_b`` for its absorbed-attention path.  The first ``first_k_dense_replace`` layers have a dense MLP;
the others routed experts (stacked), shared experts and, in V3, a routing bias ``e_score_correction_bias``
(``exp_probs_b``) with sigmoid scoring and expert groups.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import gguf

from ...errors import ConversionError
from ..base import Converter, check_counts, register
from ..safetensors import read_json
from .experts import ExpertStacker

# What transformers' DeepseekV2Config / DeepseekV3Config give for keys absent from config.json: the script
# reads the config through AutoConfig, so a key left out of config.json still reaches the GGUF with these
# values (only the keys the conversion reads; a key given as null stays unset, as there).
_CONFIG_DEFAULTS = {
    "DeepseekV2ForCausalLM": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, first_k_dense_replace=0,
        kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0, norm_topk_prob=False,
        moe_intermediate_size=1407),
    "DeepseekV3ForCausalLM": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=2.5, norm_topk_prob=True,
        moe_intermediate_size=2048, n_group=8, topk_group=4, num_experts_per_tok=8),
}
_POSITIVE = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
             "moe_intermediate_size", "n_routed_experts", "n_group", "topk_group", "num_experts_per_tok")
_NON_NEGATIVE = ("first_k_dense_replace", "n_shared_experts")


def split_kv_b(w: np.ndarray, n_head_kv: int, qk_nope_head_dim: int, v_head_dim: int):
    """``kv_b_proj`` (n_head * (nope + v), kv_lora_rank) -> ``attn_k_b`` (n_head, kv_lora_rank, nope) and
    ``attn_v_b`` (n_head, v, kv_lora_rank): per head, the first ``nope`` rows make the key (transposed, so
    that llama.cpp multiplies the query into the latent space), the other ``v`` rows the value."""
    kv_b = w.reshape(n_head_kv, qk_nope_head_dim + v_head_dim, w.shape[-1])
    k_b = np.ascontiguousarray(kv_b[:, :qk_nope_head_dim, :].transpose(0, 2, 1))
    v_b = np.ascontiguousarray(kv_b[:, qk_nope_head_dim:, :])
    return k_b, v_b


def _fill_config_defaults(path: Path, hparams: dict) -> None:
    """Give keys absent from config.json transformers' defaults for the architecture (in place)."""
    raw = read_json(path)
    arch = (hparams.get("architectures") or ["DeepseekV3ForCausalLM"])[0]
    for key, value in _CONFIG_DEFAULTS.get(arch, _CONFIG_DEFAULTS["DeepseekV3ForCausalLM"]).items():
        if key not in raw:  # absent; a null one (dropped from hparams by load_config) stays unset
            hparams.setdefault(key, value)


@register
class DeepseekV2Converter(ExpertStacker, Converter):
    hf_architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    tested_mixes = ("Q4_K_M",)
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    # these have transformers defaults (_CONFIG_DEFAULTS) when absent: missing, they were given as null
    required_hparams = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "kv_lora_rank",
                        "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    expert_count_keys = ("n_routed_experts",)
    expert_re = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight"
    expert_weights = ("down_proj", "gate_proj", "up_proj")
    merged_name = "model.layers.{bid}.mlp.experts.{w}.weight"
    expert_ff_key, down_weight = "moe_intermediate_size", "down_proj"

    def __init__(self, model_dir, hparams, checkpoint):
        model_dir = Path(model_dir)
        _fill_config_defaults(model_dir / "config.json", hparams)
        super().__init__(model_dir, hparams, checkpoint)
        check_counts(self.dir / "config.json", hparams, _POSITIVE)  # the DeepSeek keys base does not know
        check_counts(self.dir / "config.json", hparams, _NON_NEGATIVE, 0)
        hparams["head_dim"] = hparams["qk_rope_head_dim"]  # transformers' __post_init__ sets it so
        # TextModel mirrors a top-level original_max_position_embeddings into the RoPE parameters (YaRN reads it
        # there), and transformers gives every config a RoPE base
        if (n := hparams.get("original_max_position_embeddings")) is not None:
            self.rope_parameters.setdefault("original_max_position_embeddings", n)
        self.rope_parameters.setdefault("rope_theta", 10000.0)
        # kv_b_proj is split by the config's KV head count (the script splits before set_gguf_parameters
        # sets it to 1); the file then says one KV head: MLA is written as MQA, one head of kv_lora_rank +
        # rope width, which is also what llama-quantize's planning reads back
        self.n_head_kv = hparams.get("num_key_value_heads") or hparams["num_attention_heads"]
        hparams["num_key_value_heads"] = 1

    # ---- tensors ------------------------------------------------------------------------------------
    def filter_name(self, name):
        name = super().filter_name(name)
        if name is None:
            return None
        if self.hparams.get("tie_word_embeddings") and name in ("lm_head.weight", "model.lm_head.weight"):
            return None
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= self.hparams["num_hidden_layers"]:
            return None  # the multi-token-prediction layers appended to V3 (llama.cpp skips them)
        if name.endswith("e_score_correction_bias"):  # a bias, named so that the tensor map knows it
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        return name

    def plan_tensor(self, name, t, bid):
        stacked = self.expert_tensor(name, t, bid)
        if stacked is not None:
            return stacked
        if ".mlp.experts." in name:  # e.g. fused 3-D experts, which the script cannot stack either
            raise ConversionError(f"{t.file.path}: tensor {t.name!r} is not a per-expert weight "
                                  f"(model.layers.N.mlp.experts.X.{{down,gate,up}}_proj.weight)")
        if name.endswith("kv_b_proj.weight"):
            return self._split_kv_b(name, t)
        return super().plan_tensor(name, t, bid)

    def _split_kv_b(self, name, t):
        """attn_k_b then attn_v_b, the script's order; each reads kv_b_proj (a small tensor) again."""
        h, n_kv = self.hparams, self.n_head_kv
        nope, v, rank = h["qk_nope_head_dim"], h["v_head_dim"], t.shape[-1]
        yield (self.map_name(name.replace("kv_b_proj", "k_b_proj")), (n_kv, rank, nope),
               lambda x: split_kv_b(x, n_kv, nope, v)[0])
        yield (self.map_name(name.replace("kv_b_proj", "v_b_proj")), (n_kv, v, rank),
               lambda x: split_kv_b(x, n_kv, nope, v)[1])

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head, n_kv = h["hidden_size"], h["num_attention_heads"], self.n_head_kv
        nope, rope, v, rank = h["qk_nope_head_dim"], h["qk_rope_head_dim"], h["v_head_dim"], h["kv_lora_rank"]
        q_rank = h.get("q_lora_rank")
        want = {
            "model.embed_tokens.weight": (h["vocab_size"], n_embd),
            "self_attn.q_proj.weight": (n_head * (nope + rope), n_embd),
            "self_attn.kv_a_proj_with_mqa.weight": (rank + rope, n_embd),
            "self_attn.kv_b_proj.weight": (n_kv * (nope + v), rank),
            "self_attn.o_proj.weight": (n_embd, n_head * v),
        }
        if q_rank is not None:
            want["self_attn.q_a_proj.weight"] = (q_rank, n_embd)
            want["self_attn.q_b_proj.weight"] = (n_head * (nope + rope), q_rank)
        if h.get("n_routed_experts"):
            want["mlp.gate.weight"] = (h["n_routed_experts"], n_embd)
        for name, t in self.ckpt.items():
            for suffix, shape in want.items():
                if name.endswith(suffix):
                    self.expect_shape(t, shape)

    # ---- metadata -----------------------------------------------------------------------------------
    def set_parameters(self, w):
        h = self.hparams
        super().set_parameters(w)  # with TextModel's YaRN, expert-group and scoring keys
        # DeepseekV2Model's own keys, in its order
        n_dense = h.get("first_k_dense_replace")
        if n_dense is None:  # no key: all layers dense without experts, none with
            n_dense = h["num_hidden_layers"] if h.get("n_routed_experts") is None else 0
        w.add_leading_dense_block_count(n_dense)
        w.add_vocab_size(h["vocab_size"])
        if h.get("q_lora_rank") is not None:
            w.add_q_lora_rank(h["q_lora_rank"])
        rank = h.get("kv_lora_rank", 512)
        w.add_kv_lora_rank(rank)
        w.add_key_length(rank + h["qk_rope_head_dim"])  # overwrites head_dim's, in head_dim's place
        w.add_value_length(rank)
        w.add_key_length_mla(h["qk_nope_head_dim"] + h["qk_rope_head_dim"])
        w.add_value_length_mla(h["v_head_dim"])
        w.add_expert_feed_forward_length(self.find(["moe_intermediate_size", "intermediate_size"]))
        if (n := h.get("n_routed_experts")) is not None:
            w.add_expert_count(n)
        w.add_expert_shared_count(h.get("n_shared_experts", 0))
        if (scale := h.get("routed_scaling_factor")) is not None:
            w.add_expert_weights_scale(scale)
        if h.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(h["qk_rope_head_dim"])
        if (mscale_all := self.rope_parameters.get("mscale_all_dim")) is not None:
            # llama.cpp's [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: 0.1 * mscale_all_dim, unlike other architectures
            w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)

