"""Parallel drivers without Numba's ``parallel=True``: a serial nogil kernel run on Python threads.

A ``prange`` driver costs seconds of compile time of its own (parfor lowering, a gufunc, and a second
optimization of every kernel it calls): measured on Q4_K, 3-4 s of CPU on top of the 3.6 s of the block
kernel, against ~1 s for a plain serial loop.  Since every kernel is ``nogil``, the same work split into
contiguous ranges and run on a small thread pool is as parallel — and the output is the same bytes, since
each block or row is still encoded by one serial function whatever the split.

The thread count is Numba's (``numba.get_num_threads()``, which ``gguf_kquant.set_num_threads`` and the
``threads=`` arguments set), so ``NUMBA_NUM_THREADS`` and those settings keep their meaning.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba

__all__ = ["one_blas_thread", "run_chunks"]

_pool = None
_pool_pid = None
_lock = threading.Lock()
_blas = None


def _get_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child cannot use its parent's threads
            _pool = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1), thread_name_prefix="gguf-kquant")
            _pool_pid = os.getpid()
        return _pool


def run_chunks(kernel, n_items: int, *args) -> None:
    """``kernel(*args, i0, i1)`` over ``[0, n_items)`` in contiguous ranges, one per thread (this thread
    takes the first).  ``kernel`` must be a ``nogil`` Numba function whose result for an item does not
    depend on the range it was given."""
    n = min(numba.get_num_threads(), n_items)
    if n <= 1:
        kernel(*args, 0, n_items)
        return
    bounds = [i * n_items // n for i in range(n + 1)]
    pool = _get_pool()
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, n)]
    try:
        kernel(*args, bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


def one_blas_thread():
    """A context that keeps BLAS (numpy's matrix products) on the calling thread, for work already split over
    our threads: OpenBLAS's own threads spin after each product and take the cores from ours (a size budget's
    measurement on SmolLM2 used 6.2 s of CPU for 3.5 s on two cores with them, 3.4 s for 2.2 without)."""
    global _blas
    from threadpoolctl import ThreadpoolController

    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")
