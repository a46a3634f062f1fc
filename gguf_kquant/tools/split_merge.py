"""Split a GGUF model into shards and merge shards back, byte for byte as ``llama-gguf-split`` does.

>>> from gguf_kquant.tools import split, merge
>>> split("model.gguf", "out/model", max_tensors=128)                          # doctest: +SKIP
[PosixPath('out/model-00001-of-00003.gguf'), PosixPath('out/model-00002-of-00003.gguf'), ...]
>>> merge("out/model-00001-of-00003.gguf", "model-merged.gguf")             # doctest: +SKIP
PosixPath('model-merged.gguf')

Both stream tensor data from the memory-mapped source to the output (peak memory: one chunk of one tensor)
through the GGUF writer, so they are atomic: temp files renamed into place only when every output is
complete; nothing is left behind on an error, Ctrl-C, SIGTERM or SIGHUP.

``split`` is ``llama-gguf-split --split [--split-max-tensors N | --split-max-size N(M|G)] SRC OUT_PREFIX``
(tools/gguf-split/gguf-split.cpp): shards ``{OUT_PREFIX}-0000i-of-0000N.gguf``, the first holding all
metadata, each ending with ``split.no``, ``split.tensors.count``, ``split.count``; a new shard every
``max_tensors`` tensors (128 when neither limit is given, gguf-split's default) or when the shard's padded
tensor bytes would exceed ``max_size``; with ``no_tensor_first_split`` the first shard holds only the metadata
and the tensors start in the second. The layout rules are the writer's (see
:mod:`gguf_kquant.container.writer`), including where it differs from gguf-split: a tensor larger than
``max_size`` gets a shard of its own (gguf-split fails), and a non-default alignment is honoured in every
shard (gguf-split pads with 32 and writes a file llama.cpp rejects). A split model given as ``src`` (its first
shard) is re-split as a whole.

``merge`` is ``llama-gguf-split --merge FIRST_SHARD DST``: the first shard's metadata with ``split.count``
set to 0 (moved to the end, as ``gguf_set_val_u16`` does; ``split.no`` and ``split.tensors.count`` stay),
every shard's tensors in order, leading dimensions of 1 dropped as ggml's writer does (``ggml_n_dims``).

Unlike gguf-split, an existing output is refused unless ``overwrite=True`` (gguf-split refuses it for
``--merge`` and silently replaces it for ``--split``), and no output may be one of the input files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..container import split as _split
from ..container.reader import open_gguf
from ..container.values import GGUFValueType, Metadata, Value
from ..container.writer import DEFAULT_ALIGNMENT, KEY_ALIGNMENT, GGUFWriter, TensorSpec, _ggml_n_dims, write_shards
from ..errors import SplitError

__all__ = ["split", "merge", "DEFAULT_MAX_TENSORS", "plan_split"]

DEFAULT_MAX_TENSORS = 128  # gguf-split's split_params.n_split_tensors
_SPLIT_KEYS = (_split.KEY_SPLIT_NO, _split.KEY_SPLIT_TENSORS_COUNT, _split.KEY_SPLIT_COUNT)


def _split_writer(src_file, out_prefix, max_size, max_tensors, overwrite: bool, fsync: bool) -> GGUFWriter:
    if max_size is None and max_tensors is None:
        max_tensors = DEFAULT_MAX_TENSORS
    # the writer names shards after the path without ".gguf"; gguf-split appends to OUT_PREFIX as given
    w = GGUFWriter(Path(os.fspath(out_prefix) + ".gguf"), src_file.metadata, split_max_size=max_size,
                   split_max_tensors=max_tensors, inputs=src_file.shards, overwrite=overwrite, fsync=fsync)
    w.add_tensors(src_file.tensors)
    return w


def _renumbered(pairs: list, no: int, count: int) -> list:
    """A shard's metadata with ``split.no``/``split.count`` set (same keys, same order)."""
    new = {_split.KEY_SPLIT_NO: Value(no, GGUFValueType.UINT16),
           _split.KEY_SPLIT_COUNT: Value(count, GGUFValueType.UINT16)}
    return [(k, new.get(k, v)) for k, v in pairs]


