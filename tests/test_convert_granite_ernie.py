"""GraniteMoeForCausalLM / GraniteMoeSharedForCausalLM (``granitemoe``) and Ernie4_5_MoeForCausalLM
(``ernie4_5-moe``): our conversion equals llama.cpp's convert_hf_to_gguf.py on tiny random checkpoints
(metadata, tensors, bytes and order at F32/F16/BF16/Q8_0), Q4_K_M equals its F16 then llama-quantize, and
llama.cpp computes what transformers computes from our F16 files (top-1 equal, cosine >= 0.999).

Granite MoE checkpoints keep their experts fused (``input_linear`` = gate and up of every expert, 3-D);
Ernie 4.5 MoE checkpoints have one tensor per expert, a leading dense layer, shared experts and the
router's score-correction bias (``moe_statics``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import ConversionError
from oracle import lib_dir
from test_convert_helpers import (LLAMA3_RE, assert_converts_in_slabs, assert_logits_match, assert_same_gguf,
                                  gguf_logits, hf_logits, hf_tokenizer, llama_quantize, train_bpe, train_spm,
                                  vendor_convert_jobs)

OUTTYPES = ("F32", "F16", "BF16", "Q8_0")
# tokenizer.ggml.pre given to convert_hf_to_gguf.py (its hash table does not know our trained tokenizers);
# Ernie's vocabulary is SentencePiece, where the script writes no pre-tokenizer
PRE = {"granitemoe": "llama-bpe", "granitemoe-shared": "llama-bpe", "ernie": None}
TEXT = "Hello world, 12345 Ünïcödé 🦙 and more text, long enough for two dozen tokens"


def make_checkpoint(kind: str, out_dir, *, hidden_size: int = 64, seed: int = 0, dtype: str = "float32"):
    """A tiny random checkpoint of ``kind`` (a key of PRE) in ``out_dir``; returns the transformers model."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind.startswith("granitemoe"):
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        train_bpe(out_dir, regex=LLAMA3_RE, specials=specials, bos=specials[0], eos=specials[1])
        # multipliers away from 1 so that a lost one shows in the logits; 4 experts, 2 per token
        granite = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                       logits_scaling=3.0, num_local_experts=4, num_experts_per_tok=2, bos_token_id=0,
                       eos_token_id=1, vocab_size=400, **common)
        if kind == "granitemoe":
            model = tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(**granite))
        else:  # a shared expert beside the routed ones
            model = tf.GraniteMoeSharedForCausalLM(tf.GraniteMoeSharedConfig(shared_intermediate_size=96, **granite))
    elif kind == "ernie":
        n_vocab = train_spm(out_dir)
        # layer 0 dense, layer 1 MoE: 4 experts (2 per token) and 2 shared ones; the script writes the shared
        # width as intermediate_size // num_key_value_heads, so that must equal 2 * moe_intermediate_size
        cfg = tf.Ernie4_5_MoeConfig(moe_num_experts=4, moe_k=2, moe_layer_start_index=1, moe_layer_interval=1,
                                    moe_num_shared_experts=2, moe_intermediate_size=hidden_size // 2,
                                    vocab_size=n_vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
        model = tf.Ernie4_5_MoeForCausalLM(cfg)
        tcfg = json.loads((out_dir / "tokenizer_config.json").read_text())
        (out_dir / "tokenizer_config.json").write_text(json.dumps({**tcfg, "add_prefix_space": False}))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random norms and biases so that a forgotten one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.02)
        for name, b in model.state_dict(keep_vars=True).items():
            if "e_score_correction_bias" in name:  # the router's selection bias: large enough to change choices
                b.copy_(torch.randn_like(b) * 0.5)
    model.eval()
    model.to(getattr(torch, dtype)).save_pretrained(str(out_dir), safe_serialization=True)
    return model.float()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each checkpoint and its transformers model, convert_hf_to_gguf.py's files of it (one process), and a
    hidden-256 Granite MoE and Ernie MoE for the k-quant mix."""
    lib_dir()  # the oracle must be installed: fail, never skip
    root = tmp_path_factory.mktemp("granite_ernie")
    models = {k: make_checkpoint(k, root / k, seed=60 + i) for i, k in enumerate(PRE)}
    for k in ("granitemoe", "ernie"):
        make_checkpoint(k, root / f"{k}-256", hidden_size=256, seed=70)
    make_checkpoint("granitemoe-shared", root / "granitemoe-bf16", seed=71, dtype="bfloat16")
    jobs = [(root / k, root / f"{k}.{t}.theirs.gguf", t.lower(), PRE[k]) for k in PRE for t in OUTTYPES]
    jobs += [(root / "granitemoe-bf16", root / f"granitemoe-bf16.{t}.theirs.gguf", t.lower(), "llama-bpe")
             for t in ("F16", "BF16")]
    jobs += [(root / k, root / f"{k}.vocab.theirs.gguf", "f16", PRE[k], "--vocab-only")
             for k in ("granitemoe", "ernie")]
    vendor_convert_jobs(jobs)
    return root, models


@pytest.mark.parametrize("ftype", OUTTYPES)
@pytest.mark.parametrize("kind", list(PRE))
def test_matches_convert_hf_to_gguf(built, kind, ftype):
    root, _ = built
    ours = root / f"{kind}.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / kind, ours, ftype)
    meta = assert_same_gguf(ours, root / f"{kind}.{ftype}.theirs.gguf")
    with gguf_kquant.open(ours) as f:
        shapes = {t.name: tuple(t.shape) for t in f.tensors}
    if kind == "ernie":  # a dense layer 0, a MoE layer 1 with its selection bias and shared experts
        assert meta["ernie4_5-moe.leading_dense_block_count"][2] == 1 and "blk.0.ffn_up.weight" in shapes
        assert shapes["blk.1.ffn_up_exps.weight"] == (4, 32, 64) and shapes["blk.1.ffn_up_shexp.weight"] == (64, 64)
        assert "blk.1.exp_probs_b.bias" in shapes
    else:  # the fused input_linear split into gate and up
        assert meta["granitemoe.embedding_scale"][2] == 2.0
        assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == (4, 128, 64)


@pytest.mark.parametrize("kind", ["granitemoe", "ernie"])
def test_vocab_only_matches_convert_hf_to_gguf(built, kind):
    root, _ = built
    ours = root / f"{kind}.vocab.ours.gguf"
    gguf_kquant.convert_hf(root / kind, ours, vocab_only=True)
    assert_same_gguf(ours, root / f"{kind}.vocab.theirs.gguf")


@pytest.mark.parametrize("ftype", ["F16", "BF16"])
def test_bf16_fused_experts_match(built, ftype):
    """BF16 fused experts (split and widened slab by slab) and shared expert: the same bytes as the script's
    torch split."""
    root, _ = built
    ours = root / f"granitemoe-bf16.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / "granitemoe-bf16", ours, ftype)
    assert_same_gguf(ours, root / f"granitemoe-bf16.{ftype}.theirs.gguf")


def test_fused_experts_are_split_slab_by_slab(tmp_path):
    """64 experts of 2 x 1024 x 256 fused in one F16 tensor (64 MiB; its gate half is 64 MiB in float32):
    the conversion's Python-side peak stays within a few 16 MiB slabs."""
    from gguf_kquant.convert.safetensors import SafetensorsFile, write_safetensors

    n_expert, n_embd, n_ff, n_vocab = 64, 256, 1024, 400
    train_bpe(tmp_path, regex=LLAMA3_RE, specials=["<|begin_of_text|>", "<|end_of_text|>"])
    cfg = {"architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe", "hidden_size": n_embd,
           "intermediate_size": n_ff, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
           "num_local_experts": n_expert, "num_experts_per_tok": 2, "vocab_size": n_vocab}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def t(*shape):  # F16 values produced in pieces of one expert, so the writer never holds the whole tensor
        piece = shape[1:] if len(shape) == 3 else shape
        n = shape[0] if len(shape) == 3 else 1
        return ("F16", list(shape), (rng.standard_normal(piece, dtype=np.float32).astype(np.float16).tobytes()
                                     for _ in range(n)))

    p = "model.layers.0."
    write_safetensors(tmp_path / "model.safetensors", {
        "model.embed_tokens.weight": t(n_vocab, n_embd), "model.norm.weight": t(n_embd),
        "lm_head.weight": t(n_vocab, n_embd), p + "input_layernorm.weight": t(n_embd),
        p + "post_attention_layernorm.weight": t(n_embd),
        p + "block_sparse_moe.router.layer.weight": t(n_expert, n_embd),
        p + "block_sparse_moe.input_linear.weight": t(n_expert, 2 * n_ff, n_embd),
        p + "block_sparse_moe.output_linear.weight": t(n_expert, n_embd, n_ff),
        **{p + f"self_attn.{x}_proj.weight": t(n_embd, n_embd) for x in "qkvo"}})
    assert_converts_in_slabs(tmp_path, tmp_path / "out.gguf")
    fused = SafetensorsFile(tmp_path / "model.safetensors").tensors[p + "block_sparse_moe.input_linear.weight"]
    with gguf_kquant.open(tmp_path / "out.gguf") as f:
        by_name = {t.name: t for t in f.tensors}
        halves = {"blk.0.ffn_gate_exps.weight": slice(0, n_ff), "blk.0.ffn_up_exps.weight": slice(n_ff, 2 * n_ff)}
        for name, half in halves.items():
            got = np.frombuffer(bytes(by_name[name].raw()), np.float16).reshape(by_name[name].shape)
            assert np.array_equal(got, fused.array()[:, half]), name


