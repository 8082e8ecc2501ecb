"""Properties of every exact pass and of the `default` schedule, on random graphs.

Graphs come from `strategies.models()` (valid opset-17 float32 models; see that module).
For every registered exact pass:

- it preserves the outputs: ONNX Runtime (graph optimizations off) gives the same outputs on
  the same inputs within rtol=1e-4, atol=1e-5 (explicit: fusions reorder fp32 arithmetic);
  the result passes `onnx.checker` (full check: strict shape inference); the graph's input
  and output names and their order are unchanged;
- it reaches a fixpoint: applied until it reports no change (at most `FIXPOINT_LIMIT` times),
  one more run reports `changed=False` and leaves the exported model byte for byte the same.
  A run that reports no change must also really change nothing.

The `default` schedule as a whole has the same two properties.

Examples per test come from the hypothesis profile (tests/conftest.py): `ci` by default,
`HYPOTHESIS_PROFILE=long` for thousands (bench/properties_long.py). A failing example is
shrunk and printed as ONNX text (`onnx.printer`) in the hypothesis notes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.printer
import onnx.shape_inference
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from strategies import GROUPS, SYMBOLIC_BATCH, models, random_inputs

from iropt.dsl import load_schedule
from iropt.errors import UserError
from iropt.infra.pass_base import PassContext, PassKind, PassResult
from iropt.infra.pass_manager import PassManager
from iropt.infra.pipeline import Pipeline
from iropt.infra.registry import PASSES, create_pass
from iropt.ir.model import Model
from iropt.verify.compare import compare
from iropt.verify.criteria import Criterion
from iropt.verify.runtime import OrtRunner, make_session

TOLERANCE = Criterion(metric="tolerance", rtol=1e-4, atol=1e-5)
FIXPOINT_LIMIT = 10
TESTS_DIR = Path(__file__).resolve().parent


def _exact_pass_names() -> list[str]:
    """Registered exact passes, built-in or plugin, but not those test modules register."""
    names = []
    for entry in PASSES.entries():
        if entry.kind is not PassKind.EXACT:
            continue
        module_file = getattr(sys.modules.get(entry.cls.__module__), "__file__", None)
        if module_file and Path(module_file).resolve().is_relative_to(TESTS_DIR):
            continue  # a pass registered by a test (some break models on purpose)
        names.append(entry.name)
    return names


EXACT_PASSES = _exact_pass_names()

# Which op groups of `strategies.GROUPS` give each pass work; a pass not listed (a plugin, a
# new pass) gets the general mix. Only a bias: every op can still appear in every test.
FOCUS: dict[str, tuple[str, ...]] = {
    "dedupe_initializers": ("constants", "conv"),
    "eliminate_common_subexpressions": ("duplicates",),
    "eliminate_identity": ("noop", "subgraph"),
    "eliminate_noop_ops": ("noop",),
    "fold_constants": ("constants", "subgraph"),
    "fuse_bn_conv": ("conv_bn",),
    "fuse_conv_add": ("conv_add",),
    "fuse_conv_mul": ("conv_mul",),
    "fuse_matmul_add": ("linear",),
    "fuse_pad": ("pad",),
    "merge_consecutive_reshapes": ("reshape",),
    "merge_consecutive_slices": ("slice",),
    "merge_consecutive_squeezes": ("squeeze",),
    "merge_consecutive_transposes": ("transpose",),
}


def _focused(name: str) -> st.SearchStrategy[onnx.ModelProto]:
    return models(focus=FOCUS.get(name, ()))


# For whole schedules: the general mix, or one focus group at a time.
ANY_MODEL = st.one_of(models(), *(models(focus=(group,)) for group in sorted(GROUPS)))


# --- helpers ---------------------------------------------------------------------------


def _outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on the CPU, graph optimizations off: the model as written."""
    session = make_session(proto, optimization_level="disable", intra_op_threads=1)
    return OrtRunner(session).run(feeds)


def _signature(proto: onnx.ModelProto) -> tuple[list[str], list[str]]:
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    return inputs, [o.name for o in proto.graph.output]


def _serialized(model: Model) -> bytes:
    return model.to_onnx().SerializeToString(deterministic=True)


def _assert_valid_and_equivalent(
    original: onnx.ModelProto,
    expected: dict[str, np.ndarray],
    model: Model,
    feeds: dict[str, np.ndarray],
    what: str,
) -> None:
    """The rewritten `model` passes the checker, keeps the signature and the outputs."""
    proto = model.to_onnx()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        note(f"{what} produced:\n{onnx.printer.to_text(proto)}")
        raise AssertionError(f"{what}: onnx.checker rejects the result: {error}") from error
    assert _signature(proto) == _signature(original), f"{what} changed the graph's inputs/outputs"
    try:
        got = _outputs(proto, feeds)
    except UserError as error:  # ORT ran the original, so the rewrite broke the model
        note(f"{what} produced:\n{onnx.printer.to_text(proto)}")
        raise AssertionError(f"{what}: ONNX Runtime cannot run the result: {error}") from error
    comparison = compare([expected], [got], TOLERANCE)
    if not comparison.passed:
        note(f"{what} produced:\n{onnx.printer.to_text(proto)}")
    assert comparison.passed, f"{what} changed the outputs:\n{comparison.summary()}"


