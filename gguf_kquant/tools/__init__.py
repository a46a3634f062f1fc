"""File tools over the reader and writer: edit metadata, split and merge, compare two files.

Each is a library function first (:func:`edit`, :func:`split`, :func:`merge`, :func:`diff`) and a thin
``gguf-kquant`` sub-command over it (:mod:`gguf_kquant.tools.cli`).
"""

from .diff import diff
from .edit import edit, parse_set
from .split_merge import merge, split

__all__ = ["edit", "parse_set", "split", "merge", "diff"]
