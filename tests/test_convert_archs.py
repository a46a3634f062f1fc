"""Architectures beyond the first seven: our conversion equals llama.cpp's convert_hf_to_gguf.py on a tiny
random checkpoint (metadata, tensors, bytes and order, at F16 and Q8_0), and llama.cpp computes what
transformers computes from our F16 file (top-1 equal, cosine >= 0.999).  Mixture-of-experts checkpoints
are stacked slab by slab (checked with tracemalloc on 64 experts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import ConversionError
from oracle import lib_dir
from test_convert_helpers import (QWEN2_RE, assert_converts_in_slabs, assert_logits_match, assert_same_gguf,
                                  gguf_logits, hf_logits, hf_tokenizer, llama_cpp_model, llama_quantize, make_model,
                                  train_bpe, vendor_convert_jobs)

# tokenizer.ggml.pre given to convert_hf_to_gguf.py (its hash table does not know our trained tokenizers)
PRE = {"mixtral": "llama-bpe", "qwen2moe": "qwen2", "qwen3moe": "qwen2", "phi3": "default", "gemma2": "default",
       "granite": "llama-bpe", "olmo2": "llama-bpe", "smollm3": "llama-bpe", "gemma3mm": "llama-bpe"}
ARCHS = list(PRE)
SPM = ("phi3", "gemma2")  # checkpoints with a SentencePiece tokenizer.model (the others: byte-level BPE)
VOCAB_ONLY = ("mixtral", "gemma2", "phi3-longrope")  # GPT-2 BPE, SentencePiece, a key set with the tensors
OUTTYPES = ("F32", "F16", "BF16", "Q8_0")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each architecture's checkpoint and transformers model, and convert_hf_to_gguf.py's files of it."""
    lib_dir()  # the oracle must be installed: fail, never skip
    root = tmp_path_factory.mktemp("archs")
    models = {a: make_model(a, root / a, seed=20 + i, tokenizer="spm" if a in SPM else "bpe")
              for i, a in enumerate(ARCHS)}
    _phi3_longrope(root)
    make_model("qwen3moe", root / "qwen3moe-bf16", seed=30, dtype="bfloat16")
    (root / "moe-unsorted").mkdir()
    _synthetic_moe(root / "moe-unsorted", n_expert=8, n_embd=64, n_ff=128)
    jobs = [(root / a, root / f"{a}.{t}.theirs.gguf", t.lower(), PRE[a]) for a in ARCHS for t in OUTTYPES]
    jobs.append((root / "phi3-longrope", root / "phi3-longrope.F16.theirs.gguf", "f16", "default"))
    jobs.append((root / "moe-unsorted", root / "moe-unsorted.F16.theirs.gguf", "f16", "qwen2"))
    jobs += [(root / "qwen3moe-bf16", root / f"qwen3moe-bf16.{t}.theirs.gguf", t.lower(), "qwen2")
             for t in ("F16", "BF16")]
    jobs += [(root / a, root / f"{a}.vocab.theirs.gguf", "f16", PRE.get(a, "default"), "--vocab-only")
             for a in VOCAB_ONLY]
    vendor_convert_jobs(jobs)
    return root, models


