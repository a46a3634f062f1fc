"""``gguf-kquant`` command line: argument parsing and printing only; behaviour lives in the library.

Each sub-command module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GGUFError

# sub-command -> (module, one-line help)
COMMANDS = {
    "inspect": ("gguf_kquant.inspect", "show a GGUF file's header, metadata, tensors and file type"),
    "quantize": ("gguf_kquant.model.cli", "quantize a whole GGUF model like llama-quantize"),
    "convert": ("gguf_kquant.convert.cli", "convert a Hugging Face checkpoint to GGUF"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gguf-kquant", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gguf-kquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # sub-command not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except GGUFError as exc:
        print(f"gguf-kquant {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # missing file, permission, disk full: say which file, no traceback
        print(f"gguf-kquant {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
