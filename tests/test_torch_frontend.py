"""The torch front end: eval-mode export with a dynamic batch, BatchNorm kept on request, factories."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from iropt.errors import UserError
from iropt.io.load import load_model
from iropt.lowering.torch_frontend import (
    add_export_arguments,
    export_from_spec,
    export_module,
    parse_shape,
    run_export,
)

torch = pytest.importorskip("torch", reason="the torch front end needs torch (pip install iropt[torch])")

RTOL, ATOL = 1e-4, 1e-5


class ConvBnRelu(torch.nn.Module):
    """Conv -> BatchNorm -> ReLU with non-trivial running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            # Distinct values, so the exporter has no identical initializers to share.
            self.bn.running_mean.copy_(torch.rand(8, generator=generator) - 0.5)
            self.bn.running_var.copy_(torch.rand(8, generator=generator) + 0.5)
            self.bn.weight.copy_(torch.rand(8, generator=generator) + 0.5)
            self.bn.bias.copy_(torch.rand(8, generator=generator) - 0.5)

    def forward(self, x: Any) -> Any:
        return self.relu(self.bn(self.conv(x)))


def make_net() -> ConvBnRelu:
    torch.manual_seed(0)
    return ConvBnRelu()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_matches_torch(net: torch.nn.Module, path: Path, batches: tuple[int, ...] = (1, 3)) -> None:
    """ONNX Runtime on the exported file agrees with eager torch at every batch size."""
    runner = session(path)
    generator = torch.Generator().manual_seed(1)
    for batch in batches:
        x = torch.randn(batch, 3, 16, 16, generator=generator)
        with torch.no_grad():
            expected = net(x).numpy()
        (actual,) = runner.run(None, {runner.get_inputs()[0].name: x.numpy()})
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_export_folds_batchnorm_and_has_a_dynamic_batch(tmp_path: Path) -> None:
    net = make_net()
    net.train()  # the exporter must switch to eval mode, and switch back
    path = tmp_path / "net.onnx"

    written = export_module(net, torch.randn(2, 3, 16, 16), path)

    assert written == path
    assert net.training
    net.eval()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Relu"]
    x_dims = proto.graph.input[0].type.tensor_type.shape.dim
    y_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert [proto.graph.input[0].name, proto.graph.output[0].name] == ["input", "output"]
    assert x_dims[0].dim_param == "batch" and [d.dim_value for d in x_dims[1:]] == [3, 16, 16]
    assert y_dims[0].dim_param == "batch"
    assert load_model(path).graph.nodes[0].op == "Conv"
    assert_matches_torch(net, path)
    # Nothing but the model: no staging folder or stray data file beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]


def test_keep_batchnorm_keeps_the_node(tmp_path: Path) -> None:
    net = make_net()
    path = tmp_path / "net_bn.onnx"

    export_module(net, (torch.randn(1, 3, 16, 16),), path, keep_batchnorm=True, input_names=["image"])

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    bn = proto.graph.node[1]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}["training_mode"] == 0
    # The four BatchNorm parameters stay initializers with the module's values.
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(weights[bn.input[3]], net.bn.running_mean.numpy())
    np.testing.assert_array_equal(weights[bn.input[4]], net.bn.running_var.numpy())
    assert proto.graph.input[0].name == "image"
    assert_matches_torch(net.eval(), path)


def test_static_batch(tmp_path: Path) -> None:
    path = tmp_path / "static.onnx"

    export_module(make_net(), torch.randn(2, 3, 16, 16), path, dynamic_batch=False)

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 16, 16]


FACTORY_SOURCE = """
import torch


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(5, 4)

    def forward(self, x):
        hidden = self.linear(x)
        return torch.relu(hidden), hidden.sum(dim=1)


def build():
    torch.manual_seed(0)
    return TwoHeads()


def not_a_module():
    return 42
"""


