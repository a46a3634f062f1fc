"""LlamaForCausalLM and MistralForCausalLM -> llama.cpp ``llama`` (convert_hf_to_gguf.py's LlamaModel)."""

from __future__ import annotations

import math

import numpy as np

import gguf

from ..base import Converter, register


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF stores rotary q/k rows as [first halves | second halves] per head; llama.cpp wants them interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@register
class LlamaConverter(Converter):
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    arch = gguf.MODEL_ARCH.LLAMA

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head = h["hidden_size"], h["num_attention_heads"]
        n_kv = h.get("num_key_value_heads", n_head)
        head_dim = h.get("head_dim") or n_embd // n_head
        want = {
            "model.embed_tokens.weight": (h["vocab_size"], n_embd),
            "self_attn.q_proj.weight": (n_head * head_dim, n_embd),
            "self_attn.k_proj.weight": (n_kv * head_dim, n_embd),
            "self_attn.v_proj.weight": (n_kv * head_dim, n_embd),
            "mlp.up_proj.weight": (h["intermediate_size"], n_embd),
        }
        for name, t in self.ckpt.items():
            for suffix, shape in want.items():
                if name.endswith(suffix):
                    self.expect_shape(t, shape)

    def set_parameters(self, w):
        super().set_parameters(w)
        h = self.hparams
        w.add_vocab_size(h["vocab_size"])
        rope_dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
        w.add_rope_dimension_count(rope_dim)

    def plan_tensor(self, name, t, bid):
        n_head = self.hparams["num_attention_heads"]
        n_kv = self.hparams.get("num_key_value_heads", n_head)
        fn = None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            fn = lambda x: permute_qk(x, n_head, n_head)  # noqa: E731
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            fn = lambda x: permute_qk(x, n_head, n_kv)  # noqa: E731
        yield self.map_name(name), tuple(t.shape), fn

    def extra_tensors(self):
        rope = self.rope_parameters.get("full_attention", self.rope_parameters)
        if str(rope.get("rope_type", "")).lower() != "llama3":
            return
        base = rope.get("rope_theta", 10000.0)
        dim = self.hparams.get("head_dim") or self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = rope.get("factor", 8.0)
        lo, hi = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old = rope.get("original_max_position_embeddings", 8192)
        out = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < old / hi:
                out.append(1)
            elif wl > old / lo:
                out.append(factor)
            else:
                smooth = (old / wl - lo) / (hi - lo)
                out.append(1 / ((1 - smooth) / factor + smooth))
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.array(out, dtype=np.float32)
