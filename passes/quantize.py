"""quantize: int8 quantization with QuantizeLinear/DequantizeLinear, right for each back end.

Static mode (the default) calibrates activation ranges on real inputs and inserts QDQ pairs:

1. Plan (`iropt.compress.quant.placement`): which nodes run quantized (Conv, ConvTranspose, Gemm, MatMul
   with constant weights; Add, Mul, Concat, pools, Resize and layout ops next to them) and which
   tensors get Q/DQ. Relu/Clip after a quantized node is absorbed into its output range.
2. Calibrate (`iropt.compress.calibration`): run a copy of the model whose outputs include those tensors,
   over the calibration feeds in batches of at most `batch_size`, keeping a running min/max and a
   fixed-size histogram per tensor; then choose each range with `method` (minmax, percentile,
   entropy, mse). Tensors that share a scale (MaxPool in/out...) get the union of their ranges.
3. Optionally, sensitivity analysis (`iropt.compress.sensitivity`): rank the quantized layers by
   their harm against the float outputs (calibration's runs, kept), keep the most harmful ones
   in float until `target_metric` reaches `target_min`. Trials run on one emulation model whose
   Q/DQ pairs sit behind run-time switches (`iropt.compress.quant.emulation`, one session, a run
   per trial; `iropt.compress.quant.trials`), and the model chosen is rewritten and run once for
   its real metric. The fast ranking's noise run and trials use a quarter of the rows (at least
   four) against a target with a fifth of its error taken off, and accept a count within 8% of
   the layers of the fewest; the real run on every row is the check, and where it misses the
   target the search goes on over every row from there. The ranking, the runs and the time of
   each phase are logged and returned in `info`.
4. Rewrite (`iropt.compress.quant.rewrite`) for the format: `ort` = uint8 asymmetric activations,
   int8 per-channel weights, int32 bias (what ORT's QDQ fusion turns into QLinearConv/QGemm;
   weights keep to 7 bits where the target's uint8 x int8 kernels may saturate, `weight_range`);
   `tensorrt` = int8 symmetric everywhere, zero points 0, float bias.

Dynamic mode (`iropt.compress.quant.dynamic`) needs no calibration: MatMul/Gemm get int8 weights and
DynamicQuantizeLinear + MatMulInteger, which ORT fuses into DynamicQuantizeMatMul.

With format `ort`, `placement` chooses which layers stay float for speed. `measured` (the
default, `iropt.compress.quant.measured`): each layer's int8 and float kernels are profiled on
this machine in the calibration batch's shapes, with the Q/DQ and layout conversions each choice
adds; the layers that do not pay stay float, and the chosen mix is timed against the float model
end to end, moving more layers back to float until it is no slower (all of them, if need be).
Timings are cached per machine and layer shape. `rules`: fixed rules guess the slow layers
(`iropt.compress.quant.placement.ort_slow_reason`): ConvTranspose, a Conv with fewer than 8
input channels and a small output (the first layer of a small image model), a Conv followed by
HardSwish or a similar activation that ORT fuses into float convs only. `all`: every layer is
quantized. A pool after a float layer stays float too. Sensitivity analysis then works on the
layers placement left in int8.

Schedule it after `fuse_bn_conv` (a BatchNormalization between a Conv and its activation blocks
ORT's QLinearConv fusion) and `fuse_matmul_add` (ORT fuses a quantized Gemm with its int32 bias
into QGemm; a MatMul + float Add stays half float). QDQ with per-channel weights needs opset 13
(dynamic mode 11): an older model (opset 11/12 exports are common) is upgraded first with onnx's
version converter, with a warning in the log and `upgraded_from_opset` in the statistics, so
the shipped schedules run on it; the run's verification checks the whole result as usual.

Limitations: nodes inside subgraphs (If/Loop bodies) stay float; a MatMul of two activations
(attention scores) stays float; only float32 tensors are quantized.
"""

from __future__ import annotations

