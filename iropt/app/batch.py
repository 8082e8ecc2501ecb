"""`iropt batch`: one schedule over many models, each model a Ray task.

- Every model is an independent task (`run_item`): it loads, optimizes, verifies and writes
  `DIR/NAME.opt.onnx` exactly as `iropt run` does, then measures latency before and after. A
  model's failure (bad file, failed verification, a crashing pass) becomes its row in the
  results, never the batch's end.
- A task asks Ray for one CPU and memory in proportion to the model's size, so a cluster packs
  small models densely and never runs two big ones on a node that holds one.
- A worker lost mid-task (killed, out of memory, node gone) is retried by Ray (`retries`);
  outputs are written atomically, so a retried task simply writes its output again.
- The results ledger `DIR/ledger.jsonl` gets one line per finished model, keyed by the content of
  the model (and its external data), the schedule text and the run options. A rerun skips every
  model whose key is there with a final status and whose output still exists; `--rerun` redoes
  them. Only the driver writes the ledger, so each model is recorded once however often its
  task ran.
- Models are read from paths: on a cluster of several machines every node must see them at the
  same path (a shared file system); the schedule travels as text.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from iropt.errors import IroptError, UserError, VerificationError, first_line
from iropt.util import toml
from iropt.util.progress import ProgressFn, no_progress

LEDGER_NAME = "ledger.jsonl"
SUMMARY_NAME = "summary.json"

# Final statuses: a rerun with the same key has nothing new to learn from them.
OK = "ok"
UNVERIFIED = "unverified"  # the optimized model failed verification (exit code 1 of `iropt run`)
BAD_INPUT = "bad_input"  # the model or its data cannot be used (exit code 2 of `iropt run`)
FAILED = "failed"  # a pass or the runtime raised
FINAL_STATUSES = frozenset({OK, UNVERIFIED, BAD_INPUT, FAILED})
# Not final: the task never reported (worker lost more often than `retries`); rerun retries it.
LOST = "lost"

# Memory a task asks Ray for: the peak of `iropt run` as a multiple of the model's bytes, and a
# floor for the interpreter, ONNX Runtime and the graph of a model with no weights to speak of.
MEMORY_PER_MODEL_BYTE = 4
MEMORY_FLOOR = 512 * 2**20
HASH_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class BatchItem:
    """One model of a batch, with the data `iropt run` takes for it (paths absolute)."""

    name: str
    model: str
    inputs: str | None = None
    calibration: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchOptions:
    """What `iropt batch` was asked to do."""

    schedule: str
    items: tuple[BatchItem, ...]
    out_dir: Path
    retries: int = 3
    rerun: bool = False
    measure_latency: bool = True


@dataclass
class BatchResult:
    """Rows for every model (ran now, or read from the ledger), in the order given."""

    rows: list[dict[str, Any]]
    ran: int
    skipped: int
    seconds: float

    @property
    def all_ok(self) -> bool:
        return all(row["status"] == OK for row in self.rows)


# --- the models of a batch --------------------------------------------------------------


def items_from_paths(paths: Sequence[Path], shapes: dict[str, list[int]] | None = None,
                     inputs: str | None = None, calibration: str | None = None) -> list[BatchItem]:
    """One item per model path, named by file stem (a repeated stem gets its index appended)."""
    names = unique_names([path.stem for path in paths])
    return [
        BatchItem(name=name, model=str(path.resolve()), inputs=inputs, calibration=calibration,
                  shapes=dict(shapes or {}))
        for name, path in zip(names, paths, strict=True)
    ]


def unique_names(stems: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for stem in stems:
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}_{count + 1}")
    return names


def read_manifest(path: Path) -> list[BatchItem]:
    """Models listed in a TOML or JSON manifest, paths relative to the manifest's folder.

    Each entry: `model` (or `path`, or iropt's golden-model manifest form `files.model`), and
    optionally `name`, `inputs`, `calibration` and `shapes` (`{input = [1, 3, 224, 224]}`).
    The entries are under `models` (a TOML `[[models]]` array or a JSON list).
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = toml.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path}: cannot read the manifest: {error}") from error
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: a manifest lists its models under 'models' (a non-empty list)")
    base = path.resolve().parent
    parsed = [_manifest_entry(entry, index, base, path) for index, entry in enumerate(entries)]
    names = unique_names([name for name, _ in parsed])
    return [BatchItem(name=name, **fields) for name, (_, fields) in zip(names, parsed, strict=True)]


