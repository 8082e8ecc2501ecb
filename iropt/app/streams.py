"""Standard streams that behave in a pipe.

`iropt inspect --json m.onnx | head` closes the pipe while iropt still writes. Python then
raises BrokenPipeError on the next write, and once more when it flushes stdout at exit. Here a
closed reader only ends that stream's output: the command carries on (a run still writes its
model and returns its own exit code) and nothing is printed about the pipe.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import TextIO


class PipeSafeStream(io.TextIOBase):
    """A text stream that stops writing, quietly, once its reader has gone."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.reader_gone = True
        # What is still buffered would fail again when Python flushes the stream at exit:
        # point the descriptor at /dev/null so that last flush succeeds silently.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"


@contextlib.contextmanager
def pipe_safe_output() -> Iterator[None]:
    """Within the block, writes to sys.stdout and sys.stderr survive a closed pipe."""
    saved = sys.stdout, sys.stderr
    sys.stdout = PipeSafeStream(saved[0])  # type: ignore[assignment]
    sys.stderr = PipeSafeStream(saved[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
