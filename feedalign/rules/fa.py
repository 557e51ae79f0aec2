"""Feedback alignment (fa): Linear and convolution layers whose backward sends the
error to their input through a fixed random matrix B instead of Wᵀ (docs/original.md §1).

For a layer y = x Wᵀ + b with output error δ = dL/dy:

    dL/dW = δᵀ x            (the usual weight gradient)
    dL/db = Σ_batch δ
    "dL/dx" := δ B          (fa: B replaces W; B has W's shape)

A convolution is the same with the transposed convolution of δ by the kernel B
(and a transposed convolution with the convolution of δ by B). Each autograd
Function below holds the forward and the backward of one layer kind side by side;
it takes B as a tensor argument and, when B itself requires a gradient (a rule
that trains its feedback, such as Kolen–Pollack), returns dL/dW for it too.

The layers get B through `feedback_for(layer, name)` (rules/feedback.py), the one
place where a rule can derive, redraw or train it. While `rule_active` is False
(see `feedalign.backprop`) or gradients are off they compute ordinary torch ops.
Attention and recurrent layers are in fa_attention.py and fa_recurrent.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedalign.rules.feedback import add_feedback, feedback_for, init_bound

# (owning module, weight name, bound of the weight's default init U(±bound))
Slot = tuple[nn.Module, str, float]


class FALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b; backward: dx = δ B, dW = δᵀ x, db = Σ δ (dB = dW when B needs a
    gradient). x: (*, in), δ: (*, out), W and B: (out, in)."""

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
        return (grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b,
                grad_w if ctx.needs_input_grad[3] else None)  # fmt: skip


def fa_linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
    """F.linear whose input error goes through `feedback` in place of `weight`.

    The Function sees 2-d inputs only: F.linear of a (*, in) input returns a view of a
    2-d product, and a view made inside a Function's forward may not be modified in
    place (`ReLU(inplace=True)`, `h += 1` after the layer); reshaped outside it, the
    output is an ordinary autograd view."""
    if x.dim() == 2:
        return FALinearFunction.apply(x, weight, bias, feedback)
    y = FALinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, feedback)  # (N, out)
    return y.view(*x.shape[:-1], y.shape[-1])


class FABilinearFunction(torch.autograd.Function):
    """y_k = x1ᵀ W_k x2 + b_k; backward: dx1 = Σ_k δ_k B_k x2, dx2 = Σ_k δ_k B_kᵀ x1,
    dW_k = Σ_batch δ_k x1 x2ᵀ, db = Σ δ (dB = dW when B needs a gradient).
    x1: (*, in1), x2: (*, in2), δ: (*, out), W and B: (out, in1, in2)."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x1, x2, feedback)
        ctx.has_bias = bias is not None
        return F.bilinear(x1, x2, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x1, x2, feedback = ctx.saved_tensors
        dt = grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        a, b, B = x1.reshape(-1, x1.shape[-1]).to(dt), x2.reshape(-1, x2.shape[-1]).to(dt), feedback.to(dt)
        need = ctx.needs_input_grad
        g1 = torch.einsum("no,oij,nj->ni", g, B, b).view(x1.shape) if need[0] else None
        g2 = torch.einsum("no,oij,ni->nj", g, B, a).view(x2.shape) if need[1] else None
        gw = torch.einsum("no,ni,nj->oij", g, a, b) if need[2] or need[4] else None
        gb = g.sum(0) if ctx.has_bias and need[3] else None
        return g1, g2, gw if need[2] else None, gb, gw if need[4] else None


def _conv(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding):
    """F.conv{1,2,3}d or F.conv_transpose{1,2,3}d by the kernel's dimensionality."""
    nd = weight.dim() - 2
    if transposed:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return fn(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return (F.conv1d, F.conv2d, F.conv3d)[nd - 1](x, weight, bias, stride, padding, dilation, groups)


class FAConvFunction(torch.autograd.Function):
    """y = conv(x, W) + b (1-, 2- or 3-d; `transposed` for ConvTranspose); backward:
    dx = the input-gradient of the same convolution with kernel B in place of W,
    dW = x ⋆ δ (the true weight gradient), db = Σ δ (dB = dW when B needs a gradient).
    x: (N, C_in, *spatial) with zero padding already applied when it is not symmetric."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups, transposed=False,
                output_padding=None):  # fmt: skip
        output_padding = list(output_padding) if output_padding is not None else [0] * (weight.dim() - 2)
        ctx.save_for_backward(x, weight, feedback)
        ctx.conf = (list(stride), list(padding), list(dilation), transposed, output_padding, groups)
        ctx.has_bias = bias is not None
        return _conv(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, feedback = ctx.saved_tensors
        dt = grad_out.dtype  # under autocast (bf16) the products run in the gradient's dtype
        x, weight, feedback = x.to(dt), weight.to(dt), feedback.to(dt)
        conv_backward = torch.ops.aten.convolution_backward
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the error through B, not W
            grad_x = conv_backward(grad_out, x, feedback, None, *ctx.conf, [True, False, False])[0]
        want_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if want_w or want_b:
            bias_sizes = [grad_out.shape[1]] if want_b else None
            mask = [False, want_w, want_b]
            _, grad_w, grad_b = conv_backward(grad_out, x, weight, bias_sizes, *ctx.conf, mask)
        return (grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b,
                grad_w if ctx.needs_input_grad[3] else None, None, None, None, None, None, None)  # fmt: skip


FAConv2dFunction = FAConvFunction  # the name of the 2-d Function before 1-d/3-d/transposed joined it


class FALayer:
    """Mixin of every fa layer: its weights (`fa_slots`), their feedback, the switch.

    A torch layer becomes fa by swapping its class for the twin (parameters,
    hooks and attributes stay, so optimizers and state_dict keys are unchanged),
    then `fa_setup` registers each weight's B_0 through the feedback protocol.
    """

    rule = "fa"
    rule_active = True

    def __init__(self, *args, **kw) -> None:  # direct construction: B_0 = 0 until a rule draws it
        super().__init__(*args, **kw)
        self.fa_setup("fa", lambda w, bound: torch.zeros_like(w))

    def fa_slots(self) -> list[Slot]:
        """(owner, weight name, default-init bound) of every weight this layer trains by fa."""
        return [(self, "weight", init_bound(self.weight))]  # kaiming_uniform(a=√5): U(±1/√fan_in)

    def fa_setup(self, rule: str, initial: Callable[[Tensor, float], Tensor],
                 bound_of: Callable[[Tensor], float] | None = None) -> None:  # fmt: skip
        """Give every weight its starting feedback initial(weight, bound); bound: that of
        the layer's default init U(±bound), or bound_of(weight) (e.g. xavier's)."""
        for owner, name, default in self.fa_slots():
            w = getattr(owner, name).detach()
            bound = default if bound_of is None else bound_of(w)
            add_feedback(owner, name, initial(w, bound), rule, bound)
        self.rule = rule
        self.rule_active = True

    def _fa_on(self) -> bool:
        return self.rule_active and torch.is_grad_enabled()

    def _fa_needed(self, x: Tensor) -> bool:
        """Whether this call needs the fa Function: an error goes to x (through B), or B
        itself learns (kp's B, a Parameter, takes W's gradient). A network's first layer,
        whose input has no gradient, gets the true weight gradient from torch's own op
        either way, without the Function's Python overhead (a third of the paper's mlp)."""
        if not (self.rule_active and torch.is_grad_enabled()):
            return False
        if x.requires_grad:
            return True
        B = self._parameters.get("feedback")
        B = self._buffers.get("feedback") if B is None else B
        return B is not None and B.requires_grad


class FALinear(FALayer, nn.Linear):
    """nn.Linear trained by feedback alignment; `feedback` (out, in) is a buffer."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._fa_needed(x):
            return F.linear(x, self.weight, self.bias)
        return fa_linear(x, self.weight, self.bias, feedback_for(self, used=x.requires_grad))


