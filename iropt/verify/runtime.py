"""Running a model in ONNX Runtime: the one place sessions are built, and the reference runner.

Verification runs the reference (ORT on the CPU with its graph optimizations off, so the model as
written, not ORT's rewrite of it) and candidates through `Runner`, the interface every back end's
compiled model also offers (`run(feeds) -> outputs`). The ORT back end (`iropt.lowering.ort`)
builds its sessions here too.

Execution providers fall back quietly in ONNX Runtime: a provider that fails to start is
dropped with a warning on stderr, and nodes that no asked-for provider takes run on the CPU.
`make_session` checks the session for both (`provider_fallback`): the fallback is logged, and
with `strict_providers=True` it is a UserError.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from iropt.errors import UserError, first_line
from iropt.io.save import spilled_model_file
from iropt.io.stream import export_streamed
from iropt.ir.model import EXTERNAL_DATA_THRESHOLD, PROTOBUF_LIMIT, Model, graph_stats, tensor_bytes
from iropt.util.text import shorten
from iropt.verify.runner import Runner

OptimizationLevel = Literal["disable", "basic", "extended", "layout", "all"]

_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    # ORT_ENABLE_LAYOUT arrived in ORT 1.22; older versions fold it into "all".
    "layout": getattr(
        ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ),
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Models whose tensors exceed the protobuf limit cannot be handed to ORT as bytes; they go
# through a temporary file with external data. A module constant so tests can lower it.
IN_MEMORY_LIMIT = EXTERNAL_DATA_THRESHOLD
# A Model with more weight bytes than this goes through that file too: handed over as bytes,
# its weights would be in memory three times at once (the graph, the serialized message and
# ORT's copy); written out, twice (ORT reads the file), and the write is faster than encoding.
IN_MEMORY_MODEL_LIMIT = 256 * 2**20

# ORT's log severity: 3 = errors only. Its warnings (unused initializers, fallbacks) are noise
# in iropt's output; failures still come back as exceptions.
_LOG_ERRORS_ONLY = 3
# A failed run is raised as a UserError with ORT's message; ORT printing it too is noise.
_LOG_FATAL_ONLY = 4
CPU = "CPUExecutionProvider"
# The session option that makes ORT refuse to place nodes on a CPU provider nobody asked for,
# and the words of its refusal.
_NO_CPU_FALLBACK = "session.disable_cpu_ep_fallback"
_CPU_FALLBACK_REFUSED = "fallback to CPU EP has been explicitly disabled"

_log = logging.getLogger("iropt.ort")

ModelLike = Model | onnx.ModelProto | str | os.PathLike[str]


class ModelRunError(UserError):
    """ONNX Runtime loaded the model but failed running it on the inputs given (a shape that
    does not fit, an index out of range): unlike a model it cannot load, often the inputs' fault."""


# The parts of ONNX Runtime's messages that describe its C++ source, not the user's model:
# "[ONNXRuntimeError] : 1 : FAIL : " and "/onnxruntime_src/.../graph.cc:1407 ".
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ ")
# Messages are one paragraph: ORT's longest run to several hundred characters of advice.
_ORT_MESSAGE_CHARS = 400


def ort_message(error: BaseException) -> str:
    """ONNX Runtime's message without its C++ source locations and function signatures."""
    text = " ".join(str(error).split())
    segments = [s for s in _ORT_STATUS.split(text) if s.strip()] or [text]
    message = segments[-1]  # nested statuses: the innermost says what is wrong
    location = _ORT_SOURCE.search(message)
    if location is not None:
        message = _after_signature(message[location.end() :])
    message = message.replace("status.IsOK() was false.", "").strip() or first_line(error)
    return shorten(message, _ORT_MESSAGE_CHARS)


def _after_signature(text: str) -> str:
    """`text` past a leading C++ signature such as `void onnxruntime::Graph::Graph(...) const`."""
    opening = text.find("(")
    if opening < 0 or "::" not in text[:opening]:
        return text
    depth = 0
    for index in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[index + 1 :].removeprefix(" const").strip()
    return text


