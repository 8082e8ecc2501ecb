"""Large models: peak memory and wall time of iropt on a generated >2 GB model, peers beside it.

Model (generated here, deterministic, written tensor by tensor so generating it never holds
more than one weight): an fp32 MLP `x -> [MatMul(W_i) -> Add(b_i) -> Relu -> Identity]*` with
its weights in external data (`model.onnx.data`). The Identity nodes give the exact schedules
something to rewrite that is not a weight, as in real exports. Two shapes:

- `mlp`: layers of `WIDTH x WIDTH` (256 MiB each), as many as reach `--gib` (default 2.2 GiB);
- `one_tensor`: one weight of over 2 GiB (a single tensor past protobuf's limit), then a small one.

Each tool runs in its own child process; its peak RSS is the child's `ru_maxrss` and its time
the wall time of the child, interpreter start-up included. Tools, in one run so the ratios
share the machine's conditions:

- `onnx load+save`: `onnx.load` with the external data, `onnx.save` with external data (the
  reference: the least any tool that reads and writes the model does);
- `iropt cleanup` / `iropt default`: `iropt run` with its verification (reference and candidate
  run on ONNX Runtime and compared) and writing the output;
- `onnxslim`: its Python API with its own output check off (its default), when installed;
- `onnxsim`: `onnxsim.simplify` on the loaded model (with its own check), saved with external
  data, when installed; under a cap on its address space (`--cap`, 3x the model by default), so
  it is reported as "out of memory" where it would need more. Every tool is stopped after
  `--timeout` seconds ("timeout").

Run: `.venv/bin/python bench/large.py [--gib 2.2] [--shape mlp|one_tensor|both]`. Needs about
5x the model's size of free memory for the peers; the model is deleted at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
        # One weight of just over 2 GiB (WIDTH x wide), then a small one down to a few outputs:
        # the model is that one tensor, not two of that size.
        wide = (2 * GIB + 64 * 2**20) // (4 * WIDTH)
        shapes = [(WIDTH, wide), (wide, 16)]
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
    # onnxsim takes a ModelProto, weights and all; its result goes out with external data.
    "onnxsim": (
        "import onnx,onnxsim,sys; m,ok=onnxsim.simplify(onnx.load(sys.argv[1])); "
        "sys.exit('onnxsim: its own check of the result failed') if not ok else None; "
        "onnx.save(m, sys.argv[2], save_as_external_data=True, location='out.onnx.data')"
    ),
}
# Peers known to need several times the model's size run under a cap on their address space
# (RLIMIT_AS, as a multiple of the model's size), so that one does not take the machine's memory
# from everything else; one that hits it is reported as "out of memory".
CAPPED = {"onnxsim"}
# What a child that ran out of address space says (Python, C++, protobuf, ONNX Runtime).
_OUT_OF_MEMORY = ("MemoryError", "bad_alloc", "Cannot allocate memory", "out of memory", "Failed to allocate")


@dataclass
class Measured:
    seconds: float
    peak_gib: float
    result: str  # "ok", "out of memory", "timeout", "exit N"


def measure(code: str, model: Path, out_dir: Path, *, memory_cap: int | None, timeout: float) -> Measured:
    """Wall time, peak RSS and outcome of `code` run in a child interpreter; `memory_cap` bytes of
    address space at most (None: no cap), killed after `timeout` seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def limit() -> None:
        if memory_cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    start = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen([sys.executable, "-c", code, str(model), str(out_dir / "out.onnx")], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=errors, preexec_fn=limit)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                child.kill()
                timed_out = True
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        errors.seek(0)
        err = errors.read().decode(errors="replace").strip()
    shutil.rmtree(out_dir, ignore_errors=True)
    exit_code = os.waitstatus_to_exitcode(status)
    if timed_out:
        result = "timeout"
    elif exit_code == 0:
        result = "ok"
    elif memory_cap is not None and (exit_code < 0 or any(marker in err for marker in _OUT_OF_MEMORY)):
        # A native allocation that fails may end the process by a signal, with nothing said.
        result = f"out of memory (exit {exit_code})"
    else:
        result = f"exit {exit_code}"
    if exit_code and not timed_out:
        print(err[-2000:], file=sys.stderr)
    return Measured(seconds, usage.ru_maxrss / 2**20, result)


def available(tool: str) -> bool:
    if tool not in ("onnxslim", "onnxsim"):
        return True
    return importlib.util.find_spec(tool) is not None


def run(shape: str, gib: float, tools: list[str], work: Path, cap: float, timeout: float) -> list[list[str]]:
    model = generate(work / f"{shape}.onnx", int(gib * GIB), one_big_tensor=shape == "one_tensor")
    size = (model.stat().st_size + model.with_name(model.name + ".data").stat().st_size) / GIB
    rows = []
    base_seconds = None
    try:
        for tool in tools:
            if not available(tool):
                rows.append([shape, f"{size:.2f}", tool, "not installed", "", "", ""])
                continue
            memory_cap = int(cap * size * GIB) if tool in CAPPED else None
            measured = measure(TOOLS[tool], model, work / "out", memory_cap=memory_cap, timeout=timeout)
            seconds, peak = measured.seconds, measured.peak_gib
            if tool == "onnx load+save":
                base_seconds = seconds
            ratio = f"{seconds / base_seconds:.2f}x" if base_seconds else ""
            result = measured.result
            if memory_cap is not None:
                result += f", cap {memory_cap / GIB:.1f} GiB"
            rows.append([shape, f"{size:.2f}", tool, f"{seconds:.1f}", ratio, f"{peak:.2f} ({peak / size:.1f}x)",
                         result])
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
    parser.add_argument("--cap", type=float, default=3.0,
                        help="address-space cap of " + ", ".join(sorted(CAPPED)) + ", in model sizes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a tool is stopped")
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",")]
    shapes = ["mlp", "one_tensor"] if args.shape == "both" else [args.shape]
    rows = []
    with tempfile.TemporaryDirectory(prefix="iropt-large-") as tmp:
        for shape in shapes:
            rows += run(shape, args.gib, tools, Path(tmp), args.cap, args.timeout)
    print(markdown_table(["model", "GiB", "tool", "wall s", "vs onnx", "peak RSS GiB (x model)", "result"], rows))


if __name__ == "__main__":
    main()
