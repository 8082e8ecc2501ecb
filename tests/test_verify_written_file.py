"""Large models in bounded memory: `iropt run` writes the output first, verifies it from the file
(ONNX Runtime reads it, external data and all, after the graph is let go) and publishes it only
when it passed. The size from which that happens is lowered here so that a small model with
external data takes the same path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_hostile import Sandbox, run_cli
from onnx import TensorProto, helper, numpy_helper

import iropt.app.optimize as optimize_module
import iropt.io.save as save_module
from iropt import Model, Pass, PassContext, PassResult, register_pass
from iropt.app.optimize import RunOptions, optimize
from iropt.errors import VerificationError
from iropt.infra.pass_base import PassKind
from iropt.io.load import load_model
from iropt.io.save import StagedFiles
from iropt.verify.runtime import reference_runner

WIDTH = 64


@register_pass("writtenfiletest_perturb")
@dataclass(kw_only=True)
class Perturb(Pass):
    """Test-only: an 'exact' pass that doubles the first MatMul's weight (so verification fails)."""

    kind = PassKind.EXACT

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        matmul = next(node for node in model.graph.nodes if node.op == "MatMul")
        weight = matmul.inputs[1]
        weight.values = np.asarray(weight.values) * np.float32(2)
        return PassResult(changed=True)


def _mlp_with_external_data(folder: Path) -> Path:
    """x -> MatMul(w0) -> Identity -> Add(b0) -> Relu -> MatMul(w1), every weight in `mlp.onnx.data`."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), f"w{i}")
               for i in range(2)]
    bias = numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "b0")
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"]),
        helper.make_node("Identity", ["m0"], ["i0"]),
        helper.make_node("Add", ["i0", "b0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "w1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, WIDTH])],
        initializer=[*weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mlp.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp.onnx.data", size_threshold=0)
    return path


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat every model as large: verified from the written file, written with external data."""
    monkeypatch.setattr(optimize_module, "VERIFY_WRITTEN_FILE_MIN_BYTES", 0)
    monkeypatch.setattr(save_module, "EXTERNAL_DATA_THRESHOLD", 0)


def _leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".iropt-" in path.name]


