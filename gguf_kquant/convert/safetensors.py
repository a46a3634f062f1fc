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
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..container.reader import open_regular
from ..errors import ConversionError, FileChangedError, GGUFIOError, LimitExceededError

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
MAX_JSON_BYTES = 256 << 20  # config/tokenizer JSON files: the largest tokenizer.json known is ~35 MB


def read_file(path: Path, limit: int, what: str = "file") -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes (FIFOs, directories refused without blocking)."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise ConversionError(f"{path}: {size} bytes is more than the {limit} bytes a {what} may have")
            return fh.read(size + 1)  # not read(limit): Python allocates the size asked for up front
    except OSError as exc:
        raise GGUFIOError.wrap(path, exc, "cannot read") from None


# Memory json.loads may take: every object or array costs ~70 bytes of Python memory for its 2 bytes of JSON
# (``[{},{},...]`` is 25x its size), so such a file is refused before it is parsed.
JSON_MEMORY_MIN = 64 << 20
JSON_MEMORY_FACTOR = 8  # times the text's size


def check_json_cost(path: Path, raw: bytes, what: str = "JSON") -> None:
    """LimitExceededError if parsing ``raw`` would take more than max(64 MiB, 8x its size) of memory."""
    cost = 72 * (raw.count(b"{") + raw.count(b"[")) + 8 * raw.count(b",") + 2 * len(raw)
    budget = max(JSON_MEMORY_MIN, JSON_MEMORY_FACTOR * len(raw))
    if cost > budget:
        raise LimitExceededError(f"{path}: {what} of {len(raw)} bytes would take about {cost} bytes of memory to "
                                 f"parse (limit {budget}); refusing it as a resource bomb")


def read_json(path: Path, expect=dict):
    """A JSON file of a checkpoint (config.json, tokenizer.json, ...), parsed defensively: a missing or
    non-regular file, bad UTF-8/JSON, nesting too deep for Python and a top level that is not ``expect``
    all raise :class:`~gguf_kquant.errors.ConversionError` (or GGUFIOError) naming the file."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConversionError(f"{path.parent}: no {path.name}")
    raw = read_file(path, MAX_JSON_BYTES, "JSON file")
    check_json_cost(path, raw)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ConversionError(f"{path}: JSON nested too deeply") from None
    if expect is not None and not isinstance(value, expect):
        raise ConversionError(f"{path}: the top level is a JSON {_json_kind(value)}, expected an "
                              f"{_json_kind(expect())}")
    return value


def _json_kind(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


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
        """The stored elements as a read-only array (BF16 as uint16 bit patterns).

        The file's size is checked first (:class:`~gguf_kquant.errors.FileChangedError` if it shrank since
        it was opened); a truncation *while* the returned view is read still raises SIGBUS, as with any map.
        """
        mm = self.file._map()
        self.file.check_size(self.end, f"tensor {self.name!r}")
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
        fd = open_regular(self.path)
        try:
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise ConversionError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER or 8 + n > size:
                    raise ConversionError(
                        f"{self.path}: header length {n} does not fit the file ({size} bytes); corrupt or truncated")
                raw = f.read(n)
        except OSError as exc:
            raise GGUFIOError.wrap(self.path, exc, "cannot read") from None
        self.size = size
        check_json_cost(self.path, raw, "safetensors header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConversionError(f"{self.path}: safetensors header is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConversionError(f"{self.path}: safetensors header nests JSON too deeply") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise ConversionError(f"{self.path}: safetensors __metadata__ is not a JSON object")
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
        want = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: a huge shape cannot wrap around
        if offs[1] - offs[0] != want:
            raise ConversionError(f"{where}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype} "
                                  f"(expected {want})")
        return SafeTensor(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1], self)

    def _map(self):
        if self._mm is None:
            fd = open_regular(self.path)
            try:
                if os.fstat(fd).st_size == 0:
                    return b""
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise GGUFIOError.wrap(self.path, exc, "cannot map") from None
            finally:
                os.close(fd)
        return self._mm

    def check_size(self, end: int, what: str) -> None:
        """FileChangedError unless the file still has ``end`` bytes (reading the map past EOF is SIGBUS)."""
        try:
            now = os.stat(self.path).st_size
        except OSError as exc:
            raise GGUFIOError.wrap(self.path, exc, f"cannot read {what}") from None
        if now < end:
            raise FileChangedError(f"{self.path}: {what}: the file shrank from {self.size} to {now} bytes while "
                                   f"it was open; bytes up to offset {end} are gone")

    def close(self):
        self._mm = None  # views keep the map alive until they are dropped


class Checkpoint:
    """All tensors of a model directory: one ``model.safetensors`` or shards listed in the index."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        self.files: list[SafetensorsFile] = []
        self.tensors: dict[str, SafeTensor] = {}
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: key 'weight_map' must be an object of tensor name -> file name")
            shards = list(dict.fromkeys(weight_map.values()))
            for s in shards:
                self._check_shard_name(index, s)
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

    def _check_shard_name(self, index: Path, name: str) -> None:
        """A shard must be a plain file name inside the model folder: no '..', no absolute path, no folder."""
        parts = PurePosixPath(name).parts
        if (not name or "\\" in name or "\0" in name or PurePosixPath(name).is_absolute() or ".." in parts
                or len(parts) != 1 or Path(name).is_absolute()):
            raise ConversionError(f"{index}: weight_map names shard {name!r}, which is not a file name inside "
                                  f"{self.dir}; refusing to read outside the model folder")

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
