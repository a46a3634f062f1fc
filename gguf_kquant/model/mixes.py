"""llama-quantize's mixes as data: the default type of each mix and the per-tensor rules of
``llama_tensor_get_type_impl`` (src/llama-quant.cpp, llama.cpp as vendored by llama-cpp-python 0.3.36).

A rule is ``(category, mixes, when, type)``: for a tensor of ``category`` in a model quantized to one of
``mixes``, if every predicate in ``when`` holds, the tensor gets ``type``.  :data:`RULES` are tried in
order and the first match wins (llama.cpp's ``else if`` chain); :data:`ADJUST` rules are then applied in
sequence on top (the 70B and 8-expert bumps of ``attn_v``).  No match: the mix's default type.

Predicates (``!`` negates; evaluated by :mod:`gguf_kquant.model.planner`):

=================  ===========================================================================
``gqa4``           n_head / n_head_kv >= 4 (layer 0)
``expert8``        the model has exactly 8 experts
``falcon``         general.architecture == "falcon"
``model70b``       llama.cpp classifies the model as 70B (see :data:`MODEL_70B`)
``imatrix``        an importance matrix is in use
``ragged``         the row length is not a multiple of the default type's block size
``more_bits``      use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2
``first_8th``      i < n/8             ``first_16th``   i < n/16
``i_lt2``/``i_lt4`` i < 2 / i < 4
``q3k_or_q4k``     the type chosen so far is Q3_K or Q4_K
=================  ===========================================================================

``i``/``n`` are, for ``attn_v``, the running count of attn_v-like tensors and their total; for ``ffn_*``,
the layer (parsed from the name when the model has experts, else a running count) and block_count.
"""

from __future__ import annotations

from ..ftypes import LlamaFileType as FT
from ..types import GGMLType as T

# mix name -> (file type, default tensor type) — llama_ftype_get_default_type; names as llama-quantize's.
MIXES: dict[str, tuple[FT, T]] = {
    "F32": (FT.ALL_F32, T.F32),
    "F16": (FT.MOSTLY_F16, T.F16),
    "BF16": (FT.MOSTLY_BF16, T.BF16),
    "Q8_0": (FT.MOSTLY_Q8_0, T.Q8_0),
    "Q4_0": (FT.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": (FT.MOSTLY_Q4_1, T.Q4_1),
    "Q5_0": (FT.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": (FT.MOSTLY_Q5_1, T.Q5_1),
    "Q2_K": (FT.MOSTLY_Q2_K, T.Q2_K),
    "Q2_K_S": (FT.MOSTLY_Q2_K_S, T.Q2_K),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, T.Q3_K),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (FT.MOSTLY_Q6_K, T.Q6_K),
}
# llama-quantize's aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

ALL = tuple(MIXES)

# Tensor categories (tensor_get_category): exact names first, then substrings, in this order.
CATEGORY_EXACT = {
    "output.weight": "output",
    "token_embd.weight": "token_embd",
    "per_layer_token_embd.weight": "token_embd",
}
CATEGORY_SUBSTRING = [
    ("attn_qkv.weight", "attn_v"),  # attn_qkv / attn_kv_b are treated as attn_v (category_is_attn_v)
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
]

# tensor_allows_quantization: only >= 2-D tensors whose name ends in "weight", and none of these.
NEVER_QUANTIZED_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")
NEVER_QUANTIZED_BY_ARCH = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}

# Which categories keep a running counter (i_attention_wv, i_ffn_down, ...) in llama-quantize's order.
COUNTED = ("attn_v", "ffn_down", "ffn_gate", "ffn_up")

# arch -> (block_count, needs n_head != n_head_kv): llama.cpp's LLM_TYPE_70B (llama: not with 8 experts).
MODEL_70B = {"llama": (80, True), "qwen2": (80, False), "deci": (80, False), "olmo": (80, False),
             "jais2": (68, False)}

