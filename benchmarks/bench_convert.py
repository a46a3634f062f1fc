"""Convert a synthetic ~2 GB llama checkpoint and report time and peak RSS (which should stay near one tensor).

    python benchmarks/bench_convert.py [--dir /tmp/bench-convert] [--type F16] [--layers 16]

The checkpoint (BF16, hidden 2048, ffn 5632, vocab 32000) is written with numpy in chunks straight into a
safetensors file — never the whole model in memory — plus a small trained tokenizer.  The conversion runs in a
child process so that its own peak RSS (ru_maxrss) is measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_checkpoint(d: Path, layers: int, hidden=2048, ffn=5632, vocab=32000, heads=16, kv_heads=8) -> int:
    from gguf_kquant.convert.safetensors import write_safetensors
    from test_convert_helpers import LLAMA3_RE, train_bpe

    d.mkdir(parents=True, exist_ok=True)
    train_bpe(d, regex=LLAMA3_RE, specials=["<s>", "</s>"], bos="<s>", eos="</s>")
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def chunks(shape):  # random BF16 rows, 4 MiB at a time
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        step = max(1, (4 << 20) // (2 * cols))
        for r in range(0, rows, step):
            n = min(step, rows - r)
            x = (rng.standard_normal((n, cols), dtype=np.float32) * 0.02).view(np.uint32)
            yield ((x + 0x8000) >> 16).astype(np.uint16).tobytes()

    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn)})
    write_safetensors(d / "model.safetensors", {k: ("BF16", list(s), chunks(s)) for k, s in shapes.items()})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg))
    return (d / "model.safetensors").stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/bench-convert")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and output")
    args = ap.parse_args()
    d = Path(args.dir) / "model"
    out = Path(args.dir) / f"model-{args.type}.gguf"
    if not (d / "model.safetensors").exists():
        t = time.perf_counter()
        size = make_checkpoint(d, args.layers)
        print(f"wrote checkpoint: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
    size = (d / "model.safetensors").stat().st_size
    code = ("import sys, gguf_kquant; gguf_kquant.convert_hf(sys.argv[1], sys.argv[2], sys.argv[3], "
            "overwrite=True, quiet=True)")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(d), str(out), args.type], check=True)
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
    biggest = 32000 * 2048 * 4 / 2**20
    print(f"convert {size / 2**30:.2f} GiB BF16 -> {args.type}: {dt:.1f} s ({size / 2**20 / dt:.0f} MiB/s), "
          f"output {out.stat().st_size / 2**30:.2f} GiB, peak RSS {rss:.0f} MiB "
          f"(largest tensor as float32: {biggest:.0f} MiB)")
    if not args.keep:
        out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
