"""'Did you mean' suggestions for names the user got slightly wrong."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

_LONGEST_MISSPELLING = 200


def nearest_names(name: str, choices: Iterable[str], limit: int = 3) -> list[str]:
    """The registered names closest to `name`, best first (none for a name far too long to be
    a misspelling: matching it would take time quadratic in its length)."""
    if len(name) > _LONGEST_MISSPELLING:
        return []
    return difflib.get_close_matches(name, sorted(choices), n=limit, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix, or '' when nothing is close."""
    close = nearest_names(name, choices)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
