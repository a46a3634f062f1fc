"""gguf-kquant precompile fills Numba's cache: a later process compiles nothing and gets the same bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.cli import main
from gguf_kquant.precompile import jobs_for, jobs_for_plan
from gguf_kquant.types import GGMLType

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "tiny-llama-f16.gguf"

# Runs in a fresh process: quantize/dequantize Q8_0 (shapes unlike precompile's), count real compiles of our
# kernels (numba fires "numba:compile" only on a cache miss), print them and the bytes as JSON.
CHILD = """
import json, sys, numpy as np
from numba.core import event
compiled = []
class Listener(event.Listener):
    def on_start(self, ev):
        d = ev.data["dispatcher"]
        if d.py_func.__module__.startswith("gguf_kquant"):
            compiled.append(d.py_func.__qualname__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Listener())
import gguf_kquant
x = np.random.default_rng(7).standard_normal((33, 96)).astype(np.float32)
q = gguf_kquant.quantize(x, "Q8_0")
y = gguf_kquant.dequantize(q, "Q8_0", x.shape)
print(json.dumps({"compiled": compiled, "q": q.tobytes().hex(), "y": y.tobytes().hex()}))
"""


def _cache_files(d: Path) -> list:
    return sorted(p.name for p in d.rglob("*") if p.suffix in (".nbi", ".nbc"))


def _env(cache: Path) -> dict:
    return dict(os.environ, NUMBA_CACHE_DIR=str(cache), GGUF_KQUANT_NO_WARM="1")


def test_precompile_fills_the_cache_and_a_later_process_compiles_nothing(tmp_path):
    cache = tmp_path / "numba"
    cache.mkdir()
    pre = subprocess.run([sys.executable, "-m", "gguf_kquant", "precompile", "Q8_0", "--ops", "quantize,dequantize",
                          "-j", "2"], env=_env(cache), capture_output=True, text=True, timeout=600)
    assert pre.returncode == 0, pre.stderr
    assert "2 kernels compiled" in pre.stderr  # Q8_0: quantize here, dequantize in a worker process
    files = _cache_files(cache)
    assert any(".nbi" in f for f in files) and any(".nbc" in f for f in files)

    child = subprocess.run([sys.executable, "-c", CHILD], env=_env(cache), capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    assert got["compiled"] == []
    assert _cache_files(cache) == files  # nothing new written either

    x = np.random.default_rng(7).standard_normal((33, 96)).astype(np.float32)
    q = gguf_kquant.quantize(x, "Q8_0")
    assert bytes.fromhex(got["q"]) == q.tobytes()
    assert bytes.fromhex(got["y"]) == gguf_kquant.dequantize(q, "Q8_0", x.shape).tobytes()

    again = subprocess.run([sys.executable, "-m", "gguf_kquant", "precompile", "Q8_0", "--ops", "quantize,dequantize"],
                           env=_env(cache), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 kernels compiled, 2 already cached" in again.stderr


def test_an_empty_cache_compiles_in_the_child(tmp_path):
    """The counter above can see compiles (so its empty list means something)."""
    cache = tmp_path / "numba"
    cache.mkdir()
    child = subprocess.run([sys.executable, "-c", CHILD], env=_env(cache), capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout)["compiled"]


def test_jobs_for_types_and_plan(tmp_path):
    assert jobs_for(["Q4_K"]) == [("Q4_K", "dequantize"), ("Q4_K", "quantize"), ("Q4_K", "quantize_imatrix"),
                                  ("Q4_K", "optimized")]  # method="optimized"'s refiner
    assert jobs_for(["IQ3_S"], ops=["optimized"]) == []  # written as ggml writes it: no refiner
    assert jobs_for(["IQ2_XXS"], ops=["quantize"]) == []  # needs an imatrix: no plain quantizer
    assert len(jobs_for()) > 60

    r = gguf_kquant.quantize_model(FIXTURE, tmp_path / "unused.gguf", "Q4_K_M", dry_run=True, quiet=True)
    assert jobs_for_plan(r.plan) == [("Q4_K", "quantize"), ("Q6_K", "quantize")]
    assert jobs_for_plan(r.plan, report=True) == [("Q4_K", "dequantize"), ("Q4_K", "quantize"),
                                                  ("Q6_K", "dequantize"), ("Q6_K", "quantize")]
    assert jobs_for_plan(r.plan, method="optimized") == [("Q4_K", "optimized"), ("Q4_K", "quantize"),
                                                         ("Q6_K", "optimized"), ("Q6_K", "quantize")]


def test_error_feedback_warms_the_decoders_and_the_legacy_types_plain_quantizers():
    """It decodes every block it writes, and starts Q4_0/Q5_0/Q4_1/Q5_1 blocks from ggml's plain quantizer and
    IQ4_NL blocks from a max-abs start of its own (compiled with the type's refiner, not ggml's quantizer)."""
    from types import SimpleNamespace as NS

    rows = [NS(name=n, convert=True, dst_type=t, src_type=GGMLType.F32)
            for n, t in (("a", GGMLType.Q5_0), ("b", GGMLType.Q4_K), ("c", GGMLType.IQ4_NL))]
    im = NS(entries={"a": None, "b": None, "c": None}, hessians=object())
    assert jobs_for_plan(NS(rows=rows), im, method="optimized") == [
        ("IQ4_NL", "dequantize"), ("IQ4_NL", "optimized"), ("IQ4_NL", "quantize_imatrix"),
        ("Q4_K", "dequantize"), ("Q4_K", "optimized"), ("Q4_K", "quantize_imatrix"),
        ("Q5_0", "dequantize"), ("Q5_0", "optimized"), ("Q5_0", "quantize"), ("Q5_0", "quantize_imatrix")]
    im.hessians = None  # the refiners alone
    assert jobs_for_plan(NS(rows=rows), im, method="optimized") == [
        ("IQ4_NL", "optimized"), ("IQ4_NL", "quantize_imatrix"),
        ("Q4_K", "optimized"), ("Q4_K", "quantize_imatrix"), ("Q5_0", "optimized"), ("Q5_0", "quantize_imatrix")]
    from gguf_kquant.codecs.optimized import FEEDBACK_STARTS
    from gguf_kquant.precompile import _dispatchers

    start = _dispatchers(FEEDBACK_STARTS[GGMLType.IQ4_NL])
    assert start and start[0].py_func.__name__ == "_plain_iq4_nl_rows"  # what is_cached checks for the job


FEEDBACK_PLAN_JOB = """
import json
from gguf_kquant import precompile as pc
job = ("Q8_0", "optimized")
before = pc.is_cached(job)
pc.compile_job(job)
print(json.dumps([before, pc.is_cached(job)]))
"""


def test_the_optimized_job_compiles_error_feedbacks_factor_unpacking(tmp_path):
    """A Hessian file's factor is unpacked by a kernel of its own (gptq._unpack_upper_rows): the optimized job
    compiles it, and the job is not cached without it."""
    cache = tmp_path / "numba"
    cache.mkdir()
    child = subprocess.run([sys.executable, "-c", FEEDBACK_PLAN_JOB], env=_env(cache), capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == [False, True]
    assert "gptq._unpack_upper_rows" in " ".join(_cache_files(cache))


@pytest.mark.parametrize("argv", [["precompile"], ["precompile", "Q4_K", "--all"], ["precompile", "Q9_K"],
                                  ["precompile", "Q4_K", "--ops", "encode"], ["precompile", "Q4_K", "-j", "0"],
                                  ["precompile", "--clear", "Q4_K"]])
def test_precompile_misuse_is_one_line(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("gguf-kquant precompile: error:") and err.count("\n") == 1


def test_threaded_checks_name_the_row_whatever_the_split():
    x = np.ones((37, 64), np.float32)
    x[29, 5] = np.inf
    for threads in (1, 2):
        with pytest.raises(gguf_kquant.BadTensorDataError, match="row 29, column 5"):
            gguf_kquant.quantize(x, "Q8_0", threads=threads)


WARM = """
import json, sys
from types import SimpleNamespace as NS
from gguf_kquant import precompile as pc
from gguf_kquant.types import GGMLType as T
pc._idle_core = lambda: True  # the shared test machine is rarely idle; the decision is not under test here
rows = [NS(name="a", src_type=T.F32, dst_type=T.Q8_0, convert=True),
        NS(name="b", src_type=T.F32, dst_type=T.F16, convert=True),
        NS(name="c", src_type=T.F32, dst_type=T.F32, convert=False)]
