"""Large models: peak memory and wall time of iropt on a generated >2 GB model, peers beside it.

Model (generated here, deterministic, written tensor by tensor so generating it never holds
more than one weight): an fp32 MLP `x -> [MatMul(W_i) -> Add(b_i) -> Relu -> Identity]*` with
its weights in external data (`model.onnx.data`). The Identity nodes give the exact schedules
something to rewrite that is not a weight, as in real exports. Two shapes:

- `mlp`: layers of `WIDTH x WIDTH` (256 MiB each), as many as reach `--gib` (default 2.2 GiB);
- `one_tensor`: the same with one weight of over 2 GiB (a single tensor past protobuf's limit).

Each tool runs in its own child process; its peak RSS is the child's `ru_maxrss` and its time
the wall time of the child, interpreter start-up included. Tools, in one run so the ratios
share the machine's conditions:

- `onnx load+save`: `onnx.load` with the external data, `onnx.save` with external data (the
  reference: the least any tool that reads and writes the model does);
- `iropt cleanup` / `iropt default`: `iropt run` with its verification (reference and candidate
  run on ONNX Runtime and compared) and writing the output;
- `onnxslim`: its Python API with its own output check off (its default), when installed.

Run: `.venv/bin/python bench/large.py [--gib 2.2] [--shape mlp|one_tensor|both]`. Needs about
5x the model's size of free memory for the peers; the model is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, markdown_table

WIDTH = 8192  # a WIDTH x WIDTH fp32 weight is 256 MiB
GIB = 2**30


def _external(name: str, array_shape: tuple[int, ...], data: Path, offset: int) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend(array_shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data.name), ("offset", str(offset)),
                       ("length", str(4 * int(np.prod(array_shape))))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def generate(path: Path, total_bytes: int, one_big_tensor: bool) -> Path:
    """Write the MLP (see the module docstring) and its external data; returns the model path."""
    rng = np.random.default_rng(0)
    data = path.with_name(path.name + ".data")
    shapes: list[tuple[int, int]] = []
    if one_big_tensor:
        # One weight of just over 2 GiB (WIDTH x wide), then back to WIDTH.
        wide = (2 * GIB + 64 * 2**20) // (4 * WIDTH)
        shapes = [(WIDTH, wide), (wide, WIDTH)]
    else:
        shapes = [(WIDTH, WIDTH)] * max(1, total_bytes // (4 * WIDTH * WIDTH))
    nodes, initializers = [], []
    offset = 0
    current = "x"
    with data.open("wb") as stream:
        for index, (rows, cols) in enumerate(shapes):
            weight = f"w{index}"
            bias = f"b{index}"
            # One column block at a time: generating never holds a whole 2 GiB weight.
            for start in range(0, rows, 1024):
                block = rng.standard_normal((min(1024, rows - start), cols), dtype=np.float32)
                block *= np.float32(1.0 / np.sqrt(rows))
                stream.write(block.tobytes())
            initializers.append(_external(weight, (rows, cols), data, offset))
            offset += 4 * rows * cols
            initializers.append(helper.make_tensor(bias, TensorProto.FLOAT, [cols],
                                                   (rng.standard_normal(cols) * 0.01).astype(np.float32)))
            names = [f"mm{index}", f"add{index}", f"relu{index}", f"id{index}"]
            nodes += [
                helper.make_node("MatMul", [current, weight], [names[0]], name=names[0]),
                helper.make_node("Add", [names[0], bias], [names[1]], name=names[1]),
                helper.make_node("Relu", [names[1]], [names[2]], name=names[2]),
                helper.make_node("Identity", [names[2]], [names[3]], name=names[3]),
            ]
            current = names[3]
    graph = helper.make_graph(
        nodes, "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, shapes[0][0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, shapes[-1][1]])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


TOOLS = {
    "onnx load+save": (
        "import onnx,sys; m=onnx.load(sys.argv[1]); "
        "onnx.save(m, sys.argv[2], save_as_external_data=True, location='out.onnx.data')"
    ),
    "iropt cleanup": "from iropt.app.cli import main; import sys; sys.exit(main(['run','cleanup',sys.argv[1],'-o',sys.argv[2],'-q']))",
    "iropt default": "from iropt.app.cli import main; import sys; sys.exit(main(['run','default',sys.argv[1],'-o',sys.argv[2],'-q']))",
    "onnxslim": "import onnxslim,sys; onnxslim.slim(sys.argv[1], sys.argv[2])",
}


def measure(code: str, model: Path, out_dir: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB, exit code) of `code` run in a child interpreter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(model), str(out_dir / "out.onnx")], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if child.stderr is not None:
        err = child.stderr.read().decode(errors="replace").strip()
        if err and os.waitstatus_to_exitcode(status):
            print(err[-2000:], file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    return seconds, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def available(tool: str) -> bool:
    if tool != "onnxslim":
        return True
    try:
        import onnxslim  # noqa: F401
    except ImportError:
        return False
    return True


def run(shape: str, gib: float, tools: list[str], work: Path) -> list[list[str]]:
    model = generate(work / f"{shape}.onnx", int(gib * GIB), one_big_tensor=shape == "one_tensor")
    size = (model.stat().st_size + model.with_name(model.name + ".data").stat().st_size) / GIB
    rows = []
    base_seconds = None
    try:
        for tool in tools:
            if not available(tool):
                rows.append([shape, f"{size:.2f}", tool, "not installed", "", "", ""])
                continue
            seconds, peak, code = measure(TOOLS[tool], model, work / "out")
            if tool == "onnx load+save":
                base_seconds = seconds
            ratio = f"{seconds / base_seconds:.2f}x" if base_seconds else ""
            rows.append([shape, f"{size:.2f}", tool, f"{seconds:.1f}", ratio, f"{peak:.2f} ({peak / size:.1f}x)",
                         "ok" if code == 0 else f"exit {code}"])
            print(" | ".join(rows[-1]), flush=True)
    finally:
        model.unlink()
        model.with_name(model.name + ".data").unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.2, help="size of the mlp model")
    parser.add_argument("--shape", choices=["mlp", "one_tensor", "both"], default="mlp")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ", ".join(TOOLS))
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",")]
    shapes = ["mlp", "one_tensor"] if args.shape == "both" else [args.shape]
    rows = []
    with tempfile.TemporaryDirectory(prefix="iropt-large-") as tmp:
        for shape in shapes:
            rows += run(shape, args.gib, tools, Path(tmp))
    print(markdown_table(["model", "GiB", "tool", "wall s", "vs onnx", "peak RSS GiB (x model)", "result"], rows))


if __name__ == "__main__":
    main()
