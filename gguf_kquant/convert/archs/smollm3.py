"""SmolLM3ForCausalLM -> ``smollm3``: llama whose every 4th layer has no RoPE (llama.cpp fixes the interval at
4, so nothing about it is written; convert_hf_to_gguf.py's SmolLM3Model is its LlamaModel)."""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from .llama import LlamaConverter
from ..base import register


@register
class SmolLM3Converter(LlamaConverter):
    hf_architectures = ("SmolLM3ForCausalLM",)
    arch = gguf.MODEL_ARCH.SMOLLM3

    def check_shapes(self):
        super().check_shapes()
        h = self.hparams
        interval = h.get("no_rope_layer_interval", 4)
        want = [int((i + 1) % interval != 0) for i in range(self.block_count)]
        if interval != 4 or h.get("no_rope_layers", want) != want:
            raise ConversionError(f"{self.dir / 'config.json'}: llama.cpp's smollm3 skips RoPE in every 4th layer; "
                                  f"this config's no_rope_layers {h.get('no_rope_layers')} (interval {interval}) "
                                  f"differ")
