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
    # the full input covariances, when the file holds them (gguf_kquant.model.hessian): error feedback
    hessians: object = None

    def filtered(self, include=(), exclude=()) -> "Imatrix":
        """--include-weights / --exclude-weights: keep / drop entries whose name contains one of the strings."""
        if include and exclude:
            raise ImatrixError("--include-weights and --exclude-weights cannot be used together")
        entries = dict(self.entries)
        for s in exclude or ():
            entries = {k: v for k, v in entries.items() if s not in k}
        if include:
            entries = {k: v for k, v in entries.items() if any(s in k for s in include)}
        return Imatrix(entries, list(self.datasets), self.chunk_count, self.path, self.is_legacy, self.hessians)

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


def _open_gguf_imatrix(p: Path):
    """The GGUF file ``p`` opened; a malformed one is an ImatrixError naming it (I/O errors stay GGUFIOError)."""
    from ..container.reader import open_gguf

    try:
        return open_gguf(p, split=False)
    except GGUFIOError:
        raise
    except GGUFError as exc:
        raise ImatrixError(f"imatrix {p}: {exc}") from None


def _load_gguf(p: Path) -> Imatrix:
    with _open_gguf_imatrix(p) as f:
        md = f.metadata
        if md.get("general.type") == "hessian":  # gguf-kquant hessian's file: the imatrix is its diagonals
            return _load_hessians(p)
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


def _load_hessians(p: Path) -> Imatrix:
    """An imatrix file that holds each weight's full input covariance (gguf_kquant.model.hessian): the
    imatrix is ``diag(H) / n_tokens``, and ``hessians`` carries the matrices for error feedback."""
    from .hessian import load_hessians

    hessians = load_hessians(p)
    im = hessians.imatrix()
    im.hessians = hessians
    return im


def _load_legacy(p: Path, data: bytes) -> Imatrix:
    records, chunk_count, datasets = _legacy_records(p, data)
    entries = {name: (sums / np.float32(ncall) if ncall > 0 else sums.copy())
               for name, (sums, ncall) in records.items()}
    return Imatrix(entries, datasets, chunk_count, is_legacy=True)


def _legacy_records(p: Path, data: bytes) -> tuple:
    """({name: (float32 sums, ncall)}, chunk_count, datasets) of a legacy file, as common_imatrix_load_legacy."""
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
    records = {}
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
        records[name] = (np.frombuffer(data, "<f4", nval, pos).astype(np.float32), ncall)
        pos += 4 * nval
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
    return records, chunk_count, datasets


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


# ------------------------------------------------------------------------------------------------------
# conversion between the two formats: what `llama-imatrix --in-file IN -o OUT [--output-format dat]` does
# (tools/imatrix/imatrix.cpp: IMatrixCollector::load_imatrix, then save_imatrix / save_imatrix_legacy)
# ------------------------------------------------------------------------------------------------------
DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's n_ctx / n_parallel with its defaults (-c 512, -b 2048)


@dataclass
class ImatrixStats:
    """llama-imatrix's collector state: raw sums of squared activations and token counts per matrix.

    ``entries``: name -> (float32 ``values`` of ``n_mat * n_per_row``, int64 ``counts`` of ``n_mat``),
    sorted by name; ``last_chunk``: the chunk count it records (max count // chunk size).
    """

    entries: dict
    datasets: list
    last_chunk: int
    chunk_size: int


