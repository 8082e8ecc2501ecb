"""Run every bench and record the results in bench/RESULTS.md.

Each bench runs as a child process (`.venv/bin/python bench/<name>.py`) and prints markdown;
this script puts it under a section of its own, after a header that says when and where it
ran (date, CPU count and model, versions of ONNX, ONNX Runtime and the peers). With
`--only NAME` only that bench runs and only its section of RESULTS.md is replaced; the others
are kept as they were (the header is rewritten with the new date). A bench that fails leaves
its error output in its section instead of a table.

Run: `.venv/bin/python bench/run.py [--only peers]`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"

BENCHES: dict[str, str] = {
    "spine": "Overhead of `iropt run` against plain load + save (bench/spine.py)",
    "peers": "Graph rewrites: iropt `default` against onnxsim, onnxslim, onnxoptimizer, graphsurgeon (bench/peers.py)",
    "scaling": "Scaling with graph size: 10k, 50k, 100k nodes (bench/scaling.py)",
    "quant": "Quantization: iropt int8 against ORT quantize_static (bench/quant.py)",
    "quant_large": "Quantization on a full-size network: ResNet-50, batch 8 (bench/quant_large.py)",
    "quant_kernels": "What ORT's int8 kernels gain, layer shape by layer shape (bench/quant_kernels.py)",
    "lowrank": "Low-rank factorization: accuracy and fidelity against weights kept (bench/lowrank.py)",
    "fp16": "float16: iropt `convert_fp16` against onnxconverter-common (bench/fp16.py)",
    "quant_saturation": "int8 weights against the int16 saturation of x86 CPUs without VNNI (bench/quant_saturation.py)",
    "quant_sensitivity": "Sensitivity analysis: fast ranking against exhaustive (bench/quant_sensitivity.py)",
    "quant_int4": "4-bit weights and int8 dynamic on a trained sentence encoder, against ORT's quantizers (bench/quant_int4.py)",
}
PACKAGES = ["onnx", "onnxruntime", "onnx-graphsurgeon", "onnxsim", "onnxslim", "onnxoptimizer", "onnxconverter-common", "numpy"]
# Whole-bench guard: a bench that runs past this is stopped and its section says so.
BENCH_TIMEOUT_S = 1200


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    return "\n".join([
        "# Benchmark results",
        "",
        "Recorded by `.venv/bin/python bench/run.py` (rerun it to refresh; `--only NAME` for one section).",
        "",
        f"- last updated: {_now()} (each section says when it was recorded)",
        f"- machine: {os.cpu_count()} CPUs (`nproc`: {_nproc()}), {_cpu_model()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"- load average at the last update: {load:.1f} (other work on the machine slows every "
        "tool alike within one bench, since the tools are measured side by side)",
        f"- versions: {versions}",
        "",
        "**Ratios, not absolute times, are what matter here.** Every bench measures iropt and what it "
        "is compared with in the same run, on the same machine, one after another; absolute "
        "milliseconds move with the machine and its load, the ratios much less. Timings are medians.",
        "",
    ])


def _nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run_bench(name: str) -> str:
    """The section body for bench `name`: its markdown, or what went wrong."""
    start = time.perf_counter()
    began = _now()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / f"{name}.py")],
            stdout=subprocess.PIPE, stderr=None, text=True, timeout=BENCH_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        return f"**Failed**: the bench ran past {BENCH_TIMEOUT_S} s and was stopped."
    seconds = time.perf_counter() - start
    body = done.stdout.strip()
    if done.returncode != 0:
        body = f"**Failed** (exit {done.returncode}); output so far:\n\n```\n{body[-3000:]}\n```"
    return f"{body}\n\n_Recorded {began} (load average {load:.1f} at the start); bench wall time {seconds:.0f} s._"


def section(name: str, body: str) -> str:
    return f"<!-- bench:{name} -->\n## {name}: {BENCHES[name]}\n\n{body}\n<!-- /bench:{name} -->\n"


def existing_sections(text: str) -> dict[str, str]:
    pattern = re.compile(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->\n", re.S)
    return {m.group(1): m.group(0) for m in pattern.finditer(text)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(BENCHES), help="run this bench only and replace its section")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write (default bench/RESULTS.md)")
    args = parser.parse_args(argv)
    sections = existing_sections(args.output.read_text()) if args.output.exists() else {}
    top = header()
    names = [args.only] if args.only else list(BENCHES)
    start = time.perf_counter()
    for name in names:
        sections[name] = section(name, run_bench(name))
    total = time.perf_counter() - start
    footer = f"\n_Total bench time for this run ({', '.join(names)}): {total / 60:.1f} min._\n"
    # Sections recorded by other scripts (the long property run) are kept, after the benches.
    order = [n for n in BENCHES if n in sections] + [n for n in sections if n not in BENCHES]
    body = "\n".join(sections[n] for n in order)
    args.output.write_text(top + body + footer)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
