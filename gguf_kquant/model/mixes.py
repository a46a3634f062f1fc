"""llama-quantize's mixes as data: the default type of each mix and the per-tensor rules of
``llama_tensor_get_type_impl`` (src/llama-quant.cpp, llama.cpp as vendored by llama-cpp-python 0.3.36).

A rule is ``(category, mixes, when, type)``: for a tensor of ``category`` (a name, a tuple of names, or
``"*"`` for any) in a model quantized to one of ``mixes``, if ``when`` holds, the tensor gets ``type``.
:data:`RULES` are tried in order and the first match wins (llama.cpp's ``else if`` chain, flattened: a
rule's place in the list is the place of its branch in the C code); :data:`ADJUST` rules are then applied
in sequence on top (the 70B and 8-expert bumps of ``attn_v``).  No match: the mix's default type.

``when`` is a disjunction of conjunctions: ``"a & !b | c"`` is (a and not b) or c.  Predicates
(evaluated by :mod:`gguf_kquant.model.planner`, which refuses unknown ones at import):

===================  ==========================================================================
``gqa4``             n_head / n_head_kv >= 4 (layer 0)
``expert8``          the model has exactly 8 experts        ``expert4``  at least 4 experts
``experts``          the tensor is 3-D with ne[2] > 1 (merged expert matrices)
``falcon``           general.architecture == "falcon"       ``bailingmoe3``  ... == "bailingmoe3"
``arch_keeps_q8_0``  the arch keeps this tensor at Q8_0 at least (:data:`KEEP_Q8_0_BY_ARCH`)
``model70b``         llama.cpp classifies the model as 70B (see :data:`MODEL_70B`)
``imatrix``          an importance matrix is in use
``ragged``           the row length is not a multiple of the default type's block size
``default_q8_0``     the mix's default type is Q8_0
``more_bits``        use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2
``first_8th``        i < n/8         ``first_16th``  i < n/16        ``last_8th``  i >= 7n/8
``count_first_8th``  c < n/8 (c: the running count, even in MoE models — the IQ1/IQ2 ffn_down rule)
``i_lt2``/``i_lt4``  i < 2 / i < 4
``q3k_or_q4k``       the type chosen so far is Q3_K or Q4_K
===================  ==========================================================================

``i``/``n`` are, for ``attn_v``, the running count of attn_v-like tensors and their total; for ``ffn_*``,
the layer (parsed from the name when the model has experts, else the running count) and block_count.
"""

from __future__ import annotations

from ..ftypes import LlamaFileType as FT
from ..types import GGMLType as T

