"""Writing back-end artefacts: atomically, with the mode every iropt artefact gets.

Models are written by `open()` into a scratch folder and renamed (mode 0666 less the umask);
engines, Triton configurations and copies are written the same way, never with a temporary
file's 0600, so every artefact of a run has the same permissions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_file(target: Path, data: bytes) -> None:
    """Write `data` to `target` atomically: readers never see half a file."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staged = Path(tmp) / target.name
        with open(staged, "wb") as handle:
            handle.write(data)
        os.replace(staged, target)


def copy_file(source: Path, target: Path) -> None:
    """Copy `source` to `target` atomically (contents only, the mode is the umask's)."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staged = Path(tmp) / target.name
        shutil.copyfile(source, staged)
        os.replace(staged, target)
