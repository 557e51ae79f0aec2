"""Time to fit ZCA whitening on CIFAR-10's 50,000 × 3,072 training set (docs/original.md §5),
and to reuse the cached constants.

    python bench/zca_time.py --datapath DATA
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from feedalign.data import load_dataset
from feedalign.preprocess import fit_zca, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datapath", default="./Datasets/", help="folder with Cifar10/ (default ./Datasets/)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_dataset("Cifar10", args.datapath)
    t0 = time.perf_counter()
    fit_zca(train.images.float())
    fit = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        prepare(train.images, test.images, dataset="Cifar10", validate=False, whiten=True, cache_dir=cache)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(train.images, test.images, dataset="Cifar10", validate=False, whiten=True, cache_dir=cache)
        cached = time.perf_counter() - t0
    print(f"CIFAR-10 ZCA, {args.threads} threads: fit {fit:.1f} s; prepare (fit + apply to train and test) "
          f"{first:.1f} s; prepare again from the cache {cached:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
