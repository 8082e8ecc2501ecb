"""Hostile input and faults, class by class: bad models, bad schedules, bad options, outputs that
are not files, interruption, concurrency and numerical traps. Each case holds the contract:
exit 0/1/2 as documented, one clear message and no traceback, nothing written on failure, the
input untouched (see tests/helpers_hostile.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx
import pytest
from helpers_hostile import (
    WEIGHT,
    Sandbox,
    add_model,
    assert_contract,
    duplicate_initializers,
    external_constant,
    external_in_subgraph,
    external_initializer,
    external_sparse,
    refused,
    run_cli,
    save,
    write_secret,
)
from onnx import TensorProto, helper, numpy_helper

from iropt import Model, Pass, PassContext, PassResult, register_pass
from iropt.errors import ModelLoadError, OptionError
from iropt.infra.options import Range, bind_options, option_specs
from iropt.io.load import load_model
from iropt.io.save import save_model
from iropt.verify.compare import compare
from iropt.verify.criteria import Criterion, default_tolerance
from iropt.verify.runtime import ort_message
from iropt.verify.verifier import Verifier

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(GOLDEN / "mlp.onnx", folder / "mlp.onnx")
    return folder / "mlp.onnx"


def _schedule(tmp_path: Path, text: str, name: str = "s.opt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- 1. one guard for every external reference ----------------------------------------------

EXTERNAL_KINDS = {
    "dense": external_initializer,
    "sparse": external_sparse,
    "constant": external_constant,
    "subgraph": external_in_subgraph,
}


@pytest.mark.parametrize("kind", sorted(EXTERNAL_KINDS))
@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_everywhere(
    kind: str, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = write_secret(tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "inside.bin"}[where]
    if where == "symlink":
        (folder / "inside.bin").symlink_to(secret)
    model = save(EXTERNAL_KINDS[kind](location), folder / "m.onnx")
    for command in (["inspect", str(model)], ["run", "cleanup", str(model), "-o", str(folder / "o.onnx")],
                    ["compare", str(model), str(model)]):
        refused(command, tmp_path, capsys, match="outside the model's folder")


@pytest.mark.parametrize("kind", sorted(EXTERNAL_KINDS))
def test_external_data_inside_the_folder_is_read_from_every_place(kind: str, tmp_path: Path) -> None:
    write_secret(tmp_path, "w.bin")
    model = load_model(save(EXTERNAL_KINDS[kind]("w.bin"), tmp_path / "m.onnx"))
    assert model.source_data_files == {(tmp_path / "w.bin").resolve()}
    out = Verifier(model, [{"x": np.zeros((1, 4), np.float32)}]).reference_outputs()[0]
    np.testing.assert_array_equal(out["y"], WEIGHT)


@pytest.mark.parametrize(
    ("offset", "length", "match"),
    [(0, 64, "past the end"), (12, 16, "past the end"), (1000, 16, "past the end"), (0, 8, "need 16")],
)
def test_external_byte_ranges_outside_the_file_are_bad_input(
    offset: int, length: int, match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_secret(tmp_path, "w.bin")
    model = save(external_initializer("w.bin", offset=offset, length=length), tmp_path / "m.onnx")
    other = save(add_model(), tmp_path / "other.onnx")
    for command in (["inspect", str(model)], ["compare", str(other), str(model)], ["compare", str(model), str(other)],
                    ["run", "cleanup", str(model), "-o", str(tmp_path / "o.onnx")]):
        refused(command, tmp_path, capsys, match=match)


def test_bad_external_data_fields_are_bad_input(tmp_path: Path) -> None:
    write_secret(tmp_path, "w.bin")
    for fields in ({"location": "w.bin", "offset": "minus one"}, {"location": "w.bin", "length": "-4"},
                   {"offset": "0"}, {"location": "."}):
        model = add_model()
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in fields.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        with pytest.raises(ModelLoadError):
            load_model(save(model, tmp_path / "m.onnx"))


@pytest.mark.parametrize(
    ("damage", "match"),
    [("type_0", "no valid element type"), ("type_99", "no valid element type"), ("negative_dim", "negative dimension"),
     ("short_raw_data", "the file is damaged"), ("producer_not_utf8", "not UTF-8"), ("ir_999", "IR version 999")],
)
def test_damaged_tensors_and_fields_are_bad_input(
    damage: str, match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = add_model()
    tensor = model.graph.initializer[0]
    if damage.startswith("type_"):
        tensor.data_type = int(damage.split("_")[1])
    elif damage == "negative_dim":
        tensor.dims[0] = -1
    elif damage == "short_raw_data":
        tensor.raw_data = tensor.raw_data[:-4]
    elif damage == "ir_999":
        model.ir_version = 999
    data = model.SerializeToString()
    if damage == "producer_not_utf8":
        model.producer_name = "iropt-test"
        data = model.SerializeToString().replace(b"iropt-test", b"\x80ropt-test")
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    for command in (["inspect", str(path)], ["run", "cleanup", str(path)]):
        refused(command, tmp_path, capsys, match=match)


# --- 2. names defined twice; the input file is the reference -------------------------------------


def test_duplicate_initializers_are_refused_by_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save(duplicate_initializers(), tmp_path / "dup.onnx")
    good = save(add_model(), tmp_path / "good.onnx")
    for command in (["inspect", str(model)], ["run", "cleanup", str(model), "-o", str(tmp_path / "o.onnx")],
                    ["compare", str(good), str(model)], ["compare", str(model), str(good)]):
        refused(command, tmp_path, capsys, match="defined more than once")


@pytest.mark.parametrize("where", ["initializer_and_node", "two_nodes", "subgraph"])
def test_values_defined_twice_are_refused(where: str, tmp_path: Path) -> None:
    model = add_model()
    if where == "initializer_and_node":
        model.graph.node.append(helper.make_node("Identity", ["x"], ["w"]))
    elif where == "two_nodes":
        model.graph.node.append(helper.make_node("Identity", ["x"], ["y"]))
    else:
        model = external_in_subgraph("unused.bin")
        branch = model.graph.node[0].attribute[0].g
        branch.node.append(helper.make_node("Identity", ["w_then"], [branch.output[0].name]))
    with pytest.raises(ModelLoadError, match="defined more than once"):
        load_model(save(model, tmp_path / "m.onnx"))


def test_the_reference_is_the_input_file_as_it_is(tmp_path: Path) -> None:
    path = save(add_model(), tmp_path / "m.onnx")
    model = load_model(path)
    model.graph.tensors()["w"].values = WEIGHT * 7  # what iropt holds differs from the file
    feeds = [{"x": np.zeros((1, 4), np.float32)}]
    from_file = Verifier(model, feeds, reference_file=path).reference_outputs()[0]["y"]
    np.testing.assert_array_equal(from_file, WEIGHT)
    assert not Verifier(model, feeds, reference_file=path).check(model, Criterion()).passed


# --- 3. vacuous verification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "cand"),
    [
        (np.full(6, np.nan, np.float32), np.full(6, np.nan, np.float32)),
        (np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)),
        (np.full(3, np.inf, np.float32), np.full(3, np.inf, np.float32)),
        (np.zeros(0, object), np.zeros(0, object)),
    ],
)
@pytest.mark.parametrize("metric", ["tolerance", "cosine", "snr", "max_abs"])
def test_a_comparison_of_nothing_is_not_a_pass(ref: np.ndarray, cand: np.ndarray, metric: str) -> None:
    bound = {"cosine": {"min": 0.9}, "snr": {"min": 10.0}, "max_abs": {"max": 1.0}}.get(metric, {})
    comparison = compare([{"y": ref}], [{"y": cand}], Criterion(metric=metric, **bound))  # type: ignore[arg-type]
    assert not comparison.passed
    assert "nothing was compared" in comparison.summary()
    assert "cosine=1" not in comparison.summary() and "snr=inf" not in comparison.summary()


def test_some_nan_where_both_agree_still_compares_the_rest() -> None:
    ref = np.array([np.nan, 1.0, 2.0], np.float32)
    assert compare([{"y": ref}], [{"y": ref.copy()}], Criterion()).passed
    assert not compare([{"y": ref}], [{"y": ref + 1}], Criterion()).passed


def test_a_zero_size_batch_fails_verification(mlp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(["run", "cleanup", str(mlp), "--shape", "input:0x64"], mlp.parent, capsys,
            match="compare nothing", code=1)


def test_zero_row_inputs_fail_verification(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "empty.npz"
    np.savez(inputs, input=np.zeros((0, 64), np.float32))
    refused(["run", "cleanup", str(mlp), "--inputs", str(inputs)], mlp.parent, capsys,
            match="compare nothing", code=1)


def test_all_nan_outputs_fail_verification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save(add_model(weight=np.full((1, 4), np.nan, np.float32)), tmp_path / "nan.onnx")
    refused(["run", "cleanup", str(model)], tmp_path, capsys, match="no finite value", code=1)
    refused(["compare", str(model), str(model)], tmp_path, capsys, match="no finite value", code=1)


@pytest.mark.parametrize(
    ("flags", "match"),
    [(["--rtol", "1e999"], "finite"), (["--rtol", "-1"], "rtol"), (["--rtol", "5"], "rtol"),
     (["--atol", "nan"], "finite"), (["--metric", "top1", "--min", "2"], "min"),
     (["--metric", "max_abs", "--max", "-1"], "max"), (["--samples", "0"], "samples"),
     (["--samples", "100000000"], "samples")],
)
def test_absurd_compare_tolerances_are_bad_input(
    flags: list[str], match: str, mlp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(["compare", str(mlp), str(mlp), *flags], mlp.parent, capsys, match=match)


# --- 4. schedules that would exhaust the machine, options out of range ---------------------------


@pytest.mark.parametrize(
    ("text", "where", "match"),
    [
        ("fold_constants(max_bytes=-1)\n", ":1:26:", "must be >= 0"),
        ("verify(rtol=-1)\n", ":1:13:", "must be between 0 and 1"),
        ("verify(rtol=1e999)\n", ":1:13:", "finite"),
        ("verify(atol=1e999)\n", ":1:13:", "finite"),
        ("verify(samples=100000000)\n", ":1:16:", "samples"),
        ("verify(metric=\"cosine\", min=-3)\n", ":1:1:", "min"),
        ("quantize(batch_size=0)\n", ":1:21:", "batch_size"),
        ("quantize(bins=99999999999)\n", ":1:15:", "bins"),
        ("fold_constants(max_bytes=99999999999999999999999)\n", ":1:26:", "64 bits"),
        ("target ort(intra_op_threads=-2)\n", ":1:", "intra_op_threads"),
        ("target ort(providers=[\"NoSuchEP\"])\n", ":1:8:", "NoSuchEP"),
        ("repeat(1000000000) { eliminate_identity }\n", ":1:8:", "at most 1000"),
        ("fixpoint(max=1000000) { eliminate_identity }\n", ":1:14:", "at most 1000"),
        ("repeat(1000) { repeat(1000) { eliminate_identity } }\n", ":1:1:", "limit is 100000"),
        ("repeat(2) {" * 1000 + "eliminate_identity" + "}" * 1000 + "\n", ":1:", "nest more than 32"),
        ("fold_constants(max_bytes=" + "[" * 5000 + "]" * 5000 + ")\n", ":1:", "nest more than 32"),
        ("x" * 60_000 + "\n", ":1:1:", "unknown pass"),
        ("eliminate_identity(" + "k" * 60_000 + "=1)\n", ":1:20:", "has no option"),
    ],
)
def test_schedule_limits_and_option_ranges_exit_2_at_line_and_column(
    text: str, where: str, match: str, mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = _schedule(tmp_path, text)
    for command in (["check", str(schedule)], ["run", str(schedule), str(mlp)]):
        outcome = refused(command, tmp_path, capsys, match=match)
        assert f"{schedule}{where}" in outcome.err


def test_a_huge_schedule_file_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _schedule(tmp_path, "eliminate_identity\n" * 600_000)  # 11 MB
    start = time.perf_counter()
    refused(["check", str(schedule)], tmp_path, capsys, match="schedules are limited to")
    assert time.perf_counter() - start < 5


def test_range_bounds_apply_to_every_pass_option_through_annotated() -> None:
    @dataclass(kw_only=True)
    class Bounded:
        ratio: Annotated[float, Range(min=0, max=1)] = 0.5
        counts: list[Annotated[int, Range(min=1)]] | None = None

    specs = option_specs(Bounded)
    assert [s.type_name for s in specs] == ["float (between 0 and 1)", "list[int (>= 1)] | None"]
    assert bind_options("pass 't'", specs, {"ratio": 1, "counts": [1, 2]}) == {"ratio": 1.0, "counts": [1, 2]}
    with pytest.raises(OptionError, match=r"option 'ratio' must be between 0 and 1, got 1\.5"):
        bind_options("pass 't'", specs, {"ratio": 1.5})
    with pytest.raises(OptionError, match=r"option 'counts' must be >= 1, got \[1, 0\]"):
        bind_options("pass 't'", specs, {"counts": [1, 0]})


# --- 5. errors that used to escape as internal errors ----------------------------------------------


@pytest.mark.parametrize(
    ("shape", "match"),
    [("input:99999999999x64", "GiB per sample"), ("input:" + "9" * 30 + "x64", "larger than"),
     ("input:-1x64", "non-negative"), ("input:1x64x", "dimensions"), ("nosuch:1x64", "no input")],
)
def test_absurd_shapes_are_bad_input(shape: str, match: str, mlp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(["run", "cleanup", str(mlp), "--shape", shape], mlp.parent, capsys, match=match)
    refused(["compare", str(mlp), str(mlp), "--shape", shape], mlp.parent, capsys, match=match)


def test_every_output_path_is_checked_before_the_work(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o.onnx")
    cases = [
        (["--report", str(tmp_path)], "directory"),
        (["--report", str(mlp)], "over a model of this run"),
        (["--report", out], "over a model of this run"),
        (["--dump-ir", str(mlp)], "--dump-ir names a file"),
    ]
    for flags, match in cases:
        refused(["run", "cleanup", str(mlp), "-o", out, *flags], tmp_path, capsys, match=match)


def test_compare_names_the_bad_file(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = add_model()
    broken.graph.node[0].op_type = "Frobnicate"
    bad = save(broken, tmp_path / "bad.onnx")
    good = save(add_model(), tmp_path / "good.onnx")
    outcome = refused(["compare", str(good), str(bad)], tmp_path, capsys, match=f"{bad}:")
    assert "transformed model" not in outcome.err
    refused(["compare", str(bad), str(good)], tmp_path, capsys, match=f"{bad}:")


# --- 6. outputs that are not regular files --------------------------------------------------------


@pytest.mark.parametrize("special", ["fifo", "device", "data_fifo"])
def test_outputs_that_are_not_regular_files_are_refused(
    special: str, mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if special == "device":
        out = Path(os.devnull)
    elif special == "fifo":
        out = tmp_path / "pipe.onnx"
        os.mkfifo(out)
    else:
        out = tmp_path / "o.onnx"
        os.mkfifo(tmp_path / "o.onnx.data")
    refused(["run", "cleanup", str(mlp), "-o", str(out)], tmp_path, capsys, match="not a regular file")
    assert special == "data_fifo" or (out.exists() and not out.is_file())
    if special == "fifo":
        refused(["run", "cleanup", str(mlp), "-o", str(tmp_path / "o.onnx"), "--report", str(out)], tmp_path, capsys,
                match="not a regular file")


# --- 7. interruption and concurrency ----------------------------------------------------------------


@register_pass("hostiletest_interrupt")
@dataclass(kw_only=True)
class Interrupt(Pass):
    """Test-only: behaves as if the user pressed Ctrl-C in the middle of the schedule."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise KeyboardInterrupt


