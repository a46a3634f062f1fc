"""GptOssForCausalLM -> ``gpt-oss``: our conversion equals llama.cpp's convert_hf_to_gguf.py on tiny random
checkpoints in both forms transformers/OpenAI save (bf16 fused experts with interleaved gate/up columns; MXFP4
blocks and scales), at F32, F16, BF16 and Q8_0; llama.cpp computes what transformers computes from our F16
files; Q4_K_M equals our F16 then llama-quantize; MXFP4 experts reach the file as byte moves (the codec is
never called) that llama.cpp decodes to exactly the checkpoint's values."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import ConversionError
from gguf_kquant.types import GGMLType
from oracle import lib_dir, to_float
from test_convert_helpers import (QWEN2_RE, assert_converts_in_slabs, assert_logits_match, assert_same_gguf,
                                  gguf_logits, hf_logits, hf_tokenizer, llama_quantize, train_bpe,
                                  vendor_convert_jobs)

OUTTYPES = ("F32", "F16", "BF16", "Q8_0")
FORMS = ("bf16", "mxfp4")
PRE = "qwen2"  # what our trained tokenizer's split regex is; given to convert_hf_to_gguf.py (no hash entry)
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def make_gpt_oss(out_dir, *, hidden=64, ff=96, seed=0):
    """A 2-layer GptOss checkpoint (4 experts, 2 per token, a 16-token window on layer 0, YaRN), saved in bf16;
    returns the float32 transformers model holding exactly the saved (bf16-rounded) weights."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    train_bpe(out_dir, regex=QWEN2_RE, specials=["<|startoftext|>", "<|endoftext|>", "<|return|>"], bos=None,
              eos="<|endoftext|>", add_bos=False)
    n_vocab = max(len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]), 300)
    cfg = tf.GptOssConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=n_vocab,
                          hidden_size=hidden, intermediate_size=ff, head_dim=32, num_attention_heads=4,
                          num_key_value_heads=2, sliding_window=16, max_position_embeddings=256,
                          rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                           "truncate": False, "original_max_position_embeddings": 64,
                                           "rope_theta": 150000.0},
                          bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model = tf.GptOssForCausalLM(cfg)
    with torch.no_grad():  # random norms, biases and sinks: a lost one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.ndim == 1 or name.endswith("_bias"):
                p.copy_(torch.randn_like(p) * (0.5 if "sinks" in name else 0.02))
            p.copy_(p.bfloat16().float())
    model.eval()
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    return model.float()


