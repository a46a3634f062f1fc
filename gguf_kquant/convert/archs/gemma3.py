"""Gemma3ForCausalLM (text) -> ``gemma3``: norms stored as (1 + w), out-of-vocabulary embedding rows dropped."""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from ..base import Converter, register
from ..vocab import read_json, sentencepiece_vocab, set_vocab_sentencepiece_or_gpt2


@register
class Gemma3Converter(Converter):
    hf_architectures = ("Gemma3ForCausalLM",)
    arch = gguf.MODEL_ARCH.GEMMA3
    required_hparams = ("hidden_size", "vocab_size")

    def check_shapes(self):
        h = self.hparams
        hd = h.get("head_dim", 256)
        for name, t in self.ckpt.items():
            if name.endswith("embed_tokens.weight"):
                self.expect_shape(t, (h["vocab_size"], h["hidden_size"]))
            elif name.endswith("q_proj.weight"):
                self.expect_shape(t, (h.get("num_attention_heads", 8) * hd, h["hidden_size"]))
            elif name.endswith("k_proj.weight"):
                self.expect_shape(t, (h.get("num_key_value_heads", 4) * hd, h["hidden_size"]))

    def filter_name(self, name):
        if name == "lm_head.weight":  # tied to the embeddings; llama.cpp does not use it
            return None
        return super().filter_name(name)

    def set_parameters(self, w):
        super().set_parameters(w)
        h = self.hparams
        w.add_context_length(h.get("max_position_embeddings", 131072))
        w.add_head_count(h.get("num_attention_heads", 8))
        w.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
        w.add_key_length(h.get("head_dim", 256))
        w.add_value_length(h.get("head_dim", 256))
        w.add_rope_freq_base(self.rope_parameters.get("full_attention", self.rope_parameters)
                             .get("rope_theta", 1_000_000.0))
        if h.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(h["final_logit_softcapping"])
        if h.get("sliding_window_pattern") != 1:
            if h.get("sliding_window") is None:
                raise ConversionError(f"{self.dir / 'config.json'}: key 'sliding_window' is missing")
            w.add_sliding_window(h["sliding_window"])
        w.add_head_count_kv(h.get("num_key_value_heads", 4))

    def set_vocab(self, w):
        if set_vocab_sentencepiece_or_gpt2(self, w):
            w.add_add_space_prefix(False)  # Gemma's SentencePiece model adds no dummy prefix

    def n_vocab_real(self) -> int:
        """The rows of token_embd that llama.cpp keeps: as many as the vocabulary written (the SentencePiece
        one is always config.json's vocab_size long, so it keeps them all)."""
        if (self.dir / "tokenizer.model").is_file():
            return len(sentencepiece_vocab(self)[0])
        tj = read_json(self.dir / "tokenizer.json")
        return len(tj["model"]["vocab"]) + len(tj.get("added_tokens") or [])

    def plan_tensor(self, name, t, bid):
        shape, fn = tuple(t.shape), None
        if "embed_tokens.weight" in name:
            n_real = self.n_vocab_real()
            if n_real < shape[0]:
                shape = (n_real,) + shape[1:]
                fn = lambda x, n=n_real: x[:n]  # noqa: E731
        if name.endswith("norm.weight"):
            # Gemma3RMSNorm computes x * (1 + w); convert_hf_to_gguf adds 1 in the tensor's own dtype
            fn = lambda x: x + x.dtype.type(1)  # noqa: E731
        yield self.map_name(name), shape, fn
