"""The torch front end: lower a `torch.nn.Module` to an ONNX model that iropt can optimize.

`export_module` exports a module in eval mode with a dynamic batch dimension (named "batch" on
dimension 0 of every input and of every output that has one), then loads the file back with
`iropt.load_model` and validates it with `onnx.checker`; `export_from_spec` does the same for a
factory named as `package.module:factory` or `path/to/file.py:factory` (the `iropt export`
command). torch is imported only inside these functions; without it they raise a `UserError`
that names the extra to install.

Which exporter. torch 2.13 still ships the TorchScript exporter behind
`torch.onnx.export(..., dynamo=False)`; it needs nothing beyond torch and works offline, so it is
the one used here (it emits a DeprecationWarning about being legacy, which is silenced). The
default `dynamo=True` exporter needs the `onnxscript` package (`pip install onnxscript`, part of
the `iropt[torch]` extra); without it torch raises `ModuleNotFoundError: onnxscript`.

BatchNormalization. With the exporter's defaults (`training=TrainingMode.EVAL`,
`do_constant_folding=True`) the TorchScript exporter runs its eval-mode peephole pass, which
folds a BatchNormalization into the Conv before it: a Conv+BN+ReLU net exports as Conv, Relu,
with the folded weights as new initializers (observed on torch 2.13; in the torch source the
peephole runs only when constant folding is on *and* the training mode is EVAL). Exporting with
`training=TrainingMode.PRESERVE` and `do_constant_folding=False`, which `keep_batchnorm=True`
does, keeps the BatchNormalization node with its four parameter initializers (and, as the module
is in eval mode, `training_mode=0`), so that iropt's own `fuse_bn_conv` pass can be exercised and
verified. Either setting alone also kept it in our runs; both are set so that neither the mode
nor folding can fuse it. With folding off, the exporter may replace identical initializers (a
fresh BatchNorm's zero mean and bias, say) by Identity nodes reading one copy.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from iropt.errors import UserError
from iropt.io.load import load_model
from iropt.io.save import check_output_path, save_model
from iropt.util.pyimport import import_location

if TYPE_CHECKING:  # for annotations only: torch is imported lazily, inside the functions
    import torch

TORCH_MISSING = "torch is not installed: pip install iropt[torch]"
BATCH_DIM = "batch"

# The TorchScript exporter announces on every call that it is legacy; that is a choice made
# here (see the module docstring), not news for the user. Other warnings (tracer warnings about
# data-dependent control flow, say) still show.
_LEGACY_NOTICES = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed",
)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise UserError(TORCH_MISSING) from error
    return torch


def export_module(
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
    keep_batchnorm: bool = False,
) -> Path:
    """Export `module` (in eval mode) to an ONNX file at `path`; returns the path written.

    The module is run once on `example_inputs` first, so a module that cannot run on them fails
    with a `UserError` that says so. Its training flag is restored afterwards.
    """
    torch = _import_torch()
    out = Path(path)
    check_output_path(out)  # before the export runs; missing folders are made once it has
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    was_training = module.training
    module.eval()
    try:
        outputs = _run_once(torch, module, inputs)
        names_in = list(input_names) if input_names else _default_names("input", len(inputs))
        names_out = list(output_names) if output_names else _default_names("output", len(outputs))
        _check_names("input", names_in, len(inputs))
        _check_names("output", names_out, len(outputs))
        dynamic_axes = _batch_axes(names_in, inputs, names_out, outputs) if dynamic_batch else None
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            staged = Path(tmp) / "exported.onnx"
            _torchscript_export(
                torch, module, inputs, staged, names_in, names_out, dynamic_axes, opset, keep_batchnorm
            )
            _validate(staged)
            # Through iropt's own writer: atomic, and large weights go to `<name>.data`.
            save_model(load_model(staged), out)
    finally:
        module.train(was_training)
    return out


def _run_once(torch: Any, module: Any, inputs: tuple[Any, ...]) -> list[Any]:
    """The module's outputs on `inputs`, flattened; a UserError when the module raises."""
    try:
        with torch.no_grad():
            result = module(*inputs)
    except Exception as error:
        raise UserError(
            f"{type(module).__name__} raised on the example inputs "
            f"({_describe_inputs(inputs)}): {type(error).__name__}: {error}"
        ) from error
    if isinstance(result, (tuple, list)):
        return list(result)
    return [result]


def _describe_inputs(inputs: tuple[Any, ...]) -> str:
    return ", ".join(
        "x".join(str(d) for d in value.shape) if hasattr(value, "shape") else type(value).__name__
        for value in inputs
    )


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _check_names(kind: str, names: list[str], count: int) -> None:
    if len(names) != count:
        raise UserError(f"{len(names)} {kind} name(s) given ({', '.join(names)}) for {count} {kind}(s)")


def _batch_axes(
    names_in: list[str], inputs: tuple[Any, ...], names_out: list[str], outputs: list[Any]
) -> dict[str, dict[int, str]]:
    """Dimension 0 of every input and output tensor that has one is the batch."""
    axes: dict[str, dict[int, str]] = {}
    for name, value in [*zip(names_in, inputs, strict=True), *zip(names_out, outputs, strict=True)]:
        if getattr(value, "ndim", 0) >= 1:
            axes[name] = {0: BATCH_DIM}
    return axes


