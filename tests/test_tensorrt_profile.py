"""Optimization profiles: `--shape NAME:MIN,OPT,MAX`, the target's shape options, the defaults,
the profile printed and reported, and a failed build that names the dynamic dimensions and
leaves nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_trt import GPU, conv_model, requires_tensorrt
from onnx import TensorProto, helper

from iropt.app.cli import main
from iropt.errors import UserError
from iropt.io.save import save_model
from iropt.ir.model import Model
from iropt.lowering.tensorrt import load_tensorrt
from iropt.lowering.tensorrt_profile import failure_hint, resolve_profile, target_ranges
from iropt.verify.feeds import ShapeRange, parse_shape_overrides, parse_shape_ranges

# --- parsing --shape ---------------------------------------------------------------------------


def test_one_shape_is_min_opt_and_max() -> None:
    assert parse_shape_ranges(["x:2x3x8x8"]) == {"x": ShapeRange((2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 8, 8))}


def test_three_shapes_are_a_range_and_verification_uses_opt() -> None:
    item = "images:1x3x320x320,4x3x640x640,8x3x1280x1280"
    ranges = parse_shape_ranges([item])
    assert ranges["images"] == ShapeRange((1, 3, 320, 320), (4, 3, 640, 640), (8, 3, 1280, 1280), ranged=True)
    assert ranges["images"].describe() == "min 1x3x320x320, opt 4x3x640x640, max 8x3x1280x1280"
    assert parse_shape_overrides([item]) == {"images": [4, 3, 640, 640]}


def test_comma_separated_dimensions_stay_one_shape() -> None:
    assert parse_shape_ranges(["input:0:2,5"]) == {"input:0": ShapeRange((2, 5), (2, 5), (2, 5))}


@pytest.mark.parametrize(
    ("item", "text"),
    [
        ("x:1x3,2x3", "MIN,OPT,MAX"),
        ("x:1x3,2x3,4x3,8x3", "not 4"),
        ("x:4x3,2x3,8x3", "MIN <= OPT <= MAX"),
        ("x:1x3,2x3x1,4x3", "same rank"),
        ("x:1x3,ax3,4x3", "non-negative integers"),
    ],
)
def test_bad_ranges_are_user_errors(item: str, text: str) -> None:
    with pytest.raises(UserError, match=text):
        parse_shape_ranges([item])


# --- resolving the profile -----------------------------------------------------------------------


def test_a_dynamic_batch_defaults_and_fixed_inputs_need_no_profile() -> None:
    profile = resolve_profile([("x", [-1, 3, 8, 8]), ("k", [4])], {}, {})
    assert [(p.name, p.min, p.opt, p.max, p.source) for p in profile] == [
        ("x", (1, 3, 8, 8), (1, 3, 8, 8), (8, 3, 8, 8), "default"),
    ]


def test_a_dynamic_image_size_needs_a_range_and_says_how() -> None:
    with pytest.raises(UserError) as caught:
        resolve_profile([("images", [-1, 3, -1, -1])], {}, {})
    message = str(caught.value)
    assert "dynamic dimension(s) 2, 3" in message
    assert "--shape images:MIN,OPT,MAX" in message and "images:1x3x256x256,1x3x512x512,8x3x1024x1024" in message


def test_the_command_line_beats_the_target() -> None:
    target = target_ranges({"max_shapes": {"x": [16, 3, 8, 8]}})
    command_line = parse_shape_ranges(["x:1x3x8x8,2x3x8x8,4x3x8x8"])
    (entry,) = resolve_profile([("x", [-1, 3, 8, 8])], command_line, target)
    assert (entry.max, entry.source) == ((4, 3, 8, 8), "--shape")
    (entry,) = resolve_profile([("x", [-1, 3, 8, 8])], {}, target)
    assert (entry.min, entry.max, entry.source) == ((16, 3, 8, 8), (16, 3, 8, 8), "target")


def test_an_unknown_input_name_is_suggested() -> None:
    with pytest.raises(UserError, match=r"--shape names input 'inputs'.*'input'"):
        resolve_profile([("input", [-1, 4])], parse_shape_ranges(["inputs:1x4"]), {})


def test_the_failure_hint_names_the_dynamic_dimensions() -> None:
    profile = resolve_profile([("x", [-1, 3, -1, -1])], parse_shape_ranges(["x:1x3x32x32,2x3x64x64,4x3x128x128"]), {})
    hint = failure_hint(profile)
    assert "dynamic dimension(s) 0 (1..4, opt 2), 2 (32..128, opt 64), 3 (32..128, opt 64)" in hint
    assert "--shape x:1x3x32x32,2x3x64x64,4x3x128x128" in hint
    assert failure_hint([]) == ""


# --- builds and runs ----------------------------------------------------------------------------


def image_model() -> Model:
    """x[1, 3, h, w] -> Relu: a model with a dynamic image size."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "images",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])],
    )
    return Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def trt_schedule(folder: Path, target: str = "target tensorrt") -> str:
    """A schedule file with `target` and one exact pass."""
    schedule = folder / "trt.opt"
    schedule.write_text(f"{target}\neliminate_identity\n")
    return str(schedule)


