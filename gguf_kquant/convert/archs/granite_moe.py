"""GraniteMoeForCausalLM and GraniteMoeSharedForCausalLM -> ``granitemoe``: Granite (llama with four
multipliers) whose experts are stored fused, JetMoe style (convert_hf_to_gguf.py's GraniteMoeModel).

The checkpoint keeps each layer's experts as two 3-D tensors, experts outermost::

    block_sparse_moe.input_linear   (E, 2*n_ff, n_embd)  rows [0, n_ff) gate, [n_ff, 2*n_ff) up
    block_sparse_moe.output_linear  (E, n_embd, n_ff)    down (already llama.cpp's ffn_down_exps)

llama.cpp wants gate and up apart (``ffn_gate_exps``, ``ffn_up_exps``): each is read as the row range of
every expert, slab by slab, never the whole fused tensor.  GraniteMoeShared adds a dense shared expert
(``shared_mlp.input_linear`` = gate and up stacked, ``shared_mlp.output_linear``).
"""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from .experts import StackedExperts
from .granite import GraniteConverter
from ..base import register
from ..safetensors import SafeTensor

# transformers' GraniteMoeConfig defaults, which convert_hf_to_gguf.py (through AutoConfig) sees for keys a
# config.json leaves out (the multipliers are written even when 1.0)
DEFAULTS = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0,
            "logits_scaling": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048}


class _ExpertRows:
    """Rows ``[r0, r1)`` of expert ``e`` of a fused ``(E, R, C)`` checkpoint tensor: one part of a
    :class:`StackedExperts`, which then reads the split tensor slab by slab."""

    def __init__(self, t: SafeTensor, e: int, r0: int, r1: int):
        self.t, self.e, self.r0, self.r1 = t, e, r0, r1
        self.name, self.dtype, self.file = t.name, t.dtype, t.file
        self.shape = (r1 - r0, t.shape[-1])
        self.nbytes = t.nbytes // t.shape[0] * (r1 - r0) // t.shape[1]

    def array(self):
        return self.t.array()[self.e, self.r0:self.r1]

    def release(self) -> None:
        self.t.release()  # the pages are file-backed: dropping other experts' too only costs a re-read


def split_fused_experts(name: str, t: SafeTensor, row_ranges) -> StackedExperts:
    """The ``(E, r1 - r0, C)`` tensor made of rows ``[r0, r1)`` of every expert of fused tensor ``t``."""
    r0, r1 = row_ranges
    return StackedExperts(name, [_ExpertRows(t, e, r0, r1) for e in range(t.shape[0])])


@register
class GraniteMoeConverter(GraniteConverter):
    hf_architectures = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")
    tested_mixes = ("Q4_K_M",)
    arch = gguf.MODEL_ARCH.GRANITE_MOE
    expert_count_keys = ("num_local_experts",)

    def __init__(self, model_dir, hparams, checkpoint):
        h = {**DEFAULTS, **hparams}
        h.setdefault("num_key_value_heads", h.get("num_attention_heads"))
        if "rope_parameters" not in h and "rope_scaling" not in h:
            h.setdefault("rope_theta", 10000.0)
        super().__init__(model_dir, h, checkpoint)
        self._split: dict[str, StackedExperts] = {}

    def _tensor(self, kind: gguf.MODEL_TENSOR, bid: int) -> str:
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"

    def check_shapes(self):
        super().check_shapes()
        h = self.hparams
        n_embd, n_ff, n_expert = h["hidden_size"], h["intermediate_size"], self.n_expert()
        n_shared = h.get("shared_intermediate_size") or 0
        if n_expert == 0:  # the script's dense branch names tensors granitemoe does not have, and fails
            raise ConversionError(f"{self.dir / 'config.json'}: num_local_experts is 0; llama.cpp's granitemoe "
                                  f"needs routed experts")
        for name, t in self.ckpt.items():
            if name.endswith("block_sparse_moe.input_linear.weight"):
                self.expect_shape(t, (n_expert, 2 * n_ff, n_embd))
            elif name.endswith("block_sparse_moe.output_linear.weight"):
                self.expect_shape(t, (n_expert, n_embd, n_ff))
            elif name.endswith("block_sparse_moe.router.layer.weight"):
                self.expect_shape(t, (n_expert, n_embd))
            elif name.endswith("shared_mlp.input_linear.weight"):
                self.expect_shape(t, (2 * n_shared, n_embd))
            elif name.endswith("shared_mlp.output_linear.weight"):
                self.expect_shape(t, (n_embd, n_shared))

    def set_parameters(self, w):
        super().set_parameters(w)
        if n := self.hparams.get("shared_intermediate_size"):
            w.add_expert_shared_feed_forward_length(n)

    def plan_tensor(self, name, t, bid):
        h, T = self.hparams, gguf.MODEL_TENSOR
        if name.endswith("block_sparse_moe.input_linear.weight"):
            n_ff = h["intermediate_size"]
            for kind, rows in ((T.FFN_GATE_EXP, (0, n_ff)), (T.FFN_UP_EXP, (n_ff, 2 * n_ff))):
                new = self._tensor(kind, bid)
                self._split[new] = split_fused_experts(new, t, rows)
                yield new, self._split[new].shape, None
            return
        if name.endswith("shared_mlp.input_linear.weight"):
            n_ff = h["shared_intermediate_size"]
            yield self._tensor(T.FFN_GATE_SHEXP, bid), (n_ff, t.shape[1]), lambda x: x[:n_ff]
            yield self._tensor(T.FFN_UP_SHEXP, bid), (n_ff, t.shape[1]), lambda x: x[n_ff:]
            return
        yield from super().plan_tensor(name, t, bid)

    def plan(self, out_type):
        planned = super().plan(out_type)
        for p in planned:
            if p.name in self._split:
                p.source = self._split[p.name]
        return planned
