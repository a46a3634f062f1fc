"""convert_lora: PEFT LoRA adapters -> GGUF, checked against llama.cpp's convert_lora_to_gguf.py (same file) and
llama.cpp's libllama applying the adapter (logits of transformers with the adapter merged)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.convert.safetensors import write_safetensors
from gguf_kquant.errors import ConversionError

from test_convert_helpers import assert_same_gguf, hf_logits, make_model

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                     "embed_tokens"],
           "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "qwen3": ["q_proj", "k_proj", "down_proj"],
           "mistral": ["q_proj", "v_proj", "down_proj"]}  # a BF16 base and adapter
OUTTYPES = ["f32", "f16", "bf16", "q8_0"]


def make_adapter(model, out_dir: Path, targets, seed: int = 1, r: int = 8, dtype=None):
    """A PEFT LoRA adapter of ``model`` with random (non-zero) B matrices (stored as ``dtype``, default
    float32); returns the PEFT model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # PEFT starts B at zero (a no-op adapter): make it change the logits
                p.normal_(0, 0.05)
    if dtype is not None:
        pm.to(dtype)
    pm.save_pretrained(str(out_dir))
    return pm


def vendor_convert_lora_many(jobs) -> None:
    """llama.cpp's convert_lora_to_gguf.py for each (adapter_dir, base_dir, outfile, outtype), one process."""
    from oracle import vendor_llama_cpp

    src = vendor_llama_cpp()
    argvs = [["convert_lora_to_gguf.py", str(a), "--base", str(b), "--outfile", str(o), "--outtype", t]
             for a, b, o, t in jobs]
    driver = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(src)!r}); sys.path.insert(1, {str(src / 'gguf-py')!r})\n"
        f"for sys.argv in {argvs!r}:\n"
        f"    runpy.run_path({str(src / 'convert_lora_to_gguf.py')!r}, run_name='__main__')\n"
    )
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    r = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=str(src))
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    """{arch: (base dir, adapter dir, merged transformers model, base transformers model logits)}"""
    import copy

    import torch

    root = tmp_path_factory.mktemp("lora")
    out = {}
    for arch, targets in TARGETS.items():
        base, adapter = root / arch, root / f"{arch}-adapter"
        bf16 = arch == "mistral"
        model = make_model(arch, base, dtype="bfloat16" if bf16 else "float32")
        plain = copy.deepcopy(model)
        pm = make_adapter(model, adapter, targets, dtype=torch.bfloat16 if bf16 else None)
        out[arch] = (base, adapter, pm.merge_and_unload(), plain)
    return root, out


