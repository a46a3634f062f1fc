"""Edit a GGUF file's metadata: set, delete and rename keys, replace the chat template, set special tokens.

>>> from gguf_kquant.tools import edit
>>> edit("model.gguf", "named.gguf", set=["general.name=str:My model"])            # doctest: +SKIP
EditResult(path=PosixPath('named.gguf'), in_place=False, changed=['general.name'])
>>> edit("model.gguf", special_tokens=[("eos", 2)])        # same-size value: patched in place  # doctest: +SKIP
EditResult(path=PosixPath('model.gguf'), in_place=True, changed=['tokenizer.ggml.eos_token_id'])

How the output is made:

* *In place* (no ``dst``) when every change is a new value of the same fixed size for an existing key (a
  number or bool, not ``general.alignment``): the value's bytes are overwritten where they are, as gguf-py's
  ``gguf-set-metadata`` does — after checking that the bytes there are the old value's.
* Otherwise the file is *rewritten* (to ``dst``, or atomically over ``src``): metadata re-encoded, tensors
  copied byte for byte without decoding, through :func:`gguf_kquant.container.writer.write_shards` (planned
  offsets, temp file, all-or-nothing rename, signal clean-up).  The bytes are those gguf-py's
  ``gguf-new-metadata`` writes for the same edit: ``general.architecture`` first, a changed key keeps its
  place, new keys are appended (the chat template first, then ``set`` keys, then special tokens, in the
  order given), a new chat template replaces every ``tokenizer.chat_template*`` key, GGUF version 3, the
  source's byte order and alignment.  A renamed key keeps its place (gguf-new-metadata cannot rename).
  ``split.*`` keys are never changed implicitly: editing a shard of a split model edits that file alone.

Values (``set``, as ``"KEY=TYPE:VALUE"`` or ``(key, Value)``): TYPE is one of llama-quantize's
``--override-kv`` types — ``int`` (stored as UINT32, what llama-quantize writes), ``float`` (FLOAT32),
``bool`` (``true``/``false``), ``str`` — or a GGUF value type name (``UINT8`` … ``FLOAT64``, ``BOOL``,
``STRING``, case-insensitive), or ``ARRAY[T]`` with a JSON list (``ARRAY[INT32]:[1,2,3]``,
``array[string]:["a","b"]``).

Refused before anything is written (one :class:`~gguf_kquant.errors.GGUFError`, every file left as it was):
a malformed spec, an unknown type, a value that does not fit its type, deleting or renaming a key that does
not exist, renaming onto an existing key, a key named twice, an edit of a ``split.*`` key (llama.cpp would
not find or accept the shards), deleting ``general.architecture``, a ``general.alignment`` that is not a
UINT32 power of two, arrays of arrays (ggml's parser rejects them), changing the type (or array element
type) of an existing key unless ``retype=True`` (llama.cpp reads its keys with fixed types), a special token
id outside the vocabulary, and a ``dst`` that is the source file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..container import split as _split
from ..container.reader import open_gguf
from ..container.values import SCALAR_DTYPES, GGUFValueType, Value, typed_items
from ..container.writer import KEY_ALIGNMENT, _Encoder, write_shards
from ..errors import GGUFError, GGUFIOError, InvalidArgumentError, MetadataTypeError, WriteError

__all__ = ["edit", "parse_set", "EditResult", "SPECIAL_TOKENS", "special_token_key"]

_VT = GGUFValueType
KEY_ARCHITECTURE = "general.architecture"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
KEY_TOKENS = "tokenizer.ggml.tokens"
SPLIT_KEYS = (_split.KEY_SPLIT_NO, _split.KEY_SPLIT_COUNT, _split.KEY_SPLIT_TENSORS_COUNT)

# Special-token names as gguf-new-metadata spells them; each is ``tokenizer.ggml.<name>_token_id``
# (llama.cpp's LLM_KV_TOKENIZER_*_ID, src/llama-arch.cpp; ``cls`` is llama.cpp's, not in gguf-py's list).
SPECIAL_TOKENS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask", "fim_pre",
                  "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle")

# llama-quantize's --override-kv types and the GGUF type each is stored as (src/llama-quant.cpp).
_OVERRIDE_TYPES = {"int": _VT.UINT32, "float": _VT.FLOAT32, "bool": _VT.BOOL, "str": _VT.STRING}
_ARRAY_RE = re.compile(r"^array\[(\w+)\]$", re.IGNORECASE)
_HEADER_BYTES = 24  # magic, version, n_tensors (i64), n_kv (i64)


def special_token_key(name: str) -> str:
    """``"bos"`` -> ``"tokenizer.ggml.bos_token_id"``; unknown names raise InvalidArgumentError."""
    if name not in SPECIAL_TOKENS:
        raise InvalidArgumentError(f"unknown special token {name!r} (known: {', '.join(SPECIAL_TOKENS)})")
    return f"tokenizer.ggml.{name}_token_id"


# ------------------------------------------------------------------------------------------------------
# Parsing KEY=TYPE:VALUE
# ------------------------------------------------------------------------------------------------------
def _value_type(name: str, spec: str) -> GGUFValueType:
    if name in _OVERRIDE_TYPES:
        return _OVERRIDE_TYPES[name]
    try:
        vt = GGUFValueType[name.upper()]
    except KeyError:
        raise InvalidArgumentError(
            f"{spec!r}: unknown value type {name!r} (int, float, bool, str, a GGUF type such as UINT16 or "
            f"FLOAT64, or ARRAY[T])") from None
    if vt == _VT.ARRAY:
        raise InvalidArgumentError(f"{spec!r}: give the element type of an array, e.g. ARRAY[INT32]:[1,2]")
    return vt


def _scalar(vt: GGUFValueType, v, spec: str, *, from_text: bool):
    """Check (and, from text, convert) one value of type ``vt``; errors say what does not fit."""
    if vt == _VT.STRING:
        if not isinstance(v, str):
            raise InvalidArgumentError(f"{spec!r}: {v!r} is not a string")
        return v
    if vt == _VT.BOOL:
        if from_text:
            if v not in ("true", "false"):
                raise InvalidArgumentError(f"{spec!r}: a bool is true or false, not {v!r}")
            return v == "true"
        if not isinstance(v, bool):
            raise InvalidArgumentError(f"{spec!r}: {v!r} is not a bool")
        return v
    dt = SCALAR_DTYPES[vt]
    if dt.kind in "iu":
        if from_text:
            if not re.fullmatch(r"[+-]?\d+", v.strip()):
                raise InvalidArgumentError(f"{spec!r}: {v!r} is not an integer")
            v = int(v)
        elif not isinstance(v, int) or isinstance(v, bool):
            raise InvalidArgumentError(f"{spec!r}: {v!r} is not an integer")
        info = np.iinfo(dt)
        if not info.min <= v <= info.max:
            raise InvalidArgumentError(f"{spec!r}: {v} does not fit {vt.name} [{info.min}, {info.max}]")
        return v
    if from_text:
        try:
            v = float(v)
        except ValueError:
            raise InvalidArgumentError(f"{spec!r}: {v!r} is not a number") from None
    elif not isinstance(v, (int, float)) or isinstance(v, bool):
        raise InvalidArgumentError(f"{spec!r}: {v!r} is not a number")
    v = float(v)
    with np.errstate(over="ignore"):
        overflows = np.isfinite(v) and not np.isfinite(dt.type(v))
    if overflows:
        raise InvalidArgumentError(f"{spec!r}: {v!r} overflows {vt.name}")
    return float(dt.type(v)) if vt == _VT.FLOAT32 else v


def parse_set(spec) -> tuple:
    """``"KEY=TYPE:VALUE"`` -> ``(key, Value)`` (see the module docstring); a ``(key, Value)`` pair passes.

    >>> parse_set("general.name=str:tiny")
    ('general.name', Value(value='tiny', type=<GGUFValueType.STRING: 8>, element_type=None))
    >>> parse_set("llama.rope.dimension_sections=ARRAY[INT32]:[16,24,24,0]")[1].value
    [16, 24, 24, 0]
    """
    if not isinstance(spec, str):
        try:
            key, value = spec
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{spec!r}: expected 'KEY=TYPE:VALUE' or a (key, Value) pair") from None
        if not isinstance(value, Value):
            raise InvalidArgumentError(f"{key!r}: pass a Value (with its GGUF type), not {type(value).__name__}")
        return key, value
    key, sep, rest = spec.partition("=")
    type_name, sep2, text = rest.partition(":")
    if not sep or not sep2 or not key:
        raise InvalidArgumentError(f"{spec!r}: expected KEY=TYPE:VALUE (e.g. general.name=str:My model)")
    m = _ARRAY_RE.match(type_name)
    if not m:
        vt = _value_type(type_name, spec)
        return key, Value(_scalar(vt, text, spec, from_text=True), vt)
    et_name = m.group(1)
    if et_name.upper() == "ARRAY":
        raise InvalidArgumentError(f"{spec!r}: arrays of arrays are not allowed (llama.cpp's GGUF parser rejects them)")
    et = _value_type(et_name, spec)
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"{spec!r}: the array is not a JSON list ({exc.msg})") from None
    if not isinstance(items, list):
        raise InvalidArgumentError(f"{spec!r}: the array is not a JSON list")
    items = [_scalar(et, v, spec, from_text=False) for v in items]
    return key, Value(items, _VT.ARRAY, et)


def _pair(spec, what: str) -> tuple:
    if isinstance(spec, str):
        a, sep, b = spec.partition("=")
        if not sep or not a or not b:
            raise InvalidArgumentError(f"{what} {spec!r}: expected OLD=NEW")
        return a, b
    try:
        a, b = spec
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} {spec!r}: expected a pair") from None
    return a, b


# ------------------------------------------------------------------------------------------------------
# Planning the new metadata
# ------------------------------------------------------------------------------------------------------
@dataclass
class EditResult:
    """What :func:`edit` did: the file written, whether it was patched in place, the keys it changed."""

    path: Path
    in_place: bool
    changed: list = field(default_factory=list)


def _type_name(typed: Value) -> str:
    return typed.type.name + (f"[{typed.element_type.name}]" if typed.element_type is not None else "")


def _refuse_split_key(key: str, doing: str) -> None:
    if key in SPLIT_KEYS:
        raise WriteError(f"{doing} {key}: split.* keys tie the shards of a split model together; llama.cpp "
                         f"would reject the model (use gguf-kquant split / merge)")


def _check_value(key: str, typed: Value) -> None:
    if typed.type == _VT.ARRAY and typed.element_type == _VT.ARRAY:
        raise WriteError(f"{key}: arrays of arrays are rejected by llama.cpp's GGUF parser")
    if key == KEY_ALIGNMENT:
        a = typed.value
        if typed.type != _VT.UINT32 or not isinstance(a, int) or a <= 0 or a & (a - 1):
            raise WriteError(f"{key} must be a UINT32 power of two (llama.cpp rejects {_type_name(typed)} {a!r})")
    if key == KEY_ARCHITECTURE and typed.type != _VT.STRING:
        raise MetadataTypeError(f"{key} must be a STRING, not {_type_name(typed)}")


def _special_value(f, name: str, token) -> Value:
    """gguf-new-metadata's --special-token (by text: the first id) / --special-token-by-id (in range)."""
    key = special_token_key(name)
    tokens = f.metadata.get(KEY_TOKENS) if KEY_TOKENS in f.metadata else []
    n = len(tokens)
    if isinstance(token, str):
        ids = [i for i, t in enumerate(tokens) if t == token]
        if not ids:
            raise InvalidArgumentError(f"{key}: token {token!r} is not in the vocabulary ({KEY_TOKENS})")
        return Value(ids[0], _VT.UINT32)
    if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or not 0 <= int(token) < n:
        raise InvalidArgumentError(f"{key}: token id {token!r} is not within the vocabulary of {n} tokens")
    return Value(int(token), _VT.UINT32)


