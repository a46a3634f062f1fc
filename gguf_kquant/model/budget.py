"""Size-budget quantization: each tensor's type chosen to minimise the predicted error under a file-size limit.

>>> import gguf_kquant
>>> r = gguf_kquant.quantize_model("m-f16.gguf", "m.gguf", target_bpw=5.0, imatrix="m.imatrix")  # doctest: +SKIP
>>> r.allocation.file_bytes <= r.allocation.target_bytes                                       # doctest: +SKIP
True

Not a recipe: the types follow from errors measured on this model with this imatrix.

1. The base plan is a quantized mix's (:func:`~gguf_kquant.model.planner.plan_tensors`): tensors the planner
   leaves alone (norms, 1-D tensors, exceptions) stay as it plans them; every tensor it quantizes is free.
2. Candidates for a free tensor: the :data:`CANDIDATES` (types stock llama.cpp loads and quantizes without
   special needs) whose block divides its rows, plus its own float type.
3. Sensitivity: a deterministic sample of its rows (evenly spaced, :data:`SAMPLE_ROWS` per matrix at least)
   is quantized to every candidate with the quantizer the file is written with (``method``), and the
   imatrix-weighted squared error ``sum_j imatrix[j] * (x - deq)^2`` is scaled to the whole tensor: the
   expected squared error of the layer's output.  Times :func:`_residual_gain`, it is in the units of the
   residual stream (attn_v's error reaches it through attn_output, ffn_up/ffn_gate's through ffn_down, each
   factor measured from those weights and the imatrix).  On SmolLM2 at Q4_K_M's size (ggml's blocks, Q4_1/Q5_1
   left out, benchmarks/bench_quality.py) this took the mean KLD change against Q4_K_M from -9.4% (plain
   measure) to -18.2%; giving attn_q/attn_k attn_output's factor too made it -1.1%, so they count as measured.
4. Allocation: per tensor, the lower convex hull of (bytes, error); every tensor starts at its cheapest
   type and upgrades are taken in order of error saved per byte while the exact file size — header plus
   every tensor padded to ``general.alignment`` — fits the budget (the greedy solution of the Lagrangian
   relaxation); leftover bytes then buy the single upgrades that save the most error.
5. Writing is :func:`~gguf_kquant.model.quantize.quantize_model` with the allocation as ``tensor_types``
   (one exact-name pattern per tensor), so every check and the streaming writer are the usual ones.

``target_bpw`` counts the whole file (header included) per weight of the model: ``target_size`` =
``floor(target_bpw * n_elements / 8)`` bytes.  A budget outside what the candidates can reach is refused with
the achievable range; the imatrix is required (it is the measure) and checked before any work.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from ..errors import ImatrixError, QuantizeError
from ..types import GGMLType, TYPES

__all__ = ["CANDIDATES", "SAMPLE_ROWS", "Allocation", "plan_budget", "quantize_to_budget"]

# types a free tensor may get: all load in stock llama.cpp and quantize without special needs
# (no IQ1-IQ3: they need an imatrix for every tensor, and their grid search is slow to measure)
CANDIDATES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_XS, GGMLType.Q4_0, GGMLType.IQ4_NL, GGMLType.Q4_1,
              GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0,
              GGMLType.F16)
_FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
# rows measured per matrix: at least SAMPLE_ROWS, 1/_SAMPLE_FRACTION of a larger one's.  The error of the
# allocation, measured on every row (SmolLM2 at Q4_K_M's size, Q4_1/Q5_1 left out: its weights lie on Q4_1's
# grid), was 232.6 when every row was measured, 232.8 with 64 rows (1/64 of larger matrices); with 1/512:
# 233.8 at 32 rows, 234.8 at 24, 233.5 at 16, 234.1 at 8 -- within the sampling's own +-0.5% from 8 rows up,
# while the plan's time follows the rows (1.4 s at 16, 1.7 at 24, 3.2 at 64).  Gemma 3 270M: the same
# allocation at 16 as at 32.  Most of a budget run is the plan and the writing of the optimized blocks.
SAMPLE_ROWS = 16
_SAMPLE_FRACTION = 512
_TENSORS_AHEAD = 2  # tensors whose samples are queued while the oldest one's jobs finish
# the mix whose name labels the file (general.file_type) when most weights get this type
_MIX_OF = {GGMLType.Q2_K: "Q2_K", GGMLType.Q3_K: "Q3_K_M", GGMLType.Q4_K: "Q4_K_M", GGMLType.Q5_K: "Q5_K_M",
           GGMLType.Q6_K: "Q6_K", GGMLType.Q4_0: "Q4_0", GGMLType.Q4_1: "Q4_1", GGMLType.Q5_0: "Q5_0",
           GGMLType.Q5_1: "Q5_1", GGMLType.Q8_0: "Q8_0", GGMLType.IQ4_NL: "IQ4_NL", GGMLType.IQ4_XS: "IQ4_XS"}
# options that would contradict a per-tensor allocation or a one-file size
_REFUSED = ("tensor_types", "pure", "output_tensor_type", "token_embedding_type", "keep_split", "split_max_size",
            "split_max_tensors")


@dataclass
class _Choice:
    """A free tensor: its candidates (bytes padded to the alignment, predicted error) and the pick."""

    name: str
    shape: tuple
    n_elements: int
    options: list  # [(padded bytes, error, GGMLType)], cheapest first
    pick: int = 0

    @property
    def type(self) -> GGMLType:
        return self.options[self.pick][2]

    @property
    def nbytes(self) -> int:
        return self.options[self.pick][0]

    @property
    def error(self) -> float:
        return self.options[self.pick][1]


@dataclass
class Allocation:
    """The result of :func:`plan_budget`: the type of each free tensor and the exact file size."""

    target_bytes: int
    min_bytes: int  # smallest file the candidates give
    max_bytes: int  # largest (every free tensor at its best candidate)
    fixed_bytes: int  # header and the tensors the planner fixes, padded
    n_elements: int
    choices: list = field(default_factory=list)
    mix: str = ""  # the mix that labels the file (general.file_type) and plans the fixed tensors

    @property
    def file_bytes(self) -> int:
        return self.fixed_bytes + sum(c.nbytes for c in self.choices)

    @property
    def types(self) -> dict:
        return {c.name: c.type for c in self.choices}

    def tensor_types(self) -> list:
        """The allocation as ``quantize_model``'s ``tensor_types``: one exact-name pattern per tensor."""
        return [f"^{re.escape(c.name)}$={c.type.name}" for c in self.choices]

    def format(self) -> str:
        """The allocation table ``--dry-run`` prints: tensor, type, size, predicted share of the error."""
        total = sum(c.error for c in self.choices) or 1.0
        lines = [f"{'tensor':<36s} {'type':<7s} {'MiB':>8s}  {'bpw':>5s}  error share"]
        for c in self.choices:
            lines.append(f"{c.name:<36s} {c.type.name:<7s} {c.nbytes / 2**20:8.3f}  "
                         f"{c.nbytes * 8.0 / c.n_elements:5.2f}  {100.0 * c.error / total:6.2f}%")
        counts = {}
        for c in self.choices:
            counts[c.type.name] = counts.get(c.type.name, 0) + 1
        ne = max(self.n_elements, 1)
        lines.append("types: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        lines.append(f"size budget: {self.target_bytes} bytes ({self.target_bytes * 8.0 / ne:.4f} bpw); file "
                     f"{self.file_bytes} bytes ({self.file_bytes * 8.0 / ne:.4f} bpw); achievable "
                     f"{self.min_bytes} .. {self.max_bytes} bytes")
        return "\n".join(lines)


