"""One epoch of training and one evaluation pass (docs/original.md §4). Rule-agnostic: the
learning rule lives inside the model; this file calls `loss.backward()` and steps.

Host synchronisation: per batch nothing is read back to the host. Errors and
losses accumulate in device tensors; every `SYNC_EVERY` batches (and at the end)
one read serves the progress bar, the divergence check and, under several
processes, the agreement to stop.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from feedalign.rules import backprop
from feedalign.train.optim import MAX_NORM_OFF, Optimizer, Schedule, max_norm_, zero_biases_

SYNC_EVERY = 25  # batches between host reads (progress bar, NaN check, stop agreement)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class StopFlag:
    """Set by SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler sends before SIGKILL):
    the loop stops at the next batch boundary and the run checkpoints. A second
    signal raises KeyboardInterrupt at once. `signum`: the signal that asked."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    SAME_PRESS_S = 1.0  # under torchrun: the same signal again within this is the same Ctrl-C

    def __init__(self) -> None:
        self.requested = False
        self.signum: int = signal.SIGINT
        self._previous: dict[int, object] = {}
        self._at = 0.0
        # torchrun passes the terminal's Ctrl-C on to its workers, which had it from the
        # terminal already: one press, two signals (feedalign's own -nGPU launcher sends one)
        self._echoes = "TORCHELASTIC_RUN_ID" in os.environ

    def _handler(self, signum, frame) -> None:
        if self.requested:
            if self._echoes and signum == self.signum and time.monotonic() - self._at < self.SAME_PRESS_S:
                return
            raise KeyboardInterrupt
        self.requested, self.signum, self._at = True, signum, time.monotonic()

    def __enter__(self) -> StopFlag:
        for sig in self.SIGNALS:
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:  # a shell script's `cmd &` keeps ignoring Ctrl-C
                    continue
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handler, no checkpoint on a signal
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@dataclass
class EpochState:
    """Where an epoch stands: enough to continue it after an interruption."""

    batch: int = 0  # batches completed
    wrong: Tensor | None = None  # misclassified training samples, () float64 on device
    loss_sum: Tensor | None = None  # Σ batch mean loss × batch size, () float64 on device (no overflow)
    seen: int = 0  # training samples so far
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)  # per-epoch sums of diagnostics

    def to_dict(self) -> dict:
        return {"batch": self.batch, "wrong": self.wrong, "loss_sum": self.loss_sum, "seen": self.seen,
                "seconds": self.seconds, "extras": self.extras}  # fmt: skip


def autocast(device: torch.device, amp: torch.dtype | None):
    """--amp: autocast to `amp` on `device`; without it, nothing."""
    return torch.autocast(device.type, dtype=amp) if amp else nullcontext()