def _phi3_longrope(root):
    """The Phi-3 checkpoint as a 128k-context model: LongRoPE long/short factors in the config."""
    import shutil

    d = root / "phi3-longrope"
    shutil.copytree(root / "phi3", d)
    cfg = json.loads((d / "config.json").read_text())
    half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                              "long_factor": [1.0 + i / 4 for i in range(half)],
                              "short_factor": [1.0 + i / 16 for i in range(half)]}
    cfg["original_max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(cfg))


def test_phi3_longrope_matches(built):
    root, _ = built
    ours = root / "phi3-longrope.F16.ours.gguf"
    gguf_kquant.convert_hf(root / "phi3-longrope", ours, "F16")
    meta = assert_same_gguf(ours, root / "phi3-longrope.F16.theirs.gguf")
    assert "phi3.rope.scaling.attn_factor" in meta


@pytest.mark.parametrize("ftype", OUTTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_convert_hf_to_gguf(built, arch, ftype):
    root, _ = built
    ours = root / f"{arch}.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / arch, ours, ftype, overwrite=True)
    meta = assert_same_gguf(ours, root / f"{arch}.{ftype}.theirs.gguf")
    assert meta["tokenizer.ggml.pre"][2] == PRE[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(built, arch):
    root, models = built
    out = root / f"{arch}.F16.logits.gguf"
    gguf_kquant.convert_hf(root / arch, out, "F16")
    text = "Hello world, 12345 Ünïcödé 🦙 and more text, long enough to pass a sliding window"
    if arch in SPM:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(root / arch / "tokenizer.model"))
        ids = [sp.bos_id()] + sp.encode(text)[:23]
    else:
        ids = hf_tokenizer(root / arch).encode(text).ids[:24]
    assert len(ids) == 24
    ours = gguf_logits(out, ids)
    ref = hf_logits(models[arch], ids, f16_weights=True)
    assert_logits_match(ours, ref, f"{arch}")


@pytest.mark.parametrize("ftype", ["F16", "BF16"])
def test_bf16_experts_match(built, ftype):
    """BF16 experts are widened slab by slab on the stacked rows: the same bytes as the script's."""
    root, _ = built
    ours = root / f"qwen3moe-bf16.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / "qwen3moe-bf16", ours, ftype)
    assert_same_gguf(ours, root / f"qwen3moe-bf16.{ftype}.theirs.gguf")


def test_tensor_order_is_by_name_whatever_the_header_order(built):
    """A header listing tensors in another order than by name (as safetensors does for mixed dtypes): the
    output keeps convert_hf_to_gguf.py's order, which is by name."""
    root, _ = built
    ours = root / "moe-unsorted.F16.ours.gguf"
    gguf_kquant.convert_hf(root / "moe-unsorted", ours, "F16")
    assert_same_gguf(ours, root / "moe-unsorted.F16.theirs.gguf")


# ---- experts: memory and bad checkpoints ---------------------------------------------------------------
def _synthetic_moe(d, n_expert=64, n_embd=256, n_ff=1024, drop=None, odd=None):
    """A one-layer Qwen3-MoE checkpoint written tensor by tensor (F16): ``drop`` omits an expert tensor,
    ``odd`` gives one a different shape."""
    from gguf_kquant.convert.safetensors import write_safetensors

    train_bpe(d, regex=QWEN2_RE, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
              add_bos=False)
    n_vocab = 400
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": n_embd,
           "intermediate_size": n_ff, "moe_intermediate_size": n_ff, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "num_experts": n_expert,
           "num_experts_per_tok": 2, "vocab_size": n_vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def t(*shape):
        return ("F16", list(shape), iter([rng.standard_normal(shape, dtype=np.float32).astype(np.float16).tobytes()]))

    p = "model.layers.0."
    tensors = {"model.embed_tokens.weight": t(n_vocab, n_embd), "lm_head.weight": t(n_vocab, n_embd),
               "model.norm.weight": t(n_embd), p + "input_layernorm.weight": t(n_embd),
               p + "post_attention_layernorm.weight": t(n_embd), p + "mlp.gate.weight": t(n_expert, n_embd),
               p + "self_attn.q_proj.weight": t(128, n_embd), p + "self_attn.k_proj.weight": t(64, n_embd),
               p + "self_attn.v_proj.weight": t(64, n_embd), p + "self_attn.o_proj.weight": t(n_embd, 128),
               p + "self_attn.q_norm.weight": t(64), p + "self_attn.k_norm.weight": t(64)}
    for x in range(n_expert):
        for w, shape in (("down_proj", (n_embd, n_ff)), ("gate_proj", (n_ff, n_embd)), ("up_proj", (n_ff, n_embd))):
            name = f"{p}mlp.experts.{x}.{w}.weight"
            if name == odd:
                shape = (shape[0], shape[1] // 2)
            if name != drop:
                tensors[name] = t(*shape)
    write_safetensors(d / "model.safetensors", tensors)


def test_stacked_rows_equal_numpy_stack(tmp_path):
    """Row slabs of every length, crossing expert boundaries or not, are the rows of np.stack(experts)."""
    from gguf_kquant.convert.archs.experts import StackedExperts
    from gguf_kquant.convert.safetensors import SafetensorsFile, write_safetensors

    rng = np.random.default_rng(0)
    arrs = {f"e{i}": rng.standard_normal((5, 3)).astype(np.float32) for i in range(4)}
    write_safetensors(tmp_path / "m.safetensors", arrs)
    f = SafetensorsFile(tmp_path / "m.safetensors")
    rows = StackedExperts("x", [f.tensors[f"e{i}"] for i in range(4)]).array().reshape(-1, 3)
    want = np.stack(list(arrs.values())).reshape(-1, 3)
    for step in (1, 2, 3, 5, 7, 20, 100):
        assert np.array_equal(np.concatenate([rows[r:r + step] for r in range(0, 20, step)]), want), step


def test_experts_are_stacked_slab_by_slab(tmp_path):
    """64 experts of 1024 x 256: one stacked weight is 32 MiB in F16 (64 MiB in float32, a layer 192 MiB);
    the conversion's Python-side peak stays near one 16 MiB slab (measured: 30 MiB, slab and its F16 copy)."""
    d = tmp_path / "moe"
    d.mkdir()
    _synthetic_moe(d)
    assert_converts_in_slabs(d, tmp_path / "moe.gguf")
    with gguf_kquant.open(tmp_path / "moe.gguf") as f:
        t = {t.name: t for t in f.tensors}["blk.0.ffn_down_exps.weight"]
        assert tuple(t.shape) == (64, 256, 1024)


@pytest.mark.parametrize("bad", ["drop", "odd"])
def test_bad_experts_refused_before_writing(tmp_path, bad):
    d = tmp_path / "moe"
    d.mkdir()
    name = "model.layers.0.mlp.experts.5.up_proj.weight"
    _synthetic_moe(d, n_expert=8, n_embd=64, n_ff=128, **{bad: name})
    with pytest.raises(ConversionError, match="experts.5.up_proj"):
        gguf_kquant.convert_hf(d, tmp_path / "moe.gguf", "F16")
    assert not (tmp_path / "moe.gguf").exists()


# ---- vocabulary-only files and the keyword arguments ---------------------------------------------------
@pytest.mark.parametrize("arch", VOCAB_ONLY)
def test_vocab_only_matches_convert_hf_to_gguf(built, arch):
    root, _ = built
    ours = root / f"{arch}.vocab.ours.gguf"
    gguf_kquant.convert_hf(root / arch, ours, vocab_only=True)
    assert_same_gguf(ours, root / f"{arch}.vocab.theirs.gguf")
    with gguf_kquant.open(ours) as f:
        assert len(f.tensors) == 0
    llm = llama_cpp_model(ours, vocab_only=True)  # llama.cpp reads it as a vocabulary
    assert len(llm.tokenize(b"Hello world", add_bos=False)) > 0
    llm.close()


def test_vocab_only_from_the_command_line(built, tmp_path):
    from gguf_kquant.cli import main

    root, _ = built
    out = tmp_path / "v.gguf"
    assert main(["convert", str(root / "mixtral"), str(out), "--vocab-only", "-q"]) == 0
    assert_same_gguf(out, root / "mixtral.vocab.theirs.gguf")


def test_unknown_keyword_arguments_raise(built, tmp_path):
    root, _ = built
    out = tmp_path / "o.gguf"
    with pytest.raises(TypeError, match="vocab_olny"):
        gguf_kquant.convert_hf(root / "mixtral", out, vocab_olny=True)
    with pytest.raises(ConversionError, match="pure"):  # a planner option, but F16 is not a mix
        gguf_kquant.convert_hf(root / "mixtral", out, "F16", pure=True)
    with pytest.raises(ConversionError, match="no tensors"):
        gguf_kquant.convert_hf(root / "mixtral", out, "Q4_K_M", vocab_only=True)
    assert not out.exists()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe"])
def test_moe_mix_equals_convert_then_llama_quantize(tmp_path, arch):
    """Q4_K_M in one pass == F16 (equal to convert_hf_to_gguf.py's, above) then llama-quantize, byte for byte;
    rows of 256 so that the k-quants (not only their fallbacks) meet the stacked experts."""
    d = tmp_path / arch
    make_model(arch, d, seed=40, hidden_size=256)
    f16, ref, ours = tmp_path / "f16.gguf", tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(d, f16, "F16")
    llama_quantize(f16, ref, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    gguf_kquant.convert_hf(d, ours, "Q4_K_M")
    assert_same_gguf(ours, ref)
    with gguf_kquant.open(ours) as f:
        types = {t.name: t.ggml_type.name for t in f.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K" and types["blk.0.ffn_down_exps.weight"] in ("Q6_K", "Q4_K")
