"""Feedback matrices and the per-layer rules that own them (docs/original.md §1
"Feedback matrices").

A per-layer rule replaces Wᵀ in every layer's backward by a matrix B of W's
shape: the layer's input receives δ B instead of δ W (δ = dL/d(layer output)),
while dL/dW = δᵀ x stays the true gradient. The rules differ in where B comes from:

    fa    B = B_0                       drawn once, fixed (a buffer)
    usf   B = s · sign(W)               the current W, every step; s = 1/√(3·fan_in)
    frsf  B = |M| ∘ sign(W)             M drawn once, fixed
    brsf  B = |M_t| ∘ sign(W)           M_t drawn anew at every training forward
    kp    B a Parameter, dL/dB := dL/dW  so B gets W's update and weight decay

The protocol between layers and rules: a layer registers, for each weight `w` it
handles, B_0 with `add_feedback(layer, w, B0, rule)`, and passes
`feedback_for(layer, w)` — the B of this step — to its autograd Function.
Feedback state lives in buffers (saved in `state_dict`, moved by `.to()`,
invisible to optimizers) except kp's B, which is a Parameter. Random draws come
from explicit generators: the same seed gives the same matrices on every rank.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn


def generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with `seed`; None means "use torch's global RNG"."""
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def uniform(
    shape: tuple[int, ...],
    bound: float,
    gen: torch.Generator | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform[-bound, +bound] of `shape`, drawn on the CPU (device-independent
    values for a given seed), then moved to `device`."""
    out = torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
    return out.to(dtype=dtype, device=device)


def draw_uniform(out: Tensor, bound: float, seed: int) -> None:
    """out ← U(0, bound), in place, determined by `seed`.

    On the CPU (float32/float64 tensors) the numbers come from NumPy's PCG64, written
    straight into `out`'s memory: about 35% cheaper than torch's CPU generator (a
    Mersenne Twister), which matters because brsf draws every weight at every step
    (measured on one core: 1.3 ms against 2.0 ms per 800×784 float32 draw). Threads do
    not help: next to torch's OpenMP workers, a second drawing thread made it slower.
    Other devices and dtypes use torch's generator of the device (Philox on CUDA).
    """
    if out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous():
        out.uniform_(0.0, bound, generator=torch.Generator(device=out.device).manual_seed(seed))
        return
    flat = out.view(-1).numpy()  # shares out's memory
    np.random.Generator(np.random.PCG64(seed)).random(dtype=flat.dtype, out=flat)
    out.mul_(bound)


def dfa_bound(n_elements: int, rfb_mag: float) -> float:
    """docs/original.md §1: 1/sqrt(n_i) with n_i the tap input's elements per sample, or rfb_mag if > 0."""
    return rfb_mag if rfb_mag > 0 else 1.0 / math.sqrt(n_elements)


def fan_in(weight: torch.Tensor) -> int:
    """Inputs feeding one output unit: in_features (Linear) or C_in·kH·kW (Conv2d)."""
    return weight[0].numel()


def init_bound(weight: Tensor) -> float:
    """b of the default initialisation U(±b), b = 1/√fan_in (PyTorch's Linear/Conv
    default kaiming_uniform(a=√5), and the original's, docs/original.md §1); its std is b/√3."""
    return 1.0 / math.sqrt(fan_in(weight))


def xavier_bound(weight: Tensor) -> float:
    """b of xavier-uniform U(±b), b = √(6 / (fan_in + fan_out)), fans as torch counts them
    (dim 1 and dim 0 times the kernel's size); BioTorch's default for W and B."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    return math.sqrt(6.0 / ((weight.shape[1] + weight.shape[0]) * receptive))


# --- the per-layer rules ----------------------------------------------------------


class Rule:
    """A table entry of `feedalign.rules.RULES`.

    kind: "bp" (plain autograd), "per-layer" (each layer's backward uses a B of its
        weight's shape, this file), "direct" (taps broadcast a signal, rules/dfa.py) or
        "local" (the same taps, each block learning from a loss of its own, rules/local.py).
    original_init: `build_model` starts as the original did (docs/original.md §1): B_0
        a copy of the initial weights, and all weights zeroed under tanh/sigm. The sign
        rules cannot start from zero weights (sign(0) = 0 sends no error back).
    summary: one line for listings and help texts.
    """

    def __init__(self, name: str, kind: str, summary: str, *, original_init: bool = False,
                 signal: str | None = None) -> None:  # fmt: skip
        self.name, self.kind, self.summary = name, kind, summary
        self.original_init = original_init
        self.signal = signal  # direct rules: what the taps broadcast ("error", "target", "none")

    def __repr__(self) -> str:
        return f"<rule {self.name}: {self.kind}>"


class PerLayerRule(Rule):
    """Base: B_0 kept in a buffer and used as it is (fa)."""

    def __init__(self, name: str, summary: str, *, original_init: bool = False) -> None:
        super().__init__(name, "per-layer", summary, original_init=original_init)

    def attach(self, layer: nn.Module, weight: str, initial: Tensor, bound: float) -> None:
        """Register the rule's state for `layer.<weight>`, starting from `initial`;
        `bound`: b of the weight's default initialisation U(±b) (the layer kind's own)."""
        layer.register_buffer(feedback_name(weight), initial.detach().clone())

    def feedback(self, layer: nn.Module, weight: str, used: bool = True) -> Tensor:
        """B for `layer.<weight>` now; called by the layer's forward for its backward.
        used=False: the backward will not need B (the layer's input has no gradient, as
        in a network's first layer), so rules that compute B may return their stored
        buffer instead and skip the work."""
        return getattr(layer, feedback_name(weight))


class FixedFeedback(PerLayerRule):
    """fa (Lillicrap et al. 2016): dx = δ B with B = B_0 fixed."""


class UniformSign(PerLayerRule):
    """usf (Liao, Leibo & Poggio 2016; Moskovitz et al. 2018): dx = δ B, B = s · sign(W)
    of the current W, every step; s = b/√3, the std of the weight's default
    initialisation U(±b) (b = 1/√fan_in for Linear and Conv, 1/√hidden for recurrent
    layers). Only s is stored (a 0-dim buffer)."""

    def attach(self, layer: nn.Module, weight: str, initial: Tensor, bound: float) -> None:
        scale = bound / math.sqrt(3.0)
        layer.register_buffer(feedback_name(weight), torch.tensor(scale, dtype=initial.dtype,
                                                                  device=initial.device))  # fmt: skip

    def feedback(self, layer: nn.Module, weight: str, used: bool = True) -> Tensor:
        if not used:  # the stored buffer stands in: nothing reads it
            return super().feedback(layer, weight)
        w = getattr(layer, weight).detach()  # sign(W) has no gradient: keep it off the graph
        return torch.sign(w).mul_(getattr(layer, feedback_name(weight)))


class FixedRandomSign(UniformSign):
    """frsf (Moskovitz et al. 2018): dx = δ B, B = |M| ∘ sign(W) of the current W;
    M = B_0 drawn once (the default initialisation's distribution), |M| stored: usf's
    feedback with a magnitude per weight in place of one scale."""

    def attach(self, layer: nn.Module, weight: str, initial: Tensor, bound: float) -> None:
        layer.register_buffer(feedback_name(weight), initial.detach().abs())


class BatchRandomSign(FixedRandomSign):
    """brsf (Moskovitz et al. 2018): dx = δ B, B = |M_t| ∘ sign(W) with M_t ~ U(±b)
    drawn anew at every training forward (training mode, gradients on) whose backward
    reads B (not where the layer's input has no gradient, see feedback_for); b is the
    bound of the weight's default initialisation (1/√fan_in for Linear and Conv,
    1/√hidden for recurrent layers), kept host-side at attach.

    Draw t comes from a generator seeded with hash(seed, t): `seed` is derived from
    B_0 (itself drawn from the conversion seed) and t counts the draws; both are
    buffers ("<feedback>_seed", "<feedback>_step"), so every DDP rank draws the same
    M_t and a resumed run continues the sequence bit for bit. |M_t| is kept in the
    feedback buffer; outside training forwards B uses the latest draw.
    """

    def attach(self, layer: nn.Module, weight: str, initial: Tensor, bound: float) -> None:
        super().attach(layer, weight, initial, bound)
        name = feedback_name(weight)
        layer.__dict__.setdefault("_feedback_bounds", {})[name] = float(bound)
        layer.register_buffer(f"{name}_seed", torch.tensor(_seed_of(initial), device=initial.device))
        layer.register_buffer(f"{name}_step", torch.zeros((), dtype=torch.int64, device=initial.device))
        layer.register_load_state_dict_post_hook(_forget_clocks)

    def feedback(self, layer: nn.Module, weight: str, used: bool = True) -> Tensor:
        if used and layer.training and torch.is_grad_enabled():  # t counts the draws a backward read
            self._redraw(layer, weight)
        return super().feedback(layer, weight, used)

    def _redraw(self, layer: nn.Module, weight: str) -> None:
        name = feedback_name(weight)
        magnitude = getattr(layer, name)
        # (seed, step) mirrored host-side: reading the buffers each step would sync the device
        clocks = layer.__dict__.setdefault("_feedback_clocks", {})
        if name not in clocks:
            clocks[name] = [int(getattr(layer, f"{name}_seed")), int(getattr(layer, f"{name}_step"))]
        clock = clocks[name]
        clock[1] += 1
        getattr(layer, f"{name}_step").fill_(clock[1])
        with torch.no_grad():  # |U(±b)| = U(0, b)
            draw_uniform(magnitude, layer._feedback_bounds[name], _mix(clock[0], clock[1]))


class KolenPollack(PerLayerRule):
    """kp (Kolen & Pollack 1994; Akrout et al. 2019): dx = δ B with B a Parameter whose
    gradient is W's, dL/dB := δᵀ x = dL/dW (the fa Function returns it). Any optimizer
    then moves B exactly as W, weight decay included: with SGD (LR η, decay λ),
    B_k − W_k = (1 − ηλ)^k (B_0 − W_0). Build the optimizer after `convert`."""

    def attach(self, layer: nn.Module, weight: str, initial: Tensor, bound: float) -> None:
        layer.register_parameter(feedback_name(weight), nn.Parameter(initial.detach().clone()))


def _seed_of(t: Tensor) -> int:
    """A 63-bit seed determined by the values of `t` (the same on every rank and run)."""
    data = t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _mix(seed: int, step: int) -> int:
    """Seed of draw `step`: seed·a + step·c mod 2^63 (LCG constants; c odd, so every
    step of one seed gets its own seed)."""
    return (seed * 6364136223846793005 + step * 1442695040888963407) % (1 << 63)


def _forget_clocks(module: nn.Module, incompatible_keys) -> None:
    """After `load_state_dict` the host-side (seed, step) mirrors are stale."""
    module.__dict__.pop("_feedback_clocks", None)


# One object per per-layer rule, by name; feedalign.rules.RULES lists them with the others.
PER_LAYER: dict[str, PerLayerRule] = {
    r.name: r
    for r in (
        FixedFeedback("fa", "fixed random B (Lillicrap et al. 2016); the paper's baseline",
                      original_init=True),
        UniformSign("usf", "B = s·sign(W): sign-concordant, near back-prop accuracy without W's magnitudes"),
        FixedRandomSign("frsf", "B = |M|∘sign(W), M fixed: sign-concordant with random magnitudes"),
        BatchRandomSign("brsf", "B = |M_t|∘sign(W), M_t redrawn every step: sign-concordant, noisy"),
        KolenPollack("kp", "B learns W's update, so B → W: back-prop accuracy without transport"),
    )
}  # fmt: skip


# --- the protocol between fa-family layers and the rules -------------------------
# A layer trained by a per-layer rule keeps, for each weight `w` it handles, the
# rule's state under `feedback_name(w)` (B_0, drawn at conversion), and asks
# `feedback_for(layer, w)` for the B of the current step; nothing else reads it.


def feedback_name(weight: str) -> str:
    """Attribute holding the feedback of `layer.<weight>`: "feedback" for "weight"
    (state_dict key `<layer>.feedback`), else "<weight>_feedback"."""
    return "feedback" if weight == "weight" else f"{weight}_feedback"


def add_feedback(layer: nn.Module, weight: str, initial: Tensor, rule: str = "fa",
                 bound: float | None = None) -> None:  # fmt: skip
    """Give `layer.<weight>` its feedback by `rule` (a key of PER_LAYER), starting from
    `initial` (the weight's shape); replaces any feedback registered before. `bound`:
    b of the weight's default initialisation U(±b), which sets usf's scale and brsf's
    draws (default 1/√fan_in, Linear's and Conv's; recurrent layers pass 1/√hidden)."""
    if rule not in PER_LAYER:
        raise ValueError(f"{rule!r} is not a per-layer rule; choose one of {', '.join(PER_LAYER)}")
    name = feedback_name(weight)
    for attr in (name, f"{name}_seed", f"{name}_step"):
        if hasattr(layer, attr):
            delattr(layer, attr)
    PER_LAYER[rule].attach(layer, weight, initial, init_bound(initial) if bound is None else bound)
    layer.feedback_rule = rule


def feedback_for(layer: nn.Module, weight: str = "weight", *, used: bool = True) -> Tensor:
    """The matrix B (the weight's shape) that `layer`'s backward uses this step in
    place of `layer.<weight>`. Side-effect free except in a training forward
    (training mode, gradients on), where brsf draws its next M.

    used=False (the layer's input does not require grad, so its backward computes no
    input gradient and never reads B): the sign rules skip computing B — and brsf its
    draw — and return a stand-in of any shape. On the paper's 784-800-800-10 MLP the
    first layer holds half the weights."""
    return PER_LAYER[layer.feedback_rule].feedback(layer, weight, used)


@contextmanager
def feedback_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block training forwards may advance the rules' state (brsf's draw
    counter and M); on exit every per-layer rule's buffers are put back as they were.
    Diagnostics use it so that looking at a run (on rank 0 only) does not change it."""
    layers = [m for m in model.modules() if hasattr(m, "feedback_rule")]
    saved = [(buf, buf.detach().clone()) for m in layers for buf in m.buffers(recurse=False)]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
        for m in layers:
            _forget_clocks(m, None)
