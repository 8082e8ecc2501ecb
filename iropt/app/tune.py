"""`iropt tune`: search schedule parameters with Ray Tune, keep the Pareto front and the best schedule.

The search space is a small TOML file:

    # alternative whole schedules (built-in names or files, relative to this file)
    [schedules]
    exact = "default"
    int8 = "int8_ort.opt"

    # options of passes, "pass.option": a list is a choice, a table a range
    [options]
    "quantize.method" = ["minmax", "percentile", "entropy"]
    "quantize.percentile" = { low = 99.0, high = 99.999 }
    "quantize.bins" = { low = 512, high = 4096, int = true, log = true }

A trial picks a schedule and values for the options, sets each option on every call of its pass
in that schedule (options of passes the schedule does not call are ignored), and replaces the
schedule's top-level `verify(...)` with the constraint. It optimizes the model with that text,
verifies it (the metric the constraint names) and measures the objective. Trials that miss the
constraint count, to the searcher, as worse than any trial that meets it.

Results: `trials.json` (every trial), `pareto.json` and `pareto.svg` (objective against the
metric), and `best.opt`: the text of the best feasible trial, which `iropt run` turns into the
same model byte for byte (its sha256 is in `trials.json`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from iropt.errors import UserError, first_line
from iropt.util import toml
from iropt.verify.compare import Comparison
from iropt.verify.criteria import HIGHER_IS_BETTER, Criterion

OBJECTIVES = ("latency", "size", "nodes")
OBJECTIVE_UNITS = {"latency": "latency (ms)", "size": "weight bytes", "nodes": "nodes"}
SEARCHERS = ("random", "optuna")
METRIC_FIELDS = {"cosine": "cosine", "snr": "snr_db", "top1": "top1", "max_abs": "max_abs", "max_rel": "max_rel"}
# A trial that misses the constraint scores this many times the input model's objective, plus
# its own: worse than every feasible trial, and still ordered among the infeasible ones.
INFEASIBLE_PENALTY = 10.0


# --- the space ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One pass option to search: a choice of values, or a float/int range (log-scaled or not)."""

    pass_name: str
    option: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    integer: bool = False
    log: bool = False

    @property
    def key(self) -> str:
        return f"{self.pass_name}.{self.option}"


@dataclass(frozen=True)
class SearchSpace:
    """Named alternative schedules (name -> (text, file name)) and the options to vary."""

    schedules: dict[str, tuple[str, str]]
    dimensions: tuple[Dimension, ...] = ()


def read_space(path: Path) -> SearchSpace:
    """Parse and check a space file; every schedule must parse and every option be well formed."""
    from iropt.dsl import parse_schedule, read_schedule

    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, toml.TOMLDecodeError) as error:
        raise UserError(f"{path}: cannot read the search space: {error}") from error
    unknown = set(data) - {"schedules", "options"}
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; expected 'schedules' and 'options'")
    table = data.get("schedules")
    if not isinstance(table, dict) or not table or not all(isinstance(v, str) for v in table.values()):
        raise UserError(f"{path}: [schedules] names at least one schedule: name = \"file.opt\" or a built-in name")
    schedules: dict[str, tuple[str, str]] = {}
    for name, where in table.items():
        local = path.resolve().parent / where
        text, filename, _ = read_schedule(local if local.is_file() else where)
        parse_schedule(text, filename)  # syntax errors now, not in every trial
        schedules[str(name)] = (text, filename)
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise UserError(f"{path}: [options] maps \"pass.option\" to a list of values or a range table")
    dimensions = tuple(_dimension(path, key, value) for key, value in options.items())
    return SearchSpace(schedules, dimensions)


