"""Phi3ForCausalLM -> ``phi3``: fused ``qkv_proj`` and ``gate_up_proj`` kept fused (llama.cpp's attn_qkv and a
double-width ffn_up), LongRoPE factors as tensors (convert_hf_to_gguf.py's Phi3MiniModel)."""

from __future__ import annotations

import math

import numpy as np

import gguf

from ...errors import ConversionError
from ..base import Converter, register
from ..vocab import _add_llama_vocab, read_json, sentencepiece_vocab, set_vocab_gpt2


@register
class Phi3Converter(Converter):
    hf_architectures = ("Phi3ForCausalLM",)
    arch = gguf.MODEL_ARCH.PHI3
    required_hparams = ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                        "intermediate_size", "vocab_size")

    def __init__(self, model_dir, hparams, checkpoint):
        super().__init__(model_dir, hparams, checkpoint)
        # convert_hf_to_gguf.py folds these top-level keys into the RoPE parameters
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            if key not in self.rope_parameters and hparams.get(key) is not None:
                self.rope_parameters[key] = hparams[key]
        if self.rope_parameters.get("original_max_position_embeddings") is None:
            raise ConversionError(f"{self.dir / 'config.json'}: key 'original_max_position_embeddings' is missing")

    def rope_dims(self) -> int:
        h = self.hparams
        rot_pct = self.rope_parameters.get("partial_rotary_factor", 1.0)
        return int(rot_pct * h["hidden_size"]) // h["num_attention_heads"]

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head, n_kv = h["hidden_size"], h["num_attention_heads"], h["num_key_value_heads"]
        hd = n_embd // n_head
        for name, t in self.ckpt.items():
            if name.endswith("embed_tokens.weight"):
                self.expect_shape(t, (h["vocab_size"], n_embd))
            elif name.endswith("qkv_proj.weight"):
                self.expect_shape(t, ((n_head + 2 * n_kv) * hd, n_embd))
            elif name.endswith("gate_up_proj.weight"):
                self.expect_shape(t, (2 * h["intermediate_size"], n_embd))

    def set_parameters(self, w):
        # Phi3MiniModel writes its own list, not TextModel's generic one
        h = self.hparams
        w.add_context_length(self.find(["n_positions", "max_position_embeddings"]))
        w.add_rope_scaling_orig_ctx_len(self.rope_parameters["original_max_position_embeddings"])
        w.add_embedding_length(h["hidden_size"])
        w.add_feed_forward_length(h["intermediate_size"])
        w.add_block_count(self.block_count)
        w.add_head_count(h["num_attention_heads"])
        w.add_head_count_kv(h["num_key_value_heads"])
        w.add_layer_norm_rms_eps(h["rms_norm_eps"])
        w.add_rope_dimension_count(self.rope_dims())
        rope = self.rope_parameters.get("full_attention", self.rope_parameters)
        if rope.get("rope_theta") is None:
            raise ConversionError(f"{self.dir / 'config.json'}: key 'rope_theta' is missing")
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_file_type(self.file_type)
        w.add_sliding_window(h.get("sliding_window") or 0)  # 0 tells Phi-4 (none) from Phi-3
        if (attn_factor := self.long_rope_attn_factor()) is not None and not getattr(self, "vocab_only", False):
            # convert_hf_to_gguf.py adds this key while generating the factor tensors, before any other metadata:
            # it follows general.architecture
            w.add_rope_scaling_attn_factors(attn_factor)
            kv = w.kv_data[0]
            key = gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=self.arch_name)
            value, items = kv.pop(key), list(kv.items())
            kv.clear()
            kv.update([items[0], (key, value), *items[1:]])

    def long_rope_attn_factor(self):
        """The LongRoPE attention factor (128k-context models), None without long factors."""
        rp = self.rope_parameters
        if not rp.get("long_factor"):
            return None
        orig = rp["original_max_position_embeddings"]
        scale = self.find(["n_positions", "max_position_embeddings"]) / orig
        kind = str(rp.get("rope_type", "")).lower()
        if kind in ("su", "longrope"):
            return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
        if kind == "yarn":
            return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0
        raise ConversionError(f"{self.dir / 'config.json'}: RoPE type {kind!r} with long factors is not supported")

    def extra_tensors(self):
        rp = self.rope_parameters
        if not rp.get("long_factor"):
            return
        long, short = rp.get("long_factor"), rp.get("short_factor")
        if not short or len(long) != len(short) or len(long) != self.rope_dims() / 2:
            raise ConversionError(f"{self.dir / 'config.json'}: rope long_factor and short_factor must both have "
                                  f"{self.rope_dims() // 2} entries")
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.array(long, dtype=np.float32)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.array(short, dtype=np.float32)

    def set_vocab(self, w):
        cfg_path = self.dir / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        if cfg.get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4
            return set_vocab_gpt2(self, w)
        if not (self.dir / "tokenizer.model").is_file():
            raise ConversionError(f"{self.dir}: no tokenizer.model (Phi-3 needs its SentencePiece model)")
        _add_llama_vocab(self, w, *phi3_vocab(self, cfg))


def phi3_vocab(conv, cfg: dict):
    """Phi3MiniModel.set_vocab: the SentencePiece pieces, then the added tokens of added_tokens.json,
    tokenizer_config.json and tokenizer.json as USER_DEFINED (CONTROL if special), no other re-typing."""
    T = gguf.TokenType
    tokens, scores, types = sentencepiece_vocab(conv)  # its added_tokens_decoder typing is overwritten below
    n = len(tokens)
    added = list((cfg.get("added_tokens_decoder") or {}).items())
    if (tj := conv.dir / "tokenizer.json").is_file():
        added += [(a["id"], a) for a in read_json(tj).get("added_tokens") or []]
    for i, a in added:
        i = int(i)
        if not 0 <= i < n:
            raise ConversionError(f"{conv.dir}: added token {a.get('content')!r} has id {i}, beyond the "
                                  f"{n} tokens of config.json's vocab_size")
        tokens[i], scores[i] = a["content"], -1000.0
        types[i] = T.CONTROL if a.get("special") else T.USER_DEFINED
    return tokens, scores, types
