"""``gguf-kquant edit | split | merge | diff``: argument parsing and printing over :mod:`gguf_kquant.tools`.

``gguf_kquant.cli`` imports one module per sub-command and calls its ``add_arguments(parser)`` and
``run(args) -> int``; those modules (``cmd_edit``, ``cmd_split``, ``cmd_merge``, ``cmd_diff``) re-export the
functions below.
"""

from __future__ import annotations

import json
import math
import sys

from ..errors import InvalidArgumentError


def _kv(spec: str, what: str) -> tuple:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise InvalidArgumentError(f"{what} {spec!r}: expected NAME=VALUE")
    return name, value


# ------------------------------------------------------------------------------------------------------
# edit
# ------------------------------------------------------------------------------------------------------
def _edit_arguments(p) -> None:
    p.add_argument("src", help="GGUF file to edit (in place unless -o is given)")
    p.add_argument("-o", "--output", metavar="DST", help="write the edited copy here instead")
    p.add_argument("--set", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="set a key; TYPE: int, float, bool, str, a GGUF type (UINT8..FLOAT64, STRING, BOOL) "
                        "or ARRAY[T] with a JSON list")
    p.add_argument("--delete", action="append", default=[], metavar="KEY", help="delete a key")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="rename a key")
    p.add_argument("--chat-template-file", metavar="FILE",
                   help="replace the chat template(s) with this file's text (tokenizer.chat_template)")
    p.add_argument("--special-token", action="append", default=[], metavar="NAME=ID",
                   help="set a special token by id (bos, eos, eot, unknown, padding, ...)")
    p.add_argument("--special-token-text", action="append", default=[], metavar="NAME=TEXT",
                   help="set a special token to the first token with this text")
    p.add_argument("--retype", action="store_true", help="allow --set to change the type of an existing key")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def _edit_run(args) -> int:
    from .edit import edit

    specials = []
    for spec in args.special_token:
        name, value = _kv(spec, "--special-token")
        if not value.isdecimal():
            raise InvalidArgumentError(f"--special-token {spec!r}: {value!r} is not a token id")
        specials.append((name, int(value)))
    specials += [_kv(spec, "--special-token-text") for spec in args.special_token_text]
    template = None
    if args.chat_template_file is not None:
        # text mode, like gguf-new-metadata (so its bytes are the same: universal newlines)
        try:
            with open(args.chat_template_file, encoding="utf-8") as fh:
                template = fh.read()
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"{args.chat_template_file}: not UTF-8 text ({exc.reason} at byte "
                                       f"{exc.start})") from None
    r = edit(args.src, args.output, set=args.set, delete=args.delete, rename=args.rename,
             chat_template=template, special_tokens=specials, retype=args.retype, overwrite=args.overwrite)
    if not args.quiet:
        how = "patched in place" if r.in_place else "written"
        print(f"{r.path}: {how}; edited {len(r.changed)} key(s)" + (f": {', '.join(r.changed)}" if r.changed else ""))
    return 0


# ------------------------------------------------------------------------------------------------------
# split / merge
# ------------------------------------------------------------------------------------------------------
def _split_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--split-max-size", metavar="N", help="max tensor bytes per shard (bytes, or N with M or G)")
    g.add_argument("--split-max-tensors", type=int, metavar="N", help="max tensors per shard (default 128)")
    p.add_argument("--no-tensor-first-split", action="store_true", help="the first shard holds the metadata only")
    p.add_argument("--dry-run", action="store_true", help="print the shards that would be written, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("src", help="GGUF model (a split model: its first shard)")
    p.add_argument("out_prefix", help="shards are named OUT_PREFIX-0000i-of-0000N.gguf")


def _split_run(args) -> int:
    from .split_merge import plan_split, split

    kw = dict(max_size=args.split_max_size, max_tensors=args.split_max_tensors,
              no_tensor_first_split=args.no_tensor_first_split)
    if args.dry_run:
        shards = plan_split(args.src, args.out_prefix, **kw)
        print(f"n_split: {len(shards)}")
        for path, n in shards:
            print(f"{path}: n_tensors = {n}")
        return 0
    paths = split(args.src, args.out_prefix, overwrite=args.overwrite, **kw)
    if not args.quiet:
        for path in paths:
            print(path)
    return 0


def _merge_arguments(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("first_shard", help="the first shard, PREFIX-00001-of-0000N.gguf")
    p.add_argument("dst", help="the merged GGUF file")


def _merge_run(args) -> int:
    from .split_merge import merge

    path = merge(args.first_shard, args.dst, overwrite=args.overwrite)
    if not args.quiet:
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------------
# diff
# ------------------------------------------------------------------------------------------------------
def _diff_arguments(p) -> None:
    p.add_argument("a", help="GGUF file A (the reference)")
    p.add_argument("b", help="GGUF file B (compared against A)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-tensors", action="store_true", help="do not dequantize (metadata, types, shapes only)")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."


def _print_diff(d: dict) -> None:
    md, t, s = d["metadata"], d["tensors"], d["summary"]
    for e in md["removed"]:
        print(f"- {e['key']} ({e['type']}) = {_short(e['value'])}")
    for e in md["added"]:
        print(f"+ {e['key']} ({e['type']}) = {_short(e['value'])}")
    for e in md["changed"]:
        print(f"~ {e['key']}: ({e['type_a']}) {_short(e['value_a'])} -> ({e['type_b']}) {_short(e['value_b'])}")
    for name in t["only_a"]:
        print(f"- tensor {name}")
    for name in t["only_b"]:
        print(f"+ tensor {name}")
    for e in t["different_shape"]:
        print(f"~ tensor {e['name']}: shape {e['shape_a']} {e['type_a']} -> {e['shape_b']} {e['type_b']}")
    for e in t["not_compared"]:
        print(f"? tensor {e['name']}: not compared ({e['reason']})")
    if t["compared"]:
        w = max(len(r["name"]) for r in t["compared"])
        print(f"{'tensor':<{w}}  {'type A':>7} {'type B':>7} {'rmse':>11} {'max_abs':>11} {'cosine':>9} {'rms A':>11}")
        for r in t["compared"]:
            print(f"{r['name']:<{w}}  {r['type_a']:>7} {r['type_b']:>7} {_fmt(r['rmse']):>11} "
                  f"{_fmt(r['max_abs']):>11} {_fmt(r['cosine']):>9} {_fmt(r['rms_a']):>11}")
    print(f"{s['tensors_compared']} tensors compared ({s['elements']} elements): rmse {_fmt(s['rmse'])}, "
          f"max_abs {_fmt(s['max_abs'])}, min cosine {_fmt(s['min_cosine'])}; "
          + ("identical" if s["identical"] else "different"))


def _finite(v):
    """JSON has no NaN/Infinity: non-finite floats become "nan", "inf", "-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _diff_run(args) -> int:
    from .diff import diff

    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError(f"--threads {args.threads}: must be at least 1")
    d = diff(args.a, args.b, tensors=not args.no_tensors, threads=args.threads)
    if args.json:
        json.dump(_finite(d), sys.stdout, indent=1, ensure_ascii=False, allow_nan=False)
        print()
    else:
        _print_diff(d)
    return 0

