"""Split models in gguf-split's format: shard file names and the ``split.*`` keys (llama.cpp's llama_split_path)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# Keys every shard carries (gguf-split.cpp / llama.h LLM_KV_SPLIT_*).
KEY_SPLIT_NO = "split.no"  # u16, 0-based shard index
KEY_SPLIT_COUNT = "split.count"  # u16, number of shards
KEY_SPLIT_TENSORS_COUNT = "split.tensors.count"  # i32, tensors in the whole model

_SHARD_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_path(prefix, index: int, count: int) -> Path:
    """Path of shard ``index`` (0-based) of ``count``: ``{prefix}-{index+1:05d}-of-{count:05d}.gguf``.

    >>> str(shard_path("model", 0, 3))
    'model-00001-of-00003.gguf'
    """
    return Path(f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf")


def parse_shard_path(path) -> Optional[tuple[str, int, int]]:
    """``(prefix, index, count)`` of a shard file name, 0-based index; None if the name is not a shard's."""
    m = _SHARD_RE.match(str(path))
    if not m:
        return None
    return m.group("prefix"), int(m.group("no")) - 1, int(m.group("count"))
