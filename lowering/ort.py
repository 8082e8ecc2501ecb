"""The ONNX Runtime back end: an InferenceSession with chosen providers and options.

`compile(model)` gives an `OrtRunner` (`run(feeds) -> outputs`), the same interface every back
end offers, so verification can check the session against the original model. `emit` writes
what ORT itself makes of the model when asked: its graph-optimized ONNX model
(`<stem>.ort-optimized.onnx`, `save_optimized=True`) or an ORT-format file (`<stem>.ort`,
`save_ort_format=True`) for the minimal ONNX Runtime builds; both at the `basic` level unless
`portable=false`, since higher levels tie the file to the providers and CPU it was made on.
A provider fallback is reported by `make_session`, and refused with `strict_providers=true`;
`stage` opens a session on the asked providers before `iropt run` writes anything.

Sessions are built by `iropt.verify.runtime.make_session`, the one place they are built; the
verification reference runner uses it too, with graph optimizations disabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from iropt.infra.backend import Backend, EmitContext, StagedArtefacts
from iropt.infra.options import Range
from iropt.infra.registry import register_backend
from iropt.io.save import publish_atomically
from iropt.ir.model import Model
from iropt.verify.runtime import CPU, OptimizationLevel, OrtRunner, check_providers, make_session

# More threads than this is a typo, not a machine.
MAX_THREADS = 4096


def _artefact_path(onnx_path: Path, suffix: str) -> Path:
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + suffix)


@register_backend("ort")
@dataclass(kw_only=True)
class OrtBackend(Backend):
    """ONNX Runtime: an InferenceSession with the given providers, threads and optimization level.

    `providers` in order of preference; a provider that does not start, or nodes that land on
    the CPU provider when it was not listed, are reported, and with `strict_providers` refused
    (exit 2, nothing written). `save_optimized` writes ORT's own optimized model beside the
    output (`<stem>.ort-optimized.onnx`); `save_ort_format` writes an ORT-format file for the
    minimal builds (`<stem>.ort`). Both are saved at the `basic` level, which any provider and
    CPU can load (`portable`); `portable=false` saves them at `optimization_level`, tied to the
    providers and hardware they were made on. Either way they are tied to this ORT version.
    """

    providers: list[str] = field(default_factory=lambda: [CPU])
    intra_op_threads: Annotated[int, Range(min=0, max=MAX_THREADS)] = 0
    inter_op_threads: Annotated[int, Range(min=0, max=MAX_THREADS)] = 0
    optimization_level: OptimizationLevel = "all"
    strict_providers: bool = False
    save_optimized: bool = False
    save_ort_format: bool = False
    portable: bool = True

    def __post_init__(self) -> None:
        check_providers(self.providers)

    def _session_options(self) -> dict[str, Any]:
        return {
            "providers": self.providers,
            "optimization_level": self.optimization_level,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "strict_providers": self.strict_providers,
        }

    def compile(self, model: Model) -> OrtRunner:
        return OrtRunner(make_session(model, **self._session_options()))

    def stage(self, model: Model, onnx_path: Path, context: EmitContext) -> StagedArtefacts:
        """Open a session on the asked providers first, so a fallback is found before anything is
        written; with the CPU provider alone there is nothing to fall back from."""
        if list(self.providers) != [CPU]:
            make_session(model, **self._session_options())
        return super().stage(model, onnx_path, context)

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

    def _saved_options(self) -> dict[str, Any]:
        """Session options for saved artefacts: the portable `basic` level unless asked otherwise."""
        options = self._session_options()
        if self.portable:
            options["optimization_level"] = "basic"
        return options

    def _save(self, model: Model, onnx_path: Path, suffix: str, *, ort_format: bool) -> Path:
        target = _artefact_path(onnx_path, suffix)
        # ORT writes the optimized model's tensors beside it past the protobuf limit.
        sidecars = [] if ort_format else [target.name + ".data"]
        publish_atomically(
            target,
            sidecars,
            lambda staged: make_session(
                model, optimized_model_path=staged, save_ort_format=ort_format, **self._saved_options()
            ),
        )
        return target
