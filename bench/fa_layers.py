"""Cost of fa on the layer kinds beyond Linear/Conv2d: one training step (forward,
cross-entropy, backward, SGD) of fa against plain PyTorch back-prop of the same
model, measured in the same run, interleaved.

    python bench/fa_layers.py                      # transformer, LSTM, Conv1d classifiers
    python bench/fa_layers.py --rounds 7 --steps 20

fa's attention and recurrence are written in Python (the recurrence one time step
at a time), where back-prop uses torch's fused kernels; this measures what that
costs. Figures: median over rounds of milliseconds per step and of the fa/bp ratio.
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

log = logging.getLogger("bench.fa_layers")


class Encoder(nn.Module):
    def __init__(self, d=128, layers=2, classes=10):
        super().__init__()
        self.embed = nn.Embedding(1000, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.body(self.embed(tokens)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, d=64, hidden=128, classes=10):
        super().__init__()
        self.embed = nn.Embedding(1000, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0][:, -1])


def conv1d_net(classes=10):
    return nn.Sequential(nn.Conv1d(8, 64, 5, padding="same"), nn.ReLU(), nn.Conv1d(64, 64, 5, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(64, classes))  # fmt: skip


MODELS = {  # name -> (model, input batch of 32)
    "transformer (2 layers, d=128, T=64)": (Encoder, lambda: torch.randint(0, 1000, (32, 64))),
    "lstm (2 layers, H=128, T=64)": (Recurrent, lambda: torch.randint(0, 1000, (32, 64))),
    "conv1d (2 layers, 64 ch, L=256)": (conv1d_net, lambda: torch.randn(32, 8, 256)),
}


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    for name, (build, data) in MODELS.items():
        bp = build()
        fa = feedalign.convert(copy.deepcopy(bp), "fa", seed=0)
        x, y = data(), torch.randint(0, 10, (32,))
        step_time(bp, x, y, 2), step_time(fa, x, y, 2)  # warm-up (and fa's one-time weight check)
        times: dict[str, list[float]] = {"bp": [], "fa": []}
        for r in range(args.rounds):
            order = [("bp", bp), ("fa", fa)][:: 1 if r % 2 == 0 else -1]
            for label, model in order:
                times[label].append(step_time(model, x, y, args.steps))
        ratio = statistics.median(f / b for f, b in zip(times["fa"], times["bp"]))
        log.info("%-38s bp %7.1f ms/step   fa %7.1f ms/step   fa/bp %.2f", name,
                 statistics.median(times["bp"]), statistics.median(times["fa"]), ratio)  # fmt: skip


if __name__ == "__main__":
    main()
