"""Start-up cost: first use of each mix, imatrix and --report path, with and without the shipped kernel cache.

    python benchmarks/bench_startup.py                                   # this interpreter's gguf_kquant
    python benchmarks/bench_startup.py --python /tmp/fr/bin/python \\
        --mixes Q4_K_M,Q2_K,Q3_K_M,Q5_K_M,Q6_K,Q8_0,IQ4_XS --imatrix --report   # an installed wheel
    python benchmarks/bench_startup.py --no-warm                         # without the job-start parallel compile

Every run is a fresh process of ``--python`` (an interpreter whose ``gguf_kquant`` is the one to measure:
``pip install .`` into a fresh venv ships the compiled kernels inside the package, see setup.py):

* **shipped**: the package's own cache as installed (``gguf_kquant/_nbcache``), ``NUMBA_CACHE_DIR`` unset and
  an empty ``XDG_CACHE_HOME``; the package's cache folder is restored to its installed state after each
  case, so every case is a true first use.  ``new`` counts the cache files the run wrote (kernels it had to
  compile: 0 when the wheel carries everything the case needs).
* **no shipped cache**: ``NUMBA_CACHE_DIR`` = a new empty folder (cold), then the same folder again (warm):
  what a fresh install costs without the shipped kernels (an editable install, or another CPU model).

The first case is the README's first command: ``gguf-kquant quantize ... Q4_K_M`` then ``gguf-kquant inspect``
(two processes, times summed).  Imatrix cases use an importance-matrix file (llama.cpp's legacy format, all
ones) with ``--imatrix``.  Times are wall and CPU (user + system of the process and every worker it waited
for; on a shared machine CPU is the figure to compare).  Goal (issue 10): the first command <= 5 s wall on a
2-core machine, and no first-use stall above 2 s.

Measured (2026-12-01, 2 cores shared with other jobs, load average 5-12; wheel built by ``pip install`` of a
clean clone; ``--mixes Q4_K_M,Q6_K,Q8_0,IQ4_XS,IQ2_XS --imatrix --report``):

    case                     shipped wall    CPU  new | no shipped: cold wall    CPU warm wall    CPU
    README Q4_K_M+inspect           2.20s   1.4s    0 |                42.17s  18.5s     4.41s   1.6s
    Q4_K_M imatrix                  1.96s   1.1s    0 |                24.52s  10.9s     3.78s   1.3s
    Q4_K_M --report                 6.59s   2.2s    0 |                75.77s  18.9s     4.25s   2.0s
    Q6_K --report                   3.82s   2.1s    0 |                18.25s  12.4s     2.30s   2.2s
    IQ4_XS --report                 2.66s   1.9s    0 |                28.36s  17.6s     2.72s   1.9s
    IQ2_XS --report +im             2.47s   2.6s    0 |                37.09s  28.8s     3.32s   3.2s

With the shipped cache a first use costs what a warm run does (CPU within noise; 0 kernels compiled).  Every
mix (35) x {plain, imatrix, --report} with ``--no-cold``: 0 kernels compiled, 0.6-2.6 s CPU per run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "tiny-llama-f16.gguf"

WRITE_IMATRIX = """
import sys, numpy as np, gguf_kquant
from gguf_kquant.model.imatrix import write_legacy_imatrix
with gguf_kquant.open(sys.argv[1]) as f:
    im = {t.name: np.ones(t.shape[-1], np.float32) for t in f.tensors if len(t.shape) > 1}