import fnmatch
import functools
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.calibration import (
    CalibrationMethod,
    TensorStats,
    collect_gram,
    collect_statistics,
    collect_statistics_parallel,
    compute_range,
    limit_rows,
    rows_of,
    split_batches,
)
from iropt.compress.quant.blockwise import BLOCK_SIZES, BlockQuantized, quantize_gptq_by_input, quantize_rtn
from iropt.compress.quant.dynamic import DYNAMIC_OP_TYPES, dynamic_candidates, quantize_dynamic
from iropt.compress.quant.embedding import EmbeddingFormat, embedding_candidates, quantize_embeddings
from iropt.compress.quant.emulation import Emulation, build_emulation
from iropt.compress.quant.existing import is_quantized
from iropt.compress.quant.measured import place_by_measurement
from iropt.compress.quant.params import (
    REDUCED_WEIGHT_QMAX,
    SCHEMES,
    WEIGHT_QMAX,
    QParams,
    QuantFormat,
    Scheme,
    activation_params,
)
from iropt.compress.quant.placement import (
    DEFAULT_OP_TYPES,
    SUPPORTED_OP_TYPES,
    Plan,
    node_key,
    node_label,
    ort_slow_reason,
    plan_quantization,
    tensor_types,
)
from iropt.compress.quant.rewrite import RewriteStats, insert_qdq
from iropt.compress.quant.timing_cache import TimingCache
from iropt.compress.quant.trials import Emulator, SensitivityRuns
from iropt.compress.quant.weight_only import (
    BLOCKED_DQ_MIN_OPSET,
    WEIGHT_ONLY_OP_TYPES,
    Int4Format,
    PackedRows,
    WeightOnlyCandidate,
    rewrite_weight_only,
    weight_only_candidates,
)
from iropt.compress.sensitivity import (
    Evaluate,
    LayerScore,
    Metric,
    SensitivityResult,
    added_noise_db,
    analyze,
    analyze_fast,
    continue_search,
    search_rows,
    tightened,
)
from iropt.errors import OptionError, UserError
from iropt.infra.options import Range
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult
from iropt.infra.registry import register_pass
from iropt.ir.graph import is_op
from iropt.ir.model import Model
from iropt.ir.opset import upgrade_opset
from iropt.ir.toposort import sorted_nodes
from iropt.util.threads import single_threaded_blas
from iropt.verify.feeds import iter_feeds

STATIC_MIN_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights)
DYNAMIC_MIN_OPSET = 11  # DynamicQuantizeLinear
# Feeds generated when no calibration data is given (with a warning: random data calibrates badly).
GENERATED_FEEDS = 8

Feeds = dict[str, np.ndarray]
Excluded = Callable[[gs.Node, str], bool]


