"""The per-layer rules' own cost: one model, its steps timed under its rule and under
`feedalign.backprop` (the same weights, the same values, autograd's own ops).

    python bench/fa_overhead.py                    # the paper's 2×800 tanh mlp under fa
    python bench/fa_overhead.py --rule kp --layers 4 --rounds 60

bench/throughput.py compares each rule with a separately built plain network, whose
weights (random, where fa and dfa start from zero as the original did) and so whose
activations and optimizer state differ; here the only difference between the two
timings is the rule's backward: B in place of Wᵀ, through feedalign's autograd
Functions. Each round times `--steps` training steps (forward, bce, backward, RMSprop)
of each, alternating which goes first; the figure is the median over rounds of
(steps/s under the rule) / (steps/s under back-prop), with its interquartile range.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import feedalign
from feedalign.train.memory import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", default="fa", choices=("fa", "usf", "frsf", "brsf", "kp"), help="default fa")
    p.add_argument("--layers", type=int, default=2, help="hidden layers of 800 tanh units (default 2)")
    p.add_argument("--rounds", type=int, default=40, help="rounds (default 40)")
    p.add_argument("--steps", type=int, default=25, help="steps of batch 64 per round and mode (default 25)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    model = feedalign.build_model("mlp", (1, 28, 28), 10, rule=args.rule, nonlin="tanh",
                                  num_layers=args.layers, num_hidden=800, seed=0)  # fmt: skip
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.99, eps=1e-8)
    criterion = feedalign.BCE()
    batches = list(zip(torch.rand(64 * args.steps, 1, 28, 28).split(64),
                       torch.randint(0, 10, (64 * args.steps,)).split(64)))  # fmt: skip

    def timed(rule: bool) -> float:
        """Seconds for one round of steps, under the rule or under back-prop."""
        t0 = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            if rule:
                criterion(model(x), y).backward()
            else:
                with feedalign.backprop(model):
                    criterion(model(x), y).backward()
            opt.step()
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        timed(True), timed(False)
    ratios = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 else (False, True)
        seconds = dict(zip(order, (timed(order[0]), timed(order[1]))))
        ratios.append(seconds[False] / seconds[True])  # speed under the rule / under back-prop
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.layers}x800 tanh mlp, batch 64, "
          f"{args.steps} steps × {args.rounds} rounds")  # fmt: skip
    print(
        f"{args.rule} / back-prop on the same model: {statistics.median(ratios):.3f}× (IQR {q1:.3f}–{q3:.3f})"
    )


if __name__ == "__main__":
    main()
