"""The command line as a new user meets it: flags where `--help` shows them, pipes, plugins,
progress without a terminal, listings that wrap, failures said once, reports on every exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from iropt import Model, Pass, PassContext, PassResult, register_pass
from iropt.app import console
from iropt.app.cli import main
from iropt.errors import UnknownPassError
from iropt.infra.pass_base import PassKind
from iropt.infra.registry import PASSES
from iropt.ir.graph import is_op

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden_models"
IROPT = Path(sys.executable).parent / "iropt"


@register_pass("newuser_log_probe")
@dataclass(kw_only=True)
class LogProbe(Pass):
    """Test-only: logs one debug and one info line, changes nothing."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.log.debug("newuser probe: debug")
        ctx.log.info("newuser probe: info")
        return PassResult(changed=False)


@register_pass("newuser_add_becomes_sub")
@dataclass(kw_only=True)
class AddBecomesSub(Pass):
    """Test-only: turns every Add into a Sub (breaks equivalence)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        adds = [n for n in model.graph.nodes if is_op(n, "Add")]
        for node in adds:
            node.op = "Sub"
        return PassResult.from_stats(broken=len(adds))


@register_pass("newuser_counted_lossy")
@dataclass(kw_only=True)
class CountedLossy(Pass):
    """Test-only lossy pass that counts its runs (as a calibrating pass would cost them)."""

    kind = PassKind.LOSSY
    runs: ClassVar[int] = 0

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        type(self).runs += 1
        for node in model.graph.nodes:
            if is_op(node, "Relu"):
                node.name = f"lossy_{node.name}"
        return PassResult(changed=True)


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    target = tmp_path / "mlp.onnx"
    shutil.copy(GOLDEN / "mlp.onnx", target)
    return target


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --- 1. -q / -v / -vv before the command ------------------------------------------------------


def test_quiet_before_the_command_silences_the_table(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "run", "cleanup", str(mlp), "-o", str(tmp_path / "o.onnx")]) == 0
    assert capsys.readouterr().out == ""
    assert main(["run", "-q", "cleanup", str(mlp), "-o", str(tmp_path / "o.onnx")]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flags", [["-vv", "run"], ["run", "-vv"], ["-v", "run", "-v"]])
def test_vv_logs_debug_wherever_it_is_given(
    flags: list[str], mlp: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schedule = _write(tmp_path / "probe.opt", "newuser_log_probe\n")
    caplog.set_level(logging.NOTSET)
    assert main([*flags, str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx"), "--no-verify"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "newuser probe: debug" in messages and "newuser probe: info" in messages


def test_default_level_hides_info_and_main_leaves_the_level_as_it_was(
    mlp: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schedule = _write(tmp_path / "probe.opt", "newuser_log_probe\n")
    before = logging.getLogger("iropt").level
    assert main(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx"), "--no-verify", "-q"]) == 0
    assert not [r for r in caplog.records if "newuser probe" in r.getMessage()]
    assert logging.getLogger("iropt").level == before


# --- 2. pipes -----------------------------------------------------------------------------------


@contextlib.contextmanager
def closed_pipe() -> Iterator[None]:
    """sys.stdout is a real pipe whose reader has gone, as `| head` leaves it after its lines."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    saved = sys.stdout
    sys.stdout = os.fdopen(write_end, "w")
    try:
        yield
    finally:
        stream, sys.stdout = sys.stdout, saved
        stream.close()


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "--json", str(GOLDEN / "transformer.onnx")],
        ["inspect", str(GOLDEN / "transformer.onnx")],
        ["passes"],
        ["passes", "--json"],
        ["check", "cleanup"],
        ["compare", str(GOLDEN / "mlp.onnx"), str(GOLDEN / "mlp.onnx")],
    ],
    ids=["inspect-json", "inspect", "passes", "passes-json", "check", "compare"],
)
def test_every_command_behaves_in_a_closed_pipe(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with closed_pipe():
        assert main(args) == 0
    assert capsys.readouterr().err == ""


def test_a_run_in_a_closed_pipe_still_writes_and_exits_with_its_own_code(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.onnx"
    with closed_pipe():
        assert main(["run", "cleanup", str(mlp), "-o", str(out)]) == 0
    assert onnx.load(str(out)).graph.node
    broken = _write(tmp_path / "bad.opt", "newuser_add_becomes_sub\n")
    with closed_pipe():
        assert main(["run", str(broken), str(mlp), "-o", str(tmp_path / "bad.onnx")]) == 1
    assert not (tmp_path / "bad.onnx").exists()
    err = capsys.readouterr().err
    assert "verification failed" in err and "BrokenPipe" not in err


def test_the_console_script_exits_quietly_when_its_reader_goes(tmp_path: Path) -> None:
    # End to end, interpreter exit included (Python flushes stdout once more as it exits).
    process = subprocess.Popen(
        [str(IROPT), "inspect", "--json", str(GOLDEN / "transformer.onnx")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0
    assert err == b"", err.decode()


# --- 4. --plugin and IROPT_PLUGINS ---------------------------------------------------------------


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    """The README's RenameReluNodes example, as a file of its own (a fresh path per test)."""
    path = tmp_path / "rename_relu_nodes.py"
    shutil.copy(GOLDEN / "rename_relu_nodes.py", path)
    yield path
    PASSES.remove("rename_relu_nodes")


def _relu_names(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"]


def test_plugin_file_runs_from_a_schedule(plugin: Path, mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = GOLDEN / "rename_relu.opt"
    assert main(["check", "--plugin", str(plugin), str(schedule)]) == 0
    assert "ok (2 pass steps" in capsys.readouterr().out
    out = tmp_path / "renamed.onnx"
    assert main(["run", "--plugin", str(plugin), str(schedule), str(mlp), "-o", str(out), "-q"]) == 0
    names = _relu_names(out)
    assert names and all(name.startswith("act_") for name in names)


def test_plugins_from_the_environment(plugin: Path, mlp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IROPT_PLUGINS", f"{os.pathsep}{plugin}{os.pathsep}")  # empty entries are skipped
    out = tmp_path / "renamed.onnx"
    assert main(["run", str(GOLDEN / "rename_relu.opt"), str(mlp), "-o", str(out), "-q"]) == 0
    assert all(name.startswith("act_") for name in _relu_names(out))
    # The plugin given twice (environment and flag) is loaded once.
    assert main(["passes", "--plugin", str(plugin), "rename_relu_nodes"]) == 0


def test_without_the_plugin_the_schedule_is_bad_input(mlp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(GOLDEN / "rename_relu.opt")]) == 2
    assert "unknown pass 'rename_relu_nodes'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_such_module_for_iropt", "cannot import module"), ("missing/plugin.py", "no such Python file")],
)
def test_a_plugin_that_cannot_be_imported_exits_2(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--plugin", spec, "cleanup"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_plugin_registering_a_taken_name_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clash = _write(tmp_path / "clash.py", """
        from dataclasses import dataclass
        from iropt import Pass, register_pass

        @register_pass("toposort")
        @dataclass(kw_only=True)
        class Clash(Pass):
            def run(self, model, ctx):
                raise AssertionError
    """)
    assert main(["check", "--plugin", str(clash), "cleanup"]) == 2
    assert "already registered" in capsys.readouterr().err


def test_entry_point_named_unlike_its_pass_is_not_registered_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "newuser_ep_plugin.py", """
        from dataclasses import dataclass
        from iropt import Pass, PassResult, register_pass

        @register_pass("newuser_own_name")
        @dataclass(kw_only=True)
        class OwnName(Pass):
            \"\"\"Registers itself under its own name.\"\"\"
            def run(self, model, ctx):
                return PassResult(changed=False)
    """)
    info = tmp_path / "newuser_ep_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: newuser-ep-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[iropt.passes]\nnewuser_entry_name = newuser_ep_plugin:OwnName\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(UnknownPassError, match="registered as 'newuser_own_name'"):
            PASSES.get("newuser_entry_name")
        assert PASSES.get("newuser_own_name").cls.name == "newuser_own_name"
        assert PASSES.names_from("newuser_ep_plugin") == ["newuser_own_name"]
        assert any("newuser_entry_name" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        PASSES.remove("newuser_own_name")
        sys.modules.pop("newuser_ep_plugin", None)


# --- 5. progress without a terminal --------------------------------------------------------------


def test_long_phases_print_one_line_without_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(console, "LONG_PHASE_SECONDS", 0.0)
    progress = console.make_progress(True)
    assert list(progress(iter(range(5)), "calibrating", total=5)) == list(range(5))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("iropt: calibrating... 5 steps")
    phases = console.PhaseProgress(True)
    for done in range(3):
        phases("Building engine", done, 3)
    phases("Tactic selection", 1, 2)
    assert capsys.readouterr().err.splitlines() == [
        "iropt: Building engine (3 steps)", "iropt: Tactic selection (2 steps)",
    ]


def test_short_phases_and_quiet_print_nothing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(console.make_progress(True)(iter(range(3)), "verifying", total=3)) == [0, 1, 2]
    monkeypatch.setattr(console, "LONG_PHASE_SECONDS", 0.0)
    assert list(console.make_progress(False)(iter(range(3)), "calibrating", total=3)) == [0, 1, 2]
    console.PhaseProgress(False)("Building engine", 0, 1)
    assert capsys.readouterr().err == ""


# --- 7. `iropt passes` wraps ---------------------------------------------------------------------


def test_passes_listing_shows_every_summary_in_full(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    words = " ".join(line.split("│")[-1].strip() for line in out.splitlines() if "│" in line).split()
    listed = " ".join(words).replace("- ", "-")
    for entry in PASSES.entries():
        assert entry.summary.replace(" ", "") in listed.replace(" ", ""), entry.name
    # A summary wrapped over two lines of the docstring is shown whole.
    assert "(or a Transpose of size-1 axes) when that is exact." in PASSES.get("merge_consecutive_reshapes").summary


# --- 8. failure text once; 10. report on every exit, --force with --verify-each ------------------


def test_verification_failure_is_said_once(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _write(tmp_path / "bad.opt", "newuser_add_becomes_sub\n")
    assert main(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx")]) == 1
    captured = capsys.readouterr()
    both = captured.out + captured.err
    fail_lines = [line for line in both.splitlines() if line.startswith("FAIL ")]
    assert fail_lines and len(fail_lines) == len(set(fail_lines))
    assert "first pass that breaks equivalence: #1 newuser_add_becomes_sub" in captured.err
    # With -q nothing was printed before, so the error carries the figures.
    assert main(["-q", "run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "FAIL " in captured.err


def test_verify_each_failure_writes_the_report_and_prints_the_table(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = _write(tmp_path / "bad.opt", "eliminate_identity\nnewuser_add_becomes_sub\neliminate_dead_code\n")
    report = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    assert main(["run", str(schedule), str(mlp), "-o", str(out), "--verify-each", "--report", str(report)]) == 1
    data = json.loads(report.read_text())
    assert data["verified"] is False and data["output"] is None and not out.exists()
    assert data["error"]["exit_code"] == 1 and "newuser_add_becomes_sub" in data["error"]["message"]
    assert [p["pass"] for p in data["passes"]] == ["eliminate_identity", "newuser_add_becomes_sub"]
    assert data["passes"][1]["notes"]["verify"]["passed"] is False
    captured = capsys.readouterr()
    assert "newuser_add_becomes_sub" in captured.out  # the table
    assert captured.err.count("changed the model's outputs") == 1


def test_force_with_verify_each_writes_the_whole_schedule(mlp: Path, tmp_path: Path) -> None:
    schedule = _write(tmp_path / "bad.opt", "newuser_add_becomes_sub\neliminate_dead_code\n")
    report = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    code = main(["-q", "run", str(schedule), str(mlp), "-o", str(out), "--verify-each", "--force", "--report", str(report)])
    assert code == 1 and out.is_file()
    data = json.loads(report.read_text())
    assert [p["pass"] for p in data["passes"]] == ["newuser_add_becomes_sub", "eliminate_dead_code"]
    assert data["first_failing_pass"] == {"index": 1, "pass": "newuser_add_becomes_sub"}
    assert data["pass_failures"][0]["pass"] == "newuser_add_becomes_sub"
    assert "Sub" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_force_with_verify_each_says_which_pass_failed_once(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _write(tmp_path / "bad.opt", "newuser_add_becomes_sub\n")
    assert main(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx"), "--verify-each", "--force"]) == 1
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert both.count("pass 1 'newuser_add_becomes_sub' changed the model's outputs") == 1
    assert "written anyway (--force)" in captured.err


def test_report_is_written_when_the_input_is_bad(tmp_path: Path) -> None:
    report = tmp_path / "reports" / "r.json"
    assert main(["-q", "run", "cleanup", str(tmp_path / "missing.onnx"), "--report", str(report)]) == 2
    data = json.loads(report.read_text())
    assert data["error"]["kind"] == "bad input" and data["error"]["exit_code"] == 2
    assert data["passes"] == [] and data["verified"] is False


# --- 11. bisection reuses what it has; 12. verification seconds ----------------------------------


def test_bisection_reuses_the_lossy_model_and_says_so(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _write(tmp_path / "bad.opt", """
        eliminate_identity
        newuser_counted_lossy
        toposort
        newuser_add_becomes_sub
        eliminate_dead_code
        verify(rtol=1e-4, atol=1e-5)
    """)
    CountedLossy.runs = 0
    report = tmp_path / "r.json"
    assert main(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx"), "--report", str(report)]) == 1
    assert CountedLossy.runs == 1  # not run again to bisect
    err = capsys.readouterr().err
    assert "bisecting" in err and "reusing 1 model" in err
    data = json.loads(report.read_text())
    assert data["first_failing_pass"] == {"index": 4, "pass": "newuser_add_becomes_sub"}
    assert data["seconds"]["bisection"] > 0


def test_verification_seconds_count_a_final_verify_statement(mlp: Path, tmp_path: Path) -> None:
    schedule = _write(tmp_path / "v.opt", "eliminate_identity\nverify(rtol=1e-4, atol=1e-5)\n")
    report = tmp_path / "r.json"
    assert main(["-q", "run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx"), "--report", str(report)]) == 0
    seconds = json.loads(report.read_text())["seconds"]
    # Two ONNX Runtime sessions (reference and result) at least: milliseconds, not 1e-5 s.
    assert 1e-3 < seconds["verification"] <= seconds["total"]


# --- 13. weights in Constant nodes ---------------------------------------------------------------


def _constant_weights_model(path: Path) -> Path:
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(weight, "w")),
            helper.make_node("Constant", [], ["b"], value=onnx.numpy_helper.from_array(np.ones(3, np.float32), "b")),
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        "paddle_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_inspect_counts_weights_held_by_constant_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _constant_weights_model(tmp_path / "m.onnx")
    assert main(["inspect", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == 15 and summary["parameter_bytes"] == 60
    assert main(["inspect", str(path)]) == 0
    assert "15 parameters, 60 bytes" in capsys.readouterr().out


# --- 9. relative error on the output's scale; top-1 only for class scores -------------------------


def test_relative_error_near_zero_is_taken_on_the_output_scale(capsys: pytest.CaptureFixture[str]) -> None:
    from iropt.verify.compare import REL_ERROR_FLOOR, compare
    from iropt.verify.criteria import EXACT_CRITERION

    ref = np.array([[0.0, 1.0, -2.0, 0.5]])
    cand = ref + 1e-7
    (out,) = compare([{"y": ref}], [{"y": cand}], EXACT_CRITERION).outputs
    # The error at the exact zero is measured against 1e-3 x the largest |reference| (2.0).
    assert out.max_rel == pytest.approx(1e-7 / (REL_ERROR_FLOOR * 2.0), rel=1e-6)
    # Away from zero it is the usual |error| / |reference|.
    (far,) = compare([{"y": ref + 10}], [{"y": cand + 10}], EXACT_CRITERION).outputs
    assert far.max_rel == pytest.approx(1e-7 / 8.0, rel=1e-6)
    # An all-zero reference has no scale: any error is an unbounded relative error.
    (zeros,) = compare([{"y": np.zeros(3)}], [{"y": np.full(3, 1e-7)}], EXACT_CRITERION).outputs
    assert zeros.max_rel > 1e100


@pytest.mark.parametrize(
    ("shape", "dtype", "has_top1"),
    [
        ((2, 10), np.float32, True),  # [batch, classes]
        ((10,), np.float32, True),  # [classes]
        ((1, 3, 8, 8), np.float32, False),  # a detection or segmentation map
        ((1, 84, 100), np.float32, False),  # a YOLO head: boxes and classes by anchor
        ((1, 16, 64), np.float32, False),  # a sequence of features
        ((2, 10), np.int64, False),  # indices, not scores
        ((2, 1), np.float32, False),  # one column: nothing to agree on
    ],
)
def test_top1_only_for_outputs_shaped_like_class_scores(shape: tuple[int, ...], dtype: type, has_top1: bool) -> None:
    from iropt.verify.compare import compare
    from iropt.verify.criteria import EXACT_CRITERION

    ref = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    (out,) = compare([{"y": ref}], [{"y": ref}], EXACT_CRITERION).outputs
    assert (out.top1 is not None) == has_top1
    assert ("top1=" in out.summary(EXACT_CRITERION)) == has_top1
