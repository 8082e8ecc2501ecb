"""Every shell block in the README runs, and the README's Python example works.

The blocks run in order from the repository root, as a reader would type them. The one block
that is the test command itself (`make test`) is not run from inside the test suite (that would
recurse); instead the test checks that it is exactly what CI runs, so CI executes it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from iropt import Model, PassContext
from iropt.infra.registry import PASSES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GOLDEN_DIGITS = ROOT / "golden_models" / "digits_cnn.onnx"
TEST_COMMAND = "make test"


def _blocks(language: str) -> list[str]:
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [m.group(1).strip() for m in pattern.finditer(README.read_text(encoding="utf-8"))]


def _has_tensorrt() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt", "tensorrt_rtx"))


def test_readme_starts_with_the_two_commands() -> None:
    blocks = _blocks("sh")
    assert blocks[:2] == ["make demo", TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^{TEST_COMMAND}$", ci, re.MULTILINE), ".ci/run must call the README's test command"


TENSORRT_MARK = "# needs TensorRT"


def _run_block(block: str) -> None:
    env_bin = str(Path(sys.executable).parent)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={"PATH": f"{env_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()),
             "IROPT_CACHE_DIR": os.environ.get("IROPT_CACHE_DIR", str(Path.home() / ".cache" / "iropt"))},
    )
    assert result.returncode == 0, f"README block failed:\n{block}\n{result.stdout}\n{result.stderr}"


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_readme_shell_blocks_run() -> None:
    for block in _blocks("sh"):
        if block != TEST_COMMAND and not block.startswith(TENSORRT_MARK):
            _run_block(block)
    out = ROOT / "out"
    assert "BatchNormalization" not in _op_types(out / "conv_bn.opt.onnx")
    # int8 where it runs faster on this machine: measured placement may keep every layer float.
    assert _op_types(out / "digits_int8.onnx") <= {"QuantizeLinear", "DequantizeLinear", *_op_types(GOLDEN_DIGITS)}
    assert "BatchNormalization" not in _op_types(out / "small.onnx")
    assert "BatchNormalization" in _op_types(out / "small_bn.onnx")


def test_readme_tensorrt_blocks_run() -> None:
    blocks = [b for b in _blocks("sh") if b.startswith(TENSORRT_MARK)]
    assert blocks, "the README shows a TensorRT engine build"
    if not _has_tensorrt():
        pytest.skip("TensorRT (tensorrt or tensorrt_rtx) is not installed")
    # The tour's first block makes out/; this test may run before it on another worker.
    (ROOT / "out").mkdir(exist_ok=True)
    for block in blocks:
        _run_block(block)
    assert (ROOT / "out" / "resnet_trt.engine").stat().st_size > 0


def _run_example(block: str, pass_name: str, model_text: str, options: dict[str, object]) -> tuple[Model, dict[str, int]]:
    exec(compile(block, str(README), "exec"), {})
    try:
        model = Model.from_onnx(onnx.parser.parse_model(model_text))
        result = PASSES.create(pass_name, options).run(model, PassContext())
        return model, result.stats
    finally:
        PASSES.remove(pass_name)


def test_readme_python_example_defines_a_working_pass() -> None:
    first, _ = _blocks("python")
    model, stats = _run_example(
        first, "rename_relu_nodes",
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { a = Relu(x)  y = Relu(a) }""",
        {"prefix": "r"},
    )
    assert stats == {"renamed": 2}
    assert [n.name for n in model.graph.nodes] == ["r0", "r1"]


def test_readme_rewrite_example_rewrites_and_keeps_outputs() -> None:
    _, second = _blocks("python")
    model, stats = _run_example(
        second, "div_to_mul",
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) { c = Constant <value = float[1] {4.0}> ()  y = Div(x, c) }""",
        {},
    )
    assert stats == {"div_to_mul": 1}
    assert [n.op for n in model.graph.nodes] == ["Mul"]
    assert model.graph.outputs[0].name == "y"
