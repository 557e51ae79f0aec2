"""One training step of ResNet-18 under dfa against plain PyTorch back-prop.

    python bench/resnet_step.py                  # 10 rounds of 3 steps each
    python bench/resnet_step.py --rounds 3 --steps 2

ResNet-18 in torchvision's layout (7×7/2 stem, max-pool, BasicBlocks [2, 2, 2, 2],
global average pool, fc), defined here (no torchvision dependency); 32×32 inputs,
batch 64, 10 classes, cross-entropy, SGD. Two identical models: one plain, one
`feedalign.convert(model, "dfa")` (taps at the input of each of the 8 blocks and
of fc). Each round times `--steps` steps of each, in alternating order; the
figures are medians over rounds, and the ratio is the median of the per-round
ratios dfa / bp (< 1: dfa is faster).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import feedalign

log = logging.getLogger("resnet_step")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + skip)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, c_in, stages = [64, 128, 256, 512], 64, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c_in, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            c_in = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (N, 64, 8, 8) for 32×32 inputs
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 512, 1, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_step(model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(step, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="rounds; medians are reported (default 10)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant and round (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    plain = ResNet18()
    steps = {"bp": make_step(plain), "dfa": make_step(feedalign.convert(copy.deepcopy(plain), "dfa", seed=0))}
    for step in steps.values():  # warm-up; dfa draws its feedback at its first forward pass
        step(x, y)
    times: dict[str, list[float]] = {k: [] for k in steps}
    ratios = []
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        this = {name: timed(steps[name], x, y, args.steps) for name in order}
        for name, t in this.items():
            times[name].append(t)
        ratios.append(this["dfa"] / this["bp"])
    log.info("torch %s, %d threads, ResNet-18, batch 64, 32×32, %d rounds × %d steps",
             torch.__version__, args.threads, args.rounds, args.steps)  # fmt: skip
    for name, ts in times.items():
        log.info("%-4s median step %.1f ms", name, 1e3 * statistics.median(ts))
    log.info("dfa / bp: median ratio %.3f (per round: %s)", statistics.median(ratios),
             " ".join(f"{q:.3f}" for q in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
