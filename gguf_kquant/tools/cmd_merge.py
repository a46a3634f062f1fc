"""``gguf-kquant merge`` (see :mod:`gguf_kquant.tools.cli`)."""

from .cli import _merge_arguments as add_arguments, _merge_run as run

__all__ = ["add_arguments", "run"]
