"""``gguf-kquant inspect``: a GGUF file's header, metadata, tensors and file type — as text or JSON.

    gguf-kquant inspect model.gguf               # header + summary (tensor bytes per type, file type)
    gguf-kquant inspect model.gguf --metadata    # + every key (long arrays summarized)
    gguf-kquant inspect model.gguf --tensors     # + the tensor table
    gguf-kquant inspect model.gguf --json        # everything, as JSON (schema below)

The library function :func:`inspect_file` returns the same data as a ``dict``.  It never decodes a whole
262,144-token vocabulary: long arrays are summarized by their first elements.

JSON schema (``schema_version`` 1; keys always present unless marked optional)::

    {
      "schema_version": 1,
      "file": str,                    # the path given
      "shards": [str, ...],           # all files of a split model (one entry otherwise)
      "file_size": int,               # bytes, all shards together
      "version": int,                 # GGUF version (2 or 3)
      "byte_order": "little" | "big",
      "alignment": int,
      "data_offset": int,             # absolute offset of the tensor data in the first file
      "tensor_count": int,            # all shards
      "kv_count": int,                # metadata keys of the first file
      "architecture": str | null,     # general.architecture
      "name": str | null,             # general.name
      "file_type": {"id": int, "name": str} | null,  # general.file_type, e.g. {"id": 15, "name": "MOSTLY_Q4_K_M"}
      "totals": {"tensors": int, "elements": int, "bytes": int, "bits_per_weight": float | null},
      "types": [                      # one row per tensor type, most bytes first
        {"type": str, "count": int, "elements": int, "bytes": int,
         "share": float,              # fraction of all tensor bytes
         "bits_per_weight": float | null}
      ],
      "metadata": [                   # optional (metadata=True); file order
        {"key": str,
         "type": str,                 # GGUF value type name: "UINT32", "STRING", "ARRAY", ...
         "element_type": str | null,  # arrays only
         "count": int | null,         # arrays only: number of elements
         "value": ...,                # scalars: the value (non-finite floats as "nan"/"inf"/"-inf");
                                      # arrays: a list of at most max_items first elements; an array of
                                      # arrays lists objects {"element_type", "count", "value", "truncated"}
         "truncated": bool}           # true if "value" holds only the first elements
      ],
      "tensors": [                    # optional (tensors=True); file order
        {"name": str, "shape": [int, ...],   # numpy order (ggml's ne reversed)
         "type": str,                 # "Q4_K", or "UNKNOWN(<id>)" for a type id newer than this library
         "type_id": int, "shard": int,       # index into "shards"
         "offset": int,               # absolute, in its shard
         "bytes": int, "elements": int, "bits_per_weight": float | null}
      ]
    }

A tensor of unknown type counts with the span up to the next tensor as its bytes (see the reader) and a
null ``bits_per_weight``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

from .container.reader import open_gguf
from .container.values import GGUFValueType
from .ftypes import file_type_name

SCHEMA_VERSION = 1
MAX_ITEMS = 8  # array elements shown by default


def _json_scalar(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return v


def _json_array(typed, max_items: int) -> tuple[list, bool]:
    """(first elements as JSON, truncated?) of a typed ARRAY value."""
    value = typed.value
    if typed.element_type == GGUFValueType.ARRAY:
        items = [
            {"element_type": inner.element_type.name, "count": len(inner.value),
             "value": _json_array(inner, max_items)[0], "truncated": len(inner.value) > max_items}
            for inner in value[:max_items]
        ]
    elif isinstance(value, np.ndarray):
        items = [_json_scalar(v) for v in value[:max_items].tolist()]
    else:
        items = list(value[:max_items])
    return items, len(value) > max_items


def _metadata_rows(f, max_items: int) -> list[dict]:
    md = f.metadata
    rows = []
    for key in md.keys():
        if not md.is_decoded(key):  # a long string array: summarize without decoding it all
            pending = md._pending[key]
            rows.append({"key": key, "type": "ARRAY", "element_type": "STRING", "count": pending.count,
                         "value": f.peek(key, max_items), "truncated": pending.count > max_items})
            continue
        typed = md.typed(key)
        if typed.type == GGUFValueType.ARRAY:
            items, truncated = _json_array(typed, max_items)
            rows.append({"key": key, "type": "ARRAY", "element_type": typed.element_type.name,
                         "count": len(typed.value), "value": items, "truncated": truncated})
        else:
            rows.append({"key": key, "type": typed.type.name, "element_type": None, "count": None,
                         "value": _json_scalar(typed.value), "truncated": False})
    return rows


def _bpw(nbytes, elements):
    return 8.0 * nbytes / elements if elements and nbytes is not None else None


def inspect_file(path, *, tensors: bool = True, metadata: bool = True, split: bool = True,
                 max_items: int = MAX_ITEMS) -> dict:
    """Describe a GGUF file (or split model) as a JSON-ready dict; see the module docstring for the schema.

    >>> info = inspect_file("fixtures/tiny-llama-f16.gguf", metadata=False)     # doctest: +SKIP
    >>> info["file_type"], info["types"][0]["type"]                             # doctest: +SKIP
    ({'id': 1, 'name': 'MOSTLY_F16'}, 'F16')
    """
    with open_gguf(path, split=split) as f:
        md = f.metadata
        shard_index = {p: i for i, p in enumerate(f.shards)}
        per_type: dict[str, dict] = {}
        rows = []
        total_bytes = total_elements = 0
        exact = True
        for t in f.tensors:
            n = t.n_elements
            bpw = t.bits_per_weight
            row = per_type.setdefault(t.type_name, {"type": t.type_name, "count": 0, "elements": 0, "bytes": 0,
                                                    "exact": True})
            row["count"] += 1
            row["elements"] += n
            row["bytes"] += t.nbytes
            row["exact"] &= t.nbytes_exact
            exact &= t.nbytes_exact
            total_bytes += t.nbytes
            total_elements += n
            if tensors:
                rows.append({"name": t.name, "shape": list(t.shape), "type": t.type_name,
                             "type_id": int(t.ggml_type), "shard": shard_index[t.path], "offset": t.offset,
                             "bytes": t.nbytes, "elements": n, "bits_per_weight": bpw})
        types = []
        for row in sorted(per_type.values(), key=lambda r: (-r["bytes"], r["type"])):
            row["share"] = row["bytes"] / total_bytes if total_bytes else 0.0
            row["bits_per_weight"] = _bpw(row["bytes"], row["elements"]) if row.pop("exact") else None
            types.append(row)
        ftype = None
        if "general.file_type" in md and isinstance(md["general.file_type"], int):
            ftype = {"id": md["general.file_type"], "name": file_type_name(md["general.file_type"])}
        arch = md.get("general.architecture")
        name = md.get("general.name")
        out = {
            "schema_version": SCHEMA_VERSION,
            "file": str(path),
            "shards": [str(p) for p in f.shards],
            "file_size": f.total_size,
            "version": f.version,
            "byte_order": "little" if f.byte_order == "<" else "big",
            "alignment": f.alignment,
            "data_offset": f.data_offset,
            "tensor_count": len(f.tensors),
            "kv_count": len(md),
            "architecture": arch if isinstance(arch, str) else None,
            "name": name if isinstance(name, str) else None,
            "file_type": ftype,
            "totals": {"tensors": len(f.tensors), "elements": total_elements, "bytes": total_bytes,
                       "bits_per_weight": _bpw(total_bytes, total_elements) if exact else None},
            "types": types,
        }
        if metadata:
            out["metadata"] = _metadata_rows(f, max_items)
        if tensors:
            out["tensors"] = rows
        return out


# ------------------------------------------------------------------------------------------------------
# text rendering
# ------------------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fmt_item(v: Any, width: int = 60, value_type: str = "") -> str:
    if isinstance(v, str) and value_type not in ("FLOAT32", "FLOAT64"):  # (non-finite floats are "nan"...)
        s = json.dumps(v, ensure_ascii=False)
        return s if len(s) <= width else s[: width - 2] + "…\""
    if isinstance(v, dict):  # an inner array of an array of arrays
        return "(" + _fmt_array(v["element_type"], v["count"], v["value"], v["truncated"], 3) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and value_type == "FLOAT32":
        return str(np.float32(v))  # shortest text that reads back as the same float32
    return str(v)


def _fmt_array(element_type: str, count: int, items: list, truncated: bool, shown: int = 6) -> str:
    parts = [_fmt_item(v, 24, element_type) for v in items[:shown]]
    more = truncated or len(items) > shown
    return f"[{count} × {element_type}] " + ", ".join(parts) + (", …" if more else "")


def format_text(info: dict, *, tensors: bool = False, metadata: bool = False) -> str:
    """The human-readable report of an :func:`inspect_file` result."""
    lines = []
    shards = info["shards"]
    lines.append(f"file          {info['file']}  ({_size(info['file_size'])}"
                 + (f", {len(shards)} shards)" if len(shards) > 1 else ")"))
    lines.append(f"GGUF          v{info['version']}, {info['byte_order']}-endian, alignment {info['alignment']}, "
                 f"data offset {info['data_offset']}")
    lines.append(f"counts        {info['tensor_count']} tensors, {info['kv_count']} metadata keys")
    if info["architecture"] or info["name"]:
        lines.append(f"model         {info['architecture'] or '?'}" + (f"  ({info['name']})" if info["name"] else ""))
    ft = info["file_type"]
    lines.append(f"file type     {ft['name']} ({ft['id']})" if ft else "file type     (general.file_type not set)")
    tot = info["totals"]
    bpw = f", {tot['bits_per_weight']:.2f} bits per weight" if tot["bits_per_weight"] else ""
    lines.append(f"weights       {tot['elements']:,} elements in {_size(tot['bytes'])}{bpw}")
    if info["types"]:
        lines.append("")
        tw = max([12] + [len(r["type"]) for r in info["types"]])
        lines.append(f"{'type':<{tw}} {'tensors':>7} {'elements':>15} {'bytes':>14} {'share':>7} {'bpw':>7}")
        for r in info["types"]:
            b = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] is not None else "?"
            lines.append(f"{r['type']:<{tw}} {r['count']:>7} {r['elements']:>15,} {r['bytes']:>14,} "
                         f"{100 * r['share']:>6.1f}% {b:>7}")
    if metadata and "metadata" in info:
        lines.append("")
        width = max((len(r["key"]) for r in info["metadata"]), default=0)
        for r in info["metadata"]:
            if r["type"] == "ARRAY":
                text = _fmt_array(r["element_type"], r["count"], r["value"], r["truncated"])
                lines.append(f"{r['key']:<{width}}  {text}")
            else:
                lines.append(f"{r['key']:<{width}}  {r['type']:<7} {_fmt_item(r['value'], 100, r['type'])}")
    if tensors and "tensors" in info:
        lines.append("")
        rows = info["tensors"]
        width = max([4] + [len(r["name"]) for r in rows])
        tw = max([6] + [len(r["type"]) for r in rows])
        lines.append(f"{'name':<{width}}  {'shape':<22} {'type':<{tw}} {'bytes':>13} {'bpw':>7}"
                     + ("  shard" if len(shards) > 1 else ""))
        for r in rows:
            b = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] is not None else "?"
            shape = "×".join(str(d) for d in r["shape"]) or "scalar"
            lines.append(f"{r['name']:<{width}}  {shape:<22} {r['type']:<{tw}} {r['bytes']:>13,} {b:>7}"
                         + (f"  {r['shard'] + 1}" if len(shards) > 1 else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# CLI glue
# ------------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("file", help="GGUF file (the first shard of a split model)")
    parser.add_argument("--tensors", action="store_true", help="show the tensor table")
    parser.add_argument("--metadata", action="store_true", help="show all metadata keys")
    parser.add_argument("--json", action="store_true", help="print everything as JSON (schema in the docs)")
    parser.add_argument("--max-items", type=int, default=MAX_ITEMS, metavar="N",
                        help=f"array elements shown per key (default {MAX_ITEMS})")
    parser.add_argument("--no-split", action="store_true",
                        help="read only this file, even if it is a shard of a split model")


def run(args) -> int:
    want_all = args.json
    try:
        info = inspect_file(args.file, tensors=want_all or args.tensors, metadata=want_all or args.metadata,
                            split=not args.no_split, max_items=max(args.max_items, 0))
    except OSError as exc:  # missing file, a directory...: not a GGUF error, but no traceback either
        print(f"gguf-kquant inspect: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(info, indent=1, ensure_ascii=False) if args.json else format_text(
        info, tensors=args.tensors, metadata=args.metadata)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `gguf-kquant inspect ... | head`: silence the flush at exit (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
