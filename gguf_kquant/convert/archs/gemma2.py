"""Gemma2ForCausalLM -> ``gemma2``: attention and final-logit soft-capping, a sliding window on alternate
layers, norms stored as (1 + w) (convert_hf_to_gguf.py's Gemma2Model)."""

from __future__ import annotations

import gguf

from ..base import Converter, register
from ..vocab import set_vocab_sentencepiece


@register
class Gemma2Converter(Converter):
    hf_architectures = ("Gemma2ForCausalLM",)
    arch = gguf.MODEL_ARCH.GEMMA2
    required_hparams = ("hidden_size", "vocab_size", "max_position_embeddings", "intermediate_size",
                        "num_attention_heads", "rms_norm_eps", "head_dim", "attn_logit_softcapping",
                        "final_logit_softcapping", "sliding_window")

    def check_shapes(self):
        h = self.hparams
        hd, n_embd = h["head_dim"], h["hidden_size"]
        n_kv = h.get("num_key_value_heads", h["num_attention_heads"])
        for name, t in self.ckpt.items():
            if name.endswith("embed_tokens.weight"):
                self.expect_shape(t, (h["vocab_size"], n_embd))
            elif name.endswith("q_proj.weight"):
                self.expect_shape(t, (h["num_attention_heads"] * hd, n_embd))
            elif name.endswith("k_proj.weight"):
                self.expect_shape(t, (n_kv * hd, n_embd))

    def filter_name(self, name):
        if name == "lm_head.weight":  # tied to the embeddings; llama.cpp does not use it
            return None
        return super().filter_name(name)

    def set_parameters(self, w):
        # Gemma2Model writes its own short list, not TextModel's generic one
        h = self.hparams
        w.add_context_length(h["max_position_embeddings"])
        w.add_embedding_length(h["hidden_size"])
        w.add_block_count(self.block_count)
        w.add_feed_forward_length(h["intermediate_size"])
        w.add_head_count(h["num_attention_heads"])
        w.add_head_count_kv(h.get("num_key_value_heads", h["num_attention_heads"]))
        w.add_layer_norm_rms_eps(h["rms_norm_eps"])
        w.add_key_length(h["head_dim"])
        w.add_value_length(h["head_dim"])
        w.add_file_type(self.file_type)
        w.add_attn_logit_softcapping(h["attn_logit_softcapping"])
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
        w.add_sliding_window(h["sliding_window"])

    def set_vocab(self, w):
        set_vocab_sentencepiece(self, w)
        w.add_add_space_prefix(False)  # Gemma's SentencePiece model adds no dummy prefix

    def plan_tensor(self, name, t, bid):
        fn = None
        if name.endswith("norm.weight"):
            # Gemma2RMSNorm computes x * (1 + w); convert_hf_to_gguf adds 1 in the tensor's own dtype
            fn = lambda x: x + x.dtype.type(1)  # noqa: E731
        yield self.map_name(name), tuple(t.shape), fn
