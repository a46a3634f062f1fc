"""GptOssForCausalLM -> ``gpt-oss`` (convert_hf_to_gguf.py's GptOssModel, conversion/gpt_oss.py).

Attention with biases and per-head sinks, a sliding window on alternate layers (llama.cpp's fixed pattern),
YaRN RoPE, and experts stored fused per layer in one of two forms:

* unquantized (bf16): ``mlp.experts.gate_up_proj`` ``(E, n_embd, 2 n_ff)`` with gate and up *interleaved*
  column by column, ``down_proj`` ``(E, n_ff, n_embd)``: both input-major, so transposed on the way out;
* MXFP4 (the released checkpoints, ``quantization_config.quant_method == "mxfp4"``): ``*_blocks``
  ``(E, rows, n/32, 16)`` and ``*_scales`` ``(E, rows, n/32)`` uint8, already output-major.  They are moved
  into ggml's ``block_mxfp4`` byte for byte (:func:`repack_mxfp4`) — never decoded to floats — and, as
  the script writes them while it scans the checkpoint, before every other tensor.
"""

from __future__ import annotations

import re

import numpy as np

import gguf

from ...errors import ConversionError
from ...types import TYPES, GGMLType
from ..base import Converter, PlannedTensor, register
from .experts import TransposedExperts

_MX = TYPES[GGMLType.MXFP4]
QK_MXFP4 = _MX.block_size
_EXPERTS = re.compile(r"(model\.layers\.(\d+)\.mlp\.experts)\.(gate_up_proj|down_proj)(_blocks|_scales|_bias|)")