class _FAConvNd(FALayer):
    """Convolutions (nn.Conv1d/2d/3d): any stride, dilation, groups, numeric or
    'same'/'valid' padding, any padding_mode. Asymmetric ('same' with an even
    kernel) and non-zero padding is applied explicitly first, as torch does; the
    padding itself has no weight, so its backward stays autograd's."""

    transposed_conv = False

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return x, self.padding
        pads = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        if self.padding_mode == "zeros" and all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2)):
            return x, tuple(reversed(pads[::2]))
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, pads, mode=mode), (0,) * len(self.kernel_size)

    def _apply_conv(self, x: Tensor, padding, output_padding=None) -> Tensor:
        conf = (self.stride, padding, self.dilation, self.groups, self.transposed_conv, output_padding)
        if self._fa_needed(x):
            B = feedback_for(self, used=x.requires_grad)  # the first layer's input has no gradient
            return FAConvFunction.apply(x, self.weight, self.bias, B, *conf)
        return _conv(x, self.weight, self.bias, *conf)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == len(self.kernel_size) + 1  # (C, *spatial)
        x, padding = self._padded(x.unsqueeze(0) if unbatched else x)
        y = self._apply_conv(x, padding)
        return y.squeeze(0) if unbatched else y


class _FAConvTransposeNd(_FAConvNd):
    """nn.ConvTranspose1d/2d/3d (zero padding only, as torch): stride, dilation, groups,
    output_padding and forward's `output_size` as torch computes them. B has the
    weight's layout (C_in, C_out/groups, *kernel)."""

    transposed_conv = True

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        nd = len(self.kernel_size)
        unbatched = x.dim() == nd + 1  # (C, *spatial)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              nd, self.dilation)  # fmt: skip
        y = self._apply_conv(x.unsqueeze(0) if unbatched else x, self.padding, output_padding)
        return y.squeeze(0) if unbatched else y


class FAConv1d(_FAConvNd, nn.Conv1d):
    """nn.Conv1d trained by fa; `feedback` (C_out, C_in/g, k) is a buffer."""


class FAConv2d(_FAConvNd, nn.Conv2d):
    """nn.Conv2d trained by fa; `feedback` (C_out, C_in/g, kH, kW) is a buffer."""


class FAConv3d(_FAConvNd, nn.Conv3d):
    """nn.Conv3d trained by fa; `feedback` (C_out, C_in/g, kD, kH, kW) is a buffer."""


class FAConvTranspose1d(_FAConvTransposeNd, nn.ConvTranspose1d):
    """nn.ConvTranspose1d trained by fa."""


class FAConvTranspose2d(_FAConvTransposeNd, nn.ConvTranspose2d):
    """nn.ConvTranspose2d trained by fa."""


class FAConvTranspose3d(_FAConvTransposeNd, nn.ConvTranspose3d):
    """nn.ConvTranspose3d trained by fa."""


class FABilinear(FALayer, nn.Bilinear):
    """nn.Bilinear trained by fa; `feedback` (out, in1, in2) is a buffer."""

    def fa_slots(self) -> list[Slot]:
        return [(self, "weight", 1.0 / math.sqrt(self.weight.shape[1]))]  # Bilinear.reset_parameters

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        if not self._fa_on():
            return F.bilinear(x1, x2, self.weight, self.bias)
        return FABilinearFunction.apply(x1, x2, self.weight, self.bias, feedback_for(self))
