"""Fill Numba's cache ahead of use: ``gguf-kquant precompile [TYPE ...] [--all]``, and the job-start warm-up.

Kernels are compiled lazily (``cache=True``): the first call of each (type, operation) compiles it — seconds
per kernel — and writes the result to the cache, which every later process loads in milliseconds.  A wheel
(``pip install .``) ships every kernel compiled: setup.py calls :func:`build_cache` on the build's copy of the
package (where the cache lives and why it survives installation: :mod:`gguf_kquant._jitcache`).  Without it
(an editable install, another CPU model, another Numba version), two ways to pay that cost less visibly:

* :func:`precompile` compiles the kernels of the given types in worker processes (one kernel per job, as
  many jobs at once as there are cores), so a CI image or a container can be built with a warm cache;
* :func:`warm_for_plan` is called by whole-model quantization before its first tensor: the kernels the plan
  needs that are not in the cache yet are compiled in parallel worker processes, and the main process then
  loads them from the cache instead of compiling them one after another.

Each job calls the public :func:`gguf_kquant.quantize` / :func:`gguf_kquant.dequantize` on a tiny input of the
array layout the model path uses (float32 C-contiguous writable rows, uint8 blocks), so what is compiled is
exactly the specialization a later call loads.  Results never depend on where a kernel was compiled.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Optional, Sequence

import numpy as np

from .types import TYPES, GGMLType, Imatrix, type_info

__all__ = ["Job", "jobs_for", "jobs_for_plan", "compile_job", "precompile", "warm_for_plan", "is_cached",
           "cache_dir", "build_cache"]

Job = tuple  # (type name, op): op one of types.OPS, or OPTIMIZED
OPTIMIZED = "optimized"  # method="optimized"'s block refiner of a type (gguf_kquant.codecs.optimized.REFINERS)


def _refined() -> set:
    from .codecs.optimized import REFINERS

    return {TYPES[t].name for t in REFINERS}


def jobs_for(types: Optional[Iterable] = None, ops: Optional[Sequence[str]] = None) -> list:
    """(type, op) for every kernel of ``types`` (None: every type with a codec), restricted to ``ops``; a
    type's optimized refiner is the op OPTIMIZED."""
    infos = [type_info(t) for t in types] if types is not None else [i for i in TYPES.values() if i.codec]
    refined = _refined()
    jobs = []
    for info in infos:
        for op in info.ops + ((OPTIMIZED,) if info.name in refined else ()):
            if ops is None or op in ops:
                jobs.append((info.name, op))
    return jobs


def jobs_for_plan(plan, im=None, report: bool = False, method: str = "llama") -> list:
    """The kernels a quantization plan will call: quantize_imatrix for tensors with importance data (``im``:
    the job's :class:`~gguf_kquant.model.imatrix.Imatrix` or None), quantize for the others, dequantize of
    quantized sources (requantization) and, with a report, of each output type."""
    entries = getattr(im, "entries", None) or {}
    refined = _refined() if method == OPTIMIZED else set()
    # error feedback (an imatrix with Hessians) decodes every block it writes, and starts the legacy types
    # from ggml's plain quantizer (gguf_kquant.codecs.gptq)
    feedback = method == OPTIMIZED and getattr(im, "hessians", None) is not None
    from .codecs.optimized import feedback_start
    jobs = set()
    for r in plan.rows:
        if not r.convert:
            continue
        dst, src = TYPES[r.dst_type], TYPES[r.src_type]
        if r.name in entries and dst.imatrix is not Imatrix.IGNORED:
            jobs.add((dst.name, "quantize_imatrix"))
        plain_start = feedback and feedback_start(dst)[0] == "quantize"
        if (r.name not in entries or dst.imatrix is Imatrix.IGNORED or plain_start) and "quantize" in dst.ops:
            jobs.add((dst.name, "quantize"))
        if src.ggml_type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            jobs.add((src.name, "dequantize"))
        if report or (feedback and r.name in entries):
            jobs.add((dst.name, "dequantize"))
        if method == OPTIMIZED and dst.name in refined:
            jobs.add((dst.name, OPTIMIZED))
    return sorted(jobs)


def _sample(info, n_rows: int = 2):
    n = max(256, info.block_size)
    n -= n % info.block_size
    x = np.linspace(-1.0, 1.0, n_rows * n, dtype=np.float32).reshape(n_rows, n)
    return x, np.linspace(0.5, 1.5, n, dtype=np.float32)


