"""Print the README's table of supported architectures from the registry: ``python -m gguf_kquant.convert.archs``.

tests/test_readme.py checks that the README holds exactly this table, so it cannot drift from the code.
"""

from __future__ import annotations

from ..base import REGISTRY


def architecture_table() -> str:
    lines = ["| Hugging Face architecture | GGUF architecture | module |", "|---|---|---|"]
    for hf_name, cls in sorted(REGISTRY.items()):
        arch = getattr(cls.arch, "name", str(cls.arch)).lower()
        lines.append(f"| `{hf_name}` | `{arch}` | `convert/archs/{cls.__module__.rsplit('.', 1)[-1]}.py` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(architecture_table())
