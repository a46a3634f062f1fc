"""One module per Hugging Face architecture; importing this package imports them all, which fills
``base.REGISTRY`` (each converter class is decorated with ``@register``).  Adding one is adding a file."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
