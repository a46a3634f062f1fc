"""Six mixes of one model in one pass vs six llama_model_quantize runs (same threads): wall time, peak RSS.

    python benchmarks/bench_multi_output.py                  # ~200 MB F32 model
    python benchmarks/bench_multi_output.py --size 2GB       # the ~2 GB model (run it once at most)
    python benchmarks/bench_multi_output.py --threads 2 --mixes Q4_K_M,Q6_K --dir /tmp/bench

Goals (issue 12): wall ≤ 0.7x the sum of the six oracle runs, and peak RSS ≤ our single run's peak (the
largest of the six) + one output tensor (the largest) per extra output.  Every run is a fresh subprocess
(bench_quantize_model.measure: ru_maxrss of the child); the one-pass outputs are compared byte for byte
with the oracle's.

Measured on the 2-core machine shared with other jobs (load 4-10, so single timings vary by up to 2x):

    200MB, 2 threads: one pass 16.3 s vs 31.3 s for six oracle runs (x0.52); peak RSS 256 MiB, budget 257
    2GB,   2 threads: one pass 120 s vs 294 s (x0.41; our six single runs: 171 s); peak RSS 340 MiB, budget 556
    outputs identical to llama_model_quantize's in both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize_model import IDLE, ORACLE, OURS, SIZES, build_model, measure  # noqa: E402

SIX = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
MULTI = """
import sys, gguf_kquant
mixes, d = sys.argv[2].split(","), sys.argv[3]
gguf_kquant.quantize_model(sys.argv[1], {f"{d}/multi-{m}.gguf": m for m in mixes}, threads=int(sys.argv[4]),
                           overwrite=True)
"""


def largest_tensor(paths) -> int:
    import gguf_kquant

    n = 0
    for p in paths:
        with gguf_kquant.open(p) as f:
            n = max([n] + [t.nbytes for t in f.tensors])
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="200MB", choices=sorted(SIZES))
    ap.add_argument("--mixes", default=",".join(SIX))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/gguf_kquant_bench_multi")
    args = ap.parse_args(argv)
    mixes = args.mixes.split(",")
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    warm = d / "warm.gguf"  # numba's cache warmed for every type, so compile time is not billed
    if not warm.exists():
        build_model(warm, 1, 256, 4, 2, 512, 512)
    measure(MULTI, warm, ",".join(mixes), d, args.threads)
    _, idle = measure(IDLE)
    src = d / f"bench-{args.size}-f32.gguf"
    (d / "single.gguf").unlink(missing_ok=True)
    if not src.exists():
        t = time.perf_counter()
        build_model(src, *SIZES[args.size])
        print(f"built {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    print(f"{args.size} F32 source, {len(mixes)} mixes, {args.threads} threads; python + imports: {idle:.0f} MiB")
    oracle_wall, ours_rss = 0.0, 0.0
    for m in mixes:
        o_wall, o_rss = measure(ORACLE, src, d / f"oracle-{m}.gguf", m, args.threads)
        s_wall, s_rss = measure(OURS, src, d / "single.gguf", m, args.threads)
        (d / "single.gguf").unlink()
        oracle_wall += o_wall
        ours_rss = max(ours_rss, s_rss)
        print(f"  {m:<7s} oracle {o_wall:6.2f} s {o_rss:5.0f} MiB | ours single {s_wall:6.2f} s {s_rss:5.0f} MiB")
    wall, rss = measure(MULTI, src, ",".join(mixes), d, args.threads)
    outs = [d / f"multi-{m}.gguf" for m in mixes]
    same = all(p.read_bytes() == (d / f"oracle-{m}.gguf").read_bytes() for p, m in zip(outs, mixes))
    tensor = largest_tensor(outs) / 2**20
    budget = ours_rss + (len(mixes) - 1) * tensor
    print(f"one pass: {wall:6.2f} s vs {oracle_wall:6.2f} s for {len(mixes)} oracle runs -> x{wall / oracle_wall:.2f} "
          f"(goal <= 0.70) | peak RSS {rss:.0f} MiB vs budget {budget:.0f} MiB (single run {ours_rss:.0f} + "
          f"{len(mixes) - 1} x {tensor:.1f} MiB) | identical to the oracle: {same}")
    for p in outs + [d / f"oracle-{m}.gguf" for m in mixes]:
        p.unlink(missing_ok=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
