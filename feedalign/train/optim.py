"""Optimizers, learning-rate schedule, stopping rules and max-norm (docs/original.md §4).

The optimizers are torch.optim's, configured to match the original's `optim`
package: RMSprop m = 0.99·m + 0.01·g², x -= LR·g/(sqrt(m) + 1e-8) (no momentum,
no LRDecay); SGD with dampening = momentum (v = μ·v + (1−μ)·g, v₀ = g);
`weightDecay` is L2 added to the gradient in all of them but adamw, whose decay is
decoupled (Loshchilov & Hutter) and applied to weights of ≥ 2 dims only, as nanoGPT's
configure_optimizers (embeddings and matrices decay; biases and norm gains do not);
adadelta ignores LR, as the original's did.

Per step, the LR may also warm up linearly over `warmup` steps and decay by a cosine
to `min_lr` at step `iterations` (nanoGPT's get_lr; `Optimizer.lr_at`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

MAX_NORM_OFF = 400.0  # -maxInNorm / -maxOutNorm at or above this: no renormalisation (docs/original.md §4)

# name -> (factory(params, opts), applies LRDecay)
OPTIMIZERS = {
    "sgd": (lambda p, o: torch.optim.SGD(p, lr=o.LR, momentum=o.momentum, dampening=o.momentum,
                                          weight_decay=o.weightDecay), True),
    "rmsprop": (lambda p, o: torch.optim.RMSprop(p, lr=o.LR, alpha=0.99, eps=1e-8,
                                                  weight_decay=o.weightDecay), False),
    "adam": (lambda p, o: torch.optim.Adam(p, lr=o.LR, betas=(o.beta1, o.beta2), eps=1e-8,
                                            weight_decay=o.weightDecay), True),
    "adamw": (lambda p, o: torch.optim.AdamW(decay_groups(p, o.weightDecay), lr=o.LR,
                                              betas=(o.beta1, o.beta2), eps=1e-8), True),
    "adagrad": (lambda p, o: torch.optim.Adagrad(p, lr=o.LR, eps=1e-10, weight_decay=o.weightDecay), True),
    "adadelta": (lambda p, o: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-6,
                                                    weight_decay=o.weightDecay), False),
    "adamax": (lambda p, o: torch.optim.Adamax(p, lr=o.LR, betas=(0.9, 0.999), eps=1e-38,
                                                weight_decay=o.weightDecay), False),
}  # fmt: skip


def decay_groups(params: list[nn.Parameter], decay: float) -> list[dict]:
    """adamw's parameter groups: weight decay on parameters of ≥ 2 dims, none on the rest."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return [g for g in groups if g["params"]]


class Optimizer:
    """One optimizer step with the original's LRDecay: lr_t = lr / (1 + t·LRDecay),
    t = steps taken so far (SGD, Adam, Adagrad). `lr` is the schedule's current LR.

    With `opts.compile_optimizer` the step runs as one torch.compile'd (Inductor)
    kernel: eager torch.optim makes ~5 separate passes over every parameter and
    allocates temporaries, which on a CPU costs as much as the forward pass of an
    MLP at batch 64. Same update rule; the rounding of the last bit may differ from
    eager. The LR then lives in a 0-dim tensor, so that schedule changes do not
    trigger recompilation.
    """

    def __init__(self, params: Iterable[nn.Parameter], opts) -> None:
        factory, self.decays = OPTIMIZERS[opts.optimization]
        self.optimizer = factory(list(params), opts)
        self.lr_decay = opts.LRDecay if self.decays else 0.0
        self.fixed_lr = opts.optimization == "adadelta"
        self.steps = 0
        self.warmup, self.min_lr = opts.warmup, opts.min_lr
        self.decay_steps = opts.iterations if opts.lr_schedule == "cosine" else 0
        self.compiled = opts.compile_optimizer
        self._step = self.optimizer.step
        if self.compiled:
            self._lr_as_tensors()
            # torch.optim wraps step() in a profiler record_function, which dynamo skips
            # with a warning per compile; that notice says nothing about the run
            logging.getLogger("torch._dynamo.variables.ctx_manager").setLevel(logging.ERROR)
            self._step = torch.compile(self.optimizer.step)

    def _lr_as_tensors(self) -> None:
        for group in self.optimizer.param_groups:
            first = group["params"][0]  # the LR in the parameters' precision, as eager applies it
            group["lr"] = torch.as_tensor(float(group["lr"]), dtype=first.dtype, device=first.device)

    def lr_at(self, lr: float, t: int) -> float:
        """The LR of step t (0-based) for the schedule's `lr`: linear warm-up over the first
        `warmup` steps, lr·(t+1)/(warmup+1); then, with a cosine schedule, min_lr +
        ½(1 + cos(π·r))·(lr − min_lr), r = (t − warmup)/(iterations − warmup), held at min_lr
        once r ≥ 1; the original's LRDecay divides the result by 1 + t·LRDecay."""
        if t < self.warmup:
            lr = lr * (t + 1) / (self.warmup + 1)
        elif self.decay_steps:
            r = min(1.0, (t - self.warmup) / max(1, self.decay_steps - self.warmup))
            lr = self.min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (lr - self.min_lr)
        return lr / (1 + t * self.lr_decay)

    def step(self, lr: float) -> None:
        if not self.fixed_lr:
            lr_t = self.lr_at(lr, self.steps)
            for group in self.optimizer.param_groups:
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(lr_t)
                else:
                    group["lr"] = lr_t
        self._step()
        self.steps += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        if self.compiled:  # a checkpoint of an eager run holds float LRs
            self._lr_as_tensors()