def _dimension(path: Path, key: str, value: Any) -> Dimension:
    pass_name, dot, option = key.partition(".")
    if not dot or not pass_name or not option:
        raise UserError(f"{path}: option '{key}' must read \"pass.option\" (e.g. \"quantize.method\")")
    if isinstance(value, list):
        if not value:
            raise UserError(f"{path}: option '{key}' has an empty list of choices")
        return Dimension(pass_name, option, choices=tuple(value))
    if isinstance(value, dict) and {"low", "high"} <= set(value) <= {"low", "high", "int", "log"}:
        low, high = value["low"], value["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise UserError(f"{path}: option '{key}' needs numbers low < high, got {low!r} and {high!r}")
        log = bool(value.get("log", False))
        if log and low <= 0:
            raise UserError(f"{path}: option '{key}' is log-scaled, so low must be positive")
        return Dimension(pass_name, option, low=float(low), high=float(high),
                         integer=bool(value.get("int", False)), log=log)
    raise UserError(f"{path}: option '{key}' must be a list of choices or {{ low = .., high = .. }} "
                    "(with int = true / log = true if wanted)")


# --- the constraint and the objective -------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """`metric>=bound` (cosine, snr, top1) or `metric<=bound` (max_abs, max_rel)."""

    metric: str
    bound: float

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def criterion(self) -> Criterion:
        if self.higher_is_better:
            return Criterion(metric=self.metric, min=self.bound)  # type: ignore[arg-type]
        return Criterion(metric=self.metric, max=self.bound)  # type: ignore[arg-type]

    def value_of(self, comparison: Comparison) -> float | None:
        """The metric over all outputs: the worst output's value."""
        values = [getattr(o, METRIC_FIELDS[self.metric]) for o in comparison.outputs]
        known = [float(v) for v in values if v is not None]
        if not known:
            return None
        return min(known) if self.higher_is_better else max(known)

    def met(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def describe(self) -> str:
        return f"{self.metric}{'>=' if self.higher_is_better else '<='}{self.bound:g}"


def parse_constraint(text: str) -> Constraint:
    match = re.fullmatch(r"\s*([a-z_0-9]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if match is None or match.group(1) not in METRIC_FIELDS:
        raise UserError(f"--constraint '{text}': expected METRIC>=VALUE or METRIC<=VALUE with METRIC one of "
                        f"{', '.join(METRIC_FIELDS)} (e.g. \"cosine>=0.99\")")
    metric, op, number = match.groups()
    expected = ">=" if metric in HIGHER_IS_BETTER else "<="
    if op != expected:
        raise UserError(f"--constraint '{text}': {metric} is bounded with {expected}")
    try:
        return Constraint(metric, float(number))
    except ValueError as error:
        raise UserError(f"--constraint '{text}': '{number}' is not a number") from error


# --- one trial ------------------------------------------------------------------------------


def trial_schedule(space: SearchSpace, config: Mapping[str, Any], constraint: Constraint) -> tuple[str, dict[str, Any]]:
    """The schedule text of a trial, and the options that applied (those of passes it calls)."""
    from iropt.dsl import Option, Schedule, Verify, parse_schedule, print_schedule

    text, filename = space.schedules[str(config["schedule"])]
    schedule: Schedule = parse_schedule(text, filename)
    applied: dict[str, Any] = {}
    statements = tuple(_with_options(s, space.dimensions, config, applied) for s in schedule.statements)
    criterion = constraint.criterion()
    bound = ("min", criterion.min) if constraint.higher_is_better else ("max", criterion.max)
    verify = Verify(options=(Option("metric", constraint.metric), Option(*bound)))
    kept = tuple(s for s in statements if not isinstance(s, Verify))
    return print_schedule(replace(schedule, statements=(*kept, verify))), applied


def _with_options(statement: Any, dimensions: Sequence[Dimension], config: Mapping[str, Any],
                  applied: dict[str, Any]) -> Any:
    from iropt.dsl import Fixpoint, Option, PassCall, Repeat

    if isinstance(statement, (Fixpoint, Repeat)):
        body = tuple(_with_options(s, dimensions, config, applied) for s in statement.body)
        return replace(statement, body=body)
    if not isinstance(statement, PassCall):
        return statement
    options = {option.key: option for option in statement.options}
    for dim in dimensions:
        if dim.pass_name == statement.name and dim.key in config:
            value = _plain(config[dim.key], dim)
            options[dim.option] = Option(dim.option, value)
            applied[dim.key] = value
    return replace(statement, options=tuple(options.values()))


def _plain(value: Any, dim: Dimension) -> Any:
    """A sampled value as the schedule language writes it (numpy scalars become Python ones)."""
    if isinstance(value, list):
        return tuple(value)
    if dim.integer:
        return int(value)
    if dim.low is not None:
        return float(value)
    return value.item() if hasattr(value, "item") else value


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (sent to the Ray workers once)."""

    model: str
    space: SearchSpace
    objective: str
    constraint: Constraint
    inputs: str | None = None
    calibration: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    baseline: float = 1.0


def evaluate(setup: TrialSetup, config: Mapping[str, Any]) -> dict[str, Any]:
    """Run one trial and describe it; a failing trial is a row with `error`, never an exception."""
    from iropt.app.optimize import RunOptions, optimize

    start = time.perf_counter()
    text, applied = trial_schedule(setup.space, config, setup.constraint)
    row: dict[str, Any] = {"schedule": str(config["schedule"]), "params": applied, "text": text}
    with tempfile.TemporaryDirectory(prefix="iropt-tune-") as tmp:
        schedule = Path(tmp) / "trial.opt"
        schedule.write_text(text, encoding="utf-8")
        output = Path(tmp) / "model.opt.onnx"
        options = RunOptions(schedule=str(schedule), model=Path(setup.model), output=output, inputs=setup.inputs,
                             calibration=setup.calibration, shapes=dict(setup.shapes), force=True,
                             bisect=False, emit=False)
        try:
            outcome = optimize(options)
            assert outcome.final is not None, "a finished run has its final statistics"
            metric = setup.constraint.value_of(outcome.comparisons[-1]) if outcome.comparisons else None
            row.update(metric=metric, nodes=outcome.final.nodes, size=outcome.final.parameter_bytes,
                       output_sha256=_sha256(output))
            if setup.objective == "latency":
                row["latency"] = _latency(setup, output)
        except Exception as error:  # any failure is this trial's result, not the search's end
            row["error"] = f"{type(error).__name__}: {first_line(error)}"
    row["feasible"] = "error" not in row and setup.constraint.met(row.get("metric"))
    row["objective"] = row.get(setup.objective)
    row["score"] = score(row, setup.baseline)
    row["seconds"] = time.perf_counter() - start
    return row


def score(row: Mapping[str, Any], baseline: float) -> float:
    """What the searcher minimizes: the objective, or a penalty above every feasible value."""
    objective = row.get("objective")
    if objective is None:
        return INFEASIBLE_PENALTY * 2 * baseline
    return float(objective) if row.get("feasible") else INFEASIBLE_PENALTY * baseline + float(objective)


def _latency(setup: TrialSetup, output: Path) -> float:
    from iropt.app.latency import median_latency_ms
    from iropt.io.load import load_model
    from iropt.verify.feeds import feed_source

    model = load_model(output)
    feed = next(iter(feed_source(setup.inputs or setup.calibration, model, shapes=setup.shapes, count=1)))
    return median_latency_ms(model, feed)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes())
    return digest.hexdigest()


def with_baseline(setup: TrialSetup) -> TrialSetup:
    """`setup` with the input model's own objective (the scale of the infeasibility penalty)."""
    from iropt.io.load import load_model
    from iropt.ir.model import graph_stats

    if setup.objective == "latency":
        baseline = _latency(setup, Path(setup.model))
    else:
        stats = graph_stats(load_model(setup.model))
        baseline = float(stats.parameter_bytes if setup.objective == "size" else stats.nodes)
    return replace(setup, baseline=max(baseline, 1e-9))


# --- the search on Ray Tune -----------------------------------------------------------------


@dataclass(frozen=True)
class TuneOptions:
    setup: TrialSetup
    out_dir: Path
    trials: int = 16
    searcher: str = "optuna"
    concurrency: int = 1
    seed: int = 0


def param_space(tune: Any, space: SearchSpace) -> dict[str, Any]:
    """The space in Ray Tune's terms: the schedule a choice, each option a choice or a range."""
    params: dict[str, Any] = {"schedule": tune.choice(sorted(space.schedules))}
    for dim in space.dimensions:
        if dim.choices:
            params[dim.key] = tune.choice(list(dim.choices))
        elif dim.integer:
            low, high = int(dim.low or 0), int(dim.high or 0)
            params[dim.key] = tune.lograndint(low, high + 1) if dim.log else tune.randint(low, high + 1)
        else:
            params[dim.key] = tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)
    return params


def make_searcher(name: str, options: TuneOptions) -> Any:
    """Random sampling, or Optuna's TPE (a model-based searcher) through Ray Tune's wrapper."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if name == "random":
        return BasicVariantGenerator(random_state=options.seed, max_concurrent=options.concurrency)
    if name == "optuna":
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as error:
            raise UserError(f"--search optuna needs optuna: pip install 'iropt[distributed]' ({error})") from error
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # A third of the trials (2 to 10) sample at random before TPE models the rest.
        startup = max(2, min(10, options.trials // 3))
        sampler = optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=startup)
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=options.concurrency)
    raise UserError(f"unknown searcher '{name}'; choose one of: {', '.join(SEARCHERS)}")


def run_tune(ray: Any, options: TuneOptions) -> list[dict[str, Any]]:
    """Run the search; every trial's row, in the order the trials were created."""
    from ray import tune

    setup = options.setup
    memory = max(512 * 2**20, 4 * Path(setup.model).stat().st_size)

    def trainable(config: dict[str, Any]) -> None:
        tune.report(_reportable(evaluate(setup, config)))

    storage = (options.out_dir / "ray").resolve()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "memory": memory}),
        param_space=param_space(tune, setup.space),
        tune_config=tune.TuneConfig(metric="score", mode="min", search_alg=make_searcher(options.searcher, options),
                                    num_samples=options.trials, max_concurrent_trials=options.concurrency,
                                    reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(storage), name="tune", verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2)),
    )
    grid = tuner.fit()
    rows = []
    for index in range(len(grid)):
        result = grid[index]
        row = dict(result.metrics or {})
        if "score" not in row:  # the trial died without reporting, past its retries
            row = {"schedule": (result.config or {}).get("schedule"), "params": {}, "feasible": False,
                   "error": first_line(result.error) if result.error else "no result", "objective": None,
                   "score": score({}, setup.baseline)}
        row["params"] = json.loads(row["params"]) if isinstance(row.get("params"), str) else row.get("params", {})
        row["trial"] = index
        rows.append(_plain_row(row))
    return rows


