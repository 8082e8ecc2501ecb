"""Soak the property tests: tests/test_properties.py under the `long` hypothesis profile.

    python bench/properties_long.py                 # 2000 random graphs per test, 2 workers
    python bench/properties_long.py -n 4 -- -k fuse # more workers; pytest arguments after --

CI runs the same tests under the `ci` profile (25 derandomized examples per test); this draws
fresh random graphs on every run (see tests/conftest.py), so it finds what CI cannot. A failure
is shrunk to a minimal model, printed as ONNX text with a `@reproduce_failure` blob. The last
line is a summary to paste into bench/RESULTS.md. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "long"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--workers", type=int, default=2, help="pytest-xdist workers (0: no xdist)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    command = [sys.executable, "-m", "pytest", "tests/test_properties.py", "-q", "-p", "no:cacheprovider"]
    if args.workers:
        command += ["-n", str(args.workers)]
    command += args.pytest_args
    env = dict(os.environ, HYPOTHESIS_PROFILE=PROFILE)
    print("$ HYPOTHESIS_PROFILE=long " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    sys.stdout.write(process.stdout)
    print(summary_line(process.stdout, elapsed))
    return process.returncode


def summary_line(output: str, seconds: float) -> str:
    """One line for bench/RESULTS.md: counts from pytest's final line, examples, time, versions."""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|error)", output)}
    tests = sum(counts.values())
    examples = _max_examples()
    outcome = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "xfailed", "xpassed", "skipped") if k in counts)
    import hypothesis  # here: only for its version in the summary

    return (
        f"properties, long profile ({datetime.date.today().isoformat()}): {tests} tests x {examples} "
        f"random graphs: {outcome or 'no result'} in {seconds / 60:.1f} min "
        f"(hypothesis {hypothesis.__version__}, {os.cpu_count()} CPUs)"
    )


def _max_examples() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # registers the profiles
    from hypothesis import settings

    del conftest
    return int(settings.get_profile(PROFILE).max_examples)


if __name__ == "__main__":
    sys.exit(main())
