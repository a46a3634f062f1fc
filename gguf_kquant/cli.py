"""``gguf-kquant`` command line: argument parsing and printing only; behaviour lives in the library.

Each sub-command module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import os
import re
import sys

from .errors import GGUFError

# sub-command -> (module, one-line help)
COMMANDS = {
    "inspect": ("gguf_kquant.inspect", "show a GGUF file's header, metadata, tensors and file type"),
    "quantize": ("gguf_kquant.model.cli", "quantize a whole GGUF model like llama-quantize"),
    "convert": ("gguf_kquant.convert.cli", "convert a Hugging Face checkpoint to GGUF"),
    "convert-lora": ("gguf_kquant.convert.lora_cli", "convert a PEFT LoRA adapter to a GGUF LoRA adapter"),
    "edit": ("gguf_kquant.tools.cmd_edit", "edit a GGUF file's metadata (set, delete, rename keys; chat template)"),
    "split": ("gguf_kquant.tools.cmd_split", "split a GGUF model into shards like llama-gguf-split --split"),
    "merge": ("gguf_kquant.tools.cmd_merge", "merge a split GGUF model like llama-gguf-split --merge"),
    "diff": ("gguf_kquant.tools.cmd_diff", "compare two GGUF files: metadata, tensors and their errors"),
    "imatrix": ("gguf_kquant.imatrix_cli", "convert importance matrices between legacy .dat and GGUF"),
    "hessian": ("gguf_kquant.hessian_cli", "collect each weight's full input covariance (an imatrix for error "
                "feedback) by running the model in llama.cpp"),
    "precompile": ("gguf_kquant.precompile", "compile the codec kernels of some types (or --all) into Numba's cache"),
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


class _ClosedStream(io.TextIOBase):
    """Stands in for a standard stream whose descriptor was closed (``cmd >&-``): writing fails with EBADF,
    which ``main`` reports in one line, like any other I/O error."""

    def __init__(self, name: str):
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        raise OSError(errno.EBADF, f"cannot write to standard {self.name}: it is closed")

    def flush(self) -> None:
        pass


def _sane_std_streams() -> None:
    """No traceback for streams that are closed or cannot encode what we print (PYTHONIOENCODING=latin-1)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, _ClosedStream("output" if name == "stdout" else "error"))
        elif isinstance(stream, io.TextIOWrapper):
            try:
                stream.reconfigure(errors="backslashreplace")  # keep the user's encoding, escape the rest
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot be reconfigured
                pass


# the library's argument names that its errors mention, as this command line spells them: a name, or names
# joined by "/", standing alone (not inside a path)
_NAMES = (r"(?:include_weights|exclude_weights|keep_split|split_max_size|split_max_tensors|allow_requantize|"
          r"target_bpw|target_size|max_memory|max_n_in)")
_FLAGS = re.compile(rf"(?<![\w/.\\-]){_NAMES}(?:/{_NAMES})*(?![\w/.\\-])")
_GIVE_IMATRIX = re.compile(r"\bgive an imatrix\b|\bneeds? an imatrix\b")


def _in_flags(message: str) -> str:
    """A library error in command-line words: ``allow_requantize`` -> ``--allow-requantize``, and "needs an
    imatrix" says which option gives one."""
    message = _FLAGS.sub(lambda m: "/".join("--" + n.replace("_", "-") for n in m.group(0).split("/")), message)
    return _GIVE_IMATRIX.sub(lambda m: m.group(0) + " (--imatrix)", message)


def _report(command: str, exc: BaseException) -> None:
    try:
        print(f"gguf-kquant {command}: error: {_in_flags(str(exc))}", file=sys.stderr)
    except (OSError, ValueError):  # stderr is closed too: the exit status says it
        pass


def main(argv=None) -> int:
    _sane_std_streams()
    args = build_parser().parse_args(argv)
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `gguf-kquant inspect ... | head`: silence the flush at exit (Python docs' recipe)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 141  # what a shell reports for a command killed by SIGPIPE
    except GGUFError as exc:
        _report(args.command, exc)
        return 1
    except OSError as exc:  # missing file, permission, disk full, closed stdout: one line, no traceback
        _report(args.command, exc)
        return 1
    except KeyboardInterrupt:
        _report(args.command, "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