def _reportable(row: dict[str, Any]) -> dict[str, Any]:
    """Tune keeps flat metrics: the params dict travels as JSON text."""
    return {**{k: v for k, v in row.items() if k != "params"}, "params": json.dumps(row["params"], sort_keys=True)}


_ROW_FIELDS = ("trial", "schedule", "params", "feasible", "objective", "metric", "latency", "size", "nodes",
               "score", "seconds", "error", "output_sha256", "text")


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in _ROW_FIELDS if key in row and row[key] is not None}


# --- results --------------------------------------------------------------------------------


def best_trial(rows: Sequence[Mapping[str, Any]], constraint: Constraint) -> Mapping[str, Any] | None:
    """The feasible trial with the least objective (ties: the better metric)."""
    feasible = [r for r in rows if r.get("feasible") and r.get("objective") is not None]
    if not feasible:
        return None
    sign = -1.0 if constraint.higher_is_better else 1.0
    return min(feasible, key=lambda r: (float(r["objective"]), sign * float(r["metric"])))


def front_points(rows: Sequence[Mapping[str, Any]], constraint: Constraint) -> list[Any]:
    from iropt.app.pareto import Point

    sign = 1.0 if constraint.higher_is_better else -1.0
    return [
        Point(float(r["objective"]), sign * float(r["metric"]), bool(r.get("feasible")), f"trial {r['trial']}")
        for r in rows if r.get("objective") is not None and r.get("metric") is not None
        and math.isfinite(float(r["metric"]))
    ]


