"""Cost of the alignment diagnostics (`-alignment N`) relative to a training step.

    python bench/alignment_cost.py                     # MNIST 2×800 tanh mlp, batch 64, fa and dfa
    python bench/alignment_cost.py --rounds 9 --steps 100 --threads 2

Each round times `--steps` training steps (forward, bce, backward, RMSprop step)
and `--steps` calls of `feedalign.alignment` on the same batches, interleaved so
that load drifts hit both alike. Reported: median milliseconds per step and per
call over rounds, their ratio, and the training-time overhead of logging
alignment every N steps, which is ratio / N.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

import feedalign

log = logging.getLogger("bench")


def timed(fn, batches) -> float:
    """Milliseconds per call of fn(x, y), averaged over the batches."""
    t0 = time.perf_counter()
    for x, y in batches:
        fn(x, y)
    return 1000 * (time.perf_counter() - t0) / len(batches)


def measure(rule: str, args: argparse.Namespace) -> tuple[float, float]:
    """(median ms per training step, median ms per alignment call)."""
    torch.manual_seed(0)
    model = feedalign.build_model("mlp", (1, 28, 28), 10, rule=rule, nonlin="tanh", seed=0)
    criterion = feedalign.BCE()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.99, eps=1e-8)
    data = torch.rand(args.batch * args.steps, 1, 28, 28)
    labels = torch.randint(0, 10, (len(data),))
    batches = list(zip(data.split(args.batch), labels.split(args.batch)))

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        opt.step()

    def align(x, y):
        feedalign.alignment(model, x, y, criterion)

    timed(step, batches[:10])  # warm-up; also moves the weights off zero (bp angles are nan at 0)
    timed(align, batches[:3])
    steps, aligns = [], []
    for _ in range(args.rounds):
        steps.append(timed(step, batches))
        aligns.append(timed(align, batches))
    return statistics.median(steps), statistics.median(aligns)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", nargs="+", default=["fa", "dfa"], choices=feedalign.RULES)
    p.add_argument("--batch", type=int, default=64, help="samples per batch (default 64, the paper's)")
    p.add_argument("--steps", type=int, default=50, help="steps (and alignment calls) per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--every", type=int, nargs="+", default=[1, 10, 100], help="alignment intervals N")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    log.info(f"mlp 2x800 tanh, MNIST shape, batch {args.batch}, {args.threads} thread(s), "
             f"median of {args.rounds} rounds × {args.steps}")  # fmt: skip
    for rule in args.rules:
        step_ms, align_ms = measure(rule, args)
        ratio = align_ms / step_ms
        overhead = ", ".join(f"every {n}: +{100 * ratio / n:.1f}%" for n in args.every)
        log.info(f"{rule:>4}: step {step_ms:.2f} ms, alignment call {align_ms:.2f} ms "
                 f"(= {ratio:.2f} steps); training-time overhead {overhead}")  # fmt: skip


if __name__ == "__main__":
    main()
