"""The reference runtime for tests: ONNX Runtime on the CPU with its graph optimizations off."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort


def run_ort(
    proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray], only: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Outputs by name (all, or those in `only`) of `proto` on `feeds`.

    Graph optimizations are off so the runtime computes what the graph says, not its own rewrite.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()] if only is None else only
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))
