"""Error feedback on mixture-of-experts weights: each expert fed forward through its own input covariance.

    python benchmarks/bench_moe_feedback.py [--dir /tmp/bench-moe-feedback] [--mixes Q4_0 Q4_K_M Q2_K] [--repeats 3]

A synthetic llama-architecture MoE (``fixtures/make_example_model.py``: 4 layers, 512 wide, 16 experts of 512,
2 used per token, random F32 weights) — PyPI has no real MoE model; the experts' error is a sum over each
expert's own tokens, so it needs only a real routing, which llama.cpp computes.  The Hessians are collected
through llama.cpp (``collect_hessians``, 2048 random tokens in chunks of 256: one matrix per expert and input);
their diagonal is the imatrix of every row.  Per mix, best of ``--repeats`` interleaved ``quantize_model`` runs:

* llama:     ``method="llama"`` (llama-quantize's bytes for that imatrix)
* optimized: ``method="optimized"`` with the diagonal only (the refiners)
* feedback:  ``method="optimized"`` with the Hessian file (error feedback)

and the experts' output error ``sum_e sum_rows (w - q) H_e (w - q)^T`` (H_e: expert e's matrix) of each file,
as a multiple of llama-quantize's.

Measured (2-core shared machine; collection 6.3 s, 141 matrices; 3.5 s once BLAS kept to one thread):

    Q4_0    llama 0.61 s  optimized 1.36 s (2.22x)  feedback 2.91 s (4.75x) | experts' error: 0.984 / 0.237
    Q4_K_M  llama 2.70 s  optimized 4.41 s (1.63x)  feedback 5.40 s (2.00x) | experts' error: 0.964 / 0.505
    Q2_K    llama 2.26 s  optimized 4.26 s (1.89x)  feedback 5.26 s (2.33x) | experts' error: 0.938 / 0.565

(the refiners gain little on random Gaussian weights; the feedback gains from the activations' correlations.)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

import gguf_kquant  # noqa: E402
from gguf_kquant.codecs.gptq import output_error  # noqa: E402
from gguf_kquant.container.reader import open_gguf  # noqa: E402
from gguf_kquant.model.hessian import collect_hessians, expert_weight, load_hessians  # noqa: E402
from gguf_kquant.model.imatrix import load_imatrix  # noqa: E402


def experts_error(src: Path, dst: Path, hessians: Path) -> float:
    """sum over expert weights and experts of sum_rows (w - q) H_e (w - q)^T."""
    total = 0.0
    with open_gguf(src) as fs, open_gguf(dst) as fd, load_hessians(hessians) as hs:
        out = {t.name: t for t in fd.tensors}
        for t in fs.tensors:
            if t.name not in hs.expert_counts:
                continue
            x = np.asarray(t.numpy(), np.float32)  # (n_expert, rows, n_in)
            raw = np.asarray(out[t.name].raw()).reshape(x.shape[0], x.shape[1], -1)
            for e in range(x.shape[0]):
                entry = hs.for_weight(expert_weight(t.name, e))
                if entry is not None:
                    total += output_error(x[e], raw[e], out[t.name].type_name, entry[0])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-moe-feedback"))
    ap.add_argument("--mixes", nargs="+", default=["Q4_0", "Q4_K_M", "Q2_K"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from make_example_model import build_llama_gguf

    args.dir.mkdir(parents=True, exist_ok=True)
    model = build_llama_gguf(args.dir / "moe.gguf", n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_ff=512,
                             n_vocab=2048, dtype="F32", n_expert=16, n_expert_used=2)
    hessians = args.dir / "moe.hessian.gguf"
    t0 = time.perf_counter()
    s = collect_hessians(model, np.random.default_rng(0).integers(3, 2048, 8 * 256), hessians, ctx=256,
                         threads=2, quiet=True, overwrite=True)
    print(f"collection {time.perf_counter() - t0:.1f} s, {len(s.matrices)} matrices, {len(s.skipped)} skipped")
    diagonal = copy.copy(load_imatrix(hessians))
    diagonal.hessians = None
    runs = (("llama", diagonal, "llama"), ("optimized", diagonal, "optimized"), ("feedback", hessians, "optimized"))
    for mix in args.mixes:
        best: dict = {}
        for _ in range(args.repeats):
            for name, imatrix, method in runs:
                t0 = time.perf_counter()
                gguf_kquant.quantize_model(model, args.dir / f"{name}.gguf", mix, imatrix=imatrix, method=method,
                                           quiet=True, overwrite=True)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        err = {name: experts_error(model, args.dir / f"{name}.gguf", hessians) for name, _, _ in runs}
        print(f"{mix:7s} llama {best['llama']:.2f} s  optimized {best['optimized']:.2f} s "
              f"({best['optimized'] / best['llama']:.2f}x)  feedback {best['feedback']:.2f} s "
              f"({best['feedback'] / best['llama']:.2f}x) | experts' error: {err['optimized'] / err['llama']:.3f} / "
              f"{err['feedback'] / err['llama']:.3f}", flush=True)


if __name__ == "__main__":
    main()
