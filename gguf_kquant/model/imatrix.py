"""Importance matrices as llama-quantize reads them (tools/quantize/quantize.cpp, common/imatrix-loader.cpp).

Two file formats:

* GGUF (llama-imatrix's default): tensors ``<name>.in_sum2`` (F32, ``ne = [n_per_row, n_mat]``) and
  ``<name>.counts`` (F32, ``ne = [1, n_mat]``); keys ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32) — all three required.  Values used for
  quantizing: ``in_sum2 / count`` per matrix (expert), ``1`` where the count is 0.
* legacy ``.dat``: ``int32 n_entries``, then per entry ``int32 len, name, int32 ncall, int32 nval,
  float32[nval]``; optionally ``int32 chunk_count, int32 len, dataset``.  Values: ``sums / ncall``
  (``sums`` if ncall <= 0).

For a MoE tensor of ``n_expert`` matrices the entry holds ``n_expert * n_per_row`` values; expert ``e`` uses
the slice ``[e*n_per_row, (e+1)*n_per_row)``.

>>> im = load_imatrix("model.imatrix.gguf")                       # doctest: +SKIP
>>> im.entries["blk.0.attn_q.weight"].shape                       # doctest: +SKIP
(4096,)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import GGUFError, GGUFIOError, ImatrixError, LimitExceededError

__all__ = ["Imatrix", "load_imatrix", "write_legacy_imatrix"]


@dataclass
class Imatrix:
    """Loaded importance matrix: name -> float32 values, plus what llama-quantize records in the output."""

    entries: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)
    chunk_count: int = 0
    path: str = ""  # the path as the user gave it (recorded in quantize.imatrix.file)
    is_legacy: bool = False

    def filtered(self, include=(), exclude=()) -> "Imatrix":
        """--include-weights / --exclude-weights: keep / drop entries whose name contains one of the strings."""
        if include and exclude:
            raise ImatrixError("--include-weights and --exclude-weights cannot be used together")
        entries = dict(self.entries)
        for s in exclude or ():
            entries = {k: v for k, v in entries.items() if s not in k}
        if include:
            entries = {k: v for k, v in entries.items() if any(s in k for s in include)}
        return Imatrix(entries, list(self.datasets), self.chunk_count, self.path, self.is_legacy)

    def check_finite(self) -> None:
        """llama-quantize refuses any non-finite value, used or not."""
        for name, v in self.entries.items():
            bad = ~np.isfinite(v)
            if bad.any():
                col = int(np.argmax(bad))
                raise ImatrixError(f"imatrix {self.path}: entry {name!r} has non-finite value {float(v[col])!r} "
                                   f"at index {col}")

    def kv(self) -> list:
        """The (key, Value) pairs llama-quantize adds to the output (via kv overrides, in this order)."""
        from ..container.values import GGUFValueType as V, Value

        out = [("quantize.imatrix.file", Value(_c_str127(self.path), V.STRING))]
        if self.datasets:
            out.append(("quantize.imatrix.dataset", Value(_c_str127(self.datasets[0]), V.STRING)))
        out.append(("quantize.imatrix.entries_count", Value(len(self.entries), V.UINT32)))
        if self.chunk_count > 0:
            out.append(("quantize.imatrix.chunks_count", Value(int(self.chunk_count), V.UINT32)))
        return out


def _c_str127(s: str) -> str:
    """strncpy(val_str, s, 127): at most 127 bytes (a cut UTF-8 sequence is dropped, not mangled)."""
    b = s.encode("utf-8")[:127]
    return b.decode("utf-8", errors="ignore")


def load_imatrix(path, *, include=(), exclude=()) -> Imatrix:
    """Read a GGUF or legacy imatrix file and normalise it the way llama-quantize does."""
    p = Path(path)
    from ..container.reader import open_regular  # refuses FIFOs and directories without blocking

    fd = open_regular(p)
    try:
        with os.fdopen(fd, "rb") as fh:
            magic = fh.read(4)
            legacy = None if magic == b"GGUF" else magic + fh.read()
    except OSError as exc:
        raise GGUFIOError.wrap(p, exc, "cannot read imatrix") from None
    im = _load_gguf(p) if legacy is None else _load_legacy(p, legacy)
    im.path = os.fspath(path)
    return im.filtered(include, exclude) if (include or exclude) else im


def _load_gguf(p: Path) -> Imatrix:
    from ..container.reader import open_gguf

    try:
        f = open_gguf(p, split=False)
    except GGUFIOError:
        raise
    except GGUFError as exc:
        raise ImatrixError(f"imatrix {p}: {exc}") from None
    with f:
        md = f.metadata
        missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in md]
        if missing:
            raise ImatrixError(f"imatrix {p}: missing imatrix metadata {', '.join(missing)}")
        if len(f.tensors) < 1:
            raise ImatrixError(f"imatrix {p}: no data")
        # common_imatrix_load reads these with gguf_get_val_u32 / gguf_get_arr_str, which abort on other types
        for key, want in (("imatrix.chunk_count", "UINT32"), ("imatrix.chunk_size", "UINT32"),
                          ("imatrix.datasets", "ARRAY")):
            typed = md.typed(key)
            if typed.type.name != want or (want == "ARRAY" and typed.element_type.name != "STRING"):
                got = typed.type.name + (f" of {typed.element_type.name}" if typed.element_type else "")
                raise ImatrixError(f"imatrix {p}: key {key} must be of type "
                                   f"{'ARRAY of STRING' if want == 'ARRAY' else want}, not {got}")
        datasets = [str(d) for d in md["imatrix.datasets"]]
        pairs: dict = {}
        for t in f.tensors:
            for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
        entries = {}
        for name in sorted(pairs, key=lambda s: s.encode()):
            sums_t, counts_t = pairs[name]
            if sums_t is None or counts_t is None:
                raise ImatrixError(f"imatrix {p}: mismatched sums and counts for {name!r}")
            if sums_t.type_name != "F32" or counts_t.type_name != "F32":
                raise ImatrixError(f"imatrix {p}: sums and counts for {name!r} must be F32")
            sums = sums_t.numpy().reshape(-1).astype(np.float32)
            counts = counts_t.numpy().reshape(-1)
            if counts.size == 0 or sums.size % counts.size:
                raise ImatrixError(f"imatrix {p}: {name!r} has {sums.size} sums for {counts.size} counts")
            # counts are rounded to integers (std::lround), then used as float
            c = np.floor(np.abs(counts.astype(np.float64)) + 0.5) * np.sign(counts)
            c = c.astype(np.float32)
            per = sums.reshape(counts.size, -1)
            vals = np.ones_like(per)
            pos = c > 0
            vals[pos] = per[pos] / c[pos, None]
            entries[name] = vals.reshape(-1)
        return Imatrix(entries, datasets, int(md["imatrix.chunk_count"]), is_legacy=False)


def _load_legacy(p: Path, data: bytes) -> Imatrix:
    pos = 0

    def take(fmt, what):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"imatrix {p}: offset {pos}: file ends while reading {what}")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v[0] if len(v) == 1 else v

    n_entries = take("<i", "the entry count")
    if n_entries < 1:
        raise ImatrixError(f"imatrix {p}: not a GGUF file and no data as a legacy imatrix (entry count {n_entries})")
    # each entry takes ~200 bytes of memory (name, array, dict slot) for as few as 16 in the file: refuse a
    # count beyond max(64 MiB, 8x the file size) of memory (a count the file cannot hold fails in the loop)
    if n_entries * 200 > max(64 << 20, 8 * len(data)):
        raise LimitExceededError(f"imatrix {p}: offset 0: {n_entries} entries would take more memory than a file "
                                 f"of {len(data)} bytes may")
    entries = {}
    for i in range(n_entries):
        length = take("<i", f"the name length of entry {i}")
        if length < 0 or pos + length > len(data):
            raise ImatrixError(f"imatrix {p}: offset {pos}: bad name length {length} for entry {i}")
        name = data[pos:pos + length].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        pos += length
        ncall = take("<i", f"ncall of entry {name!r}")
        nval = take("<i", f"the value count of entry {name!r}")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ImatrixError(f"imatrix {p}: offset {pos}: bad value count {nval} for entry {name!r}")
        sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums.copy()
    chunk_count, datasets = 0, []
    if pos < len(data):
        if pos + 4 <= len(data):
            chunk_count = struct.unpack_from("<i", data, pos)[0]
            pos += 4
            if pos + 4 <= len(data):
                length = struct.unpack_from("<i", data, pos)[0]
                pos += 4
                if 0 < length and pos + length <= len(data):
                    datasets.append(data[pos:pos + length].split(b"\0", 1)[0].decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets, chunk_count, is_legacy=True)


def write_legacy_imatrix(path, entries: dict, *, ncall: int = 1, chunk_count: Optional[int] = None,
                         dataset: Optional[str] = None) -> None:
    """Write a legacy ``.dat`` imatrix (as llama-imatrix ``--output-format dat``); values are stored as given
    (llama-imatrix stores ``mean * ncall``)."""
    out = [struct.pack("<i", len(entries))]
    for name in sorted(entries, key=lambda s: s.encode()):
        v = np.ascontiguousarray(entries[name], dtype="<f4").reshape(-1)
        b = name.encode()
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, v.size), v.tobytes()]
    if chunk_count is not None:
        out.append(struct.pack("<i", chunk_count))
        d = (dataset or "").encode()
        out += [struct.pack("<i", len(d)), d]
    Path(path).write_bytes(b"".join(out))