def _manifest_entry(entry: Any, index: int, base: Path, manifest: Path) -> tuple[str, dict[str, Any]]:
    where = f"{manifest}: models[{index}]"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a table with at least 'model'")
    files: dict[str, Any] = entry["files"] if isinstance(entry.get("files"), dict) else {}
    model = entry.get("model") or entry.get("path") or files.get("model")
    if not isinstance(model, str):
        raise UserError(f"{where}: no model path ('model', 'path' or 'files.model')")
    shapes = entry.get("shapes", {})
    if not isinstance(shapes, dict) or not all(
        isinstance(dims, list) and all(isinstance(d, int) for d in dims) for dims in shapes.values()
    ):
        raise UserError(f"{where}: 'shapes' maps input names to lists of integers")

    def data(key: str) -> str | None:
        # The golden manifest's "inputs" describes the inputs (a list); its files are in "files".
        value = entry.get(key) if isinstance(entry.get(key), str) else files.get(key)
        if not isinstance(value, str):
            return None
        # Only a path is resolved; a module:function source goes as it is.
        candidate = base / value
        return str(candidate) if candidate.exists() or ":" not in value else value

    fields = {
        "model": str((base / model).resolve()),
        "inputs": data("inputs"),
        "calibration": data("calibration"),
        "shapes": {str(k): list(v) for k, v in shapes.items()},
    }
    return str(entry.get("name") or Path(model).stem), fields


# --- the ledger -----------------------------------------------------------------------------


def item_key(item: BatchItem, schedule_text: str, measure_latency: bool) -> str:
    """sha256 over everything that decides a model's result: its bytes, the schedule, the options."""
    digest = hashlib.sha256()
    digest.update(f"iropt {_version()}\n{schedule_text}\n".encode())
    options = {"shapes": item.shapes, "latency": measure_latency, "name": item.name}
    digest.update(json.dumps(options, sort_keys=True).encode())
    for label, path in _content_files(item):
        digest.update(f"\n{label}\n".encode())
        _hash_file(digest, path)
    for label, spec in (("inputs", item.inputs), ("calibration", item.calibration)):
        if spec is not None and not Path(spec).exists():
            digest.update(f"\n{label} {spec}\n".encode())  # a module:function source, by name
    return digest.hexdigest()


def _version() -> str:
    """The installed iropt's version: a result of another version is not reused."""
    try:
        return metadata.version("iropt")
    except metadata.PackageNotFoundError:
        return "unknown"


def _content_files(item: BatchItem) -> Iterator[tuple[str, Path]]:
    model = Path(item.model)
    if not model.is_file():
        return  # reported as the model's failure when its task runs
    yield "model", model
    for location in _external_locations(model):
        yield f"data {location}", model.parent / location
    for label, spec in (("inputs", item.inputs), ("calibration", item.calibration)):
        if spec is None or not Path(spec).exists():
            continue
        path = Path(spec)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            yield f"{label} {file.relative_to(path) if path.is_dir() else ''}", file


