"""Block-wise 4-bit weight quantization: round to nearest, and GPTQ-style error compensation.

A weight `W [K, N]` (K inputs, N outputs: a MatMul's right operand) is cut along K into blocks
of `block` rows; each block of each column has its own scale (and zero point), so an outlier
costs precision only in its own block. Codes are 4-bit unsigned, `c in [0, 15]`, read back as
`(c - zero) * scale`:

- symmetric: zero point 8, codes reach -8 steps below zero and 7 above; the scale is the
  smallest under which the block's most negative value fits in 8 steps and its most positive
  in 7, so one end is represented exactly and nothing is clipped.
- asymmetric: the block's `[min(w, 0), max(w, 0)]` over the 16 codes, zero point where 0 lands.

Round to nearest (`rtn`) quantizes each weight on its own. GPTQ (Frantar et al., 2022) uses the
layer's inputs: with `H = X^T X` over calibration rows, the output error of quantizing row k of
W is `(w_k - q_k)^2 * H_kk`-weighted and correlated with the rows after it, so after rounding
row k the rows not yet quantized are corrected by `-(w_k - q_k) / U_kk * U_k,k+1:` where U is
the upper Cholesky factor of `H^-1`. A block's scale is chosen when its first row is reached,
from the block's rows as they stand after the corrections so far. Rows are processed in lazy
batches (the correction of a batch is applied to the rest in one matrix product).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from iropt.util.threads import thread_map

LEVELS = 16  # 4-bit codes
SYMMETRIC_ZERO = 8
BLOCK_SIZES = (16, 32, 64, 128, 256)
# Added to the diagonal of H, as a fraction of its mean: keeps H invertible when inputs are
# correlated or some never vary (GPTQ's "percdamp").
GPTQ_DAMPING = 0.01
# Rows whose corrections are kept back and applied to the rows after them in one product.
GPTQ_BATCH = 128


@dataclass(frozen=True)
class BlockQuantized:
    """4-bit codes of a `[K, N]` weight with per-block scales and zero points."""

    codes: np.ndarray  # uint8 [K, N], values in [0, 15]
    scale: np.ndarray  # float32 [blocks, N]
    zero: np.ndarray  # uint8 [blocks, N]
    block: int
    symmetric: bool

    @property
    def blocks(self) -> int:
        return int(self.scale.shape[0])

    def dequantize(self) -> np.ndarray:
        """The float weight the codes stand for, `[K, N]`."""
        rows = self.codes.shape[0]
        scale = np.repeat(self.scale, self.block, axis=0)[:rows]
        zero = np.repeat(self.zero, self.block, axis=0)[:rows].astype(np.float32)
        return ((self.codes.astype(np.float32) - zero) * scale).astype(np.float32)


def block_params(values: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of one block `[rows, N]`."""
    if symmetric:
        # The smallest scale under which both ends fit: the negative end on codes down to 0
        # (-8 steps), the positive end on codes up to 15 (+7 steps).
        below = -np.minimum(values.min(axis=0), 0.0) / SYMMETRIC_ZERO
        above = np.maximum(values.max(axis=0), 0.0) / (LEVELS - 1 - SYMMETRIC_ZERO)
        scale = np.maximum(below, above)
        zero = np.full(values.shape[1], SYMMETRIC_ZERO, dtype=np.uint8)
    else:
        low = np.minimum(values.min(axis=0), 0.0)
        high = np.maximum(values.max(axis=0), 0.0)
        scale = (high - low) / (LEVELS - 1)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.rint(-low / safe), 0, LEVELS - 1).astype(np.uint8)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale
    return scale, zero


def _codes(values: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values / scale) + zero, 0, LEVELS - 1)


def quantize_rtn(weight: np.ndarray, block: int, symmetric: bool) -> BlockQuantized:
    """Round every weight to its nearest code."""
    w = np.asarray(weight, dtype=np.float64)
    codes = np.empty(w.shape, dtype=np.uint8)
    scales, zeros = [], []
    for start in range(0, w.shape[0], block):
        rows = w[start : start + block]
        scale, zero = block_params(rows, symmetric)
        codes[start : start + block] = _codes(rows, scale, zero)
        scales.append(scale)
        zeros.append(zero)
    return BlockQuantized(codes, np.stack(scales), np.stack(zeros), block, symmetric)


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ needs from a layer input's Gram matrix, shared by every weight reading that input."""

    upper: np.ndarray  # float64 [K, K], upper triangular, `U^T U = (H + damping)^-1`
    dead: np.ndarray  # bool [K], inputs that are always 0


