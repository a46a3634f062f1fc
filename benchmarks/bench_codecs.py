"""Codec speed through the public API, side by side with ggml's single-thread reference, for every type.

    python benchmarks/bench_codecs.py [--quick] [--types Q4_K IQ2_XXS ...] [--rows 512 --cols 4096]

What is timed is what users call: ``gguf_kquant.quantize`` / ``gguf_kquant.dequantize`` (checks, allocation
and kernel), with 1 thread and with 2, against ggml's ``ggml_quantize_chunk`` / ``to_float`` (the oracle
library of tests/oracle.py; single-threaded by construction) on the same normal float32 rows.  Both sides
allocate their output on every call (np.empty).  Ours with 1 thread and ggml run round-robin, then ours
with 2 threads and ggml, keeping the best time of each, so load from other processes on a shared machine
hits both sides alike (the thread count is not switched between calls: that alone costs ~0.1 ms).

Types are the rows of the type table that have kernels (new codec modules appear as they land; a module
that fails to import is reported, not fatal).  Types whose quantizer requires an importance matrix (IQ2_XXS,
IQ2_XS, IQ1_S) get tests/codec_corpus.fixed_imatrix on both sides.  Q8_1 / Q8_K go through ggml's exported
row functions (``ggml_quantize_chunk`` does not take them; ggml has no Q8_1 dequantizer).

Columns: best milliseconds (ours with 1 and 2 threads, ggml), ``x ggml`` = ggml time / our 1-thread time
(> 1: we are faster), ``2/1`` = our 1-thread time / 2-thread time, ``x gguf-py`` = gguf-py's
``gguf.quants.dequantize`` time / ours (timed on a slice of the rows, scaled).  Goals (issue 8): x ggml >= 1.0
both ways, 2/1 >= 1.8.  ``--quick`` (64 rows, fewer rounds) finishes in under two minutes.

On a machine whose cores are busy with other work, the 2-thread column measures the scheduler: numba's
OpenMP threads spin at the end of a parallel region, so a region waits until the other core is free (tens
of ms for sub-ms work).  ``OMP_WAIT_POLICY=PASSIVE`` removes those stalls (then 2/1 shows what the free
cores allow); an idle machine is needed to see the scaling itself.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numba  # noqa: E402

import gguf_kquant  # noqa: E402
import oracle  # noqa: E402
from codec_corpus import fixed_imatrix  # noqa: E402
from gguf_kquant.types import TYPES, GGMLType, Imatrix, TypeInfo, type_info  # noqa: E402

# ggml's row functions for the types ggml_quantize_chunk / to_float do not cover
_QUANTIZE_SYMBOL = {GGMLType.Q8_1: "quantize_row_q8_1_ref", GGMLType.Q8_K: "quantize_row_q8_K_ref"}
_DEQUANTIZE_SYMBOL = {GGMLType.Q8_K: "dequantize_row_q8_K"}
_FP = ctypes.POINTER(ctypes.c_float)


def ggml_functions(info: TypeInfo, x: np.ndarray, raw: np.ndarray, imatrix):
    """Closures running ggml's reference quantize / dequantize on ``x`` / ``raw`` (None where ggml has none).

    As tests/oracle.py's quantize_chunk / to_float, but the output is np.empty like ours (oracle's np.zeros
    would charge ggml for zeroing fresh pages).
    """
    lib = oracle.ggml()
    n_rows, n_per_row = x.shape
    qw = None if imatrix is None else imatrix.ctypes.data
    row_bytes = raw.shape[1]
    if info.ggml_type in _QUANTIZE_SYMBOL:
        qfn = oracle._FROM_FLOAT(ctypes.cast(getattr(lib, _QUANTIZE_SYMBOL[info.ggml_type]), ctypes.c_void_p).value)

        def quantize():
            out = np.empty((n_rows, row_bytes), np.uint8)
            qfn(x.ctypes.data_as(_FP), out.ctypes.data, x.size)
            return out
    else:
        lib.ggml_quantize_init(info.id)

        def quantize():
            out = np.empty((n_rows, row_bytes), np.uint8)
            lib.ggml_quantize_chunk(info.id, x.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, qw)
            return out

    if info.ggml_type in _DEQUANTIZE_SYMBOL:
        to_float = ctypes.cast(getattr(lib, _DEQUANTIZE_SYMBOL[info.ggml_type]), ctypes.c_void_p).value
    else:
        to_float = oracle.type_traits(info.id).to_float
    dequantize = None
    if to_float:
        dfn = oracle._TO_FLOAT(to_float)

        def dequantize():
            y = np.empty((n_rows, n_per_row), np.float32)
            dfn(raw.ctypes.data, y.ctypes.data_as(_FP), y.size)
            return y
    elif info.name == "F32":  # ggml's F32 "to_float" is a copy
        def dequantize():
            return raw.view(np.float32).copy()
    return quantize, dequantize


def ggufpy_dequantize(info: TypeInfo, raw: np.ndarray):
    """gguf-py's dequantize of ``raw`` (None where gguf-py lacks the type or F32, which it returns as is)."""
    import gguf
    import gguf.quants as gq

    if info.name == "F32":
        return None
    try:
        qt = gguf.GGMLQuantizationType(info.id)
        gq.dequantize(raw[:1], qt)
    except Exception:
        return None
    return lambda: gq.dequantize(raw, qt)


