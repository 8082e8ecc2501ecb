"""drop_zero_rnn_states: all-zero initial states of RNN/GRU/LSTM are left out (ONNX's default),
and the chain that built them goes as dead code; any other state stays."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_fusion import build, fused, histogram, rand, random_feeds, run_pass, unchanged

PASS = "drop_zero_rnn_states"
HIDDEN, FEATURES, SEQ = 5, 3, 4


def _weights(rng: np.random.Generator, gates: int) -> dict[str, np.ndarray]:
    return {
        "W": rand(rng, 1, gates * HIDDEN, FEATURES),
        "R": rand(rng, 1, gates * HIDDEN, HIDDEN),
        "B": rand(rng, 1, 2 * gates * HIDDEN),
    }


# The state a traced model builds: zeros of [1, batch, HIDDEN], the batch read from x at run time.
ZERO_STATE = """
    s = Shape(x)
    n = Gather<axis = 0>(s, one)
    n1 = Unsqueeze(n, axes)
    shape = Concat<axis = 0>(dirs, n1, hidden)
    zeros = ConstantOfShape(shape)
    h0 = Slice(zeros, start, stop)
"""
SHAPE_CONSTANTS = {
    "one": np.array(1, np.int64), "axes": np.array([0], np.int64), "dirs": np.array([1], np.int64),
    "hidden": np.array([HIDDEN], np.int64), "start": np.array([0], np.int64), "stop": np.array([1], np.int64),
}


@pytest.mark.parametrize(("op", "gates", "states"), [("LSTM", 4, "h0, h0"), ("GRU", 3, "h0"), ("RNN", 1, "h0")])
def test_zero_states_go_and_their_chain_after_them(op: str, gates: int, states: str) -> None:
    proto = build(
        f"""
        g (float[{SEQ}, N, {FEATURES}] x) => (float[{SEQ}, 1, N, {HIDDEN}] y) {{
            {ZERO_STATE}
            y = {op}<hidden_size = {HIDDEN}>(x, W, R, B, , {states})
        }}""",
        {**_weights(np.random.default_rng(0), gates), **SHAPE_CONSTANTS},
    )

    after, result = fused(proto, PASS, feeds=random_feeds(proto, dim=3))

    assert result.stats == {"dropped": states.count("h0")}
    rnn = next(n for n in after.graph.node if n.op_type == op)
    assert list(rnn.input) == ["x", "W", "R", "B"]  # the omitted trailing inputs are not written
    cleaned, _ = run_pass(after, "eliminate_dead_code")
    assert histogram(cleaned) == {op: 1}


@pytest.mark.parametrize(
    ("state", "weights"),
    [
        ("h0 = ConstantOfShape<value = float[1] {0.5}>(shape)", {}),  # not zeros
        ("h0 = Identity(h_init)", {"h_init": np.full((1, 2, HIDDEN), 0.1, np.float32)}),
        ("h0 = Relu(x_state)", {"x_state": np.zeros((1, 2, HIDDEN), np.float32)}),  # computes values
    ],
)
def test_other_states_stay(state: str, weights: dict[str, np.ndarray]) -> None:
    proto = build(
        f"""
        g (float[{SEQ}, 2, {FEATURES}] x) => (float[{SEQ}, 1, 2, {HIDDEN}] y) {{
            shape = Constant<value = int64[3] {{1, 2, {HIDDEN}}}>()
            {state}
            y = GRU<hidden_size = {HIDDEN}>(x, W, R, B, , h0)
        }}""",
        {**_weights(np.random.default_rng(1), 3), **weights},
    )
    unchanged(proto, PASS)


def test_a_zero_initializer_state_goes() -> None:
    proto = build(
        f"""
        g (float[{SEQ}, 2, {FEATURES}] x) => (float[{SEQ}, 1, 2, {HIDDEN}] y) {{
            y = GRU<hidden_size = {HIDDEN}>(x, W, R, B, , h0)
        }}""",
        {**_weights(np.random.default_rng(2), 3), "h0": np.zeros((1, 2, HIDDEN), np.float32)},
    )
    _, result = fused(proto, PASS)
    assert result.stats == {"dropped": 1}


def test_a_zero_constant_node_state_goes() -> None:
    proto = build(
        f"""
        g (float[{SEQ}, 2, {FEATURES}] x) => (float[{SEQ}, 1, 2, {HIDDEN}] y) {{
            h0 = Constant<value = float[1, 2, {HIDDEN}] {{{", ".join(["0"] * 2 * HIDDEN)}}}>()
            y = RNN<hidden_size = {HIDDEN}>(x, W, R, B, , h0)
        }}""",
        _weights(np.random.default_rng(3), 1),
    )
    _, result = fused(proto, PASS)
    assert result.stats == {"dropped": 1}