_K_MIXES_EXCEPT_Q8 = tuple(m for m in ALL if m != "Q8_0")

# fmt: off
# (category,     mixes,                                   when,                         type)
RULES = [
    # output.weight, and token_embd when the embeddings are tied
    ("output",      ALL,                                     "falcon",                     T.Q8_0),
    ("output",      ALL,                                     "ragged",                     T.Q8_0),
    ("output",      _K_MIXES_EXCEPT_Q8,                      "",                           T.Q6_K),

    ("attn_v",      ("Q2_K",),                               "gqa4",                       T.Q4_K),
    ("attn_v",      ("Q2_K",),                               "",                           T.Q3_K),
    ("attn_v",      ("Q2_K_S",),                             "gqa4",                       T.Q4_K),
    ("attn_v",      ("Q3_K_M",),                             "i_lt2",                      T.Q5_K),
    ("attn_v",      ("Q3_K_M",),                             "",                           T.Q4_K),
    ("attn_v",      ("Q3_K_L",),                             "",                           T.Q5_K),
    ("attn_v",      ("Q4_K_M", "Q5_K_M"),                    "more_bits",                  T.Q6_K),
    ("attn_v",      ("Q4_K_S",),                             "i_lt4",                      T.Q5_K),

    ("attn_k",      ALL,                                     "expert8",                    T.Q8_0),

    ("ffn_down",    ("Q2_K",),                               "",                           T.Q3_K),
    ("ffn_down",    ("Q2_K_S",),                             "first_8th",                  T.Q4_K),
    ("ffn_down",    ("Q3_K_M",),                             "first_16th",                 T.Q5_K),
    ("ffn_down",    ("Q3_K_M",),                             "!falcon",                    T.Q4_K),
    ("ffn_down",    ("Q3_K_M",),                             "more_bits",                  T.Q4_K),
    ("ffn_down",    ("Q3_K_M",),                             "",                           T.Q3_K),
    ("ffn_down",    ("Q3_K_L",),                             "falcon",                     T.Q4_K),
    ("ffn_down",    ("Q3_K_L",),                             "",                           T.Q5_K),
    ("ffn_down",    ("Q4_K_M",),                             "falcon & first_16th",        T.Q6_K),
    ("ffn_down",    ("Q4_K_M",),                             "falcon & more_bits",         T.Q5_K),
    ("ffn_down",    ("Q4_K_M",),                             "falcon",                     T.Q4_K),
    ("ffn_down",    ("Q4_K_M",),                             "more_bits",                  T.Q6_K),
    ("ffn_down",    ("Q5_K_M",),                             "more_bits",                  T.Q6_K),
    ("ffn_down",    ("Q4_K_S",),                             "!falcon & first_8th",        T.Q5_K),
    ("ffn_down",    ("Q4_0",),                               "imatrix & first_8th",        T.Q4_1),
    ("ffn_down",    ("Q5_0",),                               "imatrix & first_8th",        T.Q5_1),

    ("attn_output", ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"), "!falcon & expert8", T.Q5_K),
    ("attn_output", ("Q2_K",),                               "!falcon & !expert8",         T.Q3_K),
    ("attn_output", ("Q3_K_M",),                             "!falcon & !expert8",         T.Q4_K),
    ("attn_output", ("Q3_K_L",),                             "!falcon & !expert8",         T.Q5_K),
    ("attn_output", ("Q3_K_L",),                             "falcon",                     T.Q4_K),
]

# Applied after RULES, each in turn, on the type chosen so far.
ADJUST = [
    ("attn_v",      ALL,                                     "model70b & q3k_or_q4k",      T.Q5_K),
    ("attn_v",      ALL,                                     "expert8",                    T.Q8_0),
]
# fmt: on

# Mixes whose Q2_K tensors need an importance matrix (tensor_requires_imatrix; token_embd/output exempt).
IMATRIX_REQUIRED = {"Q2_K_S": (T.Q2_K,)}


def mix_names() -> list:
    return list(MIXES)
