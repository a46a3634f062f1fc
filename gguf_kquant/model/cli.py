"""``gguf-kquant quantize SRC DST MIX [options]`` — wiring only; the work is in :mod:`.quantize`."""

from __future__ import annotations

import sys

from ..errors import QuantizeError
from .mixes import mix_names

_ANY_TYPE = ("any type ggml can write, case-insensitive (f32, f16, bf16, q4_0 ... q8_0, q2_k ... q6_k, iq1_s ... "
             "iq4_xs, tq1_0, tq2_0, mxfp4, nvfp4, q1_0, q2_0)")


def add_arguments(p) -> None:
    p.add_argument("src", help="input GGUF model (F32/F16/BF16, or quantized with --allow-requantize)")
    p.add_argument("dst", nargs="?", help="output GGUF path (with --keep-split: the shard prefix)")
    p.add_argument("ftype", metavar="MIX", nargs="?",
                   help=f"llama-quantize file type, case-insensitive: {', '.join(mix_names())} "
                        "(Q3_K/Q4_K/Q5_K are Q3_K_M/Q4_K_M/Q5_K_M; COPY copies every tensor as it is; the IQ1/IQ2 "
                        "mixes need --imatrix)")
    p.add_argument("--out", action="append", default=[], metavar="MIX=PATH",
                   help="instead of DST MIX: one output of several written in one pass (repeatable; each tensor "
                        "is read once and quantized once per distinct type)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama-imatrix GGUF or legacy .dat)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--include-weights", action="append", default=[], metavar="NAME",
                   help="use the imatrix only for tensors whose name contains NAME (repeatable)")
    g.add_argument("--exclude-weights", action="append", default=[], metavar="NAME",
                   help="do not use the imatrix for tensors whose name contains NAME (repeatable)")
    p.add_argument("--output-tensor-type", metavar="TYPE", help=f"type for output.weight: {_ANY_TYPE}")
    p.add_argument("--token-embedding-type", metavar="TYPE", help=f"type for token_embd.weight: {_ANY_TYPE}")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="quantize tensors matching REGEX to TYPE (repeatable; first match wins; TYPE as above)")
    p.add_argument("--pure", action="store_true", help="no mix rules: every tensor gets the default type")
    p.add_argument("--leave-output-tensor", action="store_true", help="leave output.weight as it is")
    p.add_argument("--allow-requantize", action="store_true", help="allow requantizing quantized tensors")
    p.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="set metadata in the output; TYPE is int, float, bool or str (repeatable)")
    p.add_argument("--keep-split", action="store_true", help="write one output shard per input shard")
    p.add_argument("--split-max-size", metavar="N[M|G]", help="split the output into shards of at most N bytes")
    p.add_argument("--split-max-tensors", type=int, metavar="N", help="split the output every N tensors")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="codec threads (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensor -> type, sizes) only")
    p.add_argument("--report", metavar="FILE.json", help="write per-tensor RMSE / max error / cosine")
    p.add_argument("--overwrite", action="store_true", help="replace DST (and the report) if they exist")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--method", choices=("llama", "optimized"), default="llama",
                   help="llama: llama-quantize's bytes (default); optimized: same types and size, block "
                        "parameters of lower imatrix-weighted error (needs --imatrix)")
    # size-budget mode (gguf_kquant.model.budget): no MIX; each tensor's type chosen to fit the size
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-bpw", type=float, metavar="X",
                   help="instead of MIX: the file (header included) at most X bits per weight, each tensor's "
                        "type chosen for the least predicted error (needs --imatrix; --dry-run shows the choice)")
    g.add_argument("--target-size", metavar="N[M|G]", help="like --target-bpw, a file of at most N bytes")
    p.add_argument("--dask", metavar="SCHEDULER_ADDRESS",  # dask (issue 12): gguf_kquant.model.distributed
                   help="run the work on a Dask cluster (e.g. tcp://host:8786) whose workers share SRC's and DST's "
                        "file system; the output is the same bytes (needs dask[distributed])")


def _outputs(specs) -> dict:
    """``["Q4_K_M=m-q4.gguf", ...]`` -> ``{"m-q4.gguf": "Q4_K_M", ...}``."""
    outputs = {}
    for spec in specs:
        mix, sep, path = spec.partition("=")
        if not sep or not mix or not path:
            raise QuantizeError(f"--out {spec!r}: expected MIX=PATH, e.g. --out Q4_K_M=model-Q4_K_M.gguf")
        if path in outputs:
            raise QuantizeError(f"--out {spec!r}: {path} is already an output")
        outputs[path] = mix
    return outputs


def run(args) -> int:
    from .quantize import quantize_model
    from .report import worst

    report = args.report
    dst, ftype = args.dst, args.ftype
    if args.out:
        if dst is not None:
            raise QuantizeError("give either DST MIX or --out MIX=PATH options, not both")
        if report:
            raise QuantizeError("--report works with one output (DST MIX); with several, use the Python API's "
                                "report={dst: path}")
        dst, ftype = _outputs(args.out), None
    elif dst is None or (ftype is None and args.target_bpw is None and args.target_size is None):
        raise QuantizeError("give DST and MIX, or --out MIX=PATH (repeatable)")
    budget = {} if args.target_bpw is None and args.target_size is None else {  # size-budget mode
        "target_bpw": args.target_bpw, "target_size": args.target_size}
    result = quantize_model(
        args.src, dst, ftype, imatrix=args.imatrix, include_weights=args.include_weights,
        exclude_weights=args.exclude_weights, output_tensor_type=args.output_tensor_type,
        token_embedding_type=args.token_embedding_type, tensor_types=args.tensor_type, pure=args.pure,
        leave_output_tensor=args.leave_output_tensor, allow_requantize=args.allow_requantize,
        override_kv=args.override_kv, keep_split=args.keep_split, split_max_size=args.split_max_size,
        split_max_tensors=args.split_max_tensors, threads=args.threads,
        dry_run=args.dry_run, report=report, overwrite=args.overwrite, quiet=args.quiet and not args.dry_run,
        stream=sys.stdout if args.dry_run else sys.stderr, method=args.method, **budget,
        client=args.dask)  # dask (issue 12)
    if report and not args.quiet and result.report:
        print(f"worst tensors (report in {report}):")
        for s in worst(result.report):
            print(f"  {s['name']:<36s} {s['type']:<6s} cosine {s['cosine']:.6f}  rmse {s['rmse']:.3g}  "
                  f"max abs {s['max_abs_error']:.3g}")
    return 0
