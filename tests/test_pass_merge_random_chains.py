"""Property: on random chains of shape ops, the elimination passes preserve outputs and converge.

A chain starts from a static input and applies random Transpose / Reshape / Flatten / Squeeze /
Unsqueeze / Slice ops plus no-op candidates (Cast, Expand, Pad, Concat, identity Transpose);
some intermediates get shape annotations, some become extra graph outputs, so both the
"shape known" and "shape unknown" paths and the multi-consumer paths are exercised. Every pass
must keep the model valid and its outputs equal (ONNX Runtime, optimizations off, tight
tolerances), and a pass run right after itself must report no change.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from helpers_elim import ATOL, RTOL, run_ort, run_pass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from iropt.ir.model import Model

# No-op removal first exposes pairs that a Cast or Concat separated; then again at the end.
PASSES = (
    "eliminate_noop_ops",
    "merge_consecutive_transposes",
    "merge_consecutive_reshapes",
    "merge_consecutive_squeezes",
    "merge_consecutive_slices",
    "eliminate_noop_ops",
)
OPS = ("transpose", "reshape", "flatten", "squeeze", "unsqueeze", "slice", "cast", "expand", "pad", "concat")


class ChainBuilder:
    """Builds a random chain node by node, tracking the current static shape."""

    def __init__(self, draw: st.DrawFn, opset: int, shape: list[int]) -> None:
        self.draw = draw
        self.opset = opset
        self.shape = shape
        self.current = "x"
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.infos: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def const(self, values: list[int]) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def emit(self, op: str, inputs: list[str], shape: list[int], **attrs: object) -> None:
        out = f"t{self.count}"
        self.count += 1
        self.nodes.append(helper.make_node(op, [self.current, *inputs], [out], **attrs))
        self.current, self.shape = out, shape
        if self.draw(st.integers(0, 3)) > 0:
            self.infos.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
        elif self.draw(st.integers(0, 5)) == 0:
            self.outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))

    def axes_operand(self, op: str, axes: list[int], shape: list[int]) -> None:
        if self.opset >= 13:
            self.emit(op, [self.const(axes)], shape)
        else:
            self.emit(op, [], shape, axes=axes)

    def step(self, kind: str) -> None:
        draw, shape, rank = self.draw, self.shape, len(self.shape)
        if rank == 0 and kind in ("transpose", "slice", "pad", "concat"):
            return
        if kind == "transpose":
            perm = draw(st.permutations(range(rank)))
            self.emit("Transpose", [], [shape[p] for p in perm], perm=list(perm))
        elif kind == "reshape":
            numel = math.prod(shape)
            divisors = [d for d in range(1, numel + 1) if numel % d == 0]
            first = draw(st.sampled_from(divisors))
            target = draw(st.sampled_from([[first, numel // first], [numel], [first, -1], [0] * rank]))
            new = [shape[i] if t == 0 else t for i, t in enumerate(target)]
            new = [numel // math.prod(d for d in new if d != -1) if d == -1 else d for d in new]
            self.emit("Reshape", [self.const(target)], new)
        elif kind == "flatten":
            axis = draw(st.integers(0, rank))
            self.emit("Flatten", [], [math.prod(shape[:axis]), math.prod(shape[axis:])], axis=axis)
        elif kind == "squeeze":
            ones = [i for i, d in enumerate(shape) if d == 1]
            if ones:
                axes = sorted(draw(st.sets(st.sampled_from(ones), min_size=1)))
                self.axes_operand("Squeeze", axes, [d for i, d in enumerate(shape) if i not in axes])
        elif kind == "unsqueeze":
            axis = draw(st.integers(-rank - 1, rank))
            new = list(shape)
            new.insert(axis % (rank + 1), 1)
            self.axes_operand("Unsqueeze", [axis], new)
        elif kind == "slice":
            self.slice_step()
        elif kind == "cast":
            self.emit("Cast", [], shape, to=TensorProto.FLOAT)
        elif kind == "expand":
            target = [1 if draw(st.booleans()) else d for d in shape[draw(st.integers(0, rank)):]]
            self.emit("Expand", [self.const(target)], shape)
        elif kind == "pad" and self.opset >= 11:
            self.emit("Pad", [self.const([0] * (2 * rank))], shape)
        elif kind == "concat":
            self.emit("Concat", [], shape, axis=0)

    def slice_step(self) -> None:
        """A non-empty Slice on one axis, its bounds written in one of ONNX's equivalent ways."""
        draw, shape = self.draw, self.shape
        axis = draw(st.integers(0, len(shape) - 1))
        size = shape[axis]
        lo = draw(st.integers(0, size - 1))
        hi = draw(st.integers(lo + 1, size))
        step = draw(st.sampled_from([1, 2, -1, -2]))
        if step > 0:
            start = draw(st.sampled_from([lo, lo - size]))
            end = draw(st.sampled_from([hi, 2**63 - 1 if hi == size else hi - size]))
            picked = len(range(lo, hi, step))
        else:
            start = draw(st.sampled_from([hi - 1, hi - 1 - size, 2**63 - 1 if hi == size else hi - 1]))
            end = draw(st.sampled_from([lo - 1 - size, -(2**63) if lo == 0 else lo - 1]))
            picked = len(range(hi - 1, lo - 1, step))
        new = list(shape)
        new[axis] = picked
        axis_param = axis - len(shape) if draw(st.booleans()) else axis
        self.emit("Slice", [self.const([start]), self.const([end]), self.const([axis_param]), self.const([step])], new)


@st.composite
def chains(draw: st.DrawFn) -> onnx.ModelProto:
    opset = draw(st.sampled_from([11, 13, 17]))
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    builder = ChainBuilder(draw, opset, list(shape))
    for kind in draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=6)):
        # Often twice in a row: the merges need two ops of a kind back to back.
        for _ in range(draw(st.integers(1, 2))):
            builder.step(kind)
    builder.nodes.append(helper.make_node("Neg", [builder.current], ["y"]))
    graph = helper.make_graph(
        builder.nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, builder.shape), *builder.outputs],
        builder.inits,
        value_info=builder.infos,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=chains(), seed=st.integers(0, 2**16))
def test_passes_preserve_outputs_and_converge(proto: onnx.ModelProto, seed: int) -> None:
    onnx.checker.check_model(proto, full_check=True)
    x_shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"x": np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)}
    expected = run_ort(proto, feeds)
    model = Model.from_onnx(proto)
    for name in PASSES:
        run_pass(name, model)
        assert not run_pass(name, model).changed, f"{name} did not reach its fixpoint"
        after = model.to_onnx()
        onnx.checker.check_model(after, full_check=True)
        actual = run_ort(after, feeds)
        assert list(actual) == list(expected)
        for key, value in expected.items():
            assert actual[key].shape == value.shape, (name, key)
            np.testing.assert_allclose(actual[key], value, rtol=RTOL, atol=ATOL, err_msg=f"{name}: {key}")
