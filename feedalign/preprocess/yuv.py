"""RGB -> YUV, as Torch7's `image.rgb2yuv` (docs/original.md §5, `format = yuv`).

The analogue BT.601 matrix, applied per pixel to the raw 0-255 values:

    y =  0.299   r + 0.587   g + 0.114   b     (0..255)
    u = -0.14713 r - 0.28886 g + 0.436   b     (about -111..111)
    v =  0.615   r - 0.51499 g - 0.10001 b     (about -157..157)
"""

from __future__ import annotations

import torch

RGB2YUV = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [-0.14713, -0.28886, 0.436],
        [0.615, -0.51499, -0.10001],
    ],
    dtype=torch.float64,
)


def rgb2yuv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 3, H, W) YUV, in x's float dtype (uint8 -> float32)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb2yuv needs (N, 3, H, W) images, got shape {tuple(x.shape)}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    m = RGB2YUV.to(device=x.device, dtype=dtype)
    return torch.einsum("oc,nchw->nohw", m, x.to(dtype))
