"""gguf-kquant precompile fills Numba's cache: a later process compiles nothing and gets the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.cli import main
from gguf_kquant.precompile import jobs_for, jobs_for_plan

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
    pre = subprocess.run([sys.executable, "-m", "gguf_kquant", "precompile", "Q8_0", "-j", "2"],
                         env=_env(cache), capture_output=True, text=True, timeout=600)
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

    again = subprocess.run([sys.executable, "-m", "gguf_kquant", "precompile", "Q8_0"], env=_env(cache),
                           capture_output=True, text=True, timeout=600)
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
    assert jobs_for(["Q4_K"]) == [("Q4_K", "dequantize"), ("Q4_K", "quantize"), ("Q4_K", "quantize_imatrix")]
    assert jobs_for(["IQ2_XXS"], ops=["quantize"]) == []  # needs an imatrix: no plain quantizer
    assert len(jobs_for()) > 60

    r = gguf_kquant.quantize_model(FIXTURE, tmp_path / "unused.gguf", "Q4_K_M", dry_run=True, quiet=True)
    assert jobs_for_plan(r.plan) == [("Q4_K", "quantize"), ("Q6_K", "quantize")]
    assert jobs_for_plan(r.plan, report=True) == [("Q4_K", "dequantize"), ("Q4_K", "quantize"),
                                                  ("Q6_K", "dequantize"), ("Q6_K", "quantize")]


@pytest.mark.parametrize("argv", [["precompile"], ["precompile", "Q4_K", "--all"], ["precompile", "Q9_K"],
                                  ["precompile", "Q4_K", "--ops", "encode"], ["precompile", "Q4_K", "-j", "0"]])
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
