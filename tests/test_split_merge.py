"""gguf-kquant split / merge against llama.cpp's own llama-gguf-split, byte for byte.

llama-gguf-split is built once per test session from the oracle's source (tools/gguf-split/gguf-split.cpp)
with the C++ compiler, linked against the oracle's compiled libllama/libggml (what cmake would do for this
one target, in ~5 s instead of building all of llama.cpp), into a cache folder outside the repository keyed
by the source's hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
import oracle
from gguf_kquant.cli import main
from gguf_kquant.errors import GGUFError
from gguf_kquant.tools import merge, split

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama-f16.gguf"


@pytest.fixture(scope="session")
def gguf_split_bin() -> Path:
    src = oracle.vendor_llama_cpp()
    lib = oracle.lib_dir()
    cpp = src / "tools" / "gguf-split" / "gguf-split.cpp"
    key = hashlib.sha256(cpp.read_bytes() + str(lib).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gguf-kquant-tests" / key
    exe = cache / "llama-gguf-split"
    if exe.exists():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    info = (src / "common" / "build-info.cpp.in").read_text()
    for k, v in {"@LLAMA_BUILD_NUMBER@": "0", "@LLAMA_BUILD_COMMIT@": "oracle", "@BUILD_COMPILER@": "c++",
                 "@BUILD_TARGET@": "host"}.items():
        info = info.replace(k, v)
    (cache / "build-info.cpp").write_text(info)
    tmp = cache / f"llama-gguf-split.{os.getpid()}.tmp"
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-O1", "-o", str(tmp), str(cpp), str(cache / "build-info.cpp"),
           f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}", f"-I{src / 'common'}", f"-L{lib}", "-lllama",
           "-lggml-base", "-lggml", f"-Wl,-rpath,{lib}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building llama-gguf-split failed:\n{r.stderr[-3000:]}"
    os.replace(tmp, exe)
    return exe


def gguf_split(exe: Path, *args) -> None:
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("how", [("--split-max-tensors", "10"), ("--split-max-size", "2M"), (),
                                 ("--no-tensor-first-split", "--split-max-tensors", "10"),
                                 ("--no-tensor-first-split",)],
                         ids=["tensors", "size", "default", "no-tensor-first-10", "no-tensor-first"])
def test_split_is_byte_identical_to_llama_gguf_split(gguf_split_bin, tmp_path, how):
    ref, ours = tmp_path / "ref", tmp_path / "ours"
    ref.mkdir(), ours.mkdir()
    gguf_split(gguf_split_bin, "--split", *how, FIXTURE, ref / "m")
    assert main(["split", *how, str(FIXTURE), str(ours / "m"), "-q"]) == 0
    expected = files(ref)
    assert len(expected) == {"10": 4, "2M": 3}.get(how[-1] if how else "", 1) + ("--no-tensor-first-split" in how)
    assert files(ours) == expected


def test_merge_is_byte_identical_to_llama_gguf_split(gguf_split_bin, tmp_path):
    shards = split(FIXTURE, tmp_path / "m", max_tensors=7)
    assert len(shards) == 6
    gguf_split(gguf_split_bin, "--merge", shards[0], tmp_path / "ref.gguf")
    assert main(["merge", str(shards[0]), str(tmp_path / "ours.gguf"), "-q"]) == 0
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    with gguf_kquant.open(tmp_path / "ours.gguf") as f:  # one file again: split.count 0, every tensor
        assert f.metadata["split.count"] == 0 and len(f.tensors) == 39 and f.shards == [tmp_path / "ours.gguf"]


def test_merge_of_a_metadata_only_first_shard(gguf_split_bin, tmp_path):
    gguf_split(gguf_split_bin, "--split", "--no-tensor-first-split", "--split-max-size", "3M", FIXTURE, tmp_path / "m")
    first = tmp_path / "m-00001-of-00003.gguf"
    gguf_split(gguf_split_bin, "--merge", first, tmp_path / "ref.gguf")
    assert merge(first, tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_a_single_shard_merges_like_llama_gguf_split(gguf_split_bin, tmp_path):
    (shard,) = split(FIXTURE, tmp_path / "one")
    gguf_split(gguf_split_bin, "--merge", shard, tmp_path / "ref.gguf")
    assert merge(shard, tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_split_and_merge_stream_tensor_data(tmp_path, monkeypatch):
    from gguf_kquant.container import writer

    monkeypatch.setattr(writer, "CHUNK_BYTES", 1 << 20)  # tensors are copied in pieces of 1 MiB
    big = tmp_path / "big.gguf"  # three 8 MiB tensors
    gguf_kquant.write(big, {"general.architecture": "llama"},
                      {f"t{i}": np.full((1024, 2048), i, np.float32) for i in range(3)})
    tracemalloc.start()
    shards = split(big, tmp_path / "m", max_tensors=1)
    merged = merge(shards[0], tmp_path / "merged.gguf")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < (4 << 20), peak  # < half a tensor: copied piece by piece, never gathered
    with gguf_kquant.open(big) as a, gguf_kquant.open(merged) as b:
        assert all(np.array_equal(x.raw(), y.raw()) for x, y in zip(a.tensors, b.tensors))


def test_misuse_one_line_nothing_written(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    shutil.copyfile(FIXTURE, work / "m.gguf")
    shards = split(work / "m.gguf", work / "s", max_tensors=20)
    before = files(work)
    cases = [
        (["merge", str(work / "m.gguf"), str(work / "x.gguf")], "not a split model"),
        (["merge", str(shards[1]), str(work / "x.gguf")], "shard 2 of 2"),
        (["merge", str(shards[0]), str(shards[1])], "same file"),
        (["merge", str(shards[0]), str(work / "m.gguf")], "exists"),
        (["split", "--split-max-tensors", "20", str(work / "m.gguf"), str(work / "s")], "exists"),
        (["split", "--split-max-tensors", "0", str(work / "m.gguf"), str(work / "t")], "positive"),
        (["split", "--split-max-size", "2X", str(work / "m.gguf"), str(work / "t")], "M or G"),
        (["split", str(work / "missing.gguf"), str(work / "t")], "missing.gguf"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
        assert files(work) == before, argv
    # re-splitting a split model over its own shard names: writing over an input is refused
    with pytest.raises(GGUFError, match="refusing to write over an input"):
        split(shards[0], work / "s", max_tensors=20, overwrite=True)
    assert files(work) == before


def test_overwrite_and_dry_run(tmp_path, capsys):
    split(FIXTURE, tmp_path / "m", max_tensors=20)
    assert main(["split", "--dry-run", "--split-max-tensors", "10", str(FIXTURE), str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("n_split: 4\n") and sorted(os.listdir(tmp_path)) == [
        "m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    assert main(["split", "--overwrite", "--split-max-tensors", "20", str(FIXTURE), str(tmp_path / "m"), "-q"]) == 0


def test_a_split_model_is_resplit_as_a_whole(tmp_path):
    a = split(FIXTURE, tmp_path / "a", max_tensors=5)
    b = split(a[0], tmp_path / "b", max_tensors=13)
    c = split(FIXTURE, tmp_path / "c", max_tensors=13)
    assert len(b) == 3 and [p.read_bytes() for p in b] == [p.read_bytes() for p in c]
