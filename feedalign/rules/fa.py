"""Feedback alignment (fa): Linear and Conv2d layers whose backward sends the
error to their input through a fixed random matrix B instead of Wᵀ (SPEC §1).

For a layer y = x Wᵀ + b with output error δ = dL/dy:

    dL/dW = δᵀ x            (the usual weight gradient)
    dL/db = Σ_batch δ
    "dL/dx" := δ B          (fa: B replaces W; B has W's shape)

Conv2d is the same with the transposed convolution of δ by the kernel B.
Each autograd Function below holds the forward and the backward of one layer
kind side by side. While `rule_active` is False (see `feedalign.backprop`) the
layers compute ordinary back-propagation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedalign.rules.feedback import add_feedback, feedback_for


class FALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b; backward: dx = δ B, dW = δᵀ x, db = Σ δ. x: (*, in), δ: (*, out)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, feedback = ctx.saved_tensors
        dt = grad_out.dtype  # under autocast (bf16) the products run in the gradient's dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ feedback.to(dt)  # (*, out) @ (out, in) -> (*, in)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out), leading dims folded
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(dt)  # (out, N) @ (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        # kp: a trainable B receives W's gradient (rules/feedback.py, KolenPollack)
        grad_fb = grad_w if ctx.needs_input_grad[3] else None
        return grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b, grad_fb


class FAConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, W) + b; backward: dx = conv_transpose(δ, B), dW = x ⋆ δ, db = Σ δ.
    x: (N, C_in, H, W), δ: (N, C_out, H', W')."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, feedback)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, feedback = ctx.saved_tensors
        dt = grad_out.dtype  # under autocast (bf16) the products run in the gradient's dtype
        x, weight, feedback = x.to(dt), weight.to(dt), feedback.to(dt)
        stride, padding, dilation, groups = ctx.conf
        conv_backward = torch.ops.aten.convolution_backward
        common = (stride, padding, dilation, False, [0, 0], groups)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the error through B, not W
            grad_x = conv_backward(grad_out, x, feedback, None, *common, [True, False, False])[0]
        want_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]  # kp: B gets W's gradient too
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if want_w or want_b:
            bias_sizes = [weight.shape[0]] if want_b else None
            _, grad_w, grad_b = conv_backward(
                grad_out, x, weight, bias_sizes, *common, [False, want_w, want_b]
            )
        grad_fb = grad_w if ctx.needs_input_grad[3] else None
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad_b, grad_fb, None, None, None, None


class FALinear(nn.Linear):
    """nn.Linear trained by feedback alignment; `feedback` (out, in) is a buffer."""

    rule = "fa"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw) -> None:
        super().__init__(in_features, out_features, bias, **kw)
        add_feedback(self, "weight", torch.zeros_like(self.weight))
        self.rule_active = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.rule_active or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return FALinearFunction.apply(x, self.weight, self.bias, feedback_for(self))


class FAConv2d(nn.Conv2d):
    """nn.Conv2d trained by feedback alignment; `feedback` (C_out, C_in/g, kH, kW) is a buffer."""

    rule = "fa"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(
                f"fa supports Conv2d with numeric zero padding only, got "
                f"padding={self.padding!r}, padding_mode={self.padding_mode!r}"
            )
        add_feedback(self, "weight", torch.zeros_like(self.weight))
        self.rule_active = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.rule_active or not torch.is_grad_enabled():
            return super().forward(x)
        return FAConv2dFunction.apply(
            x,
            self.weight,
            self.bias,
            feedback_for(self),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
