"""Direct feedback alignment (dfa): error taps and the output broadcast (SPEC §1).

A network of hidden blocks h_1 … h_L and an output layer with logits y.
With e = dL/dy (the output error, shape (N, n_out)):

    output layer:   trained with the true error e
    hidden block i: receives  e · B_i   (B_i: (n_out, n_i), n_i = C·H·W of the tap input)
                    reshaped to the tap input, then flows back through the block only.

How it sits in one autograd graph, with no wasted work:

    ErrorTap (end of block i), forward: records its input h_i and passes on
        h_i.detach() — the graph is cut, so nothing from above ever reaches block
        i through the transposed weight of block i+1 (autograd does not even
        compute that product: the next layer's input does not require grad).
    DFAOutput (after the output layer), forward: y -> DFAFunction(y, B, h_1..h_L),
        the identity on y whose backward turns e into e·[B_1 … B_L] with ONE
        matrix product and hands each slice to its h_i as that tap's gradient.

Taps and output share a `Broadcast` (a plain object, not a module) holding the
recorded h_i of the current forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DFAFunction(torch.autograd.Function):
    """Forward: y (identity). Backward: e -> (e, e·B split and reshaped to each h_i)."""

    @staticmethod
    def forward(ctx, y: Tensor, feedback: Tensor, *taps: Tensor) -> Tensor:
        ctx.save_for_backward(feedback)
        ctx.shapes = [t.shape for t in taps]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, e: Tensor):
        (feedback,) = ctx.saved_tensors  # (n_out, Σ n_i)
        projected = e @ feedback.to(e.dtype)  # (N, n_out) @ (n_out, Σ n_i) -> (N, Σ n_i)
        sizes = [s[1:].numel() for s in ctx.shapes]
        grads = [p.reshape(s) for p, s in zip(projected.split(sizes, dim=1), ctx.shapes)]
        return (e, None, *grads)


class Broadcast:
    """The tap inputs h_1..h_L of the forward pass in flight (index = tap order)."""

    def __init__(self, n_taps: int) -> None:
        self.inputs: list[Tensor | None] = [None] * n_taps
        self.sizes: list[int] = [0] * n_taps  # n_i, filled by the probe forward
        self.probing = False

    def __deepcopy__(self, memo):  # copies of a model must not share recorded tensors
        new = Broadcast(len(self.inputs))
        new.sizes = list(self.sizes)
        return new


class ErrorTap(nn.Module):
    """Identity forward that cuts the graph; in backward its input receives e·B_i."""

    rule = "dfa"

    def __init__(self, index: int, broadcast: Broadcast) -> None:
        super().__init__()
        self.index = index
        self.broadcast = broadcast
        self.rule_active = True

    def forward(self, h: Tensor) -> Tensor:
        if self.broadcast.probing:
            self.broadcast.sizes[self.index] = h[0].numel()
        if not self.rule_active or not torch.is_grad_enabled():
            return h
        self.broadcast.inputs[self.index] = h
        return h.detach()

    def extra_repr(self) -> str:
        return f"index={self.index}, n={self.broadcast.sizes[self.index]}"


class DFAOutput(nn.Module):
    """Placed right after the output layer (on the logits). Holds the concatenated
    feedback buffer `feedback` (n_out, Σ n_i) and broadcasts e to every tap."""

    rule = "dfa"

    def __init__(self, broadcast: Broadcast, n_out: int) -> None:
        super().__init__()
        self.broadcast = broadcast
        self.n_out = n_out
        self.register_buffer("feedback", torch.zeros(n_out, 0))
        self.rule_active = True

    def forward(self, y: Tensor) -> Tensor:
        inputs = self.broadcast.inputs
        if not self.rule_active or not torch.is_grad_enabled():
            return y
        taps = [h for h in inputs if h is not None]
        if len(taps) != len(inputs):
            missing = [i for i, h in enumerate(inputs) if h is None]
            raise RuntimeError(f"dfa: taps {missing} saw no input in this forward pass")
        if y.dim() != 2 or y.shape[1] != self.n_out:
            raise RuntimeError(f"dfa: expected logits of shape (N, {self.n_out}), got {tuple(y.shape)}")
        self.broadcast.inputs = [None] * len(inputs)  # drop references; next pass starts clean
        return DFAFunction.apply(y, self.feedback, *taps)

    def split(self) -> list[Tensor]:
        """Views B_i (n_out, n_i) of the concatenated buffer, in forward order."""
        return list(self.feedback.split(self.broadcast.sizes, dim=1))

    def extra_repr(self) -> str:
        return f"n_out={self.n_out}, taps={len(self.broadcast.sizes)}"