class OrtRunner:
    """Runs an InferenceSession: `run(feeds) -> {output_name: array}`."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = _LOG_FATAL_ONLY

    @classmethod
    def from_model(cls, model: ModelLike, **session_options: Any) -> OrtRunner:
        """A runner for `model`; `session_options` are those of `make_session`."""
        return cls(make_session(model, **session_options))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Only the session's own inputs: a feed may carry arrays for inputs a rewrite removed
        # (an unused input); a missing input is still ORT's error.
        wanted = {name: feeds[name] for name in self.input_names if name in feeds}
        try:
            values = self.session.run(self.output_names, wanted, self._run_options)
        except Exception as error:
            raise ModelRunError(f"ONNX Runtime failed to run the model: {ort_message(error)}") from error
        return {name: _as_array(value) for name, value in zip(self.output_names, values, strict=True)}


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # Sequence and map outputs: kept as an object array so every output is an ndarray.
    array = np.empty(1, dtype=object)
    array[0] = value
    return array


def make_session(
    model: ModelLike,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    optimization_level: OptimizationLevel = "all",
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    optimized_model_path: Path | None = None,
    save_ort_format: bool = False,
    strict_providers: bool = False,
    prepack_weights: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession for `model` (a Model, a ModelProto or a path).

    `optimized_model_path` makes ORT write the model after its graph optimizations (as an ORT
    format file with `save_ort_format=True`). `prepack_weights=False` keeps ORT from packing
    weights for its GEMM kernels while the session is made (faster repeated runs, but each packed
    weight is in memory twice until its original is let go). A provider fallback (see `provider_fallback`) is
    logged as a warning, or with `strict_providers` raised as a UserError. Raises UserError for
    an unknown provider or a model ORT cannot load.
    """
    check_providers(providers)
    if optimization_level not in _LEVELS:
        raise UserError(
            f"unknown optimization_level '{optimization_level}'; choose one of: {', '.join(_LEVELS)}"
        )
    options = _session_options(optimization_level, intra_op_threads, inter_op_threads)
    if not prepack_weights:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
        if save_ort_format:
            options.add_session_config_entry("session.save_model_format", "ORT")
    create = functools.partial(_create_checked, options=options, providers=providers, strict=strict_providers)
    return _created_from(
        model, create, before_spill=lambda: _externalize_optimized(options, optimized_model_path, save_ort_format)
    )


def _created_from(
    model: ModelLike,
    create: Callable[[str | bytes], ort.InferenceSession],
    before_spill: Callable[[], None] | None = None,
) -> ort.InferenceSession:
    """`create` called with what ORT loads `model` from: its path, its bytes, or a temporary file
    (after `before_spill`) when it is too big for one protobuf message."""
    if isinstance(model, (str, os.PathLike)):
        return create(str(model))
    if isinstance(model, Model):
        if graph_stats(model).parameter_bytes <= min(IN_MEMORY_LIMIT, IN_MEMORY_MODEL_LIMIT):  # checked below
            # Serialized by the streaming writer: the weights are copied once, not four times.
            streamed = export_streamed(model)
            if streamed.byte_size() <= PROTOBUF_LIMIT:
                return create(streamed.to_bytes())
    elif tensor_bytes(model) <= IN_MEMORY_LIMIT:
        return create(model.SerializeToString())
    if before_spill is not None:
        before_spill()
    # Too big for one protobuf message: written with its data beside it for ORT to read. ORT
    # reads (or maps) the data while the session is created; on Linux a mapped file stays
    # valid after its name is removed.
    with spilled_model_file(model) as path:
        return create(str(path))


def _create_checked(
    model: str | bytes, *, options: ort.SessionOptions, providers: Sequence[str], strict: bool
) -> ort.InferenceSession:
    """A session, with the providers it really runs on checked against `providers`."""
    session, cpu_nodes = None, False
    if CPU not in providers:
        session = _create_without_cpu(model, options, providers)
        cpu_nodes = session is None
    if session is None and not (cpu_nodes and strict):
        session = _create(model, options, providers)
    fallback = provider_fallback(providers, session.get_providers() if session else [], cpu_nodes)
    if fallback is not None:
        if strict:
            raise UserError(
                f"{fallback}; strict_providers=true refuses a fallback (install or enable the provider, "
                f"or list {CPU} to allow it)"
            )
        _log.warning("%s (strict_providers=true makes this an error)", fallback)
    assert session is not None
    return session


def _create_without_cpu(
    model: str | bytes, options: ort.SessionOptions, providers: Sequence[str]
) -> ort.InferenceSession | None:
    """The session when no node needs the CPU provider, else None (only ORT knows where nodes go)."""
    options.add_session_config_entry(_NO_CPU_FALLBACK, "1")
    severity, options.log_severity_level = options.log_severity_level, _LOG_FATAL_ONLY
    try:
        return _create(model, options, providers)
    except UserError as error:
        if _CPU_FALLBACK_REFUSED not in str(error):
            raise
        return None
    finally:
        options.log_severity_level = severity
        options.add_session_config_entry(_NO_CPU_FALLBACK, "0")


def provider_fallback(asked: Sequence[str], running: Sequence[str], cpu_nodes: bool) -> str | None:
    """What fell back, in words: asked-for providers the session lacks, nodes sent to the CPU."""
    if cpu_nodes:
        return f"ort: asked for {', '.join(asked)}, but some nodes would run on {CPU}, which was not asked for"
    missing = [p for p in asked if p not in running]
    if missing:
        return (
            f"ort: execution provider(s) {', '.join(missing)} did not start; the session runs on "
            f"{', '.join(running) or 'nothing'}"
        )
    return None


def _externalize_optimized(
    options: ort.SessionOptions, optimized_model_path: Path | None, save_ort_format: bool
) -> None:
    """A large optimized model must be written with its tensors beside it, as ONNX demands."""
    if optimized_model_path is not None and not save_ort_format:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", optimized_model_path.name + ".data"
        )


