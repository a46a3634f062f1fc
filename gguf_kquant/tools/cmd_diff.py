"""``gguf-kquant diff`` (see :mod:`gguf_kquant.tools.cli`)."""

from .cli import _diff_arguments as add_arguments, _diff_run as run

__all__ = ["add_arguments", "run"]
