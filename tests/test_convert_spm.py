"""SentencePiece vocabularies (Llama-2, Mistral-7B, Gemma-3, CodeLlama style): a tokenizer.model trained here,
or the byte-fallback BPE tokenizer.json transformers makes of it.  Our conversion equals llama.cpp's
convert_hf_to_gguf.py; llama.cpp then tokenizes like sentencepiece and computes what transformers computes."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

import gguf
import gguf_kquant
from gguf_kquant.errors import ConversionError
from oracle import lib_dir
from test_convert_helpers import (SAMPLES, assert_same_gguf, gguf_logits, gguf_summary, hf_logits, llama_cpp_model,
                                  make_model, vendor_convert_many)

# name -> (HF architecture family, make_model's tokenizer, config.json vocab_size or None for the tokenizer's)
CASES = {
    "llama-spm": ("llama", "spm", None),
    "llama-unigram": ("llama", "spm-unigram", None),
    "llama-bare": ("llama", "spm-bare", None),  # the types sentencepiece gives, special ids from config.json
    "mistral-spm": ("mistral", "spm", None),
    "mistral-both": ("mistral", "spm+json", None),  # tokenizer.model wins; tokenizer.json's post-processor counts
    "gemma3-spm": ("gemma3", "spm", None),
    "qwen2-spm": ("qwen2", "spm", None),  # convert_hf_to_gguf.py's Qwen2Model reads tokenizer.model too
    "llama-hf": ("llama", "llama-hf", None),
    "codellama": ("llama", "spm", 32016),  # llama.cpp's rule for CodeLlama's infill token ids
    "granite-small": ("llama", "bpe", 49152),  # ... and add_bos_token = false for granite's vocab size
}
T = gguf.TokenType


def _config_vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each case: checkpoint dir, transformers model; converted to F16 by us and by convert_hf_to_gguf.py
    (all in one process: importing torch there is most of the time)."""
    lib_dir()  # the oracle must be installed: fail, never skip
    root = tmp_path_factory.mktemp("spm")
    models, jobs = {}, []
    for seed, (name, (arch, tok, n_vocab)) in enumerate(CASES.items()):
        d = root / name
        models[name] = make_model(arch, d, seed=20 + seed, tokenizer=tok, vocab_size=n_vocab)
        gguf_kquant.convert_hf(d, root / f"{name}.ours.gguf", "F16")
        jobs.append((d, root / f"{name}.theirs.gguf"))
    vendor_convert_many(jobs, pre="llama-bpe")  # pre: only the granite case is GPT-2 BPE
    return root, models


@pytest.mark.parametrize("name", CASES)
def test_f16_matches_convert_hf_to_gguf(converted, name):
    root, _ = converted
    meta = assert_same_gguf(root / f"{name}.ours.gguf", root / f"{name}.theirs.gguf")
    if name == "granite-small":
        assert meta["tokenizer.ggml.model"][2] == "gpt2" and meta["tokenizer.ggml.add_bos_token"][2] is False
        return
    assert meta["tokenizer.ggml.model"][2] == "llama" and meta["tokenizer.ggml.pre"][2] == "default"
    types = meta["tokenizer.ggml.token_type"][2]
    assert len(types) == _config_vocab(root / name)
    if name == "llama-hf":  # gguf-py's LlamaHfVocab: scores are placeholders, no pieces past the tokenizer's
        assert {T.NORMAL, T.CONTROL, T.BYTE} == set(types) and set(meta["tokenizer.ggml.scores"][2]) == {-1000.0}
        return
    if name == "llama-bare":  # sentencepiece's own types (user-defined pieces are NORMAL); ids from config.json
        assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL] and {T.NORMAL, T.BYTE, T.UNUSED} <= set(types)
        assert T.USER_DEFINED not in types and meta["tokenizer.ggml.bos_token_id"][2] == 1
        return
    assert {T.NORMAL, T.CONTROL, T.USER_DEFINED, T.BYTE, T.UNUSED} <= set(types)
    assert len(set(meta["tokenizer.ggml.scores"][2])) > 50  # sentencepiece's scores (also for mistral-both)
    assert meta["tokenizer.ggml.tokens"][2][-1] == f"[PAD{len(types) - 1}]"  # an id no tokenizer file names


