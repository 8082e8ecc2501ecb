"""Importing user code named on the command line: `package.module` or `path/to/file.py`.

Used by the `module:function` input readers and by `iropt export`'s factory specs, so both
accept the same forms and fail with the same kind of message.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from iropt.errors import UserError


def import_location(location: str, context: str) -> ModuleType:
    """Import a module by dotted name, or a Python file by path; `context` prefixes errors."""
    if location.endswith(".py") or "/" in location or "\\" in location:
        return import_file(Path(location), context)
    try:
        return importlib.import_module(location)
    except ImportError as error:
        raise UserError(f"{context}: cannot import module '{location}' ({error})") from error


def import_file(path: Path, context: str) -> ModuleType:
    """Execute a Python file as a module, registered under a name derived from its path.

    A file is executed once per process, like an imported module: naming it again (as a plugin
    and as an input reader, say) returns the module already loaded, so the passes it registers
    are not registered a second time.
    """
    if not path.is_file():
        raise UserError(f"{context}: no such Python file '{path}'")
    # A deterministic name, so importing one file twice reuses one module entry.
    name = "iropt_user_" + re.sub(r"\W", "_", str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{context}: '{path}' cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise UserError(f"{context}: importing '{path}' raised {type(error).__name__}: {error}") from error
    return module
