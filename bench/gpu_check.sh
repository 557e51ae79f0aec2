#!/usr/bin/env bash
# The CUDA path in one prepared run: GPU tests, then epoch times of the paper's
# CIFAR-10 conv net (bp, fa, dfa; whitened) and of the MNIST 2×800 mlp, on one GPU.
#   DATAPATH=DATA bash bench/gpu_check.sh [OUTDIR]
# Needs a CUDA build of torch and the datasets under $DATAPATH (MNIST/, Cifar10/).
set -euo pipefail
DATAPATH=${DATAPATH:-./Datasets}
OUT=${1:-${OUT:-/tmp/feedalign-gpu}}
mkdir -p "$OUT"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.cuda.get_device_name(0))
PY
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.txt"
python -m pytest -q tests/test_rules.py tests/test_models.py 2>&1 | tail -1 | tee -a "$OUT/gpu-tests.txt"
for rule in bp fa dfa; do
  python -m feedalign train -dataset Cifar10 -datapath "$DATAPATH" -network conv -LR 5e-5 -whiten \
    -gradient "$rule" -epoch 2 -type cuda -seed 1 --quiet -preProcDir "$OUT/P" -save "$OUT/cifar-$rule"
  python -m feedalign train -dataset MNIST -datapath "$DATAPATH" -gradient "$rule" -epoch 2 -type cuda \
    -seed 1 --quiet -preProcDir "$OUT/P" -save "$OUT/mnist-$rule"
done
# the optimizer step as one compiled (Triton) kernel
python -m feedalign train -dataset MNIST -datapath "$DATAPATH" -gradient dfa -epoch 2 -type cuda -seed 1 \
  --compile_optimizer --quiet -preProcDir "$OUT/P" -save "$OUT/mnist-dfa-compiled"
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for run in sorted(out.glob("*-*/metrics.jsonl")):
    rows = [json.loads(x) for x in run.read_text().splitlines()]
    # epoch 1 includes CUDA warm-up; report the second epoch
    r = rows[-1]
    print(f"{run.parent.name:<12} epoch {r['epoch']}: {r['seconds']:.2f} s training, "
          f"test error {100 * r['test_error']:.2f}%")
PY
