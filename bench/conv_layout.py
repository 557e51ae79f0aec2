"""Memory layout of conv networks on the CPU: one training step (forward, loss,
backward, SGD with momentum) with the 4-d weights contiguous (NCHW) against
channels_last, for each rule, next to plain PyTorch autograd of the same LeNet in
both layouts, interleaved in one run (what `-memory_format auto` decides).

    python bench/conv_layout.py                              # LeNet 1×32×32, batch 64
    python bench/conv_layout.py --network conv --shape 3,32,32 --steps 3 --rounds 3
    python bench/conv_layout.py --rules bp fa dfa --threads 1 --rounds 7

Figures: medians over rounds of milliseconds per step (process CPU time with
--clock cpu, else wall clock) and of the channels_last / contiguous ratio.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from feedalign.models import build_model

log = logging.getLogger("bench.conv_layout")


def plain_lenet() -> nn.Module:
    """The same LeNet, written as a PyTorch user would, trained by autograd."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        nn.LogSoftmax(dim=1),
    )  # fmt: skip


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.nll_loss(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default="lenet", help="a feedalign network name (lenet, conv, ...)")
    ap.add_argument("--shape", default="1,32,32", help="input C,H,W")
    ap.add_argument("--rules", nargs="+", default=["bp", "fa", "dfa"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(int(s) for s in args.shape.split(","))
    x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def built(rule: str) -> nn.Module:
        if rule == "plain-bp":
            return plain_lenet()
        return build_model(args.network, shape, 10, rule=rule, nonlin="relu", criterion="ce", seed=1,
                           feedback_init="random")  # fmt: skip

    names = (["plain-bp"] if args.network == "lenet" and shape == (1, 32, 32) else []) + args.rules
    steps = {(n, cl): make_step(built(n), x, y, cl) for n in names for cl in (False, True)}
    ms: dict[tuple[str, bool], list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        keys = list(steps)
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate the order every round
            steps[k]()  # warm-up
            t = clock()
            for _ in range(args.steps):
                steps[k]()
            ms[k].append((clock() - t) / args.steps * 1e3)
    log.info(f"{args.network} {shape}, batch {args.batch}, {args.threads} thread(s), {args.clock} clock, "
             f"{args.rounds} rounds × {args.steps} steps; medians")  # fmt: skip
    log.info("| variant | contiguous ms/step | channels_last ms/step | channels_last / contiguous |")
    log.info("|---|---|---|---|")
    for n in names:
        ratio = statistics.median(b / a for a, b in zip(ms[(n, False)], ms[(n, True)]))
        log.info(f"| {n} | {statistics.median(ms[(n, False)]):.2f} | {statistics.median(ms[(n, True)]):.2f} "
                 f"| {ratio:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
