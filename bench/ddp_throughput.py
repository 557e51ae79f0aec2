"""One epoch of `feedalign train` in one process against the same epoch split over
N processes with torchrun (gloo on CPU, nccl on GPU), same global batch.

    python bench/ddp_throughput.py --datapath DATA                 # MNIST 2×800 dfa, CPU
    python bench/ddp_throughput.py --datapath DATA --type cuda --nproc 2

Training samples per second come from each run's metrics.jsonl (`seconds` is
the epoch's training time, evaluation excluded), median over --rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def epoch_rate(cmd: list[str], run: Path) -> float:
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (row,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return 60000 / row["seconds"]  # MNIST training images per second


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datapath", default="./Datasets/", help="folder with MNIST/ (default ./Datasets/)")
    p.add_argument("--nproc", type=int, default=2, help="processes for the parallel run (default 2)")
    p.add_argument(
        "--threads", type=int, default=2, help="CPU threads in all, split over processes (default 2)"
    )
    p.add_argument("--type", default="float", help="float | cuda (default float)")
    p.add_argument("--gradient", default="dfa", help="bp | fa | dfa (default dfa)")
    p.add_argument("--batch", type=int, default=64, help="global batch size (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; medians are reported (default 2)")
    args = p.parse_args()
    common = ["-dataset", "MNIST", "-datapath", args.datapath, "-epoch", "1", "-seed", "1"]
    common += ["-type", args.type, "-gradient", args.gradient, "--quiet"]
    per_rank = [
        "-threads",
        str(max(1, args.threads // args.nproc)),
        "-batchSize",
        str(args.batch // args.nproc),
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    single, multi = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one, many = Path(tmp, f"one{r}"), Path(tmp, f"many{r}")
            cmd = [sys.executable, "-m", "feedalign", "train", *common, "-threads", str(args.threads)]
            single.append(epoch_rate([*cmd, "-batchSize", str(args.batch), "-save", str(one)], one))
            cmd = [*torchrun, "-m", "feedalign", "train", *common, *per_rank, "-save", str(many)]
            multi.append(epoch_rate(cmd, many))
    s, m = statistics.median(single), statistics.median(multi)
    print(f"MNIST mlp 2×800 {args.gradient}, global batch {args.batch}, {args.threads} threads in all, "
          f"{args.type}")  # fmt: skip
    print(f"1 process : {s:,.0f} samples/s")
    print(f"{args.nproc} processes: {m:,.0f} samples/s  ({m / s:.2f}×)")


if __name__ == "__main__":
    main()
