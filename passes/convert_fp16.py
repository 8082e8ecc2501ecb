"""convert_fp16: float32 tensors and weights to float16, with float32 kept where it must be.

TensorRT 11 and TensorRT-RTX take precision from the graph alone, and a float16 graph halves the
weights for every back end. The policy (`iropt.compress.fp16.policy`) decides per node; the
rewrite (`iropt.compress.fp16.convert`) retypes tensors and weights and puts one Cast on each
precision boundary; Cast chains and no-op Casts are then removed and every remaining Cast is
checked against its value types.

Range safety comes from data: the float32 model runs on the calibration data (`calibration=`
or `--calibration`; generated inputs with a warning otherwise) and a node whose activations
pass `max_abs` stays float32, as do its readers. Every node kept in float32 is logged with its
reason and listed in the result's `info["kept_float32"]`. ONNX Runtime's CPU provider runs most
float16 nodes in float32 (it has few float16 kernels), so the pass also runs the result with
every float16 value rounded explicitly (`iropt.compress.fp16.emulate`) on the first batch of the
data, and reports the cosine per output in `info["emulated_cosine"]` (a warning below 0.99).

Limitations: nodes inside If/Loop/Scan bodies stay float32 (the node that holds the body too,
and the producers of the outer values the body reads); float64 and bfloat16 tensors are left
as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.calibration import limit_rows
from iropt.compress.fp16 import (
    DEFAULT_BLOCK_OP_TYPES,
    FP16_MAX,
    Decision,
    Observed,
    Policy,
    cast_problems,
    convert_graph,
    decide,
    observe,
    tidy_casts,
)
from iropt.compress.fp16.emulate import emulate_half, output_cosines
from iropt.compress.fp16.policy import FLOAT
from iropt.compress.quant.placement import tensor_types
from iropt.errors import OptionError
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.model import Model
from iropt.verify.feeds import iter_feeds

# Feeds generated when no data is given: enough to see typical magnitudes, not real data.
GENERATED_FEEDS = 4
# Below this emulated cosine the pass warns: float16 will not hold on a GPU.
EMULATED_COSINE_WARNING = 0.99


@register_pass("convert_fp16")
@dataclass(kw_only=True)
class ConvertFp16(Pass):
    """Convert float32 tensors and weights to float16; keep float32 where float16 is unsafe.

    Options: `keep_io_types` (graph inputs and outputs stay float32; false makes them float16);
    `block_op_types` (ops that stay float32; default Range, CumSum, TopK, NonMaxSuppression,
    RoiAlign, MaxRoiPool and ops whose output type is an attribute; inputs whose schema has no
    float16 form, such as Resize's scales, always stay float32); `block_nodes` (fnmatch patterns
    on node names); `range_check` with `calibration` (default: --calibration, else generated
    inputs), `max_samples` and `batch_size`: nodes whose activations exceed `max_abs` on the
    data stay float32, with their readers; `max_reduction`: sums, means, norms and softmax over
    more elements than this stay float32. Weights beyond float16's range stay float32 always.
    With `range_check`, the result also runs on the first batch with every float16 value rounded
    (as a GPU stores it; ONNX Runtime's CPU provider computes most float16 nodes in float32):
    the cosine per output is in `info["emulated_cosine"]`, with a warning below 0.99.
    """

    kind = PassKind.LOSSY

    keep_io_types: bool = True
    block_op_types: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCK_OP_TYPES))
    block_nodes: list[str] = field(default_factory=list)
    range_check: bool = True
    calibration: str | None = None
    max_samples: int = 64
    batch_size: int = 8
    max_abs: float = FP16_MAX / 4
    max_reduction: int = 4096

    def __post_init__(self) -> None:
        if not 0.0 < self.max_abs <= FP16_MAX:
            raise OptionError(f"convert_fp16: max_abs must be in (0, {FP16_MAX:g}], got {self.max_abs}")
        if self.max_reduction < 1 or self.max_samples < 1 or self.batch_size < 1:
            raise OptionError("convert_fp16: max_reduction, max_samples and batch_size must be at least 1")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        dtypes = tensor_types(model)
        policy = Policy(
            block_op_types=frozenset(self.block_op_types),
            block_nodes=tuple(self.block_nodes),
            max_abs=float(self.max_abs),
            max_reduction=self.max_reduction,
        )
        observed = self._observe(model, ctx, dtypes) if self.range_check else None
        decision = decide(model.graph, dtypes, _opsets(model), policy, observed)
        if not decision.half:
            ctx.log.info("convert_fp16: no node can run in float16")
            return PassResult(changed=False, stats={"half_nodes": 0}, info=_info(decision, 0.0))
        casts_before = _count_casts(model)
        stats = convert_graph(model.graph, dtypes, decision, keep_io_types=self.keep_io_types)
        if stats.changed:  # a model already converted is left exactly as it was
            model.graph.toposort()
            tidy_casts(model.graph)
        problems = cast_problems(model.graph)
        if problems:  # the rewrite's own invariant: a bug, not bad input
            raise AssertionError("convert_fp16 left inconsistent Casts: " + "; ".join(problems))
        _log_kept(ctx, decision)
        if not ctx.capabilities.fp16:
            ctx.log.info(
                "convert_fp16: the target declares no float16 kernels (ONNX Runtime's CPU provider runs "
                "most float16 nodes in float32 between Casts): the model gets smaller, not faster"
            )
        fraction = stats.half_weight_elements / stats.float_weight_elements if stats.float_weight_elements else 0.0
        info = {**_info(decision, fraction), "target_fp16_kernels": ctx.capabilities.fp16}
        if observed is not None and observed.first_feed:
            info["emulated_cosine"] = _emulated_check(model, observed, ctx)
        return PassResult(
            changed=stats.changed,
            stats={
                "half_nodes": stats.half_nodes,
                "kept_float32": len(decision.kept),
                "half_weights_pct": round(100 * fraction),
                "casts_added": _count_casts(model) - casts_before,
            },
            info=info,
        )

    def _observe(self, model: Model, ctx: PassContext, dtypes: dict[str, int]) -> Observed:
        spec = self.calibration if self.calibration is not None else ctx.calibration
        if spec is None:
            ctx.log.warning(
                "convert_fp16: no calibration data (give calibration=... or --calibration); checking "
                "float16 ranges on generated random inputs, which may not show real magnitudes"
            )
        names = [
            name for name, tensor in model.graph.tensors().items()
            if name and dtypes.get(name) == FLOAT and not isinstance(tensor, gs.Constant)
        ]
        feeds: Iterator[dict[str, np.ndarray]] = limit_rows(
            iter_feeds(spec, model, shapes=ctx.input_shapes, count=GENERATED_FEEDS), self.max_samples
        )
        return observe(model, names, feeds, ctx.runner_factory, batch_size=self.batch_size, progress=ctx.progress)


def _emulated_check(model: Model, observed: Observed, ctx: PassContext) -> dict[str, float]:
    """Per output, cosine of the float16 model with every float16 value rounded (as a GPU stores
    it) against the float32 model, on the first batch of the data; ONNX Runtime's CPU provider
    alone would compute most float16 nodes in float32 and hide overflow."""
    emulated = model.rebuilt(emulate_half(model.to_onnx()))
    cosines = output_cosines(observed.first_outputs, ctx.runner_factory(emulated).run(observed.first_feed))
    for name, value in cosines.items():
        ctx.log.info("convert_fp16: output '%s': cosine %.7f with float16 rounding emulated", name, value)
        if not value >= EMULATED_COSINE_WARNING:
            ctx.log.warning(
                "convert_fp16: output '%s' has cosine %.6f against float32 with float16 rounding emulated; "
                "keep more nodes in float32 (lower max_abs, block_op_types or block_nodes)", name, value,
            )
    return cosines


def _count_casts(model: Model) -> int:
    return sum(1 for node in model.graph.nodes if node.op == "Cast")


def _opsets(model: Model) -> dict[str, int]:
    opsets = {"": model.opset}
    for opset_id in model.graph.import_domains or []:
        if opset_id.domain not in ("", "ai.onnx"):
            opsets[opset_id.domain] = int(opset_id.version)
    return opsets


def _info(decision: Decision, fraction: float) -> dict[str, Any]:
    return {
        "kept_float32": [{"node": k.label, "op": k.op, "reason": k.reason} for k in decision.kept],
        "half_weight_fraction": fraction,
    }


def _log_kept(ctx: PassContext, decision: Decision) -> None:
    for kept in decision.kept:
        ctx.log.info("convert_fp16: %s (%s) stays float32: %s", kept.label, kept.op, kept.reason)