def test_lora_equals_convert_lora_to_gguf(lora_models):
    from safetensors.numpy import load_file

    root, models = lora_models
    jobs = [(a, b, root / f"{arch}-v-{t}.gguf", t) for arch, (b, a, _, _) in models.items() for t in OUTTYPES]
    # norms in an adapter (mergekit-extract-lora adds them): F32, ahead of the LoRA pairs
    base, adapter, _, _ = models["llama"]
    normed = _copy(adapter, root / "llama-normed")
    tensors = load_file(str(normed / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.1.post_attention_layernorm.weight"] = np.full(64, 1.5, np.float32)
    tensors["base_model.model.model.norm.weight"] = np.full(64, 0.5, np.float32)
    write_safetensors(normed / "adapter_model.safetensors", tensors)
    jobs.append((normed, base, root / "llama-normed-v-f16.gguf", "f16"))
    # an activated LoRA's invocation tokens: adapter.alora.invocation_tokens, an array of UINT32
    alora = _copy(models["qwen3"][1], root / "qwen3-alora")
    cfg = json.loads((alora / "adapter_config.json").read_text())
    (alora / "adapter_config.json").write_text(json.dumps({**cfg, "alora_invocation_tokens": [5, 17, 2]}))
    jobs.append((alora, models["qwen3"][0], root / "qwen3-alora-v-f32.gguf", "f32"))
    vendor_convert_lora_many(jobs)
    for adapter, base, theirs, t in jobs:
        ours = root / f"ours-{theirs.name}"
        gguf_kquant.convert_lora(adapter, ours, base=base, outtype=t)
        meta = assert_same_gguf(ours, theirs)
        assert meta["general.type"][2] == "adapter" and meta["adapter.lora.alpha"][2] == 16.0
        if "alora" in adapter.name:
            assert meta["adapter.alora.invocation_tokens"][2] == [5, 17, 2]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_applies_the_adapter(lora_models, arch):
    from oracle import libllama

    root, models = lora_models
    base, adapter, merged, plain = models[arch]
    libllama()
    base_gguf = root / f"{arch}-base-f32.gguf"
    gguf_kquant.convert_hf(base, base_gguf, "F32", overwrite=True)
    ids = [3, 17, 42, 99, 150, 7, 260, 31, 5, 77, 120, 201]
    want = hf_logits(merged, ids)
    before = hf_logits(plain, ids)
    for t in ("F32", "F16"):
        lora = root / f"{arch}-lora-{t}.gguf"
        gguf_kquant.convert_lora(adapter, lora, base=base, outtype=t, overwrite=True)
        got = lora_logits(base_gguf, lora, ids, root / f"logits-{t}.npy")
        cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert (got.argmax(1) == want.argmax(1)).all(), t
        assert cos.min() >= 0.999, (t, cos.min())
    # the adapter matters: without it the logits are measurably elsewhere
    cos0 = np.sum(before * want, 1) / np.linalg.norm(before, axis=1) / np.linalg.norm(want, axis=1)
    assert cos0.min() < 0.999


_LORA_DRIVER = """
import ctypes, sys, numpy as np, llama_cpp as L
L.llama_backend_init()
mp = L.llama_model_default_params(); mp.use_extra_bufts = False
m = L.llama_model_load_from_file(sys.argv[1].encode(), mp)
assert m, "llama.cpp could not load " + sys.argv[1]
ad = L.llama_adapter_lora_init(m, sys.argv[2].encode())
assert ad, "llama.cpp could not load the adapter " + sys.argv[2]
cp = L.llama_context_default_params(); cp.n_ctx = 64; cp.n_batch = 64; cp.n_threads = 1; cp.n_threads_batch = 1
ctx = L.llama_init_from_model(m, cp)
ads = (L.llama_set_adapters_lora.argtypes[1]._type_ * 1)(ad); scales = (ctypes.c_float * 1)(1.0)
assert L.llama_set_adapters_lora(ctx, ads, 1, scales) == 0
toks = [int(t) for t in sys.argv[4].split(",")]
b = L.llama_batch_init(len(toks), 0, 1)
for i, t in enumerate(toks):
    b.token[i] = t; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1
b.n_tokens = len(toks)
assert L.llama_decode(ctx, b) == 0
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(m))
np.save(sys.argv[3], np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(toks), n_vocab)).copy())
"""


def lora_logits(model, lora, tokens, out) -> np.ndarray:
    """llama.cpp's logits for ``tokens`` through ``model`` with LoRA adapter file ``lora`` at scale 1."""
    r = subprocess.run([sys.executable, "-c", _LORA_DRIVER, str(model), str(lora), str(out),
                        ",".join(map(str, tokens))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"llama.cpp failed on {lora}: rc {r.returncode}\n{r.stderr[-2000:]}"
    return np.load(out)


# ---- bad input: ConversionError naming the file or tensor, nothing written ----------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refused(adapter, base, dst, match):
    with pytest.raises(ConversionError, match=match):
        gguf_kquant.convert_lora(adapter, dst, base=base)
    assert not Path(dst).exists()


def test_missing_adapter_config(lora_models, tmp_path):
    _, models = lora_models
    base, adapter, _, _ = models["llama"]
    bad = _copy(adapter, tmp_path / "a")
    (bad / "adapter_config.json").unlink()
    _refused(bad, base, tmp_path / "o.gguf", "adapter_config.json: missing")


@pytest.mark.parametrize("alpha", ["16", None, True, float("inf"), 1e39, 3.4028235677973366e+38])
def test_a_bad_lora_alpha_is_refused_naming_the_adapter_config(lora_models, tmp_path, alpha):
    """lora_alpha is written as FLOAT32: a value float32 cannot hold is refused before the writer sees it."""
    _, models = lora_models
    base, adapter, _, _ = models["llama"]
    bad = _copy(adapter, tmp_path / "a")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = alpha
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(bad, base, tmp_path / "o.gguf", "adapter_config.json: key 'lora_alpha' must be a number")


def test_unsupported_architecture(lora_models, tmp_path):
    _, models = lora_models
    base, adapter, _, _ = models["llama"]
    bad = tmp_path / "base"
    bad.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["Phi3ForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    _refused(adapter, bad, tmp_path / "o.gguf", r"Phi3ForCausalLM.*supported: LlamaForCausalLM")


def _edit_adapter(adapter: Path, dst: Path, edit) -> Path:
    from safetensors.numpy import load_file

    bad = _copy(adapter, dst)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    edit(tensors)
    write_safetensors(bad / "adapter_model.safetensors", tensors)
    return bad


def test_rank_mismatch(lora_models, tmp_path):
    _, models = lora_models
    base, adapter, _, _ = models["llama"]
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    bad = _edit_adapter(adapter, tmp_path / "a", lambda t: t.__setitem__(name, t[name][:, :4].copy()))
    _refused(bad, base, tmp_path / "o.gguf", r"layers\.1\.self_attn\.v_proj.*one rank")


def test_lora_b_missing(lora_models, tmp_path):
    _, models = lora_models
    base, adapter, _, _ = models["llama"]
    name = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    bad = _edit_adapter(adapter, tmp_path / "a", lambda t: t.pop(name))
    _refused(bad, base, tmp_path / "o.gguf", r"layers\.0\.self_attn\.o_proj.*has lora_A but no lora_B")


def test_shape_disagrees_with_base(lora_models, tmp_path):
    _, models = lora_models
    base, adapter, _, _ = models["llama"]
    name = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    bad = _edit_adapter(adapter, tmp_path / "a", lambda t: t.__setitem__(name, t[name][:96].copy()))
    for b in (base, _config_only(base, tmp_path / "cfg")):  # from the base's weights, or from its config.json
        _refused(bad, b, tmp_path / "o.gguf", r"layers\.0\.mlp\.up_proj.*\[96, 64\].*\[128, 64\]")


def _config_only(base: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(base / "config.json", dst / "config.json")
    return dst


def test_lora_of_a_tied_lm_head(lora_models, tmp_path):
    _, models = lora_models
    base, adapter, _, _ = models["qwen2"]  # tie_word_embeddings: no lm_head of its own

    def add_head(t):
        n_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        t["base_model.model.lm_head.lora_A.weight"] = np.ones((8, 64), np.float32)
        t["base_model.model.lm_head.lora_B.weight"] = np.ones((n_vocab, 8), np.float32)

    bad = _edit_adapter(adapter, tmp_path / "a", add_head)
    _refused(bad, base, tmp_path / "o.gguf", r"lm_head.*tie_word_embeddings")


def test_output_is_an_input(lora_models, tmp_path):
    _, models = lora_models
    base, adapter, _, _ = models["llama"]
    a = _copy(adapter, tmp_path / "a")
    weights = a / "adapter_model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(ConversionError, match="adapter_model.safetensors"):
        gguf_kquant.convert_lora(a, weights, base=base, overwrite=True)
    assert weights.read_bytes() == before


def test_cli(lora_models, tmp_path):
    from gguf_kquant.cli import main

    root, models = lora_models
    base, adapter, _, _ = models["qwen2"]
    dst = tmp_path / "cli.gguf"
    assert main(["convert-lora", str(adapter), str(dst), "--base", str(base), "--outtype", "q8_0", "-q"]) == 0
    ours = tmp_path / "lib.gguf"
    gguf_kquant.convert_lora(adapter, ours, base=base, outtype="Q8_0")
    assert dst.read_bytes() == ours.read_bytes()