def _session_options(
    optimization_level: OptimizationLevel, intra_op_threads: int, inter_op_threads: int,
    log_level: int = _LOG_ERRORS_ONLY,
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization_level]
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = log_level
    return options


def _create(
    model: str | bytes, options: ort.SessionOptions, providers: Sequence[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=options, providers=list(providers))
    except Exception as error:
        raise UserError(f"ONNX Runtime cannot run this model: {ort_message(error)}") from error


def check_providers(providers: Sequence[str]) -> None:
    """UserError unless every provider is available in this ONNX Runtime build."""
    available = ort.get_available_providers()
    if not providers:
        raise UserError(f"ort: give at least one provider; available here: {', '.join(available)}")
    for provider in providers:
        if provider not in available:
            raise UserError(
                f"ort: execution provider '{provider}' is not available in this ONNX Runtime build; "
                f"available: {', '.join(available)}"
            )




def reference_runner(model: ModelLike) -> Runner:
    """ONNX Runtime on the CPU with graph optimizations disabled; UserError if ORT cannot load it.

    A path is loaded by ONNX Runtime itself, external data included. Weights are not prepacked:
    the reference runs a few feeds, and a weight of several GB would be in memory twice."""
    return OrtRunner(make_session(
        model, providers=["CPUExecutionProvider"], optimization_level="disable", prepack_weights=False
    ))


def profile_models(
    models: Sequence[ModelLike],
    feed: Mapping[str, np.ndarray],
    *,
    runs: int,
    threads: int = 0,
    optimization_level: OptimizationLevel = "all",
) -> list[tuple[list[dict[str, Any]], onnx.ModelProto]]:
    """Run each model `runs` times with ONNX Runtime's profiler on, the models interleaved run by
    run so that machine noise hits them alike; per model, the profiler's events (Chrome trace
    JSON, in the order ORT wrote them) and the graph ORT ran after its optimizations, whose node
    names the events carry."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="iropt-profile-") as tmp:
        sessions, runners = [], []
        for index, model in enumerate(models):
            session = _profiling_session(model, Path(tmp) / f"m{index}", threads, optimization_level)
            sessions.append(session)
            runners.append(OrtRunner(session))
        for _ in range(runs):
            for runner in runners:
                runner.run(feed)
        results = []
        for index, session in enumerate(sessions):
            events = json.loads(Path(session.end_profiling()).read_text())
            optimized = onnx.load(str(Path(tmp) / f"m{index}.optimized.onnx"), load_external_data=False)
            results.append((events, optimized))
        return results


def _profiling_session(
    model: ModelLike, prefix: Path, threads: int, optimization_level: OptimizationLevel
) -> ort.InferenceSession:
    # Fatal only: ORT warns that the optimized model it writes is specific to this hardware.
    options = _session_options(optimization_level, threads, 1, log_level=_LOG_FATAL_ONLY)
    _no_spinning(options, threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    options.optimized_model_filepath = str(prefix) + ".optimized.onnx"
    # Weights beside the optimized model: its graph is what is read back, not its values.
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", prefix.name + ".optimized.data"
    )
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
    return _created_from(model, functools.partial(_create, options=options, providers=[CPU]))


def _no_spinning(options: ort.SessionOptions, threads: int) -> None:
    """Worker threads sleep between ops instead of spinning: on a machine shared with other work a
    spinning pool stalls whenever one of its threads is descheduled, and timings swing by 10x."""
    if threads != 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")


def _timing_session(model: ModelLike, threads: int, optimization_level: OptimizationLevel) -> ort.InferenceSession:
    options = _session_options(optimization_level, threads, 1)
    _no_spinning(options, threads)
    return _created_from(model, functools.partial(_create, options=options, providers=[CPU]))


def interleaved_latency_ms(
    models: Sequence[ModelLike],
    feed: Mapping[str, np.ndarray],
    *,
    threads: int = 0,
    optimization_level: OptimizationLevel = "all",
    budget_s: float = 0.5,
    min_rounds: int = 10,
    max_rounds: int = 200,
) -> list[float]:
    """The median latency (ms) of each model on `feed`, the models run in turn round by round
    (the first two rounds warm up and are not counted); stops after `budget_s` seconds of
    rounds once `min_rounds` are done."""
    import statistics
    import time

    runners = [OrtRunner(_timing_session(model, threads, optimization_level)) for model in models]
    for runner in runners:
        for _ in range(2):
            runner.run(feed)
    samples: list[list[float]] = [[] for _ in runners]
    started = time.perf_counter()
    for round_index in range(max_rounds):
        order = runners if round_index % 2 == 0 else runners[::-1]  # neither always runs first
        for runner in order:
            begin = time.perf_counter()
            runner.run(feed)
            samples[runners.index(runner)].append((time.perf_counter() - begin) * 1000.0)
        if round_index + 1 >= min_rounds and time.perf_counter() - started >= budget_s:
            break
    return [statistics.median(values) for values in samples]
