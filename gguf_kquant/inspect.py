"""``gguf-kquant inspect``: a GGUF file's header, metadata, tensors and file type — as text or JSON.

    gguf-kquant inspect model.gguf               # header + summary (tensor bytes per type, file type)
    gguf-kquant inspect model.gguf --metadata    # + every key (long arrays summarized)
    gguf-kquant inspect model.gguf --tensors     # + the tensor table
    gguf-kquant inspect model.gguf --json        # everything, as JSON (schema below)
    gguf-kquant inspect model.gguf --json --full # ... with whole arrays (the full vocabulary)
    gguf-kquant inspect model.gguf --markdown    # the markdown report of gguf-py's ``gguf-dump --markdown``

The library function :func:`inspect_file` returns the same data as a ``dict``.  It never decodes a whole
262,144-token vocabulary: long arrays are summarized by their first elements (``max_items=None``, the
CLI's ``--full``, gives whole arrays).

:func:`format_markdown` gives the text of ``python -m gguf.scripts.gguf_dump --markdown`` for the same file
(same sections, tables, column widths and value renderings), read with our reader: a 262k-token vocabulary
takes milliseconds instead of gguf-py's ~12 s, and only the first 5 strings of an array are decoded.
Differences: the tables describe only the first file of a split model (as gguf-dump, which reads one file);
an array of arrays whose first inner array is empty is typed ``[[T]]`` with that inner array's declared
element type (gguf-py, which records no type for empty arrays, prints ``[ARRAY]``).

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
import re
import sys
from typing import Any, Optional

import numpy as np

from .container.reader import open_gguf
from .container.values import SCALAR_DTYPES, GGUFValueType
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


def _json_array(typed, max_items: Optional[int]) -> tuple[list, bool]:
    """(first elements as JSON, truncated?) of a typed ARRAY value (``max_items=None``: all of them)."""
    value = typed.value
    limit = len(value) if max_items is None else max_items
    if typed.element_type == GGUFValueType.ARRAY:
        items = []
        for inner in value[:limit]:
            inner_items, inner_truncated = _json_array(inner, max_items)
            items.append({"element_type": inner.element_type.name, "count": len(inner.value),
                          "value": inner_items, "truncated": inner_truncated})
    elif isinstance(value, np.ndarray):
        items = [_json_scalar(v) for v in value[:limit].tolist()]
    else:
        items = list(value[:limit])
    return items, len(value) > limit


def _metadata_rows(f, max_items: Optional[int]) -> list[dict]:
    md = f.metadata
    rows = []
    for key in md.keys():
        if max_items is not None and not md.is_decoded(key):  # a long string array: summarize, not decode
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
                 max_items: Optional[int] = MAX_ITEMS) -> dict:
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


def format_text(info: dict, *, tensors: bool = False, metadata: bool = False, full: bool = False) -> str:
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
                text = _fmt_array(r["element_type"], r["count"], r["value"], r["truncated"],
                                  len(r["value"]) if full else 6)
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
# markdown: gguf-py's ``gguf-dump --markdown`` (gguf/scripts/gguf_dump.py: dump_markdown_metadata), from our reader
# ------------------------------------------------------------------------------------------------------
def _md_code(text: str) -> str:
    """escape_markdown_inline_code: fence with one backtick more than the longest run inside."""
    ticks = "`" * (max((len(m.group(0)) for m in re.finditer(r"`+", text)), default=0) + 1)
    if text.startswith("`") or text.endswith("`"):
        text = f" {text} "
    return f"{ticks}{text}{ticks}"


def _md_string(text: str, limit: int) -> str:
    if len(text) > limit:
        return f"{_md_code(text[:limit // 2])}...{_md_code(text[-limit // 2:])}"
    return _md_code(text)


def _md_number(vt: GGUFValueType, v) -> str:
    """str() of the numpy scalar gguf-py's reader holds (np.bool_ for BOOL)."""
    if vt == GGUFValueType.BOOL:
        return str(bool(v))
    return str(SCALAR_DTYPES[vt].type(v))


