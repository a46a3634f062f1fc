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


SPM_USER = ["<|user|>", "gguf"]  # sentencepiece user-defined symbols: always one piece
SPM_CONTROL = ["<ctrl>"]  # control symbols: never made from text


def train_spm(out_dir: Path, *, model_type: str = "bpe", gemma: bool = False, vocab_size: int = 420,
              past_pieces: bool = True) -> int:
    """A SentencePiece tokenizer.model (Llama-2's settings: byte fallback, split digits, no normalization,
    whitespace kept; Gemma's special tokens and no dummy prefix with ``gemma``) and a tokenizer_config.json.
    With ``past_pieces``, added_tokens_decoder and added_tokens.json also name ids past the model's pieces and
    one id is named nowhere.  Returns the vocab_size config.json needs.
    """
    import io

    import sentencepiece as spm

    if gemma:
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>")
    else:
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=0.98,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=not gemma,
        allow_whitespace_only_pieces=True, user_defined_symbols=SPM_USER, control_symbols=SPM_CONTROL,
        num_threads=1, minloglevel=2, **ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    n = sp.vocab_size()

    def entry(content, special):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": special}

    added = {str(i): entry(sp.IdToPiece(i), sp.IsControl(i) or sp.IsUnknown(i))
             for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i) or sp.IdToPiece(i) in SPM_USER}
    if past_pieces:  # a user-defined token with a "\u2581" (written as a space) and one that only looks special
        added[str(n)] = entry("<sp\u2581ace>", False)
        added[str(n + 2)] = entry("<|im_end|>", False)
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "bos_token": sp.IdToPiece(sp.bos_id()), "eos_token": sp.IdToPiece(sp.eos_id()),
           "unk_token": sp.IdToPiece(sp.unk_id()), "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": added, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    if gemma:
        cfg["pad_token"] = sp.IdToPiece(sp.pad_id())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    if not past_pieces:
        return n
    (out_dir / "added_tokens.json").write_text(json.dumps({"<extra_0>": n + 1}))
    return n + 4  # id n + 3 is named nowhere: a [PAD] token


def spm_to_tokenizer_json(model_dir: Path, keep_model: bool = False) -> None:
    """Add the byte-fallback BPE tokenizer.json transformers converts tokenizer.model to (Llama-2 and Mistral
    repos ship both) and, unless ``keep_model``, remove tokenizer.model (what some repos ship)."""
    import transformers as tf

    tf.LlamaTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(model_dir))
    if not keep_model:
        (model_dir / "tokenizer.model").unlink()


def hf_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _save(model, out_dir: Path, dtype, shard=None) -> None:
    import torch

    model = model.to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out_dir), safe_serialization=True, **kw)


