"""``gguf-kquant imatrix convert IN OUT``: an importance matrix from one of llama-imatrix's formats to the other.

    gguf-kquant imatrix convert imatrix.dat imatrix.gguf          # legacy -> GGUF
    gguf-kquant imatrix convert imatrix.gguf imatrix.dat          # GGUF -> legacy (format from the suffix)
    gguf-kquant imatrix convert a.gguf b --output-format dat -c 512

The output is what ``llama-imatrix --in-file IN -o OUT [--output-format dat] -c N`` writes (no prompt:
the matrices are only loaded and saved); ``-c`` is llama-imatrix's context size, which it records as the
chunk size and uses to turn a legacy file's ``mean * ncall`` back into sums and counts.
"""

from __future__ import annotations

from .model.imatrix import DEFAULT_CHUNK_SIZE, convert_imatrix


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="imatrix_command", required=True)
    p = sub.add_parser("convert", help="convert between legacy .dat and GGUF imatrix files, as llama-imatrix")
    p.add_argument("src", help="imatrix file (GGUF or legacy .dat)")
    p.add_argument("dst", help="output file")
    p.add_argument("--output-format", choices=("gguf", "dat"), default=None,
                   help="default: dat if DST ends in .dat, else gguf (llama-imatrix's --output-format)")
    p.add_argument("-c", "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="N",
                   help=f"llama-imatrix's context size (-c), the chunk size it records (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def run(args) -> int:
    fmt = convert_imatrix(args.src, args.dst, fmt=args.output_format, chunk_size=args.chunk_size,
                          overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {args.dst} ({fmt})")
    return 0
