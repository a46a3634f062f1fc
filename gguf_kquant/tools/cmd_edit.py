"""``gguf-kquant edit`` (see :mod:`gguf_kquant.tools.cli`)."""

from .cli import _edit_arguments as add_arguments, _edit_run as run

__all__ = ["add_arguments", "run"]
