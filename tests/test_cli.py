"""End-to-end tests of the `iropt` command line: success paths, exit codes, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from iropt import Model, Pass, PassContext, PassResult, register_pass
from iropt.app.cli import main
from iropt.ir.graph import is_op

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
CLEANUP = "cleanup"


@register_pass("clitest_add_becomes_sub")
@dataclass(kw_only=True)
class AddBecomesSub(Pass):
    """Test-only: turns every Add into a Sub, which breaks equivalence."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        count = 0
        for node in model.graph.nodes:
            if is_op(node, "Add"):
                node.op = "Sub"
                count += 1
        return PassResult.from_stats(broken=count)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    target = tmp_path / "mlp.onnx"
    shutil.copy(GOLDEN / "mlp.onnx", target)
    return target


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_run_cleanup_writes_verified_model_and_report(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code = main(["run", CLEANUP, str(mlp), "-o", str(out), "--report", str(report),
                 "--inputs", str(GOLDEN / "mlp.inputs.npz")])
    assert code == 0
    onnx.checker.check_model(onnx.load(str(out)))
    data = json.loads(report.read_text())
    assert data["verified"] is True
    assert [p["pass"] for p in data["passes"]][:2] == ["eliminate_identity", "eliminate_dead_code"]
    assert data["comparisons"] and data["comparisons"][0]["passed"] is True
    printed = capsys.readouterr().out
    assert "eliminate_dead_code" in printed and "verification passed" in printed


def test_default_output_path_is_beside_the_input(mlp: Path) -> None:
    assert main(["run", CLEANUP, str(mlp), "-q"]) == 0
    assert (mlp.parent / "mlp.opt.onnx").is_file()


def test_verification_failure_names_the_pass_and_writes_nothing(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _write(tmp_path, "bad.opt", "eliminate_identity\nclitest_add_becomes_sub\neliminate_dead_code\n")
    out = tmp_path / "out.onnx"
    before = _digest(mlp)
    assert main(["run", str(schedule), str(mlp), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "clitest_add_becomes_sub" in err and "first pass that breaks equivalence: #2" in err
    assert not out.exists()
    assert _digest(mlp) == before


def test_force_writes_despite_failed_verification(mlp: Path, tmp_path: Path) -> None:
    schedule = _write(tmp_path, "bad.opt", "clitest_add_becomes_sub\n")
    out = tmp_path / "out.onnx"
    assert main(["run", str(schedule), str(mlp), "-o", str(out), "--force", "-q"]) == 1
    assert out.is_file()


def test_verify_each_stops_at_the_breaking_pass(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _write(tmp_path, "bad.opt", "eliminate_identity\nclitest_add_becomes_sub\n")
    assert main(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx"), "--verify-each"]) == 1
    assert "clitest_add_becomes_sub" in capsys.readouterr().err


def test_dump_ir_writes_every_step(mlp: Path, tmp_path: Path) -> None:
    dump = tmp_path / "ir"
    assert main(["run", CLEANUP, str(mlp), "-o", str(tmp_path / "o.onnx"), "--dump-ir", str(dump), "-q"]) == 0
    names = sorted(p.name for p in dump.iterdir())
    assert names[0] == "000_input.onnx" and any(n.endswith("_toposort.onnx") for n in names)


def _custom_op_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mystery", ["r"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(path))
    return path


def _bad_model(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.onnx"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = (GOLDEN / "mlp.onnx").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_onnx":
        path.write_text("this is a text file, not a model\n" * 20)
    elif kind == "custom_op":
        _custom_op_model(path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("empty", "empty"),
        ("truncated", "not a readable ONNX model"),
        ("not_onnx", "not"),
        ("custom_op", "ONNX Runtime cannot run this model"),
    ],
)
def test_bad_models_exit_2_without_traceback(kind: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _bad_model(kind, tmp_path)
    before = _digest(model) if model.exists() else None
    out = tmp_path / "out.onnx"
    assert main(["run", CLEANUP, str(model), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
    assert (_digest(model) if model.exists() else None) == before


def test_input_that_fails_the_checker_is_named_as_the_cause(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ONNX Runtime runs it, but its output's type has no shape, which the checker rejects; a
    # schedule without shape inference leaves that as it is.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "no_output_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    schedule = _write(tmp_path, "dce.opt", "eliminate_dead_code\n")
    out = tmp_path / "out.onnx"

    assert main(["run", str(schedule), str(model), "-o", str(out)]) == 2

    err = capsys.readouterr().err
    assert "the input model fails the ONNX checker, so its optimized form does too" in err
    assert "Traceback" not in err and not out.exists()


def test_custom_op_is_left_alone_when_verification_is_off(tmp_path: Path) -> None:
    model = _custom_op_model(tmp_path / "custom.onnx")
    out = tmp_path / "out.onnx"
    assert main(["run", CLEANUP, str(model), "-o", str(out), "--no-verify", "-q"]) == 0
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Relu", "Mystery"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fixpoint(max=2) {\n  eliminate_identity(\n}\n", "s.opt:3:1"),
        ("eliminate_identiy\n", "did you mean 'eliminate_identity'"),
        ("eliminate_identity(dropot=true)\n", "dropot"),
        ("eliminate_identity(dropout=3)\n", "expects bool"),
    ],
    ids=["syntax", "unknown_pass", "unknown_option", "wrong_type"],
)
def test_bad_schedules_exit_2(text: str, message: str, mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _write(tmp_path, "s.opt", text)
    out = tmp_path / "out.onnx"
    before = _digest(mlp)
    assert main(["run", str(schedule), str(mlp), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "s.opt" in err and "Traceback" not in err
    assert not out.exists() and _digest(mlp) == before
    assert main(["check", str(schedule)]) == 2


def test_missing_required_option_exits_2(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _write(tmp_path, "s.opt", "verify(metric=\"cosine\")\n")
    assert main(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "min" in capsys.readouterr().err


def test_output_equal_to_input_is_refused(mlp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _digest(mlp)
    assert main(["run", CLEANUP, str(mlp), "-o", str(mlp)]) == 2
    assert "refusing to write over the input" in capsys.readouterr().err
    assert _digest(mlp) == before


def test_output_over_the_input_data_file_is_refused(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The input keeps its weights in out.onnx.data; writing out.onnx with external data
    # would replace them.
    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(mlp)), str(source), save_as_external_data=True,
                    location="out.onnx.data", size_threshold=0)
    before = {p.name: _digest(p) for p in source.parent.iterdir()}

    assert main(["run", CLEANUP, str(source), "-o", str(source.parent / "out.onnx")]) == 2

    err = capsys.readouterr().err
    assert "the input model's own external data" in err and "Traceback" not in err
    assert {p.name: _digest(p) for p in source.parent.iterdir()} == before


def test_model_failing_on_generated_sizes_says_how_to_give_them(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Declared [batch, seq, 4], but the Reshape fixes seq at 3 (as exporters that trace a
    # sequence length do): generated inputs with dynamic dimensions set to 1 cannot run.
    model = tmp_path / "fixed_seq.onnx"
    onnx.save(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, seq, 4] x) => (float[batch, 12] y) <int64[2] shape = {-1, 12}> {
            y = Reshape(x, shape)
        }
    """), str(model))

    assert main(["run", CLEANUP, str(model), "-o", str(tmp_path / "out.onnx")]) == 2

    err = capfd.readouterr().err
    assert "ONNX Runtime failed to run the model" in err
    assert "dim 'seq' set to 1" in err and "--shape NAME:DIMS" in err
    assert "[E:onnxruntime" not in err and "Traceback" not in err  # said once, by iropt
    assert not (tmp_path / "out.onnx").exists()
    assert main(["run", CLEANUP, str(model), "-o", str(tmp_path / "out.onnx"), "--shape", "x:2x3x4"]) == 0


def test_missing_output_directories_are_made(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "trt" / "out.onnx"
    report = tmp_path / "reports" / "run.json"
    assert main(["run", CLEANUP, str(mlp), "-o", str(out), "--report", str(report), "-q"]) == 0
    assert onnx.load(str(out)).graph.node and json.loads(report.read_text())["verified"] is True


def test_output_path_through_a_file_is_refused(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["run", CLEANUP, str(mlp), "-o", str(tmp_path / "file" / "out.onnx")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["run", CLEANUP, str(mlp), "-o", str(tmp_path / "out.onnx"), "--report",
                 str(tmp_path / "file" / "r.json")]) == 2
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_schedule_name_exits_2(mlp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no_such_schedule", str(mlp)]) == 2
    assert "no_such_schedule" in capsys.readouterr().err


def test_check_accepts_builtin_and_file_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "cleanup"]) == 0
    assert main(["check", str(GOLDEN / "demo.opt")]) == 0
    assert "ok" in capsys.readouterr().out


def test_passes_lists_and_describes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "eliminate_dead_code" in listing and "toposort" in listing
    assert main(["passes", "eliminate_identity", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["options"][0]["name"] == "dropout" and described["kind"] == "exact"
    assert main(["passes", "no_such_pass"]) == 2
    assert main(["passes", "--targets"]) == 0
    assert "ort" in capsys.readouterr().out


def test_compare_same_and_different_models(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = str(GOLDEN / "mlp.inputs.npz")
    assert main(["compare", str(mlp), str(mlp), "--inputs", inputs]) == 0
    assert "match" in capsys.readouterr().out
    broken = onnx.load(str(mlp))
    for node in broken.graph.node:
        if node.op_type == "Add":
            node.op_type = "Sub"
    other = tmp_path / "broken.onnx"
    onnx.save(broken, str(other))
    assert main(["compare", str(mlp), str(other), "--inputs", inputs, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False


def test_inspect_reports_ops_and_io(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(GOLDEN / "conv_bn.onnx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = onnx.load(str(GOLDEN / "conv_bn.onnx"))
    assert summary["nodes"] == len(model.graph.node)
    assert summary["ops"]["BatchNormalization"] == sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert summary["inputs"][0]["name"] == model.graph.input[0].name
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert summary["parameters"] == params


def test_console_script_runs_without_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("iropt")
    missing = tmp_path / "missing.onnx"
    result = subprocess.run([str(script), "run", CLEANUP, str(missing)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr
    help_result = subprocess.run([str(script), "run", "--help"], capture_output=True, text=True, check=False)
    assert help_result.returncode == 0 and "--verify-each" in help_result.stdout
