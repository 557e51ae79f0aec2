"""Training speed of every rule on the character-level GPT of nanoGPT's CPU recipe (4 layers,
4 heads, 128 wide, context 64, batch 12, no biases, vocabulary 65), in tokens (characters)
per second, against a plain PyTorch loop of the same model (feedalign's GPT as built
for back-prop: an ordinary nn.Module, no hook or custom Function, trained by autograd).
The row `bp` is a copy put through `feedalign.convert(model, "bp")`: the same
computation, so its ratio shows the noise of the measurement.

    python bench/lm_throughput.py --rounds 25 --steps 5 --clock cpu   # every rule of feedalign.RULES
    python bench/lm_throughput.py --rules bp dfa --rounds 41 --clock cpu   # bp, dfa and dfa micro only

Every variant runs the recipe's step: forward, cross-entropy over every position,
backward (by the rule), gradient clipping at 1.0, AdamW (β = 0.9, 0.99; decay 0.1 on
≥ 2-D weights). All start from the same initial weights. Each round times `--steps` steps
of every variant in turn, in a rotating order (bench/throughput.py's rotation: load
drifts hit all alike); the figures are medians over rounds of tokens per second
(wall-clock, or with `--clock cpu` per second of this process's CPU time: on a shared
machine, one thread, the time other processes hold the core is not counted) and of the
ratio to plain PyTorch in the same round, with that ratio's interquartile range.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from throughput import rotation  # bench/ is the script's folder
from torch import nn

import feedalign
from feedalign.models import build_model
from feedalign.train.memory import keep_freed_memory
from feedalign.train.optim import decay_groups

VOCAB, CONTEXT, BATCH = 65, 64, 12


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(decay_groups(list(model.parameters()), 0.1), lr=1e-3, betas=(0.9, 0.99))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)  # (B, T, V)
        F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def variants(rules: list[str]) -> list[tuple[str, str, str]]:
    """(label, rule, taps): each rule; dfa and drtp also with taps="micro"."""
    out = [(r, r, "macro") for r in rules]
    out += [(f"{r} micro", r, "micro") for r in rules if r in ("dfa", "drtp")]
    return out


def recipe_gpt() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The recipe's GPT as built for back-prop (seed 0) and one batch (x, y), each (B, T) ids."""
    gpt = dict(num_layers=4, num_hidden=128, heads=4, bias=False, criterion="bce", seed=0)  # bce: logits
    plain = build_model("gpt", (CONTEXT,), VOCAB, rule="bp", **gpt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=gen)
    y = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=gen)
    return plain, x, y


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    plain, x, y = recipe_gpt()
    steps = {"plain PyTorch": make_step(plain, x, y)}
    for label, rule, taps in variants(args.rules):
        # example: a batch run once at conversion (the local rules size their heads by it)
        model = feedalign.convert(copy.deepcopy(plain), rule, seed=0, taps=taps, example=x)
        steps[label] = make_step(model, x, y)
    for step in steps.values():
        for _ in range(args.warmup):  # sizes the taps, runs the first-forward checks
            step()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rates: dict[str, list[float]] = {k: [] for k in steps}
    ratios: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        this_round = {}
        for name in rotation(list(steps), r):
            t0 = clock()
            for _ in range(args.steps):
                steps[name]()
            this_round[name] = args.steps * BATCH * CONTEXT / (clock() - t0)
        for name, rate in this_round.items():
            rates[name].append(rate)
            ratios[name].append(rate / this_round["plain PyTorch"])
    return rates, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    rules = list(feedalign.RULES)  # bp too: feedalign's bp is the converted model, plain PyTorch is not
    p.add_argument("--rules", nargs="+", default=rules, choices=rules, metavar="RULE",
                   help=f"rules beside plain PyTorch (default: all: {' '.join(rules)})")  # fmt: skip
    p.add_argument("--steps", type=int, default=5, help="training steps per variant per round (default 5)")
    p.add_argument("--rounds", type=int, default=11, help="rounds; medians are reported (default 11)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as the suite's runs)"
    )
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (default wall)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    print(f"torch {torch.__version__}, feedalign from {Path(feedalign.__file__).parent}, {args.threads} "
          f"thread(s), {args.steps} steps × {args.rounds} rounds (interleaved, rotating), batch {BATCH} × "
          f"{CONTEXT} tokens, clipping and AdamW included, freed memory kept: {kept}, "
          f"{args.clock} clock\n")  # fmt: skip
    rates, ratios = run(args)
    print("| variant | tokens/s | vs plain PyTorch | IQR of the ratio |")
    print("|---|---:|---:|---|")
    for name in rates:
        q1, ratio, q3 = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else ratios[name] * 3
        print(
            f"| {name} | {statistics.median(rates[name]):.0f} | {ratio:.3f}× | {q1:.3f}–{q3:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
