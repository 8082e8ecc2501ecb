"""Conformance: the ONNX package's backend test models still match after the `default` schedule.

One test per model that ships with test data inside the `onnx` wheel (light zoo models,
simple, pytorch-converted, pytorch-operator; see tests/helpers_conformance.py), compared with
the stored expected outputs at onnx's own tolerance for the case. A case that ONNX Runtime
cannot run as given (old-opset kernels it no longer has, a missing locale, training ops), or
whose original outputs in ORT do not match the expected ones, is skipped with that reason:
it cannot tell us anything about iropt. `python bench/conformance.py` prints the counts.
"""

from __future__ import annotations

import pytest
from helpers_conformance import Case, cases, evaluate

CASES = cases()


def test_the_case_list_is_complete() -> None:
    """The cases were found (an empty list would pass vacuously): all four kinds, the light zoo."""
    kinds = {case.kind for case in CASES}
    assert kinds == {"light", "simple", "pytorch-converted", "pytorch-operator"}
    assert {"light/resnet50", "light/squeezenet", "pytorch-converted/test_Conv2d"} <= {c.id for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_default_schedule_keeps_expected_outputs(case: Case) -> None:
    outcome = evaluate(case)
    if outcome.status == "skipped":
        pytest.skip(outcome.reason)
    assert outcome.status == "passed", f"{case.id} (rtol={case.rtol:g}, atol={case.atol:g}): {outcome.reason}"
