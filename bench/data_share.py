"""The data path's share of a training epoch: batching (shuffle + index) and, with
--augment, augmentation, against the whole epoch of the paper's dfa MNIST mlp.

    python bench/data_share.py --datapath DATA            # MNIST, 2×800 dfa
    python bench/data_share.py --datapath DATA --dataset Cifar10 --network conv --augment

Times one full epoch of the loader alone (every batch produced, nothing trained),
then one epoch of training over the same loader; medians over --rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from feedalign.data import EpochLoader
from feedalign.losses import make_criterion
from feedalign.train.config import Options
from feedalign.train.loop import EpochState, StopFlag, TrainingStep, train_epoch
from feedalign.train.optim import Optimizer, Schedule
from feedalign.train.session import load_data, make_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--datapath", default="./Datasets/", help="folder holding <dataset>/ (default ./Datasets/)"
    )
    p.add_argument("--dataset", default="MNIST", help="dataset (default MNIST)")
    p.add_argument("--network", default="mlp", help="mlp | conv (default mlp)")
    p.add_argument("--gradient", default="dfa", help="bp | fa | dfa (default dfa)")
    p.add_argument("--augment", action="store_true", help="augment each batch (docs/original.md §5)")
    p.add_argument("--max-batches", type=int, default=0, help="stop epochs early (0 = full epoch)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    opts = Options(dataset=args.dataset, datapath=args.datapath, network=args.network, gradient=args.gradient,
                   type="float", seed=0, augment=args.augment).check()  # fmt: skip
    data = load_data(opts, torch.device("cpu"))
    x, y = data.train_x, data.train_y
    if args.max_batches:
        x, y = x[: args.max_batches * opts.batchSize], y[: args.max_batches * opts.batchSize]
    model = make_model(opts, data, torch.device("cpu"))
    step = TrainingStep(
        model, make_criterion(opts.criterion), Optimizer(model.parameters(), opts), Schedule(opts.LR, -1, 1)
    )
    loader = EpochLoader(x, y, opts.batchSize, seed=0, augment=args.augment)
    data_s, epoch_s = [], []
    for r in range(args.rounds):
        loader.set_epoch(r + 1)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        data_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train_epoch(step, loader, EpochState(), stop=StopFlag(), progress=False)
        epoch_s.append(time.perf_counter() - t0)
    d, e = statistics.median(data_s), statistics.median(epoch_s)
    print(f"{opts.dataset} {opts.network} {opts.gradient}, {len(loader)} batches of {opts.batchSize}, "
          f"{args.threads} threads, augment={args.augment}")  # fmt: skip
    print(f"data path alone: {d:.3f} s/epoch; training epoch: {e:.2f} s; data share {100 * d / e:.2f}%")


if __name__ == "__main__":
    main()