def _external_locations(model: Path) -> list[str]:
    """The external data files a model names (its proto read without the data)."""
    try:
        proto = onnx.load_model(str(model), load_external_data=False)
    except Exception:  # not a model: its task reports why
        return []
    locations = {
        onnx.external_data_helper.ExternalDataInfo(t).location
        for t in onnx.external_data_helper._get_all_tensors(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    return sorted(loc for loc in locations if (model.parent / loc).is_file())


def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)


class Ledger:
    """`DIR/ledger.jsonl`: one JSON line per finished model, appended as results arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def done(self) -> dict[str, dict[str, Any]]:
        """The last final row of every key whose output (if it had one) still exists."""
        rows: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return rows
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash of the driver
            if isinstance(row, dict) and row.get("status") in FINAL_STATUSES:
                rows[str(row.get("key"))] = row
        return {
            key: row for key, row in rows.items()
            if row["status"] != OK or Path(str(row.get("output"))).is_file()
        }

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(row, sort_keys=True) + "\n")
            stream.flush()
            os.fsync(stream.fileno())


# --- one model: what a Ray task runs --------------------------------------------------------


def run_item(item: BatchItem, schedule_text: str, schedule_name: str, out_dir: str,
             measure_latency: bool) -> dict[str, Any]:
    """Optimize one model like `iropt run` and describe the result as a row (never raises)."""
    from iropt.app.optimize import RunOptions, optimize

    start = time.perf_counter()
    output = Path(out_dir) / f"{item.name}.opt.onnx"
    row: dict[str, Any] = {"name": item.name, "model": item.model, "output": None,
                           "worker": f"{socket.gethostname()}:{os.getpid()}"}
    with tempfile.TemporaryDirectory(prefix="iropt-batch-") as tmp:
        # The schedule travels as text; its file name is kept for the messages it may raise.
        schedule = Path(tmp) / Path(schedule_name).name
        if schedule.suffix != ".opt":
            schedule = schedule.with_name(schedule.name + ".opt")
        schedule.write_text(schedule_text, encoding="utf-8")
        options = RunOptions(schedule=str(schedule), model=Path(item.model), output=output,
                             inputs=item.inputs, calibration=item.calibration, shapes=dict(item.shapes))
        try:
            outcome = optimize(options)
        except UserError as error:
            return _finish(row, BAD_INPUT, start, error=first_line(error))
        except VerificationError as error:
            return _finish(row, UNVERIFIED, start, error=first_line(error))
        except (IroptError, Exception) as error:
            return _finish(row, FAILED, start, error=f"{type(error).__name__}: {first_line(error)}")
    assert outcome.initial is not None and outcome.final is not None, "a finished run has its statistics"
    row.update(
        nodes_before=outcome.initial.nodes, nodes_after=outcome.final.nodes,
        bytes_before=outcome.initial.parameter_bytes, bytes_after=outcome.final.parameter_bytes,
        verification="; ".join(
            f"{'passed' if c.passed else 'FAILED'} {c.criterion.describe()}" for c in outcome.comparisons
        ) or "not verified",
    )
    if not outcome.verified:
        return _finish(row, UNVERIFIED, start, error="verification failed; no output written")
    row["output"] = str(outcome.output)
    if measure_latency:
        row.update(_latencies(item, Path(item.model), output))
    return _finish(row, OK, start)


def _latencies(item: BatchItem, source: Path, output: Path) -> dict[str, Any]:
    from iropt.app.latency import median_latency_ms
    from iropt.io.load import load_model
    from iropt.verify.feeds import feed_source

    before_model = load_model(source)
    feed = next(iter(feed_source(item.inputs, before_model, shapes=item.shapes, count=1)))
    before = median_latency_ms(before_model, feed)
    del before_model  # one model in memory at a time
    after = median_latency_ms(load_model(output), feed)
    return {"latency_ms_before": before, "latency_ms_after": after,
            "latency_ratio": after / before if before > 0 else None}


def _finish(row: dict[str, Any], status: str, start: float, error: str | None = None) -> dict[str, Any]:
    row["status"] = status
    row["seconds"] = time.perf_counter() - start
    if error is not None:
        row["error"] = error
    return row


# --- the batch ------------------------------------------------------------------------------


def task_memory(item: BatchItem) -> int:
    """Bytes of memory to reserve for a model's task: a multiple of its files' size."""
    model = Path(item.model)
    size = model.stat().st_size if model.is_file() else 0
    size += sum((model.parent / loc).stat().st_size for loc in _external_locations(model)) if size else 0
    return max(MEMORY_FLOOR, MEMORY_PER_MODEL_BYTE * size)


@dataclass
class BatchPlan:
    """A batch split into what the ledger already holds and what is left to run."""

    schedule_text: str
    schedule_name: str
    keys: list[str]
    rows: dict[str, dict[str, Any]]
    todo: list[tuple[str, BatchItem]]


def plan_batch(options: BatchOptions) -> BatchPlan:
    """Key every model and look it up in the ledger (no Ray needed: a finished batch costs none)."""
    from iropt.dsl import read_schedule

    schedule_text, schedule_name, _ = read_schedule(options.schedule)
    load_schedule_checked(options.schedule)
    done = {} if options.rerun else Ledger(options.out_dir / LEDGER_NAME).done()
    keys = [item_key(item, schedule_text, options.measure_latency) for item in options.items]
    rows: dict[str, dict[str, Any]] = {key: dict(done[key], skipped=True) for key in keys if key in done}
    todo = [(key, item) for key, item in zip(keys, options.items, strict=True) if key not in rows]
    return BatchPlan(schedule_text, schedule_name, keys, rows, todo)


def run_batch(ray: Any, options: BatchOptions, plan: BatchPlan | None = None,
              progress: ProgressFn = no_progress) -> BatchResult:
    """Run every model of `plan` not already in the ledger as a Ray task; collect the rows."""
    from iropt.app.distributed import largest_node_memory

    start = time.perf_counter()
    plan = plan or plan_batch(options)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(options.out_dir / LEDGER_NAME)
    pending: dict[Any, tuple[str, BatchItem]] = {}
    if plan.todo:
        memory_cap = largest_node_memory(ray)
        remote = ray.remote(run_item)
        for key, item in plan.todo:
            memory = task_memory(item) if memory_cap is None else min(task_memory(item), memory_cap)
            ref = remote.options(num_cpus=1, memory=memory, max_retries=options.retries,
                                 retry_exceptions=False, name=f"iropt-batch:{item.name}").remote(
                item, plan.schedule_text, plan.schedule_name, str(options.out_dir.resolve()),
                options.measure_latency)
            pending[ref] = (key, item)
    rows = dict(plan.rows)
    for key, row in progress(_completions(ray, pending), "batch", total=len(plan.todo)):
        row.update(key=key, schedule=plan.schedule_name)
        ledger.append(row)
        rows[key] = row
    return BatchResult(rows=[rows[key] for key in plan.keys], ran=len(plan.todo),
                       skipped=len(plan.keys) - len(plan.todo), seconds=time.perf_counter() - start)


def load_schedule_checked(schedule: str) -> None:
    """Parse and resolve the schedule once on the driver: a bad schedule fails the batch at once."""
    from iropt.dsl import load_schedule

    load_schedule(schedule)


def _completions(ray: Any, pending: dict[Any, tuple[str, BatchItem]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, row) as tasks finish, in completion order; a task Ray gave up on is a LOST row."""
    waiting = list(pending)
    while waiting:
        finished, waiting = ray.wait(waiting, num_returns=1)
        for ref in finished:
            key, item = pending[ref]
            try:
                row = ray.get(ref)
            except Exception as error:  # worker lost past its retries, out of memory, node gone
                row = {"name": item.name, "model": item.model, "output": None, "status": LOST,
                       "seconds": None, "error": f"{type(error).__name__}: {first_line(error)}"}
            yield key, row


# --- reporting ------------------------------------------------------------------------------

SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "left"), ("status", "left"), ("nodes", "right"), ("weights", "right"),
    ("latency", "right"), ("verification", "left"), ("time", "right"),
)


