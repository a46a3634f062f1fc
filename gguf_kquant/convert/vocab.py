"""Tokenizers: read the checkpoint's tokenizer files and write llama.cpp's ``tokenizer.*`` keys.

Three vocabularies, as convert_hf_to_gguf.py writes them:

* ``gpt2`` (byte-level BPE) and ``bert`` (WordPiece): tokens and types rebuilt from ``tokenizer.json``
  directly (no transformers needed).  The pre-tokenizer name is looked up by llama.cpp's hash of the token
  ids of a check text (needs the ``tokenizers`` package, extra ``convert``); when the hash is unknown (e.g. a
  newly trained tokenizer) it is inferred from the pre-tokenizer's split regex.
* ``llama`` (SentencePiece): pieces, scores and types from ``tokenizer.model`` (the ``sentencepiece``
  package, extra ``convert``), overridden by ``added_tokens.json`` and tokenizer_config.json's
  ``added_tokens_decoder``.
* ``llama`` from a byte-fallback BPE ``tokenizer.json`` without ``tokenizer.model`` (Llama-2 style fast
  tokenizer): gguf-py's :class:`gguf.LlamaHfVocab`, which asks transformers' AutoTokenizer.

Merges, special token ids, add_bos/add_eos and the chat template come from gguf-py's
:class:`gguf.SpecialVocab` (brought up to date below), the same code convert_hf_to_gguf.py uses.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path

import gguf

from ..errors import ConversionError
from .pretok_hashes import CHKTXT, HASHES
from .base import MAX_VOCAB
from .safetensors import MAX_JSON_BYTES, _json_kind, read_file, read_json as _read_json

# The split regex of a tokenizer.json pre_tokenizer -> the llama.cpp pre-tokenizer that implements it.
KNOWN_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def _split_regexes(pre) -> list:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers") or [] for r in _split_regexes(p)]
    if pre.get("type") == "Split":
        pat = pre.get("pattern") or {}
        return [pat.get("Regex") or pat.get("String")]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return ["<gpt2>"]
    return []


def read_json(path: Path, expect=dict):
    """A tokenizer or config JSON file, with the parts the converters read type-checked (ConversionError
    naming the file and key), so that the code using them needs no guard at every access."""
    value = _read_json(path, expect)
    check = _TOKENIZER_FILE_CHECKS.get(Path(path).name)
    if check is not None:
        check(Path(path), value)
    return value


def _want(path: Path, key: str, value, types, what: str, optional: bool = True) -> None:
    if (value is None and optional) or (isinstance(value, types) and not (isinstance(value, bool)
                                                                          and bool not in _as_tuple(types))):
        return
    raise ConversionError(f"{path}: key {key!r} must be {what}, not a JSON {_json_kind(value)}")


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _check_token_id(path: Path, key: str, i) -> None:
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < MAX_TOKEN_ID:
        raise ConversionError(f"{path}: key {key!r} must be a token id in 0..{MAX_TOKEN_ID - 1}, not {i!r:.40}")


def _check_pre_tokenizer(path: Path, pre, key: str, depth: int = 0) -> None:
    _want(path, key, pre, dict, "an object")
    if pre is None:
        return
    if depth > 8:
        raise ConversionError(f"{path}: key {key!r} nests Sequence pre-tokenizers more than 8 deep")
    _want(path, f"{key}.type", pre.get("type"), str, "a string")
    if pre.get("type") == "Sequence":
        subs = pre.get("pretokenizers") or []
        _want(path, f"{key}.pretokenizers", subs, list, "a list", optional=False)
        for j, sub in enumerate(subs):
            _check_pre_tokenizer(path, sub, f"{key}.pretokenizers[{j}]", depth + 1)
    if pre.get("type") == "Split":
        pat = pre.get("pattern") or {}
        _want(path, f"{key}.pattern", pat, dict, "an object", optional=False)
        for k in ("Regex", "String"):
            _want(path, f"{key}.pattern.{k}", pat.get(k), str, "a string")


def _check_tokenizer_json(path: Path, tj: dict) -> None:
    model = tj.get("model")
    _want(path, "model", model, dict, "an object")
    model = model or {}
    _want(path, "model.type", model.get("type"), str, "a string")
    _want(path, "model.byte_fallback", model.get("byte_fallback"), bool, "true or false")
    vocab = model.get("vocab")
    if model.get("type") in ("BPE", "WordPiece"):
        _want(path, "model.vocab", vocab, dict, "an object of token -> id")
        for tok, i in (vocab or {}).items():
            _check_token_id(path, f"model.vocab[{tok!r}]", i)
    merges = model.get("merges")
    _want(path, "model.merges", merges, list, "a list")
    for j, m in enumerate(merges or ()):
        if not (isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))):
            raise ConversionError(f"{path}: key 'model.merges[{j}]' must be a string or a pair of strings")
    added = tj.get("added_tokens")
    _want(path, "added_tokens", added, list, "a list")
    for j, a in enumerate(added or ()):
        _want(path, f"added_tokens[{j}]", a, dict, "an object", optional=False)
        _want(path, f"added_tokens[{j}].content", a.get("content"), str, "a string", optional=False)
        _check_token_id(path, f"added_tokens[{j}].id", a.get("id"))
        _want(path, f"added_tokens[{j}].special", a.get("special"), bool, "true or false")
    _check_pre_tokenizer(path, tj.get("pre_tokenizer"), "pre_tokenizer")
    for key in ("normalizer", "post_processor", "decoder"):
        _check_components(path, tj.get(key), key)


def _check_components(path: Path, comp, key: str, depth: int = 0) -> None:
    """normalizer / post_processor / decoder: objects, possibly a Sequence of them."""
    _want(path, key, comp, dict, "an object")
    if comp is None:
        return
    if depth > 8:
        raise ConversionError(f"{path}: key {key!r} nests sequences more than 8 deep")
    _want(path, f"{key}.type", comp.get("type"), str, "a string")
    for sub_key in ("normalizers", "processors", "decoders"):
        subs = comp.get(sub_key)
        _want(path, f"{key}.{sub_key}", subs, list, "a list")
        for j, sub in enumerate(subs or ()):
            _check_components(path, sub, f"{key}.{sub_key}[{j}]", depth + 1)
    for sub_key in ("single", "pair"):
        items = comp.get(sub_key)
        _want(path, f"{key}.{sub_key}", items, list, "a list")
        for j, item in enumerate(items or ()):
            _want(path, f"{key}.{sub_key}[{j}]", item, dict, "an object", optional=False)
            for inner in item.values():
                _want(path, f"{key}.{sub_key}[{j}]", inner, dict, "an object of objects", optional=False)
    for sub_key in ("cls", "sep"):
        pair = comp.get(sub_key)
        _want(path, f"{key}.{sub_key}", pair, list, "a list")
        if pair is not None and (len(pair) != 2 or not isinstance(pair[0], str)):
            raise ConversionError(f"{path}: key '{key}.{sub_key}' must be a [token, id] pair")
    special = comp.get("special_tokens")
    _want(path, f"{key}.special_tokens", special, dict, "an object")
    for name, st in (special or {}).items():
        _want(path, f"{key}.special_tokens[{name!r}]", st, dict, "an object", optional=False)
        ids = st.get("ids")
        _want(path, f"{key}.special_tokens[{name!r}].ids", ids, list, "a list")
        for i in ids or ():
            _check_token_id(path, f"{key}.special_tokens[{name!r}].ids", i)


def _check_tokenizer_config(path: Path, cfg: dict) -> None:
    for key in ("add_prefix_space", "add_bos_token", "add_eos_token", "add_sep_token"):
        _want(path, key, cfg.get(key), bool, "true or false")
    _want(path, "tokenizer_class", cfg.get("tokenizer_class"), str, "a string")
    _check_chat_template(path, cfg.get("chat_template"))
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        tok = cfg.get(key)
        _want(path, key, tok, (str, dict), "a string or an object")
        if isinstance(tok, dict):
            _want(path, f"{key}.content", tok.get("content"), str, "a string", optional=False)
    dec = cfg.get("added_tokens_decoder")
    _want(path, "added_tokens_decoder", dec, dict, "an object of id -> token")
    for i, a in (dec or {}).items():
        if not i.isdecimal() or int(i) >= MAX_TOKEN_ID:
            raise ConversionError(f"{path}: key 'added_tokens_decoder' has {i!r}, not a token id")
        _want(path, f"added_tokens_decoder[{i!r}]", a, dict, "an object", optional=False)
        _want(path, f"added_tokens_decoder[{i!r}].content", a.get("content"), str, "a string", optional=False)
        _want(path, f"added_tokens_decoder[{i!r}].special", a.get("special"), bool, "true or false")


def _check_chat_template(path: Path, tmpl) -> None:
    """A template string, or a list of {"name", "template"} objects (named templates, as gguf-py writes them)."""
    _want(path, "chat_template", tmpl, (str, list), "a string or a list")
    for j, t in enumerate(tmpl if isinstance(tmpl, list) else ()):
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
            raise ConversionError(f"{path}: key 'chat_template[{j}]' must be an object with string 'name' and "
                                  f"'template'")


def _read_text(path: Path) -> str:
    try:
        return read_file(path, MAX_JSON_BYTES, "template").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path}: not valid UTF-8 ({exc.reason})") from None


def _check_added_tokens(path: Path, added: dict) -> None:
    for tok, i in added.items():
        _check_token_id(path, tok, i)


MAX_TOKEN_ID = MAX_VOCAB
_TOKENIZER_FILE_CHECKS = {
    "tokenizer.json": _check_tokenizer_json,
    "tokenizer_config.json": _check_tokenizer_config,
    "added_tokens.json": _check_added_tokens,
}


# Every tokenizer.ggml.pre name llama.cpp's loader accepts (src/llama-vocab.cpp, llama-cpp-python 0.3.36; any
# other name makes it throw "unknown pre-tokenizer type"); tests/test_convert_helpers.py compares with the source.
LLAMA_CPP_PRE_TOKENIZERS = frozenset({
    'a.x-4.0', 'afmoe', 'bailingmoe', 'bailingmoe2', 'bloom', 'chameleon', 'chatglm-bpe', 'codeshell',
    'cohere2moe', 'command-r', 'dbrx', 'deepseek-coder', 'deepseek-llm', 'deepseek-r1-qwen', 'deepseek-v3',
    'default', 'exaone', 'exaone-moe', 'exaone4', 'f2llmv2', 'falcon', 'falcon-h1', 'falcon3', 'gemma4',
    'gigachat', 'glm4', 'glm5', 'gpt-2', 'gpt-4o', 'gpt3-finnish', 'granite-docling',
    'granite-embed-multi-311m', 'granite-embed-multi-97m', 'grok-2', 'hunyuan', 'hunyuan-dense', 'hy_v4',
    'jais', 'jais-2', 'jina-de', 'jina-es', 'jina-v1-en', 'jina-v2-code', 'jina-v2-de', 'jina-v2-es',
    'jina-v5-nano', 'joyai-llm', 'kanana2', 'kimi-k2', 'kormo', 'laguna', 'lfm2', 'llada-moe', 'llama-bpe',
    'llama-v3', 'llama3', 'llama4', 'megrez', 'mellum', 'mellum2', 'midm-2.0', 'minerva-7b', 'minicpm5',
    'minimax-m2', 'modern-bert', 'mpt', 'olmo', 'phi-2', 'pixtral', 'poro-chat', 'qwen2', 'qwen35', 'refact',
    'roberta-bpe', 'sarvam-moe', 'seed-coder', 'smaug-bpe', 'smollm', 'solar-open', 'spark2_5', 'stablelm2',
    'starcoder', 'superbpe', 'talkie', 'tekken', 'tiny_aya', 'trillion', 'ufakzeka', 'viking', 'whitespace',
    'youtu',
})


def checked_pre_tokenizer(conv):
    """The ``pre_tokenizer`` option, refused unless llama.cpp knows the name; None when not given."""
    pre = conv.options.get("pre_tokenizer")
    if pre is not None and pre not in LLAMA_CPP_PRE_TOKENIZERS:
        raise ConversionError(f"pre_tokenizer {pre!r} is not a pre-tokenizer llama.cpp knows; known names: "
                              f"{', '.join(sorted(LLAMA_CPP_PRE_TOKENIZERS))}")
    return pre


def pre_tokenizer_name(model_dir: Path, tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a BPE tokenizer (hash table first, then the split regex)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # without the hash, a known tokenizer could get another name than llama.cpp gives it
        raise ConversionError(
            f"{model_dir}: naming the BPE pre-tokenizer needs the 'tokenizers' package: "
            f"pip install 'gguf-kquant[convert]' (or pass pre_tokenizer='<llama.cpp name>')") from None
    try:
        ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CHKTXT).ids
    except Exception as exc:  # the Rust library raises plain Exception for a file it cannot load
        raise ConversionError(f"{model_dir / 'tokenizer.json'}: the tokenizers library cannot load it: "
                              f"{str(exc)[:200]}") from None
    if (name := HASHES.get(sha256(str(ids).encode()).hexdigest())) is not None:
        return name
    regexes = _split_regexes(tok_json.get("pre_tokenizer"))
    for r in regexes:
        if r in KNOWN_REGEXES:
            return KNOWN_REGEXES[r]
    if regexes == ["<gpt2>"]:
        return "gpt-2"
    raise ConversionError(
        f"{model_dir / 'tokenizer.json'}: unknown BPE pre-tokenizer (split regexes {regexes}); llama.cpp's "
        f"hash table has no entry for it either. Pass pre_tokenizer='<llama.cpp name>' to choose one.")


def _looks_special(tok: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>")) or (tok.startswith("<unused") and tok.endswith(">")))


def vocab_base(conv) -> tuple[list, list, dict]:
    """Tokens and token types like convert_hf_to_gguf.py's ``get_vocab_base`` (GPT-2 BPE and WordPiece)."""
    path = conv.dir / "tokenizer.json"
    if not path.is_file() and (conv.dir / "tokenizer.model").is_file():
        raise ConversionError(f"{conv.dir}: only a SentencePiece tokenizer.model, but {conv.arch_name} needs "
                              f"tokenizer.json (convert_hf_to_gguf.py reads this vocabulary only from there)")
    tj = read_json(path)
    model = tj.get("model") or {}
    if model.get("type") not in ("BPE", "WordPiece"):
        raise ConversionError(f"{path}: unsupported tokenizer model type {model.get('type')!r} "
                              f"(supported: BPE, WordPiece)")
    vocab = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for content, a in added.items():
        vocab[content] = a["id"]
    vocab_size = conv.hparams.get("vocab_size", len(vocab))
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConversionError(f"{path}: token id {max(vocab.values())} is beyond config.json's vocab_size "
                              f"{vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if added[tok].get("special") or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")  # llama.cpp wants user-defined tokens pre-normalized
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types, tj


