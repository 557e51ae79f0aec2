"""The paper's `conv` network (docs/original.md §2), for any C×H×W input (the original: 3×32×32).

    [Dropout(0.1) if dropout == 1]
    Conv(C->96)   [BN] nonlin [Dropout(0.25) if dropout in {1,2}] MaxPool(3, 2)
    Conv(96->128) [BN] nonlin [Dropout(0.25) if dropout in {1,2}] MaxPool(3, 2)
    Conv(128->256)[BN] nonlin [Dropout(0.5)  if dropout == 1]     MaxPool(3, 2)
    flatten (256·3·3 = 2304 for 32×32)
    Linear(-> 2048) [BN] nonlin [Dropout(0.5) if dropout == 1]
    Linear(2048->2048) [BN] nonlin [Dropout(0.5) if dropout == 1]
    Linear(2048->n_classes) [LogSoftmax if ce]

All convolutions 5×5, stride 1, padding 2. BN: eps 1e-3, present where
batchnorm == 1; the second convolution's BN also where batchnorm == 2.
dfa taps (after each MaxPool and each hidden nonlin/dropout) are added by convert.
"""

from __future__ import annotations

from torch import nn

from feedalign.models.mlp import dense_head

CHANNELS = (96, 128, 256)
CONV_DROPOUT = (0.25, 0.25, 0.5)
HIDDEN = 2048


def pooled_size(size: int) -> int:
    return (size - 3) // 2 + 1  # MaxPool(3, stride 2), floor mode; conv keeps the size


def conv(
    input_shape,
    n_classes,
    *,
    nonlin,
    dropout=0,
    batchnorm=0,
    bias=True,
    log_softmax=False,
    **_unused,
) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ValueError(f"conv needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    if dropout == 1:
        layers.append(nn.Dropout(0.1))
    for i, (out_c, p) in enumerate(zip(CHANNELS, CONV_DROPOUT)):
        layers.append(nn.Conv2d(c, out_c, 5, stride=1, padding=2, bias=bias))
        if batchnorm == 1 or (batchnorm == 2 and i == 1):
            layers.append(nn.BatchNorm2d(out_c, eps=1e-3))
        layers.append(nonlin())
        if dropout == 1 or (dropout == 2 and i < 2):
            layers.append(nn.Dropout(p))
        layers.append(nn.MaxPool2d(3, stride=2))
        c, h, w = out_c, pooled_size(h), pooled_size(w)
        if min(h, w) < 1:
            raise ValueError(f"conv: input {tuple(input_shape)} is too small for three 3/2 poolings")
    layers.append(nn.Flatten())
    layers += dense_head(c * h * w, n_classes, nonlin=nonlin, num_layers=2, num_hidden=HIDDEN,
                         dropout=dropout == 1, batchnorm=batchnorm == 1, bias=bias, log_softmax=log_softmax,
                         bn_eps=1e-3)  # fmt: skip
    return nn.Sequential(*layers)
