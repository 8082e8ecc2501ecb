"""Measured int8 / float layer timings kept between runs, per machine and layer signature.

Measured placement profiles a model's layers on the target (seconds per model); the same layer
on the same machine gives the same verdict, so timings are stored in
`<cache dir>/quant_timings_<machine id>.json`: per layer signature (op, attributes, shapes and
types, the run's batch shapes and thread count) its int8 and float ms, and per whole-model
signature the float layers the end-to-end check settled on. The cache directory is
`$IROPT_CACHE_DIR`, else `$XDG_CACHE_HOME/iropt`, else `~/.cache/iropt`.

Writes go to a temporary file renamed over the cache, so a concurrent reader sees the old or the
new file, never half of one; a file that cannot be read as a cache is ignored with a warning
(and replaced on the next write).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iropt.util.machine import machine_id, machine_signature

FORMAT_VERSION = 2  # 2: a model's verdict may be the whole model in int8
_log = logging.getLogger("iropt.quantize")


def cache_dir() -> Path:
    """Where iropt keeps its caches (see the module docstring)."""
    explicit = os.environ.get("IROPT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "iropt"


def signature_key(signature: Mapping[str, Any]) -> str:
    """A stable digest of a JSON-ready signature."""
    text = json.dumps(signature, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TimingCache:
    """Layer timings and model verdicts of this machine, loaded at creation, written by `save`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / f"quant_timings_{machine_id()}.json"
        self.layers: dict[str, dict[str, float]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a version {FORMAT_VERSION} timing cache")
            layers, models = data["layers"], data["models"]
            if not isinstance(layers, dict) or not isinstance(models, dict):
                raise ValueError("layers and models must be objects")
            self.layers = {str(k): {"int8_ms": float(v["int8_ms"]), "float_ms": float(v["float_ms"])}
                           for k, v in layers.items()}
            self.models = {str(k): dict(v) for k, v in models.items()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            _log.warning("quantize: ignoring the unreadable timing cache %s (%s)", self.path, error)
            self.layers, self.models = {}, {}

    def layer(self, key: str) -> tuple[float, float] | None:
        """(int8 ms, float ms) of a layer signature, when measured before."""
        entry = self.layers.get(key)
        return None if entry is None else (entry["int8_ms"], entry["float_ms"])

    def put_layer(self, key: str, int8_ms: float, float_ms: float) -> None:
        self.layers[key] = {"int8_ms": int8_ms, "float_ms": float_ms}
        self._dirty = True

    def model(self, key: str) -> dict[str, Any] | None:
        return self.models.get(key)

    def put_model(self, key: str, verdict: Mapping[str, Any]) -> None:
        self.models[key] = dict(verdict)
        self._dirty = True

    def save(self) -> None:
        """Write the cache if anything changed; a failure to write is logged, not raised."""
        if not self._dirty:
            return
        data = {"version": FORMAT_VERSION, "machine": machine_signature(), "layers": self.layers,
                "models": self.models}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, staged = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(handle, "w") as stream:
                    json.dump(data, stream, indent=1, sort_keys=True)
                os.replace(staged, self.path)
            except BaseException:
                Path(staged).unlink(missing_ok=True)
                raise
        except OSError as error:
            _log.warning("quantize: could not write the timing cache %s (%s)", self.path, error)
            return
        self._dirty = False
