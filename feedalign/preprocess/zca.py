"""ZCA whitening (docs/original.md §5, `whiten`), fitted on the raw 0-255 pixel values.

    mean = E[x]                                   (D,)     D = C * H * W
    cov  = (x - mean)^T (x - mean) / (N - 1)      (D, D)   float64
    cov  = V diag(lambda) V^T                     eigendecomposition
    P    = V diag(1 / sqrt(lambda + 1e-5)) V^T    (D, D)
    x   <- (x - mean) P

Eigenvalues a rounding error below zero are clamped to 0 before adding epsilon.
Whitening replaces normalisation. CIFAR-10 (50,000 x 3,072) takes well under a
minute on two CPU cores: the covariance is one float64 matmul per block of samples,
the eigendecomposition one `torch.linalg.eigh`.
"""

from __future__ import annotations

import torch

EPSILON = 1e-5  # added to every eigenvalue (pixel values in 0..255)
CHUNK = 8192  # samples per float64 block


def zca_shapes(chw: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shapes of the constants `fit_zca` returns for images of shape (C, H, W)."""
    d = chw[0] * chw[1] * chw[2]
    return {"mean": (d,), "P": (d, d)}


def fit_zca(x: torch.Tensor, epsilon: float = EPSILON) -> dict[str, torch.Tensor]:
    """Whitening constants of x (N, ...) : {"mean": (D,), "P": (D, D)}, float64."""
    flat = x.reshape(len(x), -1)
    n, d = flat.shape
    if n < 2:
        raise ValueError(f"ZCA needs at least 2 samples, got {n}")
    mean = torch.zeros(d, dtype=torch.float64, device=x.device)
    for block in flat.split(CHUNK):
        mean += block.double().sum(0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for block in flat.split(CHUNK):
        centred = block.double() - mean
        cov.addmm_(centred.T, centred)
    cov /= n - 1
    eigenvalues, v = torch.linalg.eigh(cov)
    scale = (eigenvalues.clamp(min=0) + epsilon).rsqrt()
    return {"mean": mean, "P": (v * scale) @ v.T}


def apply_zca(x: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
    """(x - mean) P for x (N, C, H, W); float32 result of x's shape, computed by blocks."""
    flat = x.reshape(len(x), -1)
    mean = c["mean"].to(device=x.device, dtype=torch.float32)
    p = c["P"].to(device=x.device, dtype=torch.float32)
    out = torch.empty(flat.shape, dtype=torch.float32, device=x.device)
    for start in range(0, len(flat), CHUNK):
        block = flat[start : start + CHUNK].float()
        torch.mm(block - mean, p, out=out[start : start + CHUNK])
    return out.reshape(x.shape)
