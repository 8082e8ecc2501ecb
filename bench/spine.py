"""Overhead of `iropt run` with the cleanup schedule against plain onnx.load + onnx.save.

Side by side in one process, on every golden model: the median time of
  - `onnx.load` + `onnx.save` (the floor: what any tool pays to read and write a model),
  - iropt's passes alone (load, cleanup schedule, save; verification off),
  - the full `iropt run cleanup` (with verification through ONNX Runtime),
  - verification alone (reference and candidate runs plus comparison),
and the ratios to the floor. Run: `.venv/bin/python bench/spine.py`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import golden_models, markdown_table, median_seconds

from iropt.app.optimize import RunOptions, optimize
from iropt.io.load import load_model
from iropt.verify.criteria import EXACT_CRITERION
from iropt.verify.feeds import open_feeds
from iropt.verify.verifier import Verifier


def bench_model(path: Path, out_dir: Path) -> list[str]:
    out = out_dir / f"{path.stem}.out.onnx"
    inputs = path.with_name(path.stem + ".inputs.npz")

    def plain() -> None:
        onnx.save(onnx.load(str(path)), str(out))

    def passes_only() -> None:
        optimize(RunOptions(schedule="cleanup", model=path, output=out, verify=False))

    def full_run() -> None:
        optimize(RunOptions(schedule="cleanup", model=path, output=out, inputs=str(inputs)))

    model = load_model(path)
    feeds = open_feeds(str(inputs), model).feeds

    def verify_only() -> None:
        Verifier(model, feeds).check(model, EXACT_CRITERION)

    floor = median_seconds(plain)
    timings = [median_seconds(fn) for fn in (passes_only, full_run, verify_only)]
    return [path.stem, f"{floor * 1000:.1f}"] + [f"{t * 1000:.1f} ({t / floor:.1f}x)" for t in timings]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(path, Path(tmp)) for path in golden_models()]
    headers = ["model", "load+save ms", "iropt passes ms (x floor)", "iropt run ms (x floor)", "verification ms (x floor)"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
