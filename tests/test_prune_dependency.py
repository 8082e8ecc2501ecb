"""Channel dependency rules: which channels are tied, how each hop maps them, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_prune import (
    IMAGE,
    Net,
    assert_pruned_like,
    chain,
    concat,
    depthwise_se,
    feeds_for,
    ffn,
    residual,
)

from iropt.compress.prune.dependency import Analysis, analyze
from iropt.compress.prune.rewrite import prune_units, zero_consumer_inputs
from iropt.io.load import load_model
from iropt.ir.model import Model


def every_other(analysis: Analysis) -> set[int]:
    """Every second prunable unit of each group (each group keeps at least one)."""
    return {unit.root for group in analysis.groups for unit in group.prunable[::2] if len(group.prunable) > 1}


def assert_prunes_exactly(model: Model, removed: set[int] | None = None) -> Model:
    """Pruning must compute what the original computes with the removed channels masked."""
    pruned, masked = model.copy(), model.copy()
    analysis = analyze(pruned)
    removed = every_other(analysis) if removed is None else removed
    assert removed, "the model has nothing to prune"
    prune_units(pruned.graph, analysis, removed)
    # The analysis is deterministic, so unit roots agree between the two copies.
    zero_consumer_inputs(analyze(masked), removed)
    assert_pruned_like(masked, pruned, feeds_for(model))
    assert sum(t.size for t in _weights(pruned)) < sum(t.size for t in _weights(model))
    return pruned


def _weights(model: Model) -> list[np.ndarray]:
    return [np.asarray(t.values) for t in model.graph.tensors().values() if hasattr(t, "values")]


def _group_sizes(analysis: Analysis) -> list[tuple[int, int]]:
    return sorted((len(g.units), len(g.prunable)) for g in analysis.groups)


def _reasons(analysis: Analysis) -> str:
    return " | ".join(r for g in analysis.groups for r in g.reasons)


def test_chain_conv_bn_relu_groups_and_batchnorm_holders() -> None:
    analysis = analyze(chain())
    assert _group_sizes(analysis) == [(5, 0), (8, 8), (8, 8)]
    assert "reaches the graph output" in _reasons(analysis)
    assert sum(1 for h in analysis.holders if h.node.op == "BatchNormalization") == 8
    assert_prunes_exactly(chain())


def test_residual_add_ties_both_producers_into_one_group() -> None:
    analysis = analyze(residual())
    stream = [g for g in analysis.groups if len(g.producers) == 2]
    assert len(stream) == 1 and len(stream[0].prunable) == 8
    assert_prunes_exactly(residual())


def test_concat_maps_consumer_channels_by_offset() -> None:
    analysis = analyze(concat())
    consumer = next(c for c in analysis.consumers if len(c.atoms) == 14)
    sizes = [len(g.units) for g in analysis.groups if any(
        analysis.uf.find(int(a)) == u.root for u in g.units for a in consumer.atoms)]
    assert sorted(sizes) == [6, 8]
    assert_prunes_exactly(concat())


def test_depthwise_conv_passes_through_and_se_gate_joins_the_stream() -> None:
    analysis = analyze(depthwise_se())
    assert any(h.node.op == "Conv" and h.node.attrs.get("group") == 8 for h in analysis.holders)
    gated = [g for g in analysis.groups if len(g.producers) == 2]  # first Conv and the SE expand Conv
    assert len(gated) == 1 and len(gated[0].units) == 8
    assert_prunes_exactly(depthwise_se())


def test_grouped_conv_is_refused() -> None:
    net = Net()
    y = net.conv(net.cbr("x", 4, 8), 8, 8, group=2)
    analysis = analyze(net.model(IMAGE, [net.head(net.op("Relu", [y]), 8)]))
    assert "grouped Conv (group=2)" in _reasons(analysis)
    assert all(not g.prunable for g in analysis.groups if len(g.units) == 8)


def test_flatten_of_a_feature_map_maps_each_channel_to_its_features() -> None:
    model = load_model("golden_models/digits_cnn.onnx")
    analysis = analyze(model)
    gemm = next(c for c in analysis.consumers if c.layout.node.op == "Gemm")
    assert len(gemm.atoms) == 32 * 16 and len(set(gemm.atoms[:16].tolist())) == 1
    assert_prunes_exactly(model)


def test_transpose_moves_the_channel_axis_to_a_matmul() -> None:
    net = Net()
    y = net.op("Transpose", [net.cbr("x", 4, 8)], perm=[0, 2, 3, 1])
    model = net.model(IMAGE, [net.matmul(y, 8, 3)])
    analysis = analyze(model)
    assert any(c.layout.node.op == "MatMul" and len(c.atoms) == 8 for c in analysis.consumers)
    assert_prunes_exactly(model)


def test_split_and_slice_on_the_channel_axis_get_new_bounds() -> None:
    net = Net()
    y = net.cbr("x", 4, 8)
    first, second = net.op("Split", [y, net.const(np.array([3, 5], dtype=np.int64))], outputs=2, axis=1).split(",")
    sliced = net.op("Slice", [second, *(net.const(np.array([v], dtype=np.int64)) for v in (1, 4, 1))])
    a, b = net.head(net.cbr(first, 3, 8), 8), net.head(net.cbr(sliced, 3, 8), 8)
    model = net.model(IMAGE, [net.op("Add", [a, b])])
    analysis = analyze(model)
    assert {e.kind for e in analysis.edits} == {"split", "slice"}
    pruned = assert_prunes_exactly(model)
    split = next(n for n in pruned.graph.nodes if n.op == "Split")
    assert int(np.sum(split.inputs[1].values)) < 8


def test_reshape_that_flattens_after_global_pool_keeps_the_channel_map() -> None:
    net = Net()
    pooled = net.op("GlobalAveragePool", [net.cbr("x", 4, 8)])
    flat = net.op("Reshape", [pooled, net.const(np.array([-1, 8], dtype=np.int64))])
    model = net.model(IMAGE, [net.gemm(flat, 8, 3)])
    analysis = analyze(model)
    assert [e.kind for e in analysis.edits] == ["dim"]
    pruned = assert_prunes_exactly(model)
    reshape = next(n for n in pruned.graph.nodes if n.op == "Reshape")
    assert list(reshape.inputs[1].values) == [-1, 4]


def test_ffn_hidden_dimension_is_one_group() -> None:
    analysis = analyze(ffn())
    assert _group_sizes(analysis) == [(8, 0), (16, 16)]
    # The output projection is added to the graph input: a stream whose channels are not ours.
    assert "joined with a tensor whose channels are unknown" in _reasons(analysis)
    assert_prunes_exactly(ffn())


def test_attention_heads_are_units_and_the_head_reshapes_follow() -> None:
    model = load_model("golden_models/transformer.onnx")
    analysis = analyze(model)
    heads = [g for g in analysis.groups if len(g.producers) == 3]  # q, k and v projections
    assert len(heads) == 1 and len(heads[0].prunable) == 4
    hidden = [g for g in analysis.groups if len(g.units) == 128]
    assert len(hidden) == 1 and len(hidden[0].prunable) == 128
    pruned = assert_prunes_exactly(model)
    shapes = {n.name: list(n.inputs[1].values) for n in pruned.graph.nodes if n.op == "Reshape"}
    assert shapes["attn_q_reshape"] == [0, 0, 2, 16] and shapes["attn_merge_reshape"] == [0, 0, 32]


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda net, y: net.op("MyOp", [y], domain="custom"), "custom op"),
        (lambda net, y: net.op("LRN", [y], size=3), "channel mapping is unknown"),
        (lambda net, y: net.op("Softmax", [y], axis=1), "normalizes over the channel axis"),
        (lambda net, y: net.op("ReduceMean", [y], axes=[1]), "reduces over the channel axis"),
        (lambda net, y: net.op("Reshape", [y, net.const(np.array([2, 4, 2, 36], dtype=np.int64))]),
         "Reshape"),
        (lambda net, y: net.op("MatMul", [net.op("Transpose", [y], perm=[0, 2, 3, 1]),
                                          net.op("Transpose", [y], perm=[0, 2, 1, 3])]),
         "MatMul between two activations on a non-batch axis"),
        (lambda net, y: net.op("Pad", [y, net.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], dtype=np.int64))]),
         "pads the channel axis"),
    ],
)
def test_unknown_or_mixing_ops_freeze_the_channels_they_read(build, reason: str) -> None:
    net = Net()
    y = net.cbr("x", 4, 8)
    out = build(net, y)
    model = net.model(IMAGE, [out, net.head(y, 8)])
    analysis = analyze(model)
    assert reason in _reasons(analysis)
    group = next(g for g in analysis.groups if len(g.units) == 8 and g.producers[0].op == "Conv")
    assert not group.prunable


def test_layernorm_over_the_channel_axis_is_refused() -> None:
    net = Net()
    h = net.matmul("x", 8, 8)
    normed = net.op("LayerNormalization", [h, net.const(np.ones(8, np.float32)), net.const(np.zeros(8, np.float32))],
                    axis=-1)
    model = net.model({"x": ("N", 3, 8)}, [net.matmul(normed, 8, 4)])
    analysis = analyze(model)
    assert "LayerNormalization over the channel axis" in _reasons(analysis)


def test_excluded_producers_keep_their_channels() -> None:
    model = chain()
    conv = next(n for n in model.graph.nodes if n.op == "Conv")
    analysis = analyze(model, exclude_nodes=[conv.name])
    assert f"excluded: '{conv.name}'" in _reasons(analysis)


def test_conv_transpose_reads_and_produces_channels_and_spatial_ops_pass_them() -> None:
    net = Net()
    y = net.cbr("x", 4, 8)
    y = net.op("Pad", [y, net.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))])
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    up = net.op("ConvTranspose", [y, net.weight([8, 6, 2, 2]), net.const(np.zeros(6, np.float32))], strides=[2, 2])
    up = net.op("Resize", [up, "", net.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    model = net.model(IMAGE, [net.head(net.cbr(net.op("Relu", [up]), 6, 8), 8)])
    analysis = analyze(model)
    assert sorted(len(g.prunable) for g in analysis.groups) == [0, 6, 8, 8]
    assert_prunes_exactly(model)
