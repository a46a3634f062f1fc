"""Whole-model quantization like llama-quantize: mixes (data), planner, imatrix loader, streaming quantizer."""

from .planner import ModelInfo, Plan, PlanRow, plan_model, plan_tensors  # noqa: F401
from .imatrix import Imatrix, load_imatrix  # noqa: F401


def __getattr__(name):
    if name in ("quantize_model", "QuantizeResult"):
        from . import quantize

        return getattr(quantize, name)
    raise AttributeError(name)
