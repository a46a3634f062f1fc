"""Convert a Hugging Face checkpoint (config.json + tokenizer + safetensors) to GGUF, quantizing on the fly.

>>> import gguf_kquant
>>> gguf_kquant.convert_hf("models/tiny-llama", "tiny-llama-f16.gguf")            # doctest: +SKIP
[PosixPath('tiny-llama-f16.gguf')]
>>> gguf_kquant.convert_hf("models/tiny-llama", "tiny-q4km.gguf", "Q4_K_M")      # doctest: +SKIP

Outputs match llama.cpp's ``convert_hf_to_gguf.py`` (F32/F16/BF16/Q8_0: same tensors, types, bytes and
metadata); k-quant mixes (``Q4_K_M``...) give what ``convert_hf_to_gguf.py --outtype f16`` followed by
``llama-quantize`` gives, without the intermediate file.  Tensors are read through ``mmap`` and written one
at a time, so memory stays around one tensor.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

import gguf

from ..errors import BadTensorDataError, ConversionError
from ..safeio import check_outputs
from ..types import GGMLType
from .base import (FLOAT_FTYPES, REGISTRY, Converter, PlannedTensor, count_parameters, load_config, load_model_card,
                   load_source, size_label, widen_bf16)
from .safetensors import open_checkpoint
from . import archs as _archs  # noqa: F401  (fills REGISTRY)

__all__ = ["convert_hf", "convert_lora", "supported_architectures", "REGISTRY", "Converter"]


def supported_architectures() -> list:
    return sorted(REGISTRY)


def _hparams_defaults(arch: str, h: dict) -> dict:
    # What transformers' AutoConfig (which convert_hf_to_gguf.py reads) fills in for absent keys.
    h = dict(h)
    if arch in ("LlamaForCausalLM", "MistralForCausalLM") and "hidden_size" in h and "num_attention_heads" in h:
        h.setdefault("num_key_value_heads", h["num_attention_heads"])
        if h.get("head_dim") is None:
            h["head_dim"] = h["hidden_size"] // h["num_attention_heads"]
    if arch == "Qwen3ForCausalLM":
        h.setdefault("head_dim", 128)
    return h


def _kv_from_gguf_writer(w: gguf.GGUFWriter) -> list:
    """gguf-py's typed key/values -> our (key, Value) pairs, keeping gguf-py's types and order."""
    from ..container.values import GGUFValueType as V, Value

    def elem_type(items):
        x = items[0] if items else ""
        if isinstance(x, bool):
            return V.BOOL
        if isinstance(x, (int, np.integer)):
            return V.INT32
        if isinstance(x, (float, np.floating)):
            return V.FLOAT32
        return V.STRING

    out = []
    for key, gv in w.kv_data[0].items():
        t = V(int(gv.type))
        val = gv.value
        if t == V.ARRAY:
            items = list(val)
            sub = V(int(gv.sub_type)) if gv.sub_type is not None else elem_type(items)
            if sub == V.STRING:
                items = [s.decode("utf-8") if isinstance(s, (bytes, bytearray)) else s for s in items]
            out.append((key, Value(items, V.ARRAY, sub)))
        else:
            if isinstance(val, (bytes, bytearray)):
                val = val.decode("utf-8")
            out.append((key, Value(val, t)))
    return out


def _inputs(model_dir: Path, ckpt, imatrix) -> list:
    """What a conversion reads, which no output may name: every file of the model folder except GGUF files
    (config, tokenizer, index, model card, weights...), the safetensors shards, the imatrix."""
    files = [p for p in model_dir.iterdir() if not p.name.endswith(".gguf") and p.is_file()]
    return files + [f.path for f in ckpt.files] + [imatrix if isinstance(imatrix, (str, os.PathLike)) else None]


def convert_hf(model_dir, dst, ftype: str = "F16", *, imatrix=None, split_max_size=None, overwrite: bool = False,
               quiet: bool = True, model_name: Optional[str] = None, pre_tokenizer: Optional[str] = None,
               progress=None, vocab_only: bool = False, client=None, method: str = "llama",
               **options) -> list:
    """Convert the Hugging Face model in ``model_dir`` to ``dst``; returns the paths written.

    ``ftype``: ``F32``, ``F16`` (default), ``BF16``, ``Q8_0`` (what convert_hf_to_gguf.py offers) or a
    llama-quantize mix such as ``Q4_K_M`` (planned by :mod:`gguf_kquant.model.planner`; tensors go through
    F16 first, exactly as convert-then-quantize would).  ``imatrix``: path of an importance matrix (for the
    k-quant mixes).  ``split_max_size``: gguf-split output (``"2G"``).  ``overwrite``: replace ``dst`` (or
    its shards) if it exists — without it an existing destination is refused, the policy ``quantize_model``
    follows too.  No output may name an input (see :func:`_inputs`; symlinks and hard links included),
    whatever ``overwrite`` says; all shards are committed together (:mod:`gguf_kquant.safeio`).
    ``pre_tokenizer``: force ``tokenizer.ggml.pre`` when llama.cpp's hash table does not know the tokenizer.
    ``options`` go to the quantization planner (``pure``, ``output_tensor_type``, ...); other names raise
    TypeError.  ``vocab_only``: write the metadata and vocabulary alone, no tensors (``--vocab-only``).
    ``client`` (a ``distributed.Client`` or a scheduler address): every tensor is made and written by a Dask
    cluster's worker sharing the file system; the same bytes (:mod:`gguf_kquant.model.distributed`).

    >>> convert_hf("tiny-llama/", "tiny.gguf", "Q8_0", overwrite=True)        # doctest: +SKIP
    """
    t0 = time.perf_counter()
    _check_options(options)
    model_dir, dst = Path(model_dir), Path(dst)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a directory")
    if split_max_size is None:  # fail fast; the shard names of a split output are known after planning
        check_outputs([dst], overwrite=overwrite, error=ConversionError)
    conv, ckpt = _open_converter(model_dir, pre_tokenizer, vocab_only)
    ftype_name = str(ftype).upper()
    file_type, planned, quant_plan = _plan_output(conv, ftype_name, options, imatrix=imatrix,
                                                  split_max_size=split_max_size)
    im, quantize_tensor = _quantize_function(ftype_name, quant_plan, imatrix, method)
    metadata = _file_metadata(conv, planned, file_type, model_name, quant_plan, im)
    if progress is None:
        progress = _default_progress(planned, quiet)
    inputs = _inputs(model_dir, ckpt, imatrix)
    if client is not None and planned:  # dask (issue 12): each tensor made and written by a cluster's worker
        from ..model.distributed import convert_on_cluster

        producer = functools.partial(_producer, quantize_tensor=quantize_tensor)  # method= on the workers too
        return convert_on_cluster(client, dst, metadata, planned, im, producer, checkpoint_files=ckpt.files,
                                  inputs=inputs, split_max_size=split_max_size, overwrite=overwrite,
                                  progress=progress)
    from ..container.writer import GGUFWriter

    w = GGUFWriter(dst, metadata, split_max_size=split_max_size, inputs=inputs, overwrite=overwrite)
    for p in planned:
        w.add_tensor(p.name, _producer(p, im, progress, quantize_tensor), shape=p.shape, ggml_type=p.qtype.name)
    check_outputs(w.output_paths(), inputs, overwrite=overwrite, error=ConversionError)  # before any tensor
    paths = w.close()
    if progress is not None and hasattr(progress, "say"):
        progress.say(f"converted {len(planned)} tensors to {', '.join(map(str, paths))} "
                     f"in {time.perf_counter() - t0:.1f} s")
    return paths


def _open_converter(model_dir: Path, pre_tokenizer, vocab_only: bool) -> tuple:
    """(the architecture's Converter, the checkpoint) of ``model_dir``; an unknown architecture is refused."""
    cfg = load_config(model_dir)
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch not in REGISTRY:
        raise ConversionError(f"{model_dir / 'config.json'}: unsupported architecture {hf_arch!r}; supported: "
                              f"{', '.join(supported_architectures())}")
    ckpt = open_checkpoint(model_dir)
    conv: Converter = REGISTRY[hf_arch](model_dir, _hparams_defaults(hf_arch, cfg), ckpt)
    conv.options = {"pre_tokenizer": pre_tokenizer}
    conv.pre_tokenizer = None
    conv.vocab_only = vocab_only
    return conv, ckpt


def _plan_output(conv: Converter, ftype_name: str, options: dict, *, imatrix, split_max_size) -> tuple:
    """(file type, the tensors to write in their order, the quantization plan or None) for ``ftype_name``: a
    float type (convert_hf_to_gguf.py's) or a mix planned from the F16 conversion, as llama-quantize would."""
    if ftype_name in FLOAT_FTYPES and (given := [k for k, v in options.items() if v not in (None, False, ())]):
        raise ConversionError(f"{', '.join(given)}: quantization options; {ftype_name} is not a quantization mix")
    if conv.vocab_only:  # convert_hf_to_gguf.py's write_vocab: header and metadata, no tensors
        if ftype_name not in FLOAT_FTYPES or imatrix is not None or split_max_size is not None:
            raise ConversionError(f"a vocabulary-only file has no tensors: type {ftype_name} (use F32, F16, BF16 "
                                  f"or Q8_0), an imatrix or a split size do not apply")
        return FLOAT_FTYPES[ftype_name][0], [], None
    if ftype_name in FLOAT_FTYPES:
        file_type, out_type = FLOAT_FTYPES[ftype_name]
        return file_type, _plan(conv, out_type), None
    from ..model.planner import ModelInfo, plan_tensors

    planned = _plan(conv, GGMLType.F16)  # the F16 conversion llama-quantize would start from
    h = conv.hparams
    info = ModelInfo(arch=conv.arch_name, n_layer=conv.block_count, n_head=h.get("num_attention_heads", 0),
                     n_head_kv=h.get("num_key_value_heads", h.get("num_attention_heads", 0)),
                     n_expert=conv.n_expert())
    quant_plan = plan_tensors([(p.name, p.shape, p.qtype) for p in planned], info, ftype_name,
                              imatrix=imatrix is not None, **options)
    by_name = {r.name: r for r in quant_plan.rows}
    for p in planned:
        p.src_type = p.qtype
        p.qtype = by_name[p.name].dst_type
        p.shape = by_name[p.name].shape  # as llama-quantize records it: (1, n) becomes (n,)
    order = {r.name: i for i, r in enumerate(quant_plan.rows)}  # llama-quantize writes in its own order
    planned.sort(key=lambda p: order[p.name])
    return quant_plan.file_type, planned, quant_plan


def _quantize_function(ftype_name: str, quant_plan, imatrix, method: str) -> tuple:
    """(the prepared imatrix or None, the quantize function of ``method``), checked before any work: an imatrix
    and a method other than llama apply to the mixes only, and a type that needs an imatrix gets one."""
    im = None
    if imatrix is not None:
        if quant_plan is None:
            raise ConversionError("an imatrix only applies to the quantization mixes (Q4_K_M, ...), not "
                                  f"{ftype_name}")
        from ..model.quantize import _prepare_imatrix

        im = _prepare_imatrix(imatrix, (), ())
    if method != "llama" and quant_plan is None:  # issue 13 (optimized): method= as quantize_model's
        raise ConversionError(f"method {method!r} applies to the quantization mixes, not {ftype_name}")
    from ..codecs.optimized import quantizer

    quantize_tensor = quantizer(method, im is not None, getattr(im, "hessians", None))
    if quant_plan is not None:
        from ..errors import ImatrixError

        for r in quant_plan.rows:
            if r.allows_quantization and r.requires_imatrix and im is None:
                raise ImatrixError(f"tensor {r.name} is to become {r.dst_type.name}, which needs an importance "
                                   f"matrix; give an imatrix")
    return im, quantize_tensor


def _file_metadata(conv: Converter, planned: list, file_type, model_name, quant_plan, im) -> list:
    """The output's key/values: the converter's, in the order llama-quantize leaves them for a mix, then the
    imatrix's."""
    metadata = _metadata(conv, planned, file_type, model_name)
    if quant_plan is not None:  # llama-quantize sets these two again, which moves them to the end
        moved = ("general.quantization_version", "general.file_type")
        metadata = ([kv for kv in metadata if kv[0] not in moved]
                    + sorted((kv for kv in metadata if kv[0] in moved), key=lambda kv: moved.index(kv[0])))
    if im is not None:
        metadata += im.kv()
    return metadata


def _default_progress(planned: list, quiet: bool):
    try:
        from ..model.progress import Progress
    except ImportError:  # pragma: no cover
        return None
    return Progress(len(planned), quiet=quiet, total_bytes=sum(p.source.nbytes for p in planned
                                                               if p.source is not None))


def _check_options(options: dict) -> None:
    """Refuse keyword arguments that are not the planner's (a misspelt option would be silently ignored)."""
    import inspect

    from ..model.planner import plan_tensors

    known = {n for n, p in inspect.signature(plan_tensors).parameters.items() if p.kind == p.KEYWORD_ONLY}
    for name in options:
        if name not in known - {"imatrix"}:
            raise TypeError(f"convert_hf() got an unexpected keyword argument {name!r}")


def _plan(conv: Converter, out_type: GGMLType) -> list:
    planned = conv.plan(out_type)
    extra = [PlannedTensor(name, arr.shape, None, (lambda _x, a=arr: a), GGMLType.F32)
             for name, arr in conv.extra_tensors()]
    for p in planned:
        if p.qtype == GGMLType.Q8_0 and p.shape[-1] % 32:
            p.qtype = GGMLType.F16  # convert_hf_to_gguf.py falls back to F16 when Q8_0 does not fit
    return extra + planned


def _metadata(conv: Converter, planned: list, file_type, model_name) -> list:
    """Every key, typed and ordered as convert_hf_to_gguf.py writes them."""
    w = gguf.GGUFWriter(path=None, arch=conv.arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    total = count_parameters(planned)
    meta = load_model_card(conv.dir, model_name, total)
    if meta.name is None:
        meta.name = conv.dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = size_label(planned)
    meta.set_gguf_meta_model(w)
    conv.file_type = int(file_type)
    conv.set_parameters(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    conv.set_vocab(w)
    return _kv_from_gguf_writer(w)


def _producer(p: PlannedTensor, im, progress, quantize_tensor=None):  # issue 13: quantize_tensor (method=)
    """A callable for the writer: yields tensor ``p``'s output bytes, in row slabs when it is quantized.

    A tensor without a transform is read from the mapped checkpoint slab by slab (peak: one slab); one with
    a whole-tensor transform (q/k permutation, norm shift, ...) is transformed once, then F16 rounding (the
    F16 file llama-quantize would read) and quantization go slab by slab (peak: one float32 copy).
    """

    def make():
        from ..model.quantize import SLAB_BYTES, _check_finite

        if getattr(p.source, "ggml_type", None) is not None:  # gpt-oss: MXFP4 experts, ggml blocks copied as is
            yield from p.source.ggml_blocks(p.qtype)
            if progress is not None:
                n = p.source.nbytes
                progress.tensor(p.name, p.shape[::-1], p.source.dtype, p.qtype.name, n, n, 0.0)
            return
        t0 = time.perf_counter()
        widen = False
        if p.make is None:  # stored elements (BF16 as uint16 bits), widened per slab
            y = p.source.array()
            widen = p.source.dtype == "BF16"
        else:
            x = load_source(p.source) if p.source is not None else None
            y = p.make(x)
            del x
        rows = y.reshape(-1, y.shape[-1]) if y.ndim else y.reshape(1, 1)
        src_type = getattr(p, "src_type", None)
        weights = None
        if im is not None and p.qtype not in (GGMLType.F32, GGMLType.F16):
            from ..model.quantize import _imatrix_for

            weights = _imatrix_for(_Row(p), im)
        step = max(1, SLAB_BYTES // max(4 * rows.shape[1], 1))
        # expert tensors hold one matrix per expert, each with its own imatrix: a slab stays inside one
        rows_per_mat = y.shape[-2] if y.ndim > 2 else max(rows.shape[0], 1)
        n_out = 0
        r0 = 0
        while r0 < rows.shape[0]:
            mat = r0 // rows_per_mat
            k = min(step, (mat + 1) * rows_per_mat - r0)
            slab = widen_bf16(rows[r0:r0 + k]) if widen else rows[r0:r0 + k]
            _check_finite(p.name, slab, r0)  # NaN/Inf weights: refuse, naming tensor, row and column
            if src_type == GGMLType.F16 or p.qtype == GGMLType.F16:
                slab = _to_f16(p.name, slab, r0)
            if p.qtype == GGMLType.F32:
                out = np.ascontiguousarray(slab, dtype=np.float32)
            elif p.qtype == GGMLType.F16:
                out = np.ascontiguousarray(slab)
            else:
                from .. import quantize
                from ..codecs.gptq import for_tensor

                w = None if weights is None else weights[mat * rows.shape[1]:(mat + 1) * rows.shape[1]]
                q = for_tensor(quantize_tensor or quantize, p.name, mat)
                out = q(slab, p.qtype.name, imatrix=w)
            n_out += out.nbytes
            r0 += k
            yield out
        del y, rows
        if p.source is not None:
            p.source.release()
        if progress is not None:
            src = p.source.dtype if p.source is not None else "F32"
            progress.tensor(p.name, p.shape[::-1], src, p.qtype.name, p.source.nbytes if p.source else n_out,
                            n_out, time.perf_counter() - t0)

    return make


def _to_f16(name: str, slab: np.ndarray, r0: int) -> np.ndarray:
    """``slab`` (rows from ``r0`` of tensor ``name``) in F16; a finite value beyond F16's range is refused, where
    it is, rather than stored as inf."""
    with np.errstate(over="ignore"):
        half = slab.astype(np.float16)
    if not np.isfinite(half).all():
        r, c = np.argwhere(~np.isfinite(half))[0]
        raise BadTensorDataError(f"tensor {name}: value {float(slab[r, c])!r} at row {r0 + r}, column {c} "
                                 f"overflows F16")
    return half


class _Row:  # what _imatrix_for needs of a plan row
    def __init__(self, p):
        self.name, self.shape = p.name, p.shape


def __getattr__(name):
    if name == "convert_lora":  # lazily: lora imports this module's helpers
        from .lora import convert_lora

        return convert_lora
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