def best_of_interleaved(fns: dict, rounds: int, budget: float) -> dict:
    """Best time of each candidate, run round-robin; fewer rounds when one call is slow (within ``budget`` s)."""
    best = {k: float("inf") for k in fns}
    spent = 0.0
    for i in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[k] = min(best[k], dt)
            spent += dt
        if spent > budget:  # at least one round; slow calls (IQ grid searches) get fewer
            break
    return best


def our_functions(info: TypeInfo, x: np.ndarray, raw: np.ndarray, imatrix):
    """{threads: closure} for quantize and dequantize through the public API."""
    q = {nt: (lambda nt=nt: gguf_kquant.quantize(x, info.name, imatrix=imatrix, threads=nt)) for nt in (1, 2)}
    d = {nt: (lambda nt=nt: gguf_kquant.dequantize(raw, info.name, x.shape, threads=nt)) for nt in (1, 2)}
    return q, d


def bench_type(info: TypeInfo, x: np.ndarray, rounds: int, budget: float, gp_rows: int):
    """Rows of the result table for one type: (op, ours1, ours2, ggml, gguf-py) in seconds (nan: none)."""
    imatrix = fixed_imatrix(x.shape[1]) if info.imatrix is Imatrix.REQUIRED else None
    raw = gguf_kquant.quantize(x, info.name, imatrix=imatrix)  # also compiles (or loads the cache)
    gguf_kquant.dequantize(raw, info.name, x.shape)
    g_quant, g_deq = ggml_functions(info, x, raw, imatrix)
    ours_q, ours_d = our_functions(info, x, raw, imatrix)
    ours_q[2](), ours_d[2]()  # warm the 2-thread pool
    results = []
    for op, ours, ggml_fn in (("quant", ours_q, g_quant), ("deq", ours_d, g_deq)):
        best = {"ggml": float("inf")}
        for nt in (1, 2):
            # one thread count per group: switching it between calls costs the next call a thread-team change
            numba.set_num_threads(nt)
            fns = {f"ours{nt}": ours[nt]}
            if ggml_fn is not None:
                fns["ggml"] = ggml_fn
            got = best_of_interleaved(fns, rounds, budget / 2)
            best[f"ours{nt}"] = got[f"ours{nt}"]
            best["ggml"] = min(best["ggml"], got.get("ggml", float("inf")))
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        gp = float("nan")
        if op == "deq":
            n = min(gp_rows, x.shape[0])
            gp_fn = ggufpy_dequantize(info, raw[:n])
            if gp_fn is not None:
                gp = best_of_interleaved({"gp": gp_fn}, 3, budget / 2)["gp"] * x.shape[0] / n
        results.append((op, best["ours1"], best["ours2"], best["ggml"] if ggml_fn else float("nan"), gp))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", help="type names (default: every type of the table with kernels)")
    ap.add_argument("--rows", type=int, help="rows of the input (default 512; 64 with --quick)")
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--rounds", type=int, help="round-robin rounds (default 9; 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small input, few rounds: under two minutes")
    args = ap.parse_args(argv)
    rows = args.rows or (64 if args.quick else 512)
    rounds = args.rounds or (3 if args.quick else 9)
    budget = 0.6 if args.quick else 10.0  # seconds per (type, op) before rounds are cut short
    gp_rows = 16 if args.quick else 64

    infos = [type_info(t) for t in args.types] if args.types else [r for r in TYPES.values() if r.codec]
    x = np.random.default_rng(0).standard_normal((rows, args.cols)).astype(np.float32)
    print(f"{rows} x {args.cols} normal float32 ({x.nbytes / 1e6:.1f} MB); numba {numba.__version__}; "
          f"best of {rounds} interleaved rounds")
    header = (f"{'type':8} {'op':5} {'ours1 ms':>9} {'ours2 ms':>9} {'ggml ms':>9} {'x ggml':>7} {'2/1':>5} "
              f"{'x gguf-py':>9}")
    print(header)
    print("-" * len(header))
    below = []
    for info in infos:
        if args.cols % info.block_size:
            continue
        try:
            results = bench_type(info, x, rounds, budget, gp_rows)
        except Exception as exc:  # a codec still being written must not stop the benchmark
            print(f"{info.name:8} skipped: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        for op, t1, t2, tg, tp in results:
            vs_ggml, scaling, vs_gp = tg / t1, t1 / t2, tp / t1
            print(f"{info.name:8} {op:5} {t1 * 1e3:9.2f} {t2 * 1e3:9.2f} {tg * 1e3:9.2f} {vs_ggml:7.2f} "
                  f"{scaling:5.2f} {vs_gp:9.1f}", flush=True)
            if vs_ggml < 1.0:
                below.append(f"{info.name} {op} {vs_ggml:.2f}x ggml")
            if scaling < 1.8:
                below.append(f"{info.name} {op} {scaling:.2f}x on 2 threads")
    print()
    print(f"numba threading layer: {numba.threading_layer()}")
    print("below goal: " + ("; ".join(below) if below else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
