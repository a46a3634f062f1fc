"""Codec throughput: ours (1 thread and all threads) vs ggml's C reference vs gguf-py's numpy codecs.

    python benchmarks/bench_codecs.py [--types Q4_0 Q4_K ...] [--rows 1024 --cols 4096] [--no-startup]

Throughput is MB/s of float32 (input of quantize, output of dequantize) on normal random data.  Every type
of the table that has kernels is measured.  ggml's numbers come from the oracle library (libggml-base of
llama-cpp-python): ``ggml_quantize_chunk`` and the type's ``to_float``, single-threaded (they are).  gguf-py is
timed on a slice of the rows (it is slow) and scaled.  Our numbers are the kernels alone (the public API adds
a finiteness scan and an fp16-overflow scan on top).

Goals: quantize >= 1.0x ggml single-thread, dequantize >= 1.0x ggml, >= 20x gguf-py dequantize, >= 1.8x from
1 to 2 threads.  Also prints the cold compile time of one type (fresh process, empty NUMBA_CACHE_DIR) and
the warm ``import gguf_kquant`` + first quantize time (fresh process, warm cache).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numba  # noqa: E402

import gguf_kquant  # noqa: E402
from gguf_kquant.types import TYPES, type_info  # noqa: E402


def _best(fn, min_time=0.3, max_reps=20, min_reps=3):
    """Best wall time of repeated calls (the machine is shared; the minimum is the least disturbed)."""
    best = float("inf")
    spent = 0.0
    reps = 0
    while reps < min_reps or (spent < min_time and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        reps += 1
    return best


def _best_interleaved(fns: dict, rounds=7):
    """Best time of each candidate, measured round-robin so that load from other processes hits all alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, (setup, fn) in fns.items():
            setup()
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return best


def _kernels(info):
    """(quantize, dequantize) kernels of a type, or None where it has none (or its module fails to import)."""
    got = []
    for op in ("quantize", "dequantize"):
        try:
            got.append(info.kernel(op))
        except Exception:  # a codec module still being written must not stop the benchmark
            got.append(None)
    return got


_keep_alive: list = []


def _ggml_fns(info, x, raw):
    """Closures timing ggml's reference quantize and to_float for this type (None where ggml has none)."""
    import oracle

    lib = oracle.ggml()
    n_rows, n_per_row = x.shape
    out = np.empty_like(raw)
    y = np.empty_like(x)
    xp, op_, rp, yp = x.ctypes.data, out.ctypes.data, raw.ctypes.data, y.ctypes.data
    fp = ctypes.POINTER(ctypes.c_float)
    _keep_alive.extend([out, y])  # the closures hold raw addresses only
    if info.name == "Q8_K":
        qfn = oracle._FROM_FLOAT(ctypes.cast(lib.quantize_row_q8_K_ref, ctypes.c_void_p).value)
        dfn = oracle._TO_FLOAT(ctypes.cast(lib.dequantize_row_q8_K, ctypes.c_void_p).value)
        quant = lambda: qfn(ctypes.cast(xp, fp), op_, x.size)  # noqa: E731
        deq = lambda: dfn(rp, ctypes.cast(yp, fp), x.size)  # noqa: E731
        return quant, deq
    if info.name == "Q8_1":
        qfn = oracle._FROM_FLOAT(ctypes.cast(lib.quantize_row_q8_1_ref, ctypes.c_void_p).value)
        quant = lambda: qfn(ctypes.cast(xp, fp), op_, x.size)  # noqa: E731
    else:
        lib.ggml_quantize_init(info.id)
        quant = lambda: lib.ggml_quantize_chunk(info.id, xp, op_, 0, n_rows, n_per_row, None)  # noqa: E731
    to_float = oracle.type_traits(info.id).to_float
    deq = None
    if to_float:
        dfn = oracle._TO_FLOAT(to_float)
        deq = lambda: dfn(rp, ctypes.cast(yp, fp), x.size)  # noqa: E731
    return quant, deq


def _ggufpy_fns(info, x, raw, n_sub):
    import gguf
    import gguf.quants as gq

    qt = gguf.GGMLQuantizationType(info.id)
    if info.name == "F32":  # gguf-py's F32 "codec" returns its input: nothing to compare
        return None, None
    xs, rs = x[:n_sub], raw[:n_sub]
    quant = deq = None
    try:
        gq.quantize(xs, qt)
        quant = lambda: gq.quantize(xs, qt)  # noqa: E731
    except Exception:
        pass
    try:
        gq.dequantize(rs, qt)
        deq = lambda: gq.dequantize(rs, qt)  # noqa: E731
    except Exception:
        pass
    return quant, deq


