"""iropt: a compiler-style graph optimizer for neural networks on ONNX IR."""

from __future__ import annotations

from iropt.errors import IroptError, PassError, UserError, VerificationError
from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult, TargetSpec
from iropt.infra.pass_manager import Instrument, PassManager, PassRecord, RunReport, run_passes
from iropt.infra.pipeline import FixpointBlock, PassStep, Pipeline, RepeatBlock, VerifyStep
from iropt.infra.registry import create_pass, get_pass, register_backend, register_pass
from iropt.io.load import load_model
from iropt.io.save import save_model
from iropt.ir.model import Model

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