def gptq_factor(gram: np.ndarray) -> GptqFactor:
    """Damp `gram` (`X^T X`, `[K, K]`) and factor its inverse."""
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(h.shape[0])] += GPTQ_DAMPING * float(np.mean(np.diag(h)))
    return GptqFactor(_upper_cholesky_of_inverse(h), dead)


def quantize_gptq(
    weight: np.ndarray, gram: np.ndarray | GptqFactor, block: int, symmetric: bool
) -> BlockQuantized:
    """GPTQ: quantize rows in order, compensating each row's error on the rows after it.

    `gram` is `X^T X` (`[K, K]`) over calibration inputs X of the layer, or its `gptq_factor`.
    Rows go in batches of `GPTQ_BATCH` (a multiple of `block`). Inside a batch, a row's
    correction reaches the other rows of its block at once (the block's scale and the next row
    depend on it) and the later blocks of the batch only when they are reached, as one product
    with the batch's errors so far; the rows after the batch get the whole batch's correction
    in one product. All N output columns of a row are rounded together.
    """
    factor = gram if isinstance(gram, GptqFactor) else gptq_factor(gram)
    w = np.array(weight, dtype=np.float64)
    w[factor.dead] = 0.0  # inputs that are always 0 contribute nothing
    k = w.shape[0]
    batch = max(GPTQ_BATCH, block)
    codes = np.empty(w.shape, dtype=np.uint8)
    scales: list[np.ndarray] = []
    zeros: list[np.ndarray] = []
    for start in range(0, k, batch):
        end = min(start + batch, k)
        upper = factor.upper[start:end, start:end]
        errors = np.empty((end - start, w.shape[1]))
        for first in range(0, end - start, block):
            last = min(first + block, end - start)
            # This block's rows with the corrections of the batch's earlier blocks.
            rows = w[start + first : start + last] - upper[:first, first:last].T @ errors[:first]
            scale, zero = block_params(rows, symmetric)
            scales.append(scale)
            zeros.append(zero)
            _quantize_block(rows, upper[first:last, first:last], scale, zero,
                            codes[start + first : start + last], errors[first:last])
        w[end:] -= factor.upper[start:end, end:].T @ errors
    return BlockQuantized(codes, np.stack(scales), np.stack(zeros), block, symmetric)


def quantize_gptq_by_input(
    layers: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]], block: int, symmetric: bool
) -> Iterator[list[BlockQuantized]]:
    """GPTQ for weights grouped by the input they read (`(gram, weights)` per input): each input's
    Gram matrix is factored once for all its weights (a transformer's Q, K and V projections),
    and the inputs are spread over threads. Results in the order of `layers`."""

    def one_input(layer: tuple[np.ndarray, Sequence[np.ndarray]]) -> list[BlockQuantized]:
        factor = gptq_factor(layer[0])
        return [quantize_gptq(weight, factor, block, symmetric) for weight in layer[1]]

    return thread_map(one_input, layers)


def _quantize_block(
    rows: np.ndarray, upper: np.ndarray, scale: np.ndarray, zero: np.ndarray, codes: np.ndarray, errors: np.ndarray
) -> None:
    """Round `rows` one after the other into `codes`, each row's scaled error into `errors`, and
    correct the rows below it (`rows` is a working copy, changed in place)."""
    zero_f = zero.astype(np.float64)
    for row in range(rows.shape[0]):
        code = _codes(rows[row], scale, zero_f)
        codes[row] = code
        error = (rows[row] - (code - zero_f) * scale) / upper[row, row]
        errors[row] = error
        if row + 1 < rows.shape[0]:
            rows[row + 1 :] -= upper[row, row + 1 :, None] * error


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U with `U^T U = H^-1` (upper triangular), adding damping until H is positive definite.

    With V the upper triangular factor of `H = V V^T` (a Cholesky factorization of H with its
    rows and columns reversed), `U = V^-1`: one factorization and one triangular inverse.
    """
    damping = GPTQ_DAMPING * float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            reversed_lower = np.linalg.cholesky(h[::-1, ::-1])
            return np.ascontiguousarray(np.linalg.inv(reversed_lower[::-1, ::-1]))
        except np.linalg.LinAlgError:
            h = h + damping * np.eye(h.shape[0])
            damping *= 10
    raise np.linalg.LinAlgError("the layer's input Gram matrix is not positive definite, even damped")


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis, the first in the low nibble (even length)."""
    flat = codes.astype(np.uint8)
    return (flat[..., 0::2] | (flat[..., 1::2] << 4)).astype(np.uint8)
