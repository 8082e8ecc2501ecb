"""Least-squares reconstruction of the consumers of pruned channels, layer by layer.

After channels are removed, each consumer `y = W x + b` lost some input columns. Its weights and
bias are re-fitted so that, on calibration data, its output matches the original model's:

    min_{W', b'}  E || W' x_p + b' - y_o ||^2 + lambda || W' - W_p ||^2

with `x_p` the consumer's input in the *pruned* network (upstream consumers already re-fitted, so
errors do not compound) and `y_o` its output in the *original* network (restricted to the output
channels it keeps). The ridge term pulls toward the masked original weights `W_p`, which keeps
the fit sane when there are fewer calibration rows than inputs. The intercept absorbs the mean of
the removed channels (a removed constant channel is folded into the bias exactly).
A Conv is fitted through its im2col rows; consumers are fitted in waves (all consumers whose
inputs do not depend on another pending consumer), one calibration pass per wave, accumulating
`[x, 1]^T [x, 1]` and `[x, 1]^T y` per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.prune.dependency import Analysis
from iropt.compress.prune.layout import WeightedNode
from iropt.compress.prune.statistics import Feeds, GramStats, input_rows, output_rows, run_batches
from iropt.ir.graph import FreshNames, is_op
from iropt.ir.model import Model
from iropt.verify.runner import Runner

FeedFactory = Callable[[], Iterable[Feeds]]


def reconstruct(
    original: Model,
    pruned: Model,
    analysis: Analysis,
    removed: set[int],
    feeds: FeedFactory,
    runner_factory: Callable[[Model], Runner],
    *,
    batch_size: int,
    ridge: float,
    log: logging.Logger,
) -> int:
    """Re-fit every consumer that lost input channels; returns how many were re-fitted."""
    pending = {}
    kept_out = _kept_outputs(analysis, removed)
    for consumer in analysis.consumers:
        node = consumer.layout.node
        if analysis.keep_mask(consumer.atoms, removed).all():
            continue
        if not is_op(node, "Conv", "Gemm", "MatMul") or consumer.layout.groups != 1:
            log.info("prune_channels: %s '%s' is pruned but not re-fitted (no im2col model)", node.op, node.name)
            continue
        pending[id(node)] = consumer.layout
    fitted = 0
    while pending:
        wave = _ready(pruned.graph, pending)
        grams = _accumulate(original, pruned, wave, kept_out, feeds, runner_factory, batch_size)
        for layout in wave:
            gram = grams.get(id(layout.node))
            if gram is not None and gram.xty is not None:
                _refit(pruned.graph, layout, gram, ridge)
                fitted += 1
            del pending[id(layout.node)]
    return fitted


def _kept_outputs(analysis: Analysis, removed: set[int]) -> dict[int, np.ndarray]:
    return {
        id(p.layout.node): np.flatnonzero(analysis.keep_mask(p.atoms, removed)) for p in analysis.producers
    }


def _ready(graph: gs.Graph, pending: dict[int, WeightedNode]) -> list[WeightedNode]:
    """Pending consumers with no other pending consumer upstream."""
    upstream: dict[int, set[int]] = {}
    for node in graph.nodes:
        above: set[int] = set()
        for tensor in node.inputs:
            for parent in tensor.inputs:
                above |= upstream.get(id(parent), set())
                if id(parent) in pending:
                    above.add(id(parent))
        upstream[id(node)] = above
    return [layout for key, layout in pending.items() if not upstream.get(key, set()) & pending.keys()]


def _accumulate(
    original: Model,
    pruned: Model,
    wave: list[WeightedNode],
    kept_out: dict[int, np.ndarray],
    feeds: FeedFactory,
    runner_factory: Callable[[Model], Runner],
    batch_size: int,
) -> dict[int, GramStats]:
    inputs = sorted({layout.node.inputs[0].name for layout in wave})
    targets = sorted({layout.node.outputs[0].name for layout in wave})
    reference = run_batches(original, targets, feeds(), runner_factory, batch_size)
    grams: dict[int, GramStats] = {}
    for (_, values), (_, wanted) in zip(run_batches(pruned, inputs, feeds(), runner_factory, batch_size), reference, strict=False):
        for layout in wave:
            node = layout.node
            rows = input_rows(node, values[node.inputs[0].name], layout)
            if rows is None:
                continue
            target = output_rows(node, wanted[node.outputs[0].name])
            keep = kept_out.get(id(node))
            if keep is not None:
                target = target[:, keep]
            grams.setdefault(id(node), GramStats(rows.shape[1])).add(rows, target)
    return grams


def _refit(graph: gs.Graph, layout: WeightedNode, gram: GramStats, ridge: float) -> None:
    node = layout.node
    weight = layout.weight
    alpha = float(node.attrs.get("alpha", 1.0)) if is_op(node, "Gemm") else 1.0
    beta = float(node.attrs.get("beta", 1.0)) if is_op(node, "Gemm") else 1.0
    prior_w = layout.as_matrix(weight).astype(np.float64) * alpha
    bias = layout.bias
    outputs = prior_w.shape[0]
    prior_b = np.zeros(outputs) if bias is None else np.broadcast_to(bias.astype(np.float64) * beta, (outputs,))
    prior = np.concatenate([prior_w.T, prior_b[None, :]], axis=0)
    rows = max(gram.rows, 1)
    a = gram.xtx / rows
    b = gram.xty / rows  # type: ignore[operator]
    features = a.shape[0] - 1
    damping = ridge * float(np.mean(np.diag(a)[:-1])) + 1e-12
    penalty = np.eye(features + 1) * damping
    penalty[-1, -1] = 0.0
    solution = np.linalg.solve(a + penalty, b + penalty @ prior)
    new_w = layout.from_matrix(solution[:-1].T / alpha, weight)
    new_b = (solution[-1] / beta).astype(weight.dtype)
    node.inputs[layout.weight_input] = gs.Constant(f"{node.inputs[layout.weight_input].name}_refit", new_w)
    _set_bias(graph, node, layout, new_b)


def _set_bias(graph: gs.Graph, node: gs.Node, layout: WeightedNode, bias: np.ndarray) -> None:
    fresh = FreshNames(graph.tensors().keys())
    constant = gs.Constant(fresh(f"{node.name or node.op}_bias_refit"), bias)
    if layout.bias_input is not None:
        while len(node.inputs) < layout.bias_input:
            node.inputs.append(gs.Variable(""))
        if len(node.inputs) == layout.bias_input:
            node.inputs.append(constant)
        else:
            node.inputs[layout.bias_input] = constant
        return
    # MatMul: add the bias with an Add right after it.
    output = node.outputs[0]
    product = gs.Variable(fresh(f"{output.name}_matmul"), dtype=output.dtype)
    node.outputs[0] = product
    add = gs.Node("Add", name=fresh(f"{node.name or 'matmul'}_bias"), inputs=[product, constant], outputs=[output])
    graph.nodes.insert(graph.nodes.index(node) + 1, add)
