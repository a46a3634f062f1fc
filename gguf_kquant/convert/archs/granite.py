"""GraniteForCausalLM -> ``granite``: llama with four multipliers (convert_hf_to_gguf.py's GraniteModel)."""

from __future__ import annotations

import gguf

from .llama import LlamaConverter
from ..base import register


@register
class GraniteConverter(LlamaConverter):
    hf_architectures = ("GraniteForCausalLM",)
    arch = gguf.MODEL_ARCH.GRANITE

    def __init__(self, model_dir, hparams, checkpoint):
        hparams = dict(hparams)
        hparams.pop("head_dim", None)  # Granite has no head_dim; convert_hf_to_gguf.py ignores one if given
        super().__init__(model_dir, hparams, checkpoint)

    def set_parameters(self, w):
        super().set_parameters(w)
        h = self.hparams
        # the HF *_multiplier names become llama.cpp *_scale keys; zero/absent ones are not written
        if h.get("attention_multiplier"):
            w.add_attention_scale(h["attention_multiplier"])
        if h.get("embedding_multiplier"):
            w.add_embedding_scale(h["embedding_multiplier"])
        if h.get("residual_multiplier"):
            w.add_residual_scale(h["residual_multiplier"])
        if h.get("logits_scaling"):
            w.add_logit_scale(h["logits_scaling"])

    def filter_name(self, name):
        if name.startswith("encoder.") or any(s in name for s in ("image_", "layerwise_projectors",
                                                                   "spatial_projectors")):
            return None  # Granite-vision's multimodal tensors
        return super().filter_name(name)