def _c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def read_imatrix_stats(path, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ImatrixStats:
    """Load an imatrix file (either format) into llama-imatrix's raw form, as IMatrixCollector::load_imatrix.

    A legacy file stores ``mean * ncall``: values become ``sums * chunk_size`` and the count ``ncall *
    chunk_size``.  A GGUF file stores the raw sums and counts (rounded with ``std::lround``).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ImatrixError(f"chunk size must be a positive integer, not {chunk_size!r}")
    p = Path(path)
    from ..container.reader import read_regular

    data = read_regular(p, "imatrix")
    zero = np.float32(0)
    entries: dict = {}
    if data[:4] != b"GGUF":
        records, _chunks, datasets = _legacy_records(p, data)
        for name, (sums, ncall) in records.items():
            # e.values[j] += sums[j] * chunk_size (float); e.counts[0] += ncall * chunk_size (int64)
            entries[name] = (zero + sums * np.float32(chunk_size), np.array([ncall * chunk_size], np.int64))
    else:
        datasets = []
        for name, (sums, counts) in _gguf_pairs(p, datasets).items():
            c = counts.astype(np.float64)
            entries[name] = (zero + sums, (np.floor(np.abs(c) + 0.5) * np.sign(c)).astype(np.int64))  # lround
    entries = {k: entries[k] for k in sorted(entries, key=lambda s: s.encode())}
    max_count = max([0] + [int(c.max()) for _, c in entries.values() if c.size])
    return ImatrixStats(entries, datasets, _c_div(max_count, chunk_size), chunk_size)


def _gguf_pairs(p: Path, datasets: list) -> dict:
    """name -> (float32 sums, float32 counts) of a GGUF imatrix (common_imatrix_load); fills ``datasets``."""
    with _open_gguf_imatrix(p) as f:
        if not f.tensors:
            raise ImatrixError(f"imatrix {p}: no data")
        md = f.metadata
        if "imatrix.datasets" in md:
            typed = md.typed("imatrix.datasets")
            if typed.type.name == "ARRAY" and typed.element_type is not None and typed.element_type.name == "STRING":
                datasets.extend(str(d) for d in typed.value)
        pairs: dict = {}
        for t in f.tensors:
            for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
        out = {}
        for name, (sums_t, counts_t) in pairs.items():
            if sums_t is None or counts_t is None:
                raise ImatrixError(f"imatrix {p}: mismatched sums and counts for {name!r}")
            if sums_t.type_name != "F32" or counts_t.type_name != "F32":
                raise ImatrixError(f"imatrix {p}: sums and counts for {name!r} must be F32")
            out[name] = (sums_t.numpy().reshape(-1).astype(np.float32), counts_t.numpy().reshape(-1).astype(np.float32))
        return out


def _matrices(name: str, values: np.ndarray, counts: np.ndarray) -> int:
    nval, nmat = values.size, counts.size
    if nmat and (nval < nmat or nval % nmat):
        raise ImatrixError(f"imatrix entry {name!r}: {nval} values do not split into {nmat} matrices")
    return nmat


def imatrix_gguf_parts(stats: ImatrixStats) -> tuple:
    """(metadata pairs, [(tensor name, float32 array)]) of save_imatrix's GGUF file, in its order."""
    from ..container.values import GGUFValueType as V, Value

    metadata = [("general.type", Value("imatrix", V.STRING)),
                ("imatrix.datasets", Value(list(stats.datasets), V.ARRAY, V.STRING)),
                ("imatrix.chunk_count", Value(int(stats.last_chunk), V.UINT32)),
                ("imatrix.chunk_size", Value(int(stats.chunk_size), V.UINT32))]
    tensors = []
    for name, (values, counts) in stats.entries.items():
        nmat = _matrices(name, values, counts)
        if values.size == 0 or nmat == 0:
            continue
        # ne = [nval/nmat, nmat] and [1, nmat]; the file keeps ggml_n_dims of them (trailing 1s dropped)
        shape = (nmat, values.size // nmat) if nmat > 1 else (values.size,)
        tensors.append((f"{name}.in_sum2", values.astype(np.float32).reshape(shape)))
        tensors.append((f"{name}.counts", counts.astype(np.float32).reshape((nmat, 1) if nmat > 1 else (1,))))
    return metadata, tensors


def imatrix_legacy_bytes(stats: ImatrixStats) -> bytes:
    """The bytes save_imatrix_legacy writes: entries with no data at all are skipped, ``mean * ncall`` stored
    (1 where a matrix has no data), then the chunk count and the last dataset name."""
    out = []
    n_entries = 0
    for name, (values, counts) in stats.entries.items():
        if counts.size == 0 or not counts.any():
            continue
        nmat = _matrices(name, values, counts)
        ncall = _c_div(int(counts.max()) + (stats.chunk_size - 1), stats.chunk_size)
        count = np.repeat(counts.astype(np.float32), values.size // nmat)
        value = values.astype(np.float32)
        empty = count == 0
        value = np.where(empty, np.float32(1), value)
        count = np.where(empty, np.float32(1), count)
        tmp = (value / count) * np.float32(ncall)
        b = name.encode()
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, values.size), tmp.astype("<f4").tobytes()]
        n_entries += 1
    dataset = stats.datasets[-1].encode() if stats.datasets else b""
    out += [struct.pack("<i", stats.last_chunk), struct.pack("<i", len(dataset)), dataset]
    return struct.pack("<i", n_entries) + b"".join(out)


def convert_imatrix(src, dst, *, fmt: Optional[str] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    overwrite: bool = False) -> str:
    """Convert an imatrix file to GGUF or legacy ``.dat`` (``fmt``; default: ``dat`` when ``dst`` ends in
    ``.dat``, else ``gguf``) — the bytes ``llama-imatrix --in-file SRC -o DST [--output-format dat] -c
    CHUNK_SIZE`` writes.  Atomic; ``dst`` may not name ``src``.  Returns the format written."""
    from ..container.writer import write
    from ..safeio import AtomicFiles, check_outputs

    fmt = fmt or ("dat" if str(dst).endswith(".dat") else "gguf")
    if fmt not in ("gguf", "dat"):
        raise ImatrixError(f"imatrix output format {fmt!r}: use 'gguf' or 'dat'")
    stats = read_imatrix_stats(src, chunk_size=chunk_size)
    if fmt == "gguf":
        metadata, tensors = imatrix_gguf_parts(stats)
        write(dst, metadata, tensors, inputs=[src], overwrite=overwrite)
    else:
        data = imatrix_legacy_bytes(stats)
        check_outputs([dst], [src], overwrite=overwrite, error=ImatrixError)
        with AtomicFiles([dst]) as files:
            files.write_bytes(0, data)
            files.commit()
    return fmt
