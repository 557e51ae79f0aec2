"""`convert(model, rule)`: put a learning rule of `feedalign.RULES` on an existing
PyTorch model, in place.

The per-layer rules (fa, usf, frsf, brsf, kp) swap every nn.Linear / nn.Conv2d
for its FA twin (same parameters, plus the rule's feedback state, see
rules/feedback.py); they work on any module tree. dfa needs the forward order,
so it works on nn.Sequential (nested allowed): a block runs from one
Linear/Conv2d up to the next, an ErrorTap sits at the end of each hidden block
(immediately before the next trainable layer, i.e. after its nonlinearity,
dropout and pooling) and DFAOutput after the output layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from feedalign.rules import RULES, check_rule
from feedalign.rules.dfa import Broadcast, DFAOutput, ErrorTap
from feedalign.rules.fa import FAConv2d, FALinear
from feedalign.rules.feedback import (
    add_feedback,
    dfa_bound,
    feedback_for,
    feedback_name,
    generator,
    init_bound,
    uniform,
)

TRAINABLE = (nn.Linear, nn.Conv2d)
ERROR_AT = ("logits", "output")


def _is_trainable(m: nn.Module) -> bool:
    return type(m) in TRAINABLE or isinstance(m, (FALinear, FAConv2d))


def _unsupported(m: nn.Module) -> bool:
    """Layers with weights that fa/dfa cannot handle (yet): say so rather than train them by bp."""
    conv_or_linear = isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear))
    return conv_or_linear and not _is_trainable(m)


def convert(
    model: nn.Module,
    rule: str,
    *,
    rfb_mag: float = 0.0,
    seed: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    error_at: str = "logits",
    feedback_init: str = "random",
) -> nn.Module:
    """Make `model` learn by `rule` (a name in `feedalign.RULES`); returns the same object.

    Per-layer rules (fa, usf, frsf, brsf, kp) work on any module tree; direct rules
    (dfa, drtp, shallow) on nn.Sequential (nested allowed); bp changes nothing.
    rfb_mag: 0 = defaults (per-layer: B_0 as `feedback_init` says; dfa: B_i ~
        U[±1/sqrt(n_i)], docs/original.md §1); X > 0: every feedback matrix ~ U[-X, X].
    seed: seeds the feedback draws (None: torch's global RNG).
    input_shape: per-sample input shape, e.g. (3, 32, 32); direct rules need it to
        size their taps when the first layer is a Conv2d (for a Linear it is inferred).
    error_at: dfa only. "logits" (default): e = dL/d(output layer's output).
        "output": e = dL/d(model output), the original's behaviour under `ce`
        (there the gradient w.r.t. log-softmax, -onehot/N; docs/original.md §3 calls it a defect).
    feedback_init: per-layer rules' B_0: "random" (an independent draw with the
        distribution of the layer's default initialisation) or "weights" (a copy of
        the layer's current weights, the original's fa, docs/original.md §1).
    """
    spec = RULES[check_rule(rule)]
    if rfb_mag < 0:
        raise ValueError(f"rfb_mag must be >= 0 (0 = the defaults), got {rfb_mag}")
    if rule_of(model) != "bp":
        raise ValueError("model is already converted; build a fresh model to change its rule")
    bad = [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules() if _unsupported(m)]
    if bad and spec.kind != "bp":
        raise ValueError(f"{rule} supports nn.Linear and nn.Conv2d only; cannot convert: {', '.join(bad)}")
    if spec.kind == "per-layer":
        _convert_fa(model, rule, rfb_mag, generator(seed), feedback_init=feedback_init)
    elif spec.kind == "direct":
        _convert_direct(model, spec.signal, rfb_mag, generator(seed), input_shape=input_shape,
                        error_at=error_at)  # fmt: skip
    model.learning_rule = rule  # what rule_of() reports
    return model


def feedback(model: nn.Module) -> list[Tensor]:
    """The feedback matrices in forward order: per-layer rules — for each weight a
    layer handles, the B its backward uses now (the weight's shape; computed from W
    for usf / frsf / brsf, so writing into those changes nothing); direct rules —
    B_i of shape (n_outputs, n_i); bp — empty."""
    out: list[Tensor] = []
    with torch.no_grad():  # no side effects: brsf redraws only in a training forward
        for m in model.modules():
            if isinstance(m, DFAOutput):
                out.extend(m.split())
            for name, _ in m.named_parameters(recurse=False):
                if hasattr(m, feedback_name(name)):
                    out.append(feedback_for(m, name).detach())
    return out


def rule_of(model: nn.Module) -> str:
    """The name of the rule `model` learns by (a key of RULES): the one `convert`
    recorded; for a part of a converted model, the rule of the layers inside it;
    "bp" for a model that was never converted."""
    for m in model.modules():
        if hasattr(m, "learning_rule"):
            return m.learning_rule
        if hasattr(m, "feedback_rule"):
            return m.feedback_rule
        if getattr(m, "rule", None):
            return m.rule
    return "bp"


def _convert_direct(model, signal, rfb_mag, gen, *, blocks=None, input_shape=None, error_at="logits"):
    """Seam for the direct rules' converter (the direct rules' branch replaces this
    with the general one); here only dfa's signal, the output error."""
    if signal != "error":
        raise ValueError(f"the direct signal {signal!r} is not implemented on this branch")
    if error_at not in ERROR_AT:
        raise ValueError(f"error_at must be one of {ERROR_AT}, got {error_at!r}")
    _convert_dfa(model, rfb_mag, gen, input_shape, error_at)


