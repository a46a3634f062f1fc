"""Several outputs of one model in one pass: ``quantize_model(src, {"m-Q4_K_M.gguf": "Q4_K_M", ...})``.

>>> gguf_kquant.quantize_model("m-f16.gguf", {"m-Q4_K_M.gguf": "Q4_K_M", "m-Q6_K.gguf": "Q6_K"},
...                            imatrix="m.imatrix")                          # doctest: +SKIP
{'m-Q4_K_M.gguf': QuantizeResult(...), 'm-Q6_K.gguf': QuantizeResult(...)}

Every output is the file its own single run writes (and llama-quantize writes): the planner runs once per
mix, each output gets that mix's metadata, and the writer plans every output file (header, tensor offsets,
size) before a byte is written.  Then each source tensor is read once, slab by slab (``pread``), converted to
float32 once, and each slab is quantized once per *distinct* target type among the outputs: two mixes that
want Q6_K for a tensor share the bytes (the imatrix weights of a tensor depend only on its name, so the same
type means the same codec call on the same rows).  Quantization is row-wise, so the bytes do not depend on
where the slabs are cut.  All mixes order the tensors alike (by name, or the source order with
``keep_split``), so every output file — every shard of it — is written front to back; after each tensor the
position must equal the plan.

Safety (:mod:`gguf_kquant.safeio`): every path of every output — the model files, their ``--keep-split`` /
``--split-max-*`` shards, the reports — is checked against every input and against each other before any
work; one :class:`~gguf_kquant.safeio.AtomicFiles` holds the temps of all of them, so the outputs appear
together, or (an error, a refused tensor, SIGINT/SIGTERM/SIGHUP) none of them is touched.

Memory: one slab of source rows at a time, bounded *together with* its float32 copy and its quantized
bytes for every distinct type by :data:`~gguf_kquant.model.quantize.SLAB_BYTES` (a single run's slab) plus,
per extra output, the size of the tensor's largest quantized form (capped at ``SLAB_BYTES``); besides, one
1 MiB write buffer per open output file and each output's header.  So the peak is a single run's plus at
most one tensor per extra output (benchmarks/bench_multi_output.py measures it).  The larger slabs matter:
each codec call is a parallel region with a fixed cost, which a loaded machine makes large (six mixes of a
200 MB model: 29 s with single-run slabs, 19.5 s with six times larger ones, at load 9 on 2 cores).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..codecs.gptq import for_tensor
from ..codecs.optimized import quantizer
from ..errors import BadTensorDataError, QuantizeError, WriteError
from ..safeio import AtomicFiles, check_outputs
from ..types import GGMLType, TYPES
from .imatrix import Imatrix
from .progress import Progress
from .quantize import (SLAB_BYTES, QuantizeResult, _check_finite, _check_plan, _Converter, _files,
                       _imatrix_for, _input_paths, _output_metadata, _overrides, _plan, _prepare_imatrix,
                       _say_dry_run, _source_model, _split_limits, _Stats, _to_f32)
from .report import render_report

__all__ = ["quantize_outputs"]

_FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def quantize_outputs(src, outputs: Mapping, *, imatrix=None, include_weights=(), exclude_weights=(),
                     output_tensor_type=None, token_embedding_type=None, tensor_types=(), pure=False,
                     leave_output_tensor=False, allow_requantize=False, override_kv=(), keep_split=False,
                     split_max_size=None, split_max_tensors=None, threads=None, dry_run=False, report=None,
                     overwrite=False, quiet=True, stream=None, method: str = "llama", client=None) -> dict:
    """Write every ``{dst: mix}`` of ``outputs`` from ``src`` in one pass; returns ``{dst: QuantizeResult}``.

    The options are :func:`~gguf_kquant.model.quantize.quantize_model`'s and apply to every output, except
    ``report``: a mapping ``{dst: report path}`` for the outputs that want one.  ``method`` applies to all
    outputs: with ``"optimized"`` each output is the file its own ``quantize_model(..., method="optimized")``
    writes (the refiners work row by row, so slabs and shared types do not change the bytes).
    """
    from ..container.reader import open_gguf
    from .planner import parse_mix

    t0 = time.perf_counter()
    if not outputs:
        raise QuantizeError("no outputs given")
    for dst in outputs:
        if not isinstance(dst, (str, os.PathLike)):
            raise QuantizeError(f"output {dst!r}: the keys of outputs are paths ({{path: mix}})")
    mixes = {dst: parse_mix(ftype) for dst, ftype in outputs.items()}  # unknown mixes refused first
    reports = _report_paths(report, outputs)
    max_bytes = _split_limits(keep_split, split_max_size, split_max_tensors)
    im = _prepare_imatrix(imatrix, tuple(include_weights or ()), tuple(exclude_weights or ()))
    # an unknown method, or optimized without imatrix, refused here
    quantize_tensor = quantizer(method, im is not None, getattr(im, "hessians", None))
    overrides = _overrides(override_kv, im)
    rules = dict(pure=pure, leave_output_tensor=leave_output_tensor, output_tensor_type=output_tensor_type,
                 token_embedding_type=token_embedding_type, tensor_types=tensor_types, keep_order=keep_split)

    with open_gguf(src) as f:
        model = _source_model(f, overrides)
        by_name = {t.name: t for t in f.tensors}
        plans = {dst: _plan(f, model, mix, im, **rules) for dst, (mix, _ft, _d) in mixes.items()}
        first = next(iter(plans.values()))
        progress = Progress(len(first.rows), quiet=quiet, stream=stream, total_bytes=first.src_nbytes)
        results = _checked_results(plans, im, by_name, allow_requantize, dry_run, progress)
        order = [r.name for r in first.rows]
        if dry_run:
            for dst, plan in plans.items():
                progress.say(f"== {dst} ({plan.mix})")
                _say_dry_run(progress, plan, im)
            for r in results.values():
                r.seconds = time.perf_counter() - t0
            return results

        from ..precompile import warm_for_plan

        outs = []
        for dst, plan in plans.items():
            warm_for_plan(plan, im, dst in reports, method)  # compile missing kernels in parallel processes
            metadata, alignment = _output_metadata(f, plan.file_type, overrides)  # COPY's is a guess
            shards = _shard_plans(f, dst, plan, metadata, alignment, keep_split, max_bytes, split_max_tensors)
            outs.append(_Output(dst, plan, shards, reports.get(dst)))
        targets = [sp.path for o in outs for sp in o.shards] + [Path(o.report) for o in outs if o.report]
        check_outputs(targets, _input_paths(f, imatrix), overwrite=overwrite, error=QuantizeError)
        if client is not None:  # one task per source tensor on a Dask cluster: gguf_kquant.model.distributed
            from .distributed import stream_outputs_on_cluster

            stream_outputs_on_cluster(client, f, by_name, order, outs, targets, im, threads, progress,
                                      quantize_tensor)
        else:
            _stream_all(f, by_name, order, outs, targets, im, threads, progress, quantize_tensor)
        _summarise(outs, results, first.src_nbytes, time.perf_counter() - t0, progress)
    return results


def _checked_results(plans: dict, im, by_name, allow_requantize: bool, dry_run: bool, progress) -> dict:
    """{dst: QuantizeResult} of the plans, each checked as quantize_model checks its plan (warnings said), and
    all in the same tensor order (one pass reads each tensor once for every output)."""
    results = {}
    for dst, plan in plans.items():
        for w in plan.warnings:
            progress.say(f"{dst}: {w}")
        _check_plan(plan, im, by_name, allow_requantize, dry_run)
        results[dst] = QuantizeResult(plan=plan, paths=[], src_nbytes=plan.src_nbytes,
                                      dst_nbytes=plan.dst_nbytes, n_elements=plan.n_elements)
    order = [r.name for r in next(iter(plans.values())).rows]
    for dst, plan in plans.items():
        if [r.name for r in plan.rows] != order:  # the planner orders by name whatever the mix
            raise QuantizeError(f"{dst}: its mix orders the tensors differently; quantize it on its own")
    return results


def _summarise(outs: list, results: dict, src_nbytes: int, seconds: float, progress) -> None:
    """Fill each output's result (paths, time, report) and say a line per output and the total time."""
    for o in outs:
        res = results[o.dst]
        res.paths, res.seconds = [sp.path for sp in o.shards], seconds
        if o.stats is not None:
            res.report = o.stats
        progress.say(f"{o.dst}: {o.plan.mix}, {res.dst_nbytes / 2**20:8.2f} MiB ({res.bits_per_weight:.2f} BPW)"
                     + (f", {o.plan.n_fallback} fallback tensor(s)" if o.plan.n_fallback else ""))
    rate = src_nbytes / 2**20 / seconds if seconds > 0 else float("inf")
    progress.say(f"time        = {seconds:8.2f} s for {len(outs)} outputs ({rate:.1f} MiB/s of input)")