def write_results(rows: list[dict[str, Any]], options: TuneOptions) -> dict[str, Path]:
    """trials.json, pareto.json, pareto.svg and (when a trial met the constraint) best.opt."""
    from iropt.app.pareto import write_svg

    setup = options.setup
    out = options.out_dir
    constraint = setup.constraint
    points = front_points(rows, constraint)
    on_front = front_trials(rows, constraint)
    best = best_trial(rows, constraint)
    sign = 1.0 if constraint.higher_is_better else -1.0
    written = {"trials": out / "trials.json", "pareto": out / "pareto.json", "plot": out / "pareto.svg"}
    written["trials"].write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pareto = {
        "objective": setup.objective, "metric": constraint.metric, "constraint": constraint.describe(),
        "baseline": setup.baseline, "front": [r for r in rows if r["trial"] in on_front],
        "best": best,
    }
    written["pareto"].write_text(json.dumps(pareto, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    best_point = next((p for p in points if best is not None and p.label == f"trial {best['trial']}"), None)
    write_svg(points, written["plot"], cost_label=OBJECTIVE_UNITS[setup.objective],
              quality_label=constraint.metric if sign > 0 else f"-{constraint.metric}",
              threshold=sign * constraint.bound, best=best_point)
    if best is not None:
        written["best"] = out / "best.opt"
        header = (f"# best of {len(rows)} trials: {setup.objective} {best['objective']:.6g}, "
                  f"{constraint.metric} {best['metric']:.6g} (trial {best['trial']}, schedule '{best['schedule']}')\n")
        written["best"].write_text(header + str(best["text"]), encoding="utf-8")
    return written


def front_trials(rows: Sequence[Mapping[str, Any]], constraint: Constraint) -> set[int]:
    from iropt.app.pareto import pareto_front

    return {int(p.label.split()[-1]) for p in pareto_front(front_points(rows, constraint))}


TUNE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("trial", "right"), ("schedule", "left"), ("options", "left"), ("objective", "right"),
    ("metric", "right"), ("", "left"),
)


def tune_table_rows(rows: Sequence[Mapping[str, Any]], setup: TrialSetup) -> tuple[Sequence[tuple[str, str]], list[list[str]]]:
    """The trials table: options, objective, metric, and a mark for the front, the best and failures."""
    on_front = front_trials(rows, setup.constraint)
    best = best_trial(rows, setup.constraint)
    columns = [*TUNE_COLUMNS]
    columns[3] = (OBJECTIVE_UNITS[setup.objective], "right")
    columns[4] = (setup.constraint.metric, "right")
    cells = []
    for row in sorted(rows, key=lambda r: (r.get("objective") is None, r.get("objective") or 0.0)):
        marks = []
        if best is not None and row["trial"] == best["trial"]:
            marks.append("best")
        if row["trial"] in on_front:
            marks.append("front")
        if not row.get("feasible"):
            marks.append(f"error: {row['error']}" if row.get("error") else f"misses {setup.constraint.describe()}")
        params = ", ".join(f"{k}={v}" for k, v in sorted(row.get("params", {}).items()))
        objective, metric = row.get("objective"), row.get("metric")
        cells.append([
            str(row["trial"]), str(row.get("schedule")), params,
            "" if objective is None else f"{objective:.4g}", "" if metric is None else f"{metric:.6g}",
            ", ".join(marks),
        ])
    return columns, cells
