"""The parts of `iropt batch` and `iropt tune` that need no Ray cluster: manifests, result keys,
the ledger, search spaces, constraints, trial schedules, the Pareto front and its plot, and the
message when Ray is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from iropt.app.batch import BatchItem, Ledger, item_key, items_from_paths, read_manifest
from iropt.app.cli import main
from iropt.app.pareto import Point, pareto_front, write_svg
from iropt.app.tune import best_trial, parse_constraint, read_space, trial_schedule
from iropt.dsl import parse_schedule
from iropt.errors import UserError

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"


# --- without Ray ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["batch", "default", str(GOLDEN / "mlp.onnx")],
    ["tune", str(GOLDEN / "mlp.onnx"), "--space", "space.toml"],
])
def test_without_ray_batch_and_tune_say_how_to_install_it(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    assert main([*command, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'iropt[distributed]'" in err and "Traceback" not in err
    assert not out.exists()


# --- batch: manifests, keys, ledger ---------------------------------------------------------


def test_golden_manifest_reads_as_a_batch_with_inputs() -> None:
    items = read_manifest(GOLDEN / "manifest.json")
    names = [item.name for item in items]
    assert "resnet" in names and len(names) == len(set(names))
    resnet = next(item for item in items if item.name == "resnet")
    assert resnet.model == str(GOLDEN / "resnet.onnx") and resnet.inputs == str(GOLDEN / "resnet.inputs.npz")


def test_toml_manifest_with_shapes_and_repeated_names(tmp_path: Path) -> None:
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(f"""
[[models]]
model = "{GOLDEN / 'mlp.onnx'}"
shapes = {{ input = [4, 16] }}
calibration = "pkg.data:batches"

[[models]]
path = "{GOLDEN / 'mlp.onnx'}"
""")
    first, second = read_manifest(manifest)
    assert (first.name, second.name) == ("mlp", "mlp_2")
    assert first.shapes == {"input": [4, 16]} and first.calibration == "pkg.data:batches"


@pytest.mark.parametrize("text, message", [
    ("models = []", "non-empty list"),
    ("[[models]]\nname = 'x'", "no model path"),
    ("[[models]]\nmodel = 'a.onnx'\nshapes = { x = 'big' }", "lists of integers"),
    ("models = [", "cannot read the manifest"),
])
def test_bad_manifests_are_user_errors(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "bad.toml"
    manifest.write_text(text)
    with pytest.raises(UserError, match=message):
        read_manifest(manifest)


def test_result_key_follows_model_content_schedule_and_options(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes((GOLDEN / "mlp.onnx").read_bytes())
    (item,) = items_from_paths([model])
    key = item_key(item, "cleanup-text", True)
    assert key == item_key(item, "cleanup-text", True)
    assert key != item_key(item, "other-text", True)
    assert key != item_key(item, "cleanup-text", False)
    assert key != item_key(BatchItem(item.name, item.model, shapes={"x": [1]}), "cleanup-text", True)
    model.write_bytes((GOLDEN / "conv_bn.onnx").read_bytes())  # same path, new content
    assert key != item_key(item, "cleanup-text", True)


def test_ledger_keeps_final_rows_whose_outputs_exist(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    output = tmp_path / "a.opt.onnx"
    output.write_bytes(b"x")
    ledger.append({"key": "a", "status": "ok", "output": str(output)})
    ledger.append({"key": "b", "status": "ok", "output": str(tmp_path / "gone.onnx")})
    ledger.append({"key": "c", "status": "lost", "output": None})
    ledger.append({"key": "d", "status": "bad_input", "output": None})
    with ledger.path.open("a") as stream:
        stream.write('{"key": "e", "sta')  # a line cut short
    assert set(ledger.done()) == {"a", "d"}


# --- tune: spaces, constraints, trial schedules ----------------------------------------------


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_trial_schedule_sets_options_and_the_constraint(tmp_path: Path) -> None:
    space = read_space(_space(tmp_path, f"""
