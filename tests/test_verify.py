"""Verification: comparison metrics against numpy, the Verifier on real ONNX Runtime, and the
pass-manager integrations (verify each pass, bisect a failure, verify checkpoints)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
from helpers_verify import affine_feeds, affine_model, affine_numpy, custom_op_model

from iropt.errors import UserError, VerificationError
from iropt.infra.pass_base import PassContext, PassKind, PassResult
from iropt.infra.pass_manager import PassManager
from iropt.infra.pipeline import PassStep, Pipeline, VerifyStep
from iropt.infra.registry import create_pass
from iropt.infra.verification import VerifyEachInstrument, bisect_failure, make_checkpoint
from iropt.ir.model import Model
from iropt.verify.compare import compare
from iropt.verify.criteria import EXACT_CRITERION, LOSSY_CRITERION, Criterion
from iropt.verify.runtime import reference_runner
from iropt.verify.verifier import ComparisonFailed, Verifier

TOL = Criterion(rtol=0.5, atol=0.25)


def one(name: str, ref: np.ndarray, cand: np.ndarray, criterion: Criterion = EXACT_CRITERION):  # type: ignore[no-untyped-def]
    comparison = compare([{name: ref}], [{name: cand}], criterion)
    assert len(comparison.outputs) == 1
    return comparison, comparison.outputs[0]


# --- metrics against numpy ------------------------------------------------------------------


def test_metrics_match_numpy_on_crafted_arrays() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 5)).astype(np.float32)
    cand = (ref + rng.normal(0, 0.01, ref.shape)).astype(np.float32)
    _, out = one("y", ref, cand)
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    d = np.abs(c - r)
    assert out.max_abs == pytest.approx(d.max(), rel=1e-12)
    assert out.mean_abs == pytest.approx(d.mean(), rel=1e-12)
    assert out.max_rel == pytest.approx((d / np.abs(r)).max(), rel=1e-9)
    cosine = float(np.dot(r.ravel(), c.ravel()) / (np.linalg.norm(r) * np.linalg.norm(c)))
    assert out.cosine == pytest.approx(cosine, rel=1e-12)
    snr = 10 * np.log10(np.sum(r**2) / np.sum((c - r) ** 2))
    assert out.snr_db == pytest.approx(snr, rel=1e-12)
    top1 = float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))
    assert out.top1 == pytest.approx(top1, abs=0)
    assert out.atol_to_pass == pytest.approx(max(0.0, float((d - 1e-4 * np.abs(r)).max())), rel=1e-12)
    assert out.elements == ref.size


def test_metrics_aggregate_over_samples() -> None:
    rng = np.random.default_rng(1)
    refs = [rng.standard_normal((2, 3)) for _ in range(3)]
    cands = [r + rng.normal(0, 0.1, r.shape) for r in refs]
    comparison = compare([{"y": r} for r in refs], [{"y": c} for c in cands], EXACT_CRITERION)
    out = comparison.outputs[0]
    r, c = np.concatenate(refs), np.concatenate(cands)
    assert comparison.samples == 3
    assert out.max_abs == pytest.approx(np.abs(c - r).max(), rel=1e-12)
    assert out.cosine == pytest.approx(
        float(np.dot(r.ravel(), c.ravel()) / (np.linalg.norm(r) * np.linalg.norm(c))), rel=1e-12
    )
    top1 = float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))
    assert out.top1 == pytest.approx(top1, abs=0)


def test_top1_counts_agreeing_rows_and_skips_outputs_without_a_class_axis() -> None:
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    cand = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])  # row 1 disagrees
    _, out = one("y", ref, cand)
    assert out.top1 == pytest.approx(2 / 3, abs=0)
    _, column = one("y", ref[:, :1], cand[:, :1])
    _, scalar = one("y", np.float32(1.0), np.float32(1.0))
    assert column.top1 is None and scalar.top1 is None


def test_top1_criterion() -> None:
    ref = np.array([[0.1, 0.9], [0.8, 0.2]])
    cand = np.array([[0.2, 0.8], [0.4, 0.6]])
    half = Criterion(metric="top1", min=0.5)
    assert one("y", ref, cand, half)[0].passed
    assert not one("y", ref, cand, Criterion(metric="top1", min=0.75))[0].passed
    # An output without a class axis is not judged; with no such output at all, the check fails.
    mixed = compare([{"y": ref, "s": np.ones((2, 1))}], [{"y": cand, "s": np.ones((2, 1)) * 3}], half)
    assert mixed.passed
    lone, _ = one("s", np.ones((2, 1)), np.ones((2, 1)), half)
    assert not lone.passed and "no output is shaped like class scores" in lone.summary()


def test_zero_vectors_cosine_and_snr() -> None:
    zeros = np.zeros(4)
    _, both = one("y", zeros, zeros)
    assert both.cosine == 1.0 and both.snr_db == math.inf and both.passed
    _, cand_zero = one("y", np.ones(4), zeros)
    assert cand_zero.cosine == 0.0
    _, ref_zero = one("y", zeros, np.ones(4))
    assert ref_zero.cosine == 0.0 and ref_zero.snr_db == -math.inf


def test_tolerance_boundary() -> None:
    # atol + rtol*|ref| = 0.25 + 0.5*1.0 = 0.75, exactly representable: an error of exactly
    # 0.75 passes and the next float above fails.
    ref = np.array([1.0])
    on_bound = np.array([1.75])
    above = np.nextafter(on_bound, 2.0)
    comparison, out = one("y", ref, on_bound, TOL)
    assert comparison.passed and out.atol_to_pass == 0.25
    comparison, out = one("y", ref, above, TOL)
    assert not comparison.passed
    assert out.atol_to_pass is not None and out.atol_to_pass > 0.25
    assert "outside atol=0.25" in comparison.summary()


def test_atol_to_pass_is_the_smallest_passing_atol() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal(50)
    cand = ref + rng.normal(0, 1e-3, 50)
    _, out = one("y", ref, cand, Criterion(rtol=1e-2, atol=0.0))
    assert out.atol_to_pass is not None and out.atol_to_pass > 0
    assert one("y", ref, cand, Criterion(rtol=1e-2, atol=out.atol_to_pass))[0].passed
    assert not one("y", ref, cand, Criterion(rtol=1e-2, atol=out.atol_to_pass * 0.999))[0].passed


def test_exact_match_needs_no_tolerance() -> None:
    ref = np.arange(6, dtype=np.float32).reshape(2, 3)
    comparison, out = one("y", ref, ref.copy())
    assert comparison.passed
    assert out.max_abs == 0.0 and out.atol_to_pass == 0.0 and out.snr_db == math.inf
    assert out.cosine == 1.0 and out.top1 == 1.0


@pytest.mark.parametrize(
    ("metric", "bound_from", "key"),
    [
        ("cosine", "cosine", "min"),
        ("snr", "snr_db", "min"),
        ("max_abs", "max_abs", "max"),
        ("max_rel", "max_rel", "max"),
    ],
)
def test_metric_criteria_pass_at_their_value_and_fail_beyond(metric: str, bound_from: str, key: str) -> None:
    rng = np.random.default_rng(4)
    ref = rng.standard_normal(20) + 3.0
    cand = ref * 1.01
    _, out = one("y", ref, cand)
    value = getattr(out, bound_from)
    stricter = value * (1.0001 if key == "min" else 0.9999)
    at_value = Criterion(metric=metric, **{key: value})  # type: ignore[arg-type]
    beyond = Criterion(metric=metric, **{key: stricter})  # type: ignore[arg-type]
    assert one("y", ref, cand, at_value)[0].passed
    failed, _ = one("y", ref, cand, beyond)
    assert not failed.passed and metric in failed.summary()


def test_nan_handling() -> None:
    ref = np.array([1.0, np.nan, 3.0])
    comparison, out = one("y", ref, np.array([1.0, np.nan, 3.0]))
    assert comparison.passed and out.nonfinite_mismatches == 0 and out.max_abs == 0.0
    comparison, out = one("y", ref, np.array([np.nan, np.nan, 3.0]))
    assert not comparison.passed and out.nonfinite_mismatches == 1
    assert "NaN/inf" in comparison.summary()
    # A NaN the candidate lost is a mismatch as well, and no metric can excuse it.
    comparison, out = one("y", ref, np.array([1.0, 2.0, 3.0]), Criterion(metric="cosine", min=0.0))
    assert not comparison.passed and out.nonfinite_mismatches == 1


def test_infinities_equal_only_to_the_same_infinity() -> None:
    ref = np.array([np.inf, -np.inf, 1.0])
    assert one("y", ref, ref.copy())[0].passed
    comparison, out = one("y", ref, np.array([np.inf, np.inf, 1.0]))
    assert not comparison.passed and out.nonfinite_mismatches == 1
    comparison, out = one("y", ref, np.array([1e30, -np.inf, 1.0]))
    assert not comparison.passed and out.nonfinite_mismatches == 1


def test_shape_dtype_and_missing_output_mismatches_fail_with_a_message() -> None:
    ref = {"y": np.zeros((2, 3), np.float32), "z": np.zeros(2, np.float32)}
    cand = {"y": np.zeros((3, 2), np.float32), "z": np.zeros(2, np.float64)}
    comparison = compare([ref], [cand], EXACT_CRITERION)
    assert not comparison.passed
    by_name = {o.name: o for o in comparison.outputs}
    assert "shape [3, 2] differs from the reference's [2, 3]" in by_name["y"].message
    assert "dtype float64 differs from the reference's float32" in by_name["z"].message
    missing = compare([ref], [{"y": ref["y"]}], EXACT_CRITERION)
    assert "missing from the candidate's outputs" in {o.name: o for o in missing.outputs}["z"].message


def test_integer_bool_and_string_outputs() -> None:
    ints = np.array([[1, 5, 2]], np.int64)
    assert one("i", ints, ints.copy())[0].passed
    comparison, out = one("i", ints, ints + 1)
    assert not comparison.passed and out.max_abs == 1.0
    flags = np.array([True, False])
    assert not one("b", flags, ~flags)[0].passed
    words = np.array(["a", "b"], dtype=object)
    assert one("s", words, words.copy())[0].passed
    assert not one("s", words, np.array(["a", "c"], dtype=object))[0].passed


def test_summary_and_json() -> None:
    ref = {"y": np.array([1.0, 2.0]), "z": np.array([[0.0, 1.0]])}
    cand = {"y": np.array([1.0, 2.0]), "z": np.array([[0.0, 1.5]])}
    comparison = compare([ref], [cand], EXACT_CRITERION)
    lines = comparison.summary().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("PASS y") and lines[1].startswith("FAIL z")
    data = json.loads(json.dumps(comparison.to_dict(), allow_nan=False))
    assert data["passed"] is False
    assert data["outputs"][0]["snr_db"] == "inf"  # exact: infinite SNR, as a string
    assert data["outputs"][1]["max_abs"] == 0.5
    assert data["criterion"]["metric"] == "tolerance"


def test_sample_count_mismatch_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="2 reference samples but 1"):
        compare([{"y": np.zeros(1)}] * 2, [{"y": np.zeros(1)}], EXACT_CRITERION)


# --- Verifier on real ONNX Runtime -----------------------------------------------------------


def test_reference_runner_runs_with_ort_optimizations_off() -> None:
    runner = reference_runner(affine_model())
    options = runner.session.get_session_options()  # type: ignore[attr-defined]
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = affine_feeds(1)[0]
    np.testing.assert_allclose(runner.run(feed)["y"], affine_numpy(feed["x"]), rtol=1e-6, atol=1e-6)


def test_verifier_accepts_an_equivalent_model_and_rejects_a_different_one() -> None:
    model = affine_model()
    verifier = Verifier(model, affine_feeds(3))
    same = verifier.check(affine_model(), EXACT_CRITERION)
    assert same.passed and same.outputs[0].max_abs == 0.0 and same.samples == 3
    broken = affine_model()
    create_pass("verifytest_breaks_add").run(broken, PassContext())
    different = verifier.check(broken, EXACT_CRITERION)
    assert not different.passed
    # Add became Sub: the error is exactly 2*c*d, in float32.
    expected = np.abs(2 * np.array([1.0, 2.0, 3.0, 4.0]) * np.array([0.5, 2.0, -1.0, 3.0])).max()
    assert different.outputs[0].max_abs == pytest.approx(expected, rel=1e-6)


def test_verifier_keeps_its_own_copy_of_the_reference() -> None:
    model = affine_model()
    verifier = Verifier(model, affine_feeds(1))
    create_pass("verifytest_breaks_add").run(model, PassContext())  # rewrite in place afterwards
    feed = affine_feeds(1)[0]
    np.testing.assert_allclose(
        verifier.reference_outputs()[0]["y"], affine_numpy(feed["x"]), rtol=1e-6, atol=1e-6
    )
    assert not verifier.check(model, EXACT_CRITERION).passed


def test_verifier_reports_progress_and_reuses_reference_outputs() -> None:
    calls: list[tuple[str, int | None]] = []

    def progress(items, description, total=None):  # type: ignore[no-untyped-def]
        calls.append((description, total))
        yield from items

    verifier = Verifier(affine_model(), affine_feeds(2), progress=progress)
    verifier.check(affine_model(), EXACT_CRITERION)
    verifier.check(affine_model(), EXACT_CRITERION)
    assert calls == [("running the reference", 2), ("verifying", 2), ("verifying", 2)]


def test_model_ort_cannot_load_is_a_user_error_as_reference_and_a_failure_as_candidate() -> None:
    feeds = [{"x": np.ones(2, np.float32)}]
    with pytest.raises(UserError, match="ONNX Runtime cannot run this model"):
        Verifier(custom_op_model(), feeds).reference_outputs()
    verifier = Verifier(affine_model(), affine_feeds(1))
    with pytest.raises(VerificationError, match="the transformed model cannot be run"):
        verifier.check(custom_op_model(), EXACT_CRITERION)


def test_verifier_needs_samples() -> None:
    with pytest.raises(UserError, match="at least one input sample"):
        Verifier(affine_model(), [])


# --- pass-manager integration ---------------------------------------------------------------


def pipeline_of(*names: str) -> Pipeline:
    return Pipeline.of(*(create_pass(name) for name in names))


def test_verify_each_names_the_pass_that_breaks_the_model() -> None:
    model = affine_model()
    instrument = VerifyEachInstrument(Verifier(model, affine_feeds(2)))
    manager = PassManager([instrument])
    pipeline = pipeline_of("eliminate_identity", "verifytest_breaks_add", "eliminate_identity")
    with pytest.raises(ComparisonFailed, match=r"pass 2 'verifytest_breaks_add' changed the model's outputs") as info:
        manager.run(model, pipeline, PassContext())
    error = info.value
    assert error.record is not None and error.record.index == 2
    assert error.comparison is not None and not error.comparison.passed
    assert "FAIL y" in str(error)
    assert error.record.notes["verify"]["passed"] is False


def test_verify_each_records_passing_checks_and_skips_unchanged_passes() -> None:
    model = affine_model()
    manager = PassManager([VerifyEachInstrument(Verifier(model, affine_feeds(2)))])
    report = manager.run(model, pipeline_of("eliminate_identity", "eliminate_identity"), PassContext())
    first, second = report.records
    assert first.changed and first.notes["verify"]["passed"] is True
    assert first.notes["verify"]["outputs"][0]["max_abs"] == 0.0
    assert not second.changed and "verify" not in second.notes


def test_verify_each_holds_lossy_passes_to_the_lossy_criterion() -> None:
    model = affine_model()
    verifier = Verifier(model, affine_feeds(2))
    report = PassManager([VerifyEachInstrument(verifier)]).run(
        model, pipeline_of("verifytest_lossy_nudge"), PassContext()
    )
    (record,) = report.records
    assert record.kind is PassKind.LOSSY
    assert record.notes["verify"]["criterion"]["metric"] == LOSSY_CRITERION.metric
    assert record.notes["verify"]["passed"] is True
    # The same change declared exact fails the exact criterion.
    with pytest.raises(ComparisonFailed, match=r"'verifytest_exact_nudge'.*exact pass"):
        PassManager([VerifyEachInstrument(verifier)]).run(
            affine_model(), pipeline_of("verifytest_exact_nudge"), PassContext()
        )


def test_bisect_finds_the_first_breaking_pass() -> None:
    original = affine_model()
    before = original.to_onnx().SerializeToString()
    verifier = Verifier(original, affine_feeds(2))
    pipeline = pipeline_of("eliminate_identity", "verifytest_breaks_add", "eliminate_identity")
    found = bisect_failure(original, pipeline, verifier, EXACT_CRITERION, PassContext())
    assert found is not None
    assert (found.index, found.name) == (2, "verifytest_breaks_add")
    assert found.notes["verify"]["passed"] is False
    assert original.to_onnx().SerializeToString() == before  # reran on a copy


def test_bisect_returns_none_when_nothing_fails() -> None:
    original = affine_model()
    verifier = Verifier(original, affine_feeds(2))
    pipeline = pipeline_of("eliminate_identity", "verifytest_lossy_nudge")
    assert bisect_failure(original, pipeline, verifier, LOSSY_CRITERION, PassContext()) is None


def test_bisect_blames_the_pass_that_crosses_a_lossy_threshold() -> None:
    original = affine_model()
    verifier = Verifier(original, affine_feeds(2))
    nudge = create_pass("verifytest_lossy_nudge", {"factor": 1.001})
    # Each nudge alone passes max_abs <= bound; the cumulative third one does not.
    once = original.copy()
    nudge.run(once, PassContext())
    single = verifier.check(once, EXACT_CRITERION).outputs[0].max_abs
    assert single is not None and single > 0
    criterion = Criterion(metric="max_abs", max=2.5 * single)
    pipeline = Pipeline(steps=[PassStep(nudge), PassStep(nudge), PassStep(nudge)])
    found = bisect_failure(original, pipeline, verifier, criterion, PassContext())
    assert found is not None and found.index == 3


def test_checkpoint_checks_verify_statements_against_the_reference() -> None:
    model = affine_model()
    verifier = Verifier(model, affine_feeds(2))
    good = Pipeline(steps=[PassStep(create_pass("eliminate_identity")), VerifyStep(EXACT_CRITERION)])
    report = PassManager(checkpoint=make_checkpoint(verifier)).run(model, good, PassContext())
    (comparison,) = report.checkpoints
    assert comparison.passed
    bad = Pipeline(steps=[PassStep(create_pass("verifytest_breaks_add")), VerifyStep(EXACT_CRITERION)])
    with pytest.raises(ComparisonFailed, match=r"verify\(rtol=0.0001, atol=1e-05\) failed after pass 1") as info:
        PassManager(checkpoint=make_checkpoint(verifier)).run(affine_model(), bad, PassContext())
    assert info.value.comparison is not None and not info.value.comparison.passed


def test_passes_used_here_report_changes() -> None:
    # Guards the fixtures: the tests above are only meaningful if these passes change the model.
    model = affine_model()
    result = create_pass("verifytest_breaks_add").run(model, PassContext())
    assert isinstance(result, PassResult) and result.stats == {"broken": 1}
    assert create_pass("eliminate_identity").run(Model.from_onnx(affine_model().to_onnx()), PassContext()).changed