def _report_paths(report, outputs: Mapping) -> dict:
    if report is None:
        return {}
    if not isinstance(report, Mapping):
        raise QuantizeError("with several outputs, report maps outputs to report paths: {dst: 'r.json', ...}")
    named = {Path(os.fspath(k)): k for k in outputs}  # "a.gguf" and Path("a.gguf") name one output
    out = {}
    for k, v in report.items():
        dst = named.get(Path(os.fspath(k)))
        if dst is None:
            raise QuantizeError(f"report for {k!r}, which is not one of the outputs")
        if v is not None:
            out[dst] = v
    return out


class _Output:
    """One output: its plan, its files' writer plans (ShardPlan), its report and its writing position."""

    def __init__(self, dst, plan, shards: list, report):
        self.dst, self.plan, self.shards, self.report = dst, plan, shards, report
        self.rows = {r.name: r for r in plan.rows}
        self.stats = [] if report else None
        self.where = {t.name: (k, i) for k, sp in enumerate(shards) for i, t in enumerate(sp.tensors)}


def _shard_plans(f, dst, plan, metadata, alignment: int, keep_split: bool, max_bytes, max_tensors) -> list:
    """The writer's plans of every file of one output — what quantize_model's single run would write."""
    from ..container.writer import GGUFWriter, ShardPlan, _alignment_of, _encode_header

    def specs(rows):
        return [(r.name, r.shape, r.dst_type, _never_called) for r in rows]

    if max_bytes or max_tensors:  # cut as llama-gguf-split would
        w = GGUFWriter(dst, metadata, alignment=alignment, split_max_size=max_bytes, split_max_tensors=max_tensors)
        w.add_tensors(specs(plan.rows))
        return w.plan()
    out = []
    for path, md, rows in _files(f, dst, plan, metadata, keep_split):  # as write_shards plans them
        w = GGUFWriter(path, md, alignment=alignment)
        w.add_tensors(specs(rows))
        a, pairs = _alignment_of(w._metadata, alignment)
        sp = ShardPlan(Path(path), pairs, list(w._tensors), a)
        _encode_header(sp, 3, "<")
        out.append(sp)
    return out


