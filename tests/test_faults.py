"""Fault injection for every command that writes: quantize, convert and write.

* SIGKILL, SIGTERM, SIGINT (and SIGHUP) at a random point of the work, in a subprocess: afterwards the
  target is untouched or complete, the inputs are byte-identical and no temp file is left (except after
  SIGKILL, which cannot be caught); the exit status is the signal's (SIGINT: 130 from the CLI).
* A signal between the renames of a multi-file commit: held back until the commit is complete.
* Disk full (RLIMIT_FSIZE; Python ignores SIGXFSZ, so write() fails with EFBIG): one line naming the file.
* Two writers to one target: the target is one of the two complete files.
* Every way an output can name an input: refused before any output file is created.

The random points come from FAULT_SEED (printed in every failure message; set it to replay a run).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant import safeio
from gguf_kquant.errors import ConversionError, GGUFIOError, QuantizeError
from gguf_kquant.model.imatrix import write_legacy_imatrix

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "fixtures" / "tiny-llama-f16.gguf"
SEED = int(os.environ.get("FAULT_SEED", random.randrange(2**32)))
PRECIOUS = b"precious old output"

# The child runs one job and sends itself `signal` once `at` bytes were written (point "bytes"), or
# right after the first rename of the commit (point "commit").  It prints SENT just before.
CHILD = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
from gguf_kquant import safeio

sent = []
def fire():
    if not sent:
        sent.append(1)
        print("SENT", flush=True)
        os.kill(os.getpid(), cfg["signal"])

if cfg["point"] == "bytes":
    write, done = safeio._TargetFile.write, [0]
    def counting_write(self, data):
        n = write(self, data)
        done[0] += memoryview(data).nbytes
        if done[0] >= cfg["at"]:
            fire()
        return n
    safeio._TargetFile.write = counting_write
elif cfg["point"] == "commit":
    replace = os.replace
    def replace_then_signal(a, b):
        replace(a, b)
        fire()
    os.replace = replace_then_signal

if cfg["op"] == "write":
    import signal
    import gguf_kquant
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # as in a program that embeds Python: the library ignores it
    try:
        with gguf_kquant.open(cfg["src"]) as f:
            gguf_kquant.write(cfg["dst"], f.metadata, f.tensors, split_max_tensors=cfg["split"])
    except gguf_kquant.GGUFError as exc:
        print("ERROR", type(exc).__name__, getattr(exc, "errno", None), exc, flush=True)
        sys.exit(1)
    sys.exit(0)
from gguf_kquant.cli import main
sys.exit(main(cfg["argv"]))
"""


