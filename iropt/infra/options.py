"""Typed options read from a constructor's keyword-only parameters.

Passes and back ends declare their options as typed keyword-only constructor parameters (a
`@dataclass(kw_only=True)` does this for free). The DSL, the command line and `iropt passes` read
them from here, so the documentation, the parser and the checks never disagree.

Supported annotations: bool, int, float (an int is accepted), str, `Literal[...]` choices,
`list[T]`, `dict[str, T]` and unions such as `float | None`. Numeric options take bounds with
`typing.Annotated`: `max_bytes: Annotated[int, Range(min=0)] = 1 << 20` is refused below 0, with
the bounds shown by `iropt passes NAME`. Floats must be finite and whole numbers fit in 64 bits.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from iropt.errors import OptionError
from iropt.util.bounds import Range, bound_violation, ranges_of
from iropt.util.suggest import did_you_mean
from iropt.util.text import shorten

__all__ = ["REQUIRED", "OptionSpec", "Range", "bind_options", "coerce_option", "option_specs", "type_label"]


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class OptionSpec:
    """One option: its name, annotation, default (REQUIRED when it has none) and type label."""

    name: str
    annotation: Any
    default: Any

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def type_name(self) -> str:
        return type_label(self.annotation)


def option_specs(cls: type) -> list[OptionSpec]:
    """The keyword-only options of `cls`'s constructor, in declaration order."""
    init = cls.__init__  # type: ignore[misc]
    hints = typing.get_type_hints(init, include_extras=True)
    specs = []
    for param in inspect.signature(init).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if param.kind is not param.KEYWORD_ONLY:
            raise TypeError(
                f"{cls.__name__}: option '{param.name}' must be keyword-only "
                "(declare the class with @dataclass(kw_only=True) or put options after '*')"
            )
        if param.name not in hints:
            raise TypeError(f"{cls.__name__}: option '{param.name}' needs a type annotation")
        default = REQUIRED if param.default is param.empty else param.default
        default = _resolve_default_factory(cls, param.name, default)
        specs.append(OptionSpec(param.name, hints[param.name], default))
    return specs


def _resolve_default_factory(cls: type, name: str, default: Any) -> Any:
    """A dataclass `field(default_factory=...)` shows as `<factory>` in the signature: call it."""
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.name == name and f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return default


def bind_options(owner: str, specs: list[OptionSpec], given: Mapping[str, Any]) -> dict[str, Any]:
    """Check `given` against `specs` and return the coerced values (defaults not filled in).

    `owner` names the pass or back end in messages ("pass 'fold_constants'").
    """
    by_name = {spec.name: spec for spec in specs}
    for key in given:
        if key not in by_name:
            valid = ", ".join(by_name) or "none"
            raise OptionError(
                f"{owner} has no option '{shorten(key)}'{did_you_mean(key, by_name)}; its options are: {valid}"
            )
    missing = [s.name for s in specs if s.required and s.name not in given]
    if missing:
        raise OptionError(f"{owner} needs option(s) {', '.join(missing)}")
    return {key: coerce_option(owner, by_name[key], value) for key, value in given.items()}


def coerce_option(owner: str, spec: OptionSpec, value: Any) -> Any:
    """`value` converted to the option's type, or an OptionError naming what was expected."""
    ok, converted = _coerce(spec.annotation, value)
    if not ok:
        raise OptionError(
            f"{owner} option '{spec.name}' expects {spec.type_name}, got {shorten(repr(value))} "
            f"({type(value).__name__})"
        )
    reason = _first_violation(spec.annotation, converted)
    if reason is not None:
        raise OptionError(f"{owner} option '{spec.name}' {reason}, got {shorten(repr(converted))}")
    return converted


def _first_violation(annotation: Any, value: Any) -> str | None:
    """Why `value` (already converted) breaks a bound, looking into lists and dicts too."""
    if isinstance(value, (list, tuple)):
        item_type = _container_item(annotation, list)
        return next((r for item in value if (r := _first_violation(item_type, item))), None)
    if isinstance(value, dict):
        item_type = _container_item(annotation, dict)
        return next((r for item in value.values() if (r := _first_violation(item_type, item))), None)
    return bound_violation(annotation, value)


def _container_item(annotation: Any, container: type) -> Any:
    """The item annotation of the `list[...]` / `dict[str, ...]` member of `annotation`, or Any."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _container_item(get_args(annotation)[0], container)
    if origin is container:
        args = get_args(annotation)
        return args[-1] if args else Any
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            item = _container_item(member, container)
            if item is not Any:
                return item
    return Any


def _coerce(annotation: Any, value: Any) -> tuple[bool, Any]:
    origin = get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin is Annotated:
        return _coerce(get_args(annotation)[0], value)
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            ok, converted = _coerce(member, value)
            if ok:
                return True, converted
        return False, None
    if origin is Literal:
        # `True == 1`, so compare types too: Literal[1] must not accept True.
        return any(value == a and type(value) is type(a) for a in get_args(annotation)), value
    if origin is list:
        return _coerce_list(annotation, value)
    if origin is dict:
        return _coerce_dict(annotation, value)
    return _coerce_scalar(annotation, value)


def _coerce_scalar(annotation: Any, value: Any) -> tuple[bool, Any]:
    if annotation is type(None):
        return value is None, None
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if annotation is str:
        return isinstance(value, str), value
    return isinstance(value, annotation), value


def _coerce_list(annotation: Any, value: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, None
    (item_type,) = get_args(annotation) or (Any,)
    items = []
    for item in value:
        ok, converted = _coerce(item_type, item)
        if not ok:
            return False, None
        items.append(converted)
    return True, items


def _coerce_dict(annotation: Any, value: Any) -> tuple[bool, Any]:
    if not isinstance(value, Mapping):
        return False, None
    _, value_type = get_args(annotation) or (str, Any)
    result = {}
    for key, item in value.items():
        ok, converted = _coerce(value_type, item)
        if not ok or not isinstance(key, str):
            return False, None
        result[key] = converted
    return True, result


def type_label(annotation: Any) -> str:
    """A short human label for an annotation: 'int', 'float | None', "'l1' | 'l2'", 'list[str]',
    'int (>= 0)' for an annotation with bounds."""
    origin = get_origin(annotation)
    if origin is Annotated:
        label = type_label(get_args(annotation)[0])
        bounds = "; ".join(r.describe() for r in ranges_of(annotation))
        return f"{label} ({bounds})" if bounds else label
    if origin in (Union, types.UnionType):
        return " | ".join(type_label(a) for a in get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin is list:
        args = get_args(annotation)
        return f"list[{type_label(args[0])}]" if args else "list"
    if origin is dict:
        args = get_args(annotation)
        return f"dict[str, {type_label(args[1])}]" if args else "dict"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
