"""Mixture-of-experts checkpoints store one 2-D tensor per expert; llama.cpp wants one 3-D tensor per layer
and weight (``blk.N.ffn_{gate,up,down}_exps``: experts outermost).  :class:`ExpertStacker` collects the
per-expert tensors while planning, as convert_hf_to_gguf.py does (the stacked tensors appear where the
layer's last expert tensor is met, so the tensor order is the same), and :class:`StackedExperts` presents
them as one source that is read slab by slab: peak memory is one output slab, never a layer of experts.
Checkpoints that store a layer's experts fused, input dimension first, are read the same way through
:class:`TransposedExperts`.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ...errors import ConversionError
from ..safetensors import SafeTensor


class StackedExperts:
    """``E`` checkpoint tensors of equal shape ``(R, C)`` and dtype seen as one ``(E, R, C)`` source.

    Quacks like :class:`~gguf_kquant.convert.safetensors.SafeTensor` for the conversion's producer
    (``name``, ``dtype``, ``shape``, ``nbytes``, ``file``, ``array()``, ``release()``); ``array()`` gives a
    lazy array whose row slices are gathered from the memory-mapped experts on demand.
    """

    def __init__(self, name: str, parts: list[SafeTensor]):
        first = parts[0]
        for t in parts[1:]:
            if tuple(t.shape) != tuple(first.shape) or t.dtype != first.dtype:
                raise ConversionError(f"{t.file.path}: expert tensor {t.name!r} is {t.dtype} {list(t.shape)} but "
                                      f"{first.name!r} is {first.dtype} {list(first.shape)}: experts of one "
                                      f"layer must have equal shapes and dtypes")
        self.name, self.parts, self.dtype, self.file = name, parts, first.dtype, first.file
        self.shape = (len(parts),) + tuple(first.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts)

    def array(self) -> "_LazyStack":
        return _LazyStack(self.parts, self.shape)

    def release(self) -> None:
        for t in self.parts:
            t.release()


class _LazyStack:
    """The stacked experts as rows: ``reshape(-1, C)`` and row slices ``[r0:r1]`` (what the producer uses)."""

    def __init__(self, parts, shape):
        self.parts, self.shape = parts, tuple(shape)
        self.ndim = len(self.shape)

    def reshape(self, *shape):
        n_cols = self.shape[-1]
        if shape not in ((-1, n_cols), ((-1, n_cols),)):
            raise NotImplementedError(f"stacked experts reshape to {shape}")
        return _LazyStack(self.parts, (int(np.prod(self.shape[:-1])), n_cols))

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1, step = rows.indices(self.shape[0])
        assert step == 1 and self.ndim == 2
        per = self.shape[0] // len(self.parts)  # rows of one expert
        pieces, done = [], []
        for e in range(r0 // per, -(-r1 // per)):  # the experts rows r0..r1 touch
            a = self.parts[e].array().reshape(per, self.shape[1])
            pieces.append(a[max(r0 - e * per, 0):min(r1 - e * per, per)])
            if r1 - e * per >= per:
                done.append(self.parts[e])
        out = np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), self.parts[0].array().dtype)
        for t in done:  # read to its end: drop its mapped pages now, not when the whole stack is written
            t.release()
        return out


class ExpertStacker:
    """Mixin for a :class:`~gguf_kquant.convert.base.Converter` whose checkpoint has one tensor per expert.

    ``expert_re`` matches a per-expert tensor name with groups (layer, expert, weight); ``expert_weights``
    are the weight names in the order convert_hf_to_gguf.py emits them; ``merged_name`` (formatted with
    ``bid`` and ``w``) is the name its tensor map knows the stacked tensor by; ``expert_ff_key`` is the
    config.json key of an expert's feed-forward width and ``down_weight`` the weight shaped (n_embd, n_ff).
    """

    expert_re: str
    expert_weights: tuple
    merged_name: str
    expert_ff_key: str
    down_weight: str

    def expert_tensor(self, name: str, t: SafeTensor, bid: Optional[int]):
        """For a per-expert tensor: collect it and, once its layer is complete, yield the stacked outputs
        (gguf name, shape, None).  For any other tensor: None."""
        m = re.fullmatch(self.expert_re, name)
        if m is None:
            return None
        n_expert = self.n_expert()
        layer, xid, w_name = int(m.group(1)), int(m.group(2)), m.group(3)
        if not hasattr(self, "_experts"):
            self._experts, self._stacked = {}, {}
        if xid >= n_expert:
            raise ConversionError(f"{t.file.path}: tensor {name!r} names expert {xid}, but config.json says "
                                  f"there are {n_expert}")
        n_embd, n_ff = self.hparams["hidden_size"], self.hparams.get(self.expert_ff_key)
        if n_ff is not None:
            self.expect_shape(t, (n_embd, n_ff) if w_name == self.down_weight else (n_ff, n_embd))
        pending = self._experts.setdefault(layer, {})
        pending[(xid, w_name)] = (name, t)
        if len(pending) < n_expert * len(self.expert_weights):
            return iter(())
        del self._experts[layer]
        return self._stack(layer, pending, n_expert)

    def _stack(self, layer, pending, n_expert):
        for w_name in self.expert_weights:
            parts = [pending[(x, w_name)][1] for x in range(n_expert)]
            new_name = self.map_name(self.merged_name.format(bid=layer, w=w_name))
            src = StackedExperts(new_name, parts)
            self._stacked[new_name] = src
            yield new_name, src.shape, None

    def plan(self, out_type):
        planned = super().plan(out_type)
        left = getattr(self, "_experts", {})
        if left:  # a layer whose experts never all appeared
            layer, pending = min(left.items())
            n_expert = self.n_expert()
            missing = [(x, w) for x in range(n_expert) for w in self.expert_weights if (x, w) not in pending]
            some = next(iter(pending.values()))[0]
            m = re.fullmatch(self.expert_re, some)  # the missing names, spelled like a present one
            names = [some[:m.start(2)] + str(x) + some[m.end(2):m.start(3)] + w + some[m.end(3):]
                     for x, w in missing[:4]]
            raise ConversionError(f"{self.dir}: expert tensor(s) {names}{' ...' if len(missing) > 4 else ''} "
                                  f"missing ({len(pending)} of {n_expert * len(self.expert_weights)} of layer "
                                  f"{layer} found)")
        for p in planned:
            if p.name in getattr(self, "_stacked", {}):
                p.source = self._stacked[p.name]
        return planned


class TransposedExperts:
    """Columns ``cols`` (a slice) of a fused ``(E, R, C)`` expert tensor, each expert transposed: an
    ``(E, len(cols), R)`` source, for checkpoints that store experts fused with the input dimension first
    (transformers' Llama 4: ``gate_up_proj`` (E, n_embd, 2 * n_ff), gate the first half of the columns).

    Quacks like :class:`~gguf_kquant.convert.safetensors.SafeTensor` for the producer, as
    :class:`StackedExperts` does; row slices are gathered from the mapped checkpoint on demand (peak: one
    slab, never a whole fused tensor).
    """

    def __init__(self, name: str, t: SafeTensor, cols: slice):
        self.name, self.t, self.cols = name, t, cols
        self.dtype, self.file = t.dtype, t.file
        self.shape = (t.shape[0], len(range(t.shape[2])[cols]), t.shape[1])

    @property
    def nbytes(self) -> int:
        return self.t.nbytes * self.shape[1] // self.t.shape[2]

    def array(self) -> "_TransposedRows":
        return _TransposedRows(self, self.shape)

    def release(self) -> None:
        self.t.release()


class _TransposedRows:
    """The transposed experts as rows: ``reshape(-1, R)`` and row slices ``[r0:r1]`` (what the producer uses)."""

    def __init__(self, src: TransposedExperts, shape):
        self.src, self.shape = src, tuple(shape)
        self.ndim = len(self.shape)

    def reshape(self, *shape):
        n_cols = self.shape[-1]
        if shape not in ((-1, n_cols), ((-1, n_cols),)):
            raise NotImplementedError(f"transposed experts reshape to {shape}")
        return _TransposedRows(self.src, (int(np.prod(self.shape[:-1])), n_cols))

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1, step = rows.indices(self.shape[0])
        assert step == 1 and self.ndim == 2
        per = self.src.shape[1]  # output rows of one expert
        a = self.src.t.array()
        pieces = [a[e][:, self.src.cols][:, max(r0 - e * per, 0):min(r1 - e * per, per)].T
                  for e in range(r0 // per, -(-r1 // per))]
        return np.ascontiguousarray(np.concatenate(pieces)) if pieces else np.empty((0, self.shape[1]), a.dtype)
