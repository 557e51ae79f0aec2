"""A training step of the local rules on the local-loss recipe's MLP against plain
PyTorch back-prop of the same network, in the same run.

    python bench/local_step.py                            # bp, predsim, pred, sim, predsim-bio, dfa
    python bench/local_step.py --rules predsim --rounds 20 --threads 1

The network is `feedalign reproduce local-loss`'s: 784 → 3 × (Linear 1024 → BatchNorm →
leaky ReLU → Dropout 0.1) → 10, cross-entropy, Adam, batch 128. Each round times
`--steps` full steps (forward, loss, backward, Adam step) of every variant in a rotated
order; the figures are medians over rounds of samples per second and of the ratio to
plain PyTorch in the same round, with its interquartile range.

What the cut buys, and what the heads cost (per hidden block, F = 1024, batch N):
back-prop computes dW_i and dx_i (two N×F×F products) in the backward; a local rule
computes dW_i only (its input is cut), but its head adds pred's N×F×C decoder and
sim's transform T (F×F: one product forward, two backward) and an N×N Gram matrix.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from throughput import interleaved
from torch import nn

import feedalign
from feedalign.train.memory import keep_freed_memory

RULES = ("bp", "predsim", "pred", "sim", "predsim-bio", "dfa")


def plain_model(layers: int, hidden: int) -> nn.Module:
    """The recipe's network as a PyTorch user writes it, trained by autograd."""
    mods: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.01), nn.Dropout(0.1)]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, 10))


def make_step(model: nn.Module, lr: float, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """One call: a training step (Adam) on each of `batches`."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def steps() -> None:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    return steps


def run(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    torch.manual_seed(0)
    n = args.batch * args.steps
    batches = list(
        zip(torch.randn(n, 1, 28, 28).split(args.batch), torch.randint(0, 10, (n,)).split(args.batch))
    )
    models = {"plain-bp": plain_model(args.layers, args.hidden)}
    for rule in args.rules:
        models[rule] = feedalign.build_model("mlp", (1, 28, 28), 10, rule=rule, nonlin="leakyrelu",
                                             num_layers=args.layers, num_hidden=args.hidden, batchnorm=1,
                                             dropout_rate=0.1, criterion="ce", seed=0)  # fmt: skip
    steps = {name: make_step(m.train(), args.lr, batches) for name, m in models.items()}
    for step in steps.values():  # warm-up
        step()
    return interleaved(steps, args.rounds, 1, n, "plain-bp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=tuple(feedalign.RULES), metavar="RULE",
                   help=f"rules to time (default: {' '.join(RULES)})")  # fmt: skip
    p.add_argument("--layers", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--hidden", type=int, default=1024, help="units per hidden layer (default 1024)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--steps", type=int, default=10, help="training steps per block (default 10)")
    p.add_argument("--rounds", type=int, default=15, help="rounds; medians are reported (default 15)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    net = f"{args.layers}x{args.hidden} mlp (BN, leaky ReLU, dropout 0.1)"
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {net}, Adam, "
          f"{args.steps} steps × {args.rounds} rounds, freed memory kept: {kept}")  # fmt: skip
    print(f"{'variant':<14}{'samples/s':>12}{'vs plain BP':>13}{'IQR':>16}")
    rates, ratios = run(args)
    for name in rates:
        q1, ratio, q3 = statistics.quantiles(ratios[name], n=4)
        print(f"{name:<14}{statistics.median(rates[name]):>12,.0f}{ratio:>12.3f}×   {q1:.3f}–{q3:.3f}")


if __name__ == "__main__":
    main()
