"""Measured placement: keep in float the layers that do not run faster in int8 on the target.

Fixed rules (`placement.ort_slow_reason`) guess which layers ONNX Runtime runs slower in int8;
this measures it, in the model's own shapes (the calibration batch) on the machine at hand:

1. Profile the float model and the fully quantized candidate (every layer int8, calibrated
   parameters) with ONNX Runtime's profiler, runs interleaved (`PassContext.model_profiler`).
2. Charge ORT's nodes to the model's layers (`attribution`): a layer's int8 cost is its int8
   kernel plus the Q/DQ and layout conversions it causes, its float cost its float kernel (with
   ORT's NCHWc reorders around it). A layer whose int8 cost is higher stays float (`slow_layers`).
3. Check the whole model: time the chosen mix against the float model end to end (interleaved
   runs, medians; at the target's thread count, or without one at one thread and at ORT's
   default). A mix passes when it is faster by NOISE_MARGIN, twice. When the first mix fails, the
   whole model in int8 is timed once (conversions at the borders of float islands can cost more
   than the layers gain); after that a failing mix loses its next least paying int8 layers
   (1, then 2, then 4 more...) and is timed again; after `MAX_CHECKS` mixes, or once the
   layers' predicted gain is below the margin, every layer stays float and the report says
   that no layer paid. What comes out is never slower than float as measured.

Kernels are profiled at the target's thread count, or at one thread without one: per-kernel
times of a thread pool on a machine shared with other work say more about the load than the layer.

Layer timings and the model's verdict are cached per machine (`timing_cache`), so quantizing
the same model, or one with the same layers, again costs no profiling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from iropt.compress.quant.attribution import attribute, tagged_copy, tensor_producers
from iropt.compress.quant.placement import Plan
from iropt.compress.quant.timing_cache import TimingCache, signature_key
from iropt.errors import UserError
from iropt.infra.pass_base import PassContext
from iropt.ir.model import Model
from iropt.verify.profiling import ModelProfiler

# Per-element ops that follow a layer and that ORT fuses into its float kernel (see `_followers`).
FOLLOWER_OPS = ("BatchNormalization", "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu")
# Mixes timed end to end before falling back to all-float.
MAX_CHECKS = 4
# A mix passes when it is faster than float by at least this fraction: two medians of the same
# model differ by about a percent on a busy machine, and a mix that gains less is not worth the
# risk of being slower where it runs.
NOISE_MARGIN = 0.02
# Measurements a mix must pass at each thread count.
CONFIRMATIONS = 2
# The profiled batch: at most this many rows of the calibration batch (when the batch axis is free).
PROFILE_ROWS = 8

Build = Callable[[Model, frozenset[str]], None]


@dataclass(frozen=True)
class MeasuredLayer:
    """A candidate layer: its plan key, a label, the node positions whose time is its own (the
    node and the per-element ops after it, see `_followers`) and its timing-cache signature."""

    key: str
    label: str
    indices: tuple[int, ...]
    signature: Mapping[str, Any]


@dataclass(frozen=True)
class LayerTiming:
    key: str
    label: str
    int8_ms: float
    float_ms: float

    @property
    def gain_ms(self) -> float:
        return self.float_ms - self.int8_ms

    def reason(self) -> str:
        return f"measured: int8 {self.int8_ms:.3f} ms vs float {self.float_ms:.3f} ms"


@dataclass
class Check:
    """One end-to-end comparison: how many layers stayed float, and the two latencies."""

    float_layers: int
    int8_ms: float
    float_ms: float

    @property
    def passes(self) -> bool:
        return self.int8_ms <= self.float_ms * (1.0 - NOISE_MARGIN)


@dataclass
class Placement:
    """The outcome: layers kept float with their reasons, the timings and checks behind it."""

    kept_float: dict[str, str]
    timings: list[LayerTiming]
    checks: list[Check] = field(default_factory=list)
    no_layer_paid: bool = False
    from_cache: bool = False
    seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        """The report's view: totals of the profiles and of the end-to-end checks."""
        last = self.checks[-1] if self.checks else None
        return {
            "layers_int8_ms": round(sum(t.int8_ms for t in self.timings), 4),
            "layers_float_ms": round(sum(t.float_ms for t in self.timings), 4),
            "end_to_end": [
                {"float_layers": c.float_layers, "int8_ms": round(c.int8_ms, 4), "float_ms": round(c.float_ms, 4)}
                for c in self.checks
            ],
            "model_int8_ms": None if last is None else round(last.int8_ms, 4),
            "model_float_ms": None if last is None else round(last.float_ms, 4),
            "no_layer_paid": self.no_layer_paid,
            "from_cache": self.from_cache,
            "measuring_seconds": round(self.seconds, 3),
        }


# --- decisions (pure) ----------------------------------------------------------------------


