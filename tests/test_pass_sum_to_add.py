"""sum_to_add: Sum of one or two inputs becomes Identity or Add; others are left alone."""

from __future__ import annotations

import numpy as np
from helpers_fusion import build, fused, histogram, rand, run_pass, unchanged

PASS = "sum_to_add"


def test_two_input_sum_with_broadcast_becomes_add() -> None:
    rng = np.random.default_rng(0)
    proto = build(
        """
        g (float[2,4,3,3] x) => (float[2,4,3,3] y) {
            r = Relu (x)
            y = Sum (r, c)
        }""",
        {"c": rand(rng, 4, 1, 1)},
    )
    after, result = fused(proto, PASS)
    assert result.stats == {"to_add": 1, "to_identity": 0}
    assert histogram(after) == {"Relu": 1, "Add": 1}


def test_one_input_sum_becomes_identity_and_then_goes() -> None:
    proto = build(
        """
        g (float[2,3] x) => (float[2,3] y) {
            s = Sum (x)
            y = Relu (s)
        }"""
    )
    after, result = fused(proto, PASS)
    assert result.stats == {"to_add": 0, "to_identity": 1}
    assert histogram(after) == {"Identity": 1, "Relu": 1}
    cleaned, _ = run_pass(after, "eliminate_identity")
    assert histogram(cleaned) == {"Relu": 1}


def test_sum_inside_a_branch_is_rewritten() -> None:
    proto = build(
        """
        g (bool c, float[2] x) => (float[2] y) {
            y = If (c) <
                then_branch = t () => (float[2] a) { a = Sum (x, x) },
                else_branch = e () => (float[2] b) { b = Neg (x) }
            >
        }"""
    )
    after, result = fused(proto, PASS, feeds={"c": np.array(True), "x": np.array([1.0, -2.0], np.float32)})
    assert result.stats["to_add"] == 1
    assert histogram(after) == {"If": 1, "Add": 1, "Neg": 1}


def test_three_inputs_and_old_opsets_are_left_alone() -> None:
    unchanged(
        build(
            """
            g (float[2] a, float[2] b, float[2] c) => (float[2] y) {
                y = Sum (a, b, c)
            }"""
        ),
        PASS,
    )
    unchanged(
        build(
            """
            g (float[2] a, float[2] b) => (float[2] y) {
                y = Sum (a, b)
            }""",
            opset=7,
        ),
        PASS,
    )
