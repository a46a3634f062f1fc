"""DeepSeek-V2 / V3 (llama.cpp ``deepseek2``): our conversion equals convert_hf_to_gguf.py's on tiny random
checkpoints (metadata, tensors, bytes and order, at F32/F16/BF16/Q8_0), Q4_K_M equals F16 then llama-quantize,
and llama.cpp computes what transformers computes from our F16 file.

Two tiny models (one dense layer, then routed + shared experts): V2-Lite style (``q_proj``, softmax
routing) and V3 style (``q_a_proj``/``q_b_proj``, sigmoid routing with ``e_score_correction_bias`` and
expert groups, YaRN RoPE scaling as the real checkpoints have); a third with rows of 256 for the k-quant mix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import ConversionError
from oracle import lib_dir
from test_convert_helpers import (LLAMA3_RE, assert_logits_match, assert_same_gguf, gguf_logits, hf_logits,
                                  hf_tokenizer, llama_quantize, train_bpe, vendor_convert_jobs)

PRE = "llama-bpe"  # tokenizer.ggml.pre given to convert_hf_to_gguf.py (its hash table does not know ours)
OUTTYPES = ("F32", "F16", "BF16", "Q8_0")
MODELS = ("v2", "v3")
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def make_deepseek(kind: str, out_dir, *, hidden_size: int = 64, seed: int = 0):
    """A tiny random DeepSeek checkpoint: layer 0 dense, the next four routed experts (two per token) and a
    shared one; dims multiples of 32 so that Q8_0 applies to the split kv_b_proj too."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>"]
    train_bpe(out_dir, regex=LLAMA3_RE, specials=specials, bos=specials[0], eos=specials[1])
    n_vocab = max(len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]), 300)
    big = hidden_size >= 256
    common = dict(vocab_size=n_vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  moe_intermediate_size=hidden_size if big else 32, num_hidden_layers=2,
                  num_attention_heads=2 if big else 4, num_key_value_heads=2 if big else 4, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=1,
                  first_k_dense_replace=1, kv_lora_rank=256 if big else 32, qk_rope_head_dim=64 if big else 16,
                  qk_nope_head_dim=128 if big else 32, v_head_dim=128 if big else 32, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if kind == "v2":  # V2-Lite: no query compression, softmax routing, no groups; llama.cpp recognizes a model
        # without q_lora_rank by its layer count alone (26 or 27 layers), so this one has 26
        cfg = tf.DeepseekV2Config(q_lora_rank=None, norm_topk_prob=False, routed_scaling_factor=1.0,
                                  **{**common, "num_hidden_layers": 26})
        model = tf.DeepseekV2ForCausalLM(cfg)
    else:
        cfg = tf.DeepseekV3Config(q_lora_rank=256 if big else 32, n_group=2, topk_group=1, norm_topk_prob=True,
                                  routed_scaling_factor=2.5, rope_parameters=dict(YARN), **common)
        model = tf.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # random norms and routing biases, so that a lost one shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1) if "norm" in name else p.copy_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    path = out_dir / "config.json"
    c = json.loads(path.read_text())
    c["scoring_func"] = "softmax" if kind == "v2" else "sigmoid"  # as the real checkpoints' config.json say
    path.write_text(json.dumps(c, indent=2))
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The checkpoints, their transformers models, and convert_hf_to_gguf.py's files of them."""
    lib_dir()  # the oracle must be installed: fail, never skip
    root = tmp_path_factory.mktemp("deepseek")
    models = {k: make_deepseek(k, root / k, seed=50 + i) for i, k in enumerate(MODELS)}
    make_deepseek("v3", root / "v3-256", hidden_size=256, seed=60)
    _as_released_v3(root / "v3", root / "v3-released")
    jobs = [(root / k, root / f"{k}.{t}.theirs.gguf", t.lower(), PRE) for k in MODELS for t in OUTTYPES]
    jobs.append((root / "v3-released", root / "v3-released.F16.theirs.gguf", "f16", PRE))
    vendor_convert_jobs(jobs)
    return root, models


def _as_released_v3(src, d):
    """The V3 checkpoint as deepseek-ai's repository has it: config.json in the pre-transformers-5 form
    (``rope_scaling`` with ``type``, top-level ``rope_theta``, no ``head_dim``) with keys left to the config
    class's defaults, and a multi-token-prediction layer past ``num_hidden_layers``."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    for key in ("head_dim", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "n_group"):
        del cfg[key]
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    t = load_file(d / "model.safetensors")
    n_embd = t["model.norm.weight"].shape[0]
    mtp = {k.replace("layers.1.", "layers.2."): v for k, v in t.items() if k.startswith("model.layers.1.")}
    mtp.update({"model.layers.2.enorm.weight": t["model.norm.weight"], "model.layers.2.hnorm.weight":
                t["model.norm.weight"], "model.layers.2.eh_proj.weight": np.zeros((n_embd, 2 * n_embd), np.float32)})
    save_file({**t, **mtp}, d / "model.safetensors", metadata={"format": "pt"})


def test_released_config_form_matches(built):
    """Absent keys take transformers' DeepseekV3Config defaults (as the script reads the config through
    AutoConfig), legacy YaRN parameters are read, and the MTP layer is left out, as the script does."""
    root, _ = built
    ours = root / "v3-released.F16.ours.gguf"
    gguf_kquant.convert_hf(root / "v3-released", ours, "F16")
    meta = assert_same_gguf(ours, root / "v3-released.F16.theirs.gguf")
    assert meta["deepseek2.expert_group_count"][2] == 8 and meta["deepseek2.leading_dense_block_count"][2] == 3
    assert meta["deepseek2.block_count"][2] == 2 and meta["deepseek2.rope.scaling.yarn_beta_fast"][2] == 32.0


@pytest.mark.parametrize("ftype", OUTTYPES)
@pytest.mark.parametrize("kind", MODELS)
def test_matches_convert_hf_to_gguf(built, kind, ftype):
    root, _ = built
    ours = root / f"{kind}.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / kind, ours, ftype, overwrite=True)
    meta = assert_same_gguf(ours, root / f"{kind}.{ftype}.theirs.gguf")
    assert meta["general.architecture"][2] == "deepseek2"
    assert meta["deepseek2.attention.head_count_kv"][2] == 1  # MLA written as MQA
    with gguf_kquant.open(ours) as f:
        names = {t.name: tuple(t.shape) for t in f.tensors}
    assert names["blk.0.attn_k_b.weight"] == (4, 32, 32) and "blk.0.attn_kv_b.weight" not in names
    assert "blk.0.ffn_up.weight" in names and names["blk.1.ffn_up_exps.weight"] == (4, 32, 64)
    if kind == "v3":
        assert meta["deepseek2.expert_gating_func"][2] == 2 and meta["deepseek2.expert_group_count"][2] == 2
        assert meta["deepseek2.rope.scaling.type"][2] == "yarn" and "blk.1.exp_probs_b.bias" in names
        assert "blk.0.attn_q_a.weight" in names


@pytest.mark.parametrize("kind", MODELS)
def test_logits_match_transformers(built, kind):
    root, models = built
    out = root / f"{kind}.F16.logits.gguf"
    gguf_kquant.convert_hf(root / kind, out, "F16", overwrite=True)
    ids = hf_tokenizer(root / kind).encode("Hello world, 12345 Ünïcödé 🦙 and more text, long enough").ids[:24]
    assert len(ids) == 24
    ours = gguf_logits(out, ids)
    ref = hf_logits(models[kind], ids, f16_weights=True)
    assert_logits_match(ours, ref, f"{kind}")


def test_mix_equals_convert_then_llama_quantize(built, tmp_path):
    """Q4_K_M in one pass == our F16 (the script's, above) then llama-quantize, byte for byte; rows of 256 so
    that the k-quants meet the stacked experts and the MLA projections."""
    root, _ = built
    d = root / "v3-256"
    f16, ref, ours = tmp_path / "f16.gguf", tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(d, f16, "F16")
    llama_quantize(f16, ref, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    gguf_kquant.convert_hf(d, ours, "Q4_K_M")
    assert_same_gguf(ours, ref)
    with gguf_kquant.open(ours) as f:
        types = {t.name: t.ggml_type.name for t in f.tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_K" and types["blk.0.attn_q_b.weight"] == "Q4_K"


def _break(d, how):
    """Spoil the checkpoint in ``d``; returns the tensor name the error must give."""
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "model.safetensors")
    if how == "kv-heads":  # config.json says 2 KV heads; kv_b_proj's rows are 4 heads'
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_key_value_heads"] = 2
        (d / "config.json").write_text(json.dumps(cfg))
        return "layers.0.self_attn.kv_b_proj"
    p = "model.layers.1.mlp.experts."
    if how == "missing-expert":
        del t[p + "2.up_proj.weight"]
        name = "experts.2.up_proj"
    else:  # transformers' in-memory layout (gate_up_proj fused, experts outermost), not a saved checkpoint's
        t[p + "gate_up_proj"] = np.concatenate([np.stack([t.pop(f"{p}{x}.{w}.weight") for x in range(4)])
                                                for w in ("gate_proj", "up_proj")], axis=1)
        name = "experts.gate_up_proj"
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("how", ["kv-heads", "missing-expert", "fused-experts"])
def test_bad_checkpoint_is_refused_before_writing(built, tmp_path, how):
    """Shapes that disagree with config.json, a missing expert, experts not stored one by one: ConversionError
    naming the tensor, and no file."""
    import shutil

    root, _ = built
    d = tmp_path / "bad"
    shutil.copytree(root / "v2", d)
    name = _break(d, how)
    with pytest.raises(ConversionError, match=name):
        gguf_kquant.convert_hf(d, tmp_path / "bad.gguf", "F16")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("key, value", [("kv_lora_rank", 0), ("qk_rope_head_dim", 8.5), ("v_head_dim", None)])
def test_bad_mla_config_is_refused(built, tmp_path, key, value):
    """An MLA size that is no positive integer (null: not even transformers' default applies) names the key."""
    import shutil

    root, _ = built
    d = tmp_path / "bad"
    shutil.copytree(root / "v3", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=key):
        gguf_kquant.convert_hf(d, tmp_path / "bad.gguf", "F16")
    assert not (tmp_path / "bad.gguf").exists()
