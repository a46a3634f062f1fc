"""Print the README's table of supported architectures from the registry: ``python -m gguf_kquant.convert.archs``.

tests/test_readme.py checks that the README holds exactly this table, so it cannot drift from the code.
"""

from __future__ import annotations

import gguf

from ..base import REGISTRY


def architecture_table() -> str:
    lines = ["| Hugging Face architecture | GGUF architecture | tested against llama.cpp | module |",
             "|---|---|---|---|"]
    for hf_name, cls in sorted(REGISTRY.items()):
        if hf_name in cls.untested_architectures:
            tested = "registered, not tested"
        else:  # the class's own mixes: a subclass is not tested by its parent's mix tests
            tested = ", ".join(cls.tested_outtypes + vars(cls).get("tested_mixes", ()))
        module = f"convert/archs/{cls.__module__.rsplit('.', 1)[-1]}.py"
        lines.append(f"| `{hf_name}` | `{gguf.MODEL_ARCH_NAMES[cls.arch]}` | {tested} | `{module}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(architecture_table())