def test_ernie_prefix_and_mtp_tensors(built, tmp_path):
    """Paddle-style ``ernie.`` names are read as ``model.``; multi-token-prediction tensors are skipped: the
    same file as the script's from the plain checkpoint."""
    from safetensors.numpy import load_file, save_file

    root, _ = built
    d = _copy(root, "ernie", tmp_path)
    tensors = {k.replace("model.", "ernie.", 1): v for k, v in load_file(str(d / "model.safetensors")).items()}
    tensors["model.mtp_block.0.mlp.up_proj.weight"] = np.ones((8, 64), np.float32)
    tensors["model.mtp_emb_norm.0.weight"] = np.ones(64, np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    gguf_kquant.convert_hf(d, tmp_path / "o.gguf", "F16")
    assert_same_gguf(tmp_path / "o.gguf", root / "ernie.F16.theirs.gguf")


def _prompt(root, kind):
    if kind == "ernie":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(root / kind / "tokenizer.model"))
        return [sp.bos_id()] + sp.encode(TEXT)[:23]
    return hf_tokenizer(root / kind).encode(TEXT).ids[:24]


@pytest.mark.parametrize("kind", list(PRE))
def test_logits_match_transformers(built, kind):
    root, models = built
    out = root / f"{kind}.F16.logits.gguf"
    gguf_kquant.convert_hf(root / kind, out, "F16")
    ids = _prompt(root, kind)
    assert len(ids) == 24
    ours = gguf_logits(out, ids)
    ref = hf_logits(models[kind], ids, f16_weights=True)
    assert_logits_match(ours, ref, f"{kind}")