def check_not_byte_fallback(conv, tok_json: dict) -> None:
    """A byte-fallback BPE tokenizer.json (SentencePiece style: "\u2581" for spaces, <0xXX> byte tokens) written
    as a GPT-2 byte-level vocabulary would tokenize every text wrongly: refuse it rather than write that
    (convert_hf_to_gguf.py reads it as a ``llama`` vocabulary only for Llama/Mistral, see is_llama_hf)."""
    model = tok_json.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise ConversionError(
            f"{conv.dir / 'tokenizer.json'}: a SentencePiece-style BPE (byte_fallback) tokenizer is not "
            f"supported for {conv.arch_name} without its tokenizer.model (supported here: GPT-2 style "
            f"byte-level BPE and WordPiece)")


def set_vocab_gpt2(conv, w: gguf.GGUFWriter) -> None:
    tokens, types, tj = vocab_base(conv)
    check_not_byte_fallback(conv, tj)
    pre = checked_pre_tokenizer(conv) or pre_tokenizer_name(conv.dir, tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    SpecialVocab(conv.dir, load_merges=True).add_to_gguf(w)
    conv.pre_tokenizer = pre


def _add_llama_vocab(conv, w: gguf.GGUFWriter, tokens: list, scores: list, types: list) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")  # llama.cpp's SentencePiece tokenizer has no pre-tokenizer variants
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    SpecialVocab(conv.dir, n_vocab=len(tokens)).add_to_gguf(w)
    conv.pre_tokenizer = "default"


def sentencepiece_vocab(conv) -> tuple[list, list, list]:
    """Tokens, scores and types like convert_hf_to_gguf.py's ``_create_vocab_sentencepiece``.

    The list always has config.json's ``vocab_size`` entries: ids the tokenizer files do not name stay
    ``[PAD<id>]`` (UNUSED, score -10000) and pieces beyond ``vocab_size`` are dropped, as llama.cpp does.
    """
    path = conv.dir / "tokenizer.model"
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ConversionError(f"{path}: reading a SentencePiece tokenizer needs the 'sentencepiece' package: "
                              f"pip install 'gguf-kquant[convert]'") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (RuntimeError, OSError) as exc:
        raise ConversionError(f"{path}: not a SentencePiece model: {exc}") from None
    T = gguf.TokenType
    n = conv.find(["vocab_size_per_layer_input", "vocab_size"], optional=True) or sp.vocab_size()
    tokens, scores, types = [f"[PAD{i}]" for i in range(n)], [-10000.0] * n, [T.UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        # sentencepiece's user-defined pieces are NORMAL here; added_tokens_decoder usually re-types them
        types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else
                    T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
    if (added := conv.dir / "added_tokens.json").is_file():
        for tok, i in read_json(added).items():
            if i < n:
                tokens[i], scores[i], types[i] = tok, -1000.0, T.USER_DEFINED
    if (cfg := conv.dir / "tokenizer_config.json").is_file():
        for i, a in (read_json(cfg).get("added_tokens_decoder") or {}).items():
            i, tok = int(i), a["content"]
            if i >= n:
                continue
            if a.get("special") or _looks_special(tok):
                types[i] = T.CONTROL
            else:
                tok = tok.replace("\u2581", " ")  # llama.cpp wants user-defined tokens pre-normalized
                types[i] = T.USER_DEFINED
            tokens[i], scores[i] = tok, -1000.0
    return tokens, scores, types


def set_vocab_sentencepiece(conv, w: gguf.GGUFWriter) -> None:
    """convert_hf_to_gguf.py's ``_set_vocab_sentencepiece``: a ``llama`` vocabulary from tokenizer.model."""
    _add_llama_vocab(conv, w, *sentencepiece_vocab(conv))


def set_vocab_sentencepiece_or_gpt2(conv, w: gguf.GGUFWriter) -> bool:
    """What most convert_hf_to_gguf.py models do: SentencePiece when tokenizer.model exists (returns True),
    else GPT-2 BPE from tokenizer.json."""
    if (conv.dir / "tokenizer.model").is_file():
        set_vocab_sentencepiece(conv, w)
        return True
    set_vocab_gpt2(conv, w)
    return False


def is_llama_hf(conv) -> bool:
    """Whether convert_hf_to_gguf.py takes tokenizer.json as a Llama-2 style fast tokenizer (the checks at
    the top of gguf-py's LlamaHfVocab; anything else falls through to the GPT-2 path)."""
    path = conv.dir / "tokenizer.json"
    if not path.is_file():
        return False
    tj = read_json(path)
    model = tj.get("model") or {}
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and (tj.get("decoder") or {}).get("type") == "Sequence")


def set_vocab_llama_hf(conv, w: gguf.GGUFWriter) -> None:
    """convert_hf_to_gguf.py's ``_set_vocab_llama_hf``.  gguf-py's LlamaHfVocab (the same in gguf 0.19 and in
    the llama.cpp this package matches) decides token types with transformers' view of the special tokens,
    so it is reused rather than re-derived."""
    try:
        vocab = gguf.LlamaHfVocab(conv.dir)
    except ImportError:
        raise ConversionError(f"{conv.dir / 'tokenizer.json'}: reading a byte-fallback BPE tokenizer needs "
                              f"transformers' AutoTokenizer, as convert_hf_to_gguf.py does: "
                              f"pip install transformers") from None
    tokens, scores, types = zip(*vocab.all_tokens())
    _add_llama_vocab(conv, w, list(tokens), list(scores), list(types))


def set_vocab_bert(conv, w: gguf.GGUFWriter) -> None:
    tokens, types, tj = vocab_base(conv)
    pre = checked_pre_tokenizer(conv)
    if pre is None:
        try:
            pre = pre_tokenizer_name(conv.dir, tj)
        except ConversionError:
            pre = "default"  # llama.cpp's WPM tokenizer does not use the pre-tokenizer type
    w.add_token_type_count(conv.hparams.get("type_vocab_size", 1))

    def phantom(tok, typ):  # WordPiece -> llama.cpp's "phantom space" vocabulary
        if typ == gguf.TokenType.CONTROL:
            return tok
        return tok[2:] if tok.startswith("##") else "\u2581" + tok

    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(pre)
    w.add_token_list([phantom(t, y) for t, y in zip(tokens, types)])
    w.add_token_types(types)
    SpecialVocab(conv.dir, n_vocab=len(tokens)).add_to_gguf(w)
    conv.pre_tokenizer = pre


class SpecialVocab(gguf.SpecialVocab):
    """gguf-py 0.19's SpecialVocab brought up to the llama.cpp convert script this package matches.

    Differences to the installed gguf 0.19.0 (taken from the llama.cpp source in llama-cpp-python 0.3.36):
    the normalizer's lowercase/strip_accents flags are written, a ``ByteLevel`` post-processor means
    add_bos/add_eos = false, a leading special token of a ``TemplateProcessing`` becomes bos/cls when
    tokenizer_config.json names none, and the post-processor wins over tokenizer_config's ``add_*_token``.
    """

    def __init__(self, path, load_merges=False, special_token_types=None, n_vocab=None):
        self.normalizer_lowercase = None
        self.normalizer_strip_accents = None
        super().__init__(path, load_merges=load_merges, special_token_types=special_token_types, n_vocab=n_vocab)

    def _try_load_from_config_json(self, path: Path) -> bool:
        # gguf-py's, reading config.json defensively: its root first, then its text_config (Kimi-VL style)
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            return False
        config = read_json(config_file)
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        for typ in self.special_token_types:
            token_id = config.get(f"{typ}_token_id")
            if token_id is None:
                token_id = text.get(f"{typ}_token_id")
            if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id < 0:
                raise ConversionError(f"{config_file}: key '{typ}_token_id' is {token_id}, not a token id")
            self._set_special_token(typ, token_id)
        return True

    def add_to_gguf(self, gw, quiet=True):
        super().add_to_gguf(gw, quiet=quiet)
        if self.normalizer_lowercase is not None:
            gw.add_bool("tokenizer.ggml.normalizer.lowercase", self.normalizer_lowercase)
        if self.normalizer_strip_accents is not None:
            gw.add_bool("tokenizer.ggml.normalizer.strip_accents", self.normalizer_strip_accents)

    def _parse_normalizer(self, n: dict) -> None:
        t = n.get("type")
        if t == "Lowercase":
            self.normalizer_lowercase = True
        elif t == "StripAccents":
            self.normalizer_strip_accents = True
        elif t == "BertNormalizer":
            if "lowercase" in n:
                self.normalizer_lowercase = n["lowercase"]
            if "strip_accents" in n:
                self.normalizer_strip_accents = n["strip_accents"]
        elif t == "Sequence":
            for m in n.get("normalizers") or []:
                self._parse_normalizer(m)

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        tokenizer, added_tokens = None, []
        if (path / "tokenizer.json").is_file():
            tokenizer = read_json(path / "tokenizer.json")
            if self.load_merges:
                merges = (tokenizer.get("model") or {}).get("merges")
                if isinstance(merges, list) and merges:
                    if isinstance(merges[0], str):
                        self.merges = merges
                    elif isinstance(merges[0], list) and len(merges[0]) == 2:
                        # pairs format (transformers >= 4.45): spaces inside a part are encoded as U+0120+...
                        self.merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                                for part in pair) for pair in merges]
                    else:
                        raise ConversionError(f"{path / 'tokenizer.json'}: unknown merges format")
            if normalizer := tokenizer.get("normalizer"):
                self._parse_normalizer(normalizer)
            added_tokens = tokenizer.get("added_tokens") or []
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else None
        if tokenizer:
            bos, cls = (cfg or {}).get("bos_token"), (cfg or {}).get("cls_token")
            eos, sep = (cfg or {}).get("eos_token"), (cfg or {}).get("sep_token")
            if not bos and cls and cfg:
                cfg["bos_token"] = bos = cls
            if not eos and sep and cfg:
                cfg["eos_token"] = eos = sep
            post = tokenizer.get("post_processor") or {}
            for proc in (post.get("processors", [post]) if post else []):
                ptype = proc.get("type")
                if ptype == "ByteLevel":
                    self.add_special_token.setdefault("bos", False)
                    self.add_special_token.setdefault("eos", False)
                elif ptype == "RobertaProcessing":
                    self.add_special_token.update(bos=True, eos=True, sep=True)
                    if not cls and cfg:
                        cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
                    if not sep and cfg:
                        cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
                elif ptype == "TemplateProcessing":
                    single, pair = proc.get("single") or [], proc.get("pair") or []
                    first = last = None
                    if len(single) > 1:
                        if first := single[0].get("SpecialToken", {}).get("id"):
                            if not cfg:
                                bos = first
                            elif first not in (bos, cls):
                                if not bos:
                                    cfg["bos_token"] = bos = first
                                if not cls:
                                    cfg["cls_token"] = cls = first
                            self.add_special_token["bos"] = first in (bos, cls)
                        if last := single[-1].get("SpecialToken", {}).get("id"):
                            if not cfg:
                                eos = last
                            elif last != eos:
                                for extra in ("eot", "eom"):
                                    if extra not in self.special_token_types:
                                        self.special_token_types = tuple(self.special_token_types) + (extra,)
                                        cfg[f"{extra}_token"] = eos
                                        break
                                cfg["eos_token"] = eos = last
                            self.add_special_token["eos"] = last == eos
                    if pair:
                        start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                        stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                        pair = pair[slice(start, stop)]
                        if pair:
                            a, b = pair[0].get("Sequence", {}).get("id"), pair[-1].get("Sequence", {}).get("id")
                            if a == "A" and b == "B" and (mid := pair[1:-1]):
                                add_sep = False
                                if entry := mid[0].get("SpecialToken", {}).get("id"):
                                    if entry in (sep, eos) and not last:
                                        add_sep = True
                                if len(mid) == 2 and (entry := mid[1].get("SpecialToken", {}).get("id")):
                                    if entry in (sep, eos):
                                        add_sep = True
                                self.add_special_token["sep"] = add_sep
                                if add_sep and not sep and cfg:
                                    cfg["sep_token"] = eos
        if not cfg:
            return True
        alt = None
        if (path / "chat_template.jinja").is_file():
            alt = _read_text(path / "chat_template.jinja")
            extra = sorted((path / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": _read_text(p)} for p in extra]
        elif (path / "chat_template.json").is_file():
            alt = read_json(path / "chat_template.json").get("chat_template")
            _check_chat_template(path / "chat_template.json", alt)
        tmpl = cfg.get("chat_template", alt)
        if tmpl is None or isinstance(tmpl, (str, list)):
            self.chat_template = tmpl
        for typ in self.special_token_types:
            add = cfg.get(f"add_{typ}_token")
            if isinstance(add, bool) and typ not in self.add_special_token:
                self.add_special_token[typ] = add
            entry = cfg.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if not isinstance(content, str):
                continue
            tid = next((a.get("id") for a in added_tokens if a.get("content") == content), None)
            self._set_special_token(typ, tid)
        return True
