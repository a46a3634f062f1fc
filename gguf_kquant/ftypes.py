"""llama.cpp's file types (``enum llama_ftype``, include/llama.h): the value of ``general.file_type``.

Names are llama.h's without the ``LLAMA_FTYPE_`` prefix (``MOSTLY_Q4_K_M``); llama-quantize's mix names
(``Q4_K_M``) are the part after ``MOSTLY_``/``ALL_``.
"""

from __future__ import annotations

import enum


class LlamaFileType(enum.IntEnum):
    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ2_XXS = 19
    MOSTLY_IQ2_XS = 20
    MOSTLY_Q2_K_S = 21
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37
    MOSTLY_MXFP4_MOE = 38
    MOSTLY_NVFP4 = 39
    MOSTLY_Q1_0 = 40
    MOSTLY_Q2_0 = 41
    GUESSED = 1024

    @property
    def mix_name(self) -> str:
        """llama-quantize's name for this file type: ``Q4_K_M``, ``F32``..."""
        return self.name.split("_", 1)[1]


# llama_model_loader's guess when a file has no general.file_type: its most common tensor type -> file type
# (other types: ALL_F32), marked with the GUESSED bit.  Keyed by ggml type name (this module sits below types).
GUESSED_FROM_TYPE = {
    "F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1, "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q2_K": LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": LlamaFileType.MOSTLY_Q3_K_M, "Q4_K": LlamaFileType.MOSTLY_Q4_K_M, "Q5_K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K, "TQ1_0": LlamaFileType.MOSTLY_TQ1_0, "TQ2_0": LlamaFileType.MOSTLY_TQ2_0,
    "IQ2_XXS": LlamaFileType.MOSTLY_IQ2_XXS, "IQ2_XS": LlamaFileType.MOSTLY_IQ2_XS,
    "IQ2_S": LlamaFileType.MOSTLY_IQ2_S, "IQ3_XXS": LlamaFileType.MOSTLY_IQ3_XXS,
    "IQ1_S": LlamaFileType.MOSTLY_IQ1_S, "IQ1_M": LlamaFileType.MOSTLY_IQ1_M,
    "IQ4_NL": LlamaFileType.MOSTLY_IQ4_NL, "IQ4_XS": LlamaFileType.MOSTLY_IQ4_XS,
    "IQ3_S": LlamaFileType.MOSTLY_IQ3_S, "NVFP4": LlamaFileType.MOSTLY_NVFP4, "Q1_0": LlamaFileType.MOSTLY_Q1_0,
    "Q2_0": LlamaFileType.MOSTLY_Q2_0,
}


def guess_file_type(type_names) -> int:
    """llama_model_loader's ftype for a file without general.file_type: the tensor type that first reaches
    the highest count, over ``type_names`` in tensor-name order, mapped by :data:`GUESSED_FROM_TYPE`, with
    the GUESSED bit (``["F16", "F32", "F16"]`` -> ``MOSTLY_F16 | GUESSED`` = 1025)."""
    counts: dict = {}
    best, best_n = "F32", 0
    for name in type_names:
        counts[name] = counts.get(name, 0) + 1
        if counts[name] > best_n:
            best, best_n = name, counts[name]
    return int(GUESSED_FROM_TYPE.get(best, LlamaFileType.ALL_F32)) | LlamaFileType.GUESSED


def file_type_name(value) -> str:
    """``general.file_type`` value -> name (``15`` -> ``"MOSTLY_Q4_K_M"``, ``1025`` -> ``"MOSTLY_F16 (guessed)"``);
    unknown ids -> ``"UNKNOWN(<id>)"``."""
    try:
        v = int(value)
        if v & LlamaFileType.GUESSED and v != LlamaFileType.GUESSED:
            return f"{LlamaFileType(v & ~LlamaFileType.GUESSED).name} (guessed)"
        return LlamaFileType(v).name
    except (ValueError, TypeError):
        return f"UNKNOWN({value})"