@pytest.mark.parametrize("kind", ["granitemoe", "ernie"])
def test_mix_equals_convert_then_llama_quantize(built, tmp_path, kind):
    """Q4_K_M in one pass == F16 (equal to convert_hf_to_gguf.py's, above) then llama-quantize, byte for byte;
    rows of 256 so that the k-quants (not only their fallbacks) meet the split / stacked experts."""
    root, _ = built
    d = root / f"{kind}-256"
    f16, ref, ours = tmp_path / "f16.gguf", tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(d, f16, "F16")
    llama_quantize(f16, ref, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    gguf_kquant.convert_hf(d, ours, "Q4_K_M")
    assert_same_gguf(ours, ref)
    with gguf_kquant.open(ours) as f:
        types = {t.name: t.ggml_type.name for t in f.tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_K" and types["blk.1.ffn_up_exps.weight"] == "Q4_K"


# ---- bad checkpoints: refused, naming the tensor or key, before anything is written -------------------
def _copy(root, kind, tmp_path, **config):
    import shutil

    d = tmp_path / kind
    shutil.copytree(root / kind, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


def test_granite_fused_experts_disagreeing_with_config(built, tmp_path):
    root, _ = built
    d = _copy(root, "granitemoe-shared", tmp_path, intermediate_size=96)  # input_linear holds 2 x 128 rows
    with pytest.raises(ConversionError, match=r"block_sparse_moe\.(input|output)_linear"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf", "F16")
    d = _copy(root, "granitemoe-shared", tmp_path / "s", shared_intermediate_size=64)
    with pytest.raises(ConversionError, match=r"shared_mlp\.(input|output)_linear"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf", "F16")
    d = _copy(root, "granitemoe", tmp_path / "z", num_local_experts=0)  # the script fails on it too
    with pytest.raises(ConversionError, match="num_local_experts is 0"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf", "F16")
    assert not (tmp_path / "o.gguf").exists()


def _narrow_expert(tensors):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name][:, :16])


def _narrow_shared(tensors):
    for w in ("gate_proj", "up_proj", "down_proj"):  # half the width config.json implies
        name = f"model.layers.1.mlp.shared_experts.{w}.weight"
        t = tensors[name]
        tensors[name] = np.ascontiguousarray(t[:, :32] if w == "down_proj" else t[:32])


@pytest.mark.parametrize("edit, match", [
    (lambda ts: ts.pop("model.layers.1.mlp.experts.2.up_proj.weight"), r"experts\.2\.up_proj"),
    (_narrow_expert, r"experts\.3\.down_proj"),
    (_narrow_shared, r"shared_experts\.(gate|up|down)_proj"),
], ids=["missing-expert", "unequal-expert", "shared-width"])
def test_ernie_bad_tensors(built, tmp_path, edit, match):
    from safetensors.numpy import load_file, save_file

    root, _ = built
    d = _copy(root, "ernie", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=match):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf", "F16")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("config, match", [
    ({"moe_layer_interval": 2, "moe_layer_start_index": 0}, r"MoE layers \[1\].*every layer from"),
    ({"moe_layer_end_index": 0}, r"MoE layers \[\].*every layer from"),
    ({"moe_layer_start_index": 0}, r"'model\.layers\.0\.mlp\.gate\.weight' is missing"),
    ({"moe_k": 5}, "moe_k 5 exceeds"),
    ({"moe_num_experts": "4"}, "'moe_num_experts' must be an integer"),
])
def test_ernie_config_llama_cpp_cannot_run(built, tmp_path, config, match):
    """MoE layers llama.cpp would not look for (it expects experts in every layer from the start index) or
    the checkpoint does not have, more experts per token than experts, a count that is not an integer."""
    root, _ = built
    d = _copy(root, "ernie", tmp_path, **config)
    with pytest.raises(ConversionError, match=match):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf", "F16")
    assert not (tmp_path / "o.gguf").exists()
