"""The JSON report of `iropt run --report`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from iropt.app.optimize import RunOutcome
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


def outcome_to_dict(outcome: RunOutcome, schedule: str, model: Path) -> dict[str, Any]:
    """Everything about a run, for machines."""
    return {
        "schedule": schedule,
        "pipeline": outcome.pipeline.name,
        "target": None if outcome.pipeline.target is None else {
            "name": outcome.pipeline.target.name, "options": _plain(dict(outcome.pipeline.target.options)),
        },
        "model": str(model),
        "output": None if outcome.output is None else str(outcome.output),
        "emitted": [str(p) for p in outcome.emitted],
        "target_build": _plain(outcome.target_report) or None,
        "triton": [str(p) for p in outcome.triton_files],
        "verified": outcome.verified,
        "criterion": None if outcome.criterion is None else outcome.criterion.describe(),
        "comparisons": [_plain(c) for c in outcome.comparisons],
        "first_failing_pass": None if outcome.culprit is None else {
            "index": outcome.culprit.index, "pass": outcome.culprit.name,
        },
        "inputs": outcome.feed_notes,
        "before": _stats(outcome.initial),
        "after": _stats(outcome.final),
        "passes": [_record(r) for r in outcome.report.records],
        "seconds": {
            "passes": outcome.report.seconds,
            "verification": outcome.verify_seconds,
            "target_build": outcome.target_report.get("build_seconds"),
            "total": outcome.total_seconds,
        },
    }


def write_report(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
