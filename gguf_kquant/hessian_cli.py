"""``gguf-kquant hessian MODEL -f TEXT -o OUT``: full input covariances of a model's weights, for GPTQ-style
quantization, collected by running the model with llama.cpp (needs ``pip install llama-cpp-python``).

    gguf-kquant hessian model-f16.gguf -f calibration.txt -o model.hessian.gguf
    gguf-kquant hessian model-f16.gguf -f wiki.txt -o h.gguf -c 512 --chunks 100 --threads 8
    gguf-kquant hessian model-f16.gguf -f wiki.txt -o h.gguf --max-memory 8G   # passes over the text
    gguf-kquant hessian --factorise old.hessian.gguf -o h.gguf                   # a file of earlier versions

The text is cut into chunks of ``-c`` tokens as llama-imatrix does (each starts with BOS); the file holds
one matrix ``H = sum x x^T`` per distinct weight input, as the factor error feedback works with and H's
diagonal (``--no-factor``: H itself; see :mod:`gguf_kquant.model.hessian`).
"""

from __future__ import annotations

import sys

from .errors import InvalidArgumentError
from .model.hessian import DEFAULT_MAX_N_IN, collect_hessians, factorise_hessians


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", help="GGUF model to run (preferably unquantized: F16/BF16/F32)")
    parser.add_argument("-f", "--file", metavar="TEXT", help="calibration text file")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="Hessian GGUF file to write")
    parser.add_argument("-c", "--ctx", type=int, default=512, metavar="N",
                        help="tokens per chunk, as llama-imatrix's -c (default 512)")
    parser.add_argument("--chunks", type=int, default=None, metavar="N", help="evaluate at most N chunks")
    parser.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                        help="llama.cpp threads (default: all cores)")
    parser.add_argument("--max-n-in", type=int, default=DEFAULT_MAX_N_IN, metavar="N",
                        help=f"skip weights whose input is wider (H is N^2 doubles; default {DEFAULT_MAX_N_IN})")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="memory the matrices may take, e.g. 8G or 500M (default: half the available memory); "
                             "when they do not fit, the text is evaluated again for the rest (same file)")
    parser.add_argument("--no-factor", dest="factor", action="store_false",
                        help="store each H itself, not its factor for error feedback (quantizing then factorises "
                             "every matrix again)")
    parser.add_argument("--factorise", metavar="HESSIANS",
                        help="collect nothing: write OUT from a Hessian file holding the matrices themselves (earlier "
                             "versions, --no-factor), each factorised, as a collection writes it now")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def run(args) -> int:
    if args.factorise is not None:
        if args.model is not None or args.file is not None:
            raise InvalidArgumentError("--factorise converts a Hessian file: give no model and no -f TEXT")
        factorise_hessians(args.factorise, args.output, overwrite=args.overwrite, quiet=args.quiet, stream=sys.stderr)
        return 0
    if args.model is None or args.file is None:
        raise InvalidArgumentError("give the MODEL to run and its calibration text (-f TEXT)")
    collect_hessians(args.model, args.file, args.output, ctx=args.ctx, chunks=args.chunks, threads=args.threads,
                     overwrite=args.overwrite, quiet=args.quiet, stream=sys.stderr, max_n_in=args.max_n_in,
                     max_memory=args.max_memory, factor=args.factor)
    return 0
