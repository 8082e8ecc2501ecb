"""Quantization formats and the arithmetic of scales and zero points.

A quantized value is `q = saturate(round(x / scale) + zero_point)` and reads back as
`x' = (q - zero_point) * scale` (ONNX QuantizeLinear / DequantizeLinear, rounding half to even).
Inside the quantizer's range `|x - x'| <= scale / 2`; outside it `x'` saturates to the range end.

The two formats differ in what their back end runs fast or accepts at all:

- `ort` (ONNX Runtime on CPU): uint8 asymmetric activations, int8 symmetric per-channel
  weights, int32 bias with `scale = input_scale * weight_scale` and zero point 0. That is the
  combination ORT's QDQ transformer fuses into QLinearConv / QGemm / QLinearMatMul, and its
  u8s8 kernels are the fast ones.
- `tensorrt`: int8 symmetric everywhere (every zero point 0), float bias (TensorRT rejects an
  int32 bias DequantizeLinear and folds the bias itself).

Weights are always symmetric int8 over `[-127, 127]` (not -128: the grid stays symmetric, as
TensorRT requires and as keeps `-w` representable whenever `w` is), or over `[-63, 63]` where
the target's int8 kernels may saturate (`Capabilities.saturating_int8_dot`): x86 CPUs without
VNNI add pairs of uint8 x int8 products in int16, which 7-bit weights cannot overflow
(255 * 63 * 2 = 32130 <= 32767) and full-range ones do, giving wrong sums, not just rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from iropt.infra.pass_base import QuantFormat

FORMATS: tuple[str, ...] = ("ort", "tensorrt")

WEIGHT_QMAX = 127
REDUCED_WEIGHT_QMAX = 63  # 7-bit weights: no int16 overflow in VPMADDUBSW-based kernels
INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@dataclass(frozen=True)
class Scheme:
    """How one back end wants tensors quantized."""

    name: QuantFormat
    activation_dtype: type[np.integer]
    symmetric_activations: bool
    # ORT fuses an op into its QLinear form only when its output is quantized too; TensorRT
    # propagates scales itself and wants Q/DQ on the inputs of quantized ops.
    quantize_outputs: bool
    int32_bias: bool
    # TensorRT concatenates without requantizing when every Concat input has one scale; ORT's
    # QLinearConcat requantizes cheaply, so each input keeps its own (tighter) scale.
    share_concat_scale: bool
    # Largest int8 weight magnitude (see the module docstring); `with_weight_qmax` sets it from
    # the target's capabilities.
    weight_qmax: int = WEIGHT_QMAX

    def with_weight_qmax(self, qmax: int) -> Scheme:
        return replace(self, weight_qmax=qmax)


SCHEMES: dict[str, Scheme] = {
    "ort": Scheme(
        name="ort",
        activation_dtype=np.uint8,
        symmetric_activations=False,
        quantize_outputs=True,
        int32_bias=True,
        share_concat_scale=False,
    ),
    "tensorrt": Scheme(
        name="tensorrt",
        activation_dtype=np.int8,
        symmetric_activations=True,
        quantize_outputs=False,
        int32_bias=False,
        share_concat_scale=True,
    ),
}


@dataclass(frozen=True)
class QParams:
    """A scale and zero point (scalars, or 1-D along `axis` for per-channel quantization)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.zero_point.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.zero_point.dtype).max)


def activation_params(low: float, high: float, scheme: Scheme) -> QParams:
    """Per-tensor parameters covering `[low, high]`.

    Asymmetric (uint8): the range is widened to include 0, so that 0 (padding, ReLU) is exact,
    and the zero point is where 0 lands. A range starting at 0 has zero point 0, which lets ORT
    drop a ReLU before the QuantizeLinear. Symmetric (int8): `scale = max(|low|, |high|) / 127`.
    """
    dtype = scheme.activation_dtype
    if scheme.symmetric_activations:
        amax = max(abs(low), abs(high))
        scale = amax / float(np.iinfo(dtype).max) if amax > 0 else 1.0
        return QParams(np.array(scale, dtype=np.float32), np.array(0, dtype=dtype))
    info = np.iinfo(dtype)
    low, high = min(low, 0.0), max(high, 0.0)
    span = high - low
    scale32 = np.float32(span / (int(info.max) - int(info.min))) if span > 0 else np.float32(1.0)
    zero = round(-low / float(scale32)) + int(info.min) if span > 0 else 0
    zero = int(np.clip(zero, info.min, info.max))
    return QParams(np.array(scale32, dtype=np.float32), np.array(zero, dtype=dtype))


def weight_params(
    weight: np.ndarray, axis: int | None, qmax: int = WEIGHT_QMAX
) -> tuple[np.ndarray, QParams]:
    """Symmetric int8 quantization of a weight over `[-qmax, qmax]`, per channel along `axis`
    (None: per tensor).

    Returns the int8 weight and its parameters. A channel of zeros gets scale 1 (any positive
    scale represents it exactly; 0 would be an invalid scale).
    """
    w = np.asarray(weight, dtype=np.float64)
    if axis is None:
        amax = np.array(np.max(np.abs(w)) if w.size else 0.0)
    else:
        axis = axis % w.ndim
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=reduce) if reduce else np.abs(w)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shaped = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    quantized = np.clip(np.rint(w / shaped.astype(np.float64)), -qmax, qmax).astype(np.int8)
    zero = np.zeros(scale.shape, dtype=np.int8)
    return quantized, QParams(scale, zero, axis if scale.ndim else None)


def bias_params(bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray) -> tuple[np.ndarray, QParams]:
    """int32 bias with `scale = input_scale * weight_scale` and zero point 0, as ORT's QLinear ops expect.

    The int32 bias is added straight to the int32 accumulator of `x_q * w_q`, whose scale is
    exactly that product. Values beyond int32 saturate (only possible for absurd scales).
    """
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    scale = np.asarray(
        np.asarray(input_scale, dtype=np.float64) * np.asarray(weight_scale, dtype=np.float64), dtype=np.float32
    )
    quantized = np.clip(np.rint(b / scale.astype(np.float64)), INT32_MIN, INT32_MAX).astype(np.int32)
    axis = 0 if scale.ndim else None
    return quantized, QParams(scale, np.zeros(scale.shape, dtype=np.int32), axis)


def _broadcast(values: np.ndarray, params: QParams, ndim: int) -> np.ndarray:
    if params.axis is None or values.ndim == 0:
        return values
    return values.reshape([-1 if i == params.axis % ndim else 1 for i in range(ndim)])


def quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """What QuantizeLinear computes (round half to even, saturate)."""
    x = np.asarray(x, dtype=np.float32)
    scale = _broadcast(params.scale, params, x.ndim).astype(np.float32)
    zero = _broadcast(params.zero_point, params, x.ndim).astype(np.float64)
    q = np.rint(x / scale) + zero
    return np.clip(q, params.qmin, params.qmax).astype(params.zero_point.dtype)


def dequantize(q: np.ndarray, params: QParams) -> np.ndarray:
    """What DequantizeLinear computes."""
    q = np.asarray(q)
    scale = _broadcast(params.scale, params, q.ndim).astype(np.float32)
    zero = _broadcast(params.zero_point, params, q.ndim).astype(np.float64)
    return ((q.astype(np.float64) - zero) * scale).astype(np.float32)


def representable_range(params: QParams) -> tuple[float, float]:
    """The interval `[dequantize(qmin), dequantize(qmax)]` of a per-tensor quantizer."""
    scale = float(params.scale)
    zero = int(params.zero_point)
    return (params.qmin - zero) * scale, (params.qmax - zero) * scale
