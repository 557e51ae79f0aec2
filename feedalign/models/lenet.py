"""BioTorch's `le_net_mnist` (their Benchmarks.md MNIST / Fashion-MNIST table), for
1×32×32 inputs (MNIST resized with `-resize 32`):

    Conv(C->6, 5×5)    nonlin  MaxPool(2)      32 -> 28 -> 14
    Conv(6->16, 5×5)   nonlin  MaxPool(2)      14 -> 10 -> 5
    Conv(16->120, 5×5) nonlin                  5 -> 1
    flatten (120)
    Linear(120->84)    nonlin
    Linear(84->n_classes) [LogSoftmax if ce]

No padding, stride 1. BioTorch's nonlin is ReLU (the row files set -nonlin relu);
other nonlins are accepted. dfa taps (after each pooling / hidden nonlin) are added
by convert, as for the conv network.
"""

from __future__ import annotations

from torch import nn

CHANNELS = (6, 16, 120)
HIDDEN = 84
KERNEL = 5


def lenet_size(size: int) -> int:
    """The spatial size after the three convolutions and two poolings (1 for 32)."""
    size = (size - KERNEL + 1) // 2
    size = (size - KERNEL + 1) // 2
    return size - KERNEL + 1


def lenet(input_shape, n_classes, *, nonlin, bias=True, log_softmax=False, **_unused) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ValueError(f"lenet needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    c, h, w = input_shape
    out_h, out_w = lenet_size(h), lenet_size(w)
    if min(out_h, out_w) < 1:
        raise ValueError(f"lenet: input {tuple(input_shape)} is too small (needs at least 32×32 for "
                         "BioTorch's layout; resize MNIST with -resize 32)")  # fmt: skip
    conv1, conv2, conv3 = CHANNELS
    layers: list[nn.Module] = [
        nn.Conv2d(c, conv1, KERNEL, bias=bias), nonlin(), nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, KERNEL, bias=bias), nonlin(), nn.MaxPool2d(2),
        nn.Conv2d(conv2, conv3, KERNEL, bias=bias), nonlin(),
        nn.Flatten(),
        nn.Linear(conv3 * out_h * out_w, HIDDEN, bias=bias), nonlin(),
        nn.Linear(HIDDEN, n_classes, bias=bias),
    ]  # fmt: skip
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)
