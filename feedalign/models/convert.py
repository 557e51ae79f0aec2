"""`convert(model, rule)`: put a learning rule on an existing PyTorch model, in place.

fa swaps every nn.Linear / nn.Conv2d for its FA twin (same parameters, plus a
`feedback` buffer); it works on any module tree. The direct rules (dfa, drtp,
shallow) put taps at block boundaries and an Output after the output layer, on
any module tree too: where, is feedalign/models/blocks.py's business.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from feedalign.models.blocks import BlockSpec, convert_direct
from feedalign.rules import check_rule
from feedalign.rules.dfa import DFAOutput
from feedalign.rules.fa import FAConv2d, FALinear
from feedalign.rules.feedback import generator, uniform

TRAINABLE = (nn.Linear, nn.Conv2d)
ERROR_AT = ("logits", "output")
DIRECT = {"dfa": "error", "drtp": "target", "shallow": "none"}  # rule -> the signal its taps receive


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
    blocks: BlockSpec = None,
    output: str | None = None,
) -> nn.Module:
    """Make `model` learn by `rule` (one of feedalign.RULES); returns the same object.

    rfb_mag: 0 = SPEC §1 defaults (fa: B is a copy of the layer's current weights,
        as the original copied the initial ones; dfa: B_i ~ U[±1/sqrt(n_i)]);
        X > 0: every feedback matrix ~ U[-X, X].
    seed: seeds the feedback draw (None: torch's global RNG).
    input_shape: direct rules: per-sample input shape, e.g. (3, 32, 32); draws the
        feedback now with a forward on zeros. Not needed: without it the taps are
        sized at the first forward pass (also for integer inputs such as token ids).
    blocks, output: direct rules: the blocks (module names, or a predicate
        (name, module) -> bool) and the output layer's name, instead of the automatic
        choice (docs/models.md, "Your own model"; feedalign.describe lists it).
    error_at: direct rules only. "logits" (default): e = dL/d(output layer's output).
        "output": e = dL/d(model output), the original's behaviour under `ce`
        (there the gradient w.r.t. log-softmax, -onehot/N; SPEC §3 calls it a defect).
    """
    check_rule(rule)
    if rfb_mag < 0:
        raise ValueError(f"rfb_mag must be >= 0 (0 = SPEC defaults), got {rfb_mag}")
    if any(getattr(m, "rule", None) for m in model.modules()):
        raise ValueError("model is already converted; build a fresh model to change its rule")
    bad = [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules() if _unsupported(m)]
    if bad and rule == "fa":
        raise ValueError(f"{rule} supports nn.Linear and nn.Conv2d only; cannot convert: {', '.join(bad)}")
    if rule == "fa":
        _convert_fa(model, rfb_mag, generator(seed))
    elif rule in DIRECT:
        _convert_direct(
            model, DIRECT[rule], rfb_mag, generator(seed),
            blocks=blocks, output=output, input_shape=input_shape, error_at=error_at,
        )  # fmt: skip
    return model


def feedback(model: nn.Module) -> list[Tensor]:
    """The feedback matrices in forward order: fa — one per layer, of its weight's
    shape; dfa, drtp — B_i of shape (n_outputs, n_i), drawn at the first forward
    pass (before it this raises); bp, shallow — empty."""
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


# --- the direct rules: dfa, drtp, shallow (feedalign/models/blocks.py) --------------


def _convert_direct(
    model: nn.Module,
    signal: str,
    rfb_mag: float,
    gen: torch.Generator | None,
    *,
    blocks: BlockSpec = None,
    output: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    error_at: str = "logits",
) -> None:
    """signal: "error" (dfa), "target" (drtp) or "none" (shallow); see blocks.convert_direct."""
    if error_at not in ERROR_AT:
        raise ValueError(f"error_at must be one of {ERROR_AT}, got {error_at!r}")
    convert_direct(
        model, signal, rfb_mag, gen, blocks=blocks, output=output, input_shape=input_shape, error_at=error_at
    )
