"""prune_channels and remove_zero_channels as passes: options, calibration, reconstruction, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers_prune import assert_pruned_like, chain, feeds_for, ffn

from iropt.app.cli import main
from iropt.compress.prune.dependency import analyze
from iropt.compress.prune.driver import PruneSettings, prune_model
from iropt.compress.prune.select import Budget
from iropt.errors import OptionError
from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.io.load import load_model
from iropt.ir.model import Model
from iropt.verify.runtime import reference_runner

DIGITS = "golden_models/digits_cnn.onnx"
DIGITS_CALIB = "golden_models/digits_cnn.calib.npz"


def _accuracy(model: Model) -> float:
    test = np.load("golden_models/digits_cnn.test.npz")
    logits = reference_runner(model).run({"input": test["input"]})["logits"]
    return float((logits.argmax(axis=1) == test["label"]).mean())


def _channels(model: Model) -> list[int]:
    return [int(n.inputs[1].values.shape[0]) for n in model.graph.nodes if n.op == "Conv"]


def test_digits_half_the_channels_with_reconstruction_stays_accurate() -> None:
    model = load_model(DIGITS)
    result = create_pass("prune_channels", dict(ratio=0.5, round_to=1)).run(model, PassContext(calibration=DIGITS_CALIB))
    assert _channels(model) == [8, 16, 16]
    assert result.stats["refitted_layers"] == 3
    assert _accuracy(model) >= 0.9
    info = result.info["prune_channels"]
    assert info["importance"] == "output_error"
    assert [g["channels_after"] for g in info["groups"]] == [8, 16, 16, 10]
    assert "graph output" in info["groups"][-1]["refused"][0]
    conv = info["layers"][1]
    assert conv["macs_after"] == conv["macs_before"] // 4
    assert len(info["kept_channels"]["/block2/block2.0/Conv"]) == 16
    json.dumps(result.info)


def test_without_calibration_data_criteria_fall_back_to_l1(caplog: pytest.LogCaptureFixture) -> None:
    model = load_model(DIGITS)
    with caplog.at_level(logging.WARNING, logger="iropt"):
        result = create_pass("prune_channels", dict(ratio=0.25, importance="activation")).run(model, PassContext())
    assert "using l1" in caplog.text
    assert result.info["prune_channels"]["importance"] == "l1"
    assert result.stats["refitted_layers"] == 0
    assert _channels(model) == [16, 24, 24]  # round_to=8 keeps multiples of 8


def test_ratio_zero_changes_nothing() -> None:
    model = load_model(DIGITS)
    before = model.to_onnx().SerializeToString()
    result = create_pass("prune_channels", dict(ratio=0.0)).run(model, PassContext(calibration=DIGITS_CALIB))
    assert not result.changed
    assert model.to_onnx().SerializeToString() == before


def test_global_scope_removes_the_ratio_of_all_channels() -> None:
    model = load_model(DIGITS)
    create_pass("prune_channels", dict(ratio=0.4, scope="global", round_to=1, importance="l2")).run(model, PassContext())
    assert sum(_channels(model)) == 80 - 32


@pytest.mark.parametrize("options", [{"ratio": 1.0}, {"round_to": 0}, {"ridge": -1.0}, {"max_samples": 0}])
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(OptionError):
        create_pass("prune_channels", options)


def test_reconstruction_of_a_matmul_consumer_adds_its_bias_and_beats_masking() -> None:
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((64, 3, 8)).astype(np.float32)}]
    feeds = feeds_for(ffn(), batch=16)
    want = reference_runner(ffn()).run(feeds)
    errors = {}
    for refit in (False, True):
        model = ffn()
        prune_model(
            model, PruneSettings(Budget(0.5, 0.9, 1, 1), importance="output_error", reconstruct=refit),
            feeds=lambda: calibration, runner_factory=reference_runner, log=logging.getLogger("iropt"),
        )
        got = reference_runner(model).run(feeds)
        errors[refit] = float(np.mean([(got[k] - want[k]) ** 2 for k in want]))
    assert errors[True] < 0.5 * errors[False]


def test_remove_zero_channels_is_exact() -> None:
    model = chain()
    analysis = analyze(model)
    group = analysis.groups[0]
    dead = {unit.root for unit in group.prunable[:3]}
    from iropt.compress.prune.rewrite import zero_consumer_inputs

    zero_consumer_inputs(analysis, dead)
    original = model.copy()
    result = create_pass("remove_zero_channels").run(model, PassContext())
    assert result.stats["removed_channels"] == 3
    assert_pruned_like(original, model, feeds_for(model))
    assert not create_pass("remove_zero_channels").run(model, PassContext()).changed


def test_remove_zero_channels_finds_zero_filters_behind_relu() -> None:
    from helpers_prune import IMAGE, Net

    net = Net()
    y = net.op("Relu", [net.conv("x", 4, 8)])
    model = net.model(IMAGE, [net.head(net.cbr(y, 8, 8), 8)])
    conv = next(n for n in model.graph.nodes if n.op == "Conv")
    conv.inputs[1].values[2:4] = 0.0
    conv.inputs[2].values[2:4] = 0.0
    original = model.copy()
    result = create_pass("remove_zero_channels").run(model, PassContext())
    assert result.stats["removed_channels"] == 2
    assert_pruned_like(original, model, feeds_for(model))


def test_prune_then_quantize_in_one_schedule(tmp_path: Path) -> None:
    schedule = tmp_path / "s.opt"
    schedule.write_text(
        'prune_channels(ratio=0.3)\nfuse_bn_conv\nquantize\nverify(metric="top1", min=0.9)\n'
    )
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["run", str(schedule), DIGITS, "-o", str(out), "--calibration", DIGITS_CALIB,
                 "--report", str(report), "--verify-each", "-q"])
    assert code == 0 and out.exists()
    records = json.loads(report.read_text())["passes"]
    assert records[0]["info"]["prune_channels"]["groups"][0]["channels_after"] == 16
