"""`convert(model, rule)`: put fa or dfa on an existing PyTorch model, in place.

fa swaps every nn.Linear / nn.Conv2d for its FA twin (same parameters, plus a
`feedback` buffer); it works on any module tree. dfa needs the forward order,
so it works on nn.Sequential (nested allowed): a block runs from one
Linear/Conv2d up to the next, an ErrorTap sits at the end of each hidden block
(immediately before the next trainable layer, i.e. after its nonlinearity,
dropout and pooling) and DFAOutput after the output layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from feedalign.rules import check_rule
from feedalign.rules.dfa import Broadcast, DFAOutput, ErrorTap
from feedalign.rules.fa import FAConv2d, FALinear
from feedalign.rules.feedback import dfa_bound, generator, uniform

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
) -> nn.Module:
    """Make `model` learn by `rule` ("bp", "fa" or "dfa"); returns the same object.

    rfb_mag: 0 = SPEC §1 defaults (fa: B is a copy of the layer's current weights,
        as the original copied the initial ones; dfa: B_i ~ U[±1/sqrt(n_i)]);
        X > 0: every feedback matrix ~ U[-X, X].
    seed: seeds the feedback draw (None: torch's global RNG).
    input_shape: per-sample input shape, e.g. (3, 32, 32); dfa needs it to size
        its taps when the first layer is a Conv2d (for a Linear it is inferred).
    error_at: dfa only. "logits" (default): e = dL/d(output layer's output).
        "output": e = dL/d(model output), the original's behaviour under `ce`
        (there the gradient w.r.t. log-softmax, -onehot/N; SPEC §3 calls it a defect).
    """
    check_rule(rule)
    if rfb_mag < 0:
        raise ValueError(f"rfb_mag must be >= 0 (0 = SPEC defaults), got {rfb_mag}")
    if any(getattr(m, "rule", None) for m in model.modules()):
        raise ValueError("model is already converted; build a fresh model to change its rule")
    bad = [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules() if _unsupported(m)]
    if bad and rule != "bp":
        raise ValueError(f"{rule} supports nn.Linear and nn.Conv2d only; cannot convert: {', '.join(bad)}")
    if rule == "fa":
        _convert_fa(model, rfb_mag, generator(seed))
    elif rule == "dfa":
        if error_at not in ERROR_AT:
            raise ValueError(f"error_at must be one of {ERROR_AT}, got {error_at!r}")
        _convert_dfa(model, rfb_mag, generator(seed), input_shape, error_at)
    return model


def feedback(model: nn.Module) -> list[Tensor]:
    """The feedback matrices in forward order: fa — one per layer, of its weight's
    shape; dfa — B_i of shape (n_outputs, n_i); bp — empty."""
    out: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, (FALinear, FAConv2d)):
            out.append(m.feedback)
        elif isinstance(m, DFAOutput):
            out.extend(m.split())
    return out


def rule_of(model: nn.Module) -> str:
    for m in model.modules():
        if getattr(m, "rule", None):
            return m.rule
    return "bp"


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


def _convert_fa(model: nn.Module, rfb_mag: float, gen: torch.Generator | None) -> None:
    if _is_trainable(model):
        raise ValueError("convert a container holding the layer, not a bare Linear/Conv2d")
    layers = [(p, n, c) for p in model.modules() for n, c in p.named_children() if _is_trainable(c)]
    if not layers:
        raise ValueError("fa: the model has no nn.Linear or nn.Conv2d layer to convert")
    for parent, name, layer in layers:
        twin = _fa_twin(layer)
        with torch.no_grad():
            if rfb_mag > 0:
                w = twin.weight
                twin.feedback.copy_(uniform(w.shape, rfb_mag, gen, dtype=w.dtype, device=w.device))
            else:  # SPEC §1: a copy of the layer's initial weights
                twin.feedback.copy_(twin.weight)
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