def test_export_from_a_file_spec(tmp_path: Path) -> None:
    source = tmp_path / "factories.py"
    source.write_text(FACTORY_SOURCE)
    path = tmp_path / "heads.onnx"

    export_from_spec(f"{source}:build", [2, 5], path)

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    for output in proto.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
    # Compare with a freshly built twin of the exported module, at a batch the export never saw.
    namespace: dict[str, Any] = {}
    exec(compile(FACTORY_SOURCE, str(source), "exec"), namespace)
    twin = namespace["build"]().eval()
    x = torch.randn(4, 5)
    with torch.no_grad():
        expected = [t.numpy() for t in twin(x)]
    actual = session(path).run(None, {"input": x.numpy()})
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_export_from_a_module_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "pkg_for_iropt_export"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))

    path = export_from_spec("pkg_for_iropt_export.nets:build", [[1, 5]], tmp_path / "m.onnx", opset=18)

    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "not a factory spec"),
        ("{dir}/missing.py:build", "no such Python file"),
        ("{dir}/factories.py:absent", "has no attribute 'absent'; it defines: TwoHeads, build"),
        ("{dir}/factories.py:not_a_module", "returned int, not a torch.nn.Module"),
        ("iropt_no_such_package_xyz:build", "cannot import module 'iropt_no_such_package_xyz'"),
    ],
)
def test_bad_specs_are_user_errors(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "factories.py").write_text(FACTORY_SOURCE)

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        export_from_spec(spec.format(dir=tmp_path), [1, 5], tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


class Raising(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        raise RuntimeError("shapes do not line up")


class Unexportable(torch.nn.Module):
    """Runs in eager mode, but the TorchScript exporter has no ONNX form of an SVD."""

    def forward(self, x: Any) -> Any:
        return torch.linalg.svd(x).S


def test_module_raising_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match="Raising raised on the example inputs \\(2x3\\): RuntimeError: shapes"
    ):
        export_module(Raising(), torch.randn(2, 3), tmp_path / "r.onnx")
    assert list(tmp_path.iterdir()) == []


def test_exporter_failure_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"torch\.onnx\.export could not export Unexportable") as caught:
        export_module(Unexportable(), torch.randn(2, 3, 3), tmp_path / "u.onnx")
    assert caught.value.__cause__ is not None
    assert list(tmp_path.iterdir()) == []


def test_missing_output_directories_are_made(tmp_path: Path) -> None:
    out = export_module(make_net(), torch.randn(1, 3, 16, 16), tmp_path / "out" / "nets" / "m.onnx")
    assert out.is_file() and onnx.load(str(out)).graph.node


def test_a_file_in_the_output_path_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="not a directory"):
        export_module(make_net(), torch.randn(1, 3, 16, 16), tmp_path / "taken" / "m.onnx")


CONV_SOURCE = """
import torch


def conv_bn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
"""


def test_cli_arguments_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "nets.py"
    source.write_text(CONV_SOURCE)
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "cli.onnx"
    args = parser.parse_args(
        [
            f"{source}:conv_bn",
            "--input-shape",
            "1x3x16x16",
            "-o",
            str(out),
            "--keep-batchnorm",
            "--opset",
            "17",
        ]
    )

    assert run_export(args) == 0

    assert "BatchNormalization" in [n.op_type for n in onnx.load(str(out)).graph.node]
    printed = capsys.readouterr().out
    assert str(out) in printed and "dynamic 'batch'" in printed


def test_cli_rejects_a_bad_shape(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["m:f", "--input-shape", "1xax3", "-o", "x.onnx"])
    assert "is not a shape such as 1x3x32x32" in capsys.readouterr().err


def test_parse_shape() -> None:
    assert parse_shape("1x3x32x32") == [1, 3, 32, 32]
    assert parse_shape("2,5") == [2, 5]
    for bad in ("", "1x", "ax3", "0x3", "-1x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a shape"):
            parse_shape(bad)
