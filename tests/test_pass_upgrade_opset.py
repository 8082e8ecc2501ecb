"""upgrade_opset: old models move to a newer opset with the same outputs; never downgrades."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_fusion import build, fused, histogram, rand, run_pass, unchanged

from iropt.errors import OptionError, UserError
from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.ir.model import Model

OPSET_9 = """
g (float[1,2,4,4] x) => (float[1,3,8,8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Upsample <mode = "nearest"> (c, scales)
}"""


def _opset9_model() -> object:
    rng = np.random.default_rng(0)
    weights = {"w": rand(rng, 3, 2, 3, 3), "b": rand(rng, 3), "scales": np.array([1, 1, 2, 2], np.float32)}
    return build(OPSET_9, weights, opset=9)


def test_opset_9_model_moves_to_13_with_the_same_outputs() -> None:
    after, result = fused(_opset9_model(), "upgrade_opset")
    assert result.stats == {"upgraded": 1, "from_opset": 9}
    assert [o.version for o in after.opset_import if o.domain == ""] == [13]
    # Upsample is gone from opset 10 on; the Constant (the Resize roi) is fold_constants' job.
    assert histogram(after) == {"Conv": 1, "Resize": 1, "Constant": 1}


def test_a_model_at_or_past_the_target_is_left_alone() -> None:
    proto = _opset9_model()
    upgraded, _ = run_pass(proto, "upgrade_opset", {"to": 11})
    unchanged(upgraded, "upgrade_opset", {"to": 11})
    unchanged(upgraded, "upgrade_opset", {"to": 10})  # never downgrades


@pytest.mark.parametrize("to", [5, 7, 999])
def test_targets_it_cannot_convert_to_are_refused(to: int) -> None:
    with pytest.raises(OptionError, match=f"to={to} is not an opset it can convert to"):
        create_pass("upgrade_opset", {"to": to})


def test_a_model_older_than_the_converter_is_a_clear_error() -> None:
    proto = build(
        """
        g (float[2] x) => (float[2] y) {
            y = Relu (x)
        }""",
        opset=6,
    )
    with pytest.raises(UserError, match="the model uses opset 6; onnx's version converter starts at 7"):
        create_pass("upgrade_opset", {}).run(Model.from_onnx(proto), PassContext())
