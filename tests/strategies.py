"""Hypothesis strategies: random, valid ONNX models (opset 17, float32) for property tests.

`models()` builds a graph the way a network grows: it keeps the float tensors computed so far,
each with its shape, and appends random ops that are valid for one (or two) of them. Every op
computes its output shape itself, so a drawn model is valid by construction; `onnx.checker`
with `full_check=True` (strict shape inference) confirms it, and `test_properties` runs every
drawn model through ONNX Runtime.

The vocabulary is what the rewrite passes look at, plus the traps they must not fall into:

- convolution: Conv (groups, depthwise, stride, pads, dilation, auto_pad, with/without bias,
  kernel_shape present or inferred), ConvTranspose (groups, stride, output_padding);
- normalisation and activations: BatchNormalization (inference), Relu, Clip (both, one or no
  bounds), Sigmoid, HardSwish, LeakyRelu, Tanh, Neg, Softmax;
- arithmetic with constants broadcast per channel (`[C,1,1]`, `[1,C,1,1]`), as scalars, over
  the last axis, over the full shape, and broadcasts that *grow* the shape (so "x + 0" is not
  always a no-op), with special values 0 and 1; arithmetic between two computed tensors;
- layout: Reshape (explicit, `-1`, `0`, and the exported `Shape -> Gather -> Concat` form),
  Transpose (random, identity, default reversal, consecutive pairs), Flatten, Squeeze and
  Unsqueeze pairs, Slice pairs (steps 1, 2 and -1, end sentinels), Concat of branches;
- MatMul (2-D and batched, with a 1-D weight, with a bias Add), Gemm (transA/transB, alpha,
  beta, bias shapes); Pad (constant zero or non-zero, reflect, edge, negative pads) before Conv
  and pooling; MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, ReduceMean;
- no-ops: Identity, Dropout (with ratio, training_mode=false, an unused mask), Cast to float;
- constants as initializers or Constant nodes, shared between nodes, duplicated under another
  name (for dedupe_initializers), and computed by all-constant subgraphs (for folding);
  duplicated nodes (for common-subexpression elimination); dead branches; If nodes whose
  branch subgraphs read outer-scope tensors, on a constant or a computed condition;
- a symbolic batch dimension `N` in about half the models, so a pass cannot lean on a static
  batch size; several graph outputs, intermediate tensors among them, sometimes a graph input
  or a constant-only tensor.

Sizes are small (N 1-2, C 1-8, H/W 3-10, at most `MAX_ELEMENTS` per tensor) so ONNX Runtime
runs a model in a millisecond or two. Weights are scaled by 1/sqrt(fan_in) and multipliers are
kept near 1 so activations stay O(1) and an fp32 tolerance of rtol=1e-4, atol=1e-5 measures
the rewrite, not the growth of the numbers.

`models(focus=("conv_bn",))` draws most ops from named groups (`GROUPS`), so a property test
of one pass has work for it in most examples. `random_inputs(model, seed)` makes inputs for a
drawn model (a symbolic batch becomes 2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BATCH_NAME = "N"
# A symbolic batch dimension is fed this size: not 1, so a pass that assumed batch 1 shows.
SYMBOLIC_BATCH = 2
MAX_SPATIAL = 12
MAX_CHANNELS = 16
MAX_ELEMENTS = 4096
INT64_MAX = 2**63 - 1

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Value:
    """A float32 tensor of the graph being built.

    `batch_axis` is the axis of size N when the batch is symbolic (None in static graphs and
    for tensors computed from constants only): ops never merge it with another axis, squeeze it
    or bake its size into a constant, so the graph is valid for any N.
    """

    name: str
    shape: Shape
    batch_axis: int | None = None
    constant: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    def free(self, axis: int) -> bool:
        """True when `axis` may be resized, sliced or squeezed (it is not the symbolic batch)."""
        return self.batch_axis is None or axis % self.rank != self.batch_axis

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Builder:
    """Accumulates nodes, initializers and inputs, and knows the shape of every float tensor."""

    draw: Callable[[st.SearchStrategy[object]], object]
    rng: np.random.Generator
    dynamic: bool
    name_nodes: bool
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)
    const_values: list[Value] = field(default_factory=list)
    # Constants by (role, shape, dtype): candidates to share or to copy under a new name.
    params: dict[tuple[str, Shape, str], list[tuple[str, np.ndarray]]] = field(default_factory=dict)
    # Nodes that may be emitted again with new outputs (common subexpressions).
    records: list[tuple[onnx.NodeProto, tuple[Value, ...]]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    # --- drawing helpers --------------------------------------------------------------

    def choice(self, options: Sequence[object]) -> object:
        return self.draw(st.sampled_from(list(options)))

    def int_(self, low: int, high: int) -> int:
        return int(self.draw(st.integers(low, high)))  # type: ignore[call-overload]

    def flag(self) -> bool:
        return bool(self.draw(st.booleans()))

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    # --- tensors ----------------------------------------------------------------------

    def add_input(self, shape: Shape) -> Value:
        value = Value(self.fresh("x"), shape, 0 if self.dynamic else None)
        self.inputs.append(value)
        self.values.append(value)
        return value

    def pick(self, ok: Callable[[Value], bool] = lambda v: True) -> Value | None:
        """A computed tensor that satisfies `ok`: often the newest one (deep graphs), else any."""
        candidates = [v for v in self.values if ok(v)]
        if not candidates:
            return None
        if self.flag() and ok(self.values[-1]):
            return self.values[-1]
        return self.choice(candidates)  # type: ignore[return-value]

    def maybe_hide(self, value: Value) -> Value:
        """Usually keep the middle of a pattern from other ops, so the pattern stays intact.

        Sometimes it stays visible: a second reader is the case a fusion must refuse.
        """
        if self.int_(0, 3) != 3 and value in self.values:
            self.values.remove(value)
        return value

    def producer(self, name: str) -> str | None:
        """The op type of the node that computes `name` (None for inputs and initializers)."""
        for node in reversed(self.nodes):
            if name in node.output:
                return str(node.op_type)
        return None

    def const(self, array: np.ndarray, role: str = "any") -> str:
        """A constant holding `array`: an initializer or a Constant node, maybe shared or copied.

        `role` says which constants may stand in for one another: "any" float values, "positive"
        ones (variances, divisors), or "exact" (shapes, axes: only an identical array).
        """
        key_role = role if role != "exact" else f"exact:{array.tobytes().hex()}"
        key = (key_role, tuple(array.shape), str(array.dtype))
        existing = self.params.get(key, [])
        # Same bytes in another shape ([C] and [C,1,1]): equal data that is not the same tensor.
        lookalikes = [
            entry
            for (other_role, shape, dtype), entries in self.params.items()
            if other_role == key_role and dtype == key[2] and shape != key[1] and math.prod(shape) == array.size
            for entry in entries
        ]
        how = str(self.choice(["new"] + ["share", "copy"] * bool(existing) + ["reshaped"] * bool(lookalikes)))
        if how == "share":
            name, _ = self.choice(existing)  # type: ignore[misc]
            return name  # type: ignore[no-any-return]
        if how == "copy":
            # The same values under another name: work for dedupe_initializers.
            _, source = self.choice(existing)  # type: ignore[misc]
            array = np.array(source, copy=True)
        elif how == "reshaped":
            _, source = self.choice(lookalikes)  # type: ignore[misc]
            array = np.array(source, copy=True).reshape(array.shape)
        name = self.fresh("c")
        tensor = numpy_helper.from_array(array, name)
        if self.flag():
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=self._node_name("Constant"), value=tensor)
            )
        else:
            self.initializers.append(tensor)
        self.params.setdefault(key, []).append((name, array))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(values, dtype=np.int64), "exact")

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32), "exact")

    def normal(self, shape: Shape, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def near_one(self, shape: Shape) -> np.ndarray:
        """Magnitudes in [0.5, 1.5] with random signs: multipliers that keep values O(1)."""
        magnitude = self.rng.uniform(0.5, 1.5, shape)
        sign = np.where(self.rng.random(shape) < 0.5, -1.0, 1.0)
        return (magnitude * sign).astype(np.float32)

    def positive(self, shape: Shape) -> np.ndarray:
        return self.rng.uniform(0.5, 2.0, shape).astype(np.float32)

    def weight(self, shape: Shape, fan_in: int) -> str:
        """A weight constant, sometimes computed from constants (folding must come first)."""
        scale = 1.0 / math.sqrt(max(fan_in, 1))
        how = self.choice(["plain"] * 5 + ["scaled", "reshaped", "transposed"])
        if how == "plain":
            return self.const(self.normal(shape, scale))
        if how == "scaled":
            base = self.const(self.normal(shape, scale))
            factor = self.const(self.near_one(()))
            return self.node("Mul", [base, factor], shape, None, constant=True).name
        if how == "reshaped":
            flat = self.const(self.normal((math.prod(shape),), scale))
            return self.node("Reshape", [flat, self.ints(shape)], shape, None, constant=True).name
        # Transpose(stored, perm) has shape[i] = stored[perm[i]], so stored[j] = shape[inverse[j]].
        perm = [int(p) for p in self.rng.permutation(len(shape))]
        stored = tuple(shape[i] for i in inverse_of(perm))
        source = self.const(self.normal(stored, scale))
        return self.node("Transpose", [source], shape, None, constant=True, perm=perm).name

    # --- nodes ------------------------------------------------------------------------

    def _node_name(self, op: str) -> str:
        return self.fresh(f"{op.lower()}_") if self.name_nodes else ""

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        shape: Shape,
        batch_axis: int | None,
        *,
        constant: bool = False,
        extra_outputs: int = 0,
        **attrs: object,
    ) -> Value:
        """Append `op` and return its (first) output, a float tensor of `shape`."""
        assert all(d >= 1 for d in shape), f"{op} would make an empty tensor {shape}: a generator bug"
        assert shape or constant, f"{op} would make a scalar, which the ops here do not expect"
        out = Value(self.fresh("t"), shape, None if constant else batch_axis, constant)
        outputs = [out.name] + [self.fresh("t") for _ in range(extra_outputs)]
        node = helper.make_node(op, list(inputs), outputs, name=self._node_name(op), **attrs)
        self.nodes.append(node)
        (self.const_values if constant else self.values).append(out)
        if not constant:
            self.records.append((node, (out,)))
        return out

    # --- the model --------------------------------------------------------------------

    def value_info(self, value: Value) -> onnx.ValueInfoProto:
        dims: list[int | str] = [
            BATCH_NAME if axis == value.batch_axis else dim for axis, dim in enumerate(value.shape)
        ]
        return helper.make_tensor_value_info(value.name, TensorProto.FLOAT, dims)

    def to_model(self, outputs: Sequence[Value]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "random_graph",
            [self.value_info(v) for v in self.inputs],
            [self.value_info(v) for v in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        )
        model.producer_name = "tests.strategies"
        return model


def inverse_of(perm: Sequence[int]) -> list[int]:
    return [int(p) for p in np.argsort(perm)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fits(shape: Shape) -> bool:
    return all(d >= 1 for d in shape) and math.prod(shape) <= MAX_ELEMENTS


def _spatial(value: Value) -> bool:
    """An NCHW tensor whose batch (if symbolic) is axis 0."""
    return value.rank == 4 and value.batch_axis in (None, 0)


# --- ops -------------------------------------------------------------------------------
# Each op draws what it needs and appends nodes; it returns None when no tensor suits it.


def op_unary(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick()
    if x is None:
        return None
    op = str(b.choice(["Relu", "Sigmoid", "HardSwish", "Tanh", "Neg", "LeakyRelu", "Identity", "Abs"]))
    attrs: dict[str, object] = {"alpha": float(b.choice([0.01, 0.2]))} if op == "LeakyRelu" else {}
    return b.node(op, [x.name], x.shape, x.batch_axis, **attrs)


def op_clip(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick()
    if x is None:
        return None
    bounds = str(b.choice(["both", "relu6", "min", "max", "none"]))
    inputs = [x.name]
    if bounds == "relu6":
        inputs += [b.scalar(0.0), b.scalar(6.0)]
    elif bounds == "both":
        inputs += [b.scalar(float(b.choice([-1.0, -0.5, 0.0]))), b.scalar(float(b.choice([0.5, 1.0, 2.0])))]
    elif bounds == "min":
        inputs += [b.scalar(float(b.choice([-0.5, 0.0])))]
    elif bounds == "max":
        inputs += ["", b.scalar(float(b.choice([0.5, 1.0])))]
    return b.node("Clip", inputs, x.shape, x.batch_axis)


def op_softmax(b: _Builder) -> Value | None:
    x = b.pick()
    if x is None:
        return None
    axis = b.int_(-x.rank, x.rank - 1)
    return b.node("Softmax", [x.name], x.shape, x.batch_axis, axis=axis)


def op_noop(b: _Builder, x: Value | None = None) -> Value | None:
    """Identity, inference Dropout (sometimes with ratio / training_mode=false / a mask) or Cast."""
    x = x or b.pick()
    if x is None:
        return None
    kind = str(b.choice(["Identity", "Dropout", "Cast"]))
    if kind == "Cast":
        return b.node("Cast", [x.name], x.shape, x.batch_axis, to=TensorProto.FLOAT)
    if kind == "Identity":
        return b.node("Identity", [x.name], x.shape, x.batch_axis)
    inputs = [x.name]
    form = str(b.choice(["plain", "ratio", "training_false"]))
    if form in ("ratio", "training_false"):
        inputs.append(b.scalar(float(b.choice([0.1, 0.5]))))
    if form == "training_false":
        inputs.append(b.const(np.array(False), "exact"))
    return b.node("Dropout", inputs, x.shape, x.batch_axis, extra_outputs=int(b.flag()))


def _broadcast_shape(b: _Builder, x: Value, allow_grow: bool) -> tuple[Shape, Shape, int | None] | None:
    """A constant shape that broadcasts with x: (constant shape, output shape, output batch axis)."""
    kinds = ["scalar", "one", "last", "full", "full_unbatched"]
    if x.rank == 4:
        kinds += ["channel", "channel4"]
    if allow_grow:
        kinds += ["grow"]
    kind = str(b.choice(kinds))
    shape = x.shape
    if kind == "scalar":
        cshape: Shape = ()
    elif kind == "one":
        cshape = (1,)
    elif kind == "last":
        if not x.free(-1):
            return None
        cshape = (shape[-1],)
    elif kind == "full":
        cshape = tuple(1 if not x.free(i) else d for i, d in enumerate(shape))
    elif kind == "full_unbatched":
        if x.rank < 2 or x.batch_axis not in (None, 0):
            return None
        cshape = shape[1:]
    elif kind in ("channel", "channel4"):
        if not x.free(1):
            return None
        cshape = (shape[1], 1, 1) if kind == "channel" else (1, shape[1], 1, 1)
    else:  # grow: a size-1 axis of x meets a larger one, or the constant adds a leading axis
        ones = [i for i, d in enumerate(shape) if d == 1 and x.free(i)]
        if ones:
            axis = int(b.choice(ones))
            cshape = tuple(b.int_(2, 3) if i == axis else 1 for i in range(x.rank))
        else:
            cshape = (b.int_(2, 3),) + (1,) * x.rank
    out = tuple(int(d) for d in np.broadcast_shapes(shape, cshape))
    if not _fits(out):
        return None
    batch = None if x.batch_axis is None else x.batch_axis + len(out) - x.rank
    return cshape, out, batch


def op_binary_const(b: _Builder, x: Value | None = None, allow_grow: bool = True) -> Value | None:
    """x (+ - * /) constant, broadcast in one of many ways; sometimes the constant is 0 or 1."""
    x = x or b.pick()
    if x is None:
        return None
    op = str(b.choice(["Add", "Mul", "Sub", "Div"]))
    shaped = _broadcast_shape(b, x, allow_grow)
    if shaped is None:
        return None
    cshape, out, batch = shaped
    special = str(b.choice(["random", "random", "identity"]))
    if special == "identity":
        array = np.full(cshape, 0.0 if op in ("Add", "Sub") else 1.0, np.float32)
        name = b.const(array, "exact")
    elif op == "Div":
        name = b.const(b.positive(cshape) * b.near_one(()), "divisor")
    elif op == "Mul":
        name = b.const(b.near_one(cshape))
    else:
        name = b.const(b.normal(cshape, 0.5))
    # The constant may come first for the commutative ops (and Sub: c - x is fine; never c / x).
    inputs = [name, x.name] if op != "Div" and b.flag() else [x.name, name]
    return b.node(op, inputs, out, batch)


def op_const_subgraph(b: _Builder, x: Value | None = None) -> Value | None:
    """x (+ or *) c, where c is computed by a small all-constant subgraph (folding's work)."""
    x = x or b.pick()
    if x is None:
        return None
    shaped = _broadcast_shape(b, x, allow_grow=False)
    if shaped is None:
        return None
    cshape, out, batch = shaped
    start = str(b.choice(["plain", "reshape", "transpose", "unsqueeze"]))
    if start == "reshape" or (start == "transpose" and len(cshape) < 2):
        flat = b.const(b.normal((math.prod(cshape),), 0.5))
        c = b.node("Reshape", [flat, b.ints(cshape)], cshape, None, constant=True)
    elif start == "transpose":
        perm = [int(p) for p in b.rng.permutation(len(cshape))]
        stored = tuple(cshape[p] for p in inverse_of(perm))
        c = b.node(
            "Transpose", [b.const(b.normal(stored, 0.5))], cshape, None, constant=True, perm=perm
        )
    elif start == "unsqueeze" and 1 in cshape:
        axes = [i for i, d in enumerate(cshape) if d == 1]
        squeezed = tuple(d for d in cshape if d != 1)
        c = b.node(
            "Unsqueeze", [b.const(b.normal(squeezed, 0.5)), b.ints(axes)], cshape, None, constant=True
        )
    else:
        c = Value(b.const(b.normal(cshape, 0.5)), cshape, None, True)
    for _ in range(b.int_(0, 3)):
        step = str(b.choice(["Mul", "Add", "Relu", "Neg", "Sigmoid", "Identity", "Cast"]))
        if step in ("Mul", "Add"):
            other = b.const(b.near_one(()) if step == "Mul" else b.normal(cshape, 0.5))
            c = b.node(step, [c.name, other], cshape, None, constant=True)
        elif step == "Cast":
            c = b.node("Cast", [c.name], cshape, None, constant=True, to=TensorProto.FLOAT)
        else:
            c = b.node(step, [c.name], cshape, None, constant=True)
    op = str(b.choice(["Add", "Mul"]))
    if op == "Mul":
        # Keep multipliers away from 0 and bounded: 1 + sigmoid-ish squash of c.
        squashed = b.node("Sigmoid", [c.name], cshape, None, constant=True)
        c = b.node("Add", [squashed.name, b.scalar(0.5)], cshape, None, constant=True)
    return b.node(op, [x.name, c.name] if b.flag() else [c.name, x.name], out, batch)


def op_binary_values(b: _Builder) -> Value | None:
    """x (+ * - max min) y for two computed tensors, y broadcasting into x's shape."""
    x = b.pick()
    if x is None:
        return None

    def compatible(y: Value) -> bool:
        if y.rank > x.rank:
            return False
        try:
            if tuple(np.broadcast_shapes(x.shape, y.shape)) != x.shape:
                return False
        except ValueError:
            return False
        offset = x.rank - y.rank
        if x.batch_axis is None:
            return y.batch_axis is None
        if y.batch_axis is None:
            return x.batch_axis < offset or y.shape[x.batch_axis - offset] == 1
        return y.batch_axis + offset == x.batch_axis

    y = b.pick(compatible)
    if y is None:
        return None
    op = str(b.choice(["Add", "Mul", "Sub", "Max", "Min"]))
    return b.node(op, [x.name, y.name] if b.flag() else [y.name, x.name], x.shape, x.batch_axis)


def _conv_geometry(b: _Builder, size: int) -> tuple[int, int, int, int, int] | None:
    """kernel, stride, dilation, pad_begin, pad_end for one spatial axis; None if it collapses."""
    kernel = b.int_(1, 3)
    dilation = int(b.choice([1, 1, 2]))
    stride = int(b.choice([1, 1, 2]))
    span = (kernel - 1) * dilation + 1
    begin, end = b.int_(0, span - 1), b.int_(0, span - 1)
    if size + begin + end < span:
        return None
    return kernel, stride, dilation, begin, end


def op_conv(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick(_spatial)
    if x is None:
        return None
    n, c, h, w = x.shape
    groups = int(b.choice(_divisors(c)))  # 1, c (depthwise) and everything between
    per_group = max(1, MAX_CHANNELS // groups) if groups > 1 else MAX_CHANNELS
    m = groups * b.int_(1, min(per_group, 2 if groups == c and c > 1 else 8))
    auto_pad = str(b.choice(["NOTSET"] * 4 + ["SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs: dict[str, object] = {}
    if auto_pad == "NOTSET":
        gh, gw = _conv_geometry(b, h), _conv_geometry(b, w)
        if gh is None or gw is None:
            return None
        kernel = (gh[0], gw[0])
        out_h = (h + gh[3] + gh[4] - (gh[0] - 1) * gh[2] - 1) // gh[1] + 1
        out_w = (w + gw[3] + gw[4] - (gw[0] - 1) * gw[2] - 1) // gw[1] + 1
        attrs.update(strides=[gh[1], gw[1]], dilations=[gh[2], gw[2]], pads=[gh[3], gw[3], gh[4], gw[4]])
        # Attributes at their defaults are sometimes left out: passes must read the defaults.
        for name, default in (("strides", [1, 1]), ("dilations", [1, 1]), ("pads", [0, 0, 0, 0])):
            if attrs[name] == default and b.flag():
                del attrs[name]
    else:
        kernel = (b.int_(1, 3), b.int_(1, 3))
        stride = int(b.choice([1, 2]))
        if auto_pad == "VALID":
            if kernel[0] > h or kernel[1] > w:
                return None
            out_h, out_w = (h - kernel[0]) // stride + 1, (w - kernel[1]) // stride + 1
        else:
            out_h, out_w = -(-h // stride), -(-w // stride)
        attrs.update(auto_pad=auto_pad, strides=[stride, stride])
    if b.flag():
        attrs["kernel_shape"] = list(kernel)
    if groups > 1:
        attrs["group"] = groups
    wshape = (m, c // groups, *kernel)
    inputs = [x.name, b.weight(wshape, c // groups * kernel[0] * kernel[1])]
    if b.flag():
        inputs.append(b.const(b.normal((m,), 0.5)))
    out = (n, m, out_h, out_w)
    if not _fits(out):
        return None
    return b.node("Conv", inputs, out, x.batch_axis, **attrs)


def op_conv_transpose(b: _Builder) -> Value | None:
    x = b.pick(_spatial)
    if x is None:
        return None
    n, c, h, w = x.shape
    groups = int(b.choice(_divisors(c)))
    m = groups * b.int_(1, max(1, min(4, MAX_CHANNELS // groups)))
    kernel = (b.int_(1, 3), b.int_(1, 3))
    pads = [b.int_(0, k - 1) for k in kernel] * 2
    stride = int(b.choice([1, 2]))
    if stride * (max(h, w) - 1) + 1 + max(kernel) > MAX_SPATIAL:
        stride = 1  # upsampling would outgrow MAX_SPATIAL; stride 1 stays within it
    output_padding = b.int_(0, stride - 1)
    out_h = stride * (h - 1) + output_padding + kernel[0] - pads[0] - pads[2]
    out_w = stride * (w - 1) + output_padding + kernel[1] - pads[1] - pads[3]
    out = (n, m, out_h, out_w)
    if not _fits(out):
        return None
    attrs: dict[str, object] = {"strides": [stride, stride], "pads": pads}
    if output_padding:
        attrs["output_padding"] = [output_padding, output_padding]
    if groups > 1:
        attrs["group"] = groups
    inputs = [x.name, b.weight((c, m // groups, *kernel), c // groups * kernel[0] * kernel[1])]
    if b.flag():
        inputs.append(b.const(b.normal((m,), 0.5)))
    return b.node("ConvTranspose", inputs, out, x.batch_axis, **attrs)


def op_batchnorm(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick(lambda v: v.rank >= 2 and v.free(1))
    if x is None:
        return None
    c = x.shape[1]
    inputs = [
        x.name,
        b.const(b.near_one((c,))),
        b.const(b.normal((c,), 0.5)),
        b.const(b.normal((c,), 0.5)),
        b.const(b.positive((c,)), "positive"),
    ]
    epsilon = float(b.choice([1e-5, 1e-3, 0.1]))
    return b.node("BatchNormalization", inputs, x.shape, x.batch_axis, epsilon=epsilon)


def op_conv_then(b: _Builder, follow: str | None = None) -> Value | None:
    """Conv or ConvTranspose followed by what the fusions look for: BN, Add or Mul of a constant."""
    y = op_conv_transpose(b) if b.flag() else op_conv(b)
    if y is None:
        return None
    b.maybe_hide(y)
    follow = follow or str(b.choice(["bn", "bn", "add", "add", "mul", "mul", "add_mul", "bn_relu"]))
    if follow in ("bn", "bn_relu"):
        z = op_batchnorm(b, y)
        return b.node("Relu", [z.name], z.shape, z.batch_axis) if z and follow == "bn_relu" else z
    if follow == "add_mul":
        z = b.maybe_hide(_per_channel(b, y, "Add"))
        return _per_channel(b, z, "Mul")
    return _per_channel(b, y, "Add" if follow == "add" else "Mul")


def op_conv_bn(b: _Builder) -> Value | None:
    return op_conv_then(b, "bn")


def op_conv_add(b: _Builder) -> Value | None:
    return op_conv_then(b, "add")


def op_conv_mul(b: _Builder) -> Value | None:
    return op_conv_then(b, "mul")


def _per_channel(b: _Builder, y: Value, op: str) -> Value:
    """y op c with c per channel ([M,1,1] or [1,M,1,1]) or scalar, the shapes a fusion takes,
    or one it must refuse: varying over the spatial axes, or over the last axis only."""
    m, h, w = y.shape[1:]
    cshape = b.choice([(m, 1, 1), (1, m, 1, 1), (), (1,), (m, h, w), (1, 1, h, w), (w,), (1, m, h, 1)])
    array = b.near_one(cshape) if op == "Mul" else b.normal(cshape, 0.5)  # type: ignore[arg-type]
    name = b.const(array)
    return b.node(op, [y.name, name] if b.flag() else [name, y.name], y.shape, y.batch_axis)


def op_pool(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick(_spatial)
    if x is None:
        return None
    n, c, h, w = x.shape
    op = str(b.choice(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"]))
    if op.startswith("Global"):
        return b.node(op, [x.name], (n, c, 1, 1), x.batch_axis)
    kernel = (b.int_(1, 3), b.int_(1, 3))
    stride = int(b.choice([1, 2]))
    pads = [b.int_(0, k - 1) for k in kernel] * 2 if b.flag() else [0, 0, 0, 0]
    out_h = (h + pads[0] + pads[2] - kernel[0]) // stride + 1
    out_w = (w + pads[1] + pads[3] - kernel[1]) // stride + 1
    if h + pads[0] + pads[2] < kernel[0] or w + pads[1] + pads[3] < kernel[1]:
        return None
    attrs: dict[str, object] = {"kernel_shape": list(kernel), "strides": [stride, stride], "pads": pads}
    if op == "AveragePool" and b.flag():
        attrs["count_include_pad"] = 1
    exact = (h + pads[0] + pads[2] - kernel[0]) % stride == 0 and (w + pads[1] + pads[3] - kernel[1]) % stride == 0
    if exact and b.flag():
        attrs["ceil_mode"] = 1  # only where ceil and floor agree: runtimes differ at the edge
    return b.node(op, [x.name], (n, c, out_h, out_w), x.batch_axis, **attrs)


def op_reduce_mean(b: _Builder) -> Value | None:
    x = b.pick(lambda v: v.rank >= 2)
    if x is None:
        return None
    axes = [a for a in range(x.rank) if x.free(a) and b.flag()] or [x.rank - 1]
    if not x.free(axes[0]):
        return None
    keep = b.flag() or len(axes) == x.rank  # never down to a scalar: ops expect an axis
    out = tuple(1 if a in axes else d for a, d in enumerate(x.shape)) if keep else tuple(
        d for a, d in enumerate(x.shape) if a not in axes
    )
    batch = x.batch_axis
    if batch is not None and not keep:
        batch -= sum(1 for a in axes if a < batch)
    return b.node("ReduceMean", [x.name], out, batch, axes=axes, keepdims=int(keep))


def op_pad(b: _Builder, x: Value | None = None, spatial_only: bool = False) -> Value | None:
    x = x or b.pick()
    if x is None:
        return None
    mode = str(b.choice(["constant", "constant", "constant", "reflect", "edge"]))
    axes = range(2, x.rank) if spatial_only and x.rank == 4 else range(x.rank)
    begins, ends = [0] * x.rank, [0] * x.rank
    for axis in axes:
        if not x.free(axis):
            continue
        low = -1 if mode == "constant" and x.shape[axis] > 2 and not spatial_only else 0
        high = min(2, x.shape[axis] - 1) if mode == "reflect" else 2
        begins[axis], ends[axis] = b.int_(low, max(low, high)), b.int_(low, max(low, high))
    out = tuple(d + p + q for d, p, q in zip(x.shape, begins, ends, strict=True))
    if not _fits(out):
        return None
    inputs = [x.name, b.ints(begins + ends)]
    if mode == "constant":
        value = str(b.choice(["absent", "zero", "nonzero"]))
        if value != "absent":
            inputs.append(b.scalar(0.0 if value == "zero" else float(b.choice([0.5, -1.0]))))
    return b.node("Pad", inputs, out, x.batch_axis, mode=mode)


def op_pad_then(b: _Builder) -> Value | None:
    """Pad on the spatial axes, then Conv or a pooling op (fuse_pad's pattern and its traps)."""
    x = b.pick(_spatial)
    if x is None:
        return None
    target = str(b.choice(["Conv", "MaxPool", "AveragePool", "any"]))
    if target in ("MaxPool", "AveragePool"):
        return _pad_then_pool(b, x, target)
    padded = op_pad(b, x, spatial_only=True)
    if padded is None:
        return None
    b.maybe_hide(padded)
    return op_conv(b, padded) if target == "Conv" else op_pool(b, padded)


def _pad_then_pool(b: _Builder, x: Value, op: str) -> Value | None:
    """A constant Pad smaller than the kernel, then the pool: fusable or not by the pad value.

    A pool pads implicitly with -inf (MaxPool) or with zeros it may leave out of the average
    (AveragePool, count_include_pad); only the Pad values matching that may fold. A -inf Pad's
    output is not offered to other ops: every pool window holds a real element (each pad is
    smaller than the kernel), but other ops would see the infinities.
    """
    n, c, h, w = x.shape
    kernel = (b.int_(2, 3), b.int_(2, 3))
    pads = [b.int_(0, kernel[0] - 1), b.int_(0, kernel[1] - 1), b.int_(0, kernel[0] - 1), b.int_(0, kernel[1] - 1)]
    if h + pads[0] + pads[2] < kernel[0] or w + pads[1] + pads[3] < kernel[1]:
        return None
    values = ["-inf", "zero", "absent", "nonzero"] if op == "MaxPool" else ["zero", "absent", "nonzero"]
    value = str(b.choice(values))
    inputs = [x.name, b.ints([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]])]
    if value != "absent":
        inputs.append(b.scalar({"-inf": -np.inf, "zero": 0.0, "nonzero": 0.5}[value]))
    padded_shape = (n, c, h + pads[0] + pads[2], w + pads[1] + pads[3])
    if value == "-inf":
        padded = b.fresh("p")
        b.nodes.append(helper.make_node("Pad", inputs, [padded], name=b._node_name("Pad"), mode="constant"))
    else:
        padded = b.maybe_hide(b.node("Pad", inputs, padded_shape, x.batch_axis, mode="constant")).name
    stride = int(b.choice([1, 2]))
    attrs: dict[str, object] = {"kernel_shape": list(kernel), "strides": [stride, stride]}
    if op == "AveragePool" and not b.flag():
        attrs["count_include_pad"] = 1
    out_h = (padded_shape[2] - kernel[0]) // stride + 1
    out_w = (padded_shape[3] - kernel[1]) // stride + 1
    return b.node(op, [padded], (n, c, out_h, out_w), x.batch_axis, **attrs)


def _factor(b: _Builder, total: int, rank: int) -> list[int]:
    dims = []
    for _ in range(rank - 1):
        d = int(b.choice(_divisors(total)))
        dims.append(d)
        total //= d
    return [*dims, total]


def op_reshape(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick()
    if x is None:
        return None
    rank = b.int_(1, 4)
    if x.batch_axis is None:
        dims = _factor(b, x.size, rank)
        target: list[int] = list(dims)
        if b.flag():
            target[b.int_(0, rank - 1)] = -1
        for i in range(min(rank, x.rank)):
            if target[i] == x.shape[i] and b.flag():
                target[i] = 0  # 0 copies the input's dimension (allowzero=0)
        return b.node("Reshape", [x.name, b.ints(target)], tuple(dims), None)
    # Symbolic batch: it stays an axis of its own, written as 0 (same position) or -1.
    rest_size = x.size // x.shape[x.batch_axis]
    if rank == 1 and rest_size > 1:
        rank = 2
    rest = _factor(b, rest_size, rank - 1) if rank > 1 else []
    position = b.int_(0, len(rest))
    if position == x.batch_axis and b.flag():
        marker = 0
    else:
        marker = -1
    target = [*rest[:position], marker, *rest[position:]]
    dims = [*rest[:position], x.shape[x.batch_axis], *rest[position:]]
    return b.node("Reshape", [x.name, b.ints(target)], tuple(dims), position)


def op_reshape_pair(b: _Builder) -> Value | None:
    """Two Reshapes in a row (merge_consecutive_reshapes), sometimes back to the first shape."""
    y = op_reshape(b)
    return op_reshape(b, b.maybe_hide(y)) if y is not None else None


def op_reshape_by_shape(b: _Builder) -> Value | None:
    """The exported flatten: Reshape(x, Concat(Gather(Shape(x), 0), [-1])), or back via Shape."""
    x = b.pick(lambda v: v.rank >= 2 and v.batch_axis in (None, 0))
    if x is None:
        return None
    if b.flag():
        flat = b.node("Flatten", [x.name], (x.shape[0], x.size // x.shape[0]), x.batch_axis, axis=1)
        shape_of = _int_node(b, "Shape", [x.name])
        return b.node("Reshape", [flat.name, shape_of], x.shape, x.batch_axis)
    if b.flag():
        head = _int_node(b, "Shape", [x.name], end=1)  # Shape-15's start/end attributes
    else:
        whole = _int_node(b, "Shape", [x.name])
        head = _int_node(b, "Gather", [whole, b.ints([0])], axis=0)
    target = _int_node(b, "Concat", [head, b.ints([-1])], axis=0)
    return b.node("Reshape", [x.name, target], (x.shape[0], x.size // x.shape[0]), x.batch_axis)


def _int_node(b: _Builder, op: str, inputs: list[str], **attrs: object) -> str:
    """A node computing an int64 shape tensor (not a float Value: never picked as an operand)."""
    name = b.fresh("s")
    b.nodes.append(helper.make_node(op, inputs, [name], name=b._node_name(op), **attrs))
    return name


def op_flatten(b: _Builder) -> Value | None:
    x = b.pick(lambda v: v.batch_axis in (None, 0))
    if x is None:
        return None
    axis = 1 if x.batch_axis == 0 else b.int_(0, x.rank)
    head = math.prod(x.shape[:axis])
    return b.node("Flatten", [x.name], (head, x.size // head), x.batch_axis, axis=axis)


def op_transpose(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick(lambda v: v.rank >= 2)
    if x is None:
        return None
    kind = str(b.choice(["random", "identity", "default", "swap"]))
    if kind == "identity":
        perm = list(range(x.rank))
    elif kind == "default":
        perm = list(reversed(range(x.rank)))
    elif kind == "swap":  # one pair of axes exchanged: nearly the identity, but not a no-op
        i, j = sorted(int(a) for a in b.rng.choice(x.rank, 2, replace=False))
        perm = list(range(x.rank))
        perm[i], perm[j] = j, i
    else:
        perm = [int(p) for p in b.rng.permutation(x.rank)]
    out = tuple(x.shape[p] for p in perm)
    batch = None if x.batch_axis is None else perm.index(x.batch_axis)
    attrs = {} if kind == "default" else {"perm": perm}
    return b.node("Transpose", [x.name], out, batch, **attrs)


def op_transpose_pair(b: _Builder) -> Value | None:
    """Consecutive Transposes: random, or the second undoing the first."""
    y = op_transpose(b)
    if y is None:
        return None
    b.maybe_hide(y)
    if not b.flag():
        previous = b.nodes[-1]
        perms = [list(a.ints) for a in previous.attribute if a.name == "perm"]
        perm = perms[0] if perms else list(reversed(range(y.rank)))
        inverse = inverse_of(perm)
        source = y
        out = tuple(source.shape[p] for p in inverse)
        batch = None if source.batch_axis is None else inverse.index(source.batch_axis)
        return b.node("Transpose", [source.name], out, batch, perm=inverse)
    return op_transpose(b, y)


def op_unsqueeze(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick(lambda v: v.rank <= 4)
    if x is None:
        return None
    rank = x.rank + b.int_(1, 2 if x.rank <= 3 else 1)
    axes = sorted(int(a) for a in b.rng.choice(rank, rank - x.rank, replace=False))
    dims = iter(x.shape)
    out = tuple(1 if a in axes else next(dims) for a in range(rank))
    batch = None
    if x.batch_axis is not None:
        kept = [a for a in range(rank) if a not in axes]
        batch = kept[x.batch_axis]
    written = [a - rank if b.flag() else a for a in axes]  # negative axes count from the end
    return b.node("Unsqueeze", [x.name, b.ints(written)], out, batch)


def op_squeeze(b: _Builder, x: Value | None = None) -> Value | None:
    def squeezable(v: Value) -> bool:
        return any(d == 1 and v.free(a) for a, d in enumerate(v.shape))

    x = x or b.pick(squeezable)
    if x is None or not squeezable(x):
        return None
    ones = [a for a, d in enumerate(x.shape) if d == 1 and x.free(a)]
    axes = [a for a in ones if b.flag()] or ones[:1]
    if len(axes) == x.rank:  # keep one axis: a scalar is not what the other ops expect
        axes = axes[1:]
        if not axes:
            return None
    out = tuple(d for a, d in enumerate(x.shape) if a not in axes)
    batch = None if x.batch_axis is None else x.batch_axis - sum(1 for a in axes if a < x.batch_axis)
    if x.batch_axis is None and axes == ones and b.flag():
        return b.node("Squeeze", [x.name], out, batch)  # no axes: every size-1 axis
    written = [a - x.rank if b.flag() else a for a in axes]
    return b.node("Squeeze", [x.name, b.ints(written)], out, batch)


def op_squeeze_pair(b: _Builder) -> Value | None:
    """Two of Unsqueeze/Squeeze in a row (merge or cancel candidates)."""
    pairs: list[tuple[Callable[..., Value | None], Callable[..., Value | None]]] = [
        (op_unsqueeze, op_squeeze),
        (op_squeeze, op_unsqueeze),
        (op_unsqueeze, op_unsqueeze),
        (op_squeeze, op_squeeze),
    ]
    first, second = pairs[b.int_(0, len(pairs) - 1)]
    y = first(b)
    return second(b, b.maybe_hide(y)) if y is not None else None


def op_slice(b: _Builder, x: Value | None = None) -> Value | None:
    x = x or b.pick()
    if x is None:
        return None
    axes = sorted({b.int_(0, x.rank - 1) for _ in range(b.int_(1, 2))})
    starts, ends, steps, out = [], [], [], list(x.shape)
    batch = x.batch_axis
    for axis in axes:
        size = x.shape[axis]
        step = int(b.choice([1, 1, 2, -1]))
        if axis == x.batch_axis:
            # The symbolic batch: only slices valid for every N >= 1, so a merge of two of them
            # cannot lean on a known size: all of it, reversed, or its first or last element.
            start, end, step = b.choice(  # type: ignore[misc]
                [(0, INT64_MAX, 1), (-1, -INT64_MAX, -1), (0, 1, 1), (-1, INT64_MAX, 1)]
            )
            starts.append(start)
            ends.append(end)
            steps.append(step)
            if (start, end) in ((0, 1), (-1, INT64_MAX)):
                batch, out[axis] = None, 1  # one element: no longer N long
            continue
        if step > 0:
            start = b.int_(0, size - 1)
            end = int(b.choice([size, INT64_MAX, -1, start + 1 + b.int_(0, size - start - 1)]))
        else:
            start = int(b.choice([-1, size - 1]))
            end = int(b.choice([-INT64_MAX, -size - 1, 0]))
        length = len(range(size)[slice(start, end, step)])
        if length < 1:
            return None
        starts.append(start - size if start > 0 and b.flag() else start)
        ends.append(end)
        steps.append(step)
        out[axis] = length
    inputs = [x.name, b.ints(starts), b.ints(ends)]
    # Optional inputs left out where their defaults (axes 0..k-1, steps 1) say the same.
    form = str(b.choice(["axes_steps", "axes", "none"]))
    if form == "none" and axes != list(range(len(axes))):
        form = "axes"
    if any(s != 1 for s in steps):
        form = "axes_steps"
    if form in ("axes", "axes_steps"):
        inputs.append(b.ints([a - x.rank if b.flag() else a for a in axes]))
    if form == "axes_steps":
        inputs.append(b.ints(steps))
    return b.node("Slice", inputs, tuple(out), batch)


def op_slice_pair(b: _Builder) -> Value | None:
    y = op_slice(b)
    return op_slice(b, b.maybe_hide(y)) if y is not None else None


def op_matmul(b: _Builder) -> Value | None:
    # Mostly 2-D operands (a linear layer: what Gemm can take), flattening an NCHW tensor first
    # (a classifier head) when there is no 2-D one; sometimes a batched MatMul.
    x = None
    if b.int_(0, 3) != 3:
        x = b.pick(lambda v: v.rank == 2 and v.free(-1))
        if x is None and (source := b.pick(lambda v: v.rank > 2 and v.batch_axis in (None, 0))):
            flat = (source.shape[0], source.size // source.shape[0])
            x = b.maybe_hide(b.node("Flatten", [source.name], flat, source.batch_axis, axis=1))
    x = x or b.pick(lambda v: v.rank >= 2 and v.free(-1))
    if x is None:
        return None
    k = x.shape[-1]
    if b.int_(0, 5) == 5:  # a 1-D weight: the last axis disappears
        out: Shape = x.shape[:-1]
        w = b.weight((k,), k)
        return b.node("MatMul", [x.name, w], out, x.batch_axis)
    m = b.int_(1, 12)
    out = (*x.shape[:-1], m)
    if not _fits(out):
        return None
    y = b.node("MatMul", [x.name, b.weight((k, m), k)], out, x.batch_axis)
    if not b.flag():  # the bias Add of a linear layer (fuse_matmul_add)
        b.maybe_hide(y)
        bias = b.const(b.normal(b.choice([(m,), (1, m), ()]), 0.5))  # type: ignore[arg-type]
        y = b.node("Add", [y.name, bias] if b.flag() else [bias, y.name], out, x.batch_axis)
    return y


def op_gemm(b: _Builder) -> Value | None:
    x = b.pick(lambda v: v.rank == 2)
    if x is None:
        return None
    trans_a = 1 if x.batch_axis == 1 else int(b.flag()) if x.batch_axis is None else 0
    rows, k = (x.shape[1], x.shape[0]) if trans_a else x.shape
    n = b.int_(1, 12)
    trans_b = int(b.flag())
    inputs = [x.name, b.weight((n, k) if trans_b else (k, n), k)]
    bias = str(b.choice(["none", "vector", "row", "scalar", "full"]))
    if bias == "full" and x.batch_axis is not None:
        bias = "vector"
    shapes: dict[str, Shape] = {"vector": (n,), "row": (1, n), "scalar": (), "full": (rows, n)}
    if bias != "none":
        inputs.append(b.const(b.normal(shapes[bias], 0.5)))
    attrs: dict[str, object] = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    if b.flag():
        attrs["alpha"] = float(b.choice([0.5, 2.0, -1.0]))
    if b.flag() and bias != "none":
        attrs["beta"] = float(b.choice([0.5, 2.0, -1.0]))
    batch = None if x.batch_axis is None else 0
    return b.node("Gemm", inputs, (rows, n), batch, **attrs)


def op_concat(b: _Builder) -> Value | None:
    """Concat of branches of one tensor (convs, activations, itself, a constant) on one axis."""
    x = b.pick()
    if x is None:
        return None
    free_axes = [a for a in range(x.rank) if x.free(a)]
    if not free_axes:
        return None
    axis = int(b.choice(free_axes))
    if x.rank == 4 and x.free(1) and b.flag():
        axis = 1
    parts: list[Value] = []
    for _ in range(b.int_(2, 3)):
        kind = str(b.choice(["self", "unary", "conv", "constant"]))
        if kind == "conv" and axis == 1 and _spatial(x):
            c = x.shape[1]
            m = b.int_(1, 6)
            k = int(b.choice([1, 3]))
            wshape = (m, c, k, k)
            part = b.node(
                "Conv", [x.name, b.weight(wshape, c * k * k)], (x.shape[0], m, *x.shape[2:]),
                x.batch_axis, pads=[k // 2] * 4,
            )
        elif kind == "constant" and x.batch_axis is None:
            part = Value(b.const(b.normal(x.shape, 0.5)), x.shape, None, True)
        elif kind == "unary":
            part = op_unary(b, x) or x
        else:
            part = x
        parts.append(part)
    out = list(x.shape)
    out[axis] = sum(p.shape[axis] for p in parts)
    if not _fits(tuple(out)):
        return None
    written = axis - x.rank if b.flag() else axis
    return b.node("Concat", [p.name for p in parts], tuple(out), x.batch_axis, axis=written)


def op_residual(b: _Builder) -> Value | None:
    """y = f(x) with x's shape, then x + y: an Add of a Conv with a non-constant (no fusion)."""
    x = b.pick(_spatial)
    if x is None:
        return None
    c = x.shape[1]
    k = int(b.choice([1, 3]))
    y = b.node(
        "Conv", [x.name, b.weight((c, c, k, k), c * k * k)], x.shape, x.batch_axis, pads=[k // 2] * 4
    )
    if b.flag():
        y = op_batchnorm(b, y) or y
    return b.node("Add", [x.name, y.name] if b.flag() else [y.name, x.name], x.shape, x.batch_axis)


def op_duplicate(b: _Builder) -> Value | None:
    """Emit a copy of an earlier node with new output names: a common subexpression."""
    if not b.records:
        return None
    node, outs = b.choice(b.records)  # type: ignore[misc]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = b._node_name(node.op_type)
    del copy.output[:]
    first = Value(b.fresh("t"), outs[0].shape, outs[0].batch_axis)
    copy.output.extend([first.name] + [b.fresh("t") for _ in node.output[1:]])
    b.nodes.append(copy)
    b.values.append(first)
    return first


def op_if(b: _Builder) -> Value | None:
    """If(cond) with two branch subgraphs that read x from the outer scope and keep its shape.

    The condition is a constant (fold_constants may inline the taken branch) or computed from
    x (mean(x) > 0). Passes see nested graphs, outer-scope reads and branch outputs.
    """
    # Not the output of a Cast: ONNX Runtime 1.32 with optimizations off fails to feed an If
    # branch a same-type Cast(Cast(x)) from the outer scope ("Missing Input"), a runtime bug.
    x = b.pick(lambda v: b.producer(v.name) != "Cast")
    if x is None:
        return None
    if b.flag():
        mean = b.fresh("m")
        b.nodes.append(helper.make_node("ReduceMean", [x.name], [mean], name=b._node_name("ReduceMean"), keepdims=0))
        cond = _int_node(b, "Greater", [mean, b.scalar(0.0)])
    else:
        cond = b.const(np.array(b.flag()), "exact")
    branches = {key: _branch(b, x, key) for key in ("then_branch", "else_branch")}
    y = b.node("If", [cond], x.shape, x.batch_axis, **branches)  # type: ignore[arg-type]
    b.records.pop()  # an If is not duplicated: two copies would repeat the branches' names
    return y


def _branch(b: _Builder, x: Value, label: str) -> onnx.GraphProto:
    """A branch graph: a few shape-keeping ops on the outer-scope x, ending inside the branch."""
    inner = _Builder(
        b.draw, b.rng, b.dynamic, b.name_nodes,
        params={key: list(entries) for key, entries in b.params.items()},  # outer constants are visible
        counter=b.counter,
    )
    inner.values.append(x)
    y = x
    steps: list[Callable[[_Builder, Value], Value | None]] = [
        op_unary, op_clip, op_noop, op_const_subgraph, op_batchnorm,
        lambda sub, v: op_binary_const(sub, v, allow_grow=False),
    ]
    for _ in range(b.int_(1, 3)):
        step = steps[b.int_(0, len(steps) - 1)]
        if step is op_batchnorm and not (y.rank >= 2 and y.free(1)):
            continue
        y = step(inner, y) or y
    if y is x:  # a branch output made in the outer graph is a corner runtimes handle unevenly
        y = inner.node("Identity", [x.name], x.shape, x.batch_axis)
    return helper.make_graph(
        inner.nodes, b.fresh(label), [], [inner.value_info(y)], initializer=inner.initializers
    )


# How often each op is drawn: the patterns the rewrites look for (and their look-alikes) come
# up more often than plain ops, so every pass has work in most of a few dozen examples.
# The first entry is also what hypothesis draws most and shrinks towards: a fusion pattern.
_WEIGHTS: list[tuple[Callable[[_Builder], Value | None], int]] = [
    (op_conv_then, 5),
    (op_unary, 2),
    (op_binary_const, 3),
    (op_conv, 2),
    (op_batchnorm, 1),
    (op_clip, 1),
    (op_noop, 2),
    (op_pool, 1),
    (op_pad, 1),
    (op_pad_then, 3),
    (op_reshape, 1),
    (op_reshape_pair, 2),
    (op_reshape_by_shape, 1),
    (op_flatten, 1),
    (op_transpose, 1),
    (op_transpose_pair, 2),
    (op_unsqueeze, 1),
    (op_squeeze, 1),
    (op_squeeze_pair, 2),
    (op_slice, 1),
    (op_slice_pair, 2),
    (op_matmul, 3),
    (op_gemm, 1),
    (op_concat, 1),
    (op_residual, 1),
    (op_const_subgraph, 2),
    (op_binary_values, 1),
    (op_conv_transpose, 1),
    (op_softmax, 1),
    (op_reduce_mean, 1),
    (op_duplicate, 2),
    (op_if, 1),
]
OPS: list[Callable[[_Builder], Value | None]] = [op for op, weight in _WEIGHTS for _ in range(weight)]

# Ops by the rewrites they feed: `models(focus=...)` draws most of its ops from the named
# groups, so a property test of one pass has work for it in most examples, not one in fifty.
GROUPS: dict[str, list[Callable[[_Builder], Value | None]]] = {
    "conv": [op_conv_then, op_conv_then, op_conv, op_residual, op_conv_transpose],
    "conv_bn": [op_conv_bn, op_conv_bn, op_conv_then, op_batchnorm],
    "conv_add": [op_conv_add, op_conv_add, op_conv_then, op_residual],
    "conv_mul": [op_conv_mul, op_conv_mul, op_conv_then],
    "pad": [op_pad_then, op_pad_then, op_pad],
    "linear": [op_matmul, op_matmul, op_gemm],
    "transpose": [op_transpose_pair, op_transpose_pair, op_transpose],
    "reshape": [op_reshape_pair, op_reshape_pair, op_reshape, op_reshape_by_shape, op_flatten],
    "squeeze": [op_squeeze_pair, op_squeeze_pair, op_squeeze, op_unsqueeze],
    "slice": [op_slice_pair, op_slice_pair, op_slice],
    "noop": [op_noop, op_noop, op_binary_const, op_transpose, op_transpose, op_slice, op_pad, op_reshape, op_reshape],
    "constants": [op_const_subgraph, op_const_subgraph, op_reshape_by_shape, op_binary_const],
    "duplicates": [op_duplicate, op_duplicate, op_concat],
    "subgraph": [op_if, op_if, op_noop, op_const_subgraph],
}


def _input_shape(b: _Builder) -> Shape:
    n = b.int_(1, 2)
    if b.int_(0, 4) == 4:
        return (n, b.int_(1, 16))
    return (n, b.int_(1, 8), b.int_(3, 10), b.int_(3, 10))


@st.composite
def models(draw: st.DrawFn, max_ops: int = 10, focus: Sequence[str] = ()) -> onnx.ModelProto:
    """A random valid ONNX model (opset 17, float32 inputs and outputs); see the module doc.

    `focus` names groups of `GROUPS`: the first op and about three in four of the others come
    from them.
    """
    unknown = set(focus) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown focus group(s) {sorted(unknown)}; known: {sorted(GROUPS)}")
    focused = [op for group in focus for op in GROUPS[group]]
    seed = draw(st.integers(0, 2**32 - 1))
    b = _Builder(draw, np.random.default_rng(seed), dynamic=draw(st.booleans()), name_nodes=draw(st.booleans()))
    for _ in range(draw(st.integers(1, 2))):
        b.add_input(_input_shape(b))
    for step in range(draw(st.integers(1, max_ops))):
        from_focus = bool(focused) and (step == 0 or draw(st.integers(0, 3)) != 3)
        op = draw(st.sampled_from(focused if from_focus else OPS))
        op(b)
    if len(b.values) == len(b.inputs):  # nothing applied: still give the graph one node
        x = b.values[-1]
        b.node("Relu", [x.name], x.shape, x.batch_axis)
    outputs = _choose_outputs(b)
    model = b.to_model(outputs)
    onnx.checker.check_model(model, full_check=True)
    return model


def _consumed(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Names read by `nodes` or by the nodes of their subgraphs."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _consumed(attribute.g.node)
    return names


def _choose_outputs(b: _Builder) -> list[Value]:
    """The last tensor, most unread ones (so what the ops compute is observed), and extras.

    Extras are intermediate tensors that other nodes also read, a graph input or a tensor
    computed from constants only. An unread tensor left out is dead code.
    """
    computed = b.values[len(b.inputs):]
    chosen = [computed[-1]]
    consumed = _consumed(b.nodes)
    chosen += [v for v in computed[:-1] if v.name not in consumed and b.int_(0, 3) != 3]
    for _ in range(b.int_(0, 2)):
        pool = str(b.choice(["computed", "computed", "computed", "input", "constant"]))
        if pool == "input":
            candidates: list[Value] = b.inputs
        elif pool == "constant" and b.const_values:
            candidates = b.const_values
        else:
            candidates = computed
        extra = b.choice(candidates)
        if all(extra.name != c.name for c in chosen):  # type: ignore[attr-defined]
            chosen.append(extra)  # type: ignore[arg-type]
    if len(chosen) > 1 and b.flag():
        chosen = list(b.draw(st.permutations(chosen)))  # type: ignore[call-overload]
    return chosen


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs for every graph input; symbolic dimensions become 2."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for tensor in model.graph.input:
        if tensor.name in initializers:
            continue
        dims = tensor.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else SYMBOLIC_BATCH for d in dims]
        feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