def compile_job(job: Job) -> float:
    """Compile (or load from the cache) one kernel in this process; returns the CPU seconds it took."""
    from . import codecs

    name, op = job
    info = type_info(name)
    t0 = time.process_time()
    x, w = _sample(info)
    if op == "quantize":
        codecs.quantize(x, info.ggml_type)
    elif op == "quantize_imatrix":
        codecs.quantize(x, info.ggml_type, imatrix=w)
    elif op == "dequantize":
        raw = np.zeros((x.shape[0], info.row_bytes(x.shape[1])), np.uint8)
        codecs.dequantize(raw, info.ggml_type, x.shape)
    elif op == OPTIMIZED:
        from .codecs.gptq import upper_from_packed
        from .codecs.optimized import FEEDBACK_STARTS, quantize_optimized

        quantize_optimized(x, info.ggml_type, w)
        if info.ggml_type in FEEDBACK_STARTS:  # error feedback's own start of this type
            FEEDBACK_STARTS[info.ggml_type](x, np.empty((x.shape[0], info.row_bytes(x.shape[1])), np.uint8))
        upper_from_packed(np.ones(3, np.float32), np.array([0, 2], np.int64))  # error feedback's unpacking of a Hessian file's V
    else:
        raise ValueError(f"unknown kernel operation {op!r}")
    return time.process_time() - t0


def _dispatchers(fn) -> list:
    """The Numba dispatchers behind a registered kernel (itself, or those a small Python wrapper calls)."""
    from numba.core.dispatcher import Dispatcher

    if isinstance(fn, Dispatcher):
        return [fn]
    g = getattr(fn, "__globals__", {})
    return [g[n] for n in getattr(getattr(fn, "__code__", None), "co_names", ()) if isinstance(g.get(n), Dispatcher)]


def is_cached(job: Job) -> bool:
    """True if the kernel of ``job`` is compiled in this process or has a cache entry for this source file
    (any specialization: a cheap test, no compiling, no loading)."""
    name, op = job
    try:
        if op == OPTIMIZED:
            from .codecs.gptq import _unpack_upper_rows
            from .codecs.optimized import FEEDBACK_STARTS, REFINERS

            t = type_info(name).ggml_type
            found = _dispatchers(REFINERS[t]) + (_dispatchers(FEEDBACK_STARTS[t]) if t in FEEDBACK_STARTS else [])
            found.append(_unpack_upper_rows)
        else:
            found = _dispatchers(type_info(name).kernel(op))
    except Exception:  # an import error surfaces when the kernel is used, not here
        return True
    for d in found:
        if d.overloads:
            continue
        cache = getattr(d, "_cache", None)
        cache_file = getattr(cache, "_cache_file", None)
        if cache_file is None:  # NullCache: cache=False, nothing to warm
            continue
        try:
            if not cache_file._load_index():
                return False
        except Exception:
            return False
    return bool(found)


def cache_dir() -> str:
    """The folder Numba caches this package's kernels in, as this process resolved it (the precedence is in
    :mod:`gguf_kquant._jitcache`: NUMBA_CACHE_DIR, else gguf_kquant/_nbcache, else a per-user folder, ...)."""
    from .codecs import _row_max_abs_bits

    return _row_max_abs_bits._cache._cache_path


def build_cache(processes: Optional[int] = None, jobs: Optional[Sequence[Job]] = None, on_done=None) -> dict:
    """The wheel-build step (setup.py): compile every kernel (or ``jobs``) into this copy of the package's
    ``_nbcache``, so that the installed wheel compiles nothing on first use.  Refuses to write anywhere else
    (NUMBA_CACHE_DIR set, or the package folder read-only): a wheel without its cache would pass unnoticed."""
    from . import _jitcache
    from .errors import GGUFError

    where = os.path.realpath(cache_dir())
    if not where.startswith(os.path.realpath(_jitcache.package_cache_dir()) + os.sep):
        raise GGUFError(f"the kernel cache resolves to {where}, not inside the package being built "
                        f"({_jitcache.package_cache_dir()}): unset NUMBA_CACHE_DIR")
    return precompile(jobs_for() if jobs is None else jobs, processes=processes, on_done=on_done)


def _worker_count(n_jobs: int, processes: Optional[int]) -> int:
    if processes is not None:
        return max(1, min(int(processes), n_jobs))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, n_jobs))


def precompile(jobs: Sequence[Job], processes: Optional[int] = None, on_done=None) -> dict:
    """Compile ``jobs`` in worker processes (``processes``: how many at once; default the usable cores),
    writing Numba's cache; returns {job: CPU seconds it took}.  ``on_done(job, seconds)`` per job.  This
    process compiles the first job itself, in parallel with the workers.

    With one job or one process the work runs in this process (no worker start-up to pay).
    """
    jobs = list(jobs)
    n = _worker_count(len(jobs), processes) if jobs else 0
    done = {}
    if n <= 1:
        for job in jobs:
            done[job] = compile_job(job)
            if on_done:
                on_done(job, done[job])
        return done
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # This process compiles the first (costliest) job while n - 1 workers take the rest: one worker start-up
    # less, and its kernel is then already loaded here.  spawn, not fork: the parent may already run
    # Numba's or our thread pool, which a fork cannot carry over.
    ordered = _costliest_first(jobs)
    with ProcessPoolExecutor(n - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_job, job): job for job in ordered[1:]}
        done[ordered[0]] = compile_job(ordered[0])
        if on_done:
            on_done(ordered[0], done[ordered[0]])
        for fut, job in futures.items():
            done[job] = fut.result()
            if on_done:
                on_done(job, done[job])
    return done


