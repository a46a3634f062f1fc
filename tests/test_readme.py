"""The README's generated parts agree with the code they describe."""

from __future__ import annotations

from pathlib import Path

from gguf_kquant.convert.archs.__main__ import architecture_table
from gguf_kquant.model.mixes import NAMES
from gguf_kquant.types import TYPES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_architecture_table_is_the_registry():
    assert architecture_table() in README, "run `python -m gguf_kquant.convert.archs` and paste its table"


def test_every_type_and_file_type_is_listed():
    types_section = README[README.index("## Types and file types"):README.index("## inspect --json schema")]
    for row in TYPES.values():
        assert f"| {row.name} " in types_section or f" {row.name} " in types_section, row.name
        if row.is_quantized:
            assert f"| {row.block_size} | {row.type_size} | {row.bits_per_weight:g} |" in types_section, row.name
    for name in NAMES:
        assert f"| {name} " in types_section or f"({name})" in types_section, name
