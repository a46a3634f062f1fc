"""Whole-model quantization on a Dask cluster: ``quantize_model(src, dst, mix, client=...)``.

>>> from distributed import Client                                                  # doctest: +SKIP
>>> gguf_kquant.quantize_model("/shared/m-f16.gguf", "/shared/m-q4.gguf", "Q4_K_M",
...                            client=Client("tcp://scheduler:8786"))               # doctest: +SKIP

``client`` is a ``distributed.Client`` or a scheduler address (``--dask ADDRESS`` on the CLI).  The output
is byte-identical to a local run (and so to llama-quantize's), one file or split shards alike:

1. The client does everything a local run does before the first byte: mix, imatrix, plan
   (:mod:`~gguf_kquant.model.planner`), llama-quantize's refusals, the output metadata, the writer's plan of
   every output file (header, each tensor's offset, file size) and the output path checks
   (:mod:`gguf_kquant.safeio`).
2. It creates the temp files next to the targets (:class:`~gguf_kquant.safeio.AtomicFiles`), sizes each to
   its planned length (zeros: the padding) and writes each header.
3. Before any work every worker answers one probe (:func:`check_workers`): the same versions of
   gguf_kquant (and of its source files), numpy, numba and Python as the client; every source shard visible
   at the client's path with the same size and first bytes; every temp file visible and writable.  The first
   problem is one line (:class:`ClusterError`) and nothing is left behind.
4. Each tensor is a task, and a tensor of more than the task size (:data:`TASK_BYTES`, smaller when the model
   is small for the cluster) is split into row ranges.  A worker ``pread``s its rows from the shared source,
   converts them with a local run's own converter (``_Converter.stream``: quantization is row-wise, so the
   bytes do not depend on where ranges are cut), ``pwrite``s them at the planned offset and fsyncs.  A
   retried task (Dask reruns the tasks of a worker that died) writes the same bytes at the same place again.
5. Progress comes back as tasks finish (one line per tensor, or the live bar).  The first task that fails for
   good (bad data: a NaN weight) cancels the rest and raises its own typed error; the temps are removed.
   When every task succeeded the client writes the report, and renames all temps into place together.

``convert_hf(model_dir, dst, mix, client=...)`` (:func:`convert_on_cluster`) runs the same steps: the client
plans the conversion and the header, and each planned tensor's transformation (``convert``'s per-tensor
producer: q/k permutation, stacked experts, F16 rounding, quantization) is one task on a worker, which reads
the safetensors shards itself.  The plan objects are pickled (cloudpickle) and each is checked before any
work; one that cannot be sent is a :class:`ClusterError` naming the tensor.

Workers need the source, the destination folder and the same package versions; nothing else is copied to
them but each task's imatrix values.  ``threads`` is the codec threads per task (default 1: the Dask
worker threads are the parallelism).  ``report=`` works (tensors are then not split, so that each task
measures a whole tensor).  Several outputs in one pass: :func:`stream_outputs_on_cluster` is
:mod:`~gguf_kquant.model.multi`'s streaming step on a cluster (one task per source tensor, read once, writes
every output's bytes); ``quantize_model({path: mix}, client=...)`` is refused until ``quantize_outputs``
hands its client to it.  The result is a local run's :class:`~gguf_kquant.model.quantize.QuantizeResult` plus
``worker_seconds`` and ``worker_cpu_seconds``: ``{tensor name: seconds (CPU seconds) the workers spent on it}``
(what per-worker throughput is measured from).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..errors import GGUFError, GGUFIOError, QuantizeError, WriteError
from ..types import TYPES
from .planner import PlanRow

__all__ = ["quantize_on_cluster", "convert_on_cluster", "stream_outputs_on_cluster", "connect", "check_workers",
           "ClusterError", "TASK_BYTES"]

TASK_BYTES = 64 * 2**20  # source bytes of one task at most: larger tensors are split into row ranges
MIN_TASK_BYTES = 4 * 2**20  # ... but no smaller than this when a small model is spread over many workers
CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler and to see a first worker
_HEAD_BYTES = 1 << 16  # a source shard is "the same file" on a worker if its size and first bytes agree
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class ClusterError(GGUFError):
    """The Dask cluster cannot run the job: scheduler unreachable, no workers, a worker with other package
    versions or without the source or destination, a worker that kept dying."""


# ------------------------------------------------------------------------------------------------------
# Connecting and checking the workers
# ------------------------------------------------------------------------------------------------------
def connect(client, timeout: Optional[float] = None) -> tuple:
    """``(distributed.Client, owned)`` for a client or a scheduler address (``owned``: made here, to be closed
    by the caller); a scheduler that cannot be reached within ``timeout`` seconds (default
    :data:`CONNECT_TIMEOUT`), or has no worker, is a :class:`ClusterError`."""
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    try:
        import distributed
    except ImportError:
        raise ClusterError("client=/--dask needs Dask: pip install 'dask[distributed]'") from None
    owned = not isinstance(client, distributed.Client)
    if owned:
        address = os.fspath(client) if isinstance(client, (str, os.PathLike)) else client
        try:
            _knock(address, timeout)
            client = distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {why}") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError):
        if owned:
            client.close()
        raise ClusterError(f"the Dask scheduler at {client.scheduler.address} has no workers "
                           f"(waited {timeout:g} s)") from None
    return client, owned


def _knock(address, timeout: float) -> None:
    """A TCP scheduler address that refuses connections fails now (Dask's client retries until its timeout)."""
    import socket

    from distributed.comm import parse_address, parse_host_port

    if not isinstance(address, str) or "://" not in address:
        return
    scheme, loc = parse_address(address)
    if scheme == "tcp":
        socket.create_connection(parse_host_port(loc), timeout=timeout).close()


def _source_digest() -> str:
    """SHA-256 of the package's Python sources: equal version strings can hide different code."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def environment() -> dict:
    """What must agree between the client and every worker for the bytes to agree."""
    import numba

    import gguf_kquant

    return {"gguf_kquant": gguf_kquant.__version__, "gguf_kquant sources": _source_digest(),
            "numpy": np.__version__, "numba": numba.__version__, "python": platform.python_version()}


def _file_mark(path: str) -> tuple:
    """(size, digest of the first bytes) of a file, raising OSError if it cannot be read."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEAD_BYTES, 0)
    finally:
        os.close(fd)
    return size, hashlib.sha256(head).hexdigest()


def _probe(sources: list, temps: list) -> dict:
    """Runs on every worker: its environment and the first file problem it sees (None if none)."""
    env, problem = environment(), None
    for path, mark in sources:
        try:
            if _file_mark(path) != tuple(mark):
                problem = f"sees another file at the source path {path} (size or first bytes differ)"
        except OSError as exc:
            problem = f"cannot read the source file {path} ([Errno {exc.errno}] {exc.strerror})"
        if problem:
            return {"env": env, "problem": problem}
    for path, size in temps:
        try:
            fd = os.open(path, os.O_WRONLY | _O_CLOEXEC)  # never O_CREAT: a temp the client removed stays gone
            try:
                seen = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if seen != size:
                problem = f"sees another file at the output temp file {path} ({seen} bytes, not {size})"
        except OSError as exc:
            problem = (f"cannot write the output's temp file {path} in the destination folder "
                       f"([Errno {exc.errno}] {exc.strerror})")
        if problem:
            break
    return {"env": env, "problem": problem}


def check_workers(client, sources=(), temps=()) -> int:
    """Ask every worker (:func:`_probe`) before any work; the first mismatch or unreadable file is one line,
    a :class:`ClusterError`.  ``sources``: paths the workers read, ``temps``: ``[(path, size)]`` they write.
    Returns the number of workers."""
    sources = [(os.fspath(p), _file_mark(os.fspath(p))) for p in sources]
    temps = [(os.fspath(p), int(n)) for p, n in temps]
    try:
        answers = client.run(_probe, sources, temps)
    except Exception as exc:  # e.g. a worker without gguf_kquant cannot even unpickle the probe
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise ClusterError(f"a Dask worker cannot run gguf_kquant's check: {type(exc).__name__}: {why}") from None
    if not answers:
        raise ClusterError("the Dask cluster has no workers")
    mine = environment()
    for worker, answer in sorted(answers.items()):
        theirs = answer["env"]
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise ClusterError(f"Dask worker {worker} has {key} {theirs.get(key)}, this client {value}: every "
                                   f"worker needs the client's versions of {', '.join(mine)}")
        if answer["problem"]:
            raise ClusterError(f"Dask worker {worker} {answer['problem']}")
    return len(answers)


# ------------------------------------------------------------------------------------------------------
# Tasks (run on the workers)
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """The fields of a reader's TensorInfo that the converter reads (a TensorInfo holds an open file)."""

    name: str
    path: str
    offset: int


@dataclass(frozen=True)
class _QuantizeRows:
    """Rows ``rows`` (None: all) of one source tensor, converted as a local run converts them."""

    row: PlanRow
    source: _Source
    rows: Optional[tuple]
    imatrix: Optional[np.ndarray]  # this tensor's values (every expert), None: none
    method: str
    has_imatrix: bool  # the job has one (method "optimized" refuses to run without)
    threads: int
    stats: bool
    hessians: object = None  # the imatrix file's full covariances (pickled as its path): error feedback

    def chunks(self, stats: list):
        from ..codecs.optimized import quantizer
        from .imatrix import Imatrix
        from .progress import Progress
        from .quantize import _Converter

        im = None if self.imatrix is None else Imatrix({self.row.name: self.imatrix})
        conv = _Converter({self.row.name: self.source}, im, self.threads, Progress(1, quiet=True),
                          stats if self.stats else None,
                          quantizer(self.method, self.has_imatrix, self.hessians))
        return conv.stream(self.row, self.rows)


@dataclass(frozen=True)
class _Produce:
    """A whole tensor made by ``producer(item, imatrix)`` — convert_hf's per-tensor transformation."""

    producer: object  # a module-level function (pickled by reference)
    item: object  # what it makes the tensor from (convert's PlannedTensor)
    name: str
    imatrix: Optional[np.ndarray]

    def chunks(self, stats: list):
        from .imatrix import Imatrix

        im = None if self.imatrix is None else Imatrix({self.name: self.imatrix})
        return self.producer(self.item, im, None)()


@dataclass(frozen=True)
class _MultiTensor:
    """One source tensor for several outputs at once (multi-output's slabs: read once, each distinct type
    quantized once); each output's bytes go to its own file and offset (``places``)."""

    rows: tuple  # one PlanRow per output
    source: _Source
    places: tuple  # one (temp file, offset, nbytes) per output
    imatrix: Optional[np.ndarray]
    threads: int
    stats: tuple  # per output: whether it wants a report
    quantize: object  # the method's quantize function (module-level: pickled by reference)

    @property
    def name(self) -> str:
        return self.rows[0].name

    @property
    def nbytes(self) -> int:
        return sum(n for _p, _o, n in self.places)


@dataclass(frozen=True)
class _Task:
    """``nbytes`` bytes of tensor ``name`` at ``offset`` of the temp file ``out``, made by ``work``."""

    name: str
    out: str
    offset: int
    nbytes: int
    work: object  # _QuantizeRows or _Produce


def _pwrite(fd: int, chunk, pos: int, path: str) -> int:
    """Write all of ``chunk`` at ``pos``; returns the position after it."""
    view = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
    done = 0
    while done < view.nbytes:
        try:
            done += os.pwrite(fd, view[done:], pos + done)
        except OSError as exc:
            raise GGUFIOError.wrap(path, exc, "writing failed") from None
    return pos + done


def run_task(task: _Task) -> tuple:
    """Make and write one task's bytes; returns ``(tensor name, seconds, CPU seconds, report stats or None)``."""
    start, cpu = time.perf_counter(), time.thread_time()
    stats: list = []
    try:
        fd = os.open(task.out, os.O_WRONLY | _O_CLOEXEC)  # never O_CREAT: a removed temp stays removed
    except OSError as exc:
        raise GGUFIOError.wrap(task.out, exc, "cannot open the output's temp file") from None
    try:
        pos, end = task.offset, task.offset + task.nbytes
        for chunk in task.work.chunks(stats):
            pos = _pwrite(fd, chunk, pos, task.out)
            if pos > end:
                break
        if pos != end:
            raise WriteError(f"tensor {task.name}: {pos - task.offset} bytes made, planned {task.nbytes}")
        try:
            os.fsync(fd)
        except OSError as exc:
            raise GGUFIOError.wrap(task.out, exc, "fsync failed") from None
    finally:
        os.close(fd)
    return task.name, time.perf_counter() - start, time.thread_time() - cpu, stats[0] if stats else None


def run_multi_task(task: _MultiTensor) -> tuple:
    """Make and write one source tensor's bytes for every output; returns ``(tensor name, seconds, CPU
    seconds, [report stats or None per output])``."""
    from .imatrix import Imatrix
    from .multi import _slabs
    from .quantize import _Stats

    start, cpu = time.perf_counter(), time.thread_time()
    im = None if task.imatrix is None else Imatrix({task.name: task.imatrix})
    stats_of = {r.dst_type: _Stats(r) for r, want in zip(task.rows, task.stats) if want and r.convert}
    fds = {}
    try:
        for path in dict.fromkeys(p for p, _o, _n in task.places):
            try:
                fds[path] = os.open(path, os.O_WRONLY | _O_CLOEXEC)  # never O_CREAT
            except OSError as exc:
                raise GGUFIOError.wrap(path, exc, "cannot open the output's temp file") from None
        pos = [offset for _p, offset, _n in task.places]
        for chunks in _slabs(task.source, list(task.rows), im, task.threads, stats_of, task.quantize):
            for k, ((path, _o, _n), chunk) in enumerate(zip(task.places, chunks)):
                pos[k] = _pwrite(fds[path], chunk, pos[k], path)
        for (path, offset, nbytes), end in zip(task.places, pos):
            if end != offset + nbytes:
                raise WriteError(f"tensor {task.name}: {end - offset} bytes made, planned {nbytes}")
        for path, fd in fds.items():
            try:
                os.fsync(fd)
            except OSError as exc:
                raise GGUFIOError.wrap(path, exc, "fsync failed") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    stats = [stats_of[r.dst_type].result() if want and r.convert else None for r, want in zip(task.rows, task.stats)]
    return task.name, time.perf_counter() - start, time.thread_time() - cpu, stats


def _split(row: PlanRow, task_bytes: int) -> list:
    """Row ranges of one tensor: ``[None]`` (whole) or ``[(begin, end), ...]`` of at most ``task_bytes``
    source bytes each (ranges may cross experts: the converter cuts its slabs at expert boundaries)."""
    n_per_row = row.shape[-1]
    if row.src_nbytes <= task_bytes or not n_per_row:
        return [None]
    n_rows = row.n_elements // n_per_row
    step = max(1, task_bytes // TYPES[row.src_type].row_bytes(n_per_row))
    return [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _tasks(plan, shards, temps, by_name, im, *, method: str, threads: int, stats: bool, task_bytes: int) -> list:
    """Every task of a quantization: each tensor, or each row range of a large one."""
    from .quantize import _imatrix_for

    where = _places(shards, temps)
    tasks = []
    for row in plan.rows:
        t = by_name[row.name]
        out, offset, _nbytes = where[row.name]
        source = _Source(t.name, os.path.abspath(t.path), int(t.offset))
        w = _imatrix_for(row, im) if row.convert else None
        dst_row = TYPES[row.dst_type].row_bytes(row.shape[-1]) if row.shape[-1] else 0
        for rows in ([None] if stats else _split(row, task_bytes)):
            begin, end = rows or (0, row.n_elements // row.shape[-1] if row.shape[-1] else 0)
            work = _QuantizeRows(row, source, rows, w, method, im is not None, threads, stats,
                                 getattr(im, "hessians", None))
            tasks.append(_Task(row.name, out, offset + begin * dst_row, (end - begin) * dst_row, work))
    return tasks


# ------------------------------------------------------------------------------------------------------
# The client side
# ------------------------------------------------------------------------------------------------------
def quantize_on_cluster(client, src, dst, ftype=None, *, imatrix=None, include_weights=(), exclude_weights=(),
                        output_tensor_type=None, token_embedding_type=None, tensor_types=(), pure=False,
                        leave_output_tensor=False, allow_requantize=False, override_kv=(), keep_split=False,
                        split_max_size=None, split_max_tensors=None, threads=None, report=None,
                        overwrite=False, quiet=True, stream=None, method="llama"):
    """:func:`~gguf_kquant.model.quantize.quantize_model` with ``client=`` (see the module docstring): the
    same options and result, the work done by the cluster's workers."""
    from ..codecs import check_threads
    from ..codecs.optimized import quantizer
    from ..container.reader import open_gguf
    from ..safeio import check_outputs
    from .multi import _shard_plans
    from .planner import parse_mix
    from .quantize import _input_paths, _output_metadata, _overrides, _planned, _prepare_imatrix, _split_limits
    from .report import render_report

    t0 = time.perf_counter()
    if isinstance(dst, Mapping):
        raise QuantizeError("several outputs: quantize_model(src, {path: mix}, client=...) runs them in one "
                            "pass (stream_outputs_on_cluster)")
    if ftype is None:
        raise QuantizeError("no quantization mix given (ftype)")
    mix, _file_type, _default = parse_mix(ftype)
    threads = check_threads(threads) or 1
    max_bytes = _split_limits(keep_split, split_max_size, split_max_tensors)
    im = _prepare_imatrix(imatrix, tuple(include_weights or ()), tuple(exclude_weights or ()))
    quantizer(method, im is not None)  # an unknown method, or "optimized" without an imatrix: refused here
    overrides = _overrides(override_kv, im)
    client, owned = connect(client)
    try:
        rules = dict(pure=pure, leave_output_tensor=leave_output_tensor, output_tensor_type=output_tensor_type,
                     token_embedding_type=token_embedding_type, tensor_types=tensor_types, keep_order=keep_split)
        with open_gguf(src) as f:
            plan, by_name, progress, result = _planned(f, mix, im, overrides, rules, allow_requantize, False, quiet,
                                                       stream)
            metadata, alignment = _output_metadata(f, plan.file_type, overrides)
            shards = _shard_plans(f, dst, plan, metadata, alignment, keep_split, max_bytes, split_max_tensors)
            sources = [os.path.abspath(p) for p in f.shards]
            inputs = _input_paths(f, imatrix)
        targets = [sp.path for sp in shards] + ([Path(report)] if report is not None else [])
        check_outputs(targets, inputs, overwrite=overwrite, error=QuantizeError)
        rows = {r.name: r for r in plan.rows}

        def make_tasks(temps, slots):
            task_bytes = min(TASK_BYTES, max(MIN_TASK_BYTES, plan.src_nbytes // (4 * slots)))
            return _tasks(plan, shards, temps, by_name, im, method=method, threads=threads,
                          stats=report is not None, task_bytes=task_bytes)

        def done(name, seconds):
            r = rows[name]
            if r.convert and im is not None and name not in im.entries:
                progress.say(f"====== did not find weights for {name}")
            progress.tensor(name, r.shape[::-1], r.src_type.name, r.dst_type.name, r.src_nbytes, r.dst_nbytes,
                            seconds)

        def side(stats):
            result.report = [stats[r.name] for r in plan.rows if r.name in stats]
            return [render_report(result.report, plan, result)]

        result.paths, _stats, result.worker_seconds, result.worker_cpu_seconds = _execute(
            client, shards, targets, sources, make_tasks, done, side if report is not None else None)
    finally:
        if owned:
            client.close()
    result.seconds = time.perf_counter() - t0
    progress.summary(plan.src_nbytes, plan.dst_nbytes, plan.n_elements, plan.n_fallback)
    return result


def convert_on_cluster(client, dst, metadata, planned: list, im, producer, *, checkpoint_files, inputs,
                       split_max_size=None, overwrite=False, progress=None) -> list:
    """convert_hf's writing step on a Dask cluster: each planned tensor is a task running ``producer(p,
    imatrix, None)`` (convert's per-tensor transformation) on a worker.  Returns the paths written."""
    from ..container.writer import GGUFWriter
    from ..errors import ConversionError
    from ..safeio import check_outputs
    from ..types import GGMLType
    from .quantize import _imatrix_for

    client, owned = connect(client)
    try:
        for f in checkpoint_files:  # the workers' current folder is not the client's
            f.path = Path(os.path.abspath(f.path))
        w = GGUFWriter(dst, metadata, split_max_size=split_max_size)
        for p in planned:
            w.add_tensor(p.name, _made_on_workers, shape=p.shape, ggml_type=p.qtype.name)
        shards = w.plan()
        targets = w.output_paths()
        check_outputs(targets, inputs, overwrite=overwrite, error=ConversionError)
        by_name = {p.name: p for p in planned}

        def make_tasks(temps, _slots):
            import cloudpickle

            tasks = []
            for name, (out, offset, nbytes) in _places(shards, temps).items():
                p = by_name[name]
                weights = _imatrix_for(p, im) if im is not None and p.qtype not in (GGMLType.F32, GGMLType.F16) \
                    else None
                task = _Task(name, out, offset, nbytes, _Produce(producer, p, name, weights))
                try:
                    cloudpickle.dumps(task)
                except Exception as exc:
                    raise ClusterError(f"tensor {name}: its conversion cannot be sent to Dask workers: "
                                       f"{type(exc).__name__}: {exc}") from None
                tasks.append(task)
            return tasks

        def done(name, seconds):
            p = by_name[name]
            if progress is not None:
                n_out = TYPES[p.qtype].nbytes(p.shape)
                progress.tensor(name, p.shape[::-1], p.source.dtype if p.source is not None else "F32",
                                p.qtype.name, p.source.nbytes if p.source is not None else n_out, n_out, seconds)

        sources = [f.path for f in checkpoint_files]
        paths = _execute(client, shards, targets, sources, make_tasks, done)[0]
    finally:
        if owned:
            client.close()
    return paths


def _made_on_workers():
    raise AssertionError("the workers write this tensor's bytes")


def _execute(client, shards, targets, sources, make_tasks, done, side=None) -> tuple:
    """Temp files sized and headed, workers probed, tasks run, sizes checked, the side files (``side(stats)``:
    the bytes of each target after the shards, the reports) written, everything committed.  Returns (paths,
    stats, seconds, CPU seconds) — the last three ``{tensor name: ...}``."""
    from ..safeio import AtomicFiles

    with AtomicFiles(targets) as out:
        temps = [os.path.abspath(p) for p in out.temps[:len(shards)]]
        for sp, tmp in zip(shards, temps):
            _preallocate(tmp, sp)
        n_workers = check_workers(client, sources, [(tmp, sp.file_size) for sp, tmp in zip(shards, temps)])
        slots = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()) or n_workers
        stats, seconds, cpu = _run(client, make_tasks(temps, slots), done)
        for sp, tmp in zip(shards, temps):
            size = os.stat(tmp).st_size
            if size != sp.file_size:
                raise WriteError(f"{sp.path}: file size {size}, planned {sp.file_size}")
        for j, data in enumerate(side(stats) if side is not None else ()):
            out.write_bytes(len(shards) + j, data)
        paths = out.commit()[:len(shards)]
    return paths, stats, seconds, cpu


def stream_outputs_on_cluster(client, f, by_name, order, outs, targets, im, threads, progress,
                              quantize_tensor) -> None:
    """Several outputs in one pass on a Dask cluster: what :func:`gguf_kquant.model.multi._stream_all` does
    locally (same arguments but the client first), with one task per source tensor that writes every output's
    bytes at their planned offsets.  Fills each output's report list ``o.stats`` in write order."""
    from .multi import _say_tensor
    from .quantize import QuantizeResult, _imatrix_for
    from .report import render_report

    threads = threads or 1
    client, owned = connect(client)
    try:
        shards = [sp for o in outs for sp in o.shards]
        rows = {name: [o.rows[name] for o in outs] for name in order}

        def make_tasks(temps, _slots):
            first, places = 0, {}  # every output holds every tensor: (output, name) -> its place
            for k, o in enumerate(outs):
                mine = _places(o.shards, temps[first:first + len(o.shards)])
                places.update({(k, n): v for n, v in mine.items()})
                first += len(o.shards)
            tasks = []
            for name in order:
                t, rs = by_name[name], rows[name]
                w = _imatrix_for(rs[0], im) if any(r.convert for r in rs) else None
                tasks.append(_MultiTensor(tuple(rs), _Source(t.name, os.path.abspath(t.path), int(t.offset)),
                                          tuple(places[(k, name)] for k in range(len(outs))), w, threads,
                                          tuple(o.stats is not None for o in outs), quantize_tensor))
            return tasks

        def side(stats):
            reports = []
            for k, o in enumerate(outs):
                if o.stats is None:
                    continue
                o.stats.extend(stats[name][k] for name in order if stats[name][k] is not None)
                if o.report:
                    res = QuantizeResult(plan=o.plan, paths=[], src_nbytes=o.plan.src_nbytes,
                                         dst_nbytes=o.plan.dst_nbytes, n_elements=o.plan.n_elements)
                    reports.append(render_report(o.stats, o.plan, res))
            return reports

        sources = [os.path.abspath(p) for p in f.shards]
        _execute(client, shards, targets, sources, make_tasks,
                 lambda name, seconds: _say_tensor(progress, im, rows[name], seconds), side)
    finally:
        if owned:
            client.close()


def _places(shards, temps) -> dict:
    """tensor name -> (temp file, absolute offset of its data, its byte size), in file order."""
    return {t.name: (os.fspath(temps[k]), sp.data_offset + sp.offsets[i], t.nbytes)
            for k, sp in enumerate(shards) for i, t in enumerate(sp.tensors)}


def _preallocate(tmp: str, sp) -> None:
    """The temp file at its planned size (zeros: the tensors' padding) with the header in place."""
    fd = os.open(tmp, os.O_WRONLY | _O_CLOEXEC)
    try:
        os.ftruncate(fd, sp.file_size)
        view, done = memoryview(sp.header), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
    except OSError as exc:
        raise GGUFIOError.wrap(sp.path, exc, "cannot prepare the temp file") from None
    finally:
        os.close(fd)


def _run(client, tasks: list, done) -> tuple:
    """Submit every task, largest first (Dask runs earlier submissions first: the long ones start early);
    ``done(name, seconds)`` when a tensor's last task is finished.  The first failure cancels the rest and is
    raised.  Returns ``{name: report stats}``, ``{name: worker seconds}``, ``{name: worker CPU seconds}``."""
    import distributed

    tasks = sorted(tasks, key=lambda task: -task.nbytes)
    parts: dict = {}
    for task in tasks:
        parts[task.name] = parts.get(task.name, 0) + 1
    seconds, cpu, stats = dict.fromkeys(parts, 0.0), dict.fromkeys(parts, 0.0), {}
    tag = os.urandom(4).hex()
    futures = [client.submit(run_multi_task if isinstance(task, _MultiTensor) else run_task, task, pure=False,
                             key=f"gguf-kquant-{tag}-{i}-{task.name}")
               for i, task in enumerate(tasks)]
    try:
        for fut in distributed.as_completed(futures):
            try:
                name, secs, cpu_secs, st = fut.result()
            except distributed.KilledWorker as exc:
                raise ClusterError(f"Dask workers kept dying while running a task ({exc}); nothing was written") \
                    from None
            seconds[name] += secs
            cpu[name] += cpu_secs
            if st is not None:
                stats[name] = st
            parts[name] -= 1
            if parts[name] == 0:
                done(name, seconds[name])
    except BaseException:
        client.cancel(futures)
        raise
    return stats, seconds, cpu
