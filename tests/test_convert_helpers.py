"""Tiny Hugging Face checkpoints for the conversion tests (no hub access), and the two oracles' drivers.

Models are random transformers models on the CPU; tokenizers are trained here with the ``tokenizers``
library on a small corpus.  This module holds no tests itself (besides a sanity check of the corpus).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Numbers 12345 and 3.14159 appear 2024 times.",
    "Héllo wörld! Ünïcödé tëxt — with dashes, “quotes” and emoji 🦙🚀 in it.",
    "def main():\n    return 42  # code with    spaces\n\tand tabs\n\n",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "I've been told he's there, you'll see it's fine; we'd like some tea?",
    "llama model quantize weight tensor file gguf convert safetensors tokenizer vocabulary",
] * 20

SAMPLES = [
    "Hello world",
    "  leading spaces and   runs of     whitespace\n\n\ttabs",
    "digits 1 12 123 1234 12345 3.14",
    "Ünïcödé wörds, 日本語 and 🦙 emoji",
    "I've been told he's there",
    "",
]


def train_bpe(out_dir: Path, *, regex: str, specials: list[str], vocab_size: int = 400,
              bos: str | None = None, eos: str | None = None, add_bos: bool = True,
              chat_template: str | None = None) -> None:
    """A byte-level BPE tokenizer (llama-3 / qwen2 style) saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None and add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, "clean_up_tokenization_spaces": False}
    if bos:
        cfg["bos_token"] = bos
    if eos:
        cfg["eos_token"] = eos
    if chat_template:
        cfg["chat_template"] = chat_template
    added = {}
    for s in specials:
        added[str(tok.token_to_id(s))] = {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
    cfg["added_tokens_decoder"] = added
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def train_wordpiece(out_dir: Path, vocab_size: int = 400) -> None:
    """A BERT WordPiece tokenizer ([CLS] ... [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
           "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
           "mask_token": "[MASK]", "clean_up_tokenization_spaces": True,
           "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                                               "rstrip": False, "single_word": False, "special": True}
                                    for s in specials}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def hf_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _save(model, out_dir: Path, dtype, shard=None) -> None:
    import torch

    model = model.to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out_dir), safe_serialization=True, **kw)


def make_model(arch: str, out_dir: Path, *, dtype: str = "float32", seed: int = 0, vocab_size: int | None = None,
               hidden_size: int = 64, shard_size: str | None = None):
    """Build a tiny random checkpoint of ``arch`` in ``out_dir`` (config, safetensors, tokenizer)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    if arch in ("llama", "mistral"):
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        train_bpe(out_dir, regex=LLAMA3_RE, specials=specials, bos=specials[0], eos=specials[1],
                  chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    elif arch in ("qwen2", "qwen3"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        train_bpe(out_dir, regex=QWEN2_RE, specials=specials, bos=None, eos="<|im_end|>", add_bos=False)
    elif arch == "gemma3":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        train_bpe(out_dir, regex=LLAMA3_RE, specials=specials, bos="<bos>", eos="<eos>")
    elif arch == "bert":
        train_wordpiece(out_dir)
    else:
        raise ValueError(arch)
    n_vocab = vocab_size or json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"].__len__()
    n_vocab = vocab_size or max(n_vocab, 300)
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=n_vocab, max_position_embeddings=256)
    if arch == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             bos_token_id=0, eos_token_id=1, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=None, bos_token_id=0, eos_token_id=1, **common)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2,
                             **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, bos_token_id=0,
                             eos_token_id=2, **common)
        model = tf.Qwen3ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                                  sliding_window=512, bos_token_id=2, eos_token_id=1, pad_token_id=0, **common)
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(type_vocab_size=2, pad_token_id=0, **common)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(arch)
    # random norms so that a forgotten "+1" or permutation shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.02)
    model.eval()
    _save(model, out_dir, getattr(__import__("torch"), dtype), shard_size)
    return model


def vendor_convert(model_dir: Path, outfile: Path, outtype: str = "f16", pre: str | None = None) -> None:
    """Run llama.cpp's own convert_hf_to_gguf.py (with its bundled gguf-py) on ``model_dir``.

    Tiny tokenizers trained here have no entry in its pre-tokenizer hash table, so ``pre`` (the name our
    converter chose) is injected in place of the hash lookup.
    """
    from oracle import vendor_llama_cpp

    src = vendor_llama_cpp()
    assert src is not None, "GGUF_KQUANT_LLAMA_CPP_SRC is not set: .ci/run unpacks llama.cpp's source there"
    driver = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(src)!r}); sys.path.insert(1, {str(src / 'gguf-py')!r})\n"
        "import conversion.base as b\n"
        f"PRE = {pre!r}\n"
        "if PRE is not None:\n"
        "    b.TextModel.get_vocab_base_pre = lambda self, tokenizer: PRE\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(model_dir)!r}, '--outfile', {str(outfile)!r}, '--outtype', {outtype!r}]\n"
        f"runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    r = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=str(src))
    assert r.returncode == 0, r.stderr[-4000:]


def test_corpus_has_hard_cases():
    text = "".join(SAMPLES)
    assert any(ord(c) > 0xFFFF for c in text) and "   " in text and "12345" in text


def gguf_summary(path):
    """(typed metadata {key: (type, element type, value)}, [(name, shape, type, bytes)]) of a GGUF file."""
    import gguf_kquant
    from gguf_kquant.container.values import typed_items

    with gguf_kquant.open(path) as f:
        meta = {}
        for k, v in typed_items(f.metadata):
            val = v.value
            if isinstance(val, np.ndarray):
                val = val.tolist()
            elif isinstance(val, (list, tuple)):
                val = [x.tolist() if isinstance(x, np.ndarray) else x for x in val]
            meta[k] = (int(v.type), None if v.element_type is None else int(v.element_type), val)
        tensors = [(t.name, tuple(t.shape), int(t.ggml_type), bytes(t.raw())) for t in f.tensors]
    return meta, tensors


def diff_gguf(ours, theirs, ignore_keys=()):
    """Human-readable differences between two GGUF files (empty list: identical content)."""
    m1, t1 = gguf_summary(ours)
    m2, t2 = gguf_summary(theirs)
    out = []
    for k in sorted(set(m1) | set(m2)):
        if k in ignore_keys:
            continue
        if k not in m1:
            out.append(f"missing key {k} = {str(m2[k])[:80]}")
        elif k not in m2:
            out.append(f"extra key {k} = {str(m1[k])[:80]}")
        elif m1[k] != m2[k]:
            out.append(f"key {k}: ours {str(m1[k])[:80]} theirs {str(m2[k])[:80]}")
    d1 = {t[0]: t for t in t1}
    d2 = {t[0]: t for t in t2}
    for n in sorted(set(d1) | set(d2)):
        if n not in d1 or n not in d2:
            out.append(f"tensor {n} only in {'ours' if n in d1 else 'theirs'}")
        elif d1[n][1:3] != d2[n][1:3]:
            out.append(f"tensor {n}: ours {d1[n][1:3]} theirs {d2[n][1:3]}")
        elif d1[n][3] != d2[n][3]:
            out.append(f"tensor {n}: bytes differ")
    if [t[0] for t in t1] != [t[0] for t in t2] and not out:
        out.append("tensor order differs")
    return out
