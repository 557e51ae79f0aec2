"""Fixed random feedback matrices (SPEC §1 "Feedback matrices").

Feedback matrices are module *buffers*: saved in `state_dict`, moved by
`.to()`, invisible to optimizers. They are drawn once, here, from an explicit
generator so that the same seed always gives the same matrices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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


# --- the protocol between fa-family layers and the rules -------------------------
# A layer trained by a per-layer rule keeps, for each weight `w` it handles, the
# rule's state under `feedback_name(w)` (B_0, drawn at conversion), and asks
# `feedback_for(layer, w)` for the B of the current step; nothing else reads it.


def feedback_name(weight: str) -> str:
    """Attribute holding the feedback of `layer.<weight>`: "feedback" for "weight"
    (state_dict key `<layer>.feedback`), else "<weight>_feedback"."""
    return "feedback" if weight == "weight" else f"{weight}_feedback"


def add_feedback(layer: nn.Module, weight: str, initial: Tensor, rule: str = "fa") -> None:
    """Give `layer.<weight>` its feedback, starting from `initial` (the weight's shape)."""
    layer.register_buffer(feedback_name(weight), initial)
    layer.feedback_rule = rule


def feedback_for(layer: nn.Module, weight: str = "weight") -> Tensor:
    """The matrix B (the weight's shape) that `layer`'s backward uses this step in
    place of `layer.<weight>`."""
    return getattr(layer, feedback_name(weight))
