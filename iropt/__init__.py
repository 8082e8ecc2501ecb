"""iropt: a compiler-style graph optimizer for neural networks on ONNX IR."""

from __future__ import annotations

from iropt.errors import IroptError, PassError, UserError, VerificationError
from iropt.model import Model, load_model, save_model
from iropt.pass_infra import Pass, PassContext, PassKind, PassResult, TargetSpec
from iropt.pass_manager import Instrument, PassManager, PassRecord, RunReport, run_passes
from iropt.pipeline import FixpointBlock, PassStep, Pipeline, RepeatBlock, VerifyStep
from iropt.registry import create_pass, get_pass, register_backend, register_pass

__version__ = "0.1.0"

__all__ = [
    "FixpointBlock",
    "Instrument",
    "IroptError",
    "Model",
    "Pass",
    "PassContext",
    "PassError",
    "PassKind",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PassStep",
    "Pipeline",
    "RepeatBlock",
    "RunReport",
    "TargetSpec",
    "UserError",
    "VerificationError",
    "VerifyStep",
    "create_pass",
    "get_pass",
    "load_model",
    "register_backend",
    "register_pass",
    "run_passes",
    "save_model",
]