def _target_bytes(target_bpw, target_size, n_elements: int) -> int:
    if (target_bpw is None) == (target_size is None):
        raise QuantizeError("give either target_bpw or target_size (one of them)")
    if target_size is not None:
        from ..container.writer import parse_size

        return parse_size(target_size, "target_size", QuantizeError)
    bpw = float(target_bpw)
    if not math.isfinite(bpw) or bpw <= 0:
        raise QuantizeError(f"target_bpw must be a positive number of bits per weight, got {target_bpw!r}")
    return int(math.floor(bpw * n_elements / 8.0))


def _candidate_types(candidates) -> tuple:
    if candidates is None:
        return CANDIDATES
    from ..types import type_info

    out = tuple(type_info(t).ggml_type for t in candidates)
    allowed = CANDIDATES + (GGMLType.F32, GGMLType.BF16)
    bad = [t.name for t in out if t not in allowed]
    if bad or not out:
        raise QuantizeError(f"candidates {', '.join(bad) or '(none)'}: choose among "
                            f"{', '.join(t.name for t in allowed)}")
    return out


def _candidates(types: tuple, src_type: GGMLType, n_per_row: int) -> list:
    out = [t for t in types if n_per_row % TYPES[t].block_size == 0]
    if src_type in _FLOATS and src_type not in out:
        out.append(src_type)  # keeping the source's floats is the error-free end of the range
    return out