@register_pass("quantize")
@dataclass(kw_only=True)
class Quantize(Pass):
    """Quantize to int8: calibrated QDQ (static) or run-time activation quantization (dynamic).

    Options: `mode` static|dynamic; `format` auto (from the target)|ort|tensorrt; `calibration`
    (overrides --calibration); `method` minmax|percentile|entropy|mse with `percentile`;
    `batch_size` and `max_samples` bound calibration memory and time; `bins` per histogram;
    `op_types` to quantize (default: Conv, ConvTranspose, Gemm, MatMul, Add, Mul, Concat, pools,
    Resize and layout ops; Softmax, LayerNormalization, ... only when listed); `exclude_nodes`
    (fnmatch patterns on node names) and `exclude_op_types`; `sensitivity` with `target_metric`
    cosine|top1|snr, `target_min` and `sensitivity_samples` keeps the most harmful layers in float,
    ranked `sensitivity_ranking` fast (each layer's added noise from one run of the quantized
    model; a search for the fewest float layers that starts where the noise predicts; the
    `sensitivity_refine` worst measured alone when fewer stay float) or exhaustive (every layer
    measured alone, one at a time back to float); trials are runs of one emulation model;
    `placement` (format ort) measured|rules|all: keep in float the layers that run slower in int8
    as measured on this machine (end-to-end never slower than float), as fixed rules predict
    (ConvTranspose, Conv with < 8 input channels and a small output, Conv followed by HardSwish
    and similar), or none; `skip_slow_layers` is its older spelling (false = all, true = rules);
    `weight_range` auto|full|reduced: int8 weights over [-127, 127] (full) or [-63, 63] (reduced,
    7 bits); auto reduces them for uint8 activations where the target's int8 kernels may
    saturate (ONNX Runtime on x86 CPUs without VNNI), so the model is accurate on any CPU.
    `bits=4`: weight-only 4-bit MatMul/Gemm weights in blocks of `block_size` (16..256, a power
    of two) along K, `symmetric` or with zero points, chosen by `weight_method` rtn (round to
    nearest) or gptq (error compensation from calibration inputs); ONNX Runtime gets
    MatMulNBits (its `accuracy_level` 0-4 passed through), TensorRT int4 DequantizeLinear with
    blocks (opset >= 21). `embeddings` (dynamic and bits=4): Gather tables of at least 64Ki values
    stored in `embedding_bits` (default: `bits`, 8 in dynamic mode): 8 = int8 with one scale per
    row; 4 = blocks of `block_size` along each row, `symmetric` or with zero points, as ONNX
    Runtime's GatherBlockQuantized (format tensorrt keeps int8 rows: no 4-bit gather there).
    """

    kind = PassKind.LOSSY

    mode: Literal["static", "dynamic"] = "static"
    format: Literal["auto", "ort", "tensorrt"] = "auto"
    calibration: str | None = None
    method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: Annotated[float, Range(min=0, max=100)] = 99.99
    batch_size: Annotated[int, Range(min=1, max=1 << 16)] = 32
    max_samples: Annotated[int, Range(min=1)] | None = None
    bins: Annotated[int, Range(min=8, max=1 << 20)] = 2048
    op_types: list[str] | None = None
    exclude_nodes: list[str] = field(default_factory=list)
    exclude_op_types: list[str] = field(default_factory=list)
    sensitivity: bool = False
    target_metric: Literal["cosine", "top1", "snr"] = "cosine"
    target_min: float = 0.995
    sensitivity_samples: Annotated[int, Range(min=1, max=1 << 16)] = 64
    sensitivity_ranking: Literal["fast", "exhaustive"] = "fast"
    sensitivity_refine: Annotated[int, Range(min=0)] = 4
    placement: Literal["measured", "rules", "all"] = "measured"
    skip_slow_layers: bool | None = None  # deprecated: placement="rules" (true) or "all" (false)
    weight_range: Literal["auto", "full", "reduced"] = "auto"
    bits: Literal[8, 4] = 8
    block_size: Annotated[int, Range(min=1)] = 32
    symmetric: bool = True
    weight_method: Literal["rtn", "gptq"] = "rtn"
    embeddings: bool = True
    embedding_bits: Literal[8, 4] | None = None
    accuracy_level: Annotated[int, Range(min=0, max=4)] = 0
    # Results of the last run, for the CLI and tests (not options).
    last_ranking: list[LayerScore] = field(default_factory=list, init=False, repr=False, compare=False)
    last_kept_float: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        supported = SUPPORTED_OP_TYPES if self.mode == "static" else DYNAMIC_OP_TYPES
        unknown = [op for op in self.op_types or [] if op not in supported]
        if unknown:
            raise OptionError(
                f"quantize: op_types {unknown} cannot be quantized in {self.mode} mode; "
                f"supported: {', '.join(supported)}"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise OptionError(f"quantize: percentile must be in (0, 100], got {self.percentile}")
        if self.batch_size < 1 or self.sensitivity_samples < 1:
            raise OptionError("quantize: batch_size and sensitivity_samples must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise OptionError(f"quantize: max_samples must be at least 1, got {self.max_samples}")
        if self.bins < 8 or self.bins % 4:
            raise OptionError(f"quantize: bins must be a multiple of 4 and at least 8, got {self.bins}")
        if self.block_size not in BLOCK_SIZES:
            raise OptionError(
                f"quantize: block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}"
            )
        if not 0 <= self.accuracy_level <= 4:
            raise OptionError(f"quantize: accuracy_level must be 0..4 (MatMulNBits' levels), got {self.accuracy_level}")
        if self.embedding_bits not in (None, 8, 4):
            raise OptionError(f"quantize: embedding_bits must be 8 or 4, got {self.embedding_bits}")
        if self.skip_slow_layers is not None and self.placement != "measured":
            raise OptionError("quantize: give placement or its older spelling skip_slow_layers, not both")
        if self.bits == 4 and self.mode == "dynamic":
            raise OptionError("quantize: bits=4 is weight-only (activations stay float); leave mode at its default")

    # --- entry point -----------------------------------------------------------------------

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        existing = [
            node_label(node, index) for index, node in enumerate(model.graph.nodes)
            if is_quantized(node) and not is_op(node, "QuantizeLinear", "DequantizeLinear")
        ]
        if self.bits == 4:
            upgraded_from = None
            result = self._run_weight_only(model, ctx)
        else:
            upgraded_from = _ensure_opset(model, self.mode, ctx)
            result = self._run_dynamic(model, ctx) if self.mode == "dynamic" else self._run_static(model, ctx)
        if upgraded_from is not None:
            result.stats["upgraded_from_opset"] = upgraded_from
            result.changed = True
        if existing:
            ctx.log.info(
                "quantize: %d node(s) are quantized already and stay as they are (%s)",
                len(existing), ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else ""),
            )
            result.info["already_quantized"] = existing
        return result

    def resolve_format(self, ctx: PassContext) -> QuantFormat:
        """`format`, or for `auto` the format the schedule's target declares (no target: ort)."""
        if self.format != "auto":
            return self.format
        return ctx.capabilities.quant_format

    def resolve_placement(self, scheme: Scheme) -> Literal["measured", "rules", "all"]:
        """`placement` for format ort (or what the deprecated `skip_slow_layers` says); `all` for
        TensorRT, which chooses its own kernels."""
        if scheme.name != "ort":
            return "all"
        if self.skip_slow_layers is not None:
            return "rules" if self.skip_slow_layers else "all"
        return self.placement

    def weight_qmax(self, ctx: PassContext, activation_dtype: type[np.integer]) -> int:
        """The int8 weight bound: 7 bits where uint8 x int8 products may saturate on the target."""
        if self.weight_range == "auto":
            saturates = ctx.capabilities.saturating_int8_dot and activation_dtype == np.uint8
            return REDUCED_WEIGHT_QMAX if saturates else WEIGHT_QMAX
        return REDUCED_WEIGHT_QMAX if self.weight_range == "reduced" else WEIGHT_QMAX

    # --- static ------------------------------------------------------------------------------

    def _run_static(self, model: Model, ctx: PassContext) -> PassResult:
        scheme = SCHEMES[self.resolve_format(ctx)]
        scheme = scheme.with_weight_qmax(self.weight_qmax(ctx, scheme.activation_dtype))
        dtypes = tensor_types(model)
        op_types = list(self.op_types) if self.op_types is not None else list(DEFAULT_OP_TYPES)
        placement = self.resolve_placement(scheme)
        slow_reasons = self._slow_nodes(model, op_types, ctx) if placement == "rules" else {}
        slow = frozenset(slow_reasons)
        # Named before the rewrite: afterwards the quantized layers read Q/DQ and count as excluded.
        excluded_labels = self._excluded_labels(model, op_types)
        plan = plan_quantization(
            model.graph, scheme, op_types=op_types, excluded=self._excluded(slow), dtypes=dtypes
        )
        if not plan.nodes:
            ctx.log.info("quantize: no node to quantize (op types %s)", ", ".join(op_types))
            return PassResult(changed=False, stats={"quantized_nodes": 0})
        _warn_unfused_batchnorm(plan, ctx)
        kept: list[Feeds] = []
        kept_outputs: list[Feeds] = []
        first: list[Feeds] = []
        stats, samples = self._calibrate(model, ctx, plan, kept, kept_outputs, first)
        params = group_params(plan, stats, scheme, self.method, self.percentile)

        def plan_of(graph: gs.Graph, only: frozenset[str] | None, floats: frozenset[str]) -> Plan:
            return plan_quantization(
                graph, scheme, op_types=op_types, excluded=self._excluded(floats | slow), dtypes=dtypes, only=only,
            )

        def build(target: Model, only: frozenset[str] | None, floats: frozenset[str]) -> None:
            _rewrite_static(target, plan_of(target.graph, only, floats), params, scheme)

        measured: dict[str, dict[str, str]] = {}
        measured_info: dict[str, Any] = {}
        if placement == "measured" and first:
            outcome = place_by_measurement(
                model, plan, lambda target, floats: build(target, None, floats), first[0], ctx, cache=TimingCache(),
            )
            if outcome is None:
                placement, slow_reasons = "rules", self._slow_nodes(model, op_types, ctx)
            else:
                measured, measured_info = outcome
            if measured or slow_reasons:
                slow = frozenset(measured or slow_reasons)  # `plan_of` and `build` read it from here on
                plan = plan_of(model.graph, None, frozenset())
        floats: frozenset[str] = frozenset()
        info: dict[str, Any] = {}
        if self.sensitivity and plan.nodes:
            layers = [
                Layer(c.key, f"{c.label} ({c.node.op})", [c.node.inputs[i].name for i in c.activation_inputs],
                      c.output.name)
                for c in plan.nodes
            ]

            def emulate(observed: Collection[str] | None) -> Emulation:
                target = model.copy()
                return build_emulation(target, plan_of(target.graph, None, frozenset()), params, scheme, observed)

            def quantized(only: frozenset[str] | None, floats: frozenset[str]) -> frozenset[str]:
                return frozenset(c.key for c in plan_of(model.graph, only, floats).nodes)

            floats, info = self._sensitivity(model, ctx, layers, build, kept, kept_outputs, Emulator(emulate, quantized))
            plan = plan_of(model.graph, None, floats)
        rewrite = _rewrite_static(model, plan, params, scheme)
        result = PassResult.from_stats(
            quantized_nodes=rewrite.quantized_nodes,
            quantized_activations=rewrite.quantized_activations,
            quantized_weights=rewrite.quantized_weights,
            quantized_biases=rewrite.quantized_biases,
            kept_float=len(floats),
            skipped_slow=len(slow_reasons),
            calibration_samples=samples,
        )
        # Calibrating alone leaves the model as it was: it changed only if a layer was quantized.
        result.changed = rewrite.quantized_nodes > 0
        # The report names every layer left in float and why, not only the -v log.
        result.info = {**info, "skipped_slow": list(slow_reasons.values()), "excluded": excluded_labels}
        if placement == "measured":
            result.stats["kept_float_measured"] = len(measured)
            result.info |= {"kept_float_measured": list(measured.values()), "measured": measured_info}
        return result

    def _excluded_labels(self, model: Model, op_types: list[str]) -> list[str]:
        """The nodes of a quantized op type that exclude_nodes / exclude_op_types keep in float."""
        excluded = self._excluded()
        return [
            f"{node_label(node, index)} ({node.op})" for index, node in enumerate(model.graph.nodes)
            if node.op in op_types and excluded(node, node_key(index))
        ]

    def _slow_nodes(self, model: Model, op_types: list[str], ctx: PassContext) -> dict[str, dict[str, str]]:
        """The nodes fixed rules predict ORT runs slower quantized (placement `rules`), by key,
        each as {"layer": label, "reason": why}."""
        excluded = self._excluded()
        slow = {}
        for index, node in enumerate(model.graph.nodes):
            key = node_key(index)
            if node.op not in op_types or excluded(node, key):
                continue
            reason = ort_slow_reason(node, op_types)
            if reason is not None:
                slow[key] = {"layer": f"{node_label(node, index)} ({node.op})", "reason": reason}
                ctx.log.info("quantize: %s stays float: %s", node_label(node, index), reason)
        return slow

    def _calibrate(
        self, model: Model, ctx: PassContext, plan: Plan, kept: list[Feeds], kept_outputs: list[Feeds],
        first: list[Feeds] | None = None,
    ) -> tuple[dict[str, TensorStats], int]:
        """Statistics of the plan's tensors; fills `kept` with the first feeds for sensitivity and
        `kept_outputs` with what the float model gave on them (its outputs and the plan's tensors),
        and `first` with the first batch (the shapes measured placement profiles in)."""
        rows = [0]

        def keep(batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
            rows[0] += rows_of(batch)
            if first is not None and not first:
                first.append({name: np.array(value, copy=True) for name, value in batch.items()})
            if self.sensitivity and sum(rows_of(b) for b in kept) < self.sensitivity_samples:
                kept.append({name: np.array(value, copy=True) for name, value in batch.items()})
                kept_outputs.append(outputs)

        feeds = limit_rows(self._feeds(model, ctx), self.max_samples)
        if self.sensitivity:
            # Sensitivity reuses the float outputs of these runs, so they run in this process.
            stats = collect_statistics(
                model, list(plan.tensors), feeds, ctx.runner_factory,
                batch_size=self.batch_size, bins=self.bins, histograms=self.method != "minmax",
                progress=ctx.progress, on_outputs=keep,
            )
            return stats, rows[0]
        # Shards of the data set as parallel tasks, merged, when Ray is running; else serial.
        stats = collect_statistics_parallel(
            model, list(plan.tensors), feeds, ctx.runner_factory,
            batch_size=self.batch_size, bins=self.bins, histograms=self.method != "minmax",
            progress=ctx.progress, on_batch=lambda batch: keep(batch, {}),
        )
        return stats, rows[0]

    def _feeds(self, model: Model, ctx: PassContext) -> Iterator[Feeds]:
        spec = self.calibration if self.calibration is not None else ctx.calibration
        if spec is None:
            ctx.log.warning(
                "quantize: no calibration data (give calibration=... or --calibration); "
                "calibrating on generated random inputs, so the ranges will not match real data"
            )
        return iter_feeds(spec, model, shapes=ctx.input_shapes, count=GENERATED_FEEDS)

    # --- dynamic -----------------------------------------------------------------------------

    def _run_dynamic(self, model: Model, ctx: PassContext) -> PassResult:
        op_types = list(self.op_types) if self.op_types is not None else list(DYNAMIC_OP_TYPES)
        weight_qmax = self.weight_qmax(ctx, np.uint8)  # DynamicQuantizeLinear gives uint8

        def build(target: Model, only: frozenset[str] | None, floats: frozenset[str]) -> int:
            found = dynamic_candidates(target.graph, op_types, self._excluded(floats))
            chosen = [c for c in found if only is None or c.key in only]
            count = quantize_dynamic(target.graph, chosen, weight_qmax)
            target.graph.nodes = sorted_nodes(target.graph)
            return count

        floats: frozenset[str] = frozenset()
        info: dict[str, Any] = {}
        if self.sensitivity:
            layers = [
                Layer(c.key, f"{c.label} ({c.node.op})", [c.node.inputs[0].name], c.node.outputs[0].name)
                for c in dynamic_candidates(model.graph, op_types, self._excluded())
            ]
            batches = (b for f in self._feeds(model, ctx) for b in split_batches(f, self.batch_size))
            feeds = list(limit_rows(batches, self.sensitivity_samples))
            floats, info = self._sensitivity(model, ctx, layers, build, feeds)
        quantized = build(model, None, floats)
        result = PassResult.from_stats(
            quantized_nodes=quantized, quantized_weights=quantized, kept_float=len(floats),
            quantized_embeddings=self._embeddings(model, ctx),
        )
        result.info = info
        return result

    # --- weight-only 4-bit ---------------------------------------------------------------------

    def _run_weight_only(self, model: Model, ctx: PassContext) -> PassResult:
        fmt: Int4Format = "blocked_dq" if self.resolve_format(ctx) == "tensorrt" else "matmul_nbits"
        if fmt == "blocked_dq":
            _upgrade_to(model, BLOCKED_DQ_MIN_OPSET, "4-bit DequantizeLinear with blocks", ctx)
        op_types = list(self.op_types) if self.op_types is not None else list(WEIGHT_ONLY_OP_TYPES)
        candidates = weight_only_candidates(model.graph, op_types, self._excluded())
        grams: dict[str, np.ndarray] = {}
        if self.weight_method == "gptq" and candidates:
            activations = sorted({c.activation.name for c in candidates})
            feeds = limit_rows(self._feeds(model, ctx), self.max_samples)
            # The X^T X products are mid-sized: BLAS threads waiting for busy cores cost more
            # than they gain (ONNX Runtime keeps its own threads).
            with single_threaded_blas():
                grams = collect_gram(model, activations, feeds, ctx.runner_factory,
                                     batch_size=self.batch_size, progress=ctx.progress)
        codes = self._block_codes(candidates, grams, ctx)
        quantized = {c.key: (c, codes[c.key]) for c in candidates}
        rows = rewrite_weight_only(model.graph, quantized, fmt, self.accuracy_level)
        model.graph.nodes = sorted_nodes(model.graph)
        # A table tied to a Gemm reads the Gemm's 4-bit bytes when they are its own rounded codes.
        embeddings = self._embeddings(model, ctx, rows if self.weight_method == "rtn" else None)
        return PassResult.from_stats(
            quantized_nodes=len(quantized), quantized_weights=len(quantized), quantized_embeddings=embeddings
        )

    def _block_codes(
        self, candidates: list[WeightOnlyCandidate], grams: Mapping[str, np.ndarray], ctx: PassContext
    ) -> dict[str, BlockQuantized]:
        """4-bit codes of each candidate's weight: GPTQ when its input's Gram matrix is known
        (weights reading one input share its factorization), else round to nearest."""
        if not grams:
            return {
                c.key: quantize_rtn(c.weight, self.block_size, self.symmetric)
                for c in ctx.progress(candidates, "quantizing weights", total=len(candidates))
            }
        by_input: dict[str, list[WeightOnlyCandidate]] = {}
        for candidate in candidates:
            by_input.setdefault(candidate.activation.name, []).append(candidate)
        groups = list(by_input.values())
        layers = [(grams[group[0].activation.name], [c.weight for c in group]) for group in groups]
        results = quantize_gptq_by_input(layers, self.block_size, self.symmetric)
        codes: dict[str, BlockQuantized] = {}
        for group, group_codes in ctx.progress(zip(groups, results, strict=True), "quantizing weights (gptq)",
                                               total=len(groups)):
            codes.update((c.key, q) for c, q in zip(group, group_codes, strict=True))
        return codes

    def _embeddings(self, model: Model, ctx: PassContext, shared: Mapping[str, PackedRows] | None = None) -> int:
        """Store large Gather tables in int8 rows or 4-bit blocks (dynamic and weight-only modes)."""
        if not self.embeddings:
            return 0
        bits = self.embedding_bits or self.bits
        if bits == 4 and self.resolve_format(ctx) == "tensorrt":
            if self.embedding_bits == 4:
                ctx.log.info("quantize: embedding tables stay int8 rows for format tensorrt (no 4-bit gather)")
            bits = 8
        fmt = EmbeddingFormat(bits=bits, block=self.block_size, symmetric=self.symmetric)
        count = quantize_embeddings(model.graph, embedding_candidates(model.graph, self._excluded()), fmt, shared)
        if count:
            model.graph.nodes = sorted_nodes(model.graph)
        return count

    # --- shared ------------------------------------------------------------------------------

    def _excluded(self, floats: frozenset[str] = frozenset()) -> Excluded:
        patterns = list(self.exclude_nodes)
        op_types = set(self.exclude_op_types)

        def excluded(node: gs.Node, key: str) -> bool:
            if key in floats or node.op in op_types or is_quantized(node):
                return True
            return any(fnmatch.fnmatchcase(node.name or "", pattern) for pattern in patterns)

        return excluded

    def _sensitivity(
        self,
        model: Model,
        ctx: PassContext,
        layers: list[Layer],
        build: Callable[[Model, frozenset[str] | None, frozenset[str]], object],
        feeds: list[Feeds],
        float_outputs: list[Feeds] | None = None,
        emulator: Emulator | None = None,
    ) -> tuple[frozenset[str], dict[str, Any]]:
        """Rank `layers` on `feeds` and choose which to keep in float; logs the ranking.

        `float_outputs`: what the float model gave on `feeds` already (calibration's runs), so
        it is not run again. With an `emulator`, every trial is a run of one emulation model
        (`iropt.compress.quant.emulation`) and the model finally chosen is rewritten and run
        once to report its real metric; without one (or when the model cannot be emulated),
        each trial rewrites a copy of the model.

        Returns the keys kept in float and the report's view of the analysis: the ranking (most
        harmful first, each layer's metric when quantized alone), the layers kept in float, the
        metric of the model chosen, and what the analysis ran."""
        if not feeds:
            raise UserError("quantize: sensitivity analysis needs calibration inputs, and none were read")
        started = time.perf_counter()
        metric: Metric = self.target_metric
        searched_rows = 0
        observed = sorted({name for layer in layers for name in [*layer.inputs, layer.output]})
        runs = SensitivityRuns(ctx.runner_factory, feeds, [t.name for t in model.graph.outputs], metric,
                               emulator, observed, ctx.log)
        float_runs = runs.float_runs(model, float_outputs)
        named = [(layer.key, layer.label) for layer in layers]
        evaluate = functools.partial(runs.evaluate, model, build)
        if self.sensitivity_ranking == "exhaustive":
            result = analyze(named, evaluate, self.target_min, ctx.progress,
                             runs.evaluate_many if runs.parallel else None)
        else:
            # The search runs on part of the rows, aiming a little above the target; the real run
            # of the model it chooses, on every row, is the check (see `_confirm`).
            rows = runs.rows
            search_runs = runs.narrow(float_runs, search_rows(rows, SEARCH_ROWS_SHARE))
            search_target = self.target_min
            if search_runs is not None:
                search_target = tightened(self.target_min, metric, SEARCH_ERROR_MARGIN)
                float_runs = search_runs
            timer = time.perf_counter()
            quantized_runs = runs.quantized_runs(model, build)
            noise = added_noise_db(float_runs, quantized_runs, [(layer.key, layer.inputs, layer.output) for layer in layers])
            ctx.log.info("quantize: sensitivity: added noise measured on %d of %d rows in %.2f s",
                         runs.rows, rows, time.perf_counter() - timer)
            timer, before = time.perf_counter(), runs.emulation_runs
            result = analyze_fast(named, noise, evaluate, search_target, self.sensitivity_refine,
                                  runs.score(quantized_runs), metric,
                                  runs.evaluate_many if runs.trials is not None else None, SEARCH_TOLERANCE)
            ctx.log.info("quantize: sensitivity: %d trials on %d rows in %.2f s: %d layers float, %s %.6f (aim %.6f)",
                         runs.emulation_runs - before, runs.rows, time.perf_counter() - timer,
                         len(result.kept_float), metric, result.score, search_target)
            searched_rows = runs.rows
            runs.widen()
        info: dict[str, Any] = {"score": result.score}
        if runs.trials is not None:
            result, info = self._confirm(ctx, model, build, runs, result, evaluate)
        _log_ranking(ctx, result, metric, self.target_min)
        info |= {
            "sensitivity_metric": metric,
            "sensitivity_ranking": self.sensitivity_ranking,
            "ranking": [{"layer": item.label, "score": item.score} | (
                {"alone": result.alone[item.key]} if item.key in result.alone else {}) for item in result.ranking],
            "kept_float": [item.label for item in result.kept_float],
            "model_runs": result.evaluations or len(layers) + len(result.kept_float) + 1,
            "emulated": runs.trials is not None,
            "sessions": runs.sessions,
            "emulation_runs": runs.emulation_runs,
            "real_runs": runs.real_runs,
            "sensitivity_seconds": round(time.perf_counter() - started, 3),
            # Rows the fast search's trials ran on (0: exhaustive); the score is on every row.
            "search_rows": searched_rows,
        }
        return frozenset(item.key for item in result.kept_float), info


    def _confirm(
        self, ctx: PassContext, model: Model, build: Callable[[Model, frozenset[str] | None, frozenset[str]], object],
        runs: SensitivityRuns, result: SensitivityResult, evaluate: Evaluate,
    ) -> tuple[SensitivityResult, dict[str, Any]]:
        """One real run of the chosen model on every row: the emulation computes what the rewrite
        does, and a search on part of the rows may fall short on the others. When it misses the
        target there, the search goes on from that count on every row (emulated), and the model
        it then chooses is run once more."""
        timer = time.perf_counter()
        real = runs.rewritten(model, build, None, frozenset(item.key for item in result.kept_float))
        ctx.log.info("quantize: sensitivity: real run on %d rows in %.2f s: %s %.6f",
                     runs.rows, time.perf_counter() - timer, self.target_metric, real)
        if real < self.target_min and len(result.kept_float) < len(result.ranking):
            result = continue_search(result, evaluate, self.target_min)
            real = runs.rewritten(model, build, None, frozenset(item.key for item in result.kept_float))
            ctx.log.info("quantize: sensitivity: continued on every row to %d layers float: %s %.6f",
                         len(result.kept_float), self.target_metric, real)
        if result.met and real < self.target_min:
            ctx.log.warning("quantize: the chosen model's %s is %.6f rewritten, %.6f emulated (target %s)",
                            self.target_metric, real, result.score, self.target_min)
        return result, {"score": real, "emulated_score": result.score}


# The fast search's trials run on this share of the sensitivity rows (at least a few)...
SEARCH_ROWS_SHARE = 0.25
# ... aiming at this share of the target's error, so that every row usually meets the target.
SEARCH_ERROR_MARGIN = 0.8
# The search accepts the met end of a bracket of counts this narrow (a share of the layers).
SEARCH_TOLERANCE = 0.08


@dataclass(frozen=True)
class Layer:
    """A layer the sensitivity analysis ranks: its key, a label, and the tensors it reads and writes."""

    key: str
    label: str
    inputs: list[str]
    output: str


def _rewrite_static(model: Model, plan: Plan, params: Mapping[str, QParams], scheme: Scheme) -> RewriteStats:
    stats = insert_qdq(model.graph, plan, params, scheme)
    model.graph.nodes = sorted_nodes(model.graph)
    return stats


def group_params(
    plan: Plan, stats: Mapping[str, TensorStats], scheme: Scheme, method: CalibrationMethod, percentile: float
) -> dict[str, QParams]:
    """Quantization parameters per tensor; tensors of one sharing group get one, over the union range."""
    params: dict[str, QParams] = {}
    for members in plan.group_members().values():
        low, high = np.inf, -np.inf
        for name in members:
            lo, hi = compute_range(
                stats[name], method, symmetric=scheme.symmetric_activations, percentile=percentile
            )
            low, high = min(low, lo), max(high, hi)
        shared = activation_params(float(low), float(high), scheme)
        for name in members:
            params[name] = shared
    return params


def _ensure_opset(model: Model, mode: str, ctx: PassContext) -> int | None:
    """Upgrade a model older than `mode` needs (logged); the opset it had, or None."""
    minimum, what = (DYNAMIC_MIN_OPSET, "dynamic quantization (DynamicQuantizeLinear)") if mode == "dynamic" else (
        STATIC_MIN_OPSET, "static QDQ quantization with per-channel weights")
    return _upgrade_to(model, minimum, what, ctx)


def _upgrade_to(model: Model, minimum: int, what: str, ctx: PassContext) -> int | None:
    """Upgrade a model older than opset `minimum` (logged); the opset it had, or None."""
    current = model.opset
    if current >= minimum:
        return None
    upgrade_opset(model, minimum, who=f"quantize: {what} needs opset >= {minimum}, and upgrading")
    ctx.log.warning(
        "quantize: %s needs opset >= %d; upgraded the model from opset %d to %d (onnx's version "
        "converter; the run's verification covers it)", what, minimum, current, minimum,
    )
    return current


def _warn_unfused_batchnorm(plan: Plan, ctx: PassContext) -> None:
    unfused = [
        c.label for c in plan.nodes
        if is_op(c.node, "Conv", "ConvTranspose", "Gemm")
        and any(is_op(consumer, "BatchNormalization") for consumer in c.node.outputs[0].outputs)
    ]
    if unfused:
        ctx.log.info(
            "quantize: %d quantized node(s) feed a BatchNormalization (%s); fold it first "
            "(fuse_bn_conv) so the back end can fuse the quantized op with its activation",
            len(unfused), ", ".join(unfused[:5]),
        )


def _log_ranking(ctx: PassContext, result: SensitivityResult, metric: str, target: float) -> None:
    ctx.log.info("quantize: sensitivity ranking (%s with only that layer quantized, worst first):", metric)
    for position, item in enumerate(result.ranking, 1):
        ctx.log.info("quantize:   %3d. %-40s %.6f", position, item.label, item.score)
    kept = ", ".join(item.label for item in result.kept_float) or "none"
    ctx.log.info(
        "quantize: kept in float: %s; %s of the quantized model %.6f (target %s)",
        kept, metric, result.score, target,
    )
