"""A small lazy safetensors reader: header parsed and validated up front, tensor data memory-mapped on demand.

File layout::

    | u64 little-endian N | N bytes of JSON header | raw tensor data ... |

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative
to the start of the data section) plus an optional ``"__metadata__"`` dict of strings.

>>> ckpt = open_checkpoint("path/to/model_dir")          # doctest: +SKIP
>>> ckpt["model.embed_tokens.weight"].array().shape       # doctest: +SKIP
(32000, 4096)
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConversionError

# safetensors dtype -> (numpy dtype of the stored element, bytes per element). BF16 is held as raw uint16.
DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class SafeTensor:
    """One tensor of a safetensors file; :meth:`array` maps its bytes (no copy)."""

    name: str
    dtype: str
    shape: tuple
    begin: int  # absolute file offsets
    end: int
    file: "SafetensorsFile"

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def array(self) -> np.ndarray:
        """The stored elements as a read-only array (BF16 as uint16 bit patterns)."""
        mm = self.file._map()
        a = np.frombuffer(mm, dtype=DTYPES[self.dtype], count=self.nbytes // DTYPES[self.dtype].itemsize,
                          offset=self.begin)
        return a.reshape(self.shape)

    def release(self) -> None:
        """Drop this tensor's pages from the process (they are file-backed: re-read on the next access).

        Without it every page read through the map stays resident, and peak RSS grows to the model size.
        """
        mm = self.file._mm
        if mm is None or not hasattr(mm, "madvise") or self.nbytes == 0:
            return
        page = mmap.PAGESIZE
        start = self.begin // page * page
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, self.end - start)
        except (OSError, ValueError):  # pragma: no cover - best effort
            pass

    def to_float32(self) -> np.ndarray:
        """The tensor as float32 (a new array; BF16 widened exactly, F16 exactly)."""
        a = self.array()
        if self.dtype == "BF16":
            u = a.astype(np.uint32)
            u <<= 16  # in place: no second full-size temporary
            return u.view(np.float32)
        return a.astype(np.float32)


class SafetensorsFile:
    """Parse and validate one ``.safetensors`` file's header; the data is mapped lazily."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as exc:
            raise ConversionError(f"{self.path}: cannot open safetensors file: {exc.strerror}") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise ConversionError(
                    f"{self.path}: header length {n} does not fit the file ({size} bytes); corrupt or truncated")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{self.path}: safetensors header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        self.data_size = size - data_start
        self.tensors: dict[str, SafeTensor] = {}
        for name, info in header.items():
            self.tensors[name] = self._check(name, info, data_start)
        spans = sorted((t.begin, t.end, t.name) for t in self.tensors.values() if t.end > t.begin)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ConversionError(f"{self.path}: tensors {n0!r} and {n1!r} overlap (offsets {b0 - data_start}"
                                      f"..{e0 - data_start} and {b1 - data_start}..{e1 - data_start})")
        self._mm = None

    def _check(self, name, info, data_start) -> SafeTensor:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ConversionError(f"{where}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise ConversionError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            raise ConversionError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise ConversionError(f"{where}: bad data_offsets {offs!r}")
        if offs[1] > self.data_size:
            raise ConversionError(f"{where}: data ends at offset {offs[1]} but the data section has only "
                                  f"{self.data_size} bytes (truncated file?)")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if offs[1] - offs[0] != want:
            raise ConversionError(f"{where}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype} "
                                  f"(expected {want})")
        return SafeTensor(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1], self)

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def close(self):
        self._mm = None  # views keep the map alive until they are dropped


class Checkpoint:
    """All tensors of a model directory: one ``model.safetensors`` or shards listed in the index."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        self.files: list[SafetensorsFile] = []
        self.tensors: dict[str, SafeTensor] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, AssertionError, TypeError):
                raise ConversionError(f"{index}: no valid 'weight_map'") from None
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise ConversionError(f"{self.dir}: missing safetensors shard(s) {missing} listed in {index.name}")
            names = sorted(shards)
        else:
            weight_map = None
            names = sorted(p.name for p in self.dir.glob("*.safetensors") if p.name.startswith("model"))
            if not names:
                names = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not names:
                raise ConversionError(f"{self.dir}: no .safetensors files (only safetensors checkpoints are "
                                      f"supported)")
        for s in names:
            f = SafetensorsFile(self.dir / s)
            self.files.append(f)
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise ConversionError(f"{self.dir}: tensor {name!r} appears in two shards")
                self.tensors[name] = t
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            extra = sorted(set(self.tensors) - set(weight_map))
            if missing:
                raise ConversionError(f"{self.dir}: tensors listed in the index but absent from the shards: "
                                      f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                raise ConversionError(f"{self.dir}: tensors in the shards but not in the index: {extra[:5]}")

    def __getitem__(self, name) -> SafeTensor:
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def items(self):
        return self.tensors.items()


def open_checkpoint(model_dir) -> Checkpoint:
    """Index every tensor of a Hugging Face model directory (no tensor data is read)."""
    return Checkpoint(model_dir)


def write_safetensors(path, tensors: dict, metadata: dict | None = None, chunk_rows: int | None = None) -> None:
    """Write a safetensors file from ``{name: array or (dtype_str, shape, chunk_iter)}`` (for tests/benchmarks).

    A ``(dtype, shape, chunks)`` entry streams the data from an iterator of byte-like chunks, so a large
    checkpoint never sits in memory.
    """
    header, spans, off = {}, [], 0
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            dt = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<u2"): "BF16"}[t.dtype.newbyteorder("<")]
            shape, nbytes = list(t.shape), t.nbytes
        else:
            dt, shape, _ = t
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if isinstance(t, np.ndarray):
                f.write(np.ascontiguousarray(t).tobytes())
            else:
                for chunk in t[2]:
                    f.write(chunk)