jobs = pc.jobs_for_plan(NS(rows=rows))
before = [pc.is_cached(j) for j in jobs]
pc.warm_for_plan(NS(rows=rows))
print(json.dumps({"jobs": jobs, "before": before, "after": [pc.is_cached(j) for j in jobs]}))
"""


def test_warm_for_plan_compiles_the_missing_kernels_in_parallel_processes(tmp_path):
    cache = tmp_path / "numba"
    cache.mkdir()
    env = dict(_env(cache))
    env.pop("GGUF_KQUANT_NO_WARM")
    child = subprocess.run([sys.executable, "-c", WARM], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    assert got["jobs"] == [["F16", "quantize"], ["Q8_0", "quantize"]]
    assert got["before"] == [False, False] and got["after"] == [True, True]
    names = " ".join(_cache_files(cache))
    assert "floats._quantize_f16_rows" in names and "legacy._quantize_q8_0_rows" in names


def test_warm_for_plan_starts_no_worker_that_would_run_the_callers_script_again(tmp_path):
    """spawn runs the main script's top level again in each worker: a conversion script without a __main__
    guard would start its whole job again there.  From such a script the kernels are compiled by the job
    itself, as without warming (from ``python -c`` above, workers compile them)."""
    cache = tmp_path / "numba"
    cache.mkdir()
    env = dict(_env(cache))
    env.pop("GGUF_KQUANT_NO_WARM")
    script = tmp_path / "convert.py"
    script.write_text("print('top level ran')" + WARM)
    child = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    assert child.stdout.count("top level ran") == 1, child.stdout
    assert "Traceback" not in child.stderr, child.stderr
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["before"] == [False, False] and got["after"] == [False, False]  # no worker compiled them


# ------------------------------------------------------------------------------------------------------
# the package's own cache (gguf_kquant/_jitcache.py): inside the package, keyed by source content, shipped
# in the wheel.  Each test works on a copy of the package, never on this tree's cache.
# ------------------------------------------------------------------------------------------------------
# Runs in a fresh process on a copy of the package: quantize Q8_0 as CHILD does, report real compiles, the
# cache folder, and the cache hits of the Q8_0 row kernel.  READ_ONLY=1 simulates a read-only installation
# (root can write anywhere): the locator's writability test answers False inside the package.
COPY_CHILD = CHILD.replace("import gguf_kquant\n", """
import os
if os.environ.get("READ_ONLY"):
    import importlib.util
    spec = importlib.util.spec_from_file_location("gguf_kquant._jitcache", os.environ["PKG"] + "/_jitcache.py")
    jc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = jc
    spec.loader.exec_module(jc)
    _w = jc._writable
    jc._writable = lambda p: False if p.startswith(os.environ["PKG"]) else _w(p)
