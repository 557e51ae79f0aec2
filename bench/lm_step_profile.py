"""Where a direct rule's step on nanoGPT's CPU GPT spends its arithmetic, against plain
PyTorch back-prop of the same model (bench/lm_throughput.py's model, batch and step):

    python bench/lm_step_profile.py --rounds 10              # dfa and dfa micro
    python bench/lm_step_profile.py --rule drtp --rounds 10

Prints, per variant, the matrix-product FLOPs of one step (torch.utils.flop_counter) and
the self time of every matrix product by operand shapes (torch.profiler, `--rounds`
interleaved rounds of `--steps` steps each, per step): a product that only one variant
runs is what its rule adds or removes.
"""

from __future__ import annotations

import argparse
import collections
import copy

import torch
from lm_throughput import make_step, recipe_gpt  # bench/ is the script's folder
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import feedalign
from feedalign.train.memory import keep_freed_memory

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    direct = [r for r, spec in feedalign.RULES.items() if spec.kind == "direct"]
    p.add_argument("--rule", default="dfa", choices=direct, help="a direct rule (default dfa)")
    p.add_argument("--rounds", type=int, default=10, help="profiled rounds (default 10)")
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round (default 2)")
    args = p.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    plain, x, y = recipe_gpt()
    steps = {"plain PyTorch": make_step(plain, x, y)}
    for taps in ("macro", "micro"):
        model = feedalign.convert(copy.deepcopy(plain), args.rule, seed=0, taps=taps)
        steps[f"{args.rule} {taps}"] = make_step(model, x, y)
    for name, step in steps.items():
        step()  # sizes the taps
        with FlopCounterMode(display=False) as flops:
            step()
        print(f"{name}: {flops.get_total_flops() / 1e6:,.1f} MFLOP of matrix products per step")
    seconds = {name: collections.Counter() for name in steps}
    calls = {name: collections.Counter() for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.steps):
                    step()
            for event in prof.key_averages(group_by_input_shape=True):
                if event.key in PRODUCTS:
                    shape = " · ".join("×".join(map(str, s)) for s in event.input_shapes if s)
                    seconds[name][shape] += event.self_cpu_time_total
                    calls[name][shape] += event.count
    n = args.rounds * args.steps
    shapes = sorted(set().union(*seconds.values()), key=lambda k: -max(seconds[v][k] for v in steps))
    print(f"\nself time of the matrix products per step, µs (calls per step), {args.rounds} rounds:\n")
    print("| operands | " + " | ".join(steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for shape in shapes:
        cells = [f"{seconds[v][shape] / n:,.0f} ({calls[v][shape] // n})" for v in steps]
        print(f"| {shape} | " + " | ".join(cells) + " |")
    print("| total | " + " | ".join(f"{sum(seconds[v].values()) / n:,.0f}" for v in steps) + " |")


if __name__ == "__main__":
    main()
