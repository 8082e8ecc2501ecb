"""iropt: a compiler-style graph optimizer for neural networks on ONNX IR.

The public names below are imported on first use, not with the package: `iropt` on the
command line starts by importing this package, and until its own code runs it cannot turn an
interruption (Ctrl-C) into a clean exit. Importing onnx and numpy here would make that window
seconds long.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up

if TYPE_CHECKING:
    from iropt.errors import IroptError, PassError, UserError, VerificationError
    from iropt.infra.pass_base import Pass, PassContext, PassKind, PassResult, TargetSpec
    from iropt.infra.pass_manager import Instrument, PassManager, PassRecord, RunReport, run_passes
    from iropt.infra.pipeline import FixpointBlock, PassStep, Pipeline, RepeatBlock, VerifyStep
    from iropt.infra.registry import create_pass, get_pass, register_backend, register_pass
    from iropt.io.load import load_model
    from iropt.io.save import save_model
    from iropt.ir.model import Model

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "IroptError": "iropt.errors",
    "PassError": "iropt.errors",
    "UserError": "iropt.errors",
    "VerificationError": "iropt.errors",
    "Pass": "iropt.infra.pass_base",
    "PassContext": "iropt.infra.pass_base",
    "PassKind": "iropt.infra.pass_base",
    "PassResult": "iropt.infra.pass_base",
    "TargetSpec": "iropt.infra.pass_base",
    "Instrument": "iropt.infra.pass_manager",
    "PassManager": "iropt.infra.pass_manager",
    "PassRecord": "iropt.infra.pass_manager",
    "RunReport": "iropt.infra.pass_manager",
    "run_passes": "iropt.infra.pass_manager",
    "FixpointBlock": "iropt.infra.pipeline",
    "PassStep": "iropt.infra.pipeline",
    "Pipeline": "iropt.infra.pipeline",
    "RepeatBlock": "iropt.infra.pipeline",
    "VerifyStep": "iropt.infra.pipeline",
    "create_pass": "iropt.infra.registry",
    "get_pass": "iropt.infra.registry",
    "register_backend": "iropt.infra.registry",
    "register_pass": "iropt.infra.registry",
    "load_model": "iropt.io.load",
    "save_model": "iropt.io.save",
    "Model": "iropt.ir.model",
}

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


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'iropt' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
