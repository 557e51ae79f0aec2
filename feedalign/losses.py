"""Losses with docs/original.md §3's gradient semantics.

bce (default): sigmoid on the logits, binary cross-entropy against the one-hot
    target. The reported value is the mean over batch × classes (as the
    original printed it) but the gradient fed back is sigmoid(y) − onehot per
    sample, *summed* over the batch — the gradient of the summed loss. The
    original's RMSprop runs were tuned with this scale, so it is kept.
ce: log-softmax is the model's last layer; NLL averaged over the batch, so the
    error at the logits is (softmax(y) − onehot) / N.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SummedGradBCE(torch.autograd.Function):
    """forward: mean BCE(sigmoid(y), onehot); backward: sigmoid(y) − onehot (N, C), not / N·C."""

    @staticmethod
    def forward(ctx, logits: Tensor, onehot: Tensor) -> Tensor:
        ctx.save_for_backward(logits, onehot)
        return F.binary_cross_entropy_with_logits(logits, onehot)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, onehot = ctx.saved_tensors
        return grad * (torch.sigmoid(logits) - onehot), None


class BCE(nn.Module):
    """Binary cross-entropy on logits vs. class indices; see the module docstring."""

    batch_reduction = "sum"  # the gradient is summed over the batch (data parallelism needs to know)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_target("bce", target)
        with refused_classes("bce", logits.shape[-1]):
            onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        return _SummedGradBCE.apply(logits, onehot)


class NLL(nn.NLLLoss):
    """nn.NLLLoss on log-probabilities (N, C) vs. class indices (N,); a target that is not
    class indices is a ValueError saying what is allowed (ignore_index, -100, marks a masked row)."""

    def forward(self, log_probs: Tensor, target: Tensor) -> Tensor:
        check_target("ce", target)
        with refused_classes("ce", log_probs.shape[1 if log_probs.dim() > 1 else 0], self.ignore_index):
            return super().forward(log_probs, target)


def check_target(loss: str, target: Tensor) -> None:
    """The target's type, checked without reading the device: class indices as int64."""
    if not isinstance(target, Tensor) or target.dtype != torch.long:
        found = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{loss}: the target must be class indices, an int64 (torch.long) tensor with one "
                         f"entry per output row; got {found}")  # fmt: skip


@contextlib.contextmanager
def refused_classes(loss: str, n_classes: int, ignore_index: int | None = None) -> Iterator[None]:
    """torch's own range check (on the CPU; a GPU asserts on the device) as a ValueError that
    lists the allowed classes."""
    try:
        yield
    except (IndexError, RuntimeError) as err:
        if not re.search(r"out of bounds|smaller than num_classes|non-negative", str(err)):
            raise
        masked = f", or {ignore_index} (a masked row)" if ignore_index is not None else ""
        raise ValueError(f"{loss}: a target class lies outside 0..{n_classes - 1}{masked} ({err}); the "
                         f"output has {n_classes} classes") from None  # fmt: skip


class PerPosition(nn.Module):
    """`inner` on outputs (N, *P, C) and targets (N, *P): every position is a row, so the
    mean runs over N·|P| positions (a language model's loss per character)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_reduction = getattr(inner, "batch_reduction", "mean")

    def forward(self, out: Tensor, target: Tensor) -> Tensor:
        return self.inner(out.reshape(-1, out.shape[-1]), target.reshape(-1))


# name -> (loss factory, whether the network ends in LogSoftmax)
CRITERIA = {"bce": (BCE, False), "ce": (NLL, True)}


def make_criterion(name: str, *, per_position: bool = False) -> nn.Module:
    """The loss `name`; per_position: for (N, T, C) outputs, averaged over every position."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    criterion = CRITERIA[name][0]()
    return PerPosition(criterion) if per_position else criterion