def slow_layers(timings: Sequence[LayerTiming]) -> dict[str, str]:
    """The layers whose int8 cost is above their float cost, each with its reason."""
    return {t.key: t.reason() for t in timings if t.int8_ms > t.float_ms}


def drop_order(timings: Sequence[LayerTiming], kept_float: Mapping[str, str]) -> list[LayerTiming]:
    """The int8 layers, the one that gains least first: the order in which they go back to float."""
    return sorted((t for t in timings if t.key not in kept_float), key=lambda t: (t.gain_ms, t.key))


def settle(
    timings: Sequence[LayerTiming],
    check: Callable[[frozenset[str]], Check],
    max_checks: int = MAX_CHECKS,
) -> tuple[dict[str, str], list[Check], bool]:
    """Float layers for a mix that is no slower than float end to end, as `check` measures it.

    Starts from `slow_layers`; when that mix fails, the whole model in int8 is checked once (if
    its layers gain enough in all); while the checks fail, moves the next 1, 2, 4... least
    paying int8 layers to float; after `max_checks` failed checks (or none left int8) every
    layer is float. A mix whose layers gain less than NOISE_MARGIN of the layers' float time in
    all is not checked: the check could not tell it from float, and fewer int8 layers gain less.
    Returns the float layers with reasons, the checks and whether all are float.
    """
    kept = slow_layers(timings)
    checks: list[Check] = []
    step = 1
    float_total = sum(t.float_ms for t in timings)
    whole_model_checked = not kept  # with no slow layer the first mix is the whole int8 model
    while len(kept) < len(timings) and len(checks) < max_checks:
        if sum(t.gain_ms for t in timings if t.key not in kept) < NOISE_MARGIN * float_total:
            break
        result = check(frozenset(kept))
        checks.append(result)
        if result.passes:
            return kept, checks, False
        if not whole_model_checked and len(checks) < max_checks:
            # Every float island adds Q/DQ at its borders, which the per-layer costs only partly
            # see: a model quantized throughout can pay where the mix does not.
            whole_model_checked = True
            if sum(t.gain_ms for t in timings) >= NOISE_MARGIN * float_total:
                whole = check(frozenset())
                checks.append(whole)
                if whole.passes:
                    return {}, checks, False
        for timing in drop_order(timings, kept)[:step]:
            kept[timing.key] = (
                f"{timing.reason()}; moved back to float after the model was slower in int8 end to end "
                f"({result.int8_ms:.3f} ms vs float {result.float_ms:.3f} ms)"
            )
        step *= 2
    everything = {t.key: kept.get(t.key, "no layer paid end to end: the model runs as fast in float") for t in timings}
    return everything, checks, True


# --- signatures ----------------------------------------------------------------------------


def _tensor_signature(tensor: gs.Tensor) -> list[Any]:
    shape = getattr(tensor, "shape", None)
    dtype = getattr(tensor, "dtype", None)
    return [None if shape is None else [d if isinstance(d, int) else str(d) for d in shape],
            None if dtype is None else str(np.dtype(dtype)) if not isinstance(dtype, int) else dtype,
            isinstance(tensor, gs.Constant)]


def _attr_signature(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_attr_signature(v) for v in value]
    return repr(value)[:200]


def layer_signature(node: gs.Node, absorbed: gs.Node | None, context: Mapping[str, Any]) -> dict[str, Any]:
    """What a layer's timing depends on: op, attributes, input and output shapes and types, the
    activation absorbed into it, the ops reading its output, and the run's `context` (batch
    shapes, threads, optimization level)."""
    tail = absorbed if absorbed is not None else node
    return {
        "op": node.op,
        "attrs": {name: _attr_signature(value) for name, value in sorted(node.attrs.items())},
        "inputs": [_tensor_signature(t) for t in node.inputs],
        "outputs": [_tensor_signature(t) for t in node.outputs],
        "absorbed": None if absorbed is None else absorbed.op,
        "consumers": sorted(c.op for c in tail.outputs[0].outputs) if tail.outputs else [],
        "context": dict(context),
    }


def model_signature(model: Model, layers: Sequence[MeasuredLayer], context: Mapping[str, Any]) -> str:
    """The cache key of a whole model's verdict: its graph's wiring and its layers' signatures."""
    wiring = [(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs]) for node in model.graph.nodes]
    return signature_key({"wiring": wiring, "layers": [dict(layer.signature) for layer in layers],
                          "context": dict(context)})