def _outputs(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return reference_runner(path).run(feed)


def test_a_large_model_is_verified_from_the_written_file_and_then_published(large: None, tmp_path: Path) -> None:
    source = _mlp_with_external_data(tmp_path / "in")
    inputs = Sandbox(tmp_path / "in")
    output = tmp_path / "out" / "mlp.opt.onnx"
    phases: list[str] = []

    def progress(items, description, total=None):  # type: ignore[no-untyped-def]
        phases.append(description)
        return items

    outcome = optimize(RunOptions(schedule="cleanup", model=source, output=output), progress=progress)
    assert outcome.verified and outcome.output == output
    assert "verifying the written model" in phases
    # Published with its external data beside it; nothing left of the staging.
    assert (output.parent / "mlp.opt.onnx.data").is_file()
    assert sorted(p.name for p in output.parent.iterdir()) == ["mlp.opt.onnx", "mlp.opt.onnx.data"]
    written = onnx.load(str(output), load_external_data=False)
    external = {t.name for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w0", "w1"}  # the bias is under the size that goes to the data file
    assert [n.op_type for n in written.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]
    feed = {"x": np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)}
    np.testing.assert_allclose(_outputs(output, feed)["y"], _outputs(source, feed)["y"], rtol=1e-5, atol=1e-5)
    inputs.assert_unchanged()


def test_a_written_model_that_fails_verification_is_never_published(large: None, tmp_path: Path) -> None:
    source = _mlp_with_external_data(tmp_path / "in")
    schedule = tmp_path / "s.opt"
    schedule.write_text("eliminate_identity\nwrittenfiletest_perturb\n")
    sandbox = Sandbox(tmp_path)
    # The output's folder does not exist yet: the failed run must not leave it behind either.
    output = tmp_path / "new" / "dir" / "o.onnx"
    outcome = optimize(RunOptions(schedule=str(schedule), model=source, output=output))
    assert not outcome.verified and outcome.output is None
    # Bisection still works once the candidate's graph is gone: it rebuilds from the reference.
    assert outcome.culprit is not None and outcome.culprit.name == "writtenfiletest_perturb"
    with pytest.raises(VerificationError, match="no output written"):
        optimize_module.raise_if_unverified(outcome)
    assert not (tmp_path / "new").exists() and not _leftovers(tmp_path)
    sandbox.assert_unchanged()


def test_force_publishes_the_written_model_that_failed(large: None, tmp_path: Path) -> None:
    source = _mlp_with_external_data(tmp_path / "in")
    schedule = tmp_path / "s.opt"
    schedule.write_text("writtenfiletest_perturb\n")
    output = tmp_path / "o.onnx"
    outcome = optimize(RunOptions(schedule=str(schedule), model=source, output=output, force=True, bisect=False))
    assert not outcome.verified and outcome.output == output
    assert output.is_file() and (tmp_path / "o.onnx.data").is_file() and not _leftovers(tmp_path)
    weight = numpy_helper.to_array(next(t for t in load_model(output).to_onnx().graph.initializer if t.name == "w0"))
    original = numpy_helper.to_array(next(t for t in load_model(source).to_onnx().graph.initializer if t.name == "w0"))
    np.testing.assert_array_equal(weight, original * 2)


def test_ctrl_c_before_publishing_the_written_model_leaves_nothing(
    large: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from iropt.util import interrupt

    source = _mlp_with_external_data(tmp_path / "in")
    sandbox = Sandbox(tmp_path)
    # As if SIGINT arrived and native code (ONNX Runtime) swallowed the KeyboardInterrupt.
    monkeypatch.setattr(interrupt, "_interrupted", True)
    outcome = run_cli(["run", "cleanup", str(source), "-o", str(tmp_path / "o.onnx")], capsys)
    assert outcome.code == 130 and "Traceback" not in outcome.err
    sandbox.assert_unchanged()


def test_a_model_read_without_its_external_data_keeps_its_references(tmp_path: Path) -> None:
    source = _mlp_with_external_data(tmp_path / "in")
    light = load_model(source, external_data=False)
    full = load_model(source)
    assert light.source_data_files == full.source_data_files == {(tmp_path / "in" / "mlp.onnx.data").resolve()}
    assert [(t.name, t.shape, t.dtype) for t in light.graph.inputs] == [
        (t.name, t.shape, t.dtype) for t in full.graph.inputs
    ]
    # The graph has every weight's type and shape, none of its bytes.
    exported = light.to_onnx()
    assert {t.name for t in exported.graph.initializer} == {"w0", "w1", "b0"}
    assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in exported.graph.initializer)


def test_staged_files_left_unpublished_leave_no_trace(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "o.onnx"
    with StagedFiles.create(out, ["o.onnx.data"]) as staged:
        staged.path.write_bytes(b"model")
        (staged.path.parent / "o.onnx.data").write_bytes(b"data")
        assert staged.path.parent.parent == out.parent
    assert not (tmp_path / "a").exists()
    with StagedFiles.create(out, ["o.onnx.data"]) as staged:
        staged.path.write_bytes(b"model")
        (staged.path.parent / "o.onnx.data").write_bytes(b"data")
        staged.publish()
    assert out.read_bytes() == b"model" and (out.parent / "o.onnx.data").read_bytes() == b"data"
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]


def test_the_main_graph_weights_are_read_from_external_data_as_arrays(tmp_path: Path) -> None:
    source = _mlp_with_external_data(tmp_path / "in")
    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    model = load_model(source)
    constants = {name: t for name, t in model.graph.tensors().items() if name in expected}
    assert set(constants) == set(expected)
    for name, constant in constants.items():
        assert isinstance(constant._values, np.ndarray)  # read once, not held as a TensorProto
        np.testing.assert_array_equal(constant.values, expected[name])
    # Exported, the weights are inline data: nothing points back at the input's data file.
    exported = model.to_onnx()
    assert all(t.data_location == TensorProto.DEFAULT and t.raw_data for t in exported.graph.initializer)