def _never_called():
    raise AssertionError("the multi-output writer streams the bytes itself")


def _stream_all(f, by_name, order, outs, targets, im, threads, progress, quantize_tensor) -> None:
    """Write every output tensor by tensor, then the reports, and commit everything together."""
    n_files = sum(len(o.shards) for o in outs)
    with AtomicFiles(targets) as out, ExitStack() as files:
        writers, first = [], 0
        for o in outs:
            writers.append(_FileWriter(o.shards, first, out, files))
            first += len(o.shards)
        for name in order:
            t = by_name[name]
            rows = [o.rows[name] for o in outs]
            stats_of = {r.dst_type: _Stats(r) for o, r in zip(outs, rows) if o.stats is not None and r.convert}
            start = time.perf_counter()
            for w, o in zip(writers, outs):
                w.begin(*o.where[name])
            for chunks in _slabs(t, rows, im, threads, stats_of, quantize_tensor):
                for w, c in zip(writers, chunks):
                    w.write(c)
            for w in writers:
                w.end()
            for o, r in zip(outs, rows):
                if o.stats is not None and r.convert:
                    o.stats.append(stats_of[r.dst_type].result())
            _say_tensor(progress, im, rows, time.perf_counter() - start)
        for w in writers:
            w.finish()
        j = n_files
        for o in outs:
            if o.report:
                res = QuantizeResult(plan=o.plan, paths=[], src_nbytes=o.plan.src_nbytes,
                                     dst_nbytes=o.plan.dst_nbytes, n_elements=o.plan.n_elements)
                out.write_bytes(j, render_report(o.stats, o.plan, res))
                j += 1
        out.commit()


def _say_tensor(progress: Progress, im: Optional[Imatrix], rows: list, seconds: float) -> None:
    """One progress line per source tensor, covering every output (its distinct target types)."""
    r0 = rows[0]
    if im is not None and any(r.convert for r in rows) and r0.name not in im.entries:
        progress.say(f"====== did not find weights for {r0.name}")
    dst = "/".join(dict.fromkeys(r.dst_type.name for r in rows))
    progress.tensor(r0.name, r0.shape[::-1], r0.src_type.name, dst, r0.src_nbytes,
                    sum(r.dst_nbytes for r in rows), seconds)


