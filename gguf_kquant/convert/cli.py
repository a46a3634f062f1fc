"""``gguf-kquant convert MODEL_DIR DST [--type T]`` — wiring only; the work is in :func:`convert_hf`."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("model_dir", help="Hugging Face model directory (config.json, tokenizer, *.safetensors)")
    p.add_argument("dst", help="output GGUF path (with --split-max-size: the shard prefix)")
    p.add_argument("--type", "--outtype", dest="ftype", default="F16", metavar="TYPE",
                   help="F32, F16 (default), BF16, Q8_0, or a llama-quantize mix (Q4_K_M, Q6_K, ...)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix for the k-quant mixes")
    p.add_argument("--split-max-size", metavar="N[M|G]", help="split the output into shards of at most N bytes")
    p.add_argument("--pre-tokenizer", metavar="NAME",
                   help="tokenizer.ggml.pre to write when llama.cpp's hash table does not know the tokenizer")
    p.add_argument("--model-name", metavar="NAME", help="general.name (default: from the directory)")
    p.add_argument("--vocab-only", action="store_true", help="write the metadata and vocabulary only, no tensors")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--method", choices=("llama", "optimized"), default="llama",
                   help="for a mix: llama (convert_hf_to_gguf.py + llama-quantize's bytes, default) or optimized "
                        "(same types and size, block parameters of lower imatrix-weighted error; needs --imatrix)")
    p.add_argument("--dask", metavar="SCHEDULER_ADDRESS",  # dask (issue 12): gguf_kquant.model.distributed
                   help="make and write the tensors on a Dask cluster (e.g. tcp://host:8786) whose workers share "
                        "MODEL_DIR's and DST's file system; the output is the same bytes (needs dask[distributed])")


def run(args) -> int:
    from . import convert_hf

    paths = convert_hf(args.model_dir, args.dst, args.ftype, imatrix=args.imatrix,
                       split_max_size=args.split_max_size, overwrite=args.overwrite, quiet=args.quiet,
                       model_name=args.model_name, pre_tokenizer=args.pre_tokenizer, vocab_only=args.vocab_only,
                       client=args.dask, method=args.method)
    if not args.quiet:
        for p in paths:
            print(p)
    return 0