def _startup_times():
    """(cold compile + first quantize of one type, warm import + first quantize), each in a fresh process."""
    qtype = "Q4_K"
    if _kernels(type_info(qtype))[0] is None:
        qtype = "Q4_0"
    code = (
        "import time; t0 = time.perf_counter(); import numpy as np, gguf_kquant; "
        f"gguf_kquant.quantize(np.ones((4, 256), np.float32), {qtype!r}); print(time.perf_counter() - t0)"
    )

    def run(env):
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
        if res.returncode:
            return float("nan")
        return float(res.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as cache:
        cold = run(dict(os.environ, NUMBA_CACHE_DIR=cache))
    run(dict(os.environ))  # make sure the normal cache is warm
    warm = run(dict(os.environ))
    return qtype, cold, warm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", help="type names (default: every type with kernels)")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--ggufpy-rows", type=int, default=256, help="rows given to gguf-py (it is slow; scaled)")
    ap.add_argument("--no-startup", action="store_true", help="skip the compile / import timings")
    args = ap.parse_args(argv)

    infos = [type_info(t) for t in args.types] if args.types else list(TYPES.values())
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    mb = x.nbytes / 1e6
    max_threads = numba.config.NUMBA_NUM_THREADS
    n_sub = min(args.ggufpy_rows, args.rows)

    header = (f"{'type':6} {'op':5} {'ours1':>8} {'ours2':>8} {'ggml':>8} {'gguf-py':>8} "
              f"{'/ggml':>6} {'/gguf':>7} {'1->2':>5}")
    print(f"data: {args.rows} x {args.cols} float32 normal ({mb:.1f} MB); MB/s of float32; "
          f"ours1 = 1 thread, ours2 = {max_threads} threads; numba {numba.__version__}")
    print(header)
    print("-" * len(header))
    shortfalls = []
    for info in infos:
        if args.cols % info.block_size:
            continue
        qk, dk = _kernels(info)
        if qk is None and dk is None:
            continue
        raw = np.empty((args.rows, info.row_bytes(args.cols)), np.uint8)
        if qk is not None:
            qk(x, raw)  # warm-up: compiles (or loads from cache)
        else:
            raw[:] = gguf_kquant.quantize(x, "Q8_0").reshape(-1)[: raw.size].reshape(raw.shape)
        y = np.empty_like(x)
        if dk is not None:
            dk(raw, y)
        ggml_q, ggml_d = _ggml_fns(info, x, raw)
        gp_q, gp_d = _ggufpy_fns(info, x, raw, n_sub)
        for op, kern, ggml_fn, gp_fn in (("quant", qk, ggml_q, gp_q), ("deq", dk, ggml_d, gp_d)):
            if kern is None:
                continue
            a, b = (x, raw) if op == "quant" else (raw, y)
            cands = {nt: (lambda nt=nt: numba.set_num_threads(nt), lambda: kern(a, b)) for nt in {1, max_threads}}
            if ggml_fn:
                cands["ggml"] = (lambda: None, ggml_fn)
            best = _best_interleaved(cands)
            rates = {nt: mb / best[nt] for nt in {1, max_threads}}
            r_ggml = mb / best["ggml"] if ggml_fn else float("nan")
            r_gp = (mb * n_sub / args.rows) / _best(gp_fn, min_time=0.2, min_reps=2) if gp_fn else float("nan")
            r1, rn = rates[1], rates[max_threads]
            vs_ggml, vs_gp, speedup = r1 / r_ggml, r1 / r_gp, rn / r1
            print(f"{info.name:6} {op:5} {r1:8.0f} {rn:8.0f} {r_ggml:8.0f} {r_gp:8.1f} "
                  f"{vs_ggml:6.2f} {vs_gp:7.1f} {speedup:5.2f}")
            if vs_ggml < 1.0:
                shortfalls.append(f"{info.name} {op}: {vs_ggml:.2f}x ggml")
            if op == "deq" and vs_gp < 20:
                shortfalls.append(f"{info.name} {op}: {vs_gp:.1f}x gguf-py")
            if max_threads >= 2 and speedup < 1.8:
                shortfalls.append(f"{info.name} {op}: {speedup:.2f}x from 1 to {max_threads} threads")
    print()
    print("below goal: " + ("; ".join(shortfalls) if shortfalls else "none"))
    if not args.no_startup:
        qtype, cold, warm = _startup_times()
        print(f"cold compile + first quantize of {qtype} (empty NUMBA_CACHE_DIR): {cold:.2f} s")
        print(f"warm `import gguf_kquant` + first quantize of {qtype}: {warm:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
