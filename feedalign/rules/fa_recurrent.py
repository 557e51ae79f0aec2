"""nn.RNN, nn.LSTM and nn.GRU trained by feedback alignment.

The recurrence is written here in Python with fa linear maps (rules/fa.py): at
every step the gate pre-activations are x_t W_ihᵀ + b_ih and h_{t-1} W_hhᵀ + b_hh
(LSTM with proj_size: h_t = h̃_t W_hrᵀ), and in the backward the error goes to
x_t through B_ih and back in time to h_{t-1} through B_hh (and B_hr) — fixed
matrices of the weights' shapes in place of their transposes. The cell's
nonlinearities and products keep their true derivatives, so with every B equal
to its W this is back-propagation through time.

Gates (torch's order and formulas; gi = x W_ihᵀ + b_ih, gh = h W_hhᵀ + b_hh):
    RNN:  h' = tanh|relu(gi + gh)
    LSTM: i, f, g, o = σ, σ, tanh, σ of (gi + gh);  c' = f c + i g;  h' = o tanh(c')
    GRU:  r, z = σ(gi_r + gh_r), σ(gi_z + gh_z);  n = tanh(gi_n + r gh_n);  h' = (1 - z) n + z h

Parameter names are torch's (`weight_ih_l0`, `weight_hh_l1_reverse`, …), so
state_dicts load both ways; each weight's B is `<name>_feedback`. Supported:
num_layers, bidirectional, batch_first, bias, dropout between layers, h0 (and
c0), unbatched inputs, LSTM proj_size. A PackedSequence is refused by name.
Without gradients or inside `feedalign.backprop` torch's own kernels run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from feedalign.rules.fa import FALayer, Slot, fa_linear
from feedalign.rules.feedback import feedback_for


def cell_step(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The gates of one step from gi = x W_ihᵀ + b_ih and gh = h W_hhᵀ + b_hh (N, G·H);
    mode as torch's RNNBase.mode. Returns h' (before an LSTM projection) and c'."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        return (1 - z) * torch.tanh(in_ + r * hn) + z * h, None
    return (torch.tanh if mode == "RNN_TANH" else torch.relu)(gi + gh), None


class FARNNBase(FALayer):
    """The fa recurrence shared by FARNN, FALSTM and FAGRU (mixed into the torch class)."""

    def fa_slots(self) -> list[Slot]:
        bound = 1.0 / math.sqrt(self.hidden_size)  # RNNBase.reset_parameters: every weight U(±1/√H)
        return [(self, n, bound) for n in self._flat_weights_names if n.startswith("weight")]

    def _fa_linear(self, x: Tensor, kind: str, suffix: str) -> Tensor:
        """x W_{kind}ᵀ + b_{kind} for kind in ih / hh / hr of one layer and direction."""
        name = f"weight_{kind}{suffix}"
        bias = getattr(self, f"bias_{kind}{suffix}") if self.bias and kind != "hr" else None
        # used: a first layer's input has no gradient, so its B_ih is never read (the
        # sign rules skip building it). h's B_hh is read from the second step on.
        used = kind != "ih" or x.requires_grad
        return fa_linear(x, getattr(self, name), bias, feedback_for(self, name, used=used))

    def _cell(self, gi: Tensor, h: Tensor, c: Tensor | None, suffix: str) -> tuple[Tensor, Tensor | None]:
        """One step: gi (N, G·H) precomputed input part, h (N, H_out) -> h', c'."""
        h, c = cell_step(self.mode, gi, self._fa_linear(h, "hh", suffix), h, c)
        return (self._fa_linear(h, "hr", suffix) if self.proj_size > 0 else h), c

    def _direction(self, x: Tensor, h: Tensor, c: Tensor | None, suffix: str, reverse: bool):
        """Run one layer in one direction over x (T, N, in); returns outputs (T, N, H_out), h_T, c_T."""
        gi = self._fa_linear(x, "ih", suffix)  # (T, N, G·H): every step's input part at once
        outs = []
        for t in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
            h, c = self._cell(gi[t], h, c, suffix)
            outs.append(h)
        if reverse:
            outs.reverse()
        return torch.stack(outs), h, c

    def forward(self, input, hx=None):
        if not self._fa_on():
            return super().forward(input, hx)
        if isinstance(input, PackedSequence):
            raise ValueError(
                f"fa: {type(self).__name__} got a PackedSequence; fa runs the recurrence on padded "
                "tensors — pass the padded batch (N, T, ·) and mask the loss, or train this layer with bp"
            )
        lstm = self.mode == "LSTM"
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)  # unbatched (T, in) -> (T, 1, in)
        x = x.transpose(0, 1) if batched and self.batch_first else x  # -> (T, N, in)
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        if h0 is not None and not batched:
            h0, c0 = h0.unsqueeze(1), (None if c0 is None else c0.unsqueeze(1))
        dirs = 2 if self.bidirectional else 1
        n, h_out = x.shape[1], self.proj_size if self.proj_size > 0 else self.hidden_size
        if h0 is None:
            h0 = x.new_zeros(self.num_layers * dirs, n, h_out)
        if lstm and c0 is None:
            c0 = x.new_zeros(self.num_layers * dirs, n, self.hidden_size)
        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k, suffix = layer * dirs + d, f"_l{layer}" + "_reverse" * d
                out, h, c = self._direction(x, h0[k], c0[k] if lstm else None, suffix, d == 1)
                outs.append(out)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout)
        return self._pack_output(x, torch.stack(hs), torch.stack(cs) if lstm else None, batched)

    def _pack_output(self, out: Tensor, h: Tensor, c: Tensor | None, batched: bool):
        """torch's return layout: output (N, T, ·) if batch_first, h_n (and c_n) (layers·dirs, N, ·)."""
        if not batched:
            out, h, c = out.squeeze(1), h.squeeze(1), (None if c is None else c.squeeze(1))
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, ((h, c) if c is not None else h)


