"""The four `normalization` methods of docs/original.md §5, each a fit and an apply.

`fit` sees the training tensor (N, C, H, W) float32 and returns its constants as a
dict of float64 tensors (what the cache stores); `apply` maps any split with them,
in place.

    scale   (x - min) / (max - min), min and max over the whole training tensor
    simple  (x - mean) / std, one scalar mean and std
    channel (x - mean_c) / std_c, per channel: constants of shape (1, C, 1, 1)
    image   (x - mean_image) / std_image: constants of shape (1, C, H, W)

A zero spread (a constant training set, or MNIST's always-black corner pixels for
`image`) would divide by zero: it is replaced by 1, so such values become 0.
Standard deviations are unbiased (divide by N - 1), as Torch7's `std`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

Constants = dict[str, torch.Tensor]


def _nonzero(spread: torch.Tensor) -> torch.Tensor:
    return torch.where(spread > 0, spread, torch.ones_like(spread))


def _fit_scale(x: torch.Tensor) -> Constants:
    lo, hi = x.min().double(), x.max().double()
    return {"shift": lo, "divisor": _nonzero(hi - lo)}


CHUNK = 8192  # samples per float64 block: statistics never hold a float64 copy of x


def _moments(x: torch.Tensor, dims: tuple[int, ...]) -> Constants:
    """Mean and unbiased std over `dims` (keepdim), accumulated in float64 by blocks."""
    s1 = s2 = torch.zeros((), dtype=torch.float64, device=x.device)
    for block in x.split(CHUNK):
        b = block.double()
        s1 = s1 + b.sum(dims, keepdim=True)
        s2 = s2 + (b * b).sum(dims, keepdim=True)
    n = x.numel() // s1.numel()
    mean = s1 / n
    var = ((s2 - n * mean * mean) / max(n - 1, 1)).clamp_(min=0)
    return {"shift": mean, "divisor": _nonzero(var.sqrt())}


def _fit_simple(x: torch.Tensor) -> Constants:
    return _moments(x, (0, 1, 2, 3))


def _fit_channel(x: torch.Tensor) -> Constants:
    return _moments(x, (0, 2, 3))


def _fit_image(x: torch.Tensor) -> Constants:
    return _moments(x, (0,))


def apply_normalization_(x: torch.Tensor, c: Constants) -> torch.Tensor:
    """x <- (x - shift) / divisor, in place on a float32 tensor the caller owns."""
    shift = c["shift"].to(device=x.device, dtype=x.dtype)
    divisor = c["divisor"].to(device=x.device, dtype=x.dtype)
    return x.sub_(shift).div_(divisor)


Shape = tuple[int, ...]


class Method(NamedTuple):
    fit: Callable[[torch.Tensor], Constants]
    apply: Callable[[torch.Tensor, Constants], torch.Tensor]
    # (C, H, W) of the images -> the shape of both constants, as `fit` returns them
    # (what a cached file must hold).
    shape: Callable[[Shape], Shape]


# The methods by name: the one list of allowed `normalization` values.
NORMALIZATIONS: dict[str, Method] = {
    "scale": Method(_fit_scale, apply_normalization_, lambda chw: ()),
    "simple": Method(_fit_simple, apply_normalization_, lambda chw: (1, 1, 1, 1)),
    "channel": Method(_fit_channel, apply_normalization_, lambda chw: (1, chw[0], 1, 1)),
    "image": Method(_fit_image, apply_normalization_, lambda chw: (1, *chw)),
}