def parse_milestones(text: str) -> tuple[int, ...]:
    """Milestones: "50,75" -> (50, 75); "" -> (). Positive integer epochs, strictly increasing."""
    if not text.strip():
        return ()
    try:
        epochs = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated epochs such as 50,75, got {text!r}") from None
    if any(e < 1 for e in epochs) or list(epochs) != sorted(set(epochs)):
        raise ValueError(f"epochs must be >= 1 and strictly increasing, got {text!r}")
    return epochs


class Schedule:
    """docs/original.md §4's LR schedule and stopping rules, driven by the epoch's training error.

    m_t = 0.75·m_{t−1} + 0.25·err_t, m_0 = 1.
    epoch_step −1: constant LR; 0 ("auto"): stop once halved 8 times or m_t ≤ 1e-4,
    else halve when err_t ≥ m_t; k > 0: halve every k epochs. While epoch_step <
    epoch, also stop once m_t ≤ 1e-4 ("zero training error reached").

    feedalign's step schedule (`milestones`, `gamma`; torch's MultiStepLR): after
    epoch m of `milestones` the LR is multiplied by `gamma`, so epoch e (1-based)
    trains at LR · gamma^#{m in milestones : m < e}. It composes with epoch_step
    and with the optimizer's per-step LRDecay, which divides this LR.
    """

    ZERO = 1e-4

    def __init__(self, lr: float, epoch_step: int, epochs: int, *, milestones: tuple[int, ...] = (),
                 gamma: float = 0.1) -> None:  # fmt: skip
        self.lr, self.epoch_step, self.epochs = lr, epoch_step, epochs
        self.milestones, self.gamma = tuple(milestones), gamma
        self.smoothed = 1.0
        self.halvings = 0

    def update(self, epoch: int, train_error: float) -> str | None:
        """After epoch `epoch` (1-based) with training error `train_error` (fraction):
        adjust the LR; return why training stops, or None to go on."""
        self.smoothed = 0.75 * self.smoothed + 0.25 * train_error
        if self.epoch_step == 0:
            if self.halvings >= 8:
                return "learning rate halved 8 times"
            if self.smoothed <= self.ZERO:
                return "zero training error reached"
            if train_error >= self.smoothed:
                self._halve()
        elif self.epoch_step > 0 and epoch % self.epoch_step == 0:
            self._halve()
        if epoch in self.milestones:
            self.lr *= self.gamma
        if self.epoch_step < self.epochs and self.smoothed <= self.ZERO:
            return "zero training error reached"
        return None

    def _halve(self) -> None:
        self.lr /= 2
        self.halvings += 1

    def state_dict(self) -> dict:
        return {"lr": self.lr, "smoothed": self.smoothed, "halvings": self.halvings}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.smoothed, self.halvings = state["lr"], state["smoothed"], state["halvings"]


@torch.no_grad()
def max_norm_(model: nn.Module, max_out: float, max_in: float) -> None:
    """Renormalise every parameter with 2+ dims: each slice along dim 0 to L2 norm
    ≤ max_out, then each slice along the last dim to ≤ max_in (MAX_NORM_OFF = off, docs/original.md §4)."""
    for p in model.parameters():
        if p.dim() < 2:
            continue
        if max_out < MAX_NORM_OFF:
            p.copy_(torch.renorm(p, 2, 0, max_out))
        if max_in < MAX_NORM_OFF:
            p.copy_(torch.renorm(p, 2, p.dim() - 1, max_in))


@torch.no_grad()
def zero_biases_(model: nn.Module) -> None:
    """`-bias 0`: every module's `bias` parameter (Linear, Conv, BatchNorm's β) is set
    to zero after every step, docs/original.md §4's "all biases"."""
    for m in model.modules():
        if isinstance(getattr(m, "bias", None), nn.Parameter):
            m.bias.zero_()
