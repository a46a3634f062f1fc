"""LlamaForCausalLM and MistralForCausalLM -> llama.cpp ``llama`` (convert_hf_to_gguf.py's LlamaModel)."""

from __future__ import annotations

import math

import numpy as np

import gguf

from ...errors import ConversionError
from ..base import Converter, register
from ..vocab import (SpecialVocab, is_llama_hf, read_json, set_vocab_gpt2, set_vocab_llama_hf,
                     set_vocab_sentencepiece)


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF stores rotary q/k rows as [first halves | second halves] per head; llama.cpp wants them interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@register
class LlamaConverter(Converter):
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    tested_mixes = ("Q4_K_M", "Q6_K")
    arch = gguf.MODEL_ARCH.LLAMA
    required_hparams = ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size")

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

    def set_vocab(self, w):
        # convert_hf_to_gguf.py's LlamaModel.set_vocab: SentencePiece (Llama-2, Mistral-7B), else a byte-fallback
        # BPE tokenizer.json (Llama-2 fast tokenizer), else GPT-2 byte-level BPE (Llama-3)
        if (self.dir / "tekken.json").is_file() and not (self.dir / "tokenizer.json").is_file():
            raise ConversionError(f"{self.dir / 'tekken.json'}: Mistral's tekken tokenizer is not supported")
        cfg_path = self.dir / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        if (aps := cfg.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(aps)
        if cfg.get("tokenizer_class") == "HybridDNATokenizer":
            raise ConversionError(f"{cfg_path}: HybridDNATokenizer is not supported")
        if (self.dir / "tokenizer.model").is_file():
            set_vocab_sentencepiece(self, w)
        elif is_llama_hf(self):
            set_vocab_llama_hf(self, w)
        else:
            set_vocab_gpt2(self, w)
        n_vocab = self.hparams.get("vocab_size", 32000)
        if n_vocab == 32016:  # CodeLlama: its infill tokens are fixed ids its tokenizer files do not name
            # (gguf-py's writer lost add_prefix/suffix/middle_token_id, so only eot is written, as in llama.cpp)
            types = ("prefix", "suffix", "middle", "eot")
            infill = SpecialVocab(self.dir, special_token_types=types)
            for typ, tid in zip(types, range(32007, 32011)):
                infill._set_special_token(typ, tid)
            infill.add_to_gguf(w)
        if n_vocab == 49152:  # llama.cpp's rule for the small granite models
            w.add_add_bos_token(False)

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
