"""The JSON report of `iropt run --report`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from iropt.app.optimize import RunOutcome
from iropt.errors import IroptError, UserError
from iropt.infra.pass_manager import PassRecord
from iropt.ir.model import GraphStats


def _stats(stats: GraphStats) -> dict[str, int]:
    return {"nodes": stats.nodes, "parameters": stats.parameters, "parameter_bytes": stats.parameter_bytes}


def _pair(pair: tuple[int, int] | None) -> dict[str, int] | None:
    return None if pair is None else {"before": pair[0], "after": pair[1]}


def _record(record: PassRecord) -> dict[str, Any]:
    return {
        "index": record.index,
        "pass": record.name,
        "kind": record.kind.value,
        "options": {k: _plain(v) for k, v in record.pass_.options().items()},
        "block": record.block,
        "changed": record.changed,
        "stats": record.stats,
        "info": _plain(record.info),
        "seconds": record.seconds,
        "nodes": _pair(record.nodes),
        "parameters": _pair(record.parameters),
        "parameter_bytes": _pair(record.parameter_bytes),
        "notes": {k: _plain(v) for k, v in record.notes.items()},
    }


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings, unknown objects their repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    return repr(value)


def outcome_to_dict(
    outcome: RunOutcome, schedule: str, model: Path, failure: BaseException | None = None
) -> dict[str, Any]:
    """Everything about a run, for machines; `failure` is what ended it early, if anything."""
    pipeline = outcome.pipeline
    return {
        "schedule": schedule,
        "pipeline": None if pipeline is None else pipeline.name,
        "target": None if pipeline is None or pipeline.target is None else {
            "name": pipeline.target.name, "options": _plain(dict(pipeline.target.options)),
        },
        "model": str(model),
        "output": None if outcome.output is None else str(outcome.output),
        "emitted": [str(p) for p in outcome.emitted],
        "target_build": _plain(outcome.target_report) or None,
        "triton": [str(p) for p in outcome.triton_files],
        "verified": outcome.verified and failure is None,
        "criterion": None if outcome.criterion is None else outcome.criterion.describe(),
        "comparisons": [_plain(c) for c in outcome.comparisons],
        "pass_failures": [
            {"index": f.record.index, "pass": f.record.name, "message": str(f)} for f in outcome.pass_failures
        ],
        "error": None if failure is None else _error(failure),
        "first_failing_pass": None if outcome.culprit is None else {
            "index": outcome.culprit.index, "pass": outcome.culprit.name,
        },
        "inputs": outcome.feed_notes,
        "before": None if outcome.initial is None else _stats(outcome.initial),
        "after": None if outcome.final is None else _stats(outcome.final),
        "passes": [_record(r) for r in outcome.report.records],
        "seconds": {
            "passes": outcome.report.seconds,
            "verification": outcome.verify_seconds,
            "target_build": outcome.target_report.get("build_seconds"),
            "bisection": outcome.bisect_seconds,
            "total": outcome.total_seconds,
        },
    }


def _error(failure: BaseException) -> dict[str, Any]:
    """What ended the run, and the exit code it gives (as the command line maps it)."""
    if isinstance(failure, UserError):
        code = 2
    elif isinstance(failure, KeyboardInterrupt):
        code = 130
    else:
        code = 1
    kind = "bad input" if code == 2 else "interrupted" if code == 130 else (
        "failed" if isinstance(failure, IroptError) else "internal error")
    return {"type": type(failure).__name__, "kind": kind, "exit_code": code, "message": str(failure)}


def check_report_path(path: Path) -> None:
    """UserError unless a report can be written at `path` (missing folders are made on write)."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the report a file name")
    nearest = next((p for p in path.resolve().parents if p.exists()), None)
    if nearest is None or not nearest.is_dir():
        raise UserError(f"{path}: cannot make the report's folder: {nearest} is not a directory")


def write_report(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
