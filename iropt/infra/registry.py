"""Registries of passes and back ends, keyed by snake_case name.

Built-in passes are imported on first use; third-party passes arrive through the `iropt.passes`
entry-point group (the entry point's name is the pass name, its value the class, or a module that
registers passes when imported) and are loaded lazily when a name is not found. Back ends
register under `iropt.backends` the same way. An unknown name is an error that lists the nearest
names and points at the listing command.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from iropt.errors import UnknownPassError
from iropt.infra.options import OptionSpec, bind_options, option_specs
from iropt.infra.pass_base import DEFAULT_CAPABILITIES, Pass, PassKind, TargetSpec
from iropt.util.suggest import did_you_mean
from iropt.util.text import shorten

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_log = logging.getLogger("iropt.registry")

C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class Entry:
    """A registered class with what the listings and the DSL need to know about it."""

    name: str
    cls: type
    options: tuple[OptionSpec, ...]
    origin: str

    @property
    def summary(self) -> str:
        """The first paragraph of the class docstring, on one line (a summary sentence is often
        wrapped over two lines of source)."""
        doc = inspect.getdoc(self.cls) or ""
        return " ".join(doc.split("\n\n", 1)[0].split())

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.cls) or ""

    @property
    def kind(self) -> PassKind | None:
        """EXACT or LOSSY for passes; None for back ends."""
        return getattr(self.cls, "kind", None) if issubclass(self.cls, Pass) else None


class Registry:
    """Name -> class, with built-ins imported lazily and plugins found through entry points."""

    def __init__(self, what: str, group: str, builtin_modules: tuple[str, ...], listing: str) -> None:
        self.what = what
        self.group = group
        self._builtin_modules = builtin_modules
        self._listing = listing
        self._entries: dict[str, Entry] = {}
        self._builtins_loaded = False
        self._plugins_loaded = False
        # Entry point name -> the name its class registered itself under, when they differ.
        self._misnamed: dict[str, str] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: register the class under `name`."""

        def decorator(cls: C) -> C:
            self.add(name, cls)
            return cls

        return decorator

    def add(self, name: str, cls: type, origin: str | None = None) -> None:
        if not _NAME.match(name):
            raise ValueError(f"{self.what} name '{name}' must be snake_case ([a-z][a-z0-9_]*)")
        if name in self._entries and self._entries[name].cls is not cls:
            raise ValueError(
                f"{self.what} '{name}' is already registered by {self._entries[name].origin}"
            )
        cls.name = name  # type: ignore[attr-defined]
        specs = tuple(option_specs(cls))
        self._entries[name] = Entry(name, cls, specs, origin or f"{cls.__module__}.{cls.__qualname__}")

    def get(self, name: str) -> Entry:
        """The entry called `name`; loads built-ins, then plugins, before giving up."""
        self._load_builtins()
        if name not in self._entries:
            self._load_plugin(name)
        if name not in self._entries:
            self._load_all_plugins()
        if name not in self._entries and name in self._misnamed:
            raise UnknownPassError(
                f"unknown {self.what} '{name}': the entry point '{name}' loads a class registered as "
                f"'{self._misnamed[name]}'; use '{self._misnamed[name]}' (or make the package's "
                "entry point name match its @register_pass name)"
            )
        if name not in self._entries:
            raise UnknownPassError(
                f"unknown {self.what} '{shorten(name)}'{did_you_mean(name, self._entries)}; "
                f"run `{self._listing}` to list them"
            )
        return self._entries[name]

    def remove(self, name: str) -> None:
        """Forget `name` (tests that register throwaway passes clean up with this)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def names_from(self, module: str) -> list[str]:
        """Names registered so far by classes of `module` or its submodules (no loading)."""
        return sorted(
            name for name, entry in self._entries.items()
            if entry.cls.__module__ == module or entry.cls.__module__.startswith(module + ".")
        )

    def entries(self) -> list[Entry]:
        """Every entry, built-ins and plugins, sorted by name."""
        self._load_builtins()
        self._load_all_plugins()
        return sorted(self._entries.values(), key=lambda e: e.name)

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """An instance of `name` built from checked options."""
        entry = self.get(name)
        values = bind_options(f"{self.what} '{name}'", list(entry.options), options or {})
        return entry.cls(**values)

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        # Marked loaded only once every import succeeded: a broken module must fail loudly on
        # every lookup, not leave the registry half-filled for the rest of the process.
        for module in self._builtin_modules:
            importlib.import_module(module)
        self._builtins_loaded = True

    def _load_plugin(self, name: str) -> None:
        for ep in entry_points(group=self.group):
            if ep.name == name:
                self._load_entry_point(ep)

    def _load_all_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._entries:
                self._load_entry_point(ep)

    def _load_entry_point(self, ep: Any) -> None:
        loaded = ep.load()
        # An entry point may name the class (registered here if it did not register itself)
        # or a module whose import registers its passes.
        if not isinstance(loaded, type) or ep.name in self._entries:
            return
        own_name = self._name_of(loaded)
        if own_name is None:
            self.add(ep.name, loaded, origin=f"entry point {ep.value}")
            return
        # The class registered itself under another name: registering it again under the
        # entry point's name would list one pass twice and rename it (`cls.name`) behind the
        # author's back. It keeps its own name; the entry point's name is explained if used.
        self._misnamed[ep.name] = own_name
        _log.warning(
            "entry point '%s' (%s) loads the %s registered as '%s'; it is available as '%s' only",
            ep.name, ep.value, self.what, own_name, own_name,
        )

    def _name_of(self, cls: type) -> str | None:
        for name, entry in self._entries.items():
            if entry.cls is cls:
                return name
        return None


PASSES = Registry(
    "pass", "iropt.passes", ("iropt.passes",), "iropt passes"
)
BACKENDS = Registry(
    "back end", "iropt.backends", ("iropt.lowering",), "iropt passes --targets"
)


def register_pass(name: str) -> Callable[[C], C]:
    """Register a Pass subclass under `name` (snake_case, unique)."""
    return PASSES.register(name)


def register_backend(name: str) -> Callable[[C], C]:
    """Register a Backend subclass under `name`."""
    return BACKENDS.register(name)


def get_pass(name: str) -> Entry:
    return PASSES.get(name)


def create_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    """A pass instance from its name and options, with every option checked."""
    created: Pass = PASSES.create(name, options)
    return created


def target_spec(name: str, options: Mapping[str, Any] | None = None) -> TargetSpec:
    """The TargetSpec of back end `name`: its options and the capabilities it declares."""
    cls = BACKENDS.get(name).cls
    return TargetSpec(name, dict(options or {}), capabilities=getattr(cls, "capabilities", DEFAULT_CAPABILITIES))