def _plan(f, sets, delete, rename, chat_template, special_tokens, retype) -> tuple:
    """(new [(key, Value)] in gguf-new-metadata's order, {key: Value} changed in place, [changed keys])."""
    old = dict(typed_items(f.metadata))
    names = _Names()
    new_values = _new_values(f, old, sets, special_tokens, retype, names)
    deleted = _deleted(old, delete, names)
    renamed = _renamed(old, rename, names)
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise InvalidArgumentError(f"the chat template must be a str, not {type(chat_template).__name__}")
        names.claim(KEY_CHAT_TEMPLATE, "chat template")
    pairs, in_place, changed = _assemble(old, new_values, deleted, renamed, chat_template)
    only_values = not deleted and not renamed and chat_template is None and all(k in old for k in new_values)
    return pairs, (in_place if only_values else None), list(dict.fromkeys(changed))


class _Names:
    """The keys an edit names: naming one twice (set and delete, rename and special token, ...) is refused."""

    def __init__(self):
        self.doing: dict = {}

    def claim(self, key: str, doing: str) -> None:
        if key in self.doing:
            raise InvalidArgumentError(f"{key}: named twice ({self.doing[key]} and {doing})")
        self.doing[key] = doing


def _new_values(f, old: dict, sets, special_tokens, retype: bool, names: _Names) -> dict:
    """{key: Value} of the keys set (``KEY=TYPE:VALUE``) and of the special tokens given by name."""
    new_values: dict = {}
    for spec in sets:
        key, typed = parse_set(spec)
        names.claim(key, "set")
        _refuse_split_key(key, "cannot set")
        _check_value(key, typed)
        if key in old and not retype and (old[key].type, old[key].element_type) != (typed.type, typed.element_type):
            raise MetadataTypeError(f"{key} is {_type_name(old[key])} in the file, the new value is "
                                    f"{_type_name(typed)} (llama.cpp reads keys with fixed types; allow with "
                                    f"retype / --retype)")
        new_values[key] = typed
    for name, token in special_tokens:
        key = special_token_key(name)
        names.claim(key, f"special token {name}")
        new_values[key] = _special_value(f, name, token)
    return new_values


