"""Time opening a GGUF file with a 262,144-token vocabulary: gguf_kquant vs gguf-py vs ggml's C parser.

    python benchmarks/bench_reader.py [--file PATH] [--runs 7] [--skip-gguf-py]

Builds (once; reused if it exists) a GGUF file like a big-vocabulary model's header — 262,144 tokens of
realistic lengths, their scores (f32) and types (i32), 260,000 BPE merges — plus a few small tensors, then times
"open + list tensor names/shapes/types + list metadata keys" with:

* gguf_kquant.open (median of ``--runs``),
* gguf.GGUFReader (gguf-py; once — it takes seconds),
* ggml's ``gguf_init_from_file`` with ``no_alloc=true, ctx=NULL`` from the oracle's libggml-base.so
  (median of ``--runs``), then gguf_get_n_tensors / gguf_get_tensor_name / gguf_get_n_kv / gguf_get_key.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_VOCAB = 262_144
N_MERGES = 260_000


def build(path: Path, seed: int = 0) -> None:
    import numpy as np
    import gguf

    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz" * 3 + "ABCDEFGHIJ0123456789" + "éüñßçø" + "日本語中文한국"
    tokens, seen = [], set()
    while len(tokens) < N_VOCAB:
        length = max(1, min(24, int(rng.expovariate(1 / 6.0)) + 1))  # BPE tokens: mostly short
        tok = ("Ġ" if rng.random() < 0.5 else "") + "".join(rng.choice(alphabet) for _ in range(length))
        if tok in seen:
            tok += str(len(tokens))
        seen.add(tok)
        tokens.append(tok)
    merges = [f"{tokens[rng.randrange(N_VOCAB)][:6]} {tokens[rng.randrange(N_VOCAB)][:6]}" for _ in range(N_MERGES)]
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_block_count(4)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(N_VOCAB)])
    w.add_token_types([1] * N_VOCAB)
    w.add_token_merges(merges)
    for layer in range(4):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down", "ffn_gate"):
            w.add_tensor(f"blk.{layer}.{name}.weight", np.zeros((64, 64), np.float16))
        w.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(64, np.float32))
    w.add_tensor("token_embd.weight", np.zeros((64, 64), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)


def time_ours(path: Path):
    import gguf_kquant

    t0 = time.perf_counter()
    with gguf_kquant.open(path) as f:
        listing = [(t.name, t.shape, t.ggml_type) for t in f.tensors]
        keys = list(f.metadata.keys())
    return time.perf_counter() - t0, len(listing), len(keys)


def time_gguf_py(path: Path):
    from gguf import GGUFReader

    t0 = time.perf_counter()
    r = GGUFReader(str(path))
    listing = [(t.name, tuple(t.shape), t.tensor_type) for t in r.tensors]
    keys = list(r.fields.keys())
    return time.perf_counter() - t0, len(listing), len(keys)


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]  # struct gguf_init_params


def _ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    for fn in (lib.gguf_get_n_tensors, lib.gguf_get_n_kv):
        fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    for fn in (lib.gguf_get_tensor_name, lib.gguf_get_key):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    return lib


def time_ggml(path: Path, lib):
    t0 = time.perf_counter()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise RuntimeError(f"ggml failed to open {path}")
    names = [lib.gguf_get_tensor_name(ctx, i) for i in range(lib.gguf_get_n_tensors(ctx))]
    keys = [lib.gguf_get_key(ctx, i) for i in range(lib.gguf_get_n_kv(ctx))]
    lib.gguf_free(ctx)
    return time.perf_counter() - t0, len(names), len(keys)


def _import_cost() -> float:
    code = "import time; t=time.perf_counter(); import gguf_kquant.container.reader; print(time.perf_counter()-t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "gguf_kquant_bench_262k.gguf")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--skip-gguf-py", action="store_true", help="do not time gguf.GGUFReader (~12 s)")
    args = ap.parse_args(argv)

    if not args.file.exists():
        print(f"building {args.file} ...", flush=True)
        t0 = time.perf_counter()
        build(args.file)
        print(f"  built in {time.perf_counter() - t0:.1f} s")
    print(f"file: {args.file} ({args.file.stat().st_size / 1e6:.1f} MB, {N_VOCAB} tokens, {N_MERGES} merges)")

    lib = _ggml()
    time_ours(args.file)  # warm the page cache and imports
    time_ggml(args.file, lib)
    ours = [time_ours(args.file) for _ in range(args.runs)]
    ggml = [time_ggml(args.file, lib) for _ in range(args.runs)]
    assert ours[0][1:] == ggml[0][1:], f"tensor/key counts differ: ours {ours[0][1:]}, ggml {ggml[0][1:]}"
    t_ours = statistics.median(t for t, *_ in ours)
    t_ggml = statistics.median(t for t, *_ in ggml)
    print(f"gguf_kquant.open        {t_ours * 1e3:9.1f} ms  (median of {args.runs}; "
          f"{ours[0][1]} tensors, {ours[0][2]} keys)")
    print(f"ggml gguf_init_from_file{t_ggml * 1e3:9.1f} ms  (median of {args.runs})")
    print(f"  ours / ggml           {t_ours / t_ggml:9.2f} x")
    if not args.skip_gguf_py:
        t_py, *counts = time_gguf_py(args.file)
        print(f"gguf.GGUFReader         {t_py * 1e3:9.1f} ms  (once)")
        print(f"  gguf-py / ours        {t_py / t_ours:9.0f} x faster")
    print(f"(import gguf_kquant.container.reader in a fresh process: {_import_cost() * 1e3:.0f} ms, not included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
