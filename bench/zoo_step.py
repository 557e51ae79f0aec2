"""Speed of one training step (forward, loss, backward, AdamW step) on two zoo-shaped
models: plain back-prop (the model as built, never converted) against feedalign's
rules on the same initial weights.

    python bench/zoo_step.py                       # llama and resnet18; bp, fa, dfa
    python bench/zoo_step.py --models resnet18 --rules fa dfa kp --rounds 15 --steps 5

llama     Hugging Face LlamaForCausalLM: hidden 256, 4 layers, 4 heads, intermediate
          688, vocab 512; batch 8 × 128 tokens, cross-entropy on every position.
resnet18  torchvision.models.resnet18 (10 classes) where torchvision imports, else the
          same layout from bench/resnet_step.py (BasicBlock × [2, 2, 2, 2], 64–512 channels);
          batch 16 of 3×64×64 images.

Each round times `--steps` steps of every variant in turn, in a rotating order (load
drifts hit all alike); the figures are medians over rounds of steps per second and of
the ratio to plain bp in the same round, with that ratio's interquartile range
(bench/throughput.py's method). Freed memory is kept in the process, as `feedalign
train` does on the CPU, unless --malloc default.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from resnet_step import ResNet18  # torchvision's layout, written out (bench/ is the script's folder)
from throughput import interleaved
from torch import Tensor, nn

import feedalign
from feedalign.train.memory import keep_freed_memory

Task = tuple[nn.Module, Tensor, Tensor, Callable[[nn.Module, Tensor, Tensor], Tensor], str]


def llama() -> Task:
    tf = importlib.import_module("transformers")
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    ids = torch.randint(0, 512, (8, 128))

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(input_ids=x).logits  # (N, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return tf.LlamaForCausalLM(config), ids, torch.randint(0, 512, (8, 128)), loss, "LlamaForCausalLM"


def resnet18() -> Task:
    try:
        model, source = importlib.import_module("torchvision.models").resnet18(num_classes=10), "torchvision"
    except ImportError:
        model, source = ResNet18(10), "bench/resnet_step.py, torchvision's layout"

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    return model, torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,)), loss, f"resnet18 ({source})"


TASKS = {"llama": llama, "resnet18": resnet18}


def make_step(model: nn.Module, x: Tensor, y: Tensor, loss: Callable) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # after convert: kp's B are parameters too

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(model, x, y).backward()
        opt.step()

    return step


def run(task: str, rules: list[str], args: argparse.Namespace) -> tuple[str, dict, dict, dict]:
    """label, {variant: steps/s per round}, {variant: ratio to plain bp per round},
    {rule: why it did not run (refused or crashed at convert or its first steps)}."""
    torch.manual_seed(0)
    model, x, y, loss, label = TASKS[task]()
    model.train()
    steps, failed = {"plain bp": make_step(model, x, y, loss)}, {}
    for name in ["plain bp", *rules]:
        try:
            if name != "plain bp":
                steps[name] = make_step(feedalign.convert(copy.deepcopy(model), name, seed=0), x, y, loss)
            for _ in range(args.warmup):  # sizes the taps, runs the first-forward checks
                steps[name]()
        except Exception as e:  # a rule that fails on this model is reported, not timed
            if name == "plain bp":
                raise
            failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
            steps.pop(name, None)
    rates, ratios = interleaved(steps, args.rounds, args.steps, 1.0, "plain bp")
    return label, rates, ratios, failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        choices=tuple(TASKS),
        default=list(TASKS),
        help="models to time (default llama resnet18)",
    )
    p.add_argument(
        "--rules",
        nargs="+",
        default=["fa", "dfa"],
        metavar="RULE",
        choices=[r for r in feedalign.RULES if r != "bp"],
        help="rules beside plain bp (default fa dfa)",
    )
    p.add_argument("--steps", type=int, default=5, help="training steps per variant per round (default 5)")
    p.add_argument("--rounds", type=int, default=11, help="rounds; medians are reported (default 11)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep freed memory in the process as the trainer does (default), or glibc's default",
    )
    args = p.parse_args()  # fmt: skip
    torch.set_num_threads(args.threads)
    kept = args.malloc == "keep" and keep_freed_memory()
    print(f"torch {torch.__version__}, feedalign from {Path(feedalign.__file__).parent}, {args.threads} "
          f"threads, {args.steps} steps × {args.rounds} rounds (interleaved, rotating), AdamW step included, "
          f"freed memory kept: {kept}\n")  # fmt: skip
    print("| model | variant | steps/s | vs plain bp | IQR of the ratio |")
    print("|---|---|---:|---:|---|")
    for task in args.models:
        try:
            label, rates, ratios, failed = run(task, args.rules, args)
        except ImportError as e:
            print(f"| {task} | left out: {e} | | | |")
            continue
        for name in rates:
            rate = statistics.median(rates[name])
            q1, ratio, q3 = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else [1.0] * 3
            print(f"| {label} | {name} | {rate:.2f} | {ratio:.3f}× | {q1:.3f}–{q3:.3f} |", flush=True)
        for name, why in failed.items():
            print(f"| {label} | {name} | failed: {why[:100]} | | |", flush=True)


if __name__ == "__main__":
    main()
