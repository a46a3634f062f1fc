"""GLM-4.5 MoE (``glm4moe``) and Llama 4 text (``llama4``): our conversion equals llama.cpp's
convert_hf_to_gguf.py on tiny random transformers checkpoints (metadata, tensors, bytes and order at F32, F16,
BF16 and Q8_0), Q4_K_M equals F16 then llama-quantize byte for byte, and llama.cpp computes what transformers
computes from our files.

The GLM checkpoint is laid out like GLM-4.5's: a dense first layer, MoE layers with a shared expert and a
score-correction bias, q/k norms and biases, partial RoPE, and the multi-token-prediction layer appended after
``num_hidden_layers`` (transformers does not build it: its tensors are written here).  The Llama 4 checkpoint
has its experts fused as transformers 5 saves them (``gate_up_proj`` / ``down_proj``, 3-D), dense and MoE
layers interleaved, a NoPE layer (the 4th) and llama3 RoPE scaling (a ``rope_freqs`` tensor).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import ConversionError
from oracle import lib_dir
from test_convert_helpers import (LLAMA3_RE, QWEN2_RE, assert_converts_in_slabs, assert_logits_match,
                                  assert_same_gguf, gguf_logits, hf_logits, hf_tokenizer, llama_quantize, train_bpe,
                                  vendor_convert_jobs)

OUTTYPES = ("F32", "F16", "BF16", "Q8_0")
# tokenizer.ggml.pre given to convert_hf_to_gguf.py (its hash table does not know our trained tokenizers)
PRE = {"glm4moe": "qwen2", "llama4": "llama-bpe", "llama4mm": "llama-bpe"}
FAMILIES = ("glm4moe", "llama4")  # llama4mm: the same text model inside Llama4ForConditionalGeneration
GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>"]
LLAMA4_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|header_start|>", "<|header_end|>"]


def _randomize(model):
    """Random norms and 1-d tensors (as make_model does), so that a lost shift or bias shows in the logits."""
    import torch

    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p) * 0.05)
            elif p.ndim == 1 and p.is_floating_point() and "inv_freq" not in name:
                p.copy_(torch.randn_like(p) * 0.02)
    return model.eval()


def make_glm4moe(d, *, hidden=64, seed=0, n_mtp=1):
    """A GLM-4.5-like checkpoint: layer 0 dense, layer 1 MoE (4 routed experts, 1 shared), ``n_mtp`` MTP
    layer(s) after them.  Returns the transformers model of the main layers."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    train_bpe(d, regex=QWEN2_RE, specials=GLM_SPECIALS, eos="<|endoftext|>", add_bos=False)
    vocab = json.loads((d / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in vocab["added_tokens"]}
    n_vocab = max(len(vocab["model"]["vocab"]), 300)
    kw = dict(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, moe_intermediate_size=hidden // 2 if hidden < 256 else hidden,
              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
              routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, max_position_embeddings=256,
              num_nextn_predict_layers=n_mtp, tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"],
              eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]])
    full = _randomize(tf.Glm4MoeForCausalLM(tf.Glm4MoeConfig(num_hidden_layers=2 + n_mtp, **kw)))
    full.save_pretrained(str(d))  # per-expert tensors, as transformers saves GLM-4.5
    model = tf.Glm4MoeForCausalLM(tf.Glm4MoeConfig(num_hidden_layers=2, **kw))
    model.load_state_dict({k: v for k, v in full.state_dict().items() if k in model.state_dict()})
    model.eval().config.architectures = ["Glm4MoeForCausalLM"]
    model.config.save_pretrained(str(d))
    state = load_file(str(d / "model.safetensors"))
    for i in range(2, 2 + n_mtp):  # the MTP layer's own tensors (GLM-4.5 ships them; transformers drops them)
        p = f"model.layers.{i}."
        state[p + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden) * 0.02
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            state[p + norm + ".weight"] = 1 + torch.randn(hidden) * 0.1
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return model


