"""Compare two GGUF files: metadata, tensor types and shapes, and the error between their tensors' values.

>>> from gguf_kquant.tools import diff
>>> d = diff("model-f16.gguf", "model-q4_k_m.gguf")                            # doctest: +SKIP
>>> d["tensors"]["compared"][0]                                                  # doctest: +SKIP
{'name': 'token_embd.weight', 'type_a': 'F16', 'type_b': 'Q6_K', 'n_elements': 65536,
 'rmse': 0.0021, 'max_abs': 0.0113, 'cosine': 0.99991, 'rms_a': 0.112}

How two quantizations of one model are compared: every tensor present in both files with the same shape is
dequantized (``TensorInfo.numpy``: the multi-threaded kernels) one tensor at a time, and the error of B
against A is accumulated in float64 over slabs of :data:`SLAB_ELEMENTS` — peak memory is two float32
copies of one tensor and three float64 slabs.

Result (a ``dict``, what ``gguf-kquant diff --json`` prints; ``schema_version`` 1)::

    {"schema_version": 1, "a": str, "b": str,
     "metadata": {"added":   [{"key", "type", "value"}],          # in B only
                  "removed": [{"key", "type", "value"}],          # in A only
                  "changed": [{"key", "type_a", "value_a", "type_b", "value_b"}]},
     "tensors": {"only_a": [str], "only_b": [str],
                 "different_shape": [{"name", "shape_a", "shape_b", "type_a", "type_b"}],
                 "different_type": [str],                         # same shape, other ggml type
                 "compared": [{"name", "type_a", "type_b", "n_elements",
                               "rmse", "max_abs", "cosine",       # of B against A
                               "rms_a"}],                         # root mean square of A (scale of rmse)
                 "not_compared": [{"name", "reason"}]},           # a type that cannot be decoded...
     "summary": {"tensors_compared": int, "elements": int,
                 "rmse": float | null,                            # over all compared elements
                 "max_abs": float | null, "min_cosine": float | null, "identical": bool}}

``value`` entries are JSON-ready (long arrays shortened to their first elements, with ``"count"``).
``cosine`` is 1.0 for two all-zero tensors and 0.0 when only one is all zero; a non-finite value makes
``rmse``/``max_abs``/``cosine`` NaN (printed as ``"nan"`` in JSON).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..container.reader import open_gguf
from ..container.values import GGUFValueType

__all__ = ["diff", "tensor_error", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
MAX_ITEMS = 8  # array elements shown in the metadata part
SLAB_ELEMENTS = 1 << 20  # compared in slabs of this many elements (three float64 slabs: 24 MiB)


def _jsonable(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    return v


def _type_name(typed) -> str:
    return typed.type.name + (f"[{typed.element_type.name}]" if typed.element_type is not None else "")


def _show(typed) -> dict:
    v = typed.value
    if typed.type == GGUFValueType.ARRAY:
        items = list(v[:MAX_ITEMS]) if not isinstance(v, list) else v[:MAX_ITEMS]
        if typed.element_type == GGUFValueType.ARRAY:
            items = [f"<{_type_name(x)} of {len(x.value)}>" for x in items]
        return {"value": _jsonable(items), "count": len(v)}
    return {"value": _jsonable(v)}


def _same_value(a, b) -> bool:
    if (a.type, a.element_type) != (b.type, b.element_type):
        return False
    if a.type != GGUFValueType.ARRAY:
        return a.value == b.value or (isinstance(a.value, float) and math.isnan(a.value) and math.isnan(b.value))
    if a.element_type == GGUFValueType.ARRAY:
        return len(a.value) == len(b.value) and all(_same_value(x, y) for x, y in zip(a.value, b.value))
    if a.element_type == GGUFValueType.STRING:
        return list(a.value) == list(b.value)
    x, y = np.asarray(a.value), np.asarray(b.value)
    return x.shape == y.shape and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")


def _metadata_diff(ma, mb) -> dict:
    added = [{"key": k, "type": _type_name(mb.typed(k)), **_show(mb.typed(k))} for k in mb if k not in ma]
    removed = [{"key": k, "type": _type_name(ma.typed(k)), **_show(ma.typed(k))} for k in ma if k not in mb]
    changed = []
    for k in ma:
        if k in mb and not _same_value(ma.typed(k), mb.typed(k)):
            a, b = _show(ma.typed(k)), _show(mb.typed(k))
            changed.append({"key": k, "type_a": _type_name(ma.typed(k)), "value_a": a["value"],
                            "type_b": _type_name(mb.typed(k)), "value_b": b["value"]})
    return {"added": added, "removed": removed, "changed": changed}


def tensor_error(a: np.ndarray, b: np.ndarray) -> dict:
    """Sums of B's error against A over slabs: ``{"n", "sse", "max_abs", "dot", "aa", "bb"}`` (float64).

    >>> tensor_error(np.ones(4, np.float32), np.zeros(4, np.float32))["sse"]
    4.0
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    sse = dot = aa = bb = 0.0
    max_abs, nan = 0.0, False
    for i in range(0, fa.size, SLAB_ELEMENTS):
        x = fa[i:i + SLAB_ELEMENTS].astype(np.float64)
        y = fb[i:i + SLAB_ELEMENTS].astype(np.float64)
        d = y - x
        # einsum, not `@`: BLAS's threaded ddot is ~40x slower on a busy machine and adds nothing here
        sse += float(np.einsum("i,i->", d, d))
        dot += float(np.einsum("i,i->", x, y))
        aa += float(np.einsum("i,i->", x, x))
        bb += float(np.einsum("i,i->", y, y))
        if d.size:
            m = float(np.max(np.abs(d)))  # NaN if any difference is
            nan = nan or math.isnan(m)
            max_abs = max(max_abs, m) if not math.isnan(m) else max_abs
    return {"n": fa.size, "sse": sse, "max_abs": math.nan if nan else max_abs, "dot": dot, "aa": aa, "bb": bb}