def make_model(arch: str, out_dir: Path, *, dtype: str = "float32", seed: int = 0, vocab_size: int | None = None,
               hidden_size: int = 64, shard_size: str | None = None, tokenizer: str = "bpe"):
    """Build a tiny random checkpoint of ``arch`` in ``out_dir`` (config, safetensors, tokenizer).

    ``tokenizer``: ``bpe`` (byte-level BPE or, for bert, WordPiece tokenizer.json); ``spm`` / ``spm-unigram``
    (a SentencePiece tokenizer.model, see train_spm); ``spm-bare`` (tokenizer.model alone, no
    tokenizer_config.json); ``spm+json`` (tokenizer.model and the tokenizer.json transformers makes of it);
    ``llama-hf`` (that tokenizer.json alone).
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    ids = {"gemma3": dict(bos_token_id=2, eos_token_id=1), "gemma3mm": dict(bos_token_id=2, eos_token_id=1),
           "gemma2": dict(bos_token_id=2, eos_token_id=1), "qwen2": dict(bos_token_id=0, eos_token_id=2),
           "qwen3": dict(bos_token_id=0, eos_token_id=2), "qwen2moe": dict(bos_token_id=0, eos_token_id=2),
           "qwen3moe": dict(bos_token_id=0, eos_token_id=2)}.get(arch, dict(bos_token_id=0, eos_token_id=1))
    if tokenizer != "bpe":
        # convert_hf_to_gguf.py's llama_hf vocabulary is as long as the tokenizer, not config.json's vocab_size:
        # with ids past the pieces llama.cpp could not load its own conversion
        n_spm = train_spm(out_dir, model_type="unigram" if tokenizer == "spm-unigram" else "bpe",
                          gemma=arch in ("gemma3", "gemma2"), past_pieces=tokenizer != "llama-hf")
        vocab_size = vocab_size or n_spm
        if arch not in ("gemma3", "gemma2"):
            ids = dict(bos_token_id=1, eos_token_id=2)
        if arch == "phi3":  # llama.cpp's Phi-3 vocabulary fix-ups need <|endoftext|> (real Phi-3 has it)
            cfg_path = out_dir / "tokenizer_config.json"
            tcfg = json.loads(cfg_path.read_text())
            tcfg["added_tokens_decoder"][str(n_spm - 1)] = {"content": "<|endoftext|>", "lstrip": False,
                                                            "normalized": False, "rstrip": True,
                                                            "single_word": False, "special": True}
            cfg_path.write_text(json.dumps(tcfg, indent=2))
        if tokenizer in ("llama-hf", "spm+json"):
            spm_to_tokenizer_json(out_dir, keep_model=tokenizer == "spm+json")
        elif tokenizer == "spm-bare":
            (out_dir / "tokenizer_config.json").unlink()
            (out_dir / "added_tokens.json").unlink()
    elif arch in ("llama", "mistral", "mixtral", "granite", "olmo2", "smollm3"):
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        train_bpe(out_dir, regex=LLAMA3_RE, specials=specials, bos=specials[0], eos=specials[1],
                  chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    elif arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        train_bpe(out_dir, regex=QWEN2_RE, specials=specials, bos=None, eos="<|im_end|>", add_bos=False)
    elif arch in ("gemma3", "gemma3mm"):
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
        cfg = tf.LlamaConfig(num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, **ids, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **ids, **common)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **ids, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, **ids, **common)
        model = tf.Qwen3ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                                  sliding_window=512, pad_token_id=0, **ids, **common)
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "mixtral":  # 4 experts, 2 per token
        cfg = tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **ids, **common)
        model = tf.MixtralForCausalLM(cfg)
    elif arch == "qwen2moe":  # 4 routed experts and a shared one behind a sigmoid gate
        cfg = tf.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=hidden_size, shared_expert_intermediate_size=3 * hidden_size,
                                tie_word_embeddings=False, **ids, **common)
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif arch == "qwen3moe":
        cfg = tf.Qwen3MoeConfig(num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=hidden_size, norm_topk_prob=True, tie_word_embeddings=False,
                                **ids, **common)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, original_max_position_embeddings=128, **ids,
                            **common)
        model = tf.Phi3ForCausalLM(cfg)
    elif arch == "gemma2":  # a 16-token window on alternate layers: a 24-token prompt crosses it
        cfg = tf.Gemma2Config(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                              pad_token_id=0, **ids, **common)
        model = tf.Gemma2ForCausalLM(cfg)
    elif arch == "granite":  # multipliers away from 1 so that a lost one shows in the logits
        cfg = tf.GraniteConfig(num_key_value_heads=2, embedding_multiplier=2.0, residual_multiplier=0.5,
                               attention_multiplier=0.2, logits_scaling=3.0, **ids, **common)
        model = tf.GraniteForCausalLM(cfg)
    elif arch == "olmo2":
        cfg = tf.Olmo2Config(num_key_value_heads=2, pad_token_id=None, **ids, **common)
        model = tf.Olmo2ForCausalLM(cfg)
    elif arch == "smollm3":  # 4 layers: the 4th has no RoPE
        cfg = tf.SmolLM3Config(num_key_value_heads=2, pad_token_id=None, **ids, **{**common, "num_hidden_layers": 4})
        model = tf.SmolLM3ForCausalLM(cfg)
    elif arch == "gemma3mm":  # Gemma3ForConditionalGeneration: a gemma3 text model and a tiny vision tower
        text = tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=512,
                                   pad_token_id=0, **ids, **common)
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        cfg = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                              **ids)
        model = tf.Gemma3ForConditionalGeneration(cfg)
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
    converter chose) is injected in place of the hash lookup (it only matters to the GPT-2 BPE path).
    """
    vendor_convert_jobs([(model_dir, outfile, outtype, pre)])


def vendor_convert_many(jobs, outtype: str = "f16", pre: str | None = None) -> None:
    """vendor_convert for each (model_dir, outfile) of ``jobs``, in one process (torch is imported once)."""
    vendor_convert_jobs([(d, o, outtype, pre) for d, o in jobs])


