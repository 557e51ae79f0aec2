"""The paper's permutation-invariant `mlp` (SPEC §2).

[Dropout(0.1)                 if dropout >= 1]
num_layers × ( Linear -> [BatchNorm1d if batchnorm == 1] -> nonlin
               -> [Dropout(0.5) if dropout == 1] )     (dfa taps: added by convert)
Linear(num_hidden -> n_classes) -> [LogSoftmax if criterion == ce]
"""

from __future__ import annotations

import math

from torch import nn


def mlp(
    input_shape,
    n_classes,
    *,
    nonlin,
    num_layers=2,
    num_hidden=800,
    dropout=0,
    batchnorm=0,
    bias=True,
    log_softmax=False,
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    if dropout >= 1:
        layers.append(nn.Dropout(0.1))
    width = math.prod(input_shape)
    for _ in range(num_layers):
        layers.append(nn.Linear(width, num_hidden, bias=bias))
        if batchnorm == 1:
            layers.append(nn.BatchNorm1d(num_hidden))
        layers.append(nonlin())
        if dropout == 1:
            layers.append(nn.Dropout(0.5))
        width = num_hidden
    layers.append(nn.Linear(width, n_classes, bias=bias))
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)