def _md_kv_rows(f) -> list[dict]:
    """gguf-py's fields: its three header pseudo-keys, then the file's keys in order."""
    md = f.metadata
    rows = [("GGUF.version", "UINT32", 1, str(f.version)),
            ("GGUF.tensor_count", "UINT64", 1, str(len(f.tensors))),  # f is one file (split=False)
            ("GGUF.kv_count", "UINT64", 1, str(len(md)))]
    for key in md.keys():
        if not md.is_decoded(key):  # a long string array: its first 5 strings only
            count = md._pending[key].count
            items = [_md_string(x, 30) for x in f.peek(key, min(5, count))]
            rows.append((key, "[STRING]", count, _md_list(items, count)))
            continue
        typed = md.typed(key)
        vt = typed.type
        if vt == GGUFValueType.STRING:
            rows.append((key, "STRING", 1, _md_string(typed.value, 60)))
        elif vt != GGUFValueType.ARRAY:
            rows.append((key, vt.name, 1, _md_number(vt, typed.value)))
        elif not len(typed.value):  # gguf-py records no element type for an empty array
            rows.append((key, "ARRAY", 0, ""))
        else:
            et, value = typed.element_type, typed.value
            depth, inner = 1, typed
            while inner.element_type == GGUFValueType.ARRAY and len(inner.value):
                depth, inner = depth + 1, inner.value[0]
            pretty = "[" * depth + inner.element_type.name + "]" * depth
            count = len(value)
            if et == GGUFValueType.STRING:
                items = [_md_string(x, 30) for x in value[:5]]
            elif et == GGUFValueType.ARRAY:
                items, count = [], _leaves(typed)  # gguf-dump renders none and counts the innermost elements
            else:
                items = [_md_number(et, x) for x in value[:7]]
            rows.append((key, pretty, count, _md_list(items, count)))
    return [{"n": n, "pretty_type": t, "total_elements": c, "field_name": k, "value": v}
            for n, (k, t, c, v) in enumerate(rows, 1)]


def _leaves(typed) -> int:
    if typed.element_type != GGUFValueType.ARRAY:
        return len(typed.value)
    return sum(_leaves(v) for v in typed.value)


def _md_list(items: list, count: int) -> str:
    return f'[ {", ".join(items).strip()}{", ..." if count > len(items) else ""} ]'


def format_markdown(path, title=None) -> str:
    """The markdown report of ``python -m gguf.scripts.gguf_dump --markdown PATH`` (see the module docstring)."""
    from gguf.scripts.gguf_dump import (element_count_rounded_notation as rounded,
                                        markdown_table_with_alignment_support as table,
                                        translate_tensor_name as human)

    title = os.fspath(path) if title is None else title
    with open_gguf(path, split=False) as f:
        out = [f"# {title} - GGUF Internal File Dump\n\n",
               f"- Endian: {'LITTLE' if f.byte_order == '<' else 'BIG'} endian\n\n",
               "## Key Value Metadata Store\n\n"]
        kv = _md_kv_rows(f)
        out.append(f"There are {len(kv)} key-value pairs in this file\n\n")
        out.append(table([{"key_name": "n", "header_name": "POS", "align": "right"},
                          {"key_name": "pretty_type", "header_name": "TYPE", "align": "left"},
                          {"key_name": "total_elements", "header_name": "Count", "align": "right"},
                          {"key_name": "field_name", "header_name": "Key", "align": "left"},
                          {"key_name": "value", "header_name": "Value", "align": "left"}], kv))
        out.append("\n")
        tensors = list(f.tensors)
        total_bytes = sum(t.nbytes for t in tensors)
        total_elements = sum(t.n_elements for t in tensors)
        out.append(_md_tensors(tensors, rounded, table, human))
    basename = os.path.basename(title)
    if total_elements:
        out.append(f"Total BPW for {basename}: {total_bytes * 8 / total_elements:.4f} bits")
    else:
        out.append(f"Total BPW for {basename}: undefined (no elements)")
    return "".join(out)


def _md_group(name: str) -> str:
    c = name.split(".")
    if c[0] == "blk":
        return f"{c[0]}.{c[1]}"
    if c[0] in ("enc", "dec") and len(c) > 1 and c[1] == "blk":
        return ".".join(c[:3])
    return c[0] if c[0] in ("enc", "dec") else "base"


