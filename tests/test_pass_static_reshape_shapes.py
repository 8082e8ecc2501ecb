"""static_reshape_shapes: a run-time Reshape target becomes a constant (with one -1) when the
output shape is known but for one dimension; the target's chain then goes as dead code."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_fusion import assert_same_outputs, build, fused, histogram, random_feeds, run_pass, unchanged

PASS = "static_reshape_shapes"

# x is [N, 6, 4]; t is built at run time as [N, 24] (what TorchScript exports write).
RUNTIME_TARGET = """
g (float[N, 6, 4] x) => (float[N, 24] y) <{annotation}> {{
    s = Shape(x)
    n = Gather<axis = 0>(s, zero)
    n1 = Unsqueeze(n, axes)
    t = Concat<axis = 0>(n1, cols)
    r = Reshape(x, t)
    y = Relu(r)
}}
"""
CONSTANTS = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "cols": np.array([24], np.int64)}


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_runtime_target_becomes_a_constant_and_its_chain_goes(batch: int) -> None:
    proto = build(RUNTIME_TARGET.format(annotation="float[N, 24] r"), CONSTANTS)

    after, result = fused(proto, PASS, feeds=random_feeds(proto, dim=batch))

    assert result.stats == {"replaced": 1}
    reshape = next(n for n in after.graph.node if n.op_type == "Reshape")
    target = next(t for t in after.graph.initializer if t.name == reshape.input[1])
    assert list(np.frombuffer(target.raw_data, np.int64)) == [-1, 24]
    cleaned, _ = run_pass(after, "eliminate_dead_code")
    assert histogram(cleaned) == {"Reshape": 1, "Relu": 1}
    assert_same_outputs(proto, cleaned, random_feeds(proto, dim=batch + 3))


def test_a_fully_static_output_gets_its_own_shape() -> None:
    text = RUNTIME_TARGET.replace("float[N, 6, 4] x", "float[3, 6, 4] x").replace("float[N, 24] y", "float[3, 24] y")
    proto = build(text.format(annotation="float[3, 24] r"), CONSTANTS)
    after, _ = fused(proto, PASS)
    reshape = next(n for n in after.graph.node if n.op_type == "Reshape")
    target = next(t for t in after.graph.initializer if t.name == reshape.input[1])
    assert list(np.frombuffer(target.raw_data, np.int64)) == [3, 24]


@pytest.mark.parametrize(
    "annotation",
    [
        "float[N, M] r",  # two unknown dimensions
        "float r",  # no shape at all (no annotation: nothing is known)
    ],
)
def test_left_alone_when_the_output_shape_does_not_say_enough(annotation: str) -> None:
    text = RUNTIME_TARGET
    if annotation == "float r":
        text = text.replace(" <{annotation}>", "")
    proto = build(text.format(annotation=annotation), CONSTANTS)
    unchanged(proto, PASS)


def test_a_zero_sized_output_is_left_alone() -> None:
    # -1 next to a 0 is ambiguous (any size would do).
    text = RUNTIME_TARGET.replace("float[N, 6, 4] x", "float[N, 0, 4] x").replace("float[N, 24] y", "float[N, 0] y")
    proto = build(text.format(annotation="float[N, 0] r"), {**CONSTANTS, "cols": np.array([0], np.int64)})
    unchanged(proto, PASS)


def test_a_constant_target_is_left_alone() -> None:
    proto = build(
        """
        g (float[N, 6, 4] x) => (float[N, 24] y) <float[N, 24] r> {
            r = Reshape(x, t)
            y = Relu(r)
        }""",
        {"t": np.array([0, 24], np.int64)},
    )
    unchanged(proto, PASS)