def _start(proto: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Note the model (shown for a failing example) and compute its reference outputs."""
    note(f"model:\n{onnx.printer.to_text(proto)}")
    feeds = random_inputs(proto, seed=0)
    return feeds, _outputs(proto, feeds)


def _run_pass(name: str, model: Model) -> PassResult:
    result = create_pass(name).run(model, PassContext())
    assert isinstance(result, PassResult), f"{name}.run returned {type(result).__name__}"
    return result


def _default_pipeline() -> Pipeline:
    return load_schedule("default")


# --- the generator itself ---------------------------------------------------------------


@given(proto=models())
def test_random_models_are_valid_and_runnable(proto: onnx.ModelProto) -> None:
    """What the properties stand on: drawn models pass the full checker and run as declared."""
    onnx.checker.check_model(proto, full_check=True)
    _, outputs = _start(proto)
    assert list(outputs) == [o.name for o in proto.graph.output]
    for declared in proto.graph.output:
        dims = [
            d.dim_value if d.HasField("dim_value") else SYMBOLIC_BATCH
            for d in declared.type.tensor_type.shape.dim
        ]
        value = outputs[declared.name]
        assert list(value.shape) == dims, declared.name
        assert value.dtype == np.float32
        assert np.all(np.isfinite(value)), declared.name


def test_every_exact_pass_is_covered() -> None:
    """The parametrization found the built-in passes (an empty list would pass vacuously)."""
    assert {"fold_constants", "fuse_bn_conv", "eliminate_dead_code"} <= set(EXACT_PASSES)
    # A focus entry for a pass that no longer exists is a renamed pass losing its focus.
    assert set(FOCUS) <= set(EXACT_PASSES), set(FOCUS) - set(EXACT_PASSES)


# --- every exact pass --------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT_PASSES)
@given(data=st.data())
def test_exact_pass_preserves_outputs(name: str, data: st.DataObject) -> None:
    proto = data.draw(_focused(name), label="model")
    feeds, expected = _start(proto)
    model = Model.from_onnx(proto)
    result = _run_pass(name, model)
    note(f"{name}: changed={result.changed} stats={result.stats}")
    _assert_valid_and_equivalent(proto, expected, model, feeds, name)


@pytest.mark.parametrize("name", EXACT_PASSES)
@given(data=st.data())
def test_exact_pass_reaches_a_fixpoint(name: str, data: st.DataObject) -> None:
    proto = data.draw(_focused(name), label="model")
    feeds, expected = _start(proto)
    model = Model.from_onnx(proto)
    for run in range(1, FIXPOINT_LIMIT + 1):
        before = _serialized(model)
        result = _run_pass(name, model)
        note(f"{name} run {run}: changed={result.changed} stats={result.stats}")
        if not result.changed:
            assert _serialized(model) == before, f"{name} reported no change but changed the model"
            break
    else:
        pytest.fail(f"{name} still reports changes after {FIXPOINT_LIMIT} runs")
    at_fixpoint = _serialized(model)
    again = _run_pass(name, model)
    assert not again.changed, f"{name} at its fixpoint reports a change: {again.stats}"
    assert _serialized(model) == at_fixpoint, f"{name} at its fixpoint changed the model"
    _assert_valid_and_equivalent(proto, expected, model, feeds, f"{name} (at its fixpoint)")


# --- the default schedule ------------------------------------------------------------------


@given(proto=ANY_MODEL)
def test_default_schedule_preserves_outputs(proto: onnx.ModelProto) -> None:
    feeds, expected = _start(proto)
    model = Model.from_onnx(proto)
    report = PassManager().run(model, _default_pipeline(), PassContext())
    note("passes that changed the model: " + ", ".join(r.name for r in report.records if r.changed))
    _assert_valid_and_equivalent(proto, expected, model, feeds, "the default schedule")


@given(proto=ANY_MODEL)
def test_default_schedule_reaches_a_fixpoint(proto: onnx.ModelProto) -> None:
    model = Model.from_onnx(proto)
    note(f"model:\n{onnx.printer.to_text(proto)}")
    PassManager().run(model, _default_pipeline(), PassContext())
    once = _serialized(model)
    report = PassManager().run(model, _default_pipeline(), PassContext())
    changed = [f"{r.name} {r.stats}" for r in report.records if r.changed]
    assert not changed, f"a second run of the default schedule changed the model: {changed}"
    assert _serialized(model) == once, "a second run of the default schedule changed the model"
