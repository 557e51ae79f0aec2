"""Alignment diagnostics: how far a rule's learning signal is from back-prop's.

`alignment(model, x, y, criterion)` runs the batch twice on the same model —
once with its rule (fa or dfa), once inside `feedalign.backprop(model)` — and
returns, per weight (every parameter of two or more dimensions: the weight of a
Linear / Conv* / ConvTranspose* layer, named as its module in
`model.named_modules()`; other weights as "<module>.<parameter>", e.g.
"encoder.layers.0.self_attn.in_proj_weight", "lstm.weight_hh_l0"), angles in degrees:

    "update"    between the rule's weight gradient dL/dW and back-prop's;
    "error"     (layers whose output is one tensor) between the error each rule
                delivers at the layer's output
                (dL/d(pre-activation), flattened over the batch) and back-prop's.
                For dfa this is e·B_i carried back through the block's own
                nonlinearity / dropout / pooling; for fa the error sent down
                through the B's of the layers above;
    "feedback"  per-layer rules (fa, usf, frsf, brsf, kp): between the B the layer's
                backward uses now (`feedback_for`) and its W. For kp and the sign
                rules this is the quantity to plot over training: kp's B − W shrinks
                geometrically, so the angle falls towards 0°; the sign rules share
                W's signs, so it stays well below 90° from the first step.

0° means the rule computes back-prop there; 90° means an unrelated direction.
Nøkland (2016, Fig. 3) and Lillicrap et al. (2016) watch these angles fall
below 90° as the forward weights come to align with the feedback.

The call leaves the model as it found it: parameter `.grad`s, BatchNorm running
statistics, train/eval mode and the global RNG (both passes draw the same
dropout masks) are restored, and so is the rules' own state (brsf's draws, via
`feedback_kept`); nothing is deep-copied. `feedback_angles(model)` gives the
"feedback" angles alone, without a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from feedalign.rules import backprop
from feedalign.rules.calls import rule_weights
from feedalign.rules.feedback import feedback_for, feedback_kept, feedback_name

CHUNK = 1 << 16  # elements per float64 slice in angle()


def angle(a: Tensor, b: Tensor) -> float:
    """Angle between `a` and `b` (any shapes, flattened) in degrees, in [0, 180].

    nan if either is the zero vector (it has no direction). The three dot
    products are taken in float64: acos of the cosine then resolves angles near
    0° to about 1e-6 degrees, far below the rounding noise of the gradients.
    """
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"angle: sizes differ ({a.numel()} vs {b.numel()} elements)")
    dots = torch.zeros(3, dtype=torch.float64, device=a.device)
    # float64 in cache-sized chunks: one full-size copy would cost more than the dots
    for ca, cb in zip(a.split(CHUNK), b.split(CHUNK)):
        ca, cb = ca.to(torch.float64), cb.to(torch.float64)
        dots += torch.stack([ca @ cb, ca @ ca, cb @ cb])
    ab, aa, bb = dots.tolist()  # one device sync
    if aa == 0 or bb == 0:
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))))


def weights(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """key -> (module name, module, parameter name) for every trainable parameter of two
    or more dimensions, in `named_modules()` order; the key is the module's name for a
    parameter called "weight", else "<module>.<parameter>"."""
    out = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 2 and p.requires_grad:
                out[name if pname == "weight" else f"{name}.{pname}".lstrip(".")] = (name, m, pname)
    return out


@contextmanager
def _output_errors(layers: dict[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """Collects dL/d(layer output) per layer during one forward + backward.

    A forward hook registers a tensor hook on each layer's output; both kinds are
    removed on exit. A layer called several times in one pass gets several entries.
    """
    grads: dict[str, list[Tensor]] = {name: [] for name in layers}

    def on_forward(name: str) -> Callable:
        def hook(module: nn.Module, inputs, output) -> None:
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda g: grads[name].append(g.detach().clone()))

        return hook

    handles = [m.register_forward_hook(on_forward(name)) for name, m in layers.items()]
    try:
        yield grads
    finally:
        for h in handles:
            h.remove()


def _running_stats(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, saved copy) for every buffer of a norm layer with running statistics
    (running_mean, running_var, num_batches_tracked)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            saved.extend((buf, buf.detach().clone()) for buf in m.buffers(recurse=False))
    return saved


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, copy in saved:
            buf.copy_(copy)


def alignment(model: nn.Module, x: Tensor, y: Tensor, criterion: nn.Module) -> dict[str, dict[str, float]]:
    """Angles (degrees) between `model`'s rule and back-prop on the batch (x, y).

    Returns {weight key: {"update": °[, "error": °][, "feedback": ° (per-layer rules)]}} for
    every weight (see `weights`) that receives a gradient. For a bp model every
    angle is 0. An angle is nan where either vector is zero (e.g. back-prop's
    gradient in the hidden layers of a network whose weights are all still zero).
    Cost: two forward and two backward passes (about two training steps).
    """
    found = weights(model)
    layers = {name: m for name, m, _ in found.values()}  # the modules whose output errors we watch
    params = list(model.parameters())
    grads_before = [p.grad for p in params]
    stats = _running_stats(model)
    devices = [x.device] if x.device.type == "cuda" else []
    passes: list[tuple[dict[str, Tensor | None], dict[str, list[Tensor]]]] = []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), feedback_kept(model):
            cpu_rng = torch.get_rng_state()
            cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]
            for use_rule in (True, False):
                torch.set_rng_state(cpu_rng)  # the same dropout masks in both passes
                for d, state in zip(devices, cuda_rng):
                    torch.cuda.set_rng_state(state, d)
                for p in params:
                    p.grad = None
                with _output_errors(layers) as errors:
                    if use_rule:
                        criterion(model(x), y).backward()
                    else:
                        with backprop(model):
                            criterion(model(x), y).backward()
                passes.append(({k: getattr(m, p).grad for k, (_, m, p) in found.items()}, errors))
                _restore(stats)
    finally:
        for p, g in zip(params, grads_before):
            p.grad = g
        _restore(stats)

    (rule_w, rule_e), (bp_w, bp_e) = passes
    read = _read_feedback(model)
    out: dict[str, dict[str, float]] = {}
    for key, (name, layer, pname) in found.items():
        if rule_w[key] is None or bp_w[key] is None:
            continue  # not reached by this loss (e.g. an unused branch)
        metrics = {"update": angle(rule_w[key], bp_w[key])}
        if rule_e[name] and len(rule_e[name]) == len(bp_e[name]):
            metrics["error"] = angle(torch.cat([g.reshape(-1) for g in rule_e[name]]),
                                     torch.cat([g.reshape(-1) for g in bp_e[name]]))  # fmt: skip
        feedback_angle = _feedback_angle(layer, pname) if (id(layer), pname) in read else None
        if feedback_angle is not None:
            metrics["feedback"] = feedback_angle
        out[key] = metrics
    return out


def _feedback_angle(layer: nn.Module, weight: str = "weight") -> float | None:
    """Angle (degrees) between the B `layer.<weight>`'s backward uses now and W; None
    where no per-layer rule handles the weight."""
    if not hasattr(layer, feedback_name(weight)):
        return None
    with torch.no_grad():  # no side effects: brsf redraws only in a training forward
        return angle(feedback_for(layer, weight), getattr(layer, weight))


def _read_feedback(model: nn.Module) -> set[tuple[int, str]]:
    """(id(module), weight name) of every B a forward reads (not a B of a position embedding
    or a class token, which no call multiplies by: rules/calls.py)."""
    return {(id(m), p) for m, p, status in rule_weights(model).values() if status in ("layer", "calls")}


def feedback_angles(model: nn.Module) -> dict[str, float]:
    """{weight key: angle (degrees) between its current B and W} for every weight trained
    by a per-layer rule: no forward pass, cheap enough for every step. 0° = back-prop's
    Wᵀ; 90° = unrelated."""
    read = _read_feedback(model)
    found = [(key, m, p) for key, (_, m, p) in weights(model).items() if (id(m), p) in read]
    return {key: a for key, m, p in found if (a := _feedback_angle(m, p)) is not None}
