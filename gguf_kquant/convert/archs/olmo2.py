"""Olmo2ForCausalLM -> ``olmo2``: q/k norms over all heads, norms after attention and feed-forward, no
tensor transforms (convert_hf_to_gguf.py's Olmo2Model)."""

from __future__ import annotations

import gguf

from ..base import Converter, register


@register
class Olmo2Converter(Converter):
    hf_architectures = ("Olmo2ForCausalLM",)
    arch = gguf.MODEL_ARCH.OLMO2
    required_hparams = ("hidden_size", "num_attention_heads", "vocab_size")

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head = h["hidden_size"], h["num_attention_heads"]
        n_kv = h.get("num_key_value_heads", n_head)
        for name, t in self.ckpt.items():
            if name.endswith("embed_tokens.weight"):
                self.expect_shape(t, (h["vocab_size"], n_embd))
            elif name.endswith("k_proj.weight"):
                self.expect_shape(t, (n_kv * (n_embd // n_head), n_embd))

    def set_parameters(self, w):
        super().set_parameters(w)
        h = self.hparams
        if "sliding_window" in h:  # OLMo-3 (this version of llama.cpp reads the key for olmo2 files too)
            w.add_sliding_window(h["sliding_window"])
            if "layer_types" in h:
                pattern = [t == "sliding_attention" for t in h["layer_types"]]
            else:
                pattern = [(i + 1) % 4 != 0 for i in range(h["num_hidden_layers"])]
            w.add_sliding_window_pattern(pattern)