def _header_bytes(f, plan, overrides) -> tuple:
    """(bytes before the tensor data, alignment) of the file quantize_model will write (the same whatever the
    types: a tensor's type is a u32 of its info)."""
    from ..container.writer import GGUFWriter
    from .quantize import _output_metadata

    metadata, alignment = _output_metadata(f, plan.file_type, overrides)
    w = GGUFWriter("budget-size-probe.gguf", metadata, alignment=alignment)  # planned only, never written
    w.add_tensors([(r.name, r.shape, r.dst_type, (lambda: iter(()))) for r in plan.rows])
    return w.plan()[0].data_offset, alignment


def _pad(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def _sample(n_rows: int) -> np.ndarray:
    """Evenly spaced row indices: all rows of a small matrix, else max(SAMPLE_ROWS, rows/_SAMPLE_FRACTION)."""
    k = min(n_rows, max(SAMPLE_ROWS, n_rows // _SAMPLE_FRACTION))
    return (np.arange(k, dtype=np.int64) * n_rows) // k


def _samples(t, row, im, mean_w: float) -> list:
    """Tensor ``t``'s measured rows, per matrix: (rows as float32, imatrix, error weights, rows per sampled row)."""
    from .quantize import _check_finite, _imatrix_for, _to_f32

    ne = row.shape[::-1]
    n_per_row = ne[0]
    rows_per_mat = ne[1] if len(ne) > 1 else 1
    n_mat = row.n_elements // (n_per_row * rows_per_mat)
    weights = _imatrix_for(row, im)
    src_row = TYPES[row.src_type].row_bytes(n_per_row)
    raw = t.raw().reshape(-1, src_row)
    samples = []
    for m in range(n_mat):
        idx = m * rows_per_mat + _sample(rows_per_mat)
        x = _to_f32(np.ascontiguousarray(raw[idx]), row.src_type, len(idx), n_per_row)
        _check_finite(row.name, x, row_numbers=idx)
        qw = None if weights is None else weights[m * n_per_row:(m + 1) * n_per_row]
        # no imatrix entry (a tied embedding, an excluded tensor): the model's mean activation as weight
        ew = np.full(n_per_row, mean_w) if qw is None else qw.astype(np.float64)
        samples.append((x, qw, ew, rows_per_mat / len(idx)))
    return samples


def _error(samples: list, qt, src_type, quantize_tensor) -> float:
    """Predicted imatrix-weighted squared error of the sampled tensor as type ``qt``, on this thread."""
    from ..codecs import dequantize

    if qt == src_type:
        return 0.0  # kept as it is
    total = 0.0
    for x, qw, ew, scale in samples:
        y = dequantize(quantize_tensor(x, qt, imatrix=qw, threads=1), qt, x.shape, threads=1)
        total += scale * float(((x.astype(np.float64) - y) ** 2 @ ew).sum())
    return total


_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(attn_v|ffn_up|ffn_gate)\.weight$")


def _column_norms(t, cache: dict) -> np.ndarray:
    """Squared norms of a 2-D tensor's columns, once per tensor (ffn_up and ffn_gate both read ffn_down's)."""
    if t.name not in cache:
        x = t.numpy().astype(np.float32, copy=False)
        cache[t.name] = np.einsum("ij,ij->j", x, x)
    return cache[t.name]


def _residual_gain(row, by_name, im, model, norms: dict) -> float:
    """How strongly the output error of tensor ``row`` reaches the residual stream, relative to a tensor that
    writes it (attn_output, ffn_down: 1).  A measured factor, from the weights and the imatrix:

    * attn_v: attention averages its output over positions (taken as 1) and attn_output maps it, each KV head
      feeding n_head/n_head_kv query heads: the mean squared column norm of attn_output, times n_head/n_head_kv;
    * ffn_up, ffn_gate: output c is multiplied by the other branch and mapped by ffn_down:
      ``|down[:, c]|^2 * E[h_c^2] / E[y_c^2]`` averaged over c, where E[h_c^2] is ffn_down's imatrix and
      E[y_c^2] = sum_k imatrix[k] * W[c, k]^2 (activations taken as uncorrelated);
    * the rest (attn_q/k, embeddings, MoE experts, unknown names): 1.

    Sums are float32 (3x faster than float64 here; an estimate from mean activations needs no more), and
    ``norms`` keeps the column norms for the next tensor of the layer.
    """
    m = _BLOCK_TENSOR.match(row.name)
    if m is None or len(row.shape) != 2:
        return 1.0
    layer, kind = m.groups()
    if kind == "attn_v":
        wo = by_name.get(f"blk.{layer}.attn_output.weight")
        if wo is None or len(wo.shape) != 2 or not model.n_gqa:
            return 1.0
        return float(_column_norms(wo, norms).mean(dtype=np.float64) * model.n_gqa)
    down = f"blk.{layer}.ffn_down.weight"
    wd, h2, x2 = by_name.get(down), im.entries.get(down), im.entries.get(row.name)
    if wd is None or h2 is None or x2 is None or len(wd.shape) != 2 or wd.shape[-1] != row.shape[0] \
            or h2.size != row.shape[0] or x2.size != row.shape[-1]:
        return 1.0
    y2 = np.square(by_name[row.name].numpy().astype(np.float32, copy=False)) @ x2.astype(np.float32)
    ok = y2 > 0
    if not ok.any():
        return 1.0
    return float((_column_norms(wd, norms) * h2 / np.where(ok, y2, 1.0))[ok].mean(dtype=np.float64))


def _hull(options: list) -> list:
    """Lower convex hull of [(bytes, error, type)]: cheapest first, error strictly falling, returns diminishing."""
    hull = []
    for b, e, t in sorted(options, key=lambda o: (o[0], o[1])):
        if hull and (e >= hull[-1][1] or b == hull[-1][0]):
            continue  # no cheaper-or-equal option may be better
        while len(hull) >= 2:
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            if (e1 - e0) * (b - b1) >= (e - e1) * (b1 - b0):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((b, e, t))
    return hull


def _allocate(choices: list, room: int) -> None:
    """Spend ``room`` bytes over the cheapest picks: hull upgrades by error saved per byte, then fill."""
    steps = []
    for i, c in enumerate(choices):
        h = c.options
        for k in range(1, len(h)):
            steps.append(((h[k - 1][1] - h[k][1]) / (h[k][0] - h[k - 1][0]), i, k))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    for _gain, i, k in steps:
        c = choices[i]
        cost = c.options[k][0] - c.nbytes
        if c.pick == k - 1 and cost <= room:
            c.pick, room = k, room - cost
    while True:  # leftover bytes: the best single upgrade that still fits
        best = None
        for c in choices:
            for k in range(c.pick + 1, len(c.options)):
                cost = c.options[k][0] - c.nbytes
                gain = c.error - c.options[k][1]
                if cost <= room and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, c, k, cost)
        if best is None:
            return
        _gain, c, k, cost = best
        c.pick, room = k, room - cost


def _label_mix(choices: list) -> str:
    """The mix named in general.file_type: the one whose type holds the most weights."""
    by_type = {}
    for c in choices:
        if c.type in _MIX_OF:
            by_type[c.type] = by_type.get(c.type, 0) + c.n_elements
    return _MIX_OF[max(by_type, key=by_type.get)] if by_type else "Q8_0"


def _check_options(options: dict) -> None:
    for k in _REFUSED:
        if options.get(k):
            raise QuantizeError(f"{k} cannot be combined with target_bpw/target_size, which choose every "
                                f"tensor's type and size one file")


def _measure_all(free, by_name, im, model, quantize_tensor, cand, size, threads, say) -> list:
    """A :class:`_Choice` per free tensor: its candidates' sizes and measured errors (times the residual gain),
    reduced to their lower convex hull.  Every (tensor, type) is a job on the pool, each quantizing on its own
    thread (a sample is a few dozen rows, too few to split); the next tensors' jobs are queued while a tensor's
    last ones run, so no thread waits for the slowest type of each tensor."""
    from ..codecs import _threads
    from ..codecs.chunks import one_blas_thread

    mean_w = float(np.mean([v.mean() for v in im.entries.values()]))
    choices = []
    norms = {}  # column norms of attn_output / ffn_down, read once a layer
    pending = deque()  # (row, gain, futures, start) of the tensors in flight, oldest first

    def finish() -> None:
        r, gain, futures, t0 = pending.popleft()
        errs = [gain * f.result() for f in futures]
        choices.append(_Choice(r.name, r.shape, r.n_elements, _hull(list(zip(size[r.name], errs, cand[r.name])))))
        if say is not None:
            say(f"[{len(choices):4d}/{len(free):4d}] measured {r.name:<36s} as {len(errs)} types, "
                f"{time.perf_counter() - t0:6.2f} s")

    pool = ThreadPoolExecutor(_threads(threads).wanted, thread_name_prefix="gguf-kquant-budget")
    try:
        with one_blas_thread():  # the errors' products are small and already one per thread
            for r in free:
                t0 = time.perf_counter()
                samples = _samples(by_name[r.name], r, im, mean_w)
                futures = [pool.submit(_error, samples, qt, r.src_type, quantize_tensor) for qt in cand[r.name]]
                pending.append((r, _residual_gain(r, by_name, im, model, norms), futures, t0))
                if len(pending) > _TENSORS_AHEAD:
                    finish()
            while pending:
                finish()
    finally:
        pool.shutdown(cancel_futures=True)  # after an error: the queued jobs are not run
    return choices


def plan_budget(src, *, target_bpw=None, target_size=None, imatrix=None, method: str = "llama",
                include_weights=(), exclude_weights=(), override_kv=(), leave_output_tensor: bool = False,
                allow_requantize: bool = False, threads: Optional[int] = None, candidates=None,
                say=None) -> Allocation:
    """Choose each quantizable tensor's type of ``src`` so the file fits the budget with the least predicted
    error (see the module docstring).  Nothing is written.  ``candidates``: the types a tensor may get (a
    subset of :data:`CANDIDATES` and F32/BF16; default all of them); the source's float type is always one.
    ``say``: called with a progress line per measured tensor.

    >>> a = plan_budget("m-f16.gguf", target_bpw=5.0, imatrix="m.imatrix")        # doctest: +SKIP
    >>> print(a.format())                                                         # doctest: +SKIP
    """
    from ..codecs.optimized import quantizer
    from ..container.reader import open_gguf
    from .planner import plan_tensors
    from .quantize import _check_plan, _overrides, _prepare_imatrix, _source_model

    if imatrix is None or imatrix is False:  # the measure is imatrix-weighted: refuse before any work
        raise ImatrixError("target_bpw/target_size measure each tensor's imatrix-weighted error and need an "
                           "imatrix")
    quantize_tensor = quantizer(method, True)
    types = _candidate_types(candidates)
    im = _prepare_imatrix(imatrix, tuple(include_weights or ()), tuple(exclude_weights or ()))
    if im is None:
        raise ImatrixError("target_bpw/target_size need an imatrix with entries for this model's tensors")
    overrides = _overrides(override_kv, im)
    with open_gguf(src) as f:
        model = _source_model(f, overrides)
        plan = plan_tensors([(t.name, t.shape, t.ggml_type) for t in f.tensors], model, "Q8_0", imatrix=True,
                            leave_output_tensor=leave_output_tensor)
        by_name = {t.name: t for t in f.tensors}
        _check_plan(plan, im, by_name, allow_requantize, False)
        header, alignment = _header_bytes(f, plan, overrides)
        fixed = header + sum(_pad(r.dst_nbytes, alignment) for r in plan.rows if not r.allows_quantization)
        free = [r for r in plan.rows if r.allows_quantization]
        cand = {r.name: _candidates(types, r.src_type, r.shape[-1]) for r in free}
        size = {r.name: [_pad(TYPES[t].nbytes(r.shape), alignment) for t in cand[r.name]] for r in free}
        target = _target_bytes(target_bpw, target_size, plan.n_elements)
        lo = fixed + sum(min(s) for s in size.values())
        hi = fixed + sum(max(s) for s in size.values())
        if not lo <= target <= hi:
            ne = plan.n_elements
            raise QuantizeError(f"size budget {target} bytes ({target * 8.0 / ne:.4f} bpw) is outside what this "
                                f"model can be: {lo} .. {hi} bytes ({lo * 8.0 / ne:.4f} .. {hi * 8.0 / ne:.4f} "
                                f"bpw, header included)")
        choices = _measure_all(free, by_name, im, model, quantize_tensor, cand, size, threads, say)
    alloc = Allocation(target, lo, hi, fixed, plan.n_elements, choices)
    _allocate(choices, target - lo)
    alloc.mix = _label_mix(choices)
    return alloc


def quantize_to_budget(src, dst, ftype=None, *, target_bpw=None, target_size=None, imatrix=None,
                       method: str = "llama", dry_run: bool = False, quiet: bool = True, stream=None,
                       candidates=None, **options):
    """``quantize_model(src, dst, target_bpw=... | target_size=..., imatrix=...)``: plan the budget, then
    write it with ``quantize_model``; the result carries the :class:`Allocation` as ``.allocation``.
    ``dry_run`` measures and prints the allocation (to ``stream`` unless ``quiet``) without writing."""
    import sys

    from .quantize import quantize_model

    if ftype is not None:
        raise QuantizeError("target_bpw/target_size choose every tensor's type: give no mix (ftype)")
    if isinstance(dst, Mapping):
        raise QuantizeError("target_bpw/target_size write one output at a time")
    _check_options(options)
    if not dry_run:  # a refused output is refused before the measurement, not after it
        from ..safeio import check_outputs

        im_path = imatrix if isinstance(imatrix, (str, os.PathLike)) else None
        outputs = [dst] + ([options["report"]] if options.get("report") else [])
        check_outputs(outputs, [src, im_path], overwrite=bool(options.get("overwrite")), error=QuantizeError)
    keep = ("include_weights", "exclude_weights", "override_kv", "leave_output_tensor", "allow_requantize",
            "threads")
    say = None if quiet else (lambda line: print(line, file=stream or sys.stderr, flush=True))
    alloc = plan_budget(src, target_bpw=target_bpw, target_size=target_size, imatrix=imatrix, method=method,
                        candidates=candidates, say=say, **{k: options[k] for k in keep if k in options})
    for k in _REFUSED:
        options.pop(k, None)
    result = quantize_model(src, dst, alloc.mix, imatrix=imatrix, method=method, dry_run=dry_run, quiet=quiet,
                            stream=stream, tensor_types=alloc.tensor_types(), **options)
    if dry_run and not quiet:
        print(alloc.format(), file=stream or sys.stderr, flush=True)
    result.allocation = alloc
    return result