def _md_tensors(tensors, rounded, table, human) -> str:
    groups: dict[str, list] = {}
    index = {}
    for i, t in enumerate(tensors):
        groups.setdefault(_md_group(t.name), []).append(t)
        index[t.name] = i
    total = sum(t.n_elements for t in tensors)
    out = [f"## Tensors Overview {rounded(total)} Elements\n\n",
           f"Total number of elements in all tensors: {total} Elements\n\n"]
    for g, ts in groups.items():
        out.append(f"- [{human(g)} Tensor Group - {rounded(sum(t.n_elements for t in ts))} Elements]"
                   f"(#{g.replace('.', '_')})\n")
    out.append("\n### Tensor Data Offset\n\nThis table contains the offset and data segment relative to start "
               "of file\n\n")
    out.append(table([{"key_name": "t_id", "header_name": "T_ID", "align": "right"},
                      {"key_name": "layer_name", "header_name": "Tensor Layer Name", "align": "left"},
                      {"key_name": "data_offset", "header_name": "Data Offset (B)", "align": "right"},
                      {"key_name": "data_size", "header_name": "Data Size (B)", "align": "right"}],
                     [{"t_id": i, "layer_name": t.name, "data_offset": f"{t.offset:#16x}",
                       "data_size": f"{t.nbytes:#16x}"} for i, t in enumerate(tensors)]))
    out.append("\n")
    for g, ts in groups.items():
        n_el = sum(t.n_elements for t in ts)
        n_bytes = sum(t.nbytes for t in ts)
        out.append(f"### <a name=\"{g.replace('.', '_')}\">{human(g)} Tensor Group : {rounded(n_el)} Elements</a>\n\n")
        dims = [list(t.shape[::-1]) + [1] * (4 - len(t.shape)) for t in ts]  # ggml's ne order, 4 dims
        est_w = max([1] + [len(rounded(t.n_elements)) for t in ts])
        cnt_w = max([1] + [len(str(t.n_elements)) for t in ts])
        dim_w = [max([1] + [len(str(d[i])) for d in dims]) for i in range(4)]
        rows = []
        for t, d in zip(ts, dims):
            bpw = t.nbytes * 8 / t.n_elements if t.n_elements > 0 else float("nan")
            rows.append({"t_id": index[t.name], "layer_name": t.name,
                         "human_layer_name": human(t.name.replace(".weight", ".(W)").replace(".bias", ".(B)")),
                         "element_count": f"({rounded(t.n_elements):>{est_w}}) {t.n_elements:>{cnt_w}}",
                         "pretty_dimension": " x ".join(f"{str(x):>{dim_w[i]}}" for i, x in enumerate(d)),
                         "tensor_type": t.type_name, "bpw": f"{bpw:.4f}"})
        out.append(table([{"key_name": "t_id", "header_name": "T_ID", "align": "right"},
                          {"key_name": "layer_name", "header_name": "Tensor Layer Name", "align": "left"},
                          {"key_name": "human_layer_name", "header_name": "Human Friendly Tensor Layer Name",
                           "align": "left"},
                          {"key_name": "element_count", "header_name": "Elements", "align": "left"},
                          {"key_name": "pretty_dimension", "header_name": "Shape", "align": "left"},
                          {"key_name": "tensor_type", "header_name": "Type", "align": "left"},
                          {"key_name": "bpw", "header_name": "BPW", "align": "right"}], rows))
        out.append("\n")
        out.append(f"- Total elements in {g}: ({rounded(n_el):>4}) {n_el}\n")
        out.append(f"- Percentage of total elements: {n_el / total * 100:.2f}%\n")
        if n_el > 0:
            out.append(f"- Bits per Weight (BPW) for {g}: {n_bytes * 8 / n_el:.4f} bits\n")
        else:
            out.append(f"- Bits per Weight (BPW) for {g}: undefined (no elements)\n")
        out.append("\n\n")
    return "".join(out)


# ------------------------------------------------------------------------------------------------------
# CLI glue
# ------------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("file", help="GGUF file (the first shard of a split model)")
    parser.add_argument("--tensors", action="store_true", help="show the tensor table")
    parser.add_argument("--metadata", action="store_true", help="show all metadata keys")
    parser.add_argument("--json", action="store_true", help="print everything as JSON (schema in the docs)")
    parser.add_argument("--full", action="store_true", help="whole arrays (JSON and --metadata), not the first items")
    parser.add_argument("--markdown", action="store_true",
                        help="the markdown report of gguf-py's gguf-dump --markdown (first file only)")
    parser.add_argument("--max-items", type=int, default=MAX_ITEMS, metavar="N",
                        help=f"array elements shown per key (default {MAX_ITEMS})")
    parser.add_argument("--no-split", action="store_true",
                        help="read only this file, even if it is a shard of a split model")


def run(args) -> int:
    want_all = args.json
    if args.json and args.markdown:
        print("gguf-kquant inspect: error: --json and --markdown cannot be used together", file=sys.stderr)
        return 2
    try:
        if args.markdown:
            text = format_markdown(args.file)
        else:
            info = inspect_file(args.file, tensors=want_all or args.tensors, metadata=want_all or args.metadata,
                                split=not args.no_split, max_items=None if args.full else max(args.max_items, 0))
    except OSError as exc:  # missing file, a directory...: not a GGUF error, but no traceback either
        print(f"gguf-kquant inspect: error: {exc}", file=sys.stderr)
        return 1
    if not args.markdown:
        text = json.dumps(info, indent=1, ensure_ascii=False) if args.json else format_text(
            info, tensors=args.tensors, metadata=args.metadata, full=args.full)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `gguf-kquant inspect ... | head`: silence the flush at exit (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