def _slabs(t, rows: list, im: Optional[Imatrix], threads, stats_of: dict, q):
    """Per slab of source rows of tensor ``t``: a list, parallel to ``rows`` (one PlanRow per output), of
    that output's bytes — the raw slab for a copy, else the slab quantized by ``q`` (the method's quantize
    function) once per distinct type."""
    src_type = rows[0].src_type
    ne = rows[0].shape[::-1]
    n_per_row = ne[0]
    if n_per_row == 0:
        return
    rows_per_mat = ne[1] if len(ne) > 1 else 1
    n_rows = rows[0].n_elements // n_per_row
    src_row = TYPES[src_type].row_bytes(n_per_row)
    types = list(dict.fromkeys(r.dst_type for r in rows if r.convert))
    check_copy = src_type in _FLOATS and any(not r.convert for r in rows)  # as the single run's _copy
    weights = _imatrix_for(rows[0], im) if types else None
    per_row = src_row + (4 * n_per_row if types or check_copy else 0)
    per_row += sum(TYPES[d].row_bytes(n_per_row) for d in types)
    # a single run's slab, plus for each extra output at most one of its tensors (capped at a slab): fewer,
    # larger codec calls — each parallel call has a fixed cost that a loaded machine makes large
    largest = max((TYPES[d].nbytes(rows[0].shape) for d in types), default=0)
    step = max(1, (SLAB_BYTES + (len(rows) - 1) * min(SLAB_BYTES, largest)) // per_row)
    fd = os.open(t.path, os.O_RDONLY)
    try:
        r0 = 0
        while r0 < n_rows:
            mat = r0 // rows_per_mat
            k = min(step, n_rows - r0, (mat + 1) * rows_per_mat - r0)  # never cross an expert boundary
            raw = _Converter._read(fd, t.offset + r0 * src_row, k * src_row, t)
            x = _to_f32(raw, src_type, k, n_per_row) if types or check_copy else None
            if check_copy:
                _check_finite(t.name, x, r0)
            w = None if weights is None else weights[mat * n_per_row:(mat + 1) * n_per_row]
            q_mat = for_tensor(q, t.name, mat)  # error feedback: this (expert's) H
            made = {}
            for d in types:
                try:
                    made[d] = q_mat(x, d, imatrix=w, threads=threads)
                except BadTensorDataError as exc:
                    _check_finite(t.name, x, r0)
                    raise BadTensorDataError(f"tensor {t.name}, rows {r0}..{r0 + k - 1}: {exc}") from None
                if d in stats_of:
                    stats_of[d].add(x, made[d], d)
            yield [made[r.dst_type] if r.convert else raw for r in rows]
            r0 += k
    finally:
        os.close(fd)


class _FileWriter:
    """Writes one output's files front to back: opens each shard in turn (header first), appends each
    tensor's bytes and padding, and checks every position against the writer's plan."""

    def __init__(self, shards: list, first: int, out: AtomicFiles, files: ExitStack):
        self.shards, self.first, self.out, self.files = shards, first, out, files
        self.k = -1
        self.fh = None
        self.sub: Optional[ExitStack] = None

    def _advance(self, k: int) -> None:
        """Finish the open shard and open the shards up to ``k`` (empty ones in between are written whole)."""
        while self.k < k:
            self._close()
            self.k += 1
            self.sub = self.files.enter_context(ExitStack())
            self.fh = self.sub.enter_context(self.out.writing(self.first + self.k))
            self.fh.write(self.shards[self.k].header)

    def _close(self) -> None:
        if self.sub is None:
            return
        sp = self.shards[self.k]
        if self.fh.tell() != sp.file_size:
            raise WriteError(f"{sp.path}: file size {self.fh.tell()}, planned {sp.file_size}")
        self.sub.close()  # flush + fsync + close
        self.sub = self.fh = None

    def begin(self, k: int, i: int) -> None:
        self._advance(k)
        sp = self.shards[k]
        self.tensor, self.offset, self.written = sp.tensors[i], sp.data_offset + sp.offsets[i], 0
        if self.fh.tell() != self.offset:
            raise WriteError(f"{sp.path}: tensor {self.tensor.name!r} starts at {self.fh.tell()}, "
                             f"planned {self.offset}")

    def write(self, chunk) -> None:
        data = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
        self.written += data.nbytes
        if self.written > self.tensor.nbytes:
            raise WriteError(f"{self.shards[self.k].path}: tensor {self.tensor.name!r}: more than its "
                             f"{self.tensor.nbytes} bytes")
        self.fh.write(data)

    def end(self) -> None:
        t, sp = self.tensor, self.shards[self.k]
        if self.written != t.nbytes:
            raise WriteError(f"{sp.path}: tensor {t.name!r}: {self.written} bytes written, planned {t.nbytes}")
        self.fh.write(b"\0" * (-t.nbytes % sp.alignment))

    def finish(self) -> None:
        self._advance(len(self.shards) - 1)
        self._close()
