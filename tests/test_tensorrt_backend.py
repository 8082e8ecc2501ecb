"""The TensorRT back end: options, engine builds with profiles and a timing cache, parser and
builder errors, emitted engines, and running (on a GPU) or the clear refusal without one.

Builds use whichever TensorRT is installed (`tensorrt`, else `tensorrt_rtx`, which builds
engines without a GPU); without either the build tests skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_trt import GPU, conv_model, custom_op_model, float16_conv_model, qdq_conv, requires_tensorrt

from iropt.errors import OptionError, UserError
from iropt.infra.options import option_specs
from iropt.infra.registry import BACKENDS
from iropt.io.save import save_model
from iropt.lowering import tensorrt as trt_backend
from iropt.lowering.tensorrt import (
    DYNAMIC_MAX,
    DYNAMIC_MIN,
    DYNAMIC_OPT,
    INSTALL_HINT,
    NO_GPU_MESSAGE,
    TensorRTBackend,
    load_tensorrt,
    tensorrt_flavor,
)
from iropt.verify.feeds import parse_shape_ranges

# --- options and installation ---------------------------------------------------------------------


def test_registered_with_typed_options_and_defaults() -> None:
    entry = BACKENDS.get("tensorrt")
    assert entry.cls is TensorRTBackend
    defaults = {spec.name: spec.default for spec in option_specs(TensorRTBackend)}
    assert defaults == {
        "precision": "auto",
        "require_precision": False,
        "workspace": 1 << 30,
        "min_shapes": {},
        "opt_shapes": {},
        "max_shapes": {},
        "timing_cache": None,
        "builder_optimization_level": 3,
        "engine_path": None,
    }


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"precision": "int4"}, "precision"),
        ({"workspace": 0}, "workspace"),
        ({"builder_optimization_level": 6}, "builder_optimization_level.*between 0 and 5"),
        ({"max_shapes": {"x": [1, "a"]}}, "max_shapes"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], text: str) -> None:
    with pytest.raises(OptionError, match=text):
        BACKENDS.create("tensorrt", options)


def test_schedule_shapes_as_name_dims_strings_equal_the_dict_form() -> None:
    listed = TensorRTBackend(max_shapes=["x:16x3x8x8", "input:0:4x2"])
    assert listed.max_shapes == {"x": [16, 3, 8, 8], "input:0": [4, 2]}


@pytest.mark.parametrize("item", ["x16x3", "x:16x3x", ":4x4", "x:a"])
def test_malformed_shape_strings_are_option_errors(item: str) -> None:
    with pytest.raises(OptionError, match="NAME:DIMS"):
        TensorRTBackend(min_shapes=[item])


def test_a_shape_given_twice_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="twice"):
        TensorRTBackend(opt_shapes=["x:1x3", "x:2x3"])


def test_missing_tensorrt_is_a_user_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setattr(trt_backend, "_api", None)
    with pytest.raises(UserError) as caught:
        TensorRTBackend().build_engine(conv_model())
    assert str(caught.value).startswith(INSTALL_HINT)
    assert tensorrt_flavor() is None


@requires_tensorrt
def test_the_installed_tensorrt_is_found() -> None:
    api = load_tensorrt()
    assert api.flavor in ("tensorrt", "tensorrt_rtx")
    assert api.label.startswith(api.flavor + " ")


# --- building -------------------------------------------------------------------------------------


@requires_tensorrt
def test_dynamic_batch_gets_a_default_profile() -> None:
    backend = TensorRTBackend()
    engine = backend.build_engine(conv_model())
    # A TensorRT plan file starts with a four-byte magic ending in "trt" and names its I/O tensors.
    assert engine[1:4] == b"trt"
    assert b"conv0" in engine and b"relu0" in engine
    report = backend.last_build
    assert report is not None and report.engine_bytes == len(engine) and report.seconds > 0
    assert report.profiles == {
        "x": ([DYNAMIC_MIN, 3, 8, 8], [DYNAMIC_OPT, 3, 8, 8], [DYNAMIC_MAX, 3, 8, 8])
    }
    assert report.profile[0].source == "default"
    assert any("defaults to min" in note for note in report.notes)
    assert "engine profile: x: min 1x3x8x8, opt 1x3x8x8, max 8x3x8x8 (default)" in report.lines()


@requires_tensorrt
def test_given_profile_shapes_are_used() -> None:
    backend = TensorRTBackend(min_shapes={"x": [2, 3, 8, 8]}, opt_shapes={"x": [4, 3, 8, 8]},
                              max_shapes={"x": [16, 3, 8, 8]})
    assert backend.build_engine(conv_model())
    assert backend.last_build is not None
    assert backend.last_build.profiles == {"x": ([2, 3, 8, 8], [4, 3, 8, 8], [16, 3, 8, 8])}
    assert backend.last_build.profile[0].source == "target"
    assert not any("defaults to min" in note for note in backend.last_build.notes)


@requires_tensorrt
def test_one_target_shape_alone_fixes_the_profile_there() -> None:
    backend = TensorRTBackend(max_shapes={"x": [32, 3, 8, 8]})
    backend.build_engine(conv_model())
    assert backend.last_build is not None
    assert backend.last_build.profiles["x"] == ([32, 3, 8, 8], [32, 3, 8, 8], [32, 3, 8, 8])


@requires_tensorrt
def test_command_line_ranges_take_precedence_over_the_target() -> None:
    backend = TensorRTBackend(max_shapes={"x": [32, 3, 8, 8]})
    backend.build_engine(conv_model(), parse_shape_ranges(["x:1x3x8x8,2x3x8x8,4x3x8x8"]))
    assert backend.last_build is not None
    assert backend.last_build.profiles["x"] == ([1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8])
    assert backend.last_build.profile[0].source == "--shape"


@requires_tensorrt
def test_static_model_needs_no_profile() -> None:
    backend = TensorRTBackend()
    assert backend.build_engine(conv_model(batch=2))
    assert backend.last_build is not None and backend.last_build.profiles == {}


@requires_tensorrt
@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"max_shapes": {"images": [8, 3, 8, 8]}}, "names input 'images'"),
        ({"max_shapes": {"x": [8, 3, 8]}}, "rank 3"),
        ({"max_shapes": {"x": [8, 3, 16, 8]}}, "dimension 2 is fixed at 8"),
        ({"min_shapes": {"x": [4, 3, 8, 8]}, "max_shapes": {"x": [2, 3, 8, 8]}}, "1 <= min <= opt <= max"),
    ],
)
def test_bad_profile_shapes_are_user_errors(options: dict[str, dict[str, list[int]]], text: str) -> None:
    with pytest.raises(UserError, match=text):
        TensorRTBackend(**options).build_engine(conv_model())  # type: ignore[arg-type]


@requires_tensorrt
def test_parser_errors_list_every_unsupported_node() -> None:
    with pytest.raises(UserError) as caught:
        TensorRTBackend().build_engine(custom_op_model())
    message = str(caught.value)
    assert "cannot parse the model (2 error(s))" in message
    assert "node 'mystery_a' (Mystery)" in message and "node 'enigma_b' (Enigma)" in message
    assert "register a TensorRT plugin" in message


@requires_tensorrt
def test_builder_failure_quotes_the_builder_and_names_the_fix() -> None:
    if load_tensorrt().flavor != "tensorrt_rtx":
        pytest.skip("a tiny workspace fails the build in tensorrt_rtx; TensorRT may find a tactic anyway")
    with pytest.raises(UserError) as caught:
        TensorRTBackend(workspace=1024).build_engine(conv_model())
    message = str(caught.value)
    assert "failed to build the engine" in message and "workspace" in message
    assert "raise the back end's workspace option (now 1,024 bytes)" in message
    # The dynamic dimensions and how to give their range (tensorrt_profile.failure_hint).
    assert "the optimization profile was:" in message
    assert "x: min 1x3x8x8, opt 1x3x8x8, max 8x3x8x8 (default); dynamic dimension(s) 0 (1..8, opt 1)" in message
    assert "--shape x:1x3x8x8,1x3x8x8,8x3x8x8" in message


@requires_tensorrt
def test_int8_needs_an_explicitly_quantized_model() -> None:
    with pytest.raises(UserError, match=r'quantize\(format="tensorrt"\)'):
        TensorRTBackend(precision="int8").build_engine(conv_model())


@requires_tensorrt
def test_int8_builds_a_qdq_model_strongly_typed_and_runs_it_in_int8() -> None:
    backend = TensorRTBackend(precision="int8", require_precision=True)
    assert backend.build_engine(qdq_conv())
    report = backend.last_build
    assert report is not None and report.strongly_typed
    assert report.precisions is not None
    assert report.precisions.requested == {"conv": "int8"} and report.precisions.realized["conv"] == "int8"
    assert report.precisions.missed == []


@requires_tensorrt
def test_fp16_comes_from_the_graph() -> None:
    with pytest.raises(UserError, match=r"no float16 tensors.*convert_fp16"):
        TensorRTBackend(precision="fp16").build_engine(conv_model())
    backend = TensorRTBackend(precision="fp16", require_precision=True)
    assert backend.build_engine(float16_conv_model())
    report = backend.last_build
    assert report is not None and report.precisions is not None
    assert report.precisions.realized == {"conv16": "fp16"}


@requires_tensorrt
def test_fp32_refuses_a_model_with_lower_precision_tensors() -> None:
    with pytest.raises(UserError, match="precision='auto'"):
        TensorRTBackend(precision="fp32").build_engine(qdq_conv())


def test_no_builder_precision_flags_are_used() -> None:
    # Precision comes from the graph: TensorRT 11 removed the FP16/INT8 flags, and 10.x must
    # build the same graph the same way.
    source = Path(trt_backend.__file__).read_text()
    assert "BuilderFlag" not in source and "set_flag" not in source


@requires_tensorrt
def test_progress_callback_sees_the_builder_phases() -> None:
    events: list[tuple[str, int, int]] = []
    backend = TensorRTBackend()
    backend.progress = lambda phase, done, total: events.append((phase, done, total))
    backend.build_engine(conv_model())
    phases = {phase for phase, _, _ in events}
    assert "Building engine" in phases
    assert all(0 <= done <= total for _, done, total in events)


@requires_tensorrt
def test_a_progress_callback_that_raises_cancels_the_build() -> None:
    class Stop(Exception):
        pass

    def stop(phase: str, done: int, total: int) -> None:
        raise Stop(phase)

    backend = TensorRTBackend()
    backend.progress = stop
    with pytest.raises(Stop):
        backend.build_engine(conv_model())


# --- timing cache ---------------------------------------------------------------------------------

requires_timing_cache = pytest.mark.skipif(
    tensorrt_flavor() != "tensorrt",
    reason="only TensorRT has a build-time timing cache (tensorrt_rtx keeps a no-op API whose reload needs a GPU)",
)


@requires_tensorrt
@requires_timing_cache
def test_timing_cache_is_written_then_reused(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    first = TensorRTBackend(timing_cache=str(cache))
    first.build_engine(conv_model())
    assert first.last_build is not None and not first.last_build.timing_cache_loaded
    assert cache.read_bytes()

    second = TensorRTBackend(timing_cache=str(cache))
    second.build_engine(conv_model())
    assert second.last_build is not None and second.last_build.timing_cache_loaded
    assert not any("was not used" in note for note in second.last_build.notes)
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]  # no temporary files left


@requires_tensorrt
@requires_timing_cache
def test_unreadable_timing_cache_is_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a timing cache")
    backend = TensorRTBackend(timing_cache=str(cache))
    assert backend.build_engine(conv_model())
    assert backend.last_build is not None and not backend.last_build.timing_cache_loaded
    assert any("was not used" in note for note in backend.last_build.notes)
    again = TensorRTBackend(timing_cache=str(cache))
    again.build_engine(conv_model())
    assert again.last_build is not None and again.last_build.timing_cache_loaded


@requires_tensorrt
@pytest.mark.skipif(tensorrt_flavor() != "tensorrt_rtx", reason="tensorrt_rtx only")
def test_tensorrt_rtx_ignores_the_timing_cache_and_says_so(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    backend = TensorRTBackend(timing_cache=str(cache))
    assert backend.build_engine(conv_model())
    assert backend.last_build is not None and backend.last_build.timing_cache is None
    assert any(note.startswith("timing_cache ignored: tensorrt_rtx") for note in backend.last_build.notes)
    assert not cache.exists()


# --- emit -----------------------------------------------------------------------------------------


@requires_tensorrt
def test_emit_writes_the_engine_beside_the_onnx(tmp_path: Path) -> None:
    model = conv_model()
    onnx_path = save_model(model, tmp_path / "net.opt.onnx")
    written = TensorRTBackend().emit(model, onnx_path)
    assert written == [tmp_path / "net.opt.engine"]
    data = written[0].read_bytes()
    assert data[1:4] == b"trt" and b"conv0" in data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.opt.engine", "net.opt.onnx"]
    # Every artefact gets the model's mode (0666 less the umask), not a temporary file's 0600.
    assert written[0].stat().st_mode & 0o777 == onnx_path.stat().st_mode & 0o777


@requires_tensorrt
def test_emit_honours_engine_path(tmp_path: Path) -> None:
    model = conv_model()
    target = tmp_path / "engines" / "served.plan"
    target.parent.mkdir()
    written = TensorRTBackend(engine_path=str(target)).emit(model, tmp_path / "net.onnx")
    assert written == [target] and target.stat().st_size > 0


@requires_tensorrt
def test_emit_into_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        TensorRTBackend(engine_path=str(tmp_path / "nowhere" / "x.engine")).emit(conv_model(), tmp_path / "n.onnx")


# --- running --------------------------------------------------------------------------------------


@requires_tensorrt
@pytest.mark.skipif(GPU, reason="a CUDA GPU is present: the engine runs instead")
def test_compile_without_a_gpu_says_the_engine_was_built() -> None:
    with pytest.raises(UserError) as caught:
        TensorRTBackend().compile(conv_model())
    message = str(caught.value)
    assert message.startswith(NO_GPU_MESSAGE)
    assert "bytes" in message and "NVIDIA GPU" in message


@requires_tensorrt
@pytest.mark.skipif(not GPU, reason="running a TensorRT engine needs an NVIDIA GPU (and torch with CUDA)")
def test_compiled_engine_matches_onnx_runtime() -> None:
    from iropt.verify.runtime import reference_runner

    model = conv_model()
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    expected = reference_runner(model).run(feeds)
    runner = TensorRTBackend(max_shapes={"x": [8, 3, 8, 8]}).compile(model)
    got = runner.run(feeds)
    assert set(got) == {"y"} and got["y"].shape == expected["y"].shape
    # TensorRT may pick TF32 kernels for fp32 convolutions on Ampere and later.
    np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-3, atol=1e-3)
    with pytest.raises(UserError, match="outside the engine's optimization profile"):
        runner.run({"x": np.zeros((9, 3, 8, 8), np.float32)})


# --- from a schedule ------------------------------------------------------------------------------


@requires_tensorrt
def test_schedule_target_builds_with_its_profile(tmp_path: Path) -> None:
    from iropt.dsl import load_schedule

    schedule = tmp_path / "trt.opt"
    schedule.write_text('target tensorrt(max_shapes=["x:16x3x8x8"], builder_optimization_level=1)\neliminate_identity\n')
    target = load_schedule(schedule).target
    assert target is not None and target.name == "tensorrt"
    backend = BACKENDS.create(target.name, dict(target.options))
    assert backend.build_engine(conv_model())
    assert backend.last_build is not None
    assert backend.last_build.profiles["x"][2] == [16, 3, 8, 8]


@requires_tensorrt
def test_iropt_run_writes_the_engine_beside_the_optimized_model(tmp_path: Path) -> None:
    from iropt.app.optimize import RunOptions, optimize

    schedule = tmp_path / "trt.opt"
    schedule.write_text("target tensorrt\neliminate_identity\n")
    source = save_model(conv_model(), tmp_path / "net.onnx")
    outcome = optimize(RunOptions(schedule=str(schedule), model=source))
    assert outcome.verified and outcome.output == tmp_path / "net.opt.onnx"
    assert outcome.emitted == [tmp_path / "net.opt.engine"]
    assert outcome.emitted[0].read_bytes()[1:4] == b"trt"


@requires_tensorrt
def test_iropt_run_reports_parser_errors_per_node_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from iropt.app.cli import main

    source = save_model(custom_op_model(), tmp_path / "custom.onnx", check=None)
    schedule = tmp_path / "trt.opt"
    schedule.write_text("target tensorrt\neliminate_identity\n")
    assert main(["run", str(schedule), str(source), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "node 'mystery_a' (Mystery)" in err and "node 'enigma_b' (Enigma)" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx", "trt.opt"]