def test_ctrl_c_in_a_run_exits_130_and_writes_nothing(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schedule = _schedule(tmp_path, "eliminate_identity\nhostiletest_interrupt\n")
    sandbox = Sandbox(tmp_path)
    outcome = run_cli(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx")], capsys)
    assert outcome.code == 130 and "Traceback" not in outcome.err and "interrupted" in outcome.err
    sandbox.assert_unchanged()


def test_a_ctrl_c_that_native_code_swallowed_still_stops_the_output(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from iropt.util import interrupt

    # As if SIGINT arrived and the KeyboardInterrupt was caught and cleared inside an extension.
    monkeypatch.setattr(interrupt, "_interrupted", True)
    sandbox = Sandbox(tmp_path)
    outcome = run_cli(["run", "cleanup", str(mlp), "-o", str(tmp_path / "o.onnx")], capsys)
    assert outcome.code == 130 and "Traceback" not in outcome.err
    sandbox.assert_unchanged()


def _wait_for_library(pid: int, name: str, timeout: float = 60) -> None:
    """Until process `pid` has mapped a shared library whose path contains `name`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in Path(f"/proc/{pid}/maps").read_text():
            return
        time.sleep(0.005)
    raise AssertionError(f"{name} never loaded")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see how far the process got")
@pytest.mark.parametrize("phase", ["numpy", "onnxruntime"])
def test_ctrl_c_while_the_console_script_works_exits_130_without_traceback(phase: str, mlp: Path, tmp_path: Path) -> None:
    # numpy loads while the command starts (its modules import); ONNX Runtime once it runs the model.
    script = Path(sys.executable).with_name("iropt")
    process = subprocess.Popen([str(script), "run", "default", str(mlp), "-o", str(tmp_path / "o.onnx"), "-q"],
                               stderr=subprocess.PIPE, text=True)
    _wait_for_library(process.pid, phase)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not (tmp_path / "o.onnx").exists() and not list(tmp_path.glob(".o.onnx*"))


def test_stale_staging_folders_of_a_killed_save_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    dead = tmp_path / ".o.onnx.iropt-999999999.abcd"  # no such process
    dead.mkdir()
    (dead / "o.onnx").write_bytes(b"partial")
    alive = tmp_path / f".o.onnx.iropt-{os.getpid()}.efgh"  # a save still running
    alive.mkdir()
    foreign = tmp_path / ".o.onnx.mine"  # not iropt's
    foreign.mkdir()
    save_model(Model.from_onnx(add_model()), out)
    assert not dead.exists() and alive.is_dir() and foreign.is_dir() and out.is_file()


def test_concurrent_saves_never_pair_one_model_with_the_other_data(tmp_path: Path) -> None:
    # Each model says in its doc string which weights it holds; its data file must hold them.
    out = tmp_path / "o.onnx"
    models = []
    for value in (1.0, 2.0):
        model = Model.from_onnx(add_model(weight=np.full((1, 4096), value, np.float32)))
        model.doc_string = str(value)
        models.append(model)
    for _ in range(6):
        errors: list[BaseException] = []

        def save_one(model: Model, errors: list[BaseException] = errors) -> None:
            try:
                save_model(model, out, external_data=True)
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=save_one, args=(m,)) for m in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert (tmp_path / "o.onnx.data").is_file()
        saved = onnx.load(str(out))
        assert set(numpy_helper.to_array(saved.graph.initializer[0]).ravel()) == {float(saved.doc_string)}
    assert not list(tmp_path.glob(".o.onnx.iropt-*"))


# --- 8. validation before any output ------------------------------------------------------------------


def test_a_target_that_cannot_run_here_fails_before_anything_is_written(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = _schedule(tmp_path, "target ort(providers=[\"NoSuchEP\"])\neliminate_identity\n")
    refused(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx")], tmp_path, capsys, match="NoSuchEP")
    artefact = tmp_path / "o.ort"
    artefact.mkdir()
    ort_format = _schedule(tmp_path, "target ort(save_ort_format=true)\neliminate_identity\n", "f.opt")
    refused(["run", str(ort_format), str(mlp), "-o", str(tmp_path / "o.onnx")], tmp_path, capsys,
            match="names a directory")


def test_tensorrt_target_without_tensorrt_fails_before_the_work(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from iropt.lowering import tensorrt as trt_backend

    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setattr(trt_backend, "_api", None)
    schedule = _schedule(tmp_path, "target tensorrt\neliminate_identity\n")
    refused(["run", str(schedule), str(mlp), "-o", str(tmp_path / "o.onnx")], tmp_path, capsys, match="tensorrt")


# --- 9. messages in the user's terms ------------------------------------------------------------------


def test_onnx_runtime_messages_lose_their_cpp_signatures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    never = add_model()
    never.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))
    cycle = add_model()
    cycle.graph.node[0].input[1] = "v"
    cycle.graph.initializer.pop()
    cycle.graph.node.append(helper.make_node("Relu", ["y"], ["v"]))
    for name, model in {"never": never, "cycle": cycle, "opset": add_model(opset=99)}.items():
        outcome = refused(["run", "cleanup", str(save(model, tmp_path / f"{name}.onnx"))], tmp_path, capsys)
        assert "onnxruntime::" not in outcome.err and "onnxruntime_src" not in outcome.err, outcome.err
        assert "--shape" not in outcome.err, outcome.err
        assert len(outcome.err.strip().splitlines()) == 1, outcome.err


def test_ort_message_keeps_the_cause() -> None:
    raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
           "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&) "
           "Unsupported model IR version: 99, max supported IR version: 14")
    assert ort_message(RuntimeError(raw)) == "Unsupported model IR version: 99, max supported IR version: 14"


def test_long_names_are_cut_in_messages(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_name = "p" * 100_000
    outcome = refused(["passes", long_name], tmp_path, capsys, match="unknown pass")
    assert len(outcome.err) < 500
    refused(["run", long_name + ".opt", str(mlp)], tmp_path, capsys)
    refused(["inspect", str(tmp_path / long_name[:5000])], tmp_path, capsys, match="too long")
    refused(["run", "cleanup", str(mlp), "-o", str(tmp_path / long_name[:5000])], tmp_path, capsys, match="too long")


def test_an_unreadable_file_is_called_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save(add_model(), tmp_path / "m.onnx")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: every file is readable")
        refused(["inspect", str(path)], tmp_path, capsys, match="permission denied")
    finally:
        path.chmod(0o644)


# --- 10. default tolerances from the output type ---------------------------------------------------------


def _conv_bn_fp16() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    channels = 8
    weight = (rng.standard_normal((channels, 3, 3, 3)) * 0.5).astype(np.float16)
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float16)
    bias = rng.standard_normal(channels).astype(np.float16)
    mean = rng.standard_normal(channels).astype(np.float16)
    var = rng.uniform(0.5, 2.0, channels).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])],
        "conv_bn16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, channels, 16, 16])],
        [numpy_helper.from_array(a, n) for a, n in ((weight, "w"), (scale, "s"), (bias, "b"), (mean, "m"), (var, "v"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fp16_bn_fusion_passes_at_the_types_default_tolerance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save(_conv_bn_fp16(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    schedule = _schedule(tmp_path, "fuse_bn_conv\n")
    outcome = run_cli(["run", str(schedule), str(model), "-o", str(out)], capsys)
    assert_contract(outcome, 0)
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv"]
    # Held to the fp32 default, the same fusion fails: the wider default is what lets it pass.
    strict = run_cli(["compare", str(model), str(out), "--rtol", "1e-4", "--atol", "1e-5", "-q"], capsys)
    assert strict.code == 1


def test_default_tolerance_follows_the_type() -> None:
    assert default_tolerance(np.float32) == (1e-4, 1e-5)
    rtol16, atol16 = default_tolerance(np.float16)
    assert rtol16 == pytest.approx(4 * 2.0**-10) and atol16 == pytest.approx(2.0**-10)
    assert default_tolerance(np.int64) == (1e-4, 1e-5)
    assert Criterion(rtol=1e-6).tolerance_for(np.float16) == (1e-6, pytest.approx(2.0**-10))