import gguf_kquant
""", 1).replace('print(json.dumps({', """from gguf_kquant.codecs import legacy
from gguf_kquant.precompile import cache_dir
print(json.dumps({"dir": cache_dir(), "file": gguf_kquant.__file__,
                  "hits": sum(legacy._quantize_q8_0_rows.stats.cache_hits.values()),""", 1)


def _copy_package(dest: Path, preserve_mtimes: bool = True) -> Path:
    """A copy of the package without any cache; copied like pip does (new mtimes) unless preserve_mtimes."""
    shutil.copytree(ROOT / "gguf_kquant", dest / "gguf_kquant",
                    ignore=shutil.ignore_patterns("__pycache__", "_nbcache"),
                    copy_function=shutil.copy2 if preserve_mtimes else shutil.copyfile)
    return dest / "gguf_kquant"


def _run_copy(site: Path, tmp_path: Path, code: str = COPY_CHILD, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "xdg"), GGUF_KQUANT_NO_WARM="1",
               PKG=str(site / "gguf_kquant"), **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=site, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["file"] == str(site / "gguf_kquant" / "__init__.py")
    return got


WHERE = """
import json, gguf_kquant
from gguf_kquant.precompile import cache_dir
print(json.dumps({"dir": cache_dir(), "file": gguf_kquant.__file__}))
"""

BUILD = """
from gguf_kquant.precompile import build_cache
build_cache(processes=1, jobs=[("Q8_0", "quantize"), ("Q8_0", "dequantize")])
"""


def test_a_built_cache_loads_after_installation_and_is_keyed_by_content(tmp_path):
    """setup.py's build step on a tiny subset, then the "installed" copy (elsewhere, new mtimes) compiles
    nothing; touching a source keeps the entries; changing its content recompiles its kernels."""
    build = tmp_path / "build"
    _copy_package(build)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", BUILD], env=dict(env, PYTHONPATH=str(build)), cwd=build,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = _cache_files(build / "gguf_kquant" / "_nbcache")
    assert any("legacy._quantize_q8_0_rows" in f for f in built)

    site = tmp_path / "site"  # installed: a different path, every file with a new mtime, the cache with it
    shutil.copytree(build / "gguf_kquant", site / "gguf_kquant", copy_function=shutil.copyfile)
    got = _run_copy(site, tmp_path)
    assert got["dir"] == str(site / "gguf_kquant" / "_nbcache" / "codecs")
    assert got["compiled"] == [] and got["hits"] == 1
    assert _cache_files(site / "gguf_kquant" / "_nbcache") == built

    other_cpu = _run_copy(site, tmp_path, NUMBA_CPU_NAME="generic")  # another CPU model: a miss, added
    assert "_quantize_q8_0_rows" in other_cpu["compiled"] and other_cpu["q"] == got["q"]
    assert _run_copy(site, tmp_path)["compiled"] == []  # this CPU's entries are still there

    legacy = site / "gguf_kquant" / "codecs" / "legacy.py"
    st = legacy.stat()
    os.utime(legacy, (st.st_atime + 1000, st.st_mtime + 1000))
    assert _run_copy(site, tmp_path)["compiled"] == []

    legacy.write_text(legacy.read_text() + "\n# changed\n")
    got = _run_copy(site, tmp_path)
    assert "_quantize_q8_0_rows" in got["compiled"] and got["hits"] == 0
    assert "fp32_to_fp16_bits" not in got["compiled"]  # helpers.py unchanged: still loaded from the cache


def test_the_cache_is_in_the_package_when_writable_else_per_user_seeded_from_it(tmp_path):
    site = tmp_path / "site"
    pkg = _copy_package(site, preserve_mtimes=False)
    first = _run_copy(site, tmp_path)
    assert first["dir"] == str(pkg / "_nbcache" / "codecs") and first["compiled"]
    shipped = _cache_files(pkg / "_nbcache")

    ro = _run_copy(site, tmp_path, READ_ONLY="1")
    user = Path(ro["dir"])
    assert user.parent.parent == tmp_path / "xdg" / "gguf-kquant" and user.name == "codecs"
    assert ro["compiled"] == [] and ro["hits"] == 1  # the shipped entries, copied to the user folder
    assert set(shipped) <= set(_cache_files(user)) and _cache_files(pkg / "_nbcache") == shipped

    assert ro["q"] == first["q"] and ro["y"] == first["y"]

    nc = tmp_path / "numba-cache-dir"  # NUMBA_CACHE_DIR wins over both (Numba's own layout there)
    mine = _run_copy(site, tmp_path, code=WHERE, NUMBA_CACHE_DIR=str(nc))
    assert Path(mine["dir"]).parent == nc
    for f in (pkg / "_nbcache" / "codecs").iterdir():  # entries as a run there would have written them
        shutil.copy(f, mine["dir"])

    n = len(shipped) + len(_cache_files(user)) + len(_cache_files(nc))
    clear = subprocess.run([sys.executable, "-m", "gguf_kquant", "precompile", "--clear"], cwd=site,
                           env=dict({k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"},
                                    PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "xdg"),
                                    NUMBA_CACHE_DIR=str(nc)),
                           capture_output=True, text=True, timeout=600)
    assert clear.returncode == 0, clear.stderr
    assert f"{n} cached kernel files removed" in clear.stderr
    assert not _cache_files(pkg) and not _cache_files(tmp_path / "xdg") and not _cache_files(nc)
