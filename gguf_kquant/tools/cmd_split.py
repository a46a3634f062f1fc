"""``gguf-kquant split`` (see :mod:`gguf_kquant.tools.cli`)."""

from .cli import _split_arguments as add_arguments, _split_run as run

__all__ = ["add_arguments", "run"]