@requires_tensorrt
def test_run_refuses_an_unranged_image_size_before_the_schedule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_model(image_model(), tmp_path / "images.onnx")
    assert main(["run", trt_schedule(tmp_path), str(source), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--shape x:MIN,OPT,MAX" in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


@requires_tensorrt
def test_run_builds_the_given_range_prints_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_model(image_model(), tmp_path / "images.onnx")
    schedule = trt_schedule(tmp_path, "target tensorrt(builder_optimization_level=0)")
    report = tmp_path / "report.json"
    code = main(["run", schedule, str(source), "--shape", "x:1x3x16x16,1x3x32x32,1x3x64x64",
                 "--report", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "engine profile: x: min 1x3x16x16, opt 1x3x32x32, max 1x3x64x64 (--shape)" in out
    assert "engine not run: no GPU" in out or "engine run on the GPU" in out
    data = json.loads(report.read_text())
    assert data["target_build"]["profile"]["x"] == {
        "min": [1, 3, 16, 16], "opt": [1, 3, 32, 32], "max": [1, 3, 64, 64], "source": "--shape",
    }
    assert "GPU" in data["target_build"]["engine_run"]
    # Verification ran at the OPT shape.
    assert data["comparisons"][0]["outputs"][0]["shape"] == [1, 3, 32, 32]


@requires_tensorrt
def test_a_failed_engine_build_leaves_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if load_tensorrt().flavor != "tensorrt_rtx":
        pytest.skip("a tiny workspace fails the build in tensorrt_rtx; TensorRT may find a tactic anyway")
    source = save_model(conv_model(), tmp_path / "net.onnx")
    assert main(["run", trt_schedule(tmp_path, "target tensorrt(workspace=1KiB)"), str(source)]) == 2
    err = capsys.readouterr().err
    assert "failed to build the engine" in err and "net.opt.onnx was not written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "trt.opt"]


@requires_tensorrt
@pytest.mark.skipif(not GPU, reason="running a TensorRT engine needs an NVIDIA GPU (and torch with CUDA)")
def test_with_a_gpu_the_engine_is_checked_at_min_opt_and_max(tmp_path: Path) -> None:
    source = save_model(conv_model(), tmp_path / "net.onnx")
    report = tmp_path / "report.json"
    assert main(["-q", "run", trt_schedule(tmp_path), str(source), "--shape", "x:1x3x8x8,2x3x8x8,4x3x8x8",
                 "--report", str(report)]) == 0
    build = json.loads(report.read_text())["target_build"]
    assert [check["shape"] for check in build["engine_checks"]] == ["min", "opt", "max"]
    assert all(check["passed"] for check in build["engine_checks"])
    assert build["engine_run"].startswith("engine run on the GPU at 3 shape(s)")
