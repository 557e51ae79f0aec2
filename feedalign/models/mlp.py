"""The paper's permutation-invariant `mlp` (docs/original.md §2).

[Dropout(0.1)                 if dropout >= 1]
num_layers × ( Linear -> [BatchNorm1d if batchnorm == 1] -> nonlin
               -> [Dropout(0.5) if dropout == 1, or Dropout(p) if dropout_rate = p > 0] )
                                                        (dfa taps: added by convert)
dropout_rate: the hidden layers' dropout probability instead of the original's 0.5
(the local-loss recipe's 0.1 after each block, no input dropout unless -dropout >= 1).
Linear(num_hidden -> n_classes) -> [LogSoftmax if criterion == ce]
"""

from __future__ import annotations

import math

from torch import nn


def dense_head(
    width: int,
    n_classes: int,
    *,
    nonlin,
    num_layers: int,
    num_hidden: int,
    dropout: bool,
    batchnorm: bool,
    bias: bool,
    log_softmax: bool,
    bn_eps: float = 1e-5,
    dropout_rate: float = 0.5,
) -> list[nn.Module]:
    """num_layers × (Linear -> [BN] -> nonlin -> [Dropout(dropout_rate)]), then the output Linear
    -> [LogSoftmax]: the mlp's body and the conv net's fully connected part."""
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers.append(nn.Linear(width, num_hidden, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm1d(num_hidden, eps=bn_eps))
        layers.append(nonlin())
        if dropout:
            layers.append(nn.Dropout(dropout_rate))
        width = num_hidden
    layers.append(nn.Linear(width, n_classes, bias=bias))
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return layers


def mlp(input_shape, n_classes, *, nonlin, num_layers=2, num_hidden=800, dropout=0, batchnorm=0, bias=True,
        log_softmax=False, dropout_rate=0.0) -> nn.Sequential:  # fmt: skip
    layers: list[nn.Module] = [nn.Flatten()]
    if dropout >= 1:
        layers.append(nn.Dropout(0.1))
    layers += dense_head(math.prod(input_shape), n_classes, nonlin=nonlin, num_layers=num_layers,
                         num_hidden=num_hidden, dropout=dropout == 1 or dropout_rate > 0,
                         batchnorm=batchnorm == 1, bias=bias, log_softmax=log_softmax,
                         dropout_rate=dropout_rate or 0.5)  # fmt: skip
    return nn.Sequential(*layers)
