"""The `iropt` console script: Ctrl-C is a clean exit from the first moment.

Importing the command line takes a while (argparse, logging, then onnx and numpy on first use);
an interruption in that time would print a KeyboardInterrupt traceback. This module imports
nothing heavy, installs the SIGINT handler that records the interruption
(`iropt.util.interrupt`), and only then imports the command line, which turns it into exit
status 130.
"""

from __future__ import annotations

import sys

from iropt.util import interrupt

interrupt.install()


def main() -> int:
    """Run the command line with the process's arguments; its exit status."""
    try:
        from iropt.app.cli import EXIT_INTERRUPTED
        from iropt.app.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("iropt: interrupted\n")
        return 130
    del EXIT_INTERRUPTED  # the same status, named where the command line handles it
    return cli_main()
