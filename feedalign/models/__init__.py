"""Network registry and `build_model`: the paper's networks with docs/original.md §1's initialisation."""

from __future__ import annotations

import importlib.util
import math
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from feedalign.checks import MODEL_LIMITS, check_limits, shape
from feedalign.losses import CRITERIA
from feedalign.models.conv import conv
from feedalign.models.convert import TRAINABLE, convert, feedback, rule_of
from feedalign.models.language import gpt, lstm
from feedalign.models.lenet import lenet
from feedalign.models.mlp import mlp
from feedalign.models.resnet import resnet20
from feedalign.models.structure import is_weight_layer
from feedalign.rules import RULES, check_rule
from feedalign.rules.feedback import fan_in, generator, xavier_bound
from feedalign.rules.local import LocalOutput

NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp, "conv": conv, "lenet": lenet, "resnet20": resnet20, "gpt": gpt, "lstm": lstm,
}  # fmt: skip
LANGUAGE_MODELS = ("gpt", "lstm")  # token windows (T,) in, (T, vocabulary) out: text datasets
NONLINS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh, "sigm": nn.Sigmoid, "relu": nn.ReLU,
    "leakyrelu": partial(nn.LeakyReLU, 0.01),  # slope 0.01: the local-loss reference's
}  # fmt: skip
FEEDBACK_SEED_OFFSET = 1_000_003  # feedback draws must not replay the weight stream

__all__ = [
    "NETWORKS",
    "NONLINS",
    "ModelFileError",
    "build_model",
    "convert",
    "feedback",
    "rule_of",
    "find_network",
]


def find_network(network: str, models_folder: str | Path | None = None) -> Callable[..., nn.Module]:
    """`mlp`, `conv` (also `mlp.lua`, `conv.lua`), or `<models_folder>/<network>.py`
    defining `build(input_shape, n_classes, **options) -> nn.Module` (docs/original.md §6)."""
    name = network.removesuffix(".lua").removesuffix(".py")
    if name in NETWORKS:
        return NETWORKS[name]
    if models_folder is not None:
        path = Path(models_folder) / f"{name}.py"
        if path.is_file():
            return _model_file(path, name)
    where = f" or a file {Path(models_folder) / (name + '.py')}" if models_folder else ""
    raise ValueError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}{where}")


class ModelFileError(ValueError):
    """A -network model file that fails to import, lacks build(), or whose build() fails or
    returns something other than an nn.Module."""


BUILD = "build(input_shape, n_classes, **options)"


def _model_file(path: Path, name: str) -> Callable[..., nn.Module]:
    """`path`'s build(), wrapped: whatever the file gets wrong is one ModelFileError naming it."""
    spec = importlib.util.spec_from_file_location(f"feedalign_user_model_{name}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's code: say where, not a traceback through feedalign
        raise ModelFileError(f"{path}: importing it raised {_where(err, path)}; fix the file") from err
    build = getattr(module, "build", None)
    if not callable(build):
        raise ModelFileError(f"{path} must define {BUILD} returning the network (a torch.nn.Module)")

    def checked_build(*args, **kw) -> nn.Module:
        try:
            model = build(*args, **kw)
        except Exception as err:
            raise ModelFileError(f"{path}: {BUILD} raised {_where(err, path)}; it must return the network "
                                 "(a torch.nn.Module)") from err  # fmt: skip
        if not isinstance(model, nn.Module):
            got = f"{type(model).__name__} {_short(model)}"
            raise ModelFileError(f"{path}: {BUILD} returned {got}, not a torch.nn.Module; it must return "
                                 "the network, e.g. nn.Sequential(…)")  # fmt: skip
        return model

    return checked_build


def _where(err: Exception, path: Path) -> str:
    """ "ZeroDivisionError: division by zero (line 5)": the deepest line of `path` in the traceback."""
    mine = path.resolve()
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == mine]
    if isinstance(err, SyntaxError):  # its text names the line already
        lines = []
    return f"{type(err).__name__}: {err}" + (f" (line {lines[-1]})" if lines else "")


def _short(value: object) -> str:
    text = repr(value)
    return f"({text[:40]}…)" if len(text) > 40 else f"({text})"


def init_classic(model: nn.Module, gen: torch.Generator | None) -> None:
    """docs/original.md §1: weight and bias ~ U[±1/sqrt(fan_in)] for every Linear/Conv2d."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TRAINABLE):
                bound = 1.0 / math.sqrt(fan_in(m.weight))
                m.weight.uniform_(-bound, bound, generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=gen)


def init_xavier(model: nn.Module, gen: torch.Generator | None) -> None:
    """BioTorch's default: weight ~ xavier-uniform U(±√(6/(fan_in + fan_out))), bias 0,
    for every Linear/Conv2d."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TRAINABLE):
                m.weight.uniform_(-1.0, 1.0, generator=gen).mul_(xavier_bound(m.weight))
                if m.bias is not None:
                    m.bias.zero_()


# build_model(init=...): how W is drawn, and the distribution convert() gives the feedback
INITS = {"classic": (init_classic, "default"), "xavier": (init_xavier, "xavier")}
FEEDBACK_INITS = ("original", "random", "weights")  # build_model's; convert takes the last two


