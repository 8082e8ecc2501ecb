"""Run the ONNX package's backend test models through the `default` schedule and count them.

    python bench/conformance.py          # summary, skip reasons, failures
    python bench/conformance.py -v       # and one line per case

The same cases and checks as tests/test_conformance.py (tests/helpers_conformance.py):
*passed* means the optimized model still matches onnx's expected outputs at onnx's tolerance;
*skipped* means ONNX Runtime cannot run the original (or the original does not match in ORT),
so the case says nothing about iropt; *failed* is a regression. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers_conformance import cases, evaluate


def _reason_group(reason: str) -> str:
    """A skip reason without its case-specific details, to count alike reasons together."""
    reason = re.sub(r"node with name.*", "", reason)
    reason = re.sub(r"Exception during initialization: .*StringNormalizer.*", "StringNormalizer locale missing", reason)
    return reason.replace("ONNX Runtime cannot run the original: ONNX Runtime cannot run this model: ", "ORT: ").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="print one line per case")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    counts: Counter[str] = Counter()
    skips: Counter[str] = Counter()
    failures: list[str] = []
    all_cases = cases()
    for case in all_cases:
        outcome = evaluate(case)
        counts[outcome.status] += 1
        if outcome.status == "skipped":
            skips[_reason_group(outcome.reason)] += 1
        elif outcome.status == "failed":
            failures.append(f"{case.id}: {outcome.reason}")
        if args.verbose:
            nodes = f" nodes {outcome.nodes[0]}->{outcome.nodes[1]}" if outcome.nodes else ""
            print(f"{outcome.status:7s} {outcome.seconds:6.2f}s {case.id}{nodes} {outcome.reason}")
    elapsed = time.perf_counter() - start

    if skips:
        print("skipped (ONNX Runtime cannot run the original, or it does not match in ORT):")
        for reason, count in skips.most_common():
            print(f"  {count:3d}  {reason}")
    for failure in failures:
        print(f"FAILED {failure}")
    print(
        f"conformance (onnx {_onnx_version()} backend test data, default schedule): "
        f"total {len(all_cases)}, passed {counts['passed']}, skipped {counts['skipped']}, "
        f"failed {counts['failed']} ({elapsed:.0f} s)"
    )
    return 1 if failures else 0


def _onnx_version() -> str:
    import onnx

    return onnx.__version__


if __name__ == "__main__":
    sys.exit(main())
