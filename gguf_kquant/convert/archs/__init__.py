"""One module per Hugging Face architecture; importing this package imports them all, which fills
``base.REGISTRY`` (each converter class is decorated with ``@register``).  Adding one is adding a file."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):  # __main__ prints the README's table
        importlib.import_module(f"{__name__}.{_m.name}")
