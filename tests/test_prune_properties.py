"""Properties of channel pruning on random graphs (residual Adds, Concat, Split, depthwise convs,
SE gates) and FFN blocks: pruning computes what the original computes with the pruned channels
masked, ratio 0 changes nothing, graph outputs keep their shapes, and results pass the checker."""

from __future__ import annotations

import numpy as np
import onnx
from helpers_prune import BLOCKS, assert_pruned_like, feeds_for, ffn, random_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iropt.compress.prune.dependency import analyze
from iropt.compress.prune.rewrite import prune_units, zero_consumer_inputs
from iropt.infra.pass_base import PassContext
from iropt.infra.registry import create_pass
from iropt.ir.model import Model
from iropt.verify.runtime import reference_runner

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

models = st.one_of(
    st.builds(
        lambda blocks, widths, seed: random_cnn(blocks, widths[: len(blocks)], seed),
        st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
        st.lists(st.sampled_from([4, 6, 8]), min_size=4, max_size=4),
        st.integers(0, 2**16),
    ),
    st.builds(lambda seed, hidden: ffn(seed, hidden=hidden), st.integers(0, 2**16), st.sampled_from([4, 8, 12])),
)


def _outputs(model: Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return reference_runner(model).run(feeds)


@FAST
@given(model=models, data=st.data())
def test_pruning_equals_masking_the_channels(model: Model, data: st.DataObject) -> None:
    analysis = analyze(model)
    removed: set[int] = set()
    for group in analysis.groups:
        units = group.prunable
        if len(units) > 1:
            flags = data.draw(st.lists(st.booleans(), min_size=len(units), max_size=len(units)))
            chosen = [u.root for u, flag in zip(units, flags, strict=True) if flag]
            removed.update(chosen[: len(group.units) - 1])
    masked = model.copy()
    zero_consumer_inputs(analyze(masked), removed)
    pruned = model.copy()
    prune_units(pruned.graph, analyze(pruned), removed)
    assert_pruned_like(masked, pruned, feeds_for(model, batch=3))


@FAST
@given(model=models)
def test_ratio_zero_changes_nothing(model: Model) -> None:
    before = model.to_onnx().SerializeToString()
    result = create_pass("prune_channels", {"ratio": 0.0}).run(model, PassContext())
    assert not result.changed and model.to_onnx().SerializeToString() == before


@FAST
@given(model=models, ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_pruned_models_keep_output_shapes_and_pass_the_checker(model: Model, ratio: float) -> None:
    feeds = feeds_for(model, batch=2)
    want = _outputs(model, feeds)
    pruned = model.copy()
    create_pass("prune_channels", {"ratio": ratio, "round_to": 1}).run(pruned, PassContext())
    onnx.checker.check_model(pruned.to_onnx())
    got = _outputs(pruned, feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert [t.shape for t in pruned.graph.inputs] == [t.shape for t in model.graph.inputs]