# --- fa ---------------------------------------------------------------------------


def _fa_twin(layer: nn.Module) -> nn.Module:
    """FA layer sharing `layer`'s Parameter objects (optimizers built earlier still work)."""
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        twin = FALinear(layer.in_features, layer.out_features, has_bias, **kw)
    else:
        twin = FAConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            has_bias,
            layer.padding_mode,
            **kw,
        )
    twin.weight = layer.weight
    twin.bias = layer.bias
    twin.train(layer.training)
    return twin


def _convert_fa(
    model: nn.Module, rule: str, rfb_mag: float, gen: torch.Generator | None, *, feedback_init: str
) -> None:
    if feedback_init not in ("random", "weights"):
        raise ValueError(f"feedback_init must be 'random' or 'weights', got {feedback_init!r}")
    if _is_trainable(model):
        raise ValueError("convert a container holding the layer, not a bare Linear/Conv2d")
    layers = [(p, n, c) for p in model.modules() for n, c in p.named_children() if _is_trainable(c)]
    if not layers:
        raise ValueError("fa: the model has no nn.Linear or nn.Conv2d layer to convert")
    for parent, name, layer in layers:
        twin = _fa_twin(layer)
        w = twin.weight.detach()
        if rfb_mag > 0:
            initial = uniform(w.shape, rfb_mag, gen, dtype=w.dtype, device=w.device)
        elif feedback_init == "weights":  # docs/original.md §1: a copy of the layer's initial weights
            initial = w.clone()
        else:  # the distribution of the layer's default initialisation
            initial = uniform(w.shape, init_bound(w), gen, dtype=w.dtype, device=w.device)
        add_feedback(twin, "weight", initial, rule)
        setattr(parent, name, twin)


# --- dfa --------------------------------------------------------------------------


def _leaves(seq: nn.Sequential) -> list[tuple[nn.Sequential, str, nn.Module]]:
    """(parent, key, module) in forward order, descending into nested Sequentials."""
    out = []
    for key, m in seq.named_children():
        if isinstance(m, nn.Sequential):
            out.extend(_leaves(m))
            continue
        hidden = [n for n, c in m.named_modules() if c is not m and _is_trainable(c)]
        if hidden:
            raise ValueError(
                f"dfa needs the forward order of the trainable layers, but {type(m).__name__} "
                f"hides {', '.join(hidden)} inside; write that part as nn.Sequential, or use fa"
            )
        out.append((seq, key, m))
    return out


def _insert(parent: nn.Sequential, before: dict[str, list], after: dict[str, list]) -> None:
    """Rebuild parent's children with extra (name, module) pairs; existing keys stay,
    so the parameters' state_dict names do not change."""
    new: OrderedDict[str, nn.Module] = OrderedDict()
    for key, m in parent._modules.items():
        new.update(before.get(key, []))
        new[key] = m
        new.update(after.get(key, []))
    parent._modules = new


def _convert_dfa(model, rfb_mag, gen, input_shape, error_at) -> None:
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"dfa converts nn.Sequential models (nested allowed), got {type(model).__name__}; "
            "write the model as nn.Sequential, or use fa, which works on any module"
        )
    leaves = _leaves(model)
    trainable = [i for i, (_, _, m) in enumerate(leaves) if _is_trainable(m)]
    if not trainable:
        raise ValueError("dfa: the model has no nn.Linear or nn.Conv2d layer")
    out_parent, out_key, out_layer = leaves[trainable[-1]]
    if not isinstance(out_layer, nn.Linear):
        raise ValueError(f"dfa: the output layer must be nn.Linear, got {type(out_layer).__name__}")
    broadcast = Broadcast(len(trainable) - 1)
    edits: dict[int, tuple[dict, dict]] = {}  # id(parent) -> (before, after)
    parents: dict[int, nn.Sequential] = {}

    def add(parent, key, which, item):
        parents[id(parent)] = parent
        edits.setdefault(id(parent), ({}, {}))[which].setdefault(key, []).append(item)

    for tap_index, i in enumerate(trainable[1:]):
        parent, key, _ = leaves[i]
        add(parent, key, 0, (f"tap{tap_index}", ErrorTap(tap_index, broadcast)))
    output = DFAOutput(broadcast, out_layer.out_features)
    if error_at == "logits":
        add(out_parent, out_key, 1, ("dfa_output", output))
    else:
        model.add_module("dfa_output", output)
    for pid, (before, after) in edits.items():
        _insert(parents[pid], before, after)

    # Probe forward to learn n_i (elements per sample at each tap).
    first = leaves[trainable[0]][2]
    if input_shape is None:
        if not isinstance(first, nn.Linear):
            raise ValueError("dfa: pass input_shape=(C, H, W) for a model that starts with Conv2d")
        input_shape = (first.in_features,)
    w = first.weight
    was_training = model.training
    broadcast.probing = True
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=w.dtype, device=w.device))
    finally:
        broadcast.probing = False
        model.train(was_training)
    blocks = [
        uniform((output.n_out, n), dfa_bound(n, rfb_mag), gen, dtype=w.dtype, device=w.device)
        for n in broadcast.sizes
    ]
    output.feedback = torch.cat(blocks, dim=1) if blocks else output.feedback.to(w)
