"""Ctrl-C that cannot be lost.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode; native code that checks for
signals itself (a runtime's extension module while it loads, say) can take that exception and
drop it, and the run would go on to write its output as if nothing had happened. The handler
installed here also records the interruption, and `raise_if_interrupted` raises it again where
it matters: before a file is published, and when the command ends.
"""

from __future__ import annotations

import signal
from types import FrameType

_interrupted = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def install() -> None:
    """Make SIGINT raise KeyboardInterrupt and be remembered (call from the main thread)."""
    signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    """KeyboardInterrupt when SIGINT arrived since `install`, even if it was swallowed."""
    if _interrupted:
        raise KeyboardInterrupt
