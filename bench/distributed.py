"""`iropt batch` and `iropt tune` on a local Ray instance.

1. `iropt batch default --manifest golden_models/manifest.json` over every golden model, with a
   local Ray instance of 1 and then 2 CPUs (`--workers`), each from a cold start, as a user runs
   it: wall time of the whole command (Ray's start-up included) and the sum of the models' own
   times, and the wall-time ratio. Then the same command again on the first folder: the ledger
   makes it skip every model.
2. `iropt tune` on the golden CNN `digits_cnn`: the exact `default` schedule against int8
   (`quantize` method, percentile), objective latency, constraint cosine >= 0.99, with Optuna's
   TPE searcher; the Pareto plot is kept as `bench/results/tune_pareto.svg`.

Run: `.venv/bin/python bench/distributed.py [--trials 12]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOLDEN, ROOT, markdown_table

IROPT = [sys.executable, "-m", "iropt.app.cli"]
RESULTS = ROOT / "bench" / "results"

SPACE = """
[schedules]
exact = "default"
int8 = "{int8}"

[options]
"quantize.method" = ["minmax", "percentile", "entropy", "mse"]
"quantize.percentile" = {{ low = 99.0, high = 99.999 }}
"""


def timed(args: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, done.stdout + done.stderr


def batch(work: Path) -> str:
    rows = []
    walls = {}
    for workers in (1, 2):
        out = work / f"batch{workers}"
        wall, code, text = timed([*IROPT, "batch", "default", "--manifest", str(GOLDEN / "manifest.json"),
                                  "-o", str(out), "--workers", str(workers), "-q"])
        summary = json.loads((out / "summary.json").read_text())
        model_seconds = sum(row.get("seconds") or 0.0 for row in summary["rows"])
        walls[workers] = wall
        rows.append([str(workers), str(summary["models"]), json.dumps(summary["statuses"]), f"{wall:.1f}",
                     f"{model_seconds:.1f}", f"{walls[1] / wall:.2f}x", str(code)])
        if code not in (0, 1):
            print(text[-3000:], file=sys.stderr)
    wall, code, _ = timed([*IROPT, "batch", "default", "--manifest", str(GOLDEN / "manifest.json"),
                           "-o", str(work / "batch1"), "--workers", "1", "-q"])
    summary = json.loads((work / "batch1" / "summary.json").read_text())
    rows.append(["1 (rerun)", str(summary["models"]), f"{summary['skipped']} skipped", f"{wall:.1f}", "0.0", "",
                 str(code)])
    per_model = [[row["name"], row["status"], f"{row.get('nodes_before')} -> {row.get('nodes_after')}",
                  "" if row.get("latency_ratio") is None else f"{row['latency_ratio']:.2f}x",
                  row.get("verification", row.get("error", "")), f"{row['seconds']:.1f}"]
                 for row in json.loads((work / "batch2" / "summary.json").read_text())["rows"]]
    return "\n\n".join([
        markdown_table(["workers", "models", "statuses", "wall s", "sum of model s", "speed-up", "exit"], rows),
        "Per model (2 workers):",
        markdown_table(["model", "status", "nodes", "latency after/before", "verification", "s"], per_model),
    ])


def tune(work: Path, trials: int) -> str:
    space = work / "space.toml"
    space.write_text(SPACE.format(int8=GOLDEN / "int8_ort.opt"))
    out = work / "tune"
    wall, code, text = timed([*IROPT, "tune", str(GOLDEN / "digits_cnn.onnx"), "--space", str(space), "-o", str(out),
                              "--objective", "latency", "--constraint", "cosine>=0.99", "--trials", str(trials),
                              "--search", "optuna", "--calibration", str(GOLDEN / "digits_cnn.calib.npz"),
                              "--workers", "2", "-q"])
    if code != 0:
        print(text[-3000:], file=sys.stderr)
        return f"tune failed (exit {code})"
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(out / "pareto.svg", RESULTS / "tune_pareto.svg")
    pareto = json.loads((out / "pareto.json").read_text())
    trials_rows = json.loads((out / "trials.json").read_text())
    front = {row["trial"] for row in pareto["front"]}
    best = pareto["best"]
    rows = [[str(r["trial"]), r["schedule"], ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in sorted(r.get("params", {}).items())),
             f"{r['objective']:.4f}" if r.get("objective") is not None else "",
             f"{r['metric']:.5f}" if r.get("metric") is not None else "",
             ("best, " if best and r["trial"] == best["trial"] else "") + ("front" if r["trial"] in front else "")
             + ("" if r.get("feasible") else " (misses)")]
            for r in sorted(trials_rows, key=lambda r: r.get("objective") or 1e9)]
    head = (f"{len(trials_rows)} trials in {wall:.0f} s (Ray start-up included); input model latency "
            f"{pareto['baseline']:.4f} ms; best: trial {best['trial']} ({best['schedule']}), "
            f"{best['objective']:.4f} ms, cosine {best['metric']:.5f}. Plot: bench/results/tune_pareto.svg")
    return head + "\n\n" + markdown_table(["trial", "schedule", "options", "latency ms", "cosine", ""], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--skip", choices=["batch", "tune"], action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iropt-distributed-") as tmp:
        if "batch" not in args.skip:
            print("### batch\n\n" + batch(Path(tmp)), flush=True)
        if "tune" not in args.skip:
            print("\n### tune\n\n" + tune(Path(tmp), args.trials), flush=True)


if __name__ == "__main__":
    main()