def test_gemma3_keeps_every_embedding_row_and_no_space_prefix(converted):
    # with tokenizer.model the vocabulary is config.json's vocab_size long, so no token_embd row is dropped
    root, _ = converted
    meta, tensors = gguf_summary(root / "gemma3-spm.ours.gguf")
    embd = next(t for t in tensors if t[0] == "token_embd.weight")
    assert embd[1][0] == _config_vocab(root / "gemma3-spm") == len(meta["tokenizer.ggml.tokens"][2])
    assert meta["tokenizer.ggml.add_space_prefix"][2] is False


def test_codellama_infill_tokens(converted):
    # gguf-py's writer has no add_prefix/suffix/middle_token_id (renamed add_fim_*) any more, so of CodeLlama's
    # four infill ids convert_hf_to_gguf.py only writes eot; the F16 comparison checks that we do the same
    meta, _ = gguf_summary(converted[0] / "codellama.ours.gguf")
    assert meta["tokenizer.ggml.eot_token_id"][2] == 32010


@pytest.mark.parametrize("name", ["llama-spm", "mistral-spm", "gemma3-spm"])
def test_llama_cpp_tokenizes_like_sentencepiece(converted, name):
    from sentencepiece import SentencePieceProcessor

    root, _ = converted
    sp = SentencePieceProcessor(model_file=str(root / name / "tokenizer.model"))
    llm = llama_cpp_model(root / f"{name}.ours.gguf", vocab_only=True)
    pieces = set()
    # (not user-defined pieces inside a text: llama.cpp puts a space prefix after each, sentencepiece does not)
    for text in SAMPLES:
        want = [sp.bos_id()] + sp.encode(text)
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert got == want, f"{name}: {text!r}: llama.cpp {got} != sentencepiece {want}"
        pieces.update(sp.IdToPiece(i) for i in want)
    llm.close()
    assert "<0xF0>" in pieces  # byte fallback was exercised


def test_llama_cpp_loads_the_byte_fallback_tokenizer_json_conversion(converted):
    # llama.cpp's scores for this vocabulary are placeholders, so its ids need not be the HF tokenizer's;
    # what must hold: the model loads (as many tokens as embedding rows) and text survives a round trip
    root, _ = converted
    llm = llama_cpp_model(root / "llama-hf.ours.gguf")
    assert llm.n_vocab() == _config_vocab(root / "llama-hf")
    for text in SAMPLES[:-1]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert llm.detokenize(ids) == b" " + text.encode("utf-8"), text  # plus llama.cpp's space prefix
    llm.close()


def test_logits_match_transformers(converted, tmp_path):
    from sentencepiece import SentencePieceProcessor

    root, models = converted
    sp = SentencePieceProcessor(model_file=str(root / "llama-spm" / "tokenizer.model"))
    ids = [sp.bos_id()] + sp.encode("Hello world, 12345 Ünïcödé 🦙 and more text")[:23]
    out = tmp_path / "llama-spm-f32.gguf"
    gguf_kquant.convert_hf(root / "llama-spm", out, "F32")
    ours, ref = gguf_logits(out, ids), hf_logits(models["llama-spm"], ids)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 2e-3, f"max relative logit error {err:.2e}"


def test_missing_packages_are_named(converted, tmp_path, monkeypatch):
    root, _ = converted
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
    with pytest.raises(ConversionError, match=r"'sentencepiece' package: pip install 'gguf-kquant\[convert\]'"):
        gguf_kquant.convert_hf(root / "llama-spm", tmp_path / "o.gguf")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConversionError, match="needs transformers' AutoTokenizer"):
        gguf_kquant.convert_hf(root / "llama-hf", tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_llama_tokenizers_converted_otherwise_by_llama_cpp_are_refused(converted, tmp_path):
    d = shutil.copytree(converted[0] / "llama-spm", tmp_path / "m")
    (d / "tekken.json").write_text("{}")  # convert_hf_to_gguf.py's Mistral tokenizer path
    with pytest.raises(ConversionError, match="tekken"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")
    (d / "tekken.json").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "HybridDNATokenizer"}))
    with pytest.raises(ConversionError, match="HybridDNATokenizer"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
