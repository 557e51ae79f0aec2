"""Fixed random feedback matrices (SPEC §1 "Feedback matrices").

Feedback matrices are module *buffers*: saved in `state_dict`, moved by
`.to()`, invisible to optimizers. They are drawn once, here, from an explicit
generator so that the same seed always gives the same matrices.
"""

from __future__ import annotations

import math

import torch


def generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with `seed`; None means "use torch's global RNG"."""
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def uniform(
    shape: tuple[int, ...],
    bound: float,
    gen: torch.Generator | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform[-bound, +bound] of `shape`, drawn on the CPU (device-independent
    values for a given seed), then moved to `device`."""
    out = torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
    return out.to(dtype=dtype, device=device)


def dfa_bound(n_elements: int, rfb_mag: float) -> float:
    """SPEC §1: 1/sqrt(n_i) with n_i the tap input's elements per sample, or rfb_mag if > 0."""
    return rfb_mag if rfb_mag > 0 else 1.0 / math.sqrt(n_elements)


def fan_in(weight: torch.Tensor) -> int:
    """Inputs feeding one output unit: in_features (Linear) or C_in·kH·kW (Conv2d)."""
    return weight[0].numel()
