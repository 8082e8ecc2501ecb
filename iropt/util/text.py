"""Quoting user-supplied text in messages without echoing all of it."""

from __future__ import annotations

# Names, paths and values longer than this are cut in messages: a message is one paragraph,
# whatever the input holds.
MAX_QUOTED = 80
# File paths are what users look for in a message: cut only what no file system allows.
MAX_QUOTED_PATH = 1024


def shorten(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` as is when short, else its head and tail around a note of how much was cut."""
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 8, 1)
    return f"{text[:keep]}…[{len(text) - 2 * keep} chars]…{text[-keep:]}"


def shorten_path(path: str) -> str:
    """A file path for a message: whole unless it is longer than any real path."""
    return shorten(path, MAX_QUOTED_PATH)
