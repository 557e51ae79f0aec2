"""Where a direct rule's step on nanoGPT's CPU GPT spends its arithmetic, against plain
PyTorch back-prop of the same model (bench/lm_throughput.py's model, batch and step):

    python bench/lm_step_profile.py --rounds 10              # dfa and dfa micro
    python bench/lm_step_profile.py --rule drtp --rounds 10

Prints, per variant, the matrix-product FLOPs of one step (torch.utils.flop_counter); the
self time of every matrix product by operand shapes (torch.profiler, per step, median
over `--rounds` interleaved rounds of `--steps` steps): a product that only one variant
runs is what its rule adds or removes; and, timed alone on this process's CPU clock, the
rule's projection e·B against the product of back-prop's it replaces and the model's
largest product (GFLOP/s: whether the projection runs at the speed of the others).
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time

import torch
from lm_throughput import BATCH, CONTEXT, VOCAB, make_step, recipe_gpt  # bench/ is the script's folder
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
    columns = {}  # Σ n_i: the columns of B, per placement of the taps
    for taps in ("macro", "micro"):
        model = feedalign.convert(copy.deepcopy(plain), args.rule, seed=0, taps=taps)
        steps[f"{args.rule} {taps}"] = make_step(model, x, y)
        steps[f"{args.rule} {taps}"]()  # draws B
        columns[taps] = sum(b.shape[1] for b in feedalign.feedback(model))
    for name, step in steps.items():
        step()  # sizes the taps
        with FlopCounterMode(display=False) as flops:
            step()
        print(f"{name}: {flops.get_total_flops() / 1e6:,.1f} MFLOP of matrix products per step")
    rounds: dict[str, list[collections.Counter]] = {name: [] for name in steps}
    calls: dict[str, collections.Counter] = {}
    for _ in range(args.rounds):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.steps):
                    step()
            seconds, calls[name] = collections.Counter(), collections.Counter()
            for event in prof.key_averages(group_by_input_shape=True):
                if event.key in PRODUCTS:
                    shape = " · ".join("×".join(map(str, s)) for s in event.input_shapes if s)
                    seconds[shape] += event.self_cpu_time_total / args.steps
                    calls[name][shape] += event.count // args.steps
            rounds[name].append(seconds)
    shapes = sorted(set().union(*calls.values()), key=lambda k: -max(calls[v][k] for v in steps))
    median = {v: {k: statistics.median(r[k] for r in rounds[v]) for k in shapes} for v in steps}
    print(f"\nself time of the matrix products per step, µs (calls per step), median of {args.rounds}:\n")
    print("| operands | " + " | ".join(steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for shape in sorted(shapes, key=lambda k: -max(median[v][k] for v in steps)):
        cells = [f"{median[v][shape]:,.0f} ({calls[v][shape]})" for v in steps]
        print(f"| {shape} | " + " | ".join(cells) + " |")
    totals = [statistics.median(sum(r.values()) for r in rounds[v]) for v in steps]
    print("| total | " + " | ".join(f"{t:,.0f}" for t in totals) + " |")
    width, m = plain.wte.weight.shape[1], BATCH * CONTEXT
    alone = {
        f"e·B, {args.rule} macro's projection": (m, VOCAB, columns["macro"]),
        f"e·B, {args.rule} micro's projection": (m, VOCAB, columns["micro"]),
        "e·W_head, back-prop's head input gradient": (m, VOCAB, width),
        "the MLP's first product": (m, width, 4 * width),
    }
    print("\nalone, process CPU time, median of 21 × 20 calls:\n")
    for label, (m, k, n) in alone.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        times = []
        for _ in range(21):
            t0 = time.process_time()
            for _ in range(20):
                a @ b
            times.append((time.process_time() - t0) / 20)
        t = statistics.median(times)
        rate = 2 * m * k * n / t / 1e9
        print(f"- {label}: ({m} × {k}) · ({k} × {n}): {t * 1e6:,.0f} µs, {rate:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
