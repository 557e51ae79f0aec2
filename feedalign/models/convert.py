"""`convert(model, rule)`: put a learning rule on an existing PyTorch model, in place.

fa and the rest of the per-layer family turn every weight layer of torch.nn (Linear,
Conv*, ConvTranspose*, MultiheadAttention, RNN/LSTM/GRU) into its fa twin in place
(same parameters, plus a feedback per weight) on any module tree, and refuse by name
what they cannot train (docs/fa.md). The direct rules (dfa, drtp, shallow) put taps
at block boundaries and an Output after the output layer, on any module tree too:
where, is feedalign/models/blocks.py's business (docs/models.md).
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from torch import Tensor, nn

from feedalign.checks import CONVERT_LIMITS, check_limits, shape
from feedalign.models.blocks import BlockSpec, convert_direct, sequential_input
from feedalign.rules import RULES, calls, check_rule
from feedalign.rules.dfa import DFAOutput
from feedalign.rules.fa import (
    FABilinear,
    FAConv1d,
    FAConv2d,
    FAConv3d,
    FAConvTranspose1d,
    FAConvTranspose2d,
    FAConvTranspose3d,
    FALayer,
    FALinear,
)
from feedalign.rules.fa_attention import FAMultiheadAttention
from feedalign.rules.fa_recurrent import FAGRU, FALSTM, FARNN, FAGRUCell, FALSTMCell, FARNNCell
from feedalign.rules.feedback import (
    add_feedback,
    feedback_for,
    generator,
    init_bound,
    uniform,
    xavier_bound,
)
from feedalign.rules.local import LocalOutput

TRAINABLE = (nn.Linear, nn.Conv2d)  # the layers build_model initialises (docs/original.md §1)
ERROR_AT = ("logits", "output")


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
    taps: str = "macro",
    feedback_init: str = "random",
    init: str = "default",
    example: Tensor | None = None,
) -> nn.Module:
    """Make `model` learn by `rule` (a name in `feedalign.RULES`); returns the same object.

    rfb_mag: 0 = defaults (fa: see feedback_init; dfa: B_i ~ U[±1/sqrt(n_i)],
        docs/original.md §1); X > 0: every feedback matrix ~ U[-X, X].
    seed: seeds the feedback draw (fa: hashed, so never torch's global stream for the
        same seed; None: a fresh seed).
    input_shape: direct rules: per-sample input shape, e.g. (3, 32, 32); draws the
        feedback now with a forward on zeros. Not needed: without it the taps are
        sized at the first forward pass (also for integer inputs such as token ids).
        Local rules (pred, sim, predsim, …) need it, or `example`, unless the model is an
        nn.Sequential starting with a Linear: their heads are parameters, built now.
    example: instead of input_shape, a batch of inputs (any dtype: token ids) run once
        without gradients to size the taps.
    blocks, output: direct rules: the blocks (module names, or a predicate
        (name, module) -> bool) and the output layer's name, instead of the automatic
        choice (docs/models.md, "Your own model"; feedalign.describe lists it).
    taps: direct rules: "macro" (default), one tap per block; "micro", also one after each
        transformer block's attention sub-module (Launay et al. 2020; docs/models.md).
    error_at: direct rules only. "logits" (default): e = dL/d(output layer's output).
        "output": e = dL/d(model output), the original's behaviour under `ce`
        (there the gradient w.r.t. log-softmax, -onehot/N; docs/original.md §3 calls it a defect).
    feedback_init: per-layer rules (fa, usf, frsf, brsf, kp), with rfb_mag 0. "random"
        (default): each B_0 is an independent draw from its layer's default
        initialisation; "weights": a copy of the current weights (the original's fa;
        build_model uses it for fa).
    init: per-layer rules, the distribution their feedback follows (B_0's draw, usf's
        scale s = b/√3, brsf's draws U(±b)): "default" — each layer's own default
        initialisation; "xavier" — xavier-uniform, b = √(6/(fan_in + fan_out)) (BioTorch's).
    """
    spec = RULES[check_rule(rule)]
    check_limits({"rfb_mag": rfb_mag, "seed": seed}, CONVERT_LIMITS)  # rfb_mag 0: docs/original.md §1's
    if input_shape is not None:
        check_limits({"input_shape": input_shape}, {"input_shape": shape()})
    if rule_of(model) != "bp":
        raise ValueError("model is already converted; build a fresh model to change its rule")
    if init not in FEEDBACK_BOUNDS:
        raise ValueError(f"init must be one of {', '.join(FEEDBACK_BOUNDS)}, got {init!r}")
    if spec.kind == "per-layer":
        _convert_fa(model, rule, rfb_mag, generator(seed), feedback_init=feedback_init, init=init)
    elif spec.kind == "direct":  # where the taps go: feedalign/models/blocks.py
        if error_at not in ERROR_AT:
            raise ValueError(f"error_at must be one of {ERROR_AT}, got {error_at!r}")
        convert_direct(
            model, spec.signal, rfb_mag, generator(seed),
            blocks=blocks, output=output, input_shape=input_shape, error_at=error_at, taps=taps,
            example=example,
        )  # fmt: skip
    elif spec.kind == "local":  # the direct rules' taps, each block's own loss at the Output
        if input_shape is None and example is None and sequential_input(model) is None:
            raise ValueError(
                f"{rule}: each block's local head is built at conversion, from the size of the block's "
                "output, so convert must run the model once: pass input_shape=(per-sample shape) or "
                "example=<a batch of inputs> (token ids, for instance)"
            )
        convert_direct(
            model, "local", 0.0, generator(seed), blocks=blocks, output=output, input_shape=input_shape,
            taps=taps, rule=rule, new_output=partial(LocalOutput, spec), example=example,
        )  # fmt: skip
    model.learning_rule = rule  # what rule_of() reports
    return model


def feedback(model: nn.Module) -> list[Tensor]:
    """The feedback matrices in module order: per-layer rules — for each weight the
    rule trains, the B its backward uses now (the weight's shape; computed from W for
    usf / frsf / brsf, so writing into those changes nothing; a weight outside torch's
    layer kinds once a training forward has used it as one); direct rules — B_i of
    shape (n_outputs, n_i); local rules — the fixed B (128, n_i) of each -bio pred
    decoder (none for the others); bp — empty."""
    out: list[Tensor] = []
    with torch.no_grad():  # no side effects: brsf redraws only in a training forward
        for m in model.modules():
            if isinstance(m, DFAOutput):
                out.extend(m.split())
        for m, name, status in calls.rule_weights(model).values():
            if status in ("layer", "calls"):
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


# --- fa ---------------------------------------------------------------------------

FEEDBACK_INITS = ("random", "weights")
FEEDBACK_BOUNDS = {"default": None, "xavier": xavier_bound}  # convert(init=...): b per weight
FA_SEED_SALT = "feedalign.fa.feedback"  # feedback seeds are hashed: never torch's global stream for a seed
# torch layer -> its fa twin (subclasses that keep the torch forward get a twin made from both)
FA_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: FALinear, nn.Conv1d: FAConv1d, nn.Conv2d: FAConv2d, nn.Conv3d: FAConv3d,
    nn.ConvTranspose1d: FAConvTranspose1d, nn.ConvTranspose2d: FAConvTranspose2d,
    nn.ConvTranspose3d: FAConvTranspose3d, nn.MultiheadAttention: FAMultiheadAttention,
    nn.RNN: FARNN, nn.LSTM: FALSTM, nn.GRU: FAGRU,
    nn.RNNCell: FARNNCell, nn.LSTMCell: FALSTMCell, nn.GRUCell: FAGRUCell, nn.Bilinear: FABilinear,
}  # fmt: skip
_SUBCLASS_TWINS: dict[type[nn.Module], type[nn.Module]] = {}


def _torch_base(cls: type[nn.Module]) -> type[nn.Module] | None:
    return next((base for base in FA_TWINS if issubclass(cls, base)), None)


def _unsupported(m: nn.Module) -> str | None:
    """Why fa cannot train module `m`'s weights (None: it can, or `m` has no weight of its own)."""
    if isinstance(m, nn.modules.lazy.LazyModuleMixin):
        return "a lazy module: run one forward pass before converting"
    return None


def _has_twin(m: nn.Module) -> bool:
    """A torch layer kind whose forward is torch's own (subclasses included): its twin's
    forward uses B. A subclass with its own forward keeps it; rules/calls.py follows
    the calls that forward makes."""
    base = _torch_base(type(m))
    return base is not None and (type(m).forward is base.forward or isinstance(m, FALayer))


def _fa_twin(layer: nn.Module) -> None:
    """Turn `layer` into its fa twin in place: the class is swapped, so its Parameter objects,
    hooks and attributes stay (optimizers built earlier and state_dict keys still work)."""
    layer.__class__ = twin_class(type(layer))


def twin_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The fa twin of torch layer class `cls`. A subclass that keeps the torch forward
    (e.g. attention's NonDynamicallyQuantizableLinear) gets a class made once, from
    the twin and `cls`, which pickles by way of `cls` (no importable name of its own)."""
    if cls in FA_TWINS:
        return FA_TWINS[cls]
    if cls not in _SUBCLASS_TWINS:
        bases = (FA_TWINS[_torch_base(cls)], cls)
        _SUBCLASS_TWINS[cls] = type(f"FA{cls.__name__}", bases, {"__reduce_ex__": _reduce_twin})
    return _SUBCLASS_TWINS[cls]


def _reduce_twin(layer: nn.Module, protocol: int):
    """pickle / torch.save of a whole model: rebuild the twin of the user's class."""
    return _rebuild_twin, (type(layer).__bases__[1],), layer.__getstate__()


def _rebuild_twin(cls: type[nn.Module]) -> nn.Module:
    return nn.Module.__new__(twin_class(cls))


def _fa_layers(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str, Tensor]]]:
    """What fa converts: the layers that get a twin (named_modules order), and every other
    weight as (owner, attribute, parameter) — a trainable float parameter of ≥ 2 dims
    outside the twins, not an nn.Embedding's table (indexed, not multiplied; a table
    tied to an output layer is that layer's weight). Refuses, by name, what it cannot train."""
    twins, bad, inside = [], [], set()
    for name, m in model.named_modules():
        if id(m) in inside:  # out_proj of an attention layer: the attention twin trains it
            continue
        why = _unsupported(m)
        if why is not None:
            bad.append(f"{name or '<root>'} ({type(m).__name__}: {why})")
        elif _has_twin(m):
            twins.append(m)
            inside.update(id(c) for c in m.modules())
    if bad:
        raise ValueError(f"fa cannot train these layers' weights: {'; '.join(bad)}")
    seen = {id(p) for m in twins for p in m.parameters()}
    others = []
    for m in model.modules():
        if id(m) in inside:
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad or not p.is_floating_point() or p.dim() < 2:
                continue
            seen.add(id(p))
            if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                others.append((m, pname, p))
    if not twins and not others:
        kinds = ", ".join(c.__name__ for c in FA_TWINS)
        raise ValueError(
            f"fa: the model has no layer with weights to train by fa"
            f" (a parameter of ≥ 2 dims; layers: {kinds})"
        )
    return twins, others


def _fa_generator(gen: torch.Generator | None) -> torch.Generator:
    """A generator for the feedback draw: `gen`'s seed hashed with a constant, so that
    `torch.manual_seed(s); model = Net(); convert(model, "fa", seed=s)` does not redraw W;
    without a seed, a fresh seed from the OS (never torch's global stream)."""
    seed = torch.Generator().seed() if gen is None else gen.initial_seed()
    digest = hashlib.sha256(f"{FA_SEED_SALT}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _convert_fa(model: nn.Module, rule: str, rfb_mag: float, gen: torch.Generator | None, *,
                feedback_init: str = "random", init: str = "default") -> None:  # fmt: skip
    """Give every weight layer of `model` the per-layer `rule` (fa family), in place.

    B_0 of each weight: rfb_mag > 0 — U[-rfb_mag, rfb_mag]; else feedback_init
    "random" — an independent draw from the layer's default initialisation
    U(±bound) (Linear/Conv: 1/√fan_in; RNN: 1/√hidden; attention in_proj: xavier);
    "weights" — a copy of the current weights (the original's choice, docs/original.md §1).
    """
    if feedback_init not in FEEDBACK_INITS:
        raise ValueError(f"feedback_init must be one of {FEEDBACK_INITS}, got {feedback_init!r}")
    layers, others = _fa_layers(model)
    gen = _fa_generator(gen)

    def initial(w: Tensor, bound: float) -> Tensor:
        if rfb_mag > 0:
            return uniform(w.shape, rfb_mag, gen, dtype=w.dtype, device=w.device)
        if feedback_init == "weights":
            return w.detach().clone()
        return uniform(w.shape, bound, gen, dtype=w.dtype, device=w.device)

    for layer in layers:
        _fa_twin(layer)
        layer.fa_setup(rule, initial, FEEDBACK_BOUNDS[init])
    bound_of = (
        FEEDBACK_BOUNDS[init] or init_bound
    )  # Linear's default U(±1/√fan_in), fan_in = numel / shape[0]
    for owner, name, w in others:
        bound = bound_of(w.detach())
        add_feedback(owner, name, initial(w.detach(), bound), rule, bound)
    calls.install(model, rule)
