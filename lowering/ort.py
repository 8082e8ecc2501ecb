"""The ONNX Runtime back end: an InferenceSession with chosen providers and options.

`compile(model)` gives an `OrtRunner` (`run(feeds) -> outputs`), the same interface every back
end offers, so verification can check the session against the original model. `emit` writes
what ORT itself makes of the model when asked: its graph-optimized ONNX model
(`<stem>.ort-optimized.onnx`, `save_optimized=True`) or an ORT-format file (`<stem>.ort`,
`save_ort_format=True`) for the minimal ONNX Runtime builds.

Sessions are built by `iropt.verify.runtime.make_session`, the one place they are built; the
verification reference runner uses it too, with graph optimizations disabled.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from iropt.infra.backend import Backend
from iropt.infra.options import Range
from iropt.infra.registry import register_backend
from iropt.ir.model import Model
from iropt.verify.runtime import OptimizationLevel, OrtRunner, check_providers, make_session

# More threads than this is a typo, not a machine.
MAX_THREADS = 4096


def _artefact_path(onnx_path: Path, suffix: str) -> Path:
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + suffix)


@register_backend("ort")
@dataclass(kw_only=True)
class OrtBackend(Backend):
    """ONNX Runtime: an InferenceSession with the given providers, threads and optimization level.

    `save_optimized` writes ORT's own optimized model beside the output
    (`<stem>.ort-optimized.onnx`); `save_ort_format` writes an ORT-format file (`<stem>.ort`).
    Both are tied to this ORT version and, beyond `basic`, to the providers and hardware they
    were made on.
    """

    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    intra_op_threads: Annotated[int, Range(min=0, max=MAX_THREADS)] = 0
    inter_op_threads: Annotated[int, Range(min=0, max=MAX_THREADS)] = 0
    optimization_level: OptimizationLevel = "all"
    save_optimized: bool = False
    save_ort_format: bool = False

    def __post_init__(self) -> None:
        check_providers(self.providers)

    def _session_options(self) -> dict[str, Any]:
        return {
            "providers": self.providers,
            "optimization_level": self.optimization_level,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
        }

    def compile(self, model: Model) -> OrtRunner:
        return OrtRunner(make_session(model, **self._session_options()))

    def emit(self, model: Model, onnx_path: Path) -> list[Path]:
        """Write the requested ORT artefacts beside `onnx_path`; returns them."""
        written = []
        if self.save_optimized:
            written.append(self._save(model, onnx_path, ".ort-optimized.onnx", ort_format=False))
        if self.save_ort_format:
            written.append(self._save(model, onnx_path, ".ort", ort_format=True))
        return written

    def planned_outputs(self, onnx_path: Path) -> list[Path]:
        suffixes = [(self.save_optimized, ".ort-optimized.onnx"), (self.save_ort_format, ".ort")]
        return [_artefact_path(onnx_path, suffix) for wanted, suffix in suffixes if wanted]

    def _save(self, model: Model, onnx_path: Path, suffix: str, *, ort_format: bool) -> Path:
        target = _artefact_path(onnx_path, suffix)
        # Written into a scratch folder beside the target and moved in place, so a failed
        # session never leaves half a file under the final name.
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            staged = Path(tmp) / target.name
            make_session(
                model, optimized_model_path=staged, save_ort_format=ort_format, **self._session_options()
            )
            for produced in sorted(Path(tmp).iterdir()):
                os.replace(produced, target.parent / produced.name)
        return target