def _cosine(dot: float, aa: float, bb: float) -> float:
    if aa == 0.0 and bb == 0.0:
        return 1.0
    if aa == 0.0 or bb == 0.0:
        return 0.0
    # sqrt(aa * bb) is exactly aa for identical tensors (cosine 1.0, not 0.9999999999999998); clamped against rounding
    return max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))


def _row(ta, tb, threads: Optional[int]) -> dict:
    e = tensor_error(ta.numpy(threads=threads), tb.numpy(threads=threads))
    n = max(e["n"], 1)
    return {"name": ta.name, "type_a": ta.type_name, "type_b": tb.type_name, "n_elements": e["n"],
            "rmse": math.sqrt(e["sse"] / n), "max_abs": e["max_abs"], "cosine": _cosine(e["dot"], e["aa"], e["bb"]),
            "rms_a": math.sqrt(e["aa"] / n), "_sse": e["sse"]}


def diff(a, b, *, tensors: bool = True, threads: Optional[int] = None, progress=None) -> dict:
    """Compare files ``a`` and ``b`` (split models open from their first shard); see the module docstring.

    ``tensors=False`` skips dequantizing (metadata, names, types and shapes only); ``threads``: kernel
    threads; ``progress(name, i, n)`` is called before each tensor is compared.
    """
    with open_gguf(a) as fa, open_gguf(b) as fb:
        md = _metadata_diff(fa.metadata, fb.metadata)
        names_b = {t.name: t for t in fb.tensors}
        names_a = {t.name for t in fa.tensors}
        out = {"only_a": [t.name for t in fa.tensors if t.name not in names_b],
               "only_b": [t.name for t in fb.tensors if t.name not in names_a],
               "different_shape": [], "different_type": [], "compared": [], "not_compared": []}
        both = [(t, names_b[t.name]) for t in fa.tensors if t.name in names_b]
        for i, (ta, tb) in enumerate(both):
            if tuple(ta.shape) != tuple(tb.shape):
                out["different_shape"].append({"name": ta.name, "shape_a": list(ta.shape), "shape_b": list(tb.shape),
                                               "type_a": ta.type_name, "type_b": tb.type_name})
                continue
            if ta.ggml_type != tb.ggml_type:
                out["different_type"].append(ta.name)
            if not tensors:
                continue
            if progress is not None:
                progress(ta.name, i, len(both))
            if not (ta.is_known_type and tb.is_known_type):
                out["not_compared"].append({"name": ta.name, "reason": "a ggml type this library cannot decode"})
                continue
            out["compared"].append(_row(ta, tb, threads))
    rows = out["compared"]
    n = sum(r["n_elements"] for r in rows)
    sse = sum(r.pop("_sse") for r in rows)
    summary = {
        "tensors_compared": len(rows), "elements": n,
        "rmse": math.sqrt(sse / n) if n else None,
        "max_abs": max((r["max_abs"] for r in rows), default=None),
        "min_cosine": min((r["cosine"] for r in rows), default=None),
    }
    summary["identical"] = (not any(md.values()) and not any(out[k] for k in ("only_a", "only_b", "different_shape",
                                                                              "different_type", "not_compared"))
                            and all(r["max_abs"] == 0.0 for r in rows))
    return {"schema_version": SCHEMA_VERSION, "a": str(a), "b": str(b), "metadata": md, "tensors": out,
            "summary": summary}