def _deleted(old: dict, delete, names: _Names) -> set:
    deleted = set()
    for key in delete:
        names.claim(key, "delete")
        _refuse_split_key(key, "cannot delete")
        if key not in old:
            raise InvalidArgumentError(f"cannot delete {key}: the file has no such key")
        if key == KEY_ARCHITECTURE:
            raise InvalidArgumentError(f"cannot delete {key}: llama.cpp needs it to load the model")
        deleted.add(key)
    return deleted


def _renamed(old: dict, rename, names: _Names) -> dict:
    """{old name: new name} of the ``OLD=NEW`` renames."""
    renamed = {}
    for spec in rename:
        a, b = _pair(spec, "rename")
        names.claim(a, "rename")
        names.claim(b, "rename")
        for k in (a, b):
            _refuse_split_key(k, "cannot rename")
        if a not in old:
            raise InvalidArgumentError(f"cannot rename {a}: the file has no such key")
        if b in old:
            raise InvalidArgumentError(f"cannot rename {a} to {b}: the file has a key {b} already")
        if a in (KEY_ARCHITECTURE, KEY_ALIGNMENT):
            raise InvalidArgumentError(f"cannot rename {a}: llama.cpp reads it by this name")
        renamed[a] = b
    return renamed


def _assemble(old: dict, new_values: dict, deleted: set, renamed: dict, chat_template) -> tuple:
    """The new key/values in gguf-new-metadata's order (kept keys in place, then the chat template, then new
    keys; general.architecture first), the values changed in place, and the changed keys."""
    pairs, in_place, changed = [], {}, []
    for key, typed in old.items():
        if key in deleted or (chat_template is not None and key.startswith(KEY_CHAT_TEMPLATE)):
            changed.append(key)
        elif key in renamed:
            pairs.append((renamed[key], typed))
            changed.append(key)
        elif key in new_values:
            pairs.append((key, new_values[key]))
            changed.append(key)
            in_place[key] = new_values[key]
        else:
            pairs.append((key, typed))
    if chat_template is not None:
        pairs.append((KEY_CHAT_TEMPLATE, Value(chat_template, _VT.STRING)))
        changed.append(KEY_CHAT_TEMPLATE)
    for key, typed in new_values.items():
        if key not in old:
            pairs.append((key, typed))
            changed.append(key)
    pairs.sort(key=lambda kv: kv[0] != KEY_ARCHITECTURE)  # gguf-py's GGUFWriter(arch=...) writes it first
    return pairs, in_place, changed


