"""Tokenizers: read ``tokenizer.json`` / ``tokenizer_config.json`` and write llama.cpp's ``tokenizer.*`` keys.

Token lists and types are rebuilt from ``tokenizer.json`` directly (no transformers needed); merges, special
token ids, add_bos/add_eos and the chat template come from gguf-py's :class:`gguf.SpecialVocab`, the same code
convert_hf_to_gguf.py uses.  The pre-tokenizer name is looked up by llama.cpp's hash of the token ids of a
check text (needs the ``tokenizers`` package, extra ``convert``); when the hash is unknown (e.g. a newly
trained tokenizer) it is inferred from the pre-tokenizer's split regex.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from ..errors import ConversionError
from .pretok_hashes import CHKTXT, HASHES

# The split regex of a tokenizer.json pre_tokenizer -> the llama.cpp pre-tokenizer that implements it.
KNOWN_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path.parent}: no {path.name} (the tokenizer is needed)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON: {exc}") from None


def _split_regexes(pre) -> list:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers", []) for r in _split_regexes(p)]
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return [pat.get("Regex") or pat.get("String")]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return ["<gpt2>"]
    return []


def pre_tokenizer_name(model_dir: Path, tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a BPE tokenizer (hash table first, then the split regex)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # without the hash, a known tokenizer could get another name than llama.cpp gives it
        raise ConversionError(
            f"{model_dir}: naming the BPE pre-tokenizer needs the 'tokenizers' package: "
            f"pip install 'gguf-kquant[convert]' (or pass pre_tokenizer='<llama.cpp name>')") from None
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CHKTXT).ids
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
    tj = read_json(path)
    model = tj.get("model") or {}
    if model.get("type") not in ("BPE", "WordPiece"):
        raise ConversionError(f"{path}: unsupported tokenizer model type {model.get('type')!r} "
                              f"(supported: BPE, WordPiece)")
    vocab = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
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


def check_not_sentencepiece(conv) -> None:
    """convert_hf_to_gguf.py prefers a SentencePiece ``tokenizer.model`` (and, for llama, a byte-fallback BPE
    ``tokenizer.json``) over the GPT-2 path: refuse those rather than write a different vocabulary."""
    if (conv.dir / "tokenizer.model").is_file():
        raise ConversionError(f"{conv.dir / 'tokenizer.model'}: SentencePiece tokenizers are not supported yet "
                              f"(supported: GPT-2 style byte-level BPE and WordPiece tokenizer.json)")
    model = (read_json(conv.dir / "tokenizer.json").get("model") or {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise ConversionError(f"{conv.dir / 'tokenizer.json'}: SentencePiece-style BPE (byte_fallback) is not "
                              f"supported yet (supported: GPT-2 style byte-level BPE and WordPiece)")


def set_vocab_gpt2(conv, w: gguf.GGUFWriter) -> None:
    check_not_sentencepiece(conv)
    cfg_path = conv.dir / "tokenizer_config.json"
    if conv.arch == gguf.MODEL_ARCH.LLAMA and cfg_path.is_file():
        if (aps := read_json(cfg_path).get("add_prefix_space")) is not None:
            w.add_add_space_prefix(aps)
    tokens, types, tj = vocab_base(conv)
    pre = conv.options.get("pre_tokenizer") or pre_tokenizer_name(conv.dir, tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    SpecialVocab(conv.dir, load_merges=True).add_to_gguf(w)
    conv.pre_tokenizer = pre


def set_vocab_bert(conv, w: gguf.GGUFWriter) -> None:
    tokens, types, tj = vocab_base(conv)
    pre = conv.options.get("pre_tokenizer")
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
            for m in n.get("normalizers", []):
                self._parse_normalizer(m)

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        tokenizer, added_tokens = None, []
        if (path / "tokenizer.json").is_file():
            tokenizer = read_json(path / "tokenizer.json")
            if self.load_merges:
                merges = tokenizer.get("model", {}).get("merges")
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
            added_tokens = tokenizer.get("added_tokens", [])
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
                    single, pair = proc.get("single", []), proc.get("pair", [])
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
            alt = (path / "chat_template.jinja").read_text(encoding="utf-8")
            extra = sorted((path / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif (path / "chat_template.json").is_file():
            alt = read_json(path / "chat_template.json").get("chat_template")
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
