"""Every shell block in the README runs, and the README's Python example works.

The blocks run in order from the repository root, as a reader would type them. The one block
that is the test command itself (`make test`) is not run from inside the test suite (that would
recurse); instead the test checks that it is exactly what CI runs, so CI executes it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from iropt import Model, PassContext
from iropt.registry import PASSES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMAND = "make test"


def _blocks(language: str) -> list[str]:
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [m.group(1).strip() for m in pattern.finditer(README.read_text(encoding="utf-8"))]


def test_readme_starts_with_the_two_commands() -> None:
    blocks = _blocks("sh")
    assert blocks[:2] == ["make demo", TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^{TEST_COMMAND}$", ci, re.MULTILINE), ".ci/run must call the README's test command"


@pytest.mark.xdist_group("readme")
def test_readme_shell_blocks_run() -> None:
    env_bin = str(Path(sys.executable).parent)
    for block in _blocks("sh"):
        if block == TEST_COMMAND:
            continue
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=ROOT, capture_output=True, text=True, check=False,
            env={"PATH": f"{env_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())},
        )
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stdout}\n{result.stderr}"
    demo = onnx.load(str(ROOT / "out" / "conv_bn.opt.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in demo.graph.node)


def test_readme_python_example_defines_a_working_pass() -> None:
    (example,) = _blocks("python")
    namespace: dict[str, object] = {}
    exec(compile(example, str(README), "exec"), namespace)
    try:
        graph = onnx.parser.parse_model(
            """<ir_version: 8, opset_import: ["" : 17]>
            g (float[2] x) => (float[2] y) { a = Relu(x)  y = Relu(a) }"""
        )
        model = Model.from_onnx(graph)
        result = PASSES.create("rename_relu_nodes", {"prefix": "r"}).run(model, PassContext())
        assert result.stats == {"renamed": 2}
        assert [n.name for n in model.graph.nodes] == ["r0", "r1"]
    finally:
        PASSES.remove("rename_relu_nodes")