def _torchscript_export(
    torch: Any,
    module: Any,
    inputs: tuple[Any, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int,
    keep_batchnorm: bool,
) -> None:
    options: dict[str, Any] = {}
    if keep_batchnorm:
        options = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    try:
        with warnings.catch_warnings():
            for notice in _LEGACY_NOTICES:
                warnings.filterwarnings("ignore", message=notice)
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
                **options,
            )
    except Exception as error:
        raise UserError(
            f"torch.onnx.export could not export {type(module).__name__} (opset {opset}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _validate(path: Path) -> None:
    try:
        # The path form also handles models with external data.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        raise UserError(f"the exported model is not valid ONNX: {error}") from error


def export_from_spec(
    spec: str,
    input_shape: Sequence[Any],
    path: str | Path,
    **options: Any,
) -> Path:
    """Export the module made by `spec` ("package.module:factory" or "file.py:factory").

    The factory is called without arguments and must return a `torch.nn.Module` (a module
    instance named directly is accepted too). `input_shape` is one shape, or one per input;
    the example inputs are float32 values from a fixed seed. `options` go to `export_module`.
    """
    torch = _import_torch()
    factory = load_factory(spec)
    try:
        module = factory()
    except Exception as error:
        raise UserError(f"{spec} raised when called: {type(error).__name__}: {error}") from error
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"{spec} returned {type(module).__name__}, not a torch.nn.Module")
    shapes = _shapes(input_shape)
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(*shape, generator=generator) for shape in shapes)
    return export_module(module, inputs, path, **options)


def _shapes(input_shape: Sequence[Any]) -> list[list[int]]:
    """One shape ([1, 3, 32, 32]) or one per input ([[1, 3], [1, 5]]) as a list of shapes."""
    if not input_shape:
        raise UserError("an input shape is needed, such as 1x3x32x32")
    if all(isinstance(d, int) for d in input_shape):
        return [[int(d) for d in input_shape]]
    return [[int(d) for d in shape] for shape in input_shape]


def load_factory(spec: str) -> Any:
    """The callable named by "package.module:attr" or "path/to/file.py:attr".

    A module instance named directly is wrapped so that calling it returns the instance.
    """
    location, sep, attr = spec.rpartition(":")
    if not sep or not location or not attr:
        raise UserError(
            f"'{spec}' is not a factory spec: expected package.module:factory or path/to/file.py:factory"
        )
    module = _import_location(location)
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UserError(f"{location} has no attribute '{attr}'; it defines: {', '.join(public) or 'nothing'}")
    target = getattr(module, attr)
    if not callable(target):
        raise UserError(f"{spec} is a {type(target).__name__}, not a factory")
    torch = _import_torch()
    if isinstance(target, torch.nn.Module):
        return lambda: target
    return target


def _import_location(location: str) -> Any:
    return import_location(location, "export")


# ----------------------------------------------------------------------------------------------
# The `iropt export` command


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `iropt export SPEC --input-shape 1x3x32x32 -o out.onnx`."""
    parser.add_argument("spec", metavar="SPEC", help="package.module:factory or path/to/file.py:factory")
    parser.add_argument(
        "--input-shape",
        action="append",
        required=True,
        type=parse_shape,
        metavar="SHAPE",
        help="example input shape such as 1x3x32x32; repeat it for a module with several inputs",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument(
        "--keep-batchnorm",
        action="store_true",
        help="keep BatchNormalization nodes (otherwise the exporter folds them into the Conv before)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    parser.add_argument(
        "--static-batch", action="store_true", help="keep the example batch size instead of a dynamic 'batch'"
    )
    parser.add_argument("--input-names", type=_names, help="comma-separated input names")
    parser.add_argument("--output-names", type=_names, help="comma-separated output names")


def parse_shape(text: str) -> list[int]:
    """'1x3x32x32' (or '1,3,32,32') -> [1, 3, 32, 32]."""
    parts = re.split(r"[x,]", text.strip().lower())
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape such as 1x3x32x32")
    return [int(p) for p in parts]


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def run_export(args: argparse.Namespace) -> int:
    """Run `iropt export`; returns the exit code."""
    shapes: list[list[int]] = args.input_shape
    path = export_from_spec(
        args.spec,
        shapes,
        args.output,
        input_names=args.input_names,
        output_names=args.output_names,
        dynamic_batch=not args.static_batch,
        opset=args.opset,
        keep_batchnorm=args.keep_batchnorm,
    )
    if not getattr(args, "quiet", False):
        model = load_model(path)
        ops = sorted({node.op for node in model.graph.nodes})
        batch = "static batch" if args.static_batch else f"dynamic '{BATCH_DIM}' dimension"
        print(f"wrote {path}: {len(model.graph.nodes)} nodes ({', '.join(ops)}), opset {args.opset}, {batch}")
    return 0
