"""Plugins named on the command line: `--plugin package.module` or `--plugin path/to/passes.py`.

Importing a plugin runs its `@register_pass` / `@register_backend` decorators, so its passes can be
named in a schedule without packaging them as an entry point. `IROPT_PLUGINS` names plugins
too, separated by `os.pathsep` (':' on Unix, ';' on Windows); it is read first, then the flags.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from iropt.infra.registry import BACKENDS, PASSES
from iropt.util.pyimport import import_location

PLUGINS_ENV = "IROPT_PLUGINS"

_log = logging.getLogger("iropt.plugins")


def plugin_specs(flags: Sequence[str]) -> list[str]:
    """The plugins to load: IROPT_PLUGINS, then `flags`, each once, in order."""
    from_env = [spec.strip() for spec in os.environ.get(PLUGINS_ENV, "").split(os.pathsep)]
    return list(dict.fromkeys(spec for spec in (*from_env, *flags) if spec))


def load_plugins(flags: Sequence[str]) -> None:
    """Import every plugin; UserError when one cannot be imported (or registers a taken name)."""
    for spec in plugin_specs(flags):
        module = import_location(spec, f"plugin '{spec}'")
        added = PASSES.names_from(module.__name__) + BACKENDS.names_from(module.__name__)
        if added:
            _log.info("plugin %s registered %s", spec, ", ".join(added))
        else:
            _log.warning("plugin %s registered no pass or back end (is @register_pass applied?)", spec)
