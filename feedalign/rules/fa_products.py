"""The per-layer rules on a weight used through a torch call in any `forward`.

`rules/calls.py` watches a converted model's forward; when a call multiplies by a
weight that has a feedback B — `F.linear(x, self.qkv.weight)`, `torch.addmm(b, x, w)`
(transformers' Conv1D, weight (in, out)), `x @ w`, `torch.einsum(eq, x, w)`,
`F.conv2d(x, self.kernel)`, a tied head `F.linear(h, lm_head.weight)` — it hands the
call to `ROUTES[name]` here, which computes the same value through an fa autograd
Function: the error reaching the output goes to the data operand through B (of the
weight's shape, viewed as the weight is) in place of the weight, and the weight's
own gradient is the true one (rules/fa.py gives the formulas).

Each route gets (args, kwargs, b), with b(t) the B of operand t (None when t is not a
weight with a B), and returns the call's value, or None when it cannot route this
form of the call (calls.py then refuses it by name).
"""

from __future__ import annotations

import string

import torch
import torch.nn.functional as F
from torch import Tensor

from feedalign.rules.fa import FABilinearFunction, FAConvFunction, fa_linear


def _get(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


class FABatchedMatmulFunction(torch.autograd.Function):
    """y = x @ W for a weight with batch dims (…, in, out), broadcast as torch.matmul;
    backward: dx = δ @ Bᵀ, dW = xᵀ @ δ (summed over broadcast dims); dB = dW when B
    needs a gradient (kp). x: (…, n, in), δ: (…, n, out)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.w_shape = weight.shape
        return torch.matmul(x, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, feedback = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = (grad_out @ feedback.to(grad_out.dtype).mT).sum_to_size(x.shape) if need[0] else None
        gw = None
        if need[1] or need[2]:
            gw = (x.to(grad_out.dtype).mT @ grad_out).sum_to_size(ctx.w_shape)
        return gx, gw if need[1] else None, gw if need[2] else None


def fa_matmul(x: Tensor, w: Tensor, B: Tensor) -> Tensor:
    """x @ w with the weight on the right: w (in, out), (in,) or (…, in, out)."""
    if w.dim() == 2:  # x (…, in) -> (…, out): linear with the weight (out, in) = wᵀ
        return fa_linear(x, w.mT, None, B.mT)
    if w.dim() == 1:  # x (…, in) -> (…): a weight vector
        return fa_linear(x, w.unsqueeze(0), None, B.unsqueeze(0)).squeeze(-1)
    if x.dim() == 1:
        return FABatchedMatmulFunction.apply(x.unsqueeze(0), w, B).squeeze(-2)
    return FABatchedMatmulFunction.apply(x, w, B)


def fa_matmul_left(w: Tensor, x: Tensor, B: Tensor) -> Tensor:
    """w @ x with the weight on the left: (x̃ᵀ @ wᵀ)ᵀ, the same products."""
    if x.dim() == 1:  # w (out, in) @ x (in,) = x @ wᵀ
        return fa_matmul(x, w.mT, B.mT) if w.dim() >= 2 else None
    if w.dim() < 2:
        return None
    return fa_matmul(x.mT, w.mT, B.mT).mT


def _matmul(args, kwargs, b):
    a, w = args[0], args[1]
    if b(w) is not None and b(a) is None:
        return fa_matmul(a, w, b(w))
    if b(a) is not None and b(w) is None:
        return fa_matmul_left(a, w, b(a))
    return None


def _rmatmul(args, kwargs, b):  # Tensor.__rmatmul__(self, other) = other @ self
    return _matmul((args[1], args[0]), kwargs, b)


def _scaled(out: Tensor, add: Tensor | None, beta, alpha) -> Tensor:
    """beta·add + alpha·out, as addmm and its relatives define it."""
    out = out if alpha == 1 else alpha * out
    if add is None or beta == 0:
        return out
    return out + (add if beta == 1 else beta * add)


def _addmm(args, kwargs, b):  # addmm / baddbmm / addmv (input, m1, m2, *, beta, alpha)
    product = _matmul((args[1], args[2]), {}, b)
    if product is None:
        return None
    return _scaled(product, args[0], kwargs.get("beta", 1), kwargs.get("alpha", 1))


def _linear(args, kwargs, b):
    x, w, bias = (
        _get(args, kwargs, 0, "input"),
        _get(args, kwargs, 1, "weight"),
        _get(args, kwargs, 2, "bias"),
    )
    if b(w) is None or b(x) is not None:
        return None
    return fa_linear(x, w, bias, b(w))


def _bilinear(args, kwargs, b):
    x1, x2, w = (_get(args, kwargs, i, n) for i, n in enumerate(("input1", "input2", "weight")))
    bias = _get(args, kwargs, 3, "bias")
    if b(w) is None or b(x1) is not None or b(x2) is not None:
        return None
    return FABilinearFunction.apply(x1, x2, w, bias, b(w))


def _tuple(v, nd: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * nd


def _conv(args, kwargs, b, transposed: bool):
    x, w = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "weight")
    if b(w) is None or b(x) is not None:
        return None
    nd = w.dim() - 2
    bias = _get(args, kwargs, 2, "bias")
    stride = _tuple(_get(args, kwargs, 3, "stride", 1), nd)
    if transposed:  # conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
        padding = _tuple(_get(args, kwargs, 4, "padding", 0), nd)
        output_padding = _tuple(_get(args, kwargs, 5, "output_padding", 0), nd)
        groups, dilation = (
            _get(args, kwargs, 6, "groups", 1),
            _tuple(_get(args, kwargs, 7, "dilation", 1), nd),
        )
    else:  # conv(input, weight, bias, stride, padding, dilation, groups)
        padding, output_padding = _get(args, kwargs, 4, "padding", 0), None
        dilation, groups = (
            _tuple(_get(args, kwargs, 5, "dilation", 1), nd),
            _get(args, kwargs, 6, "groups", 1),
        )
        if isinstance(padding, str):  # 'valid' = 0; 'same' keeps the size (stride 1), asymmetric if odd
            total = [0 if padding == "valid" else d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
            pads = [p for t in reversed(total) for p in (t // 2, t - t // 2)]  # F.pad: last dim first
            if any(t % 2 for t in total):
                x, padding = F.pad(x, pads), [0] * nd
            else:
                padding = [t // 2 for t in total]
        padding = _tuple(padding, nd)
    unbatched = x.dim() == nd + 1  # (C, *spatial)
    x = x.unsqueeze(0) if unbatched else x
    y = FAConvFunction.apply(x, w, bias, b(w), stride, padding, dilation, groups, transposed, output_padding)
    return y.squeeze(0) if unbatched else y


class FAEinsumFunction(torch.autograd.Function):
    """y = einsum("x,w->y", X, W) with W a weight; backward: dX = einsum("y,w->x", δ, B),
    dW = einsum("y,x->w", δ, X) (the true gradient); dB = dW when B needs a gradient.
    Subscripts are explicit (no ellipsis), each index at most once per operand, and
    every index of X (of W) appears in W or y (in X or y)."""

    @staticmethod
    def forward(ctx, subs: tuple[str, str, str], x: Tensor, weight: Tensor, feedback: Tensor) -> Tensor:
        ctx.subs = subs
        ctx.save_for_backward(x, feedback)
        return torch.einsum(f"{subs[0]},{subs[1]}->{subs[2]}", x, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        sx, sw, sy = ctx.subs
        x, feedback = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = torch.einsum(f"{sy},{sw}->{sx}", grad_out, feedback.to(grad_out.dtype)) if need[1] else None
        gw = torch.einsum(f"{sy},{sx}->{sw}", grad_out, x.to(grad_out.dtype)) if need[2] or need[3] else None
        return None, gx, gw if need[2] else None, gw if need[3] else None


def _explicit(equation: str, shapes: list[torch.Size]) -> list[str] | None:
    """Operand and output subscripts of `equation` with '...' spelt out in unused letters,
    the output made explicit; None for forms the einsum route does not take."""
    eq = equation.replace(" ", "")
    ins, arrow, out = eq.partition("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    spare = [c for c in string.ascii_letters if c not in eq]
    width = max((len(s) - len(p.replace("...", "")) for p, s in zip(parts, shapes) if "..." in p), default=0)
    if width > len(spare):
        return None
    fill = "".join(spare[:width])

    def spell(p: str, ndim: int) -> str:
        return p.replace("...", fill[width - (ndim - len(p.replace("...", ""))) :]) if "..." in p else p

    parts = [spell(p, len(s)) for p, s in zip(parts, shapes)]
    if not arrow:  # implicit output: the indices seen once, in alphabetical order (after '...')
        counts = "".join(parts)
        out = fill + "".join(sorted(c for c in set(counts) if counts.count(c) == 1 and c not in fill))
    elif "..." in out:
        out = out.replace("...", fill)
    return [*parts, out]


def _einsum(args, kwargs, b):
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2:
        return None
    weights = [i for i, t in enumerate(operands) if b(t) is not None]
    if len(weights) != 1:
        return None
    wi = weights[0]
    subs = _explicit(equation, [t.shape for t in operands])
    if subs is None:
        return None
    sx, sw, sy = subs[1 - wi], subs[wi], subs[2]
    if any(len(set(s)) != len(s) for s in (sx, sw, sy)):
        return None
    if any(c not in sw + sy for c in sx) or any(c not in sx + sy for c in sw):
        return None
    return FAEinsumFunction.apply((sx, sw, sy), operands[1 - wi], operands[wi], b(operands[wi]))


# call name -> its route; every call here multiplies by a weight (calls.py refuses
# the forms a route returns None for)
ROUTES = {
    "linear": _linear, "bilinear": _bilinear,
    "matmul": _matmul, "__matmul__": _matmul, "mm": _matmul, "bmm": _matmul, "mv": _matmul,
    "__rmatmul__": _rmatmul,
    "addmm": _addmm, "baddbmm": _addmm, "addmv": _addmm,
    "einsum": _einsum,
    **{f"conv{d}d": lambda a, k, b: _conv(a, k, b, False) for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": lambda a, k, b: _conv(a, k, b, True) for d in (1, 2, 3)},
}  # fmt: skip
