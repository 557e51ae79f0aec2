"""Training-set augmentation (docs/original.md §5), batched on the input's device.

Per image: crop a random square of side H - s, s uniform in {0..8}, at a uniform
random offset; flip it horizontally with p = 0.5; rescale it back to H x W
(bilinear). The original did this for 32x32 images; here H and W are the input's.

All images of a batch are cropped, flipped and rescaled by one `grid_sample`:
each image gets an affine map from output to input coordinates, so there is no
per-image Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SHRINK = 8  # docs/original.md §5: s ~ {0..8}


def crop_flip_resize(
    x: torch.Tensor,
    shrink: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
) -> torch.Tensor:
    """Crop (H - s) x (W - s) pixels at (top, left), flip where asked, rescale to H x W.

    x: (N, C, H, W) float. shrink, top, left: (N,) integer pixels with
    0 <= top, left <= shrink. flip: (N,) bool. With shrink = 0 and no flip the
    output equals x up to float rounding. Equivalent to `F.interpolate(crop, (H, W),
    mode="bilinear", align_corners=False)` of each crop, flipped.
    """
    n, _, h, w = x.shape
    dtype = x.dtype if x.is_floating_point() else torch.float32
    s, top, left = (t.to(device=x.device, dtype=dtype) for t in (shrink, top, left))
    # With align_corners=False, normalised coordinate -1 is the left edge of pixel 0
    # and +1 the right edge of pixel W-1. Output edges [-1, 1] map to the crop's edges
    # [-1 + 2 left / W, -1 + 2 (left + W - s) / W]: x_in = a x_out + b.
    ax = (w - s) / w
    bx = -1 + (2 * left + (w - s)) / w
    ay = (h - s) / h
    by = -1 + (2 * top + (h - s)) / h
    ax = torch.where(flip.to(x.device), -ax, ax)  # mirror the output's x axis
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=dtype)
    theta[:, 0, 0], theta[:, 0, 2] = ax, bx
    theta[:, 1, 1], theta[:, 1, 2] = ay, by
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)  # (N, H, W, 2)
    # Keep samples inside the crop's outermost pixel centres, as rescaling the cropped
    # image alone would (`F.interpolate` of the crop clamps there too).
    for axis, start, size in ((0, left, w), (1, top, h)):
        lo = (-1 + (2 * start + 1) / size).view(n, 1, 1)
        hi = (-1 + (2 * (start + size - s) - 1) / size).view(n, 1, 1)
        grid[..., axis] = torch.clamp(grid[..., axis], min=lo, max=hi)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, generator: torch.Generator, *, max_shrink: int = MAX_SHRINK) -> torch.Tensor:
    """A randomly cropped, flipped and rescaled copy of x (N, C, H, W), float.

    `generator` must live on x's device; the draws depend only on its state.
    docs/original.md §5 shrinks a 32×32 image by s ≤ 8 pixels (at most a quarter); other sizes
    keep that proportion: s ≤ round(max_shrink · min(H, W) / 32), at least 1 pixel
    short of the whole image (MNIST 28×28: 7; digits 8×8: 2; STL-10 96×96: 24).
    """
    n, _, h, w = x.shape
    s_max = min(round(max_shrink * min(h, w) / 32), min(h, w) - 1)
    opts = {"generator": generator, "device": x.device}
    shrink = torch.randint(0, s_max + 1, (n,), **opts)
    # offsets uniform in 0..s: floor(u (s + 1)) with u in [0, 1) never exceeds s
    top = (torch.rand(n, **opts) * (shrink + 1)).floor()
    left = (torch.rand(n, **opts) * (shrink + 1)).floor()
    flip = torch.rand(n, **opts) < 0.5
    return crop_flip_resize(x, shrink, top, left, flip)


def jitter_flip(
    x: torch.Tensor, generator: torch.Generator, *, pixels: int, flip: bool, fill: torch.Tensor
) -> torch.Tensor:
    """A copy of x (N, C, H, W) shifted by up to `pixels` each way and, with `flip`,
    mirrored left-right with p = 0.5: torchvision's RandomCrop(H, padding=pixels) and
    RandomHorizontalFlip, as the local-loss recipe uses them, for a whole batch.

    The border the shift uncovers takes `fill` (C,): the value the unnormalised images'
    black (0) has after normalisation, which RandomCrop's zero padding was before it.
    Offsets are uniform in {0..2·pixels} of the padded image, per image.
    """
    n, c, h, w = x.shape
    opts = {"generator": generator, "device": x.device}
    padded = fill.to(x).view(1, c, 1, 1).expand(n, c, h + 2 * pixels, w + 2 * pixels).clone()
    padded[:, :, pixels : pixels + h, pixels : pixels + w] = x
    top = torch.randint(0, 2 * pixels + 1, (n,), **opts)
    left = torch.randint(0, 2 * pixels + 1, (n,), **opts)
    flips = torch.rand(n, **opts) < 0.5 if flip else torch.zeros(n, dtype=torch.bool, device=x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)  # (N, 1, H, 1)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + left[:, None]  # (N, W): mirrored where flipped
    out = padded.gather(2, rows.expand(n, c, h, w + 2 * pixels))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