def digest(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def temps(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(safeio.TEMP_PREFIX))


# ------------------------------------------------------------------------------------------------------
# The jobs, with their inputs and the outputs a clean run gives
# ------------------------------------------------------------------------------------------------------
class Job:
    def __init__(self, op, inputs, targets, reference, argv=None, src=None, dst=None, split=None):
        self.op, self.inputs, self.targets, self.reference = op, inputs, targets, reference
        self.argv, self.src, self.dst, self.split = argv, src, dst, split

    def config(self, **kw) -> dict:
        return {"op": self.op, "argv": self.argv, "src": str(self.src), "dst": str(self.dst), "split": self.split,
                **kw}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs (a copy of the tiny model, a sharded tiny checkpoint) and the reference outputs."""
    from test_convert_helpers import make_model

    d = tmp_path_factory.mktemp("faults")
    src = d / "src.gguf"
    shutil.copyfile(FIXTURE, src)
    ckpt = d / "ckpt"
    make_model("llama", ckpt, seed=3, shard_size="100KB")
    ref = d / "ref"
    ref.mkdir()
    gguf_kquant.quantize_model(src, ref / "q.gguf", "Q4_K_M", report=ref / "q.json")
    gguf_kquant.convert_hf(ckpt, ref / "c.gguf", "Q8_0")
    with gguf_kquant.open(src) as f:
        shards = gguf_kquant.write(ref / "w.gguf", f.metadata, f.tensors, split_max_tensors=15)
    return {"dir": d, "src": src, "ckpt": ckpt, "ref": ref, "write_shards": [p.name for p in shards]}


def make_job(world, op: str, out: Path) -> Job:
    ref = world["ref"]
    if op == "quantize":
        dst, rep = out / "q.gguf", out / "q.json"
        return Job(op, [world["src"]], [dst, rep], [ref / "q.gguf", ref / "q.json"],
                   argv=["quantize", str(world["src"]), str(dst), "Q4_K_M", "--report", str(rep), "--overwrite",
                         "-q"])
    if op == "convert":
        dst = out / "c.gguf"
        return Job(op, sorted(world["ckpt"].iterdir()), [dst], [ref / "c.gguf"],
                   argv=["convert", str(world["ckpt"]), str(dst), "--type", "Q8_0", "--overwrite", "-q"])
    names = world["write_shards"]
    return Job(op, [world["src"]], [out / n for n in names], [ref / n for n in names], src=world["src"],
               dst=out / "w.gguf", split=15)


def run_child(job: Job, cfg: dict, limit_fsize=None) -> subprocess.CompletedProcess:
    def limit():
        # the signals' default actions, as in a terminal: a parent started with nohup passes SIGHUP on ignored
        # (the library leaves an ignored signal ignored; the SIGHUP case would then see no signal at all)
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if limit_fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=300, env=env, preexec_fn=limit)


def check_inputs_and_temps(job, before, out, msg, allow_temps=False):
    assert digest(job.inputs) == before, f"an input changed; {msg}"
    if allow_temps:
        for name in temps(out):
            (out / name).unlink()
    assert temps(out) == [], msg


# ------------------------------------------------------------------------------------------------------
# Signals at random points
# ------------------------------------------------------------------------------------------------------
SIGNAL_CASES = [(op, sig) for op in ("quantize", "convert", "write") for sig in ("SIGKILL", "SIGTERM", "SIGINT")]
SIGNAL_CASES.append(("quantize", "SIGHUP"))


@pytest.mark.parametrize("op,signame", SIGNAL_CASES)
def test_signal_at_a_random_point(world, tmp_path, op, signame):
    sig = getattr(signal, signame)
    job = make_job(world, op, tmp_path)
    for t in job.targets:
        t.write_bytes(PRECIOUS)
    total = sum(p.stat().st_size for p in job.reference)
    at = random.Random(f"{SEED}-{op}-{signame}").randint(1, total + total // 8)  # past the end: no signal
    msg = f"FAULT_SEED={SEED} {op} {signame} at byte {at} of {total}"
    before = digest(job.inputs)
    r = run_child(job, job.config(point="bytes", at=at, signal=int(sig)))
    msg += f"; exit {r.returncode}; stderr: {r.stderr[-500:]}"
    if "SENT" not in r.stdout:
        assert r.returncode == 0, msg
        assert digest(job.targets) == {str(t): h for t, h in zip(job.targets, digest(job.reference).values())}, msg
    else:
        expected = {"SIGINT": 130 if job.argv else -signal.SIGINT}.get(signame, -sig)
        assert r.returncode == expected, msg
        assert all(t.read_bytes() == PRECIOUS for t in job.targets), f"a target was touched; {msg}"
        if signame == "SIGINT" and job.argv:
            assert r.stderr.strip().splitlines()[-1].endswith("interrupted"), msg
    check_inputs_and_temps(job, before, tmp_path, msg, allow_temps=signame == "SIGKILL")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_signal_between_the_renames(world, tmp_path, signame):
    """Model and report are renamed back to back: SIGTERM there waits until both are in place; SIGKILL
    there is the one window POSIX leaves open (documented in gguf_kquant.safeio)."""
    sig = getattr(signal, signame)
    job = make_job(world, "quantize", tmp_path)
    for t in job.targets:
        t.write_bytes(PRECIOUS)
    before = digest(job.inputs)
    r = run_child(job, job.config(point="commit", signal=int(sig)))
    msg = f"exit {r.returncode}; stderr: {r.stderr[-500:]}"
    assert "SENT" in r.stdout and r.returncode == -sig, msg
    model, report = job.targets
    assert model.read_bytes() == job.reference[0].read_bytes(), msg
    if signame == "SIGTERM":
        assert report.read_bytes() == job.reference[1].read_bytes(), msg
        check_inputs_and_temps(job, before, tmp_path, msg)
    else:
        assert report.read_bytes() == PRECIOUS and len(temps(tmp_path)) == 1, msg
        check_inputs_and_temps(job, before, tmp_path, msg, allow_temps=True)


# ------------------------------------------------------------------------------------------------------
# Disk full
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["quantize", "convert", "write"])
def test_disk_full_is_one_line_naming_the_file(world, tmp_path, op):
    job = make_job(world, op, tmp_path)
    for t in job.targets:
        t.write_bytes(PRECIOUS)
    before = digest(job.inputs)
    limit = job.reference[0].stat().st_size // 2
    r = run_child(job, job.config(point=None), limit_fsize=limit)
    msg = f"exit {r.returncode}; stdout {r.stdout[-300:]}; stderr: {r.stderr[-500:]}"
    assert r.returncode == 1, msg
    if job.argv:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, msg
        assert f"{job.targets[0]}: writing failed" in lines[0] and "[Errno 27] File too large" in lines[0], msg
    else:
        assert r.stdout.startswith(f"ERROR GGUFIOError 27 {job.targets[0]}: writing failed"), msg
    assert all(t.read_bytes() == PRECIOUS for t in job.targets), msg
    check_inputs_and_temps(job, before, tmp_path, msg)


def test_disk_full_in_process_raises_gguf_io_error(tmp_path):
    # the same through the API, in this process (SIGXFSZ is ignored by Python, so write() gets EFBIG)
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    target = tmp_path / "m.gguf"
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        with pytest.raises(GGUFIOError) as info:
            gguf_kquant.write(target, {"k": 1}, {"t": np.zeros(100_000, np.float32)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == 27 and str(info.value).startswith(f"{target}: writing failed")
    assert isinstance(info.value, OSError) and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------
# Two writers, one target
# ------------------------------------------------------------------------------------------------------
def test_two_writers_to_one_target(tmp_path):
    target = tmp_path / "m.gguf"
    started = threading.Barrier(2)

    def slow(value):
        def gen():
            started.wait(timeout=30)
            for _ in range(8):
                time.sleep(0.01)
                yield np.full(256, value, np.float32)
        return gen

    errors = []

    def writer(value):
        try:
            gguf_kquant.write(target, {"k": value}, [("t", (8 * 256,), "F32", slow(value))])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with gguf_kquant.open(target) as f:
        value = f.metadata["k"]
        assert (f.tensors["t"].numpy() == value).all()
    assert value in (1, 2) and temps(tmp_path) == []


# ------------------------------------------------------------------------------------------------------
# Outputs that name inputs
# ------------------------------------------------------------------------------------------------------
@pytest.fixture()
def no_output_files(monkeypatch):
    """Fails the test if any output file (temp) is created: refusals must come before."""
    def refuse(self):
        raise AssertionError(f"output files created for {self.targets}")

    monkeypatch.setattr(safeio.AtomicFiles, "__enter__", refuse)


@pytest.fixture(scope="module")
def quantize_inputs(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("collide")
    src = d / "src.gguf"
    shutil.copyfile(world["src"], src)
    split = d / "split"
    split.mkdir()
    with gguf_kquant.open(src) as f:
        shards = gguf_kquant.write(split / "m.gguf", f.metadata, f.tensors, split_max_tensors=15)
        name, shape = "blk.0.ffn_up.weight", f.tensors["blk.0.ffn_up.weight"].shape
    im = d / "im.dat"
    write_legacy_imatrix(im, {name: np.ones(shape[-1], np.float32)})
    (d / "link.gguf").symlink_to(src)
    os.link(src, d / "hard.gguf")
    return {"dir": d, "src": src, "shards": shards, "im": im}


def _quantize_collisions(q):
    d, src, shards, im = q["dir"], q["src"], q["shards"], q["im"]
    return {
        "dst is src": (src, src, {}),
        "dst is a symlink to src": (src, d / "link.gguf", {}),
        "dst is a hard link of src": (src, d / "hard.gguf", {}),
        "dst is another shard of the source": (shards[0], shards[1], {}),
        "keep-split names are the source's": (shards[0], d / "split" / "m", {"keep_split": True}),
        "split-max-tensors names are the source's": (shards[0], d / "split" / "m.gguf", {"split_max_tensors": 15}),
        "report is src": (src, d / "o.gguf", {"report": src}),
        "report is the imatrix": (src, d / "o.gguf", {"report": im, "imatrix": im}),
        "dst is the imatrix": (src, im, {"imatrix": im}),
        "report is dst": (src, d / "o.gguf", {"report": d / "o.gguf"}),
    }


QUANTIZE_COLLISIONS = ["dst is src", "dst is a symlink to src", "dst is a hard link of src",
                       "dst is another shard of the source", "keep-split names are the source's",
                       "split-max-tensors names are the source's", "report is src", "report is the imatrix",
                       "dst is the imatrix", "report is dst"]


@pytest.mark.parametrize("case", QUANTIZE_COLLISIONS)
def test_quantize_refuses_outputs_that_are_inputs(quantize_inputs, no_output_files, case):
    src, dst, kw = _quantize_collisions(quantize_inputs)[case]
    files = [p for p in quantize_inputs["dir"].rglob("*") if p.is_file()]
    before = digest(files)
    match = "written twice" if case == "report is dst" else "refusing to write over an input of this job"
    with pytest.raises(QuantizeError, match=match):
        gguf_kquant.quantize_model(src, dst, "Q4_K_M", overwrite=True, **kw)
    assert digest(files) == before and not (quantize_inputs["dir"] / "o.gguf").exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                  "model.safetensors.index.json", "shard", "symlink to a shard", "imatrix"])
def test_convert_refuses_outputs_that_are_inputs(world, tmp_path, no_output_files, name):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world["ckpt"], ckpt)
    shard = sorted(ckpt.glob("*.safetensors"))[1]
    kw = {}
    if name == "shard":
        dst = shard
    elif name == "symlink to a shard":
        dst = tmp_path / "link.gguf"
        dst.symlink_to(shard)
    elif name == "imatrix":
        with gguf_kquant.open(world["ref"] / "c.gguf") as f:
            n = f.tensors["blk.0.ffn_up.weight"].shape[-1]
        dst = kw["imatrix"] = tmp_path / "im.dat"
        write_legacy_imatrix(dst, {"blk.0.ffn_up.weight": np.ones(n, np.float32)})
    else:
        dst = ckpt / name
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    before = digest(files)
    with pytest.raises(ConversionError, match="refusing to write over an input of this job"):
        gguf_kquant.convert_hf(ckpt, dst, "Q4_K_M" if kw else "Q8_0", overwrite=True, **kw)
    assert digest(files) == before


# ------------------------------------------------------------------------------------------------------
# One policy for an existing destination (quantize and convert alike); names are names, not patterns
# ------------------------------------------------------------------------------------------------------
def test_quantize_and_convert_refuse_an_existing_destination_without_overwrite(world, tmp_path):
    from gguf_kquant.cli import main

    for op, argv in (("quantize", [str(world["src"]), "Q8_0"]), ("convert", [str(world["ckpt"]), "--type", "F16"])):
        dst = tmp_path / f"{op}.gguf"
        dst.write_bytes(PRECIOUS)
        args = [op, argv[0], str(dst)] + argv[1:] + ["-q"]
        assert main(args) == 1 and dst.read_bytes() == PRECIOUS
        assert main(args + ["--overwrite"]) == 0 and dst.read_bytes()[:4] == b"GGUF"
    with pytest.raises(QuantizeError, match="destination exists; pass overwrite=True"):
        gguf_kquant.quantize_model(world["src"], tmp_path / "quantize.gguf", "Q8_0")
    with pytest.raises(ConversionError, match="destination exists; pass overwrite=True"):
        gguf_kquant.convert_hf(world["ckpt"], tmp_path / "convert.gguf")
    assert temps(tmp_path) == []


def test_convert_split_destination_names_are_not_glob_patterns(world, tmp_path):
    (tmp_path / "mx-00001-of-00002.gguf").write_bytes(PRECIOUS)  # what m[x] or m? would match as a glob
    paths = gguf_kquant.convert_hf(world["ckpt"], tmp_path / "m[x].gguf", "F32", split_max_size=200_000)
    assert len(paths) > 1 and all(p.name.startswith("m[x]-0000") for p in paths)
    gguf_kquant.convert_hf(world["ckpt"], tmp_path / "m?.gguf", "F32", split_max_size=200_000)
    with pytest.raises(ConversionError, match=r"m\[x\]-00001-of-0000\d.gguf: destination exists"):
        gguf_kquant.convert_hf(world["ckpt"], tmp_path / "m[x].gguf", "F32", split_max_size=200_000)
    with pytest.raises(ConversionError, match="a shard of the same split output exists"):
        gguf_kquant.convert_hf(world["ckpt"], tmp_path / "m[x].gguf", "F16", split_max_size=400_000)
    assert (tmp_path / "mx-00001-of-00002.gguf").read_bytes() == PRECIOUS and temps(tmp_path) == []
