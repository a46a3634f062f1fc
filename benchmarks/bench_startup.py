"""Start-up cost: the README's first command with an empty Numba cache (cold) and again (warm), per mix.

    python benchmarks/bench_startup.py                          # Q4_K_M: cold and warm
    python benchmarks/bench_startup.py --mixes Q4_K_M,Q6_K,Q8_0,IQ4_XS --imatrix --report
    python benchmarks/bench_startup.py --no-warm                # without the job-start parallel compile
    python benchmarks/bench_startup.py --precompile Q4_K,Q6_K   # `gguf-kquant precompile` first, then the job

Every run is a fresh process (``python -m gguf_kquant quantize fixtures/tiny-llama-f16.gguf OUT MIX``) with
``NUMBA_CACHE_DIR`` pointing to a new empty temporary folder for the cold run; the warm run reuses that folder.
Printed per run: wall seconds and CPU seconds (user + system of the process and every worker it waited for:
on a shared machine the CPU figure is the one to compare; wall is what a user on an idle machine sees).
Goal (issue 10): the Q4_K_M command <= 5 s wall on a 2-core machine with an empty cache.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "tiny-llama-f16.gguf"

# --imatrix: the API with an all-ones importance matrix for every tensor (the CLI path needs a file)
IMATRIX_JOB = """
import sys, numpy as np, gguf_kquant
src, dst, mix = sys.argv[1:4]
with gguf_kquant.open(src) as f:
    im = {t.name: np.ones(t.shape[-1], np.float32) for t in f.tensors if len(t.shape) > 1}
gguf_kquant.quantize_model(src, dst, mix, imatrix=im, overwrite=True, quiet=True)
"""


def run(cmd, cache_dir: str, no_warm: bool) -> tuple:
    """(wall s, CPU s) of one fresh process (and the children it waited for)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("GGUF_KQUANT_NO_WARM", None)
    if no_warm:
        env["GGUF_KQUANT_NO_WARM"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def job(mix: str, out: Path, imatrix: bool, report: bool) -> list:
    if imatrix:
        return [sys.executable, "-c", IMATRIX_JOB, str(FIXTURE), str(out), mix]
    cmd = [sys.executable, "-m", "gguf_kquant", "quantize", str(FIXTURE), str(out), mix, "--overwrite", "--quiet"]
    if report:
        cmd += ["--report", str(out) + ".json"]
    return cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", default="Q4_K_M")
    ap.add_argument("--imatrix", action="store_true", help="also each mix with an importance matrix")
    ap.add_argument("--report", action="store_true", help="also each mix with --report")
    ap.add_argument("--no-warm", action="store_true", help="GGUF_KQUANT_NO_WARM=1: no job-start parallel compile")
    ap.add_argument("--precompile", default=None, metavar="TYPES",
                    help="run `gguf-kquant precompile TYPES` (comma-separated) in the empty cache first")
    args = ap.parse_args()
    print(f"{'case':<24} {'cold wall':>10} {'cold CPU':>9} {'warm wall':>10} {'warm CPU':>9}")
    variants = [("", False, False)]
    if args.imatrix:
        variants.append((" imatrix", True, False))
    if args.report:
        variants.append((" --report", False, True))
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for mix in args.mixes.split(","):
            for label, imatrix, report in variants:
                cache = tempfile.mkdtemp(dir=tmp, prefix="numba-")
                out = Path(tmp) / f"out-{mix}.gguf"
                cmd = job(mix, out, imatrix, report)
                pre = ""
                if args.precompile:
                    pw, pc = run([sys.executable, "-m", "gguf_kquant", "precompile", "--quiet",
                                  *args.precompile.split(",")], cache, args.no_warm)
                    pre = f"   (precompile {pw:.1f} s wall, {pc:.1f} s CPU)"
                cw, cc = run(cmd, cache, args.no_warm)
                ww, wc = run(cmd, cache, args.no_warm)
                print(f"{mix + label:<24} {cw:9.2f}s {cc:8.2f}s {ww:9.2f}s {wc:8.2f}s{pre}", flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
