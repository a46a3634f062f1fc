"""Qwen2ForCausalLM -> ``qwen2`` and Qwen3ForCausalLM -> ``qwen3`` (no tensor transforms)."""

from __future__ import annotations

import gguf

from ..base import Converter, register
from ..vocab import set_vocab_sentencepiece_or_gpt2


@register
class Qwen2Converter(Converter):
    hf_architectures = ("Qwen2ForCausalLM",)
    arch = gguf.MODEL_ARCH.QWEN2
    required_hparams = ("hidden_size", "num_attention_heads", "vocab_size")

    def set_parameters(self, w):
        super().set_parameters(w)
        if (pooling := self.pooling_type()) is not None:
            w.add_pooling_type(pooling)

    def set_vocab(self, w):
        set_vocab_sentencepiece_or_gpt2(self, w)  # convert_hf_to_gguf.py's Qwen2Model tries tokenizer.model too

    def check_shapes(self):
        h = self.hparams
        head_dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
        n_kv = h.get("num_key_value_heads", h["num_attention_heads"])
        for name, t in self.ckpt.items():
            if name.endswith("embed_tokens.weight"):
                self.expect_shape(t, (h["vocab_size"], h["hidden_size"]))
            elif name.endswith("k_proj.weight"):
                self.expect_shape(t, (n_kv * head_dim, h["hidden_size"]))
            elif name.endswith("q_proj.weight"):
                self.expect_shape(t, (h["num_attention_heads"] * head_dim, h["hidden_size"]))


@register
class Qwen3Converter(Qwen2Converter):
    hf_architectures = ("Qwen3ForCausalLM",)
    arch = gguf.MODEL_ARCH.QWEN3
