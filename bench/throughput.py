"""Training throughput of feedalign's rules (every rule of `feedalign.RULES`)
against a plain PyTorch autograd back-prop loop of the same network, measured in
the same run.

    python bench/throughput.py                 # 2×800 and 4×800 tanh MLP, MNIST shape
    python bench/throughput.py --layers 2 --rules fa usf frsf brsf kp   # a subset
    python bench/throughput.py --compile all   # every variant with a torch.compile'd RMSprop step
    python bench/throughput.py --compile feedalign  # feedalign's --compile_optimizer vs the plain loop
    python bench/throughput.py --layers 2 --rounds 9 --steps 300

Each round times `--steps` training steps (forward, loss, backward, RMSprop
step) of every variant in turn, in a rotating order (interleaved in short
blocks, so drifts in machine load hit all of them alike); the figures are the
medians over rounds of samples per second (wall-clock, or with `--clock cpu` per
second of this process's CPU time) and of the ratio to plain PyTorch BP
in the same round, with the interquartile range of that ratio, and the median
ratio to fa in the same round (where fa is measured).

The process keeps freed memory (`feedalign.train.memory.keep_freed_memory`, as
`feedalign train` does on the CPU) unless `--malloc default`; it applies to every
variant alike, plain PyTorch included.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import feedalign
from feedalign.train.memory import keep_freed_memory


def plain_bp_model(layers: int, hidden: int, n_in: int = 784, n_out: int = 10) -> nn.Module:
    """The same network, written the way a PyTorch user would, trained by autograd."""
    mods: list[nn.Module] = [nn.Flatten()]
    width = n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


def make_step(
    model: nn.Module, criterion: nn.Module, lr: float, optimizer_step: bool = True, compiled: bool = False
):
    """A training step; without `optimizer_step` only forward + backward (the rule's own cost).
    `compiled`: the RMSprop step as one torch.compile'd kernel (LR in a tensor: no recompiles)."""
    opt = torch.optim.RMSprop(
        model.parameters(), lr=torch.tensor(lr) if compiled else lr, alpha=0.99, eps=1e-8
    )
    opt_step = torch.compile(opt.step) if compiled else opt.step

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        if optimizer_step:
            opt_step()

    return step


class PlainBCE(nn.Module):
    """bce with the original's gradient scale (summed over the batch), stock PyTorch ops."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="sum")


def variants(
    layers: int, hidden: int = 800, nonlin: str = "tanh", rules: tuple[str, ...] = ("bp", "fa", "dfa")
) -> dict[str, tuple[nn.Module, nn.Module]]:
    """{name: (model, criterion)}: plain PyTorch BP, then feedalign's `rules`, on the
    same 784-(hidden × layers)-10 MLP."""
    out: dict[str, tuple[nn.Module, nn.Module]] = {"plain-bp": (plain_bp_model(layers, hidden), PlainBCE())}
    for rule in rules:
        # build_model's init: with tanh, fa and dfa start from zero weights as the original
        # (docs/original.md §1); the other rules, and every rule under --nonlin relu, from random ones
        model = feedalign.build_model("mlp", (1, 28, 28), 10, rule=rule, nonlin=nonlin, num_layers=layers,
                                      num_hidden=hidden, seed=0)  # fmt: skip
        out[rule] = (model, feedalign.BCE())
    return out


def rotation(names: list[str], r: int) -> list[str]:
    """Round r's order: rotated by r, so that load drifts hit every variant alike."""
    return names[r % len(names) :] + names[: r % len(names)]


def interleaved(
    steps: dict[str, Callable[[], None]], rounds: int, calls: int, per_call: float, reference: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each round runs every variant's `steps[name]()` `calls` times in rotation order;
    returns {name: units per second per round} (per_call units each call) and {name:
    its ratio to `reference` in the same round}."""
    rates: dict[str, list[float]] = {k: [] for k in steps}
    ratios: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        this_round = {}
        for name in rotation(list(steps), r):
            t0 = time.perf_counter()
            for _ in range(calls):
                steps[name]()
            this_round[name] = calls * per_call / (time.perf_counter() - t0)
        for name, rate in this_round.items():
            rates[name].append(rate)
            ratios[name].append(rate / this_round[reference])
    return rates, ratios


def run(layers: int, args: argparse.Namespace) -> dict[str, list[float]]:
    torch.manual_seed(0)
    n = args.batch * args.steps
    data = torch.rand(n, 1, 28, 28)
    labels = torch.randint(0, 10, (n,))
    batches = list(zip(data.split(args.batch), labels.split(args.batch)))
    full = not args.no_step
    ours = tuple(args.rules)
    compiled = {"none": (), "all": ("plain-bp", *ours), "feedalign": ours}[args.compile]
    steps = {
        name: make_step(model, criterion, args.lr, full, name in compiled)
        for name, (model, criterion) in variants(layers, args.hidden, args.nonlin, ours).items()
    }
    for step in steps.values():  # warm-up
        for x, y in batches[:20]:
            step(x, y)
    rates: dict[str, list[float]] = {k: [] for k in steps}
    ratios: dict[str, list[float]] = {k: [] for k in steps}
    vs_fa: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for r in range(args.rounds):
        this_round = {}
        for name in rotation(names, r):
            step = steps[name]
            t0 = clock()
            for x, y in batches:
                step(x, y)
            this_round[name] = n / (clock() - t0)
        for name, rate in this_round.items():
            rates[name].append(rate)
            ratios[name].append(rate / this_round["plain-bp"])
            if "fa" in this_round:
                vs_fa[name].append(rate / this_round["fa"])
    return {"rates": rates, "ratios": ratios, "vs_fa": vs_fa}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="hidden layers (default 2 4)")
    p.add_argument("--hidden", type=int, default=800, help="units per hidden layer (default 800)")
    p.add_argument("--nonlin", default="tanh", help="tanh | sigm | relu (default tanh)")
    p.add_argument(
        "--rules",
        nargs="+",
        choices=tuple(feedalign.RULES),
        default=list(feedalign.RULES),
        metavar="RULE",
        help=f"rules to time (default all: {' '.join(feedalign.RULES)})",
    )
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--steps", type=int, default=25, help="training steps per block (default 25)")
    p.add_argument("--rounds", type=int, default=40, help="rounds; medians are reported (default 40)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="RMSprop learning rate (default 1e-4)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default) or cpu: this process's CPU time, less sensitive to other "
                   "tenants on a shared machine (use with --threads 1)")  # fmt: skip
    p.add_argument("--no-step", action="store_true", help="time forward + backward only, no optimizer step")
    p.add_argument(
        "--compile",
        choices=("none", "all", "feedalign"),
        default="none",
        help="torch.compile the RMSprop step: none (default), all (every variant, plain "
        "included: the rules' own gain), feedalign (feedalign's variants only: "
        "`feedalign train --compile_optimizer` against the plain loop)",
    )
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep freed memory in the process as the trainer does (default), or glibc's default",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = args.malloc == "keep" and keep_freed_memory()
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
        f"{args.steps} steps × {args.rounds} rounds, {args.nonlin}, "
        f"{'forward + backward only' if args.no_step else 'full training step (RMSprop)'}, "
        f"optimizer compiled: {args.compile}, freed memory kept: {kept}, {args.clock} clock"
    )
    print(f"{'network':<14}{'variant':<10}{'samples/s':>12}{'vs plain BP':>13}{'IQR':>16}{'vs fa':>9}")
    for layers in args.layers:
        res = run(layers, args)
        for name in res["rates"]:
            rate = statistics.median(res["rates"][name])
            q1, ratio, q3 = statistics.quantiles(res["ratios"][name], n=4)
            net = f"{layers}x{args.hidden}"
            fa = f"{statistics.median(res['vs_fa'][name]):8.3f}×" if res["vs_fa"][name] else ""
            print(f"{net:<14}{name:<10}{rate:>12,.0f}{ratio:>12.3f}×   {q1:.3f}–{q3:.3f}{fa:>9}")


if __name__ == "__main__":
    main()