write_legacy_imatrix(sys.argv[2], im)
"""
WHERE = "import gguf_kquant._jitcache as j; print(j.package_cache_dir())"


class Failed(Exception):
    pass


def run(cmds: list, env: dict) -> tuple:
    """(wall s, CPU s) of fresh processes run in turn (and the children they waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for cmd in cmds:
        p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode:  # e.g. a mix that needs an importance matrix
            raise Failed(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cases(py: str, mixes: list, imatrix: Path, report: bool, out: Path) -> list:
    """(label, commands) per case; the first is the README's first command."""
    q = [py, "-m", "gguf_kquant", "quantize", "--overwrite", "--quiet", str(FIXTURE)]
    out_cases = [("README Q4_K_M+inspect", [q + [str(out), "Q4_K_M"], [py, "-m", "gguf_kquant", "inspect", str(out)]])]
    for mix in mixes:
        out_cases.append((mix, [q + [str(out), mix]]))
        if imatrix:
            out_cases.append((f"{mix} imatrix", [q + [str(out), mix, "--imatrix", str(imatrix)]]))
        if report:
            out_cases.append((f"{mix} --report", [q + [str(out), mix, "--report", str(out) + ".json"]]))
    return out_cases


NEEDS_IMATRIX = """
import sys
from gguf_kquant.model import mixes
mix = sys.argv[1]
print(mixes.MIXES.get(mix, (None, None))[1] in mixes.IMATRIX_REQUIRED[None] or mix in mixes.IMATRIX_REQUIRED)
"""


def needs_imatrix(py: str, mix: str, env: dict) -> bool:
    """llama-quantize refuses these mixes without an importance matrix (asked of the measured package)."""
    if mix == "README":
        return False
    out = subprocess.run([py, "-c", NEEDS_IMATRIX, mix], env=env, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def _files(d: Path) -> set:
    return {p for p in d.rglob("*") if p.suffix in (".nbi", ".nbc")} if d.is_dir() else set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter whose gguf_kquant to measure")
    ap.add_argument("--mixes", default="Q4_K_M")
    ap.add_argument("--imatrix", action="store_true", help="also each mix with an importance-matrix file")
    ap.add_argument("--report", action="store_true", help="also each mix with --report")
    ap.add_argument("--no-warm", action="store_true", help="GGUF_KQUANT_NO_WARM=1: no job-start parallel compile")
    ap.add_argument("--no-cold", action="store_true", help="skip the no-shipped-cache columns (the slow ones)")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME",
                                                             "GGUF_KQUANT_NO_WARM")}
    if args.no_warm:
        base["GGUF_KQUANT_NO_WARM"] = "1"
    shipped = Path(subprocess.run([args.python, "-c", WHERE], env=base, check=True, capture_output=True,
                                  text=True).stdout.strip())
    print(f"package cache: {shipped} ({len(_files(shipped))} files as installed)")
    print(f"{'case':<24} {'shipped wall':>12} {'CPU':>6} {'new':>4} | {'no shipped: cold wall':>21} {'CPU':>6}"
          f" {'warm wall':>9} {'CPU':>6}")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        tmp = Path(tmp)
        pristine = tmp / "pristine"
        if shipped.is_dir():
            shutil.copytree(shipped, pristine)
        imatrix = None
        if args.imatrix:
            imatrix = tmp / "imatrix.dat"
            subprocess.run([args.python, "-c", WRITE_IMATRIX, str(FIXTURE), str(imatrix)], env=base, check=True)
        for label, cmds in cases(args.python, args.mixes.split(","), imatrix, args.report, tmp / "out.gguf"):
            if needs_imatrix(args.python, label.split()[0], base):
                if not imatrix or "imatrix" in label:
                    continue  # no importance matrix given, or the same run as the mix's "+im" row
                label, cmds = label + " +im", [c + ["--imatrix", str(imatrix)] for c in cmds]
            xdg = tempfile.mkdtemp(dir=tmp, prefix="xdg-")
            had = _files(shipped)
            try:
                sw, sc = run(cmds, dict(base, XDG_CACHE_HOME=xdg))
            except Failed as e:
                print(f"{label:<24} failed: {e}", flush=True)
                continue
            finally:
                new = len(_files(shipped) - had) + len(_files(Path(xdg)))
                if pristine.is_dir():  # the next case meets the cache as installed again
                    shutil.rmtree(shipped)
                    shutil.copytree(pristine, shipped)
            line = f"{label:<24} {sw:11.2f}s {sc:5.1f}s {new:4d} |"
            if not args.no_cold:
                env = dict(base, NUMBA_CACHE_DIR=tempfile.mkdtemp(dir=tmp, prefix="numba-"))
                cw, cc = run(cmds, env)
                ww, wc = run(cmds, env)
                line += f" {cw:20.2f}s {cc:5.1f}s {ww:8.2f}s {wc:5.1f}s"
            print(line, flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
