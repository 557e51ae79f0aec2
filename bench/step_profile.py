"""Where a training step's time goes: matrix products against everything else,
for plain PyTorch BP and feedalign's rules, measured inside the training loop.

    python bench/step_profile.py                 # 2×800 and 4×800, full step (RMSprop)
    python bench/step_profile.py --no-step       # forward + backward only
    python bench/step_profile.py --compile       # the RMSprop step torch.compile'd

Each round runs every variant in turn (rotating order): the wall-clock time of
`--steps` steps, then the self time of the matrix products (aten::mm,
aten::addmm: forward, weight and input gradients, dfa's e·B) under
torch.profiler over as many steps; "other" is the rest of the step (elementwise
operators, optimizer, Python, autograd). Medians over rounds; the ratios are
medians of the per-round ratios to plain BP. "GEMM ratio" is plain
BP's product time over the variant's: the most dfa could gain on this machine
if everything else cost nothing, with the products as fast as they run in the
loop (not in isolation, where their operands stay in cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from throughput import make_step, rotation, variants  # noqa: E402

from feedalign.train.memory import keep_freed_memory  # noqa: E402

GEMMS = ("aten::mm", "aten::addmm")


def block(step, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """(wall µs per step, µs per step in matrix products) over `steps` steps: the wall
    time without the profiler, then the products' self time under it."""
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    wall = (time.perf_counter() - t0) / steps * 1e6
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(x, y)
    return wall, sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMMS) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="hidden layers (default 2 4)")
    p.add_argument("--steps", type=int, default=20, help="steps per variant and round (default 20)")
    p.add_argument("--rounds", type=int, default=20, help="rounds; medians are reported (default 20)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-step", action="store_true", help="forward + backward only, no optimizer step")
    p.add_argument("--compile", action="store_true", help="torch.compile the RMSprop step of every variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    what = "forward + backward" if args.no_step else "full step"
    print(f"torch {torch.__version__}, {args.threads} threads, batch 64, {args.steps} steps × "
          f"{args.rounds} rounds, {what}, compiled optimizer: {args.compile}")  # fmt: skip
    print(f"{'network':<9}{'variant':<10}{'step µs':>9}{'GEMM µs':>9}{'other µs':>10}{'GEMM share':>12}"
          f"{'GEMM ratio':>12}{'step ratio':>12}")  # fmt: skip
    for layers in args.layers:
        full = not args.no_step
        steps = {name: make_step(m, c, 1e-4, full, args.compile) for name, (m, c) in variants(layers).items()}
        for step in steps.values():  # warm-up (and compilation)
            for _ in range(30):
                step(x, y)
        walls: dict[str, list[float]] = {k: [] for k in steps}
        gemms: dict[str, list[float]] = {k: [] for k in steps}
        ratios: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
        names = list(steps)
        for r in range(args.rounds):
            this = {n: block(steps[n], x, y, args.steps) for n in rotation(names, r)}
            w0, g0 = this["plain-bp"]
            for n, (w, g) in this.items():
                walls[n].append(w)
                gemms[n].append(g)
                ratios[n].append((g0 / g, w0 / w))
        med = statistics.median
        for n in names:
            w, g = med(walls[n]), med(gemms[n])
            g_ratio, w_ratio = med(r[0] for r in ratios[n]), med(r[1] for r in ratios[n])
            print(f"{layers}x800    {n:<10}{w:>9.0f}{g:>9.0f}{w - g:>10.0f}{g / w:>11.0%}"
                  f"{g_ratio:>11.3f}×{w_ratio:>11.3f}×")  # fmt: skip


if __name__ == "__main__":
    main()