def make_llama4(d, *, hidden=64, seed=0, dtype="float32", vision=False):
    """A Llama-4-like text checkpoint: 4 layers, MoE on layers 1 and 3 (4 experts, fused as transformers
    saves them, and a shared expert), layer 3 without RoPE, llama3 RoPE scaling.  ``vision``: a
    Llama4ForConditionalGeneration (Scout's layout) with a tiny vision tower around it."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    train_bpe(d, regex=LLAMA3_RE, specials=LLAMA4_SPECIALS, bos=LLAMA4_SPECIALS[0], eos=LLAMA4_SPECIALS[1])
    vocab = json.loads((d / "tokenizer.json").read_text())
    n_vocab = max(len(vocab["model"]["vocab"]), 300)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    text = dict(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=hidden, intermediate_size_mlp=2 * hidden,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, max_position_embeddings=256,
                rope_parameters=rope, bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)
    if vision:
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                     patch_size=14, vision_output_dim=hidden, projector_input_dim=hidden,
                     projector_output_dim=hidden, pixel_shuffle_ratio=0.5)
        model = tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text, vision_config=tower))
    else:
        model = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**text))
    model = _randomize(model)
    # a copy: .to() would also cast the complex RoPE table of the model returned
    (copy.deepcopy(model).to(getattr(torch, dtype)) if dtype != "float32" else model).save_pretrained(str(d))
    return model.language_model if vision else model  # (its forward without images fails in transformers 5.24)


def _sparse_config(src, dst, drop):
    """A copy of checkpoint ``src`` whose config.json omits ``drop`` (transformers' defaults apply)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key in drop:
        cfg.pop(key)
    (dst / "config.json").write_text(json.dumps(cfg))


def _legacy_config(src, dst):
    """A copy of checkpoint ``src`` whose config.json has the transformers-4 form released checkpoints ship:
    rope_theta, partial_rotary_factor and rope_scaling at the top level instead of rope_parameters."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor") / 2  # another value than the default
    cfg["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    (dst / "config.json").write_text(json.dumps(cfg))


# config.json keys whose values in our checkpoints are transformers' defaults
GLM_DEFAULTED = ("n_group", "topk_group", "n_shared_experts", "first_k_dense_replace", "norm_topk_prob",
                 "num_nextn_predict_layers", "rms_norm_eps", "rope_parameters")
LLAMA4_DEFAULTED = ("rms_norm_eps", "layer_types", "no_rope_layers", "moe_layers", "num_experts_per_tok",
                    "attention_chunk_size", "floor_scale", "attn_scale")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The checkpoints, their transformers models, and convert_hf_to_gguf.py's files of them."""
    lib_dir()  # the oracle must be installed: fail, never skip
    root = tmp_path_factory.mktemp("glm_llama4")
    models = {"glm4moe": make_glm4moe(root / "glm4moe", seed=1), "llama4": make_llama4(root / "llama4", seed=2),
              "llama4mm": make_llama4(root / "llama4mm", seed=4, vision=True)}
    make_llama4(root / "llama4-bf16", seed=3, dtype="bfloat16")
    _sparse_config(root / "glm4moe", root / "glm4moe-sparse", GLM_DEFAULTED)
    _sparse_config(root / "llama4", root / "llama4-sparse", LLAMA4_DEFAULTED)
    jobs = [(root / a, root / f"{a}.{t}.theirs.gguf", t.lower(), PRE[a]) for a in PRE for t in OUTTYPES]
    jobs += [(root / "llama4-bf16", root / f"llama4-bf16.{t}.theirs.gguf", t.lower(), PRE["llama4"])
             for t in ("F16", "BF16")]
    for a in FAMILIES:
        _legacy_config(root / a, root / f"{a}-legacy")
    jobs += [(root / f"{a}-{v}", root / f"{a}-{v}.F16.theirs.gguf", "f16", PRE[a])
             for a in FAMILIES for v in ("sparse", "legacy")]
    jobs += [(root / a, root / f"{a}.vocab.theirs.gguf", "f16", PRE[a], "--vocab-only") for a in FAMILIES]
    vendor_convert_jobs(jobs)
    return root, models


@pytest.mark.parametrize("ftype", OUTTYPES)
@pytest.mark.parametrize("arch", list(PRE))
def test_matches_convert_hf_to_gguf(built, arch, ftype):
    root, _ = built
    ours = root / f"{arch}.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / arch, ours, ftype)
    meta = assert_same_gguf(ours, root / f"{arch}.{ftype}.theirs.gguf")
    assert meta["general.architecture"][2] == arch.replace("llama4mm", "llama4")
    with gguf_kquant.open(ours) as f:
        shapes = {t.name: tuple(t.shape) for t in f.tensors}
    if arch == "glm4moe":  # 2 layers + the MTP layer; experts stacked; the MTP tensors kept
        assert meta["glm4moe.block_count"][2] == 3 and meta["glm4moe.nextn_predict_layers"][2] == 1
        assert meta["glm4moe.rope.dimension_count"][2] == 16  # partial_rotary_factor 0.5 of head_dim 32
        assert shapes["blk.2.ffn_down_exps.weight"] == (4, 64, 32)
        assert shapes["blk.2.nextn.eh_proj.weight"] == (64, 128)
        assert "blk.0.ffn_up.weight" in shapes and "blk.0.ffn_up_exps.weight" not in shapes
    else:  # fused experts transposed and split
        assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == (4, 64, 64)
        assert "blk.0.ffn_up.weight" in shapes and "rope_freqs.weight" in shapes
        assert not any(n.startswith(("v.", "mm.")) for n in shapes)  # no vision tower in the text model


@pytest.mark.parametrize("variant", ["sparse", "legacy"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_config_forms_read_as_transformers_does(built, arch, variant):
    """config.json without the keys transformers fills in (AutoConfig, which the script reads), or in the
    transformers-4 form: the same file as the script's."""
    root, _ = built
    ours = root / f"{arch}-{variant}.F16.ours.gguf"
    gguf_kquant.convert_hf(root / f"{arch}-{variant}", ours, "F16")
    meta = assert_same_gguf(ours, root / f"{arch}-{variant}.F16.theirs.gguf")
    if arch == "glm4moe" and variant == "legacy":
        assert meta["glm4moe.rope.dimension_count"][2] == 8  # partial_rotary_factor 0.25 of head_dim 32


@pytest.mark.parametrize("ftype", ["F16", "BF16"])
def test_bf16_fused_experts_match(built, ftype):
    """BF16 fused experts: transposed and widened slab by slab, the script's bytes."""
    root, _ = built
    ours = root / f"llama4-bf16.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / "llama4-bf16", ours, ftype)
    assert_same_gguf(ours, root / f"llama4-bf16.{ftype}.theirs.gguf")


def test_glm_special_tokens(built):
    """_set_vocab_glm: bos is [gMASK], eot <|user|>, eom <|observation|>, unk <|endoftext|>."""
    root, _ = built
    meta = assert_same_gguf(root / "glm4moe.F16.ours.gguf", root / "glm4moe.F16.theirs.gguf")
    tokens = meta["tokenizer.ggml.tokens"][2]
    for key, tok in (("bos", "[gMASK]"), ("eot", "<|user|>"), ("eom", "<|observation|>"), ("unknown", "<|endoftext|>")):
        assert tokens[meta[f"tokenizer.ggml.{key}_token_id"][2]] == tok


@pytest.mark.parametrize("arch", FAMILIES)
def test_vocab_only_matches_convert_hf_to_gguf(built, arch):
    root, _ = built
    ours = root / f"{arch}.vocab.ours.gguf"
    gguf_kquant.convert_hf(root / arch, ours, vocab_only=True)
    assert_same_gguf(ours, root / f"{arch}.vocab.theirs.gguf")


PROMPT = "Hello world, 12345 Ünïcödé 🦙 and more text, long enough for two dozen tokens"


@pytest.mark.parametrize("arch", list(PRE))
def test_logits_match_transformers(built, arch):
    """llama.cpp on our files against transformers: top-1 equal and cosine >= 0.999 at F16 (F16-rounded
    weights on both sides); the F32, BF16 and Q8_0 files load and agree loosely (top-1 at F32)."""
    root, models = built
    ids = hf_tokenizer(root / arch).encode(PROMPT).ids[:24]
    assert len(ids) == 24
    ref16 = hf_logits(models[arch], ids, f16_weights=True)
    ref32 = hf_logits(models[arch], ids)
    for ftype, ref, min_cos in (("F16", ref16, 0.999), ("F32", ref32, 0.999), ("BF16", ref32, 0.99),
                                ("Q8_0", ref32, 0.99)):
        path = root / f"{arch}.{ftype}.ours.gguf"
        if not path.exists():
            gguf_kquant.convert_hf(root / arch, path, ftype)
        ours = gguf_logits(path, ids)
        assert_logits_match(ours, ref, f"{arch} {ftype}", min_cos, top1=ftype in ("F16", "F32"))


@pytest.mark.parametrize("arch", FAMILIES)
def test_mix_equals_convert_then_llama_quantize(tmp_path, arch):
    """Q4_K_M in one pass == F16 then llama-quantize, byte for byte; rows of 256 so that the k-quants (not
    only their fallbacks) meet the experts."""
    d = tmp_path / arch
    (make_glm4moe if arch == "glm4moe" else make_llama4)(d, hidden=256, seed=40)
    f16, ref, ours = tmp_path / "f16.gguf", tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(d, f16, "F16")
    llama_quantize(f16, ref, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    gguf_kquant.convert_hf(d, ours, "Q4_K_M")
    assert_same_gguf(ours, ref)
    with gguf_kquant.open(ours) as f:
        types = {t.name: t.ggml_type.name for t in f.tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_K" and types["blk.1.ffn_down_exps.weight"] in ("Q6_K", "Q4_K")
    ids = hf_tokenizer(d).encode(PROMPT).ids[:24]
    assert np.isfinite(gguf_logits(ours, ids)).all()  # llama.cpp loads and runs it


def test_transposed_rows_equal_numpy(tmp_path):
    """Row slabs of every length, crossing expert boundaries or not, are the rows of the transposed column
    range of every expert."""
    from gguf_kquant.convert.archs.experts import TransposedExperts
    from gguf_kquant.convert.safetensors import SafetensorsFile, write_safetensors

    a = np.random.default_rng(0).standard_normal((3, 4, 10)).astype(np.float32)
    write_safetensors(tmp_path / "m.safetensors", {"e": a})
    t = SafetensorsFile(tmp_path / "m.safetensors").tensors["e"]
    for cols in (slice(None), slice(0, 5), slice(5, 10), slice(1, None, 2)):
        src = TransposedExperts("x", t, cols)
        want = a[:, :, cols].transpose(0, 2, 1)
        assert src.shape == want.shape
        rows, flat = src.array().reshape(-1, 4), want.reshape(-1, 4)
        n = flat.shape[0]
        for step in (1, 2, 3, 4, 7, n, 100):
            assert np.array_equal(np.concatenate([rows[r:r + step] for r in range(0, n, step)]), flat), step


def _rewrite_checkpoint(src, dst, edit):
    """A copy of checkpoint ``src`` whose tensors dict goes through ``edit`` (name -> torch tensor)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["glm-missing-expert", "glm-no-experts", "glm-odd-expert", "glm-gate-shape",
                                  "llama4-fused-shape", "llama4-missing-fused"])
def test_bad_checkpoints_refused_before_writing(built, tmp_path, case):
    root, _ = built
    arch = case.split("-")[0].replace("glm", "glm4moe")
    if case == "glm-missing-expert":
        name = "model.layers.1.mlp.experts.2.up_proj.weight"
        edit = lambda s: s.pop(name)  # noqa: E731
    elif case == "glm-no-experts":  # a whole MoE layer without experts (ExpertStacker sees none of them)
        name = "model.layers.1.mlp.experts.0.down_proj.weight"
        edit = lambda s: [s.pop(k) for k in list(s) if ".layers.1.mlp.experts." in k]  # noqa: E731
    elif case == "llama4-missing-fused":
        name = "model.layers.3.feed_forward.experts.down_proj"
        edit = lambda s: s.pop(name)  # noqa: E731
    elif case == "glm-odd-expert":
        name = "model.layers.1.mlp.experts.3.gate_proj.weight"
        edit = lambda s: s.update({name: s[name][:, :32].contiguous()})  # noqa: E731
    elif case == "glm-gate-shape":
        name = "model.layers.1.mlp.gate.weight"
        edit = lambda s: s.update({name: s[name][:3].contiguous()})  # noqa: E731
    else:
        name = "model.layers.1.feed_forward.experts.gate_up_proj"
        edit = lambda s: s.update({name: s[name][:, :, :96].contiguous()})  # noqa: E731
    _rewrite_checkpoint(root / arch, tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        gguf_kquant.convert_hf(tmp_path / "bad", tmp_path / "bad.gguf", "F16")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("key, value", [("no_rope_layers", [1, 1, 0, 1]), ("attention_chunk_size", 4096),
                                        ("use_qk_norm", False)])
def test_llama4_attention_llama_cpp_fixes_refused(built, tmp_path, key, value):
    """llama.cpp fixes the NoPE layers (every 4th), the chunk size (8192) and q/k norm (on unless 128 experts):
    a config that differs would give a file that loads but computes something else."""
    root, _ = built
    shutil.copytree(root / "llama4", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ConversionError, match=key):
        gguf_kquant.convert_hf(tmp_path / "m", tmp_path / "m.gguf", "F16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("arch, key, value", [("glm4moe", "num_nextn_predict_layers", -1),
                                              ("glm4moe", "n_routed_experts", "4"),
                                              ("glm4moe", "routed_scaling_factor", float("inf")),
                                              ("llama4", "interleave_moe_layer_step", 0)])
def test_bad_config_values_refused(built, tmp_path, arch, key, value):
    root, _ = built
    shutil.copytree(root / arch, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ConversionError, match=key):
        gguf_kquant.convert_hf(tmp_path / "m", tmp_path / "m.gguf", "F16")
    assert not (tmp_path / "m.gguf").exists()


def test_fused_experts_are_transposed_slab_by_slab(tmp_path):
    """32 fused experts of 256 x 1024 (gate_up_proj 32 MiB in F16, 64 MiB as float32): the conversion's
    Python-side peak stays below three 16 MiB slabs, so no fused tensor is ever transposed as a whole
    (measured: 29 MiB; 105 MiB when the whole tensor is transposed at once)."""
    from gguf_kquant.convert.safetensors import write_safetensors

    n_expert, n_embd, n_ff, n_vocab = 32, 256, 1024, 400
    d = tmp_path / "m"
    train_bpe(d, regex=LLAMA3_RE, specials=LLAMA4_SPECIALS, bos=LLAMA4_SPECIALS[0], eos=LLAMA4_SPECIALS[1])
    cfg = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "hidden_size": n_embd,
           "intermediate_size": n_ff, "intermediate_size_mlp": 2 * n_ff, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_local_experts": n_expert,
           "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": n_vocab, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 256, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def t(*shape):  # F16, streamed one outermost slice at a time
        inner = shape[1:] if len(shape) > 1 else shape
        chunks = (rng.standard_normal(inner, dtype=np.float32).astype(np.float16).tobytes()
                  for _ in range(shape[0] if len(shape) > 1 else 1))
        return "F16", list(shape), chunks

    p = "model.layers.0."
    write_safetensors(d / "model.safetensors", {
        "model.embed_tokens.weight": t(n_vocab, n_embd), "lm_head.weight": t(n_vocab, n_embd),
        "model.norm.weight": t(n_embd), p + "input_layernorm.weight": t(n_embd),
        p + "post_attention_layernorm.weight": t(n_embd), p + "self_attn.q_proj.weight": t(256, n_embd),
        p + "self_attn.k_proj.weight": t(128, n_embd), p + "self_attn.v_proj.weight": t(128, n_embd),
        p + "self_attn.o_proj.weight": t(n_embd, 256), p + "feed_forward.router.weight": t(n_expert, n_embd),
        p + "feed_forward.shared_expert.gate_proj.weight": t(n_ff, n_embd),
        p + "feed_forward.shared_expert.up_proj.weight": t(n_ff, n_embd),
        p + "feed_forward.shared_expert.down_proj.weight": t(n_embd, n_ff),
        p + "feed_forward.experts.gate_up_proj": t(n_expert, n_embd, 2 * n_ff),
        p + "feed_forward.experts.down_proj": t(n_expert, n_ff, n_embd)})
    assert_converts_in_slabs(d, tmp_path / "m.gguf")
    from safetensors.numpy import load_file

    src = load_file(str(d / "model.safetensors"))[p + "feed_forward.experts.gate_up_proj"]
    with gguf_kquant.open(tmp_path / "m.gguf") as f:
        up = {t.name: t for t in f.tensors}["blk.0.ffn_up_exps.weight"]
        assert tuple(up.shape) == (n_expert, n_ff, n_embd)
        assert np.array_equal(np.frombuffer(bytes(up.raw()), np.float16).reshape(up.shape),
                              src[:, :, n_ff:].transpose(0, 2, 1))