[schedules]
int8 = "{GOLDEN / 'int8_ort.opt'}"
exact = "cleanup"
[options]
"quantize.method" = ["minmax", "entropy"]
"quantize.bins" = {{ low = 512, high = 4096, int = true, log = true }}
"""))
    assert sorted(space.schedules) == ["exact", "int8"]
    text, applied = trial_schedule(space, {"schedule": "int8", "quantize.method": "entropy",
                                           "quantize.bins": 1024.0}, parse_constraint("cosine>=0.995"))
    assert applied == {"quantize.method": "entropy", "quantize.bins": 1024}
    assert 'method="entropy"' in text and "bins=1024" in text and "percentile=99.99" in text
    assert text.strip().endswith('verify(metric="cosine", min=0.995)') and text.count("verify(") == 1
    parse_schedule(text)  # the printed schedule parses
    text, applied = trial_schedule(space, {"schedule": "exact", "quantize.method": "entropy"},
                                   parse_constraint("max_abs<=0.001"))
    assert applied == {} and "quantize" not in text and 'verify(metric="max_abs", max=0.001)' in text


@pytest.mark.parametrize("text, message", [
    ("[options]\n'a.b' = [1]", "names at least one schedule"),
    ("[schedules]\nx = 'default'\n[options]\n'nodot' = [1]", "pass.option"),
    ("[schedules]\nx = 'default'\n[options]\n'a.b' = { low = 2, high = 1 }", "low < high"),
    ("[schedules]\nx = 'default'\n[options]\n'a.b' = { low = 0, high = 1, log = true }", "positive"),
    ("[schedules]\nx = 'no_such_schedule'", "no such schedule"),
    ("[schedule]\nx = 'default'", "unknown section"),
])
def test_bad_spaces_are_user_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        read_space(_space(tmp_path, text))


def test_constraints() -> None:
    cosine = parse_constraint("cosine >= 0.99")
    assert cosine.met(0.995) and not cosine.met(0.98) and not cosine.met(None)
    error = parse_constraint("max_abs<=1e-3")
    assert error.met(1e-4) and not error.met(1e-2)
    for bad in ("cosine<=0.9", "accuracy>=0.9", "cosine>=high"):
        with pytest.raises(UserError):
            parse_constraint(bad)


def test_best_trial_is_the_cheapest_feasible_one() -> None:
    rows = [
        {"trial": 0, "feasible": True, "objective": 2.0, "metric": 0.999},
        {"trial": 1, "feasible": False, "objective": 1.0, "metric": 0.9},
        {"trial": 2, "feasible": True, "objective": 1.5, "metric": 0.991},
        {"trial": 3, "feasible": True, "objective": 1.5, "metric": 0.995},
        {"trial": 4, "feasible": False, "error": "boom"},
    ]
    best = best_trial(rows, parse_constraint("cosine>=0.99"))
    assert best is not None and best["trial"] == 3
    assert best_trial(rows[1:2], parse_constraint("cosine>=0.99")) is None


# --- the Pareto front -------------------------------------------------------------------------


def test_pareto_front_keeps_exactly_the_non_dominated_points(tmp_path: Path) -> None:
    points = [Point(1.0, 0.90, True, "a"), Point(2.0, 0.95, True, "b"), Point(2.5, 0.94, True, "c"),
              Point(3.0, 0.99, True, "d"), Point(1.0, 0.90, True, "a2"), Point(1.5, 0.80, False, "e")]
    front = pareto_front(points)
    assert [p.label for p in front] == ["a", "b", "d"]
    for p in points:
        on_front = any(q.cost == p.cost and q.quality == p.quality for q in front)
        dominated = any(q.cost <= p.cost and q.quality >= p.quality and q != p
                        and (q.cost, q.quality) != (p.cost, p.quality) for q in points)
        assert on_front != dominated
    svg = write_svg(points, tmp_path / "p.svg", cost_label="latency (ms)", quality_label="cosine",
                    threshold=0.9, best=front[0]).read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == len(points) + 1 and "<polyline" in svg
    assert json.dumps(svg)  # plain text, nothing binary
