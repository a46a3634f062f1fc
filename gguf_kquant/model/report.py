"""The ``--report`` quality report: per tensor, the error of what was written against the source."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(path, stats: list, plan, result) -> None:
    """Write ``{"mix", "file_type", "src_bytes", "dst_bytes", "bits_per_weight", "tensors": [...]}`` as JSON;
    each tensor: name, shape, src_type, type, rmse, max_abs_error, cosine (converted tensors only)."""
    doc = {
        "mix": plan.mix,
        "file_type": int(plan.file_type),
        "src_bytes": result.src_nbytes,
        "dst_bytes": result.dst_nbytes,
        "bits_per_weight": result.bits_per_weight,
        "tensors": stats,
    }
    Path(path).write_text(json.dumps(doc, indent=1))


def worst(stats: list, n: int = 5) -> list:
    """The ``n`` tensors with the lowest cosine similarity (ties: highest RMSE)."""
    return sorted(stats, key=lambda s: (s["cosine"], -s["rmse"]))[:n]