def vendor_convert_jobs(jobs) -> None:
    """convert_hf_to_gguf.py on each (model_dir, outfile, outtype, pre, *flags) of ``jobs`` in one process
    (torch imported once); ``pre`` None: the script's own hash lookup."""
    from oracle import vendor_llama_cpp

    src = vendor_llama_cpp()
    assert src is not None, "GGUF_KQUANT_LLAMA_CPP_SRC is not set: .ci/run unpacks llama.cpp's source there"
    driver = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(src)!r}); sys.path.insert(1, {str(src / 'gguf-py')!r})\n"
        "import conversion.base as b\n"
        "own_pre = b.TextModel.get_vocab_base_pre\n"
        f"main = runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='convert_hf_to_gguf')['main']\n"
        f"for d, o, t, pre, *flags in {[(str(j[0]), str(j[1]), *j[2:]) for j in jobs]!r}:\n"
        "    b.TextModel.get_vocab_base_pre = own_pre if pre is None else (lambda self, tokenizer, pre=pre: pre)\n"
        "    sys.argv = ['convert_hf_to_gguf.py', d, '--outfile', o, '--outtype', t, *flags]\n"
        "    main()\n"
    )
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    r = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=str(src))
    assert r.returncode == 0, r.stderr[-4000:]


def assert_converts_in_slabs(model_dir, out, ftype: str = "F16") -> None:
    """convert_hf's Python-side peak (tracemalloc) stays under three slabs: experts and fused tensors are
    read, stacked or transposed slab by slab, never a whole layer (a whole-tensor transform fails this)."""
    import tracemalloc

    import gguf_kquant
    from gguf_kquant.model.quantize import SLAB_BYTES

    tracemalloc.start()
    try:
        gguf_kquant.convert_hf(model_dir, out, ftype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * SLAB_BYTES, f"peak {peak / 2**20:.1f} MiB"


def llama_quantize(src, dst, ftype_id: int, nthread: int = 1) -> None:
    """llama-quantize (libllama's llama_model_quantize) of ``src`` to ``dst``; ``ftype_id`` a llama_ftype
    (15: Q4_K_M, 18: Q6_K, 38: MXFP4_MOE)."""
    import ctypes

    from oracle import lib_dir

    lib_dir()  # the oracle must be installed: fail, never skip
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype_id, nthread
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def assert_logits_match(ours: np.ndarray, ref: np.ndarray, what: str, min_cos: float = 0.999,
                        top1: bool = True) -> None:
    """llama.cpp's logits ``ours`` against transformers' ``ref`` (tokens x vocab): the same top-1 token at
    every position and cosine >= ``min_cos``."""
    cos = np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    if top1:
        assert (ours.argmax(-1) == ref.argmax(-1)).all(), f"{what}: top-1 differs"
    assert cos.min() >= min_cos, f"{what}: cosine {cos.min():.5f}"


def llama_cpp_model(path, **kw):
    """llama.cpp (through llama-cpp-python) on a GGUF file: one thread, a small context."""
    import llama_cpp
    import llama_cpp.llama as _L

    # llama.cpp's CPU "extra buffer types" (repack/AMX) crash on tiny Q8_0 models on this CPU (AMX_INT8):
    # the files are byte-identical to convert_hf_to_gguf.py's, so load them with plain CPU buffers.
    if not getattr(_L.llama_cpp, "_gguf_kquant_patched", False):
        orig = _L.llama_cpp.llama_model_default_params

        def params():
            p = orig()
            p.use_extra_bufts = False
            return p

        _L.llama_cpp.llama_model_default_params = params
        _L.llama_cpp._gguf_kquant_patched = True
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, n_batch=64, verbose=False, seed=0, **kw)


def hf_logits(model, ids, f16_weights=False):
    """transformers' logits of ``ids`` (float32 numpy, one row per position)."""
    import torch

    if f16_weights:  # what the F16 file holds: weights rounded to half, compute in float32
        import copy

        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.copy_(p.half().float())
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(path, ids):
    """llama.cpp's logits of ``ids``, one row per position."""
    llm = llama_cpp_model(path, logits_all=True)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


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


def assert_same_gguf(ours, theirs) -> dict:
    """The same keys, types, values, tensors and bytes, in the same order; returns our typed metadata."""
    assert diff_gguf(ours, theirs) == []
    (m1, t1), (m2, t2) = gguf_summary(ours), gguf_summary(theirs)
    assert list(m1) == list(m2)
    assert [t[0] for t in t1] == [t[0] for t in t2]
    return m1