@dataclass
class TrainingStep:
    """One training step (forward, backward by the model's rule, optimizer update) and
    the pieces it needs; called once per batch."""

    model: nn.Module
    criterion: nn.Module
    optimizer: Optimizer
    schedule: Schedule
    eps: float = 0.0  # adversarial step size, preprocessed input units
    acc_gradient: bool = False
    max_out: float = MAX_NORM_OFF
    max_in: float = MAX_NORM_OFF
    train_biases: bool = True  # False (-bias 0): biases are held at zero
    amp: torch.dtype | None = None
    clip: float = 0.0  # max global L2 norm of the gradient (0 = off), after the rule's backward

    def _forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, loss); under --amp the forward runs in bf16 and the loss in float32."""
        with autocast(x.device, self.amp):
            out = self.model(x)
            loss = self.criterion(out.float() if self.amp else out, y)
        return out, loss

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One update; returns (logits, loss) of the clean forward pass."""
        if self.max_out < MAX_NORM_OFF or self.max_in < MAX_NORM_OFF:
            max_norm_(self.model, self.max_out, self.max_in)  # before the gradient (docs/original.md §4)
        self.optimizer.zero_grad()
        if self.eps > 0:
            out, loss = self._adversarial(x, y)
        else:
            out, loss = self._forward(x, y)
            loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step(self.schedule.lr)
        if not self.train_biases:
            zero_biases_(self.model)
        return out, loss

    def _adversarial(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Fast gradient sign (docs/original.md §4): the first backward is true back-prop whatever
        the rule, giving dE/dx; its parameter gradients are kept only with accGradient;
        the rule's gradients on x + eps·sign(dE/dx) are added."""
        x = x.detach().requires_grad_(True)
        with backprop(self.model):
            out, loss = self._forward(x, y)
        loss.backward()
        if not self.acc_gradient:
            self.optimizer.zero_grad()
        x_adv = (x + self.eps * x.grad.sign()).detach()  # no clipping, as the original
        self._forward(x_adv, y)[1].backward()
        return out, loss


def train_epoch(step: TrainingStep, loader, state: EpochState, *, stop: StopFlag, progress: bool,
                reduce=None, on_batch=None, desc: str = "") -> EpochState:  # fmt: skip
    """Run the rest of the epoch from `state.batch`. Returns the state; `state.batch <
    len(loader)` means it stopped early on request (Ctrl-C)."""
    device = loader.device
    if state.wrong is None:
        state.wrong = torch.zeros((), device=device, dtype=torch.float64)
        state.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    losses = torch.full((len(loader),), float("nan"), device=device)  # per batch, for the NaN check
    losses[: state.batch] = 0.0
    step.model.train()
    bar = tqdm(total=len(loader), initial=state.batch, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True)  # fmt: skip
    done = 0
    try:
        for i, (x, y) in enumerate(loader):
            if i < state.batch:  # resuming mid-epoch: same batches, same augmentation draws
                continue
            out, loss = step(x, y)
            with torch.no_grad():
                losses[i] = loss.detach()
                state.wrong += (out.argmax(-1) != y).sum()  # (N, C), or (N, T, V) per position
                state.loss_sum += loss.detach().double() * y.numel()
            state.seen += y.numel()
            state.batch = i + 1
            done += 1
            if on_batch is not None:
                on_batch(x, y, i)
            last = state.batch == len(loader)
            if last or state.batch % SYNC_EVERY == 0:
                _check_finite(losses[: state.batch], reduce)
                if progress:
                    bar.set_postfix(error=f"{100 * state.wrong.item() / state.seen:.2f}%", refresh=False)
            if progress:
                bar.update(1)
            if not last and _should_stop(stop, reduce, state.batch):
                break
    finally:
        bar.close()
    return state


def _check_finite(losses: Tensor, reduce) -> None:
    bad = ~torch.isfinite(losses)
    flag = bad.any().float()
    if reduce is not None:
        flag = reduce(flag)
    if flag.item() > 0:
        first = int(bad.nonzero()[0, 0]) + 1 if bad.any() else len(losses)
        raise Diverged(f"loss became {losses[first - 1].item()} at batch {first}")


def _should_stop(stop: StopFlag, reduce, batch: int) -> bool:
    if reduce is None:
        return stop.requested
    if batch % SYNC_EVERY:
        return False  # ranks agree only at sync points, so that all stop at the same batch
    flag = reduce(torch.tensor(float(stop.requested)))
    return flag.item() > 0


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000,
             reduce=None, amp: torch.dtype | None = None) -> tuple[float, float]:  # fmt: skip
    """(error, loss) on (x, y) in evaluation mode: no dropout, BN running statistics.
    loss is the per-sample (text: per-position) mean of the criterion's reported value."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=x.device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with autocast(x.device, amp):
            out = model(xb)
        out = out.float() if amp else out  # the loss in float32 (bf16 forward under --amp)
        wrong += (out.argmax(-1) != yb).sum()  # per sample, or per position of a (N, T, V) output
        loss_sum += criterion(out, yb).double() * yb.numel()
    n = torch.tensor(float(y.numel()), device=x.device, dtype=torch.float64)
    totals = torch.stack([wrong, loss_sum, n])
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    wrong, loss_sum, n = totals.tolist()
    return wrong / n, (loss_sum / n if n else math.nan)