# mix name -> (file type, default tensor type) — llama_ftype_get_default_type; names and order as
# llama-quantize's QUANT_OPTIONS (tools/quantize/quantize.cpp) without the aliases below.
MIXES: dict[str, tuple[FT, T]] = {
    "Q1_0": (FT.MOSTLY_Q1_0, T.Q1_0),
    "Q2_0": (FT.MOSTLY_Q2_0, T.Q2_0),
    "Q4_0": (FT.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": (FT.MOSTLY_Q4_1, T.Q4_1),
    "MXFP4_MOE": (FT.MOSTLY_MXFP4_MOE, T.MXFP4),
    "Q5_0": (FT.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": (FT.MOSTLY_Q5_1, T.Q5_1),
    "IQ2_XXS": (FT.MOSTLY_IQ2_XXS, T.IQ2_XXS),
    "IQ2_XS": (FT.MOSTLY_IQ2_XS, T.IQ2_XS),
    "IQ2_S": (FT.MOSTLY_IQ2_S, T.IQ2_XS),  # sic: IQ2_S files are mostly IQ2_XS
    "IQ2_M": (FT.MOSTLY_IQ2_M, T.IQ2_S),
    "IQ1_S": (FT.MOSTLY_IQ1_S, T.IQ1_S),
    "IQ1_M": (FT.MOSTLY_IQ1_M, T.IQ1_M),
    "TQ1_0": (FT.MOSTLY_TQ1_0, T.TQ1_0),
    "TQ2_0": (FT.MOSTLY_TQ2_0, T.TQ2_0),
    "Q2_K": (FT.MOSTLY_Q2_K, T.Q2_K),
    "Q2_K_S": (FT.MOSTLY_Q2_K_S, T.Q2_K),
    "IQ3_XXS": (FT.MOSTLY_IQ3_XXS, T.IQ3_XXS),
    "IQ3_S": (FT.MOSTLY_IQ3_S, T.IQ3_S),
    "IQ3_M": (FT.MOSTLY_IQ3_M, T.IQ3_S),
    "IQ3_XS": (FT.MOSTLY_IQ3_XS, T.IQ3_S),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, T.Q3_K),
    "IQ4_NL": (FT.MOSTLY_IQ4_NL, T.IQ4_NL),
    "IQ4_XS": (FT.MOSTLY_IQ4_XS, T.IQ4_XS),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (FT.MOSTLY_Q6_K, T.Q6_K),
    "Q8_0": (FT.MOSTLY_Q8_0, T.Q8_0),
    "F16": (FT.MOSTLY_F16, T.F16),
    "BF16": (FT.MOSTLY_BF16, T.BF16),
    "F32": (FT.ALL_F32, T.F32),
    # only_copy: every tensor is copied as it is; general.file_type keeps the source's (llama_model_loader's
    # ftype: its general.file_type, else the guess from its most common tensor type)
    "COPY": (FT.ALL_F32, T.F32),
}
# llama-quantize's aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# mixes that quantize nothing (params.only_copy)
ONLY_COPY = ("COPY",)

ALL = tuple(MIXES)

# Tensor categories (tensor_get_category): exact names first, then substrings, in this order.
CATEGORY_EXACT = {
    "output.weight": "output",
    "token_embd.weight": "token_embd",
    "per_layer_token_embd.weight": "token_embd",
}
CATEGORY_SUBSTRING = [
    # attn_qkv / attn_kv_b are attn_v-like (category_is_attn_v); the attn_qkv branch after attn_v's in
    # llama_tensor_get_type_impl is never reached, so they take attn_v's rules
    ("attn_qkv.weight", "attn_v"),
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
# arch -> name substrings that never go below Q8_0 (checked before every other rule)
KEEP_Q8_0_BY_ARCH = {"glm5-next": ("attn_q_a", "attn_q_b", "nextn.eh_proj")}

# Which categories keep a running counter (i_attention_wv, i_ffn_down, ...) in llama-quantize's order.
COUNTED = ("attn_v", "ffn_down", "ffn_gate", "ffn_up")

# arch -> (block_count, needs n_head != n_head_kv): llama.cpp's LLM_TYPE_70B (llama: not with 8 experts).
MODEL_70B = {"llama": (80, True), "qwen2": (80, False), "deci": (80, False), "olmo": (80, False),
             "jais2": (68, False)}

# Tensors that become one of these types need an importance matrix (tensor_requires_imatrix; token_embd
# and output are exempt) — per mix, and for every mix under the key None.
IMATRIX_REQUIRED = {None: (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S), "Q2_K_S": (T.Q2_K,)}

# ggml_quantize_chunk cannot produce these (llama-quantize aborts); a plan that converts to one is refused.
NOT_WRITABLE = (T.Q8_1, T.Q8_K, T.F64, T.I8, T.I16, T.I32, T.I64)

_K_MIXES = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
# The very-low-bit mixes: their own branch for every tensor but output/token_embd
IQ1_IQ2 = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_IQ2_S_M = ("IQ2_S", "IQ2_M")  # IQ3_S where the other IQ1/IQ2 mixes use Q2_K
_IQ_Q2K = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M")
# ffn_* layers come from the tensor name in MoE models (layer_info) — except in these mixes' branches
LAYER_FROM_NAME_EXEMPT = IQ1_IQ2 + ("MXFP4_MOE",)
_FFN = ("ffn_up", "ffn_gate", "ffn_down")
_EXPERT8_ATTN_OUT_Q5K = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                         "IQ3_S", "IQ3_M", "IQ4_XS")

# fmt: off
# (category,     mixes,                        when,                                   type)
RULES = [
    # glm5-next's q/nextn projections (before anything else)
    ("*",           ALL,                          "arch_keeps_q8_0",                      T.Q8_0),

    # output.weight, and token_embd when the embeddings are tied
    ("output",      ("MXFP4_MOE",),               "",                                     T.Q8_0),
    ("output",      ALL,                          "falcon | ragged",                      T.Q8_0),
    ("output",      IQ1_IQ2 + ("IQ3_XXS",),       "",                                     T.Q5_K),
    ("output",      ALL,                          "!default_q8_0",                        T.Q6_K),

    # MXFP4_MOE: merged expert tensors -> MXFP4 (bailingmoe3: only the ffn ones), everything else Q8_0
    (_FFN,          ("MXFP4_MOE",),               "experts",                              T.MXFP4),
    ("*",           ("MXFP4_MOE",),               "experts & !bailingmoe3",               T.MXFP4),
    ("*",           ("MXFP4_MOE",),               "",                                     T.Q8_0),

    # token_embd (untied)
    ("token_embd",  _IQ_Q2K,                      "",                                     T.Q2_K),
    ("token_embd",  _IQ2_S_M + ("IQ3_XXS",),      "",                                     T.IQ3_S),
    ("token_embd",  ("TQ1_0", "TQ2_0", "Q2_0"),   "",                                     T.Q4_K),

    # the IQ1/IQ2 mixes (no 70B / 8-expert adjustment of attn_v, see ADJUST)
    ("attn_v",      IQ1_IQ2,                      "gqa4 | expert4",                       T.Q4_K),
    ("attn_v",      _IQ2_S_M,                     "",                                     T.IQ3_S),
    ("attn_v",      IQ1_IQ2,                      "",                                     T.Q2_K),
    ("attn_k",      IQ1_IQ2,                      "expert8",                              T.Q4_K),
    ("ffn_down",    _IQ2_S_M,                     "count_first_8th",                      T.IQ3_S),
    ("ffn_down",    IQ1_IQ2,                      "count_first_8th",                      T.Q2_K),
    ("attn_output", IQ1_IQ2,                      "expert8",                              T.Q5_K),
    ("attn_output", ("IQ1_S", "IQ1_M"),           "",                                     T.IQ2_XXS),
    ("attn_output", _IQ2_S_M,                     "",                                     T.IQ3_S),

    ("attn_v",      ("Q2_K",),                    "gqa4",                                 T.Q4_K),
    ("attn_v",      ("Q2_K",),                    "",                                     T.Q3_K),
    ("attn_v",      ("Q2_K_S",),                  "gqa4",                                 T.Q4_K),
    ("attn_v",      ("IQ3_XXS",),                 "gqa4",                                 T.Q4_K),
    ("attn_v",      ("IQ3_XXS",),                 "!imatrix",                             T.IQ3_S),
    ("attn_v",      ("IQ3_XS", "IQ3_S"),          "gqa4",                                 T.Q4_K),
    ("attn_v",      ("IQ3_M",),                   "",                                     T.Q4_K),
    ("attn_v",      ("Q3_K_M",),                  "i_lt2",                                T.Q5_K),
    ("attn_v",      ("Q3_K_M",),                  "",                                     T.Q4_K),
    ("attn_v",      ("Q3_K_L",),                  "",                                     T.Q5_K),
    ("attn_v",      ("IQ4_NL", "IQ4_XS"),         "gqa4",                                 T.Q5_K),
    ("attn_v",      ("Q4_K_M", "Q5_K_M"),         "more_bits",                            T.Q6_K),
    ("attn_v",      ("Q4_K_S",),                  "i_lt4",                                T.Q5_K),

    ("attn_k",      ALL,                          "expert8",                              T.Q8_0),
    ("attn_k",      ("IQ3_XS",),                  "",                                     T.IQ3_XXS),
    ("attn_k",      ("IQ3_XXS",),                 "",                                     T.IQ2_S),
    ("attn_q",      ("IQ3_XS",),                  "",                                     T.IQ3_XXS),
    ("attn_q",      ("IQ3_XXS",),                 "",                                     T.IQ2_S),

    ("ffn_down",    ("Q2_K",),                    "",                                     T.Q3_K),
    ("ffn_down",    ("Q2_K_S",),                  "first_8th",                            T.Q4_K),
    ("ffn_down",    ("IQ3_XXS",),                 "!imatrix & first_8th",                 T.Q4_K),
    ("ffn_down",    ("IQ3_XXS",),                 "!imatrix",                             T.Q3_K),
    ("ffn_down",    ("Q3_K_M",),                  "first_16th",                           T.Q5_K),
    ("ffn_down",    ("Q3_K_M",),                  "!falcon | more_bits",                  T.Q4_K),
    ("ffn_down",    ("Q3_K_M",),                  "",                                     T.Q3_K),
    ("ffn_down",    ("IQ3_M",),                   "first_8th | expert8 & more_bits",      T.Q4_K),
    ("ffn_down",    ("Q3_K_L",),                  "falcon",                               T.Q4_K),
    ("ffn_down",    ("Q3_K_L",),                  "",                                     T.Q5_K),
    ("ffn_down",    ("Q4_K_M",),                  "falcon & first_16th",                  T.Q6_K),
    ("ffn_down",    ("Q4_K_M",),                  "falcon & more_bits",                   T.Q5_K),
    ("ffn_down",    ("Q4_K_M",),                  "falcon",                               T.Q4_K),
    ("ffn_down",    ("Q4_K_M",),                  "more_bits",                            T.Q6_K),
    ("ffn_down",    ("IQ4_NL", "IQ4_XS"),         "first_8th & !imatrix",                 T.Q5_K),
    ("ffn_down",    ("Q5_K_M",),                  "more_bits",                            T.Q6_K),
    ("ffn_down",    ("Q4_K_S",),                  "!falcon & first_8th",                  T.Q5_K),
    ("ffn_down",    ("Q4_0",),                    "imatrix & first_8th",                  T.Q4_1),
    ("ffn_down",    ("Q5_0",),                    "imatrix & first_8th",                  T.Q5_1),

    ("attn_output", _EXPERT8_ATTN_OUT_Q5K,        "!falcon & expert8",                    T.Q5_K),
    ("attn_output", ("Q2_K",),                    "!falcon & !expert8",                   T.Q3_K),
    ("attn_output", ("IQ3_XXS",),                 "!falcon & !expert8",                   T.IQ3_S),
    ("attn_output", ("Q3_K_M", "IQ3_M"),          "!falcon & !expert8",                   T.Q4_K),
    ("attn_output", ("Q3_K_L",),                  "!falcon & !expert8",                   T.Q5_K),
    ("attn_output", ("Q3_K_L",),                  "falcon",                               T.Q4_K),

    (("ffn_gate", "ffn_up"), ("IQ3_XS",),         "!first_8th & !last_8th",               T.IQ3_XXS),
]

# Applied after RULES, each in turn, on the type chosen so far (not in the IQ1/IQ2 and MXFP4_MOE branches).
_ADJUSTED = tuple(m for m in ALL if m not in LAYER_FROM_NAME_EXEMPT)
ADJUST = [
    ("attn_v",      _ADJUSTED,                    "model70b & q3k_or_q4k",                T.Q5_K),
    ("attn_v",      _ADJUSTED,                    "expert8",                              T.Q8_0),
]
# fmt: on

assert all(m in MIXES for _c, mixes, _w, _t in RULES + ADJUST for m in mixes)
assert all(m in MIXES for m in list(IMATRIX_REQUIRED)[1:] + list(ALIASES.values()) + list(ONLY_COPY))


# The 39 names llama-quantize accepts (QUANT_OPTIONS), in its order.
NAMES = ("Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
         "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K", "IQ3_XS",
         "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S",
         "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "COPY")
assert len(NAMES) == 39 and set(NAMES) == set(MIXES) | set(ALIASES)


def mix_names() -> list:
    """The names llama-quantize accepts, in its order (aliases included)."""
    return list(NAMES)