class FARNN(FARNNBase, nn.RNN):
    """nn.RNN (tanh or relu) trained by fa."""


class FALSTM(FARNNBase, nn.LSTM):
    """nn.LSTM trained by fa (proj_size supported: W_hr has its own B)."""


class FAGRU(FARNNBase, nn.GRU):
    """nn.GRU trained by fa."""


class FARNNCellBase(FALayer):
    """nn.RNNCell / LSTMCell / GRUCell trained by fa: one step of the recurrence above,
    the error to x through B_ih and to h through B_hh."""

    def fa_slots(self) -> list[Slot]:
        bound = 1.0 / math.sqrt(self.hidden_size)  # RNNCellBase.reset_parameters
        return [(self, "weight_ih", bound), (self, "weight_hh", bound)]

    def forward(self, input: Tensor, hx=None):
        if not self._fa_on():
            return super().forward(input, hx)
        lstm = isinstance(self, nn.LSTMCell)
        if lstm or isinstance(self, nn.GRUCell):
            mode = "LSTM" if lstm else "GRU"
        else:
            mode = "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)  # (N, in)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        elif not batched:
            hx = tuple(t.unsqueeze(0) for t in hx) if lstm else hx.unsqueeze(0)
        h, c = hx if lstm else (hx, None)
        gi = fa_linear(x, self.weight_ih, self.bias_ih, feedback_for(self, "weight_ih", used=x.requires_grad))
        gh = fa_linear(h, self.weight_hh, self.bias_hh, feedback_for(self, "weight_hh"))
        h, c = cell_step(mode, gi, gh, h, c)
        if not batched:
            h, c = h.squeeze(0), (None if c is None else c.squeeze(0))
        return (h, c) if lstm else h


class FARNNCell(FARNNCellBase, nn.RNNCell):
    """nn.RNNCell trained by fa."""


class FALSTMCell(FARNNCellBase, nn.LSTMCell):
    """nn.LSTMCell trained by fa."""


class FAGRUCell(FARNNCellBase, nn.GRUCell):
    """nn.GRUCell trained by fa."""