def summary_cells(row: dict[str, Any]) -> list[str]:
    """The summary table's cells for one row."""

    def pair(before: Any, after: Any, fmt: Callable[[Any], str]) -> str:
        return "" if before is None or after is None else f"{fmt(before)} -> {fmt(after)}"

    status = row["status"] + (" (done before)" if row.get("skipped") else "")
    if row.get("error"):
        status += f": {row['error']}"
    ratio = row.get("latency_ratio")
    latency = "" if ratio is None else f"{row['latency_ms_after']:.3g} ms ({ratio:.2f}x)"
    seconds = row.get("seconds")
    return [
        row["name"], status,
        pair(row.get("nodes_before"), row.get("nodes_after"), str),
        pair(row.get("bytes_before"), row.get("bytes_after"), _bytes),
        latency, row.get("verification", ""), "" if seconds is None else f"{seconds:.1f}s",
    ]


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def summary_dict(result: BatchResult, options: BatchOptions) -> dict[str, Any]:
    """The JSON summary: every row, counts by status, and the batch's wall time."""
    counts: dict[str, int] = {}
    for row in result.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {
        "schedule": options.schedule,
        "out_dir": str(options.out_dir),
        "models": len(result.rows),
        "ran": result.ran,
        "skipped": result.skipped,
        "statuses": counts,
        "seconds": result.seconds,
        "rows": result.rows,
    }


def write_summary(result: BatchResult, options: BatchOptions, path: Path | None = None) -> Path:
    target = path or options.out_dir / SUMMARY_NAME
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(summary_dict(result, options), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target
