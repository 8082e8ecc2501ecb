"""Built-in schedules, addressable by name (`iropt run default model.onnx`)."""

from __future__ import annotations

from importlib import resources


def builtin_schedule_names() -> list[str]:
    """Names of the schedules shipped with the package."""
    return sorted(
        entry.name.removesuffix(".opt")
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".opt")
    )


def builtin_schedule_text(name: str) -> str | None:
    """The text of built-in schedule `name`, or None when there is none by that name."""
    entry = resources.files(__name__).joinpath(f"{name}.opt")
    try:
        return entry.read_text(encoding="utf-8") if entry.is_file() else None
    except OSError:  # a name the file system cannot hold (too long): no such schedule
        return None
