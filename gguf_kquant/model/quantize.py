"""Whole-model quantization, byte for byte what ``llama-quantize`` (src/llama-quant.cpp) writes.

>>> import gguf_kquant
>>> result = gguf_kquant.quantize_model("model-f16.gguf", "model-q4_k_m.gguf", "Q4_K_M")   # doctest: +SKIP
>>> result.dst_nbytes < result.src_nbytes                                                  # doctest: +SKIP
True

Streaming: tensors are read with ``pread`` in slabs of rows (at most :data:`SLAB_BYTES` of source data),
converted, and written straight to a temporary file next to the destination, which is renamed into place
only when everything succeeded — peak memory is one slab plus codec scratch, whatever the model's size.
Every check that can fail (unknown mix, requantization, missing/mismatched/non-finite imatrix, an output that
is an input) runs before the first byte is written; non-finite weights are found while streaming and abort
the job, leaving no destination behind.

Several mixes at once — ``quantize_model(src, {"m-Q4_K_M.gguf": "Q4_K_M", "m-Q6_K.gguf": "Q6_K"})`` — read
and convert each tensor once: :mod:`gguf_kquant.model.multi`.

Outputs (see :mod:`gguf_kquant.safeio`): every path that will be written — each output shard (``--keep-split``
and ``--split-max-*`` names included) and the report — is compared with every input (all source shards, the
imatrix) before any work, by inode (symlinks, hard links) and real path; a collision is refused.  An existing
destination is refused unless ``overwrite=True`` (``--overwrite``), the policy ``convert_hf`` follows too.
Model shards and report are written to temp files and renamed into place together at the end; SIGINT,
SIGTERM and SIGHUP remove the temps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..codecs.gptq import for_tensor
from ..codecs.optimized import quantizer
from ..errors import BadTensorDataError, ImatrixError, QuantizeError
from ..safeio import check_outputs
from ..types import GGMLType, TYPES
from .imatrix import Imatrix, load_imatrix
from .planner import ModelInfo, Plan, plan_tensors
from .progress import Progress
from .report import render_report

__all__ = ["quantize_model", "QuantizeResult", "parse_kv_override", "SLAB_BYTES"]

SLAB_BYTES = 16 * 2**20  # source bytes converted at once: bounds peak memory whatever the model size
GGML_QNT_VERSION = 2
DEFAULT_ALIGNMENT = 32


@dataclass
class QuantizeResult:
    plan: Plan
    paths: list
    src_nbytes: int = 0
    dst_nbytes: int = 0
    n_elements: int = 0
    seconds: float = 0.0
    report: list = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return self.dst_nbytes * 8.0 / max(self.n_elements, 1)


def parse_kv_override(spec):
    """``KEY=TYPE:VALUE`` (TYPE: int, float, bool, str) -> (key, Value), typed as llama-quantize stores it:
    int -> UINT32 of |value|, float -> FLOAT32, bool -> BOOL, str -> STRING (<= 127 bytes)."""
    from ..container.values import GGUFValueType as V, Value

    if not isinstance(spec, str):
        key, value = spec
        return key, value
    key, sep, rest = spec.partition("=")
    if not sep or not key or len(key) >= 128:
        raise QuantizeError(f"malformed KV override {spec!r}; expected KEY=TYPE:VALUE")
    kind, sep, text = rest.partition(":")
    if not sep:
        raise QuantizeError(f"invalid type for KV override {spec!r}; expected int:, float:, bool: or str:")
    try:
        if kind == "int":
            return key, Value(abs(int(text)) & 0xFFFFFFFF, V.UINT32)
        if kind == "float":
            return key, Value(float(np.float32(float(text))), V.FLOAT32)
    except ValueError:
        raise QuantizeError(f"KV override {spec!r}: {text!r} is not a valid {kind}") from None
    if kind == "bool":
        if text not in ("true", "false"):
            raise QuantizeError(f"invalid boolean value for KV override {spec!r}")
        return key, Value(text == "true", V.BOOL)
    if kind == "str":
        if len(text.encode()) > 127:
            raise QuantizeError(f"malformed KV override {spec!r}, value cannot exceed 127 chars")
        return key, Value(text, V.STRING)
    raise QuantizeError(f"invalid type for KV override {spec!r}; expected int:, float:, bool: or str:")


def _prepare_imatrix(imatrix, include, exclude) -> Optional[Imatrix]:
    if imatrix is None or imatrix is False:
        if include or exclude:
            raise ImatrixError("include_weights/exclude_weights need an imatrix")
        return None
    if isinstance(imatrix, Imatrix):
        im = imatrix.filtered(include, exclude)
    elif isinstance(imatrix, dict):
        im = Imatrix({k: np.asarray(v, np.float32).reshape(-1) for k, v in imatrix.items()}, path="")
        im = im.filtered(include, exclude)
    else:
        im = load_imatrix(imatrix, include=include, exclude=exclude)
    if not im.entries:  # quantize.cpp: an empty imatrix (after filtering) is no imatrix
        return None
    im.check_finite()
    return im


def quantize_model(src, dst, ftype=None, *, imatrix=None, include_weights: Sequence[str] = (),
                   exclude_weights: Sequence[str] = (), output_tensor_type=None, token_embedding_type=None,
                   tensor_types: Sequence = (), pure: bool = False, leave_output_tensor: bool = False,
                   allow_requantize: bool = False, override_kv: Sequence = (), keep_split: bool = False,
                   split_max_size=None, split_max_tensors: Optional[int] = None, threads: Optional[int] = None,
                   dry_run: bool = False, report=None, overwrite: bool = False, quiet: bool = True,
                   stream=None, method: str = "llama", target_bpw=None, target_size=None,
                   client=None) -> QuantizeResult:
    """Quantize the GGUF model ``src`` to mix ``ftype`` (``"Q4_K_M"``, ...) and write ``dst``.

    Several outputs in one pass: ``dst`` a mapping ``{path: mix}`` and no ``ftype`` (each tensor is read
    once and quantized once per distinct type; see :mod:`gguf_kquant.model.multi`); the result is then
    ``{path: QuantizeResult}`` and ``report`` a mapping ``{path: report path}``.

    Options mean what llama-quantize's flags of the same name mean: ``imatrix`` (path of a GGUF or legacy
    imatrix, an :class:`Imatrix`, or a dict name -> values), ``include_weights``/``exclude_weights``,
    ``output_tensor_type``, ``token_embedding_type``, ``tensor_types`` (``["attn_q=q8_0", ...]``, first match
    wins), ``pure``, ``leave_output_tensor``, ``allow_requantize``, ``override_kv`` (``["KEY=int:5", ...]``),
    ``keep_split`` (one output shard per input shard, ``dst`` is the prefix), ``threads``.
    ``split_max_size`` (bytes, or ``"500M"``/``"2G"``) / ``split_max_tensors`` split the output as
    ``llama-gguf-split --split`` would split llama-quantize's file (shards ``<dst>-0000i-of-0000n.gguf``;
    see :mod:`gguf_kquant.container.writer`).  ``dry_run`` plans
    only; ``report`` (a path) writes per-tensor error statistics as JSON, committed with the model;
    ``quiet=False`` prints progress to ``stream`` (stderr).  ``method="optimized"`` (needs an imatrix) writes
    the same types with block parameters of lower imatrix-weighted error (:mod:`gguf_kquant.codecs.optimized`).
    ``target_bpw`` / ``target_size`` (no ``ftype``; needs an imatrix): each tensor's type chosen for the least
    predicted error within that file size (:mod:`gguf_kquant.model.budget`).

    ``overwrite``: an existing destination (any output shard, the report) is refused unless True —
    the same policy as :func:`gguf_kquant.convert_hf` and the CLI's ``--overwrite``.  Whatever
    ``overwrite`` says, no output may name an input (source shard or imatrix, also through a symlink or hard
    link): :class:`QuantizeError` before any work.  The outputs appear together when everything succeeded,
    else none of them is touched (the limits POSIX sets are in :mod:`gguf_kquant.safeio`).

    ``client`` (a ``distributed.Client`` or a scheduler address): the work runs on a Dask cluster's workers,
    which share the source's and destination's file system; the bytes are the same
    (:mod:`gguf_kquant.model.distributed`).

    >>> quantize_model("m-f16.gguf", "m-q4.gguf", "Q4_K_M", report="m-q4.json", overwrite=True)  # doctest: +SKIP
    """
    if target_bpw is not None or target_size is not None:  # size-budget mode: gguf_kquant.model.budget
        args = {k: v for k, v in locals().items() if k not in ("src", "dst", "ftype", "target_bpw", "target_size")}
        from .budget import quantize_to_budget

        return quantize_to_budget(src, dst, ftype, target_bpw=target_bpw, target_size=target_size, **args)
    if client is not None and not dry_run and not isinstance(dst, Mapping):  # on a Dask cluster's workers
        from .distributed import quantize_on_cluster

        return quantize_on_cluster(
            client, src, dst, ftype, imatrix=imatrix, include_weights=include_weights,
            exclude_weights=exclude_weights, output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type, tensor_types=tensor_types, pure=pure,
            leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize, override_kv=override_kv,
            keep_split=keep_split, split_max_size=split_max_size, split_max_tensors=split_max_tensors,
            threads=threads, report=report, overwrite=overwrite, quiet=quiet, stream=stream, method=method)
    if isinstance(dst, Mapping):  # several outputs in one pass: gguf_kquant.model.multi
        if ftype is not None:
            raise QuantizeError("several outputs: give each output's mix in the mapping {path: mix}, not ftype")
        from .multi import quantize_outputs

        return quantize_outputs(
            src, dst, imatrix=imatrix, include_weights=include_weights, exclude_weights=exclude_weights,
            output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
            tensor_types=tensor_types, pure=pure, leave_output_tensor=leave_output_tensor,
            allow_requantize=allow_requantize, override_kv=override_kv, keep_split=keep_split,
            split_max_size=split_max_size, split_max_tensors=split_max_tensors, threads=threads,
            dry_run=dry_run, report=report, overwrite=overwrite, quiet=quiet, stream=stream,
            method=method, client=None if dry_run else client)
    if ftype is None:
        raise QuantizeError("no quantization mix given (ftype)")
    from ..container.reader import open_gguf
    from .planner import parse_mix

    t0 = time.perf_counter()
    mix, file_type, _default = parse_mix(ftype)
    max_bytes = _split_limits(keep_split, split_max_size, split_max_tensors)
    im = _prepare_imatrix(imatrix, tuple(include_weights or ()), tuple(exclude_weights or ()))
    quantize_tensor = quantizer(method, im is not None, getattr(im, "hessians", None))
    overrides = _overrides(override_kv, im)

    rules = dict(pure=pure, leave_output_tensor=leave_output_tensor, output_tensor_type=output_tensor_type,
                 token_embedding_type=token_embedding_type, tensor_types=tensor_types, keep_order=keep_split)
    with open_gguf(src) as f:
        plan, by_name, progress, result = _planned(f, mix, im, overrides, rules, allow_requantize, dry_run, quiet,
                                                   stream)
        if dry_run:
            _say_dry_run(progress, plan, im)
            result.seconds = time.perf_counter() - t0
            return result

        metadata, alignment = _output_metadata(f, plan.file_type, overrides)
        from ..precompile import warm_for_plan

        warm_for_plan(plan, im, report is not None, method)  # compile missing kernels in parallel processes
        stats = [] if report is not None else None
        conv = _Converter(by_name, im, threads, progress, stats, quantize_tensor)
        side = [] if report is None else [(report, lambda: render_report(stats, plan, result))]
        inputs = _input_paths(f, imatrix)
        paths = _write(f, dst, plan, metadata, conv, alignment, keep_split, max_bytes, split_max_tensors,
                       inputs, overwrite, side)
        result.paths = paths
        result.seconds = time.perf_counter() - t0
        progress.summary(plan.src_nbytes, plan.dst_nbytes, plan.n_elements, plan.n_fallback)
        if stats is not None:
            result.report = stats
    return result


def _planned(f, mix, im, overrides, rules: dict, allow_requantize: bool, dry_run: bool, quiet: bool, stream):
    """Plan the open source ``f`` for ``mix`` as llama-quantize would (``rules``: _plan's options), say its
    warnings, refuse what llama-quantize refuses; returns (plan, tensors by name, progress, the result to fill)."""
    plan = _plan(f, _source_model(f, overrides), mix, im, **rules)
    by_name = {t.name: t for t in f.tensors}
    progress = Progress(len(plan.rows), quiet=quiet, stream=stream, total_bytes=plan.src_nbytes)
    for w in plan.warnings:
        progress.say(w)
    _check_plan(plan, im, by_name, allow_requantize, dry_run)
    result = QuantizeResult(plan=plan, paths=[], src_nbytes=plan.src_nbytes, dst_nbytes=plan.dst_nbytes,
                            n_elements=plan.n_elements)
    return plan, by_name, progress, result


def _split_limits(keep_split: bool, split_max_size, split_max_tensors):
    """``split_max_size`` in bytes (None: no size limit), after refusing contradictory split options."""
    from ..container.writer import parse_size

    max_bytes = parse_size(split_max_size) if split_max_size is not None else None
    if split_max_tensors is not None and (not isinstance(split_max_tensors, (int, np.integer))
                                          or isinstance(split_max_tensors, bool) or split_max_tensors < 1):
        raise QuantizeError(f"split_max_tensors must be a positive integer, got {split_max_tensors!r}")
    if keep_split and (max_bytes or split_max_tensors):
        raise QuantizeError("keep_split cannot be combined with split_max_size/split_max_tensors")
    if max_bytes and split_max_tensors:
        raise QuantizeError("give either split_max_size or split_max_tensors, not both")
    return max_bytes


def _overrides(override_kv, im: Optional[Imatrix]) -> list:
    overrides = [parse_kv_override(s) for s in override_kv or ()]
    if im is not None:
        overrides += im.kv()
    return overrides


def _source_model(f, overrides) -> ModelInfo:
    """Refuse sources llama-quantize cannot read; the hyper-parameters the rules use."""
    for t in f.tensors:
        if not t.is_known_type:
            raise QuantizeError(f"{t.path}: tensor {t.name!r} has unknown ggml type id {t.ggml_type}")
        if t.byte_order != "<":
            raise QuantizeError(f"{t.path}: big-endian models cannot be quantized")
    # the loader sees the overrides too (they can change hyper-parameters the rules read)
    view = dict(f.metadata.items())
    for k, v in overrides:
        view[k] = v.value
    return ModelInfo.from_metadata(view)


def _plan(f, model: ModelInfo, mix: str, im: Optional[Imatrix], **rules) -> Plan:
    """The mix's plan of the source's tensors (``keep_order``: --keep-split keeps each shard's tensor order,
    and the rules' counters follow it)."""
    return plan_tensors([(t.name, t.shape, t.ggml_type) for t in f.tensors], model, mix,
                        imatrix=im is not None, **rules)


def _say_dry_run(progress: Progress, plan: Plan, im: Optional[Imatrix]) -> None:
    progress.say(plan.format())
    if im is None and any(r.allows_quantization and r.requires_imatrix for r in plan.rows):
        progress.say("WARNING: dry run completed successfully, but actually completing this "
                     "quantization will require an imatrix!")


def _output_metadata(f, file_type: int, overrides) -> tuple:
    """(metadata, alignment) of the output: the source's keys with llama-quantize's changes."""
    from ..container.values import GGUFValueType as V, Metadata, Value

    metadata = Metadata()
    for k in f.metadata:
        metadata.set_typed(k, f.metadata.typed(k), None)

    def put(key, value):
        if key in metadata:
            del metadata[key]
        metadata.set_typed(key, value, None)

    put("general.quantization_version", Value(GGML_QNT_VERSION, V.UINT32))
    put("general.file_type", Value(int(file_type), V.UINT32))
    for k in ("split.no", "split.count", "split.tensors.count"):
        if k in metadata:
            del metadata[k]
    for k, v in overrides:
        put(k, v)
    # llama-quantize pads with 32 whatever general.alignment says (and so writes a broken file when it
    # is not 32); we keep the source's alignment
    return metadata, int(f.metadata.get("general.alignment", DEFAULT_ALIGNMENT))


def _input_paths(f, imatrix) -> list:
    """Every file the job reads: the source's shards and the imatrix (no output may be one of them)."""
    im_path = imatrix if isinstance(imatrix, (str, os.PathLike)) else getattr(imatrix, "path", None)
    return list(f.shards) + [im_path]


def _write(f, dst, plan: Plan, metadata, conv, alignment: int, keep_split: bool, max_bytes, max_tensors,
           inputs: list, overwrite: bool, side: list) -> list:
    """Plan every output path, refuse collisions with the inputs, then stream all files and commit them."""
    from ..container.writer import GGUFWriter, write_shards

    def specs(rows):
        return [(r.name, r.shape, r.dst_type, (lambda r=r: conv.stream(r))) for r in rows]

    if max_bytes or max_tensors:  # the writer cuts shards as llama-gguf-split would
        w = GGUFWriter(dst, metadata, alignment=alignment, split_max_size=max_bytes, split_max_tensors=max_tensors,
                       inputs=inputs, overwrite=overwrite, side_files=side)
        w.add_tensors(specs(plan.rows))
        check_outputs(w.output_paths(), inputs, overwrite=overwrite, error=QuantizeError)
        return w.close()
    files = _files(f, dst, plan, metadata, keep_split)
    check_outputs([p for p, _m, _r in files] + [Path(p) for p, _ in side], inputs, overwrite=overwrite,
                  error=QuantizeError)
    return write_shards([(p, m, specs(rows)) for p, m, rows in files],
                        alignment=alignment, inputs=inputs, overwrite=overwrite, side_files=side)


def _files(f, dst, plan: Plan, metadata, keep_split: bool) -> list:
    """[(path, metadata, rows)] of an output that is not cut by size or count: one file, or with
    ``keep_split`` one shard per source shard."""
    from ..container.split import shard_path

    shards, shard_meta, paths = [plan.rows], [metadata], [Path(dst)]
    if keep_split:  # metadata carries the split keys llama-quantize --keep-split writes, and its shard names
        if len(f.shards) > 1:
            shard_of = {t.name: f.shards.index(t.path) if t.path in f.shards else 0 for t in f.tensors}
            shards = [[r for r in plan.rows if shard_of[r.name] == i] for i in range(len(f.shards))]
            shard_meta = _split_metadata(metadata, len(shards), len(plan.rows))
        prefix = os.fspath(dst)
        prefix = prefix[:-5] if prefix.endswith(".gguf") else prefix
        paths = [shard_path(prefix, i, len(shards)) for i in range(len(shards))]  # even for one shard
    return list(zip(paths, shard_meta, shards))


def _split_metadata(metadata, n_split: int, n_tensors: int) -> list:
    """llama-quantize --keep-split: shard 0 keeps all metadata, the others none; each gets split.no,
    split.count, split.tensors.count (in that order)."""
    from ..container.values import GGUFValueType as V, Metadata, Value

    out = []
    for i in range(n_split):
        m = metadata.copy() if i == 0 else Metadata()
        keys = [("split.no", Value(i, V.UINT16)), ("split.count", Value(n_split, V.UINT16)),
                ("split.tensors.count", Value(n_tensors, V.INT32))]
        if n_split > 1:
            for key, val in keys:
                if key in m:
                    del m[key]
                m.set_typed(key, val, None)
        out.append(m)
    return out


def _check_plan(plan: Plan, im: Optional[Imatrix], by_name, allow_requantize: bool, dry_run: bool) -> None:
    """Every refusal llama-quantize would make, before anything is written."""
    for r in plan.rows:
        if r.allows_quantization and r.requires_imatrix and im is None and not dry_run:
            raise ImatrixError(f"this quantization ({plan.mix}) requires an importance matrix: tensor {r.name} "
                               f"is to become {r.dst_type.name}; give an imatrix")
    if dry_run:
        return
    for r in plan.rows:
        if not r.convert:
            continue
        src_info = TYPES[r.src_type]
        if src_info.is_quantized and not allow_requantize:
            raise QuantizeError(f"tensor {r.name} is already quantized ({r.src_type.name}); requantizing is "
                                f"disabled without allow_requantize")
        if not src_info.has_kernel("dequantize"):
            raise QuantizeError(f"cannot dequantize/convert tensor {r.name} of type {r.src_type.name}")
        w = _imatrix_for(r, im)
        if w is None and r.requires_imatrix:
            raise ImatrixError(f"missing importance matrix for tensor {r.name} in a very low-bit quantization "
                               f"({r.dst_type.name})")


def _imatrix_for(r, im: Optional[Imatrix]):
    """The row r's imatrix values (n_expert * n_per_row), None if absent; raises on a size mismatch."""
    if im is None:
        return None
    w = im.entries.get(r.name)
    if w is None:
        return None
    ne = r.shape[::-1]
    n_mat = ne[2] if len(ne) > 2 else 1
    if w.size != ne[0] * n_mat:
        if r.name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return None  # llama-quantize ignores a mismatched token_embd entry
        raise ImatrixError(f"imatrix size {w.size} is different from tensor size {ne[0] * n_mat} for {r.name} "
                           f"({n_mat} matrices of rows of {ne[0]})")
    return w


class _Converter:
    """Produces each tensor's output bytes, slab by slab."""

    def __init__(self, by_name, im, threads, progress: Progress, stats, quantize_tensor=None):
        self.quantize_tensor = quantize_tensor  # None: ggml's own (gguf_kquant.codecs.quantize)
        self.by_name = by_name
        self.im = im
        self.threads = threads
        self.progress = progress
        self.stats = stats

    def stream(self, row, rows=None):
        """Yield the bytes of tensor ``row`` (a PlanRow) in llama-quantize's output type; ``rows=(begin,
        end)``: only those rows (dask: a task's share of a large tensor, gguf_kquant.model.distributed)."""
        t = self.by_name[row.name]
        start = time.perf_counter()
        fd = os.open(t.path, os.O_RDONLY)
        try:
            if not row.convert:
                yield from self._copy(fd, t, row, rows)
            else:
                yield from self._convert(fd, t, row, rows)
        finally:
            os.close(fd)
        ne = row.shape[::-1]
        if row.convert and self.im is not None and row.name not in self.im.entries:
            self.progress.say(f"====== did not find weights for {row.name}")
        self.progress.tensor(row.name, ne, row.src_type.name, row.dst_type.name, row.src_nbytes,
                             row.dst_nbytes, time.perf_counter() - start)

    @staticmethod
    def _read(fd, offset, n, t) -> np.ndarray:
        buf = np.empty(n, np.uint8)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                from ..errors import TruncatedFileError

                raise TruncatedFileError(f"{t.path}: offset {offset + got}: file ends inside tensor {t.name!r}")
            got += k
        return buf

    def _copy(self, fd, t, row, rows=None):
        info = TYPES[row.src_type]
        n_per_row = row.shape[-1]
        row_bytes = info.row_bytes(n_per_row) if n_per_row else 0
        n_rows = row.n_elements // n_per_row if n_per_row else 0
        begin, n_rows = rows or (0, n_rows)  # dask: a row range
        step = max(1, SLAB_BYTES // max(row_bytes, 1))
        for r0 in range(begin, n_rows, step):
            k = min(step, n_rows - r0)
            raw = self._read(fd, t.offset + r0 * row_bytes, k * row_bytes, t)
            if info.ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
                _check_finite(row.name, _to_f32(raw, info.ggml_type, k, n_per_row), r0)
            yield raw

    def _convert(self, fd, t, row, rows=None):
        from ..codecs import quantize

        base = self.quantize_tensor or quantize
        src = TYPES[row.src_type]
        ne = row.shape[::-1]
        n_per_row = ne[0]
        rows_per_mat = ne[1] if len(ne) > 1 else 1
        n_rows = row.n_elements // n_per_row if n_per_row else 0
        src_row = src.row_bytes(n_per_row)
        weights = _imatrix_for(row, self.im)
        per_row_cost = src_row + 4 * n_per_row + TYPES[row.dst_type].row_bytes(n_per_row)
        step = max(1, SLAB_BYTES // per_row_cost)
        r0, n_rows = rows or (0, n_rows)  # dask: a row range
        acc = _Stats(row) if self.stats is not None else None
        while r0 < n_rows:
            mat = r0 // rows_per_mat
            k = min(step, n_rows - r0, (mat + 1) * rows_per_mat - r0)  # never cross an expert boundary
            raw = self._read(fd, t.offset + r0 * src_row, k * src_row, t)
            x = _to_f32(raw, row.src_type, k, n_per_row)
            w = None if weights is None else weights[mat * n_per_row:(mat + 1) * n_per_row]
            q = for_tensor(base, row.name, mat)  # error feedback: this (expert's) H
            try:
                out = q(x, row.dst_type, imatrix=w, threads=self.threads)
            except BadTensorDataError as exc:
                _check_finite(row.name, x, r0)
                raise BadTensorDataError(f"tensor {row.name}, rows {r0}..{r0 + k - 1}: {exc}") from None
            if acc is not None:
                acc.add(x, out, row.dst_type)
            yield out
            r0 += k
        if acc is not None:
            self.stats.append(acc.result())


def _to_f32(raw: np.ndarray, ggml_type, n_rows: int, n_per_row: int) -> np.ndarray:
    if ggml_type == GGMLType.F32:
        return raw.view("<f4").reshape(n_rows, n_per_row)
    if ggml_type == GGMLType.F16:
        return raw.view("<f2").astype(np.float32).reshape(n_rows, n_per_row)
    if ggml_type == GGMLType.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(n_rows, n_per_row)
    from ..codecs import dequantize

    return dequantize(raw, ggml_type, (n_rows, n_per_row))


def _check_finite(name: str, x: np.ndarray, row0: int = 0, row_numbers: Optional[np.ndarray] = None) -> None:
    """Refuse non-finite values, naming the tensor, row and column; x's rows are rows ``row0`` on of the tensor,
    or the rows ``row_numbers`` (a sample)."""
    bad = ~np.isfinite(x)
    if bad.any():
        r = int(np.argmax(bad.any(axis=1)))
        c = int(np.argmax(bad[r]))
        row = int(row_numbers[r]) if row_numbers is not None else row0 + r
        raise BadTensorDataError(f"tensor {name} has invalid data: {float(x[r, c])!r} at row {row}, column {c}")


class _Stats:
    """Running RMSE / max abs error / cosine similarity of one tensor against its source."""

    def __init__(self, row):
        self.row = row
        self.sq = 0.0
        self.maxabs = 0.0
        self.dot = 0.0
        self.nx = 0.0
        self.ny = 0.0
        self.n = 0

    def add(self, x, out, qtype):
        from ..codecs import dequantize

        y = dequantize(out, qtype, x.shape)
        d = (y.astype(np.float64) - x)
        # numpy's pairwise sums, not BLAS dot products: a BLAS splits the sum by its thread count, so the
        # report's last digits would depend on the process (and differ between two runs of one job)
        self.sq += float(np.sum(d * d))
        self.maxabs = max(self.maxabs, float(np.abs(d).max()) if d.size else 0.0)
        xf, yf = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        self.dot += float(np.sum(xf * yf))
        self.nx += float(np.sum(xf * xf))
        self.ny += float(np.sum(yf * yf))
        self.n += x.size

    def result(self) -> dict:
        denom = (self.nx * self.ny) ** 0.5
        return {"name": self.row.name, "shape": list(self.row.shape), "src_type": self.row.src_type.name,
                "type": self.row.dst_type.name, "rmse": (self.sq / max(self.n, 1)) ** 0.5,
                "max_abs_error": self.maxabs, "cosine": self.dot / denom if denom else 1.0}