def build_model(
    network: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    rule: str = "dfa",
    nonlin: str = "tanh",
    num_layers: int = 2,
    num_hidden: int = 800,
    dropout: int = 0,
    batchnorm: int = 0,
    bias: bool = True,
    rfb_mag: float = 0.0,
    criterion: str = "bce",
    seed: int | None = None,
    models_folder: str | Path | None = None,
    error_at: str = "logits",
    feedback_init: str = "original",
    init: str = "classic",
    heads: int = 4,
    dropout_rate: float = 0.0,
    taps: str = "macro",
) -> nn.Module:
    """Build `network` ("mlp" or "conv") for inputs of `input_shape` (C, H, W),
    learning by `rule` (a name in `feedalign.RULES`; the CLI's `-gradient`),
    initialised as docs/original.md §1: classic uniform init; then, for the rules
    the original had (fa, dfa; `original_init` in the table) with tanh/sigm, every
    Linear/Conv2d weight and bias set to zero, fa's feedback being copied from the
    initial weights before that. The other rules draw their feedback independently
    and keep the random weights (sign rules send no error through sign(0) = 0).
    feedback_init: "original" (as just said), or "random" / "weights" for every
    per-layer rule (e.g. "random": fa with a B drawn independently of W, as BioTorch).
    init: "classic" (the original's U[±1/sqrt(fan_in)]) or "xavier" (xavier-uniform
    weights, zero biases, and the per-layer rules' feedback drawn and scaled like
    xavier-uniform: BioTorch's default).
    A network with its own initialisation (a method `init_weights(generator)`: gpt, lstm)
    is drawn by it, never zeroed, and "original" gives every per-layer rule a random B.
    heads, dropout_rate: the language models' attention heads and dropout probability;
        mlp: dropout_rate > 0 puts Dropout(dropout_rate) after each hidden layer.
    taps: direct rules, convert's: "macro" (one tap per block) or "micro" (also after attention)."""
    spec = RULES[check_rule(rule)]
    limited = dict(n_classes=n_classes, num_layers=num_layers, num_hidden=num_hidden, dropout=dropout,
                   batchnorm=batchnorm, rfb_mag=rfb_mag, seed=seed, heads=heads, dropout_rate=dropout_rate,
                   input_shape=input_shape)  # fmt: skip
    _check_names(feedback_init=feedback_init, init=init, nonlin=nonlin, criterion=criterion)
    check_limits(limited, MODEL_LIMITS | {"input_shape": shape()})  # the command line's limits (checks.py)
    build = find_network(network, models_folder)
    extra = {"heads": heads, "dropout_rate": dropout_rate} if build in (gpt, lstm) else {}
    if build is mlp and dropout_rate:  # the hidden layers' dropout probability
        extra = {"dropout_rate": dropout_rate}
    model = build(tuple(input_shape), n_classes, nonlin=NONLINS[nonlin], num_layers=num_layers,
                  num_hidden=num_hidden, dropout=dropout, batchnorm=batchnorm, bias=bias,
                  log_softmax=CRITERIA[criterion][1], **extra)  # fmt: skip
    first = next((m for m in model.modules() if is_weight_layer(m)), None)
    tokens = isinstance(first, nn.Embedding)  # token ids in (gpt, lstm, a model file's LM): probed below
    init_weights, feedback_dist = INITS[init]
    own_init = callable(getattr(model, "init_weights", None))
    if own_init:
        model.init_weights(generator(seed))
    else:
        init_weights(model, generator(seed))
    fb_seed = None if seed is None else seed + FEEDBACK_SEED_OFFSET
    if feedback_init == "original":  # fa's B copied from W where W is then zeroed (below)
        feedback_init = "weights" if spec.original_init and not own_init else "random"
    example = torch.zeros(2, *input_shape, dtype=torch.long) if tokens and spec.kind == "local" else None
    convert(model, rule, rfb_mag=rfb_mag, seed=fb_seed, input_shape=None if tokens else tuple(input_shape),
            example=example, error_at=error_at, taps=taps, feedback_init=feedback_init,
            init=feedback_dist)  # fmt: skip
    if tokens and spec.kind == "direct":
        with torch.no_grad():  # one pass on token ids draws the direct rules' B now, as input_shape does
            model.eval()(torch.zeros(2, *input_shape, dtype=torch.long)).sum()
            model.train()
    if spec.original_init and nonlin in ("tanh", "sigm") and not own_init:
        _zero_trainable(model)  # docs/original.md §1: dfa learns from a zero initial condition
    if spec.kind == "local":
        _zero_local_output(model)
    return model


# build_model's named options and the values each may take
NAMED_CHOICES = {"feedback_init": FEEDBACK_INITS, "init": INITS, "nonlin": NONLINS, "criterion": CRITERIA}


def _check_names(**named: str) -> None:
    """Refuse a named option outside its choices, listing them."""
    for option, value in named.items():
        if value not in NAMED_CHOICES[option]:
            raise ValueError(f"unknown {option} {value!r}; choose one of {', '.join(NAMED_CHOICES[option])}")


@torch.no_grad()
def _zero_trainable(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, TRAINABLE):
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()


@torch.no_grad()
def _zero_local_output(model: nn.Module) -> None:
    """The local rules' output weight starts at zero, as the reference's: its input is cut, so no
    error goes down through it. A weight tied to an embedding (read twice) keeps its values."""
    uses = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    for out in (m for m in model.modules() if isinstance(m, LocalOutput) and m.site):
        layer = model.get_submodule(out.site)
        if isinstance(layer, TRAINABLE) and uses.count(id(layer.weight)) == 1:
            layer.weight.zero_()