# ------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------
def _fixed_size(typed: Value) -> bool:
    return typed.type not in (_VT.STRING, _VT.ARRAY)


def _patches(f, changes: dict) -> Optional[list]:
    """[(offset, old bytes, new bytes)] for values that can be overwritten where they are, or None."""
    if any(k == KEY_ALIGNMENT or not _fixed_size(v) or not _fixed_size(f.metadata.typed(k))
           for k, v in changes.items()):
        return None
    enc = _Encoder(f.byte_order)
    pos, out = _HEADER_BYTES, []
    for key, typed in typed_items(f.metadata):
        start = pos + len(enc.string(key, key))
        old = enc.value(typed, key)
        pos = start + len(old)
        if key in changes:
            new = enc.value(changes[key], key)
            if len(new) != len(old):
                return None
            out.append((start, old, new))
    return out


def _patch_in_place(path: Path, patches: list, fsync: bool) -> None:
    """Overwrite a few value bytes, after checking that each place holds the old value's bytes."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise GGUFIOError.wrap(path, exc, "cannot open for writing") from None
    try:
        for off, old, _ in patches:
            if os.pread(fd, len(old), off) != old:
                raise GGUFError(f"{path}: offset {off}: the file changed while it was being edited; nothing written")
        for off, _, new in patches:
            os.pwrite(fd, new, off)
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        raise GGUFIOError.wrap(path, exc, "cannot write") from None
    finally:
        os.close(fd)


def edit(src, dst=None, *, set: Iterable = (), delete: Iterable = (), rename: Iterable = (),
         chat_template: Optional[str] = None, special_tokens: Iterable = (), retype: bool = False,
         overwrite: bool = False, fsync: bool = True) -> EditResult:
    """Edit ``src``'s metadata, in place or into ``dst`` (see the module docstring for the rules).

    ``set``: ``"KEY=TYPE:VALUE"`` strings or ``(key, Value)`` pairs; ``delete``: keys; ``rename``:
    ``"OLD=NEW"`` strings or pairs; ``chat_template``: the new template text; ``special_tokens``:
    ``(name, id)`` (an int id) or ``(name, text)`` (the first token with that text), ``name`` in
    :data:`SPECIAL_TOKENS`; ``overwrite``: replace an existing ``dst``.

    >>> edit("m.gguf", "m2.gguf", delete=["general.url"], chat_template=open("t.jinja").read())  # doctest: +SKIP
    """
    src = Path(os.fspath(src))
    sets, delete, rename, special_tokens = list(set), list(delete), list(rename), list(special_tokens)
    if isinstance(delete, str) or any(not isinstance(k, str) for k in delete):
        raise InvalidArgumentError("delete: pass a list of key names")
    with open_gguf(src, split=False) as f:
        pairs, changes, changed = _plan(f, sets, delete, rename, chat_template, special_tokens, retype)
        if dst is None and changes is not None:
            patches = _patches(f, changes)
            if patches is not None:
                f.close()  # the map is read-only; the bytes are rewritten through a descriptor
                _patch_in_place(src, [p for p in patches if p[1] != p[2]], fsync)
                return EditResult(src, True, changed)
        target = src if dst is None else Path(os.fspath(dst))
        # tensors as (name, shape, type, producer): copied with pread, never decoded; src is an input
        # unless it is also the target (an in-place rewrite: temp file, then rename over it)
        tensors = [(t.name, t.shape, t.ggml_type, (lambda t=t: t.chunks())) for t in f.tensors]
        write_shards([(target, pairs, tensors)], byte_order=f.byte_order, fsync=fsync,
                     inputs=[] if dst is None else [src], overwrite=overwrite or dst is None)
    return EditResult(target, False, changed)
