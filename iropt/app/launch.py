"""The `iropt` console script: Ctrl-C is a clean exit from the first moment.

Importing the command line takes a while (argparse, logging, then onnx and numpy on first use);
an interruption in that time would print a KeyboardInterrupt traceback. This module imports
nothing heavy, makes Ctrl-C exit with status 130 until the command line's own handling takes
over, and only then imports it.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _exit_interrupted(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    sys.stderr.write("iropt: interrupted\n")
    raise SystemExit(130)


signal.signal(signal.SIGINT, _exit_interrupted)


def main() -> int:
    """Run the command line with the process's arguments; its exit status."""
    from iropt.app.cli import main as cli_main

    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt: cli handles it
    return cli_main()
