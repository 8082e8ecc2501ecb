"""Hostile inputs for the command line's contract, and the check of that contract.

The contract (README, "Exit codes"): bad input exits 2 with a one-paragraph message and no
traceback; a failed verification exits 1; nothing is written when a run fails; the input is never
modified. `Sandbox` records a folder before a command runs and checks afterwards that nothing in
it changed and nothing was added, hidden staging folders included.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from iropt.app.cli import main

WEIGHT = np.arange(1, 5, dtype=np.float32).reshape(1, 4)


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    """`iropt ARGV` in this process, with what it printed."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


class Sandbox:
    """A folder whose every file (hidden ones too) is recorded, to check what a command wrote."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, str]:
        found = {}
        for path in sorted(self.folder.rglob("*")):
            key = str(path.relative_to(self.folder))
            if path.is_symlink():
                found[key] = "link:" + str(path.readlink())
            elif path.is_file():
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = "dir" if path.is_dir() else "special"
        return found

    def assert_unchanged(self) -> None:
        after = self.snapshot()
        added = sorted(set(after) - set(self.before))
        changed = sorted(k for k in self.before if after.get(k) != self.before[k])
        assert not added and not changed, f"written: {added}, changed or removed: {changed}"


def assert_contract(outcome: Outcome, code: int, match: str | None = None) -> None:
    """Exit `code`, one clear message on stderr, no traceback, no internal error."""
    assert outcome.code == code, (outcome.code, outcome.err)
    assert "Traceback" not in outcome.err and "internal error" not in outcome.err, outcome.err
    if code == 2:
        assert outcome.err.startswith("iropt: "), outcome.err
        assert len(outcome.err) < 2000, f"{len(outcome.err)}-character message"
    if match is not None:
        assert match in outcome.err, outcome.err


def refused(argv: list[str], folder: Path, capsys: pytest.CaptureFixture[str], match: str | None = None,
            code: int = 2) -> Outcome:
    """Run `iropt ARGV`; assert it fails with `code`, says `match`, and writes nothing in `folder`."""
    sandbox = Sandbox(folder)
    outcome = run_cli(argv, capsys)
    assert_contract(outcome, code, match)
    sandbox.assert_unchanged()
    return outcome


# --- models -------------------------------------------------------------------------------


def add_model(*, weight: np.ndarray = WEIGHT, opset: int = 17) -> onnx.ModelProto:
    """y = x + w, x and y of shape [N, 4] (float32 unless `weight` says otherwise)."""
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", elem, ["N", 4])],
        [helper.make_tensor_value_info("y", elem, ["N", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def make_external(tensor: TensorProto, location: str, offset: int = 0, length: int | None = None) -> None:
    """Turn `tensor` into a reference to `location` (its bytes are not written anywhere)."""
    nbytes = len(numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.ClearField("int64_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length or nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def write_secret(folder: Path, name: str = "secret.bin") -> Path:
    """A file of exactly the weight's bytes, to be pointed at from where it must not be read."""
    path = folder / name
    path.write_bytes(WEIGHT.tobytes())
    return path


def external_initializer(location: str, **kwargs: int) -> onnx.ModelProto:
    model = add_model()
    make_external(model.graph.initializer[0], location, **kwargs)
    return model


def external_sparse(location: str) -> onnx.ModelProto:
    """The weight as a sparse initializer whose values live in `location`."""
    model = add_model()
    dense = model.graph.initializer.pop()
    values = numpy_helper.from_array(WEIGHT.ravel(), "w")
    make_external(values, location)
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(dense.dims)))
    return model


def external_constant(location: str) -> onnx.ModelProto:
    """The weight as a Constant node's `value` attribute, living in `location`."""
    model = add_model()
    dense = model.graph.initializer.pop()
    make_external(dense, location)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], value=dense))
    return model


def external_in_subgraph(location: str) -> onnx.ModelProto:
    """An If whose branches each hold an initializer living in `location`."""
    model = add_model()
    model.graph.initializer.pop()

    def branch(name: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(WEIGHT, f"w_{name}")
        make_external(weight, location)
        return helper.make_graph(
            [helper.make_node("Identity", [f"w_{name}"], [f"o_{name}"])], name, [],
            [helper.make_tensor_value_info(f"o_{name}", TensorProto.FLOAT, [1, 4])], [weight],
        )

    cond = numpy_helper.from_array(np.array(True), "cond")
    model.graph.initializer.append(cond)
    model.graph.node.insert(
        0, helper.make_node("If", ["cond"], ["w"], then_branch=branch("then"), else_branch=branch("else"))
    )
    return model


def duplicate_initializers() -> onnx.ModelProto:
    """Two initializers named 'w' with different values: runtimes disagree on which counts."""
    model = add_model()
    model.graph.initializer.append(numpy_helper.from_array(WEIGHT * 100, "w"))
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
