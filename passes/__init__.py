"""Built-in passes: one transform per module, each registering itself by name on import.

Every module in this package is imported when the registry is first used, so adding a pass is
adding a module; nothing here needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()
