"""quantize_model(..., client=...) on a LocalCluster: 2 single-threaded workers vs 1, and what that predicts for
a 671B-parameter model on 1, 8 and 32 machines.

    python benchmarks/bench_dask.py                        # ~200 MB F32 model, Q4_K_M
    python benchmarks/bench_dask.py --mix Q6_K --dir /tmp/bench --cores 64 --fs-gbs 10 --nic-gbs 3

Each cluster (``LocalCluster(n_workers=n, threads_per_worker=1, processes=True)``) first quantizes a tiny model
(workers import gguf_kquant and load the kernel cache), then the public API is timed on the big one: plan,
worker probe, tasks, commit.  The 1- and 2-worker outputs must be byte-identical.

Per-worker throughput is the model's parameters over the workers' summed task CPU seconds of the 1-worker
run (``result.worker_cpu_seconds``: one codec thread on one core, reading and writing included) — CPU time,
because on this shared 2-core machine the wall time mostly measures the other jobs.  The parallel
efficiency is the 1-worker run's task CPU time over the 2-worker run's (what splitting the work adds).
The estimate: wall = max(parameters / (throughput * workers * efficiency), bytes moved / file-system
bandwidth, bytes moved / (machines * network card bandwidth)) + a fixed start (cluster probe, headers,
commit: the 1-worker run's wall minus its task time).
Assumptions (options): every machine runs one single-threaded worker per core (``--cores``), the source is
BF16 (2 bytes per parameter, as DeepSeek-V3's 671B after FP8 -> BF16 conversion), the output Q4_K_M-sized
(the measured ratio of output to F32 source bytes), the shared file system delivers ``--fs-gbs`` GB/s in
total and each machine's network card ``--nic-gbs`` GB/s, and the 1-vs-2 efficiency measured here holds for
every added worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize_model import SIZES, build_model  # noqa: E402

PARAMS_671B = 671e9


def timed_run(n_workers: int, src: Path, warm: Path, dst: Path, mix: str):
    """(wall seconds, QuantizeResult) of one quantize_model(client=...) on a fresh n-worker LocalCluster."""
    from distributed import Client, LocalCluster

    import gguf_kquant

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(n_workers)
        gguf_kquant.quantize_model(warm, dst, mix, client=client, overwrite=True)  # imports, kernel cache
        t = time.perf_counter()
        result = gguf_kquant.quantize_model(src, dst, mix, client=client, overwrite=True)
        return time.perf_counter() - t, result


def estimate(params_per_s: float, efficiency: float, start_s: float, out_per_param: float, cores: int,
             fs_gbs: float, nic_gbs: float, machines: int) -> tuple:
    """(wall seconds, bound) for 671B parameters on ``machines`` machines of ``cores`` workers each."""
    workers = machines * cores
    moved = PARAMS_671B * (2 + out_per_param)  # BF16 in, quantized out
    times = {"compute": PARAMS_671B / (params_per_s * workers * (efficiency if workers > 1 else 1.0)),
             "file system": moved / (fs_gbs * 1e9), "network card": moved / (nic_gbs * 1e9 * machines)}
    bound = max(times, key=times.get)
    return start_s + times[bound], bound


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="200MB", choices=sorted(SIZES))
    ap.add_argument("--mix", default="Q4_K_M")
    ap.add_argument("--dir", default="/tmp/gguf_kquant_bench_dask")
    ap.add_argument("--cores", type=int, default=64, help="single-threaded workers per machine (estimate)")
    ap.add_argument("--fs-gbs", type=float, default=10.0, help="shared file system GB/s, all machines (estimate)")
    ap.add_argument("--nic-gbs", type=float, default=3.0, help="GB/s one machine can read+write (25 GbE: ~3)")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    warm = d / "warm.gguf"
    if not warm.exists():
        build_model(warm, 1, 256, 4, 2, 512, 512)
    src = d / f"bench-{args.size}-f32.gguf"
    if not src.exists():
        t = time.perf_counter()
        build_model(src, *SIZES[args.size])
        print(f"built {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    wall1, r1 = timed_run(1, src, warm, d / "one.gguf", args.mix)
    wall2, r2 = timed_run(2, src, warm, d / "two.gguf", args.mix)
    same = (d / "one.gguf").read_bytes() == (d / "two.gguf").read_bytes()
    mib = r1.src_nbytes / 2**20
    print(f"{args.size} F32 -> {args.mix}: 1 worker {wall1:6.2f} s, 2 workers {wall2:6.2f} s -> x{wall1 / wall2:.2f} "
          f"(goal >= 1.7) | identical: {same}")

    busy, cpu1, cpu2 = (sum(r1.worker_seconds.values()), sum(r1.worker_cpu_seconds.values()),
                        sum(r2.worker_cpu_seconds.values()))
    params = r1.n_elements
    params_per_s = params / cpu1
    print(f"per worker (one core): {mib / cpu1:.1f} MiB/s of F32 source per CPU second, {params_per_s / 1e6:.1f} M "
          f"parameters/s ({cpu1:.2f} CPU s of tasks, {busy:.2f} s task wall time, in a {wall1:.2f} s run); "
          f"2 workers: {cpu2:.2f} CPU s of tasks (x{cpu2 / cpu1:.2f} the work) | load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    busy2 = sum(r2.worker_seconds.values())
    print(f"share of a core a running task got: 1 worker {cpu1 / busy:.0%}, 2 workers {cpu2 / busy2:.0%} (on idle "
          f"cores both are near 100% and 2 workers take half the time)")
    by_type = {}
    for r in r1.plan.rows:
        if r.convert:
            s, n = by_type.get(r.dst_type.name, (0.0, 0))
            by_type[r.dst_type.name] = (s + r1.worker_cpu_seconds[r.name], n + r.src_nbytes)
    print("  per output type: " + ", ".join(f"{t} {n / 2**20 / s:.1f} MiB/s" for t, (s, n) in sorted(by_type.items())))

    efficiency = min(1.0, cpu1 / cpu2)  # work added by spreading it (smaller tasks); not the machine's load
    start = max(0.0, wall1 - busy)
    out_per_param = r1.dst_nbytes / params
    print(f"671B parameters, BF16 source ({PARAMS_671B * 2 / 1e12:.2f} TB) -> {args.mix} "
          f"({PARAMS_671B * out_per_param / 1e12:.2f} TB); {args.cores} single-threaded workers per machine, "
          f"{args.fs_gbs:g} GB/s shared file system, {args.nic_gbs:g} GB/s per machine, {efficiency:.0%} parallel "
          f"efficiency (CPU time, 1 vs 2 workers), {start:.1f} s fixed start:")
    for machines in (1, 8, 32):
        wall, bound = estimate(params_per_s, efficiency, start, out_per_param, args.cores, args.fs_gbs,
                               args.nic_gbs, machines)
        print(f"  {machines:3d} machine(s), {machines * args.cores:5d} workers: {wall / 3600:7.2f} h "
              f"({wall / 60:7.1f} min, {bound}-bound)")
    for p in (d / "one.gguf", d / "two.gguf"):
        p.unlink(missing_ok=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