def quantize_mxfp4(w: np.ndarray):
    """Rows of ``w`` (..., n) -> the checkpoint's (blocks (..., n/32, 16), scales (..., n/32)) uint8 and the
    values they hold: per 32 values an E8M0 exponent (bias 127) putting amax in [4, 8), nearest E2M1 codes,
    two codes a byte (element 2j low nibble, 2j+1 high)."""
    x = w.reshape(*w.shape[:-1], -1, 32).astype(np.float32)
    amax = np.abs(x).max(-1, keepdims=True)
    e = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 2 + 127, 0).astype(np.uint8)
    scale = np.exp2(e.astype(np.float32) - 127)
    codes = np.abs(x[..., None] / scale[..., None] - E2M1).argmin(-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, e[..., 0], (E2M1[codes] * scale).reshape(w.shape)


def make_mxfp4_form(src_dir, out_dir, model):
    """``src_dir``'s checkpoint with its experts in MXFP4 as the released gpt-oss checkpoints store them
    (output-major rows, ``quantization_config.quant_method = "mxfp4"``); ``model`` gets the values they hold."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src_dir, out_dir)
    tensors = load_file(str(out_dir / "model.safetensors"))
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}.mlp.experts."
        for w in ("gate_up_proj", "down_proj"):
            blocks, scales, values = quantize_mxfp4(getattr(layer.mlp.experts, w).detach().numpy().swapaxes(1, 2))
            del tensors[p + w]
            tensors[p + w + "_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
            tensors[p + w + "_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
            with torch.no_grad():
                getattr(layer.mlp.experts, w).copy_(torch.from_numpy(values.swapaxes(1, 2).copy()))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                  "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both forms of one checkpoint, their transformers models, and convert_hf_to_gguf.py's files of them."""
    import copy

    lib_dir()  # the oracle must be installed: fail, never skip
    root = tmp_path_factory.mktemp("gpt_oss")
    models = {"bf16": make_gpt_oss(root / "bf16", seed=7)}
    models["mxfp4"] = make_mxfp4_form(root / "bf16", root / "mxfp4", copy.deepcopy(models["bf16"]))
    _drop_defaulted_keys(root / "bf16", root / "defaults")
    vendor_convert_jobs([(root / f, root / f"{f}.{t}.theirs.gguf", t.lower(), PRE) for f in FORMS for t in OUTTYPES]
                        + [(root / "defaults", root / "defaults.F16.theirs.gguf", "f16", PRE)])
    return root, models


def _drop_defaulted_keys(src_dir, out_dir):
    """The checkpoint with config keys transformers has defaults for removed (RoPE: YaRN x32 of 4096)."""
    shutil.copytree(src_dir, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    for key in ("rope_parameters", "sliding_window", "num_experts_per_tok", "rms_norm_eps"):
        del cfg[key]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def test_config_defaults_match_convert_hf_to_gguf(built):
    root, _ = built
    ours = root / "defaults.F16.ours.gguf"
    gguf_kquant.convert_hf(root / "defaults", ours, "F16")
    meta = assert_same_gguf(ours, root / "defaults.F16.theirs.gguf")
    assert meta["gpt-oss.rope.scaling.factor"][2] == 32.0 and meta["gpt-oss.attention.sliding_window"][2] == 128


@pytest.mark.parametrize("ftype", OUTTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_matches_convert_hf_to_gguf(built, form, ftype):
    root, _ = built
    ours = root / f"{form}.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(root / form, ours, ftype, overwrite=True)
    meta = assert_same_gguf(ours, root / f"{form}.{ftype}.theirs.gguf")
    assert meta["gpt-oss.rope.scaling.yarn_beta_fast"][2] == 32.0
    with gguf_kquant.open(ours) as f:
        types = {t.name: t.ggml_type.name for t in f.tensors}
    assert types["blk.1.ffn_up_exps.weight"] == ("MXFP4" if form == "mxfp4" else ftype)


@pytest.mark.parametrize("form", FORMS)
def test_logits_match_transformers(built, form):
    root, models = built
    out = root / f"{form}.F16.logits.gguf"
    gguf_kquant.convert_hf(root / form, out, "F16", overwrite=True)
    text = "Hello world, 12345 Ünïcödé 🦙 and more text, long enough to pass a sliding window"
    ids = hf_tokenizer(root / form).encode(text).ids[:24]
    assert len(ids) == 24  # longer than the 16-token window of layer 0
    ours = gguf_logits(out, ids)
    ref = hf_logits(models[form], ids, f16_weights=True)
    assert_logits_match(ours, ref, f"{form}")


def test_mxfp4_experts_are_moved_not_decoded(built, monkeypatch, tmp_path):
    """With the MXFP4 codec disabled the conversion still succeeds; llama.cpp's own dequantizer turns each
    expert tensor back into exactly the values the checkpoint holds (gate: even rows, up: odd rows)."""
    import gguf_kquant.types as types

    root, models = built

    def refuse(*a, **k):
        raise AssertionError("the MXFP4 codec was called")

    for op in ("quantize", "dequantize"):
        monkeypatch.setitem(types._KERNELS, (GGMLType.MXFP4, op), refuse)
    out = tmp_path / "mx.gguf"
    gguf_kquant.convert_hf(root / "mxfp4", out, "Q8_0")
    with gguf_kquant.open(out) as f:
        raw = {t.name: (t.shape, bytes(t.raw())) for t in f.tensors if t.ggml_type == GGMLType.MXFP4}
    assert len(raw) == 6
    for i, layer in enumerate(models["mxfp4"].model.layers):
        gate_up = layer.mlp.experts.gate_up_proj.detach().numpy().swapaxes(1, 2)
        want = {"gate": gate_up[:, 0::2], "up": gate_up[:, 1::2],
                "down": layer.mlp.experts.down_proj.detach().numpy().swapaxes(1, 2)}
        for w, values in want.items():
            shape, data = raw[f"blk.{i}.ffn_{w}_exps.weight"]
            assert tuple(shape) == values.shape
            got = to_float(int(GGMLType.MXFP4), np.frombuffer(data, np.uint8).reshape(1, -1), values.size)
            assert np.array_equal(got.reshape(values.shape), values), (i, w)


def test_q4_k_m_equals_f16_then_llama_quantize(tmp_path):
    """Q4_K_M in one pass == our F16 (equal to convert_hf_to_gguf.py's, above) then llama-quantize; rows of 256
    so that the k-quants themselves meet the experts split out of gate_up_proj."""
    d = tmp_path / "m256"
    make_gpt_oss(d, hidden=256, ff=256, seed=11)
    f16, ref, ours = tmp_path / "f16.gguf", tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(d, f16, "F16")
    llama_quantize(f16, ref, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    gguf_kquant.convert_hf(d, ours, "Q4_K_M")
    assert_same_gguf(ours, ref)
    with gguf_kquant.open(ours) as f:
        types = {t.name: t.ggml_type.name for t in f.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K" and types["blk.0.ffn_up_exps.weight"] == "Q4_K"


@pytest.mark.parametrize("bad", ["shape", "missing_scales"])
def test_bad_experts_refused_before_writing(built, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    root, _ = built
    d = tmp_path / "bad"
    shutil.copytree(root / "mxfp4", d)
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj_scales"
    if bad == "shape":
        tensors[name] = tensors[name][:, :-1].clone()
    else:
        del tensors[name]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="layers.1.mlp.experts.down_proj_scales"):
        gguf_kquant.convert_hf(d, tmp_path / "bad.gguf", "F16")
    assert not (tmp_path / "bad.gguf").exists()


def test_mxfp4_moe_equals_f16_then_llama_quantize(built, tmp_path):
    """MXFP4_MOE of the MXFP4 checkpoint: the experts copied (MXFP4 to MXFP4), the rest Q8_0 — what
    llama-quantize makes of convert_hf_to_gguf.py's F16; Q4_K_M would requantize MXFP4, which both refuse."""
    root, _ = built
    f16, ref, ours = tmp_path / "f16.gguf", tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(root / "mxfp4", f16, "F16")
    llama_quantize(f16, ref, 38)  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
    gguf_kquant.convert_hf(root / "mxfp4", ours, "MXFP4_MOE")
    assert_same_gguf(ours, ref)
    with pytest.raises(ConversionError, match="requantizing"):
        gguf_kquant.convert_hf(root / "mxfp4", tmp_path / "q4.gguf", "Q4_K_M")
    assert not (tmp_path / "q4.gguf").exists()


def test_fused_expert_rows_equal_numpy(tmp_path):
    """Row slabs of every length, crossing experts or not, are the rows of ``w.swapaxes(1, 2)[:, k::2]``."""
    from gguf_kquant.convert.archs.experts import TransposedExperts
    from gguf_kquant.convert.safetensors import SafetensorsFile
    from safetensors.numpy import save_file

    w = np.random.default_rng(0).standard_normal((3, 4, 10)).astype(np.float32)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    t = SafetensorsFile(tmp_path / "m.safetensors").tensors["w"]
    for start, step in ((0, 1), (0, 2), (1, 2)):
        want = w.swapaxes(1, 2)[:, start::step].reshape(-1, 4)
        rows = TransposedExperts(t.name, t, slice(start, None, step)).array().reshape(-1, 4)
        assert rows.shape == want.shape
        for n in (1, 2, 3, 4, 7, 100):
            got = np.concatenate([rows[r:r + n] for r in range(0, rows.shape[0], n)])
            assert np.array_equal(got, want), (start, step, n)


def _synthetic_gpt_oss(d, n_expert=32, n_embd=256, n_ff=1024):
    """A one-layer bf16-form GptOss checkpoint written tensor by tensor (BF16), without transformers."""
    from gguf_kquant.convert.safetensors import write_safetensors

    train_bpe(d, regex=QWEN2_RE, specials=["<|endoftext|>"], eos="<|endoftext|>", add_bos=False)
    n_vocab, n_head, n_kv, hd = 400, 4, 2, 64
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": n_embd,
           "intermediate_size": n_ff, "num_hidden_layers": 1, "num_attention_heads": n_head,
           "num_key_value_heads": n_kv, "head_dim": hd, "num_local_experts": n_expert, "num_experts_per_tok": 2,
           "vocab_size": n_vocab, "sliding_window": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 150000.0, "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def t(*shape):
        bits = (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return ("BF16", list(shape), iter([bits.tobytes()]))

    p = "model.layers.0."
    write_safetensors(d / "model.safetensors", {
        "model.embed_tokens.weight": t(n_vocab, n_embd), "lm_head.weight": t(n_vocab, n_embd),
        "model.norm.weight": t(n_embd), p + "input_layernorm.weight": t(n_embd),
        p + "post_attention_layernorm.weight": t(n_embd), p + "self_attn.sinks": t(n_head),
        p + "self_attn.q_proj.weight": t(n_head * hd, n_embd), p + "self_attn.q_proj.bias": t(n_head * hd),
        p + "self_attn.k_proj.weight": t(n_kv * hd, n_embd), p + "self_attn.k_proj.bias": t(n_kv * hd),
        p + "self_attn.v_proj.weight": t(n_kv * hd, n_embd), p + "self_attn.v_proj.bias": t(n_kv * hd),
        p + "self_attn.o_proj.weight": t(n_embd, n_head * hd), p + "self_attn.o_proj.bias": t(n_embd),
        p + "mlp.router.weight": t(n_expert, n_embd), p + "mlp.router.bias": t(n_expert),
        p + "mlp.experts.gate_up_proj": t(n_expert, n_embd, 2 * n_ff),
        p + "mlp.experts.gate_up_proj_bias": t(n_expert, 2 * n_ff),
        p + "mlp.experts.down_proj": t(n_expert, n_ff, n_embd), p + "mlp.experts.down_proj_bias": t(n_expert, n_embd),
    })


def test_fused_experts_are_converted_slab_by_slab(tmp_path):
    """32 experts of 256 x 2048 fused gate_up: 32 MiB in BF16, 64 MiB widened to float32; transposing and
    splitting it whole peaks at 105 MiB (measured), slab by slab near one 16 MiB slab (measured: 39 MiB)."""
    d = tmp_path / "gpt-oss"
    d.mkdir()
    _synthetic_gpt_oss(d)
    assert_converts_in_slabs(d, tmp_path / "o.gguf")
    with gguf_kquant.open(tmp_path / "o.gguf") as f:
        shapes = {t.name: tuple(t.shape) for t in f.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == shapes["blk.0.ffn_up_exps.weight"] == (32, 1024, 256)
    assert shapes["blk.0.ffn_down_exps.weight"] == (32, 256, 1024)


def test_bad_fused_experts_refused_before_writing(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    _synthetic_gpt_oss(d, n_expert=4, n_embd=64, n_ff=96)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64  # the checkpoint's gate_up_proj is 2 x 96 wide
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="layers.0.mlp.experts.gate_up_proj"):
        gguf_kquant.convert_hf(d, tmp_path / "bad.gguf", "F16")
    assert not (tmp_path / "bad.gguf").exists()
