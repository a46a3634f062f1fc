"""Whole-model quantization: wall time and peak RSS, ours vs llama.cpp's llama_model_quantize (same threads).

    python benchmarks/bench_quantize_model.py                 # ~200 MB F32 model
    python benchmarks/bench_quantize_model.py --big           # also the ~2 GB model (run it once at most)
    python benchmarks/bench_quantize_model.py --mix Q4_K_M --threads 2 --dir /tmp/bench

Models are synthetic llama F32 models written tensor by tensor (gguf-py's streaming tensor-info API), never
whole in RAM.  Each quantization runs in a fresh subprocess; its peak RSS is that child's ru_maxrss from
os.wait4 — the oracle's includes the mmap'd source pages it touches, ours the pread slabs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "fixtures"))

SIZES = {  # name -> (n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab)
    "200MB": (3, 1024, 16, 4, 2816, 8192),
    "2GB": (8, 2048, 16, 4, 5632, 32000),
}


def build_model(path: Path, n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, seed=0):
    import gguf
    from make_example_model import build_vocab

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("bench")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    tokens, scores, types = build_vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores.tolist())
    w.add_token_types(types.tolist())
    kv = n_embd // n_head * n_head_kv
    specs = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,)),
             ("output.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        p = f"blk.{i}."
        specs += [(p + "attn_norm.weight", (n_embd,)), (p + "attn_q.weight", (n_embd, n_embd)),
                  (p + "attn_k.weight", (kv, n_embd)), (p + "attn_v.weight", (kv, n_embd)),
                  (p + "attn_output.weight", (n_embd, n_embd)), (p + "ffn_norm.weight", (n_embd,)),
                  (p + "ffn_gate.weight", (n_ff, n_embd)), (p + "ffn_up.weight", (n_ff, n_embd)),
                  (p + "ffn_down.weight", (n_embd, n_ff))]
    for name, shape in specs:
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in specs:
        if len(shape) == 1:
            x = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:  # rows in chunks, so a 500 MB embedding never sits in RAM twice
            x = np.empty(shape, np.float32)
            for r in range(0, shape[0], 4096):
                x[r:r + 4096] = rng.standard_normal((min(4096, shape[0] - r), shape[1]), np.float32)
            x *= np.float32(1 / np.sqrt(shape[-1]))
        w.write_tensor_data(x)
        del x
    w.close()


OURS = """
import sys, gguf_kquant
gguf_kquant.quantize_model(sys.argv[1], sys.argv[2], sys.argv[3], threads=int(sys.argv[4]))
"""
ORACLE = """
import sys, ctypes, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
from gguf_kquant.model.planner import parse_mix
p.ftype = int(parse_mix(sys.argv[3])[1]); p.nthread = int(sys.argv[4])
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) == 0
"""
IDLE = "import sys, gguf_kquant, gguf_kquant.model.quantize, llama_cpp"


def measure(code, *args):
    """(wall seconds, peak RSS MiB) of ``python -c code args`` in a fresh child."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stderr=subprocess.DEVNULL)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"benchmark child failed ({status})")
    return wall, ru.ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also run the ~2 GB model")
    ap.add_argument("--mix", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/gguf_kquant_bench")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    # warm numba's cache so that compile time is not billed to the first model
    warm = d / "warm.gguf"
    if not warm.exists():
        build_model(warm, 1, 256, 4, 2, 512, 512)
    measure(OURS, warm, d / "warm-q.gguf", args.mix, args.threads)
    _, idle = measure(IDLE)
    print(f"python + imports alone: {idle:.0f} MiB RSS")
    for name in ["200MB"] + (["2GB"] if args.big else []):
        src = d / f"bench-{name}-f32.gguf"
        if not src.exists():
            t = time.perf_counter()
            build_model(src, *SIZES[name])
            print(f"built {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
        o_wall, o_rss = measure(ORACLE, src, d / "oracle.gguf", args.mix, args.threads)
        m_wall, m_rss = measure(OURS, src, d / "ours.gguf", args.mix, args.threads)
        same = (d / "oracle.gguf").read_bytes() == (d / "ours.gguf").read_bytes()
        print(f"{name} -> {args.mix} ({args.threads} threads): oracle {o_wall:6.2f} s {o_rss:6.0f} MiB | "
              f"ours {m_wall:6.2f} s {m_rss:6.0f} MiB | wall x{m_wall / o_wall:.2f}, RSS x{m_rss / o_rss:.2f}"
              f" | identical: {same}")
        for p in (d / "oracle.gguf", d / "ours.gguf"):
            p.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
