"""TensorRT engines for every golden model in fp32, fp16 and int8: build time, size, precisions.

Engines are built with whichever TensorRT is installed (tensorrt_rtx builds without a GPU),
strongly typed, from the graph's own precision:
- fp32: the golden model as it is;
- fp16: converted by iropt's `convert_fp16` where it is registered, else by onnxconverter-common
  (`convert_float_to_float16`, keep_io_types=True);
- int8: golden_models/int8_tensorrt.opt (Q/DQ in TensorRT's format), calibrated on the model's
  inputs.npz; the time of that schedule is reported apart from the engine build.

Every engine is built at builder optimization levels 0 and 3 (the default), with the default
profile (batch 1..8). Reported per build: build seconds (the builder only, the median of
`--repeats` builds), engine bytes, parse failures (must be none), the precision each ONNX node
runs in by the engine's layer information, and how many nodes that asked for int8/fp16 (in the
graph) did not get it. Run: `.venv/bin/python bench/trt.py [--models resnet,unet] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import golden_models, markdown_table
from helpers_trt import ENGINE_PRECISIONS, fp16_converter, golden_variant

from iropt.errors import UserError
from iropt.lowering.tensorrt import TensorRTBackend, load_tensorrt


def measure(name: str, precision: str, level: int, repeats: int) -> list[str]:
    start = time.perf_counter()
    model = golden_variant(name, precision)
    prepare = time.perf_counter() - start
    seconds = []
    try:
        for _ in range(repeats):
            backend = TensorRTBackend(builder_optimization_level=level)
            engine = backend.build_engine(model)
            assert backend.last_build is not None
            seconds.append(backend.last_build.seconds)
    except UserError as error:
        return [name, precision, str(level), f"{prepare:.1f}", "FAILED", "", str(error).splitlines()[0], "", ""]
    report = backend.last_build.precisions
    assert report is not None
    counts = ", ".join(f"{p} {n}" for p, n in report.counts().items())
    missed = f"{len(report.missed)}/{len(report.requested)}"
    return [name, precision, str(level), f"{prepare:.1f}", f"{statistics.median(seconds):.2f}",
            f"{len(engine) / 1024:,.0f}", "0", counts, missed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated golden model names (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="0,3")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else [p.stem for p in golden_models()]
    start = time.perf_counter()
    TensorRTBackend().build_engine(golden_variant(names[0], "fp32"))  # load the libraries once
    rows = [
        measure(name, precision, int(level), args.repeats)
        for name in names for precision in ENGINE_PRECISIONS for level in args.levels.split(",")
    ]
    headers = ["model", "precision", "opt level", "prepare s", "build s", "engine KiB", "parse failures",
               "nodes by precision", "asked, not got"]
    print(f"TensorRT: {load_tensorrt().label}; fp16 by {fp16_converter()}; wall time {time.perf_counter() - start:.0f} s")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
