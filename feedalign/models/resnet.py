"""ResNet-20 for 32×32 images (He et al. 2016, §4.2), the network of BioTorch's
CIFAR-10 benchmark rows:

    Conv(C->16, 3×3) BN nonlin                         32×32
    3 stages × 3 BasicBlocks, 16 / 32 / 64 channels     32 -> 16 -> 8 (stride 2 at stages 2, 3)
    global average pool, Linear(64->n_classes) [LogSoftmax if ce]

BasicBlock: conv3×3-BN-nonlin-conv3×3-BN, plus the shortcut, then nonlin. The shortcut
is the paper's option A, parameter-free: where the shape changes, every second pixel
with the new channels zero-padded. Convolutions have no bias (BatchNorm follows).
The direct rules find the nine BasicBlocks as their blocks (docs/models.md).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

STAGES = (16, 32, 64)
BLOCKS_PER_STAGE = 3  # 6·3 + 2 = 20 layers with weights


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, nonlin: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nonlin()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nonlin()
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: Tensor) -> Tensor:  # option A: (N, C_in, H, W) -> (N, C_out, H/s, W/s)
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, channels: int, n_classes: int, nonlin: type[nn.Module], bias: bool,
                 log_softmax: bool) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(channels, STAGES[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGES[0])
        self.act1 = nonlin()
        blocks, c_in = [], STAGES[0]
        for stage, c_out in enumerate(STAGES):
            for i in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1, nonlin))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(STAGES[-1], n_classes, bias=bias)
        self.log_softmax = log_softmax

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, n_classes)
        x = self.blocks(self.act1(self.bn1(self.conv1(x))))
        y = self.fc(x.mean((2, 3)))
        return F.log_softmax(y, dim=1) if self.log_softmax else y


def resnet20(input_shape, n_classes, *, nonlin, bias=True, log_softmax=False, **_unused) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"resnet20 needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    return ResNet20(input_shape[0], n_classes, nonlin, bias, log_softmax)