# What transformers' GptOssConfig fills in for absent keys (convert_hf_to_gguf.py reads AutoConfig's dict).
DEFAULTS = {"head_dim": 64, "sliding_window": 128, "num_experts_per_tok": 4, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "num_key_value_heads": 8, "rope_theta": 150000.0}
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def repack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The checkpoint's MXFP4 ``(..., n/32, 16)`` nibbles and ``(..., n/32)`` exponents -> ``(..., n/32)``
    ``block_mxfp4`` (GptOssModel.repack_mxfp4: bits moved, the exponent byte copied).

    Both hold E2M1 codes with the same sign/magnitude bits and the exponent as E8M0 with bias 127 (ggml's
    ``kvalues_mxfp4`` are the doubled E2M1 values and it halves the exponent's power: the same numbers).
    Only the order of the 32 nibbles of a block differs::

        checkpoint  byte j = q[2j]  | q[2j+1] << 4      (j < 16: neighbours share a byte)
        ggml        qs[j]  = q[j]   | q[j+16] << 4      (halves share a byte), after the exponent byte e
    """
    q = np.empty(blocks.shape[:-1] + (QK_MXFP4,), np.uint8)
    q[..., 0::2] = blocks & 0x0F
    q[..., 1::2] = blocks >> 4
    out = np.empty(scales.shape, _MX.block_dtype)
    out["e"] = scales
    out["qs"] = q[..., :QK_MXFP4 // 2] | (q[..., QK_MXFP4 // 2:] << 4)
    return out


class MXFP4Experts:
    """One output tensor of MXFP4 experts, ``(E, rows, n)``: every ``step``-th row from ``start`` of a layer's
    ``*_blocks`` / ``*_scales`` (gate: even rows, up: odd rows of ``gate_up_proj``; down: all rows).

    A source whose bytes are already of ggml type ``ggml_type``: the conversion copies them (one expert at a
    time) instead of quantizing; any other output type would be a requantization, which llama-quantize refuses
    too.
    """

    ggml_type = GGMLType.MXFP4
    dtype = "MXFP4"

    def __init__(self, name: str, blocks, scales, start: int = 0, step: int = 1):
        self.name, self.blocks, self.scales, self.rows = name, blocks, scales, slice(start, None, step)
        n_expert, n_rows, n_blocks = scales.shape
        self.shape = (n_expert, len(range(n_rows)[self.rows]), n_blocks * QK_MXFP4)
        self.file = blocks.file

    @property
    def nbytes(self) -> int:
        return _MX.nbytes(self.shape)

    def ggml_blocks(self, out_type: GGMLType):
        if out_type != self.ggml_type:
            raise ConversionError(f"{self.blocks.file.path}: tensor {self.blocks.name!r} is MXFP4; requantizing "
                                  f"it to {out_type.name} is refused (llama-quantize: 'requantizing from type "
                                  f"mxfp4 is disabled')")
        blocks, scales = self.blocks.array(), self.scales.array()
        for e in range(self.shape[0]):
            yield repack_mxfp4(blocks[e, self.rows], scales[e, self.rows])
        self.release()

    def release(self) -> None:
        self.blocks.release()
        self.scales.release()


@register
class GptOssConverter(Converter):
    hf_architectures = ("GptOssForCausalLM",)
    tested_mixes = ("Q4_K_M", "MXFP4_MOE")
    arch = gguf.MODEL_ARCH.GPT_OSS
    required_hparams = ("hidden_size", "num_attention_heads", "intermediate_size", "num_local_experts",
                        "vocab_size", "num_hidden_layers")
    expert_count_keys = ("num_local_experts",)

    def __init__(self, model_dir, hparams, checkpoint):
        hparams = {**{k: v for k, v in DEFAULTS.items() if hparams.get(k) is None}, **hparams}
        if hparams.get("rope_parameters") is None and hparams.get("rope_scaling") is None:
            hparams["rope_parameters"] = {**DEFAULT_ROPE, "rope_theta": hparams["rope_theta"]}
        super().__init__(model_dir, hparams, checkpoint)
        qc = hparams.get("quantization_config")
        self.is_mxfp4 = isinstance(qc, dict) and qc.get("quant_method") == "mxfp4"

    # ---- checks -------------------------------------------------------------------------------------
    def expected_shapes(self, layer: int) -> dict:
        """Each expert tensor's name -> (dtype kind, shape config.json implies), in the form layer ``layer``
        is stored in (MXFP4 if any of its blocks or scales are there; quant_method only sets the file type)."""
        h = self.hparams
        n_embd, n_ff, n_exp = h["hidden_size"], h["intermediate_size"], h["num_local_experts"]
        p = f"model.layers.{layer}.mlp.experts."
        want = {p + "gate_up_proj_bias": ("float", (n_exp, 2 * n_ff)), p + "down_proj_bias": ("float", (n_exp, n_embd))}
        if any(f"{p}{w}_{part}" in self.ckpt for w in ("gate_up_proj", "down_proj") for part in ("blocks", "scales")):
            for w, rows, n in (("gate_up_proj", 2 * n_ff, n_embd), ("down_proj", n_embd, n_ff)):
                if n % QK_MXFP4:
                    raise ConversionError(f"{self.dir / 'config.json'}: MXFP4 rows of {n} values are not a "
                                          f"multiple of {QK_MXFP4}")
                want[f"{p}{w}_blocks"] = ("U8", (n_exp, rows, n // QK_MXFP4, QK_MXFP4 // 2))
                want[f"{p}{w}_scales"] = ("U8", (n_exp, rows, n // QK_MXFP4))
        else:
            want[p + "gate_up_proj"] = ("float", (n_exp, n_embd, 2 * n_ff))
            want[p + "down_proj"] = ("float", (n_exp, n_ff, n_embd))
        return want

    def check_shapes(self):
        h = self.hparams
        n_embd, n_head, n_kv, hd = h["hidden_size"], h["num_attention_heads"], h["num_key_value_heads"], h["head_dim"]
        want = {"model.embed_tokens.weight": (h["vocab_size"], n_embd)}
        for i in range(self.block_count):
            p = f"model.layers.{i}.self_attn."
            want.update({p + "q_proj.weight": (n_head * hd, n_embd), p + "k_proj.weight": (n_kv * hd, n_embd),
                         p + "v_proj.weight": (n_kv * hd, n_embd), p + "sinks": (n_head,),
                         f"model.layers.{i}.mlp.router.weight": (h["num_local_experts"], n_embd)})
        for name, t in self.ckpt.items():
            if name in want:
                self.expect_shape(t, want[name])
        for i in range(self.block_count):
            for name, (kind, shape) in self.expected_shapes(i).items():
                if name not in self.ckpt:
                    raise ConversionError(f"{self.dir}: expert tensor {name!r} is missing")
                t = self.ckpt[name]
                if (t.dtype == "U8") != (kind == "U8"):
                    raise ConversionError(f"{t.file.path}: tensor {name!r} has dtype {t.dtype}, expected "
                                          f"{'U8' if kind == 'U8' else 'F32, F16 or BF16'}")
                self.expect_shape(t, shape)

    # ---- tensors ------------------------------------------------------------------------------------
    def filter_name(self, name):
        if _EXPERTS.fullmatch(name) and name.endswith(("_blocks", "_scales")):
            return None  # MXFP4: planned by plan() as whole ggml tensors
        name = super().filter_name(name)
        return name + ".weight" if name is not None and "sinks" in name else name

    def plan_tensor(self, name, t, bid):
        m = _EXPERTS.fullmatch(name)
        if m is None:
            yield self.map_name(name), tuple(t.shape), None
            return
        base, w, suffix = m.group(1), m.group(3), m.group(4)
        n_exp = t.shape[0]
        if w == "down_proj" and suffix == "_bias":
            yield self.map_name(f"{base}.down_proj.bias"), tuple(t.shape), None
        elif w == "down_proj":
            yield self._view(f"{base}.down_proj.weight", TransposedExperts(t.name, t, slice(None)))
        elif suffix == "_bias":  # gate and up interleaved: even columns gate, odd columns up
            for k, part in enumerate(("gate_proj", "up_proj")):
                yield (self.map_name(f"{base}.{part}.bias"), (n_exp, t.shape[1] // 2),
                       lambda x, k=k: np.ascontiguousarray(x[..., k::2]))
        else:
            for k, part in enumerate(("gate_proj", "up_proj")):
                yield self._view(f"{base}.{part}.weight", TransposedExperts(t.name, t, slice(k, None, 2)))

    def _view(self, hf_name, src):
        new_name = self.map_name(hf_name)
        self._views[new_name] = src  # plan() makes it the planned tensor's source
        return new_name, src.shape, None

    def plan(self, out_type):
        self._views = {}  # gguf name -> TransposedExperts, filled by plan_tensor
        planned = super().plan(out_type)
        for p in planned:
            p.source = self._views.get(p.name, p.source)
        return self.plan_mxfp4() + planned

    def plan_mxfp4(self) -> list:
        """The MXFP4 expert tensors, in the order GptOssModel.generate_extra_tensors writes them: while it scans
        the checkpoint (shards in order, names sorted), each layer's down at ``down_proj_scales``, then gate and
        up at ``gate_up_proj_scales`` — all before the main pass, so first in the file."""
        shard = {f: i for i, f in enumerate(self.ckpt.files)}
        out = []
        for name, t in sorted(self.ckpt.items(), key=lambda kv: (shard[kv[1].file], kv[0])):
            m = _EXPERTS.fullmatch(name)
            if m is None or m.group(4) != "_scales":
                continue
            base, w = m.group(1), m.group(3)
            blocks = self.ckpt[f"{base}.{w}_blocks"]
            parts = [("down_proj", 0, 1)] if w == "down_proj" else [("gate_proj", 0, 2), ("up_proj", 1, 2)]
            for part, start, step in parts:
                new_name = self.map_name(f"{base}.{part}.weight")
                src = MXFP4Experts(new_name, blocks, t, start, step)
                out.append(PlannedTensor(new_name, src.shape, src, None, GGMLType.MXFP4, int(m.group(2))))
        return out

    # ---- metadata -----------------------------------------------------------------------------------
    def set_parameters(self, w):
        h = self.hparams
        if self.is_mxfp4 and self.file_type in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16,
                                                gguf.LlamaFileType.MOSTLY_BF16):
            self.file_type = gguf.LlamaFileType.MOSTLY_MXFP4_MOE  # the script's prepare_metadata does this
        super().set_parameters(w)
        w.add_sliding_window(h["sliding_window"])
        w.add_expert_feed_forward_length(h["intermediate_size"])
