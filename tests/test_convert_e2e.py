"""End to end: tiny random transformers models -> convert_hf -> llama.cpp loads them and computes what
transformers computes (logits, BERT embeddings), and tokenizes like the Hugging Face tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

import gguf_kquant
from oracle import lib_dir
from test_convert_helpers import SAMPLES, gguf_logits, hf_logits, hf_tokenizer, llama_cpp_model, make_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    lib_dir()  # the oracle must be installed: fail, never skip
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(arch):
        if arch not in cache:
            d = root / arch
            cache[arch] = (d, make_model(arch, d, seed=len(cache)))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(models, tmp_path, arch):
    d, model = models(arch)
    tok = hf_tokenizer(d)
    ids = tok.encode("Hello world, 12345 Ünïcödé 🦙 and more text").ids[:24]
    for ftype, f16w, tol in (("F32", False, 2e-3), ("F16", True, 1e-2)):
        out = tmp_path / f"{arch}-{ftype}.gguf"
        gguf_kquant.convert_hf(d, out, ftype)
        ours = gguf_logits(out, ids)
        ref = hf_logits(model, ids, f16w)
        scale = np.abs(ref).max()
        err = np.abs(ours - ref).max() / scale
        assert err < tol, f"{arch} {ftype}: max relative logit error {err:.2e}"
    out = tmp_path / f"{arch}-Q8_0.gguf"
    gguf_kquant.convert_hf(d, out, "Q8_0")
    ours = gguf_logits(out, ids)
    ref = hf_logits(model, ids)
    agree = np.mean(ours.argmax(-1) == ref.argmax(-1))
    assert agree >= 0.9, f"{arch} Q8_0: top-1 agreement {agree:.2f}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tokenizer_matches_hf(models, tmp_path, arch):
    d, _ = models(arch)
    out = tmp_path / f"{arch}.gguf"
    gguf_kquant.convert_hf(d, out, "F16")
    llm = llama_cpp_model(out, vocab_only=True)
    tok = hf_tokenizer(d)
    specials = [a.content for a in tok.get_added_tokens_decoder().values()]
    texts = SAMPLES + [f"{specials[-1]}text with a special token{specials[0]} in it"]
    for text in texts:
        want = tok.encode(text).ids
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == want, f"{arch}: {text!r}: llama.cpp {got} != HF {want}"
    llm.close()


def test_bert_embeddings_match_transformers(models, tmp_path):
    import torch

    d, model = models("bert")
    tok = hf_tokenizer(d)
    for ftype, tol in (("F32", 1e-3), ("F16", 2e-2)):
        out = tmp_path / f"bert-{ftype}.gguf"
        gguf_kquant.convert_hf(d, out, ftype)
        llm = llama_cpp_model(out, embedding=True)
        for text in SAMPLES[:5]:
            ids = tok.encode(text).ids
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == ids, text
            got = np.array(llm.embed(text, normalize=False), dtype=np.float32)
            with torch.no_grad():
                ref = model(torch.tensor([ids])).last_hidden_state[0].numpy()
            assert got.shape == ref.shape
            err = np.abs(got - ref).max() / np.abs(ref).max()
            assert err < tol, f"bert {ftype} {text!r}: relative error {err:.2e}"
        llm.close()