def _costliest_first(jobs: list) -> list:
    # quantizers (scale searches) compile several times longer than dequantizers: start them first; among
    # them Q6_K (7.4 s CPU) before Q4_K (5.4 s): higher type names first is a fair proxy for the k-quants
    weight = {OPTIMIZED: 0, "quantize_imatrix": 0, "quantize": 1, "dequantize": 2}
    return sorted(jobs, key=lambda j: (weight.get(j[1], 3), [-ord(c) for c in j[0]]))


def _idle_core() -> bool:
    """A worker process only helps if a core is free: on a busy machine (1-minute load average above
    cores - 1) it measured slower than compiling in turn (Q4_K + Q6_K at load 3.3 on 2 cores: 14.6 s vs 12.7 s)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return True
    return load <= _worker_count(1 << 16, None) - 1


def _workers_may_start() -> bool:
    """Whether a spawned worker process is safe here.  spawn runs the main script's top level again in each
    worker (as ``__mp_main__``): a user's script without an ``if __name__ == "__main__":`` guard would start
    its whole job again in every worker, and a script read from standard input cannot be run again at all.
    Safe: no main script (a REPL, ``python -c``, an embedding), ``python -m gguf_kquant``, or one of our
    commands (pip writes their launchers with the guard)."""
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:
        return True
    package = __name__.partition(".")[0]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.partition(".")[0] == package:
        return True
    from importlib.metadata import entry_points

    ours = {ep.name for ep in entry_points(group="console_scripts")
            if ep.value.partition(":")[0].partition(".")[0] == package}
    return os.path.basename(path) in ours and os.path.isfile(path)


def warm_for_plan(plan, im=None, report: bool = False, method: str = "llama") -> None:
    """Before a job: compile the plan's missing kernels in parallel worker processes (a no-op when the cache
    is warm, when one kernel is missing, on a one-core or busy machine, with GGUF_KQUANT_NO_WARM set, or when
    a worker would run the caller's script again: :func:`_workers_may_start`).  Any failure here is left for
    the job itself to meet: warming never changes what the job does."""
    if os.environ.get("GGUF_KQUANT_NO_WARM"):
        return
    missing = [j for j in jobs_for_plan(plan, im, report, method) if not is_cached(j)]
    if len(missing) < 2 or _worker_count(len(missing), None) < 2 or not _idle_core() or not _workers_may_start():
        return
    try:
        precompile(missing)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:  # e.g. no way to start processes here: the job compiles what it needs itself
        pass


# ---------------------------------------------------------------------------------------------------
# gguf-kquant precompile
# ---------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("types", nargs="*", metavar="TYPE",
                        help="ggml types whose kernels to compile (Q4_K Q6_K ...); see --all")
    parser.add_argument("--all", action="store_true", help="every type's kernels")
    parser.add_argument("--ops", default=None,
                        help="comma-separated operations: quantize, quantize_imatrix, dequantize, optimized "
                             "(method=\"optimized\"'s refiners) (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: usable cores)")
    parser.add_argument("--clear", action="store_true",
                        help="delete every cached kernel of this package (all the places of `gguf_kquant._jitcache`, "
                             "including what `pip uninstall` leaves behind) instead of compiling")
    parser.add_argument("--quiet", action="store_true", help="print nothing")


def run(args) -> int:
    import sys

    from .errors import GGUFError
    from .types import OPS

    if args.clear:
        if args.types or args.all or args.ops:
            raise GGUFError("--clear takes no types, --all or --ops: it deletes every cached kernel")
        from ._jitcache import clear

        n = clear()
        if not args.quiet:
            print(f"{n} cached kernel files removed", file=sys.stderr)
        return 0
    if bool(args.types) == bool(args.all):
        raise GGUFError("give the types to compile (e.g. Q4_K Q6_K) or --all, not both")
    ops = None if args.ops is None else [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in ops or ():
        if op not in OPS + (OPTIMIZED,):
            raise GGUFError(f"unknown operation {op!r}; one of {', '.join(OPS + (OPTIMIZED,))}")
    if args.jobs is not None and args.jobs < 1:
        raise GGUFError(f"--jobs must be >= 1, got {args.jobs}")
    jobs = jobs_for(None if args.all else args.types, ops)
    todo = [j for j in jobs if not is_cached(j)]

    def say(job, seconds):
        if not args.quiet:
            print(f"{job[0]:>8} {job[1]:<17} {seconds:6.2f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    precompile(todo, processes=args.jobs, on_done=say)
    if not args.quiet:
        print(f"{len(todo)} kernels compiled, {len(jobs) - len(todo)} already cached, "
              f"{time.perf_counter() - t0:.1f} s; cache: {cache_dir()}", file=sys.stderr)
    return 0
