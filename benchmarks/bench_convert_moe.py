"""Convert a synthetic mixture-of-experts checkpoint: ours vs convert_hf_to_gguf.py + llama-quantize.

    python benchmarks/bench_convert_moe.py [--dir /tmp/bench-moe] [--layers 4] [--experts 64] [--threads 2]

The checkpoint is a Qwen3-MoE (``Qwen3MoeForCausalLM``, supported by both converters) with ``--experts``
routed experts per layer (hidden 1024, expert FFN 512, BF16), written tensor by tensor with numpy: one
layer's experts are 192 MiB in BF16 and 384 MiB in float32, so a converter that stacks a whole layer of
experts in float32 shows it in its peak RSS.

Four jobs, each in its own child process (its own peak RSS, ``ru_maxrss``), run in this order:

* ours, F16:      ``gguf_kquant.convert_hf(dir, out, "F16")``
* ours, Q4_K_M:   ``gguf_kquant.convert_hf(dir, out, "Q4_K_M")`` — straight from the checkpoint, no F16 file
* theirs, F16:    llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` (the oracle's sdist)
* theirs, Q4_K_M: ``llama-quantize`` (libllama's ``llama_model_quantize``) of that F16 file

``--threads`` is llama-quantize's; ours uses every core.  Both ways end with the same two files
(byte-identical: the summary checks, and tests/test_convert_archs.py on small models); the summary compares
the wall time and peak RSS it takes to get them.

Measured (4 layers x 64 experts, 0.89 GiB BF16; shared 2-core machine at load ~9, so times are noisy):

    ours-F16         6.8 s   peak RSS  208 MiB        theirs-F16      9.1 s   peak RSS  614 MiB
    ours-Q4_K_M     19.3 s   peak RSS  262 MiB        theirs-Q4_K_M  17.0 s   peak RSS  388 MiB
    both files: ours 26.1 s, peak 262 MiB; convert_hf_to_gguf.py + llama-quantize 26.1 s, peak 614 MiB
    (1.00x the time, 0.43x the peak memory); both outputs byte-identical to theirs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

HIDDEN, EXPERT_FF, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 1024, 512, 32000, 8, 2, 128

_PEAK = "import resource; print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"


def make_checkpoint(d: Path, layers: int, experts: int) -> int:
    """Write the synthetic Qwen3-MoE checkpoint (BF16) and its tokenizer into ``d``; returns its size."""
    from gguf_kquant.convert.safetensors import write_safetensors
    from test_convert_helpers import QWEN2_RE, train_bpe

    d.mkdir(parents=True, exist_ok=True)
    train_bpe(d, regex=QWEN2_RE, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
              add_bos=False)
    rng = np.random.default_rng(0)

    def bf16(shape):  # random BF16 rows, 4 MiB at a time
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        step = max(1, (4 << 20) // (2 * cols))
        for r in range(0, rows, step):
            x = (rng.standard_normal((min(step, rows - r), cols), dtype=np.float32) * 0.02).view(np.uint32)
            yield ((x + 0x8000) >> 16).astype(np.uint16).tobytes()

    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
              "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
                       p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                       p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
                       p + "mlp.gate.weight": (experts, HIDDEN)})
        for x in range(experts):
            shapes.update({f"{p}mlp.experts.{x}.gate_proj.weight": (EXPERT_FF, HIDDEN),
                           f"{p}mlp.experts.{x}.up_proj.weight": (EXPERT_FF, HIDDEN),
                           f"{p}mlp.experts.{x}.down_proj.weight": (HIDDEN, EXPERT_FF)})
    write_safetensors(d / "model.safetensors", {k: ("BF16", list(s), bf16(s)) for k, s in shapes.items()})
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
           "intermediate_size": 4 * EXPERT_FF, "moe_intermediate_size": EXPERT_FF, "num_hidden_layers": layers,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
           "num_experts": experts, "num_experts_per_tok": 8, "vocab_size": VOCAB, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg))
    return (d / "model.safetensors").stat().st_size


def run_child(code: str, *args) -> tuple:
    """Run ``code`` in a fresh Python; returns (wall seconds, peak RSS in MiB)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code + _PEAK, *map(str, args)], capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"child failed:\n{r.stderr[-3000:]}")
    peak = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK_KIB")][-1]
    return dt, peak / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/bench-moe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from oracle import vendor_llama_cpp

    work = Path(args.dir)
    d = work / f"moe-{args.layers}x{args.experts}"
    if not (d / "model.safetensors").exists():
        t = time.perf_counter()
        size = make_checkpoint(d, args.layers, args.experts)
        print(f"wrote checkpoint: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
    size = (d / "model.safetensors").stat().st_size
    layer_f32 = 3 * args.experts * HIDDEN * EXPERT_FF * 4 / 2**20
    print(f"checkpoint {size / 2**30:.2f} GiB BF16, {args.layers} layers x {args.experts} experts "
          f"(one layer's experts in float32: {layer_f32:.0f} MiB)")

    ours = ("import sys, gguf_kquant\n"
            "gguf_kquant.convert_hf(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True, pre_tokenizer='qwen2')\n")
    src = vendor_llama_cpp()
    theirs = ("import sys, runpy\n"
              f"sys.path.insert(0, {str(src)!r}); sys.path.insert(1, {str(src / 'gguf-py')!r})\n"
              "import conversion.base as b\n"
              "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
              f"main = runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='convert_hf_to_gguf')['main']\n"
              "sys.argv = ['convert_hf_to_gguf.py', sys.argv[1], '--outfile', sys.argv[2], '--outtype', 'f16']\n"
              "main()\n")
    quantize = ("import sys, ctypes, llama_cpp\n"
                "p = llama_cpp.llama_model_quantize_default_params()\n"
                "p.ftype, p.nthread = 15, int(sys.argv[3])  # LLAMA_FTYPE_MOSTLY_Q4_K_M\n"
                "assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), "
                "ctypes.byref(p)) == 0\n")
    out = {k: work / f"{k}.gguf" for k in ("ours-F16", "ours-Q4_K_M", "theirs-F16", "theirs-Q4_K_M")}
    res = {"ours-F16": run_child(ours, d, out["ours-F16"], "F16"),
           "ours-Q4_K_M": run_child(ours, d, out["ours-Q4_K_M"], "Q4_K_M"),
           "theirs-F16": run_child(theirs, d, out["theirs-F16"]),
           "theirs-Q4_K_M": run_child(quantize, out["theirs-F16"], out["theirs-Q4_K_M"], args.threads)}
    for k, (dt, rss) in res.items():
        print(f"  {k:14s} {dt:7.1f} s   peak RSS {rss:7.0f} MiB   output {out[k].stat().st_size / 2**20:7.0f} MiB")
    same = {t: out[f"ours-{t}"].read_bytes() == out[f"theirs-{t}"].read_bytes() for t in ("F16", "Q4_K_M")}
    ours_t = res["ours-F16"][0] + res["ours-Q4_K_M"][0]
    theirs_t = res["theirs-F16"][0] + res["theirs-Q4_K_M"][0]
    ours_m = max(res["ours-F16"][1], res["ours-Q4_K_M"][1])
    theirs_m = max(res["theirs-F16"][1], res["theirs-Q4_K_M"][1])
    print(f"F16 and Q4_K_M files: ours {ours_t:.1f} s, peak {ours_m:.0f} MiB; convert_hf_to_gguf.py + "
          f"llama-quantize {theirs_t:.1f} s, peak {theirs_m:.0f} MiB; time ratio {ours_t / theirs_t:.2f}x; "
          f"byte-identical: {same}")
    for p in out.values():
        p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