def profile_feed(model: Model, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The calibration batch, cut to PROFILE_ROWS rows where every input's batch axis is free."""
    free = all(
        not tensor.shape or not isinstance(tensor.shape[0], int) or tensor.shape[0] < 0
        for tensor in model.graph.inputs
    )
    if not free:
        return dict(batch)
    return {name: value[:PROFILE_ROWS] if getattr(value, "ndim", 0) else value for name, value in batch.items()}


# --- measuring -----------------------------------------------------------------------------


@dataclass
class Measurer:
    """Profiles and times models for one run of measured placement."""

    model: Model
    layers: Sequence[MeasuredLayer]
    build: Build
    feed: Mapping[str, np.ndarray]
    profiler: ModelProfiler
    threads: int
    optimization_level: str
    log: logging.Logger

    def __post_init__(self) -> None:
        # Profiled with names that carry each node's position (see `attribution`).
        self.tagged = tagged_copy(self.model)

    def candidate(self, floats: frozenset[str]) -> Model:
        mix = self.tagged.copy()
        self.build(mix, floats)
        return mix

    def layer_timings(self) -> list[LayerTiming]:
        """Each layer's int8 and float cost from one interleaved profile of both models."""
        quantized = self.candidate(frozenset())
        float_profile, int8_profile = self.profiler.profile(
            [self.tagged, quantized], self.feed, threads=self.threads or 1,
            optimization_level=self.optimization_level,
        )
        as_float = attribute({k: (v.op, v.ms) for k, v in float_profile.nodes.items()}, float_profile.graph,
                             tensor_producers(self.tagged))
        as_int8 = attribute({k: (v.op, v.ms) for k, v in int8_profile.nodes.items()}, int8_profile.graph,
                            tensor_producers(quantized))
        self.log.debug(
            "quantize: profiled float %.3f ms (%.3f unattributed), int8 %.3f ms (%.3f unattributed)",
            float_profile.kernel_ms, as_float.unattributed_ms, int8_profile.kernel_ms, as_int8.unattributed_ms,
        )
        return [
            LayerTiming(layer.key, layer.label, as_int8.layer_ms(layer.indices), as_float.layer_ms(layer.indices))
            for layer in self.layers
        ]

    def check(self, floats: frozenset[str]) -> Check:
        """The mix against float end to end, at the target's thread count; without one, at one
        thread and at ORT's default (a model is run both ways), reporting the worst measurement.

        A passing measurement is taken again and must pass twice: a burst of other work during
        the float model's turns can make one measurement pass by chance."""
        mix = self.candidate(floats)
        worst: Check | None = None
        for threads in [self.threads] if self.threads else [1, 0]:
            for _ in range(CONFIRMATIONS):
                float_ms, int8_ms = self.profiler.latency(
                    [self.tagged, mix], self.feed, threads=threads, optimization_level=self.optimization_level,
                )
                self.log.info(
                    "quantize: end to end with %d layer(s) float, %s thread(s): int8 %.3f ms vs float %.3f ms",
                    len(floats), threads or "default", int8_ms, float_ms,
                )
                if worst is None or int8_ms / float_ms > worst.int8_ms / worst.float_ms:
                    worst = Check(len(floats), int8_ms, float_ms)
                if not worst.passes:
                    return worst  # failed already: further measurements cannot save it
        assert worst is not None
        return worst


def measured_placement(measurer: Measurer, cache: TimingCache | None) -> Placement:
    """Which layers stay float (see the module docstring), from the cache where it knows."""
    start = time.perf_counter()
    layers = measurer.layers
    model_key = model_signature(measurer.model, layers, _context(measurer))
    timings = _cached_timings(layers, cache)
    verdict = _cached_verdict(cache.model(model_key), layers) if cache is not None and timings else None
    if timings is not None and verdict is not None:
        kept, checks, no_layer_paid = verdict
        return Placement(kept, timings, checks, no_layer_paid, True, time.perf_counter() - start)
    if timings is None:
        timings = measurer.layer_timings()
    kept, checks, no_layer_paid = settle(timings, measurer.check)
    if cache is not None:
        for layer, timing in zip(layers, timings, strict=True):
            cache.put_layer(signature_key(layer.signature), timing.int8_ms, timing.float_ms)
        cache.put_model(model_key, {
            "kept_float": kept, "no_layer_paid": no_layer_paid,
            "checks": [{"float_layers": c.float_layers, "int8_ms": c.int8_ms, "float_ms": c.float_ms} for c in checks],
        })
        cache.save()
    return Placement(kept, timings, checks, no_layer_paid, False, time.perf_counter() - start)


def _cached_timings(layers: Sequence[MeasuredLayer], cache: TimingCache | None) -> list[LayerTiming] | None:
    """Every layer's timings from the cache, or None when one of them is not there."""
    if cache is None:
        return None
    timings = []
    for layer in layers:
        known = cache.layer(signature_key(layer.signature))
        if known is None:
            return None
        timings.append(LayerTiming(layer.key, layer.label, known[0], known[1]))
    return timings


def _cached_verdict(
    known: Mapping[str, Any] | None, layers: Sequence[MeasuredLayer]
) -> tuple[dict[str, str], list[Check], bool] | None:
    """A whole-model verdict read back from the cache, or None when absent or not one of ours."""
    if known is None:
        return None
    try:
        kept = {str(key): str(reason) for key, reason in known["kept_float"].items()}
        checks = [Check(int(c["float_layers"]), float(c["int8_ms"]), float(c["float_ms"])) for c in known["checks"]]
        no_layer_paid = bool(known["no_layer_paid"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return (kept, checks, no_layer_paid) if set(kept) <= {layer.key for layer in layers} else None


def _context(measurer: Measurer) -> dict[str, Any]:
    return run_context(measurer.feed, measurer.threads, measurer.optimization_level)


def run_context(feed: Mapping[str, np.ndarray], threads: int, optimization_level: str) -> dict[str, Any]:
    """The part of a layer's signature that comes from the run, not the layer."""
    return {
        "feed": {name: [list(np.shape(v)), str(np.asarray(v).dtype)] for name, v in sorted(feed.items())},
        "threads": threads,
        "optimization_level": optimization_level,
    }


# --- the pass's entry point -----------------------------------------------------------------


def target_run_settings(ctx: PassContext) -> tuple[int, str]:
    """Intra-op threads and optimization level the target runs with (ORT's defaults without one)."""
    options = ctx.target.options if ctx.target is not None else {}
    return int(options.get("intra_op_threads", 0) or 0), str(options.get("optimization_level", "all"))


def plan_layers(model: Model, plan: Plan, context: Mapping[str, Any]) -> list[MeasuredLayer]:
    """The plan's anchors (Conv, Gemm, MatMul...) as layers to measure."""
    position = {id(node): index for index, node in enumerate(model.graph.nodes)}
    layers = []
    for candidate in plan.nodes:
        if not candidate.is_anchor:
            continue
        indices = [position[id(node)] for node in [candidate.node, *_followers(model, candidate.node)]]
        signature = layer_signature(candidate.node, candidate.absorbed, context)
        layers.append(MeasuredLayer(candidate.key, f"{candidate.label} ({candidate.node.op})", tuple(indices), signature))
    return layers


def _followers(model: Model, node: gs.Node) -> list[gs.Node]:
    """The chain of per-element ops after `node`, each the sole reader of the one before (a
    BatchNormalization, an activation, a constant bias Add): ORT fuses them into a float Conv
    or Gemm, and they are part of what keeping the layer in int8 costs or saves."""
    chain: list[gs.Node] = []
    current = node
    outputs = {t.name for t in model.graph.outputs}
    while len(current.outputs) >= 1 and current.outputs[0].name not in outputs:
        readers = current.outputs[0].outputs
        if len(readers) != 1 or not _follows(readers[0], current.outputs[0]):
            break
        current = readers[0]
        chain.append(current)
    return chain


def _follows(node: gs.Node, tensor: gs.Tensor) -> bool:
    if node.op in FOLLOWER_OPS:
        return node.inputs[0] is tensor
    if node.op in ("Add", "Mul"):
        others = [t for t in node.inputs if t is not tensor]
        return len(others) == 1 and isinstance(others[0], gs.Constant)
    return False


def place_by_measurement(
    model: Model, plan: Plan, build: Build, batch: Mapping[str, np.ndarray], ctx: PassContext,
    cache: TimingCache | None,
) -> tuple[dict[str, dict[str, str]], dict[str, Any]] | None:
    """The plan's layers to keep float, by key ({"layer": label, "reason": why}), and the
    report's view of the measurement; logs each decision and the time measuring took. None
    (with a warning) when the target cannot run the models to time them."""
    threads, level = target_run_settings(ctx)
    feed = profile_feed(model, batch)
    layers = plan_layers(model, plan, run_context(feed, threads, level))
    if not layers:
        return {}, {}
    measurer = Measurer(model, layers, build, feed, ctx.model_profiler, threads, level, ctx.log)
    try:
        placement = measured_placement(measurer, cache)
    except UserError as error:
        ctx.log.warning("quantize: could not time the layers (%s); placing them by rules instead", error)
        return None
    labels = {layer.key: layer.label for layer in layers}
    kept = {key: {"layer": labels[key], "reason": reason} for key, reason in placement.kept_float.items()}
    for item in kept.values():
        ctx.log.info("quantize: %s stays float: %s", item["layer"], item["reason"])
    if placement.no_layer_paid:
        ctx.log.warning("quantize: no layer runs faster in int8 on this machine; the model stays float")
    ctx.log.info(
        "quantize: measured placement took %.2f s%s: %d of %d layer(s) stay float",
        placement.seconds, " (from the timing cache)" if placement.from_cache else "", len(kept), len(layers),
    )
    return kept, placement.info()