def _no_tensor_first(plans: list, out_prefix) -> list:
    """gguf-split --no-tensor-first-split: a first shard with all metadata and no tensors, then the shards
    of the plan with only the split keys (and a non-default alignment), numbered from 2."""
    count = len(plans) + 1
    rest = plans[1] if len(plans) > 1 else None
    head = [(k, v) for k, v in plans[0].metadata if k not in _SPLIT_KEYS]
    split_keys = [(k, v) for k, v in plans[0].metadata if k in _SPLIT_KEYS]
    shard_md = rest.metadata if rest is not None else [
        (k, v) for k, v in plans[0].metadata
        if k in _SPLIT_KEYS or (k == KEY_ALIGNMENT and v.value != DEFAULT_ALIGNMENT)]
    files = [(_split.shard_path(out_prefix, 0, count), _renumbered(head + split_keys, 0, count), [])]
    for i, p in enumerate(plans):
        files.append((_split.shard_path(out_prefix, i + 1, count), _renumbered(shard_md, i + 1, count), p.tensors))
    return files


def _shard_files(f, out_prefix, max_size, max_tensors, no_tensor_first: bool) -> list:
    plans = _split_writer(f, out_prefix, max_size, max_tensors, True, False).plan()
    if no_tensor_first:
        return _no_tensor_first(plans, out_prefix)
    return [(p.path, p.metadata, p.tensors) for p in plans]


def plan_split(src, out_prefix, *, max_size=None, max_tensors: Optional[int] = None,
               no_tensor_first_split: bool = False) -> list:
    """What :func:`split` would write, without writing: ``[(path, n_tensors)]`` per shard (gguf-split's
    ``--dry-run``)."""
    with open_gguf(src) as f:
        return [(path, len(tensors)) for path, _, tensors in
                _shard_files(f, out_prefix, max_size, max_tensors, no_tensor_first_split)]


def split(src, out_prefix, *, max_size=None, max_tensors: Optional[int] = None, no_tensor_first_split: bool = False,
          overwrite: bool = False, fsync: bool = True) -> list:
    """Write ``src`` as gguf-split shards ``{out_prefix}-0000i-of-0000N.gguf``; returns their paths.

    ``max_size``: bytes of tensor data per shard (an int, or ``"500M"`` / ``"2G"``, decimal units as
    gguf-split); ``max_tensors``: tensors per shard (default 128 when neither is given);
    ``no_tensor_first_split``: the first shard holds the metadata only (gguf-split's option of that name).
    """
    with open_gguf(src) as f:
        if not no_tensor_first_split:
            return _split_writer(f, out_prefix, max_size, max_tensors, overwrite, fsync).close()
        files = _shard_files(f, out_prefix, max_size, max_tensors, True)
        return write_shards(files, byte_order=f.byte_order, fsync=fsync, inputs=f.shards, overwrite=overwrite)


def merge(first_shard, dst, *, overwrite: bool = False, fsync: bool = True) -> Path:
    """Merge a split model (opened from its first shard) into the single file ``dst``; returns ``dst``."""
    with open_gguf(first_shard) as f:
        if _split.KEY_SPLIT_COUNT not in f.metadata:
            raise SplitError(f"{first_shard}: not a split model (no {_split.KEY_SPLIT_COUNT} key)")
        metadata = Metadata()
        for key in f.metadata:
            if key != _split.KEY_SPLIT_COUNT:
                metadata.set_typed(key, f.metadata.typed(key), f.metadata[key])
        # gguf-split: gguf_set_val_u16(split.count, 0) removes the key and appends it
        metadata[_split.KEY_SPLIT_COUNT] = Value(0, GGUFValueType.UINT16)
        tensors = [_ggml_n_dims(TensorSpec.make(t.name, t)) for t in f.tensors]
        w = GGUFWriter(dst, metadata, inputs=f.shards, overwrite=overwrite, fsync=fsync)
        w.add_tensors(tensors)
        return w.close()[0]
