"""Spectra and factors: plain SVD of a weight, SVD of the weight whitened by its inputs, Tucker-2.

A layer computes `y = x W` (W is K x N). Truncating W to rank r changes the output by `x D` with
`D = W - W_r`, and over inputs with second moment `C = E[x x^T]` the mean squared change is
`tr(D^T C D)`. Plain SVD minimizes `||D||_F` instead, which is the right thing only when C is a
multiple of the identity.

Whitened SVD: with `C = S S^T`, `tr(D^T C D) = ||S^T D||_F^2`, so the best rank-r W in output
error is `S^-T (S^T W)_r`: truncate the SVD of `S^T W` and map back. The discarded squared
singular values of `S^T W` are then exactly the mean squared output error on the inputs C was
measured on. S comes from the eigendecomposition `C = Q L Q^T` (S = Q L^1/2), with L damped by
`damping` times its mean: directions the calibration data never excites then cost a little
instead of nothing, and `S` stays invertible.

The factors split each singular value evenly: `A = left_r sqrt(s_r)` (K x r) and
`B = sqrt(s_r) right_r` (r x N), so neither factor's range dwarfs the other's in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Eigenvalues below this fraction of the largest count as zero when nothing is damped.
EIGEN_FLOOR = 1e-12


@dataclass
class Spectrum:
    """The SVD of a (possibly whitened) weight, with the left vectors mapped back to the weight's space."""

    values: np.ndarray  # singular values, descending
    left: np.ndarray  # K x R
    right: np.ndarray  # R x N
    whitened: bool

    @property
    def full_rank(self) -> int:
        return int(self.values.size)

    def discarded(self, rank: int) -> float:
        """The sum of the squared singular values a rank-`rank` truncation drops."""
        return float(np.sum(self.values[rank:] ** 2))

    def energy(self, rank: int) -> float:
        """The fraction of the squared spectrum kept at `rank`."""
        total = float(np.sum(self.values**2))
        return 1.0 if total == 0.0 else 1.0 - self.discarded(rank) / total

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) with A @ B the rank-`rank` truncation: K x rank and rank x N."""
        root = np.sqrt(self.values[:rank])
        return self.left[:, :rank] * root, root[:, None] * self.right[:rank]


def plain_spectrum(matrix: np.ndarray) -> Spectrum:
    """SVD of the weight itself: truncation minimizes the weight error ||W - W_r||_F."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return Spectrum(s, u, vt, whitened=False)


@dataclass(frozen=True)
class Whitening:
    """`S = Q L^1/2` for a damped input second moment `C = Q L Q^T`; shared by layers with one input."""

    vectors: np.ndarray  # Q, K x K
    root: np.ndarray  # L^1/2, length K


def whitening(second: np.ndarray, damping: float) -> Whitening:
    """The square root of `second` (K x K) with its eigenvalues damped by `damping` times their mean."""
    eigenvalues, vectors = np.linalg.eigh(second)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    largest = float(eigenvalues.max(initial=0.0))
    eigenvalues = eigenvalues + damping * float(eigenvalues.mean())
    eigenvalues = np.maximum(eigenvalues, EIGEN_FLOOR * max(largest, EIGEN_FLOOR))
    return Whitening(vectors, np.sqrt(eigenvalues))


def whitened_spectrum(matrix: np.ndarray, white: Whitening) -> Spectrum:
    """SVD of `S^T W`, its left vectors mapped back by `S^-T`."""
    root = white.root
    u, s, vt = np.linalg.svd(root[:, None] * (white.vectors.T @ matrix), full_matrices=False)
    return Spectrum(s, white.vectors @ (u / root[:, None]), vt, whitened=True)


def output_error(
    matrix: np.ndarray, approx: np.ndarray, second: np.ndarray, mean: np.ndarray, bias: np.ndarray | None
) -> tuple[float, float]:
    """(mean squared output error of `approx` in place of `matrix`, mean squared output) per row.

    The output includes the bias (`mean` is E[x]); the error does not depend on it.
    """
    diff = matrix - approx
    error = float(np.sum(diff * (second @ diff)))
    signal = float(np.sum(matrix * (second @ matrix)))
    if bias is not None:
        signal += float(2.0 * mean @ matrix @ bias + bias @ bias)
    return max(error, 0.0), max(signal, 0.0)


# --- Conv forms ----------------------------------------------------------------------------


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """A 2-D Conv weight (Cout, Cin, kh, kw) as the (Cin*kh) x (Cout*kw) matrix spatial SVD truncates.

    Rank r of it is a kh x 1 Conv to r channels followed by a 1 x kw Conv.
    """
    cout, cin, kh, kw = weight.shape
    return weight.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw).astype(np.float64)


def spatial_weights(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Spatial factors as Conv weights: (r, Cin, kh, 1) and (Cout, r, 1, kw)."""
    cout, cin, kh, kw = shape
    rank = a.shape[1]
    first = a.T.reshape(rank, cin, kh)[..., None]
    second = b.reshape(rank, cout, kw).transpose(1, 0, 2)[:, :, None, :]
    return first, second


def spatial_to_conv(approx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The full Conv weight (Cout, Cin, kh, kw) a truncated spatial matrix stands for."""
    cout, cin, kh, kw = shape
    return approx.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)


@dataclass
class Tucker:
    """Tucker-2 of a Conv weight along its output and input channel modes (HOSVD)."""

    out_values: np.ndarray
    out_vectors: np.ndarray  # Cout x Cout'
    in_values: np.ndarray
    in_vectors: np.ndarray  # Cin x Cin'
    weight: np.ndarray  # float64 copy

    def discarded(self, rank: tuple[int, int]) -> float:
        """An upper bound of ||W - W_r||^2: the discarded energy of both modes (HOSVD)."""
        r_out, r_in = rank
        return float(np.sum(self.out_values[r_out:] ** 2) + np.sum(self.in_values[r_in:] ** 2))

    def energy(self, rank: tuple[int, int]) -> float:
        total = float(np.sum(self.weight**2))
        return 1.0 if total == 0.0 else max(0.0, 1.0 - self.discarded(rank) / total)

    def factors(self, rank: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first 1x1: r_in x Cin, core: r_out x r_in x k..., last 1x1: Cout x r_out)."""
        r_out, r_in = rank
        u_out, u_in = self.out_vectors[:, :r_out], self.in_vectors[:, :r_in]
        core = np.einsum("oc...,or,ci->ri...", self.weight, u_out, u_in)
        return u_in.T, core, u_out


def tucker(weight: np.ndarray) -> Tucker:
    w = weight.astype(np.float64)
    cout, cin = w.shape[:2]
    u_out, s_out, _ = np.linalg.svd(w.reshape(cout, -1), full_matrices=False)
    u_in, s_in, _ = np.linalg.svd(w.transpose(1, 0, *range(2, w.ndim)).reshape(cin, -1), full_matrices=False)
    return Tucker(s_out, u_out, s_in, u_in, w)


def tucker_to_conv(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The full Conv weight the three Tucker-2 factors compose to."""
    return np.einsum("or,ri...,ic->oc...", last, core, first)
