"""Gemma3ForConditionalGeneration -> ``gemma3``: the text model of a Gemma 3 vision-language checkpoint (what
convert_hf_to_gguf.py writes without ``--mmproj``); the vision tower and projector are left out."""

from __future__ import annotations

from .gemma3 import Gemma3Converter
from ..base import register

# convert_hf_to_gguf.py's TextModel.filter_tensors: name parts that mark multimodal tensors
_MULTIMODAL = ("visual.", "vision.", "audio.", "vision_", "audio_", "projector.", "pre_mm_projector_norm",
               "patch_embed", "patch_embedding")


@register
class Gemma3VisionTextConverter(Gemma3Converter):
    hf_architectures = ("Gemma3ForConditionalGeneration",)

    def check_shapes(self):
        h = self.hparams
        hd = h.get("head_dim", 256)
        for name, t in self.ckpt.items():
            if self.filter_name(name) is None:  # the vision tower has attention projections of its own
                continue
            if name.endswith("embed_tokens.weight"):
                self.expect_shape(t, (h["vocab_size"], h["hidden_size"]))
            elif name.endswith("q_proj.weight"):
                self.expect_shape(t, (h.get("num_attention_heads", 8) * hd, h["hidden_size"]))
            elif name.endswith("k_proj.weight"):
                self.expect_shape(t, (h.get("num_key_value_heads", 4) * hd, h["hidden_size"]))

    def filter_name(self, name):
        if name.startswith(("mlp", "vit.", "vpm.", "siglip2.")) or any(s in name for s in _MULTIMODAL):
            return None
        return super().filter_name(name)
