"""No weight silently left on back-propagation under a per-layer rule (fa family).

`convert` swaps every layer type it knows (Linear, Conv*, ConvTranspose*,
MultiheadAttention, RNN/LSTM/GRU) for its fa twin. A custom `forward` can
still multiply by a raw `nn.Parameter` — `F.linear(x, self.w)`, `x @ self.w.T`,
`torch.einsum(..., self.w)`, `F.conv1d(x, self.kernel)` — and autograd would then
send the error back through that weight's transpose: back-prop in disguise.

`install(model)` adds a forward pre-hook and an always-called forward hook to the
converted model. At its first forward in training mode with gradients on, a
TorchFunctionMode watches every weight-multiplying torch function; if an operand
is (a view of) a trainable parameter of the model that no per-layer rule handles,
it raises a ValueError naming the parameter. Parameters that are only added or
multiplied elementwise (a learned position embedding, a cls token, a LayerScale
gamma, norm and embedding tables) pass: they learn from the error that reaches
them. After one clean training forward the hooks do nothing.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from feedalign.rules.feedback import feedback_name

CONVS = {f"conv{d}d" for d in (1, 2, 3)} | {f"conv_transpose{d}d" for d in (1, 2, 3)}
# function name -> position of its additive operand (bias / "input" of add*), which is not a weight
PRODUCTS = {"linear": 2, "bilinear": 3, "addmm": 0, "baddbmm": 0, "addbmm": 0, "addmv": 0, "addr": 0,
            **dict.fromkeys(CONVS, 2),
            **dict.fromkeys(("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "einsum", "tensordot",
                             "inner", "outer", "chain_matmul", "multi_dot"), None)}  # fmt: skip


def unhandled_weights(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> qualified name, for every trainable parameter of `model` that
    is not the weight of a layer under a per-layer rule."""
    handled, names = set(), {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if hasattr(m, feedback_name(pname)):  # the weight and its feedback (a Parameter under kp)
                handled.update((id(p), id(getattr(m, feedback_name(pname)))))
            elif p.requires_grad:
                names.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
    return {k: v for k, v in names.items() if k not in handled}


def _operands(args, kwargs, skip: int | None):
    for i, a in enumerate(args):
        if i == skip:
            continue
        if isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))
        elif isinstance(a, Tensor):
            yield a
    yield from (v for k, v in kwargs.items() if isinstance(v, Tensor) and k not in ("bias", "input"))


class UnhandledWeightCheck(TorchFunctionMode):
    """Raises when a product (linear, conv, matmul, einsum, …) takes a weight in `unhandled`."""

    def __init__(self, unhandled: dict[int, str], model_name: str) -> None:
        super().__init__()
        self.unhandled, self.model_name = unhandled, model_name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in PRODUCTS and self.unhandled:
            for t in _operands(args, kwargs, PRODUCTS[name]):
                base = t if t._base is None else t._base  # w.T, w[:k] are views of w
                if id(base) in self.unhandled:
                    raise ValueError(
                        f"fa cannot give a rule to parameter {self.unhandled[id(base)]!r} of "
                        f"{self.model_name}: it is used as a weight through {name}() in a custom forward, "
                        "where autograd would train it (and the layers below it) by back-propagation. "
                        "Use an nn.Linear / Conv* / MultiheadAttention / RNN|LSTM|GRU module for it, "
                        "or convert with rule 'bp'"
                    )
        return func(*args, **kwargs)


def _enter(module: nn.Module, args) -> None:
    if not module.__dict__.get("_fa_unchecked") or not module.training or not torch.is_grad_enabled():
        return
    if torch.compiler.is_compiling():  # checked by the first eager training forward only
        return
    mode = UnhandledWeightCheck(unhandled_weights(module), type(module).__name__)
    mode.__enter__()
    module.__dict__["_fa_guard_mode"] = mode


def _exit(module: nn.Module, args, output) -> None:
    mode = module.__dict__.pop("_fa_guard_mode", None)
    if mode is None:
        return
    mode.__exit__(None, None, None)
    if sys.exc_info()[0] is None:  # the forward completed: the model is checked
        module.__dict__["_fa_unchecked"] = False


def install(model: nn.Module) -> None:
    """Check `model`'s first training forward for weights used outside a per-layer rule."""
    model.__dict__["_fa_unchecked"] = True
    model.register_forward_pre_hook(_enter)
    model.register_forward_hook(_exit, always_call=True)
