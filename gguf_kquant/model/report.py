"""The ``--report`` quality report: per tensor, the error of what was written against the source.

The report is committed together with the model (a side file of the writer, see :mod:`gguf_kquant.safeio`):
both appear, or neither — never a new model with an old report, or a report beside a failed model.
"""

from __future__ import annotations

import json


def render_report(stats: list, plan, result) -> bytes:
    """``{"mix", "file_type", "src_bytes", "dst_bytes", "bits_per_weight", "tensors": [...]}`` as JSON bytes;
    each tensor: name, shape, src_type, type, rmse, max_abs_error, cosine (converted tensors only)."""
    doc = {
        "mix": plan.mix,
        "file_type": int(plan.file_type),
        "src_bytes": result.src_nbytes,
        "dst_bytes": result.dst_nbytes,
        "bits_per_weight": result.bits_per_weight,
        "tensors": stats,
    }
    return json.dumps(doc, indent=1).encode("utf-8")


def worst(stats: list, n: int = 5) -> list:
    """The ``n`` tensors with the lowest cosine similarity (ties: highest RMSE)."""
    return sorted(stats, key=lambda s: (s["cosine"], -s["rmse"]))[:n]
