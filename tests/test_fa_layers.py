"""fa on every weight layer of torch.nn, against hand-written references (float64).

The reference for "a linear map whose input error goes through B" is written
with plain autograd, independently of feedalign's Functions:

    ref_linear(x, W, b, B) = linear(x.detach(), W, b) + x Bᵀ - (x Bᵀ).detach()

Its value is x Wᵀ + b; its gradients are dW = δᵀx, db = Σδ and dx = δB. The
convolution references are torch's own modules: the input error of an fa
convolution is the input gradient of the same convolution with weight B; its
weight gradient is the true one (weight W).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedalign
from feedalign.rules.fa import FABilinearFunction, FAConvFunction, FALinearFunction

pytestmark = pytest.mark.usefixtures("float64")  # every tensor here is float64 (conftest.py)


def ref_linear(x, W, b, B):
    """Value x Wᵀ + b; backward dx = δ B, dW = δᵀ x, db = Σ δ (plain autograd)."""
    return F.linear(x.detach(), W, b) + F.linear(x, B) - F.linear(x, B).detach()


def converted(layer: nn.Module, **kw) -> nn.Module:
    """An fa copy of `layer` (B random unless told), converted inside a container."""
    box = feedalign.convert(nn.Sequential(copy.deepcopy(layer)), "fa", seed=kw.pop("seed", 0), **kw)
    return box[0]


# --- convolutions -----------------------------------------------------------------

CONVS = {
    "conv1d-same-even-reflect-groups": (lambda: nn.Conv1d(4, 6, 4, padding="same", dilation=2, groups=2,
                                                          padding_mode="reflect"), (3, 4, 11)),
    "conv1d-stride-circular": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=2, padding_mode="circular"),
                               (2, 3, 9)),
    "conv1d-valid-nobias": (lambda: nn.Conv1d(2, 3, 3, padding="valid", bias=False), (2, 2, 7)),
    "conv3d-replicate-groups": (lambda: nn.Conv3d(2, 4, 3, stride=2, padding=1, groups=2,
                                                  padding_mode="replicate"), (2, 2, 5, 4, 5)),
    "conv3d-same-even": (lambda: nn.Conv3d(2, 3, (2, 3, 2), padding="same"), (2, 2, 4, 4, 3)),
    "convT2d-groups-outpad": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                         groups=2), (2, 4, 3, 4)),
    "convT1d-dilation": (lambda: nn.ConvTranspose1d(3, 2, 3, stride=2, dilation=2, padding=1), (2, 3, 5)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 3, 2)),
}  # fmt: skip


@pytest.mark.parametrize("kind", CONVS)
def test_fa_convolution_matches_torch_with_B_for_the_input_error(kind):
    build, shape = CONVS[kind]
    torch.manual_seed(0)
    plain = build()
    fa = converted(plain)
    B = fa.feedback
    assert B.shape == plain.weight.shape and not torch.equal(B, plain.weight)
    with_B = copy.deepcopy(plain)
    with torch.no_grad():
        with_B.weight.copy_(B)
    x = torch.randn(shape)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    y = fa(xs[0])
    torch.testing.assert_close(y, plain(x))
    delta = torch.randn_like(y)
    y.backward(delta)
    plain(xs[1]).backward(delta)
    with_B(xs[2]).backward(delta)
    torch.testing.assert_close(xs[0].grad, xs[2].grad)  # the error through B
    torch.testing.assert_close(fa.weight.grad, plain.weight.grad)  # the true weight gradient
    if plain.bias is not None:
        torch.testing.assert_close(fa.bias.grad, plain.bias.grad)
    assert not torch.allclose(xs[0].grad, xs[1].grad)  # and not back-prop's


def test_unbatched_convolution_and_output_size():
    torch.manual_seed(0)
    conv, convT = nn.Conv1d(2, 3, 3, padding_mode="reflect", padding=1), nn.ConvTranspose2d(2, 2, 3, stride=2)
    fa, faT = converted(conv), converted(convT)
    x = torch.randn(2, 6)
    torch.testing.assert_close(fa(x), conv(x))
    x2 = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(faT(x2, output_size=[10, 10]), convT(x2, output_size=[10, 10]))


# --- attention ----------------------------------------------------------------------


def ref_attention(mha, query, key, value, mask=None):
    """Hand-written multi-head attention (sequence-first, N batch), each projection a
    ref_linear with its B; `mask` (N, L, S) additive."""
    E, H = mha.embed_dim, mha.num_heads
    d = E // H
    if mha._qkv_same_embed_dim:
        Ws, Bs = mha.in_proj_weight.chunk(3), mha.in_proj_weight_feedback.chunk(3)
    else:
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        Ws, Bs = [getattr(mha, n) for n in names], [getattr(mha, n + "_feedback") for n in names]
    bs = mha.in_proj_bias.chunk(3)
    q, k, v = (ref_linear(t, W, b, B) for t, W, b, B in zip((query, key, value), Ws, bs, Bs))
    L, N, _ = q.shape
    q, k, v = (t.reshape(t.shape[0], N, H, d).permute(1, 2, 0, 3) for t in (q, k, v))  # (N, H, ·, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask[:, None]
    att = torch.softmax(scores, -1)  # (N, H, L, S)
    out = (att @ v).permute(2, 0, 1, 3).reshape(L, N, E)
    out = ref_linear(out, mha.out_proj.weight, mha.out_proj.bias, mha.out_proj.feedback)
    return out, att.mean(1)


@pytest.mark.parametrize("kind", ["self, no weights", "cross", "kdim/vdim"])
def test_fa_attention_matches_hand_written_attention(kind):
    """Against ref_attention; "self, no weights" runs fa's fused-kernel path (need_weights=False)."""
    torch.manual_seed(0)
    kw = {"kdim": 3, "vdim": 5} if kind == "kdim/vdim" else {}
    plain = nn.MultiheadAttention(4, 2, batch_first=True, **kw)
    fa = converted(plain)
    L = 5 if kind.startswith("self") else 3
    q0 = torch.randn(2, L, 4)
    k0 = q0 if kind.startswith("self") else torch.randn(2, 5, kw.get("kdim", 4))
    v0 = q0 if kind.startswith("self") else torch.randn(2, 5, kw.get("vdim", 4))
    need = not kind.startswith("self")
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    causal = torch.randn(L, 5) > 1.0  # a bool attn_mask (True = blocked)
    ins = [t.clone().requires_grad_() for t in ((q0,) if kind.startswith("self") else (q0, k0, v0))]
    args = ins * 3 if len(ins) == 1 else ins  # self-attention: query is key is value
    out, w = fa(*args, key_padding_mask=pad, attn_mask=causal, need_weights=need)
    ref_plain, ref_w = plain(q0, k0, v0, key_padding_mask=pad, attn_mask=causal, need_weights=need)
    torch.testing.assert_close(out, ref_plain)
    assert (w is None) == (ref_w is None) and (w is None or torch.allclose(w, ref_w))
    delta = torch.randn_like(out)
    out.backward(delta)
    mine = {n: p.grad.clone() for n, p in fa.named_parameters()}
    for p in fa.parameters():
        p.grad = None
    refs = [t.detach().transpose(0, 1).requires_grad_() for t in ins]
    blocked = causal[None] | pad[:, None]  # (N, L, S)
    blocked = torch.zeros(blocked.shape).masked_fill(blocked, -math.inf)
    ref_out, _ = ref_attention(fa, *(refs * 3 if len(refs) == 1 else refs), mask=blocked)
    ref_out.transpose(0, 1).backward(delta)
    for n, p in fa.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, msg=n)
    for a, r in zip(ins, refs):
        torch.testing.assert_close(a.grad, r.grad.transpose(0, 1))


def test_attention_options_match_torch_forward():
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(4, 2, add_bias_kv=True, add_zero_attn=True)
    fa = converted(plain)
    x = torch.randn(3, 2, 4)  # (L, N, E)
    mask = torch.randn(4, 3, 3)  # float, per batch·head
    a, wa = fa(x, x, x, attn_mask=mask, average_attn_weights=False)
    b, wb = plain(x, x, x, attn_mask=mask, average_attn_weights=False)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)
    u = torch.randn(3, 4)  # unbatched
    torch.testing.assert_close(fa(u, u, u, need_weights=False)[0], plain(u, u, u, need_weights=False)[0])
    assert fa(u, u, u, need_weights=False)[1] is None


# --- recurrent layers ---------------------------------------------------------------


def ref_lstm(m, x, h, c):
    """One-layer LSTM over x (T, N, in) with ref_linear: B's in place of W_ih, W_hh."""
    outs = []
    for t in range(x.shape[0]):
        g = ref_linear(x[t], m.weight_ih_l0, m.bias_ih_l0, m.weight_ih_l0_feedback)
        g = g + ref_linear(h, m.weight_hh_l0, m.bias_hh_l0, m.weight_hh_l0_feedback)
        i, f, gg, o = g.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def ref_gru(m, x, h):
    """One-layer GRU over x (T, N, in) with ref_linear."""
    outs = []
    for t in range(x.shape[0]):
        ir, iz, inn = ref_linear(x[t], m.weight_ih_l0, m.bias_ih_l0, m.weight_ih_l0_feedback).chunk(3, -1)
        hr, hz, hn = ref_linear(h, m.weight_hh_l0, m.bias_hh_l0, m.weight_hh_l0_feedback).chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        h = (1 - z) * torch.tanh(inn + r * hn) + z * h
        outs.append(h)
    return torch.stack(outs), h


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fa_recurrence_matches_hand_written_recursion(kind):
    torch.manual_seed(0)
    plain = nn.LSTM(3, 4, batch_first=True) if kind == "lstm" else nn.GRU(3, 4, batch_first=True)
    fa = converted(plain)
    x0, h0, c0 = torch.randn(2, 5, 3), torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    x = x0.clone().requires_grad_()
    hx = (h0, c0) if kind == "lstm" else h0
    out, state = fa(x, hx)
    ref_out, ref_state = plain(x0, hx)
    torch.testing.assert_close(out, ref_out)
    delta, d_h = torch.randn_like(out), torch.randn(1, 2, 4)
    h_n = state[0] if kind == "lstm" else state
    (out * delta).sum().add_((h_n * d_h).sum()).backward()
    mine = {n: p.grad.clone() for n, p in fa.named_parameters()}
    for p in fa.parameters():
        p.grad = None
    xr = x0.clone().transpose(0, 1).requires_grad_()
    if kind == "lstm":
        r_out, r_h, _ = ref_lstm(fa, xr, h0[0], c0[0])
    else:
        r_out, r_h = ref_gru(fa, xr, h0[0])
    (r_out.transpose(0, 1) * delta).sum().add_((r_h * d_h[0]).sum()).backward()
    for n, p in fa.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, msg=n)
    torch.testing.assert_close(x.grad, xr.grad.transpose(0, 1))


def test_fa_bilinear_matches_formula():
    torch.manual_seed(0)
    fa = converted(nn.Bilinear(3, 2, 4))
    x1, x2 = torch.randn(2, 5, 3, requires_grad=True), torch.randn(2, 5, 2, requires_grad=True)
    y = fa(x1, x2)
    delta = torch.randn_like(y)
    y.backward(delta)
    W, B = fa.weight.detach(), fa.feedback
    d, a, b = delta.reshape(10, 4), x1.detach().reshape(10, 3), x2.detach().reshape(10, 2)
    # y_k = Σ_ij a_i W_kij b_j: dW_kij = Σ_n δ_nk a_ni b_nj; the inputs' errors through B
    dB = (d[:, :, None, None] * B).sum(1)  # Σ_k δ_nk B_kij: (n, i, j)
    dW = (d[:, :, None, None] * a[:, None, :, None] * b[:, None, None]).sum(0)
    torch.testing.assert_close(fa.weight.grad, dW)
    torch.testing.assert_close(x1.grad.reshape(10, 3), (dB * b[:, None, :]).sum(2))
    torch.testing.assert_close(x2.grad.reshape(10, 2), (dB * a[:, :, None]).sum(1))
    torch.testing.assert_close(fa.bias.grad, d.sum(0))
    assert not torch.allclose(B, W)


# --- B = W is back-propagation, for every layer kind ----------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(5, 3), lambda: (torch.randn(4, 2, 5),)),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
                       lambda: (torch.randn(2, 2, 5, 5),)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 2, 3, stride=2, groups=2),
                lambda: (torch.randn(1, 2, 2, 2, 3),)),
    "attention-cross": (lambda: nn.MultiheadAttention(4, 2, dropout=0.0),
                        lambda: (torch.randn(3, 2, 4), torch.randn(5, 2, 4), torch.randn(5, 2, 4))),
    "rnn-relu-2x-bidir": (lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", bidirectional=True),
                          lambda: (torch.randn(4, 2, 3),)),
    "lstm-proj-2x-bidir": (lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, bias=False),
                           lambda: (torch.randn(4, 2, 3),)),
    "gru-unbatched": (lambda: nn.GRU(3, 4, num_layers=2), lambda: (torch.randn(4, 3),)),
    "lstm-cell": (lambda: nn.LSTMCell(3, 4),
                  lambda: (torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 4)))),
    "gru-cell-unbatched": (lambda: nn.GRUCell(3, 4), lambda: (torch.randn(3),)),
    "bilinear": (lambda: nn.Bilinear(3, 2, 4), lambda: (torch.randn(5, 3), torch.randn(5, 2))),
    "rnn-cell-relu": (lambda: nn.RNNCell(3, 4, nonlinearity="relu"),
                      lambda: (torch.randn(2, 3), torch.randn(2, 4))),
}  # fmt: skip


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", LAYERS)
def test_fa_with_feedback_equal_to_weights_is_backprop(kind):
    build, inputs = LAYERS[kind]
    torch.manual_seed(0)
    plain = build()
    fa = converted(plain, feedback_init="weights")
    args = inputs()
    a = [t.clone().requires_grad_() if torch.is_tensor(t) else t for t in args]
    b = [t.clone().requires_grad_() if torch.is_tensor(t) else t for t in args]
    out_fa, out_bp = _first(fa(*a)), _first(plain(*b))
    torch.testing.assert_close(out_fa, out_bp)
    delta = torch.randn_like(out_bp)
    out_fa.backward(delta)
    out_bp.backward(delta)
    for (n, p), q in zip(fa.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    for s, t in zip(a, b):
        if torch.is_tensor(s):
            torch.testing.assert_close(s.grad, t.grad)


@pytest.mark.parametrize("kind", ["linear", "conv2d-reflect", "attention-cross", "lstm-proj-2x-bidir",
                                  "bilinear"])  # fmt: skip
def test_trained_feedback_receives_the_weight_gradient(kind):
    """The Kolen–Pollack contract: when B requires grad, its gradient is dL/dW."""
    build, inputs = LAYERS[kind]
    torch.manual_seed(0)
    fa = converted(build())
    slots = fa.fa_slots()
    for owner, name, _ in slots:
        getattr(owner, feedalign.rules.feedback.feedback_name(name)).requires_grad_(True)
    _first(fa(*inputs())).square().sum().backward()
    for owner, name, _ in slots:
        B = getattr(owner, feedalign.rules.feedback.feedback_name(name))
        torch.testing.assert_close(B.grad, getattr(owner, name).grad, msg=name)


def test_gradcheck_linear_function():
    g = torch.Generator().manual_seed(0)
    x, w, b, B = (torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 3, 4), (2, 4), (2,), (2, 4)))
    # the weight and bias paths are true gradients for any B; the input path is when B = W
    assert torch.autograd.gradcheck(lambda w, b: FALinearFunction.apply(x.detach(), w, b, B.detach()), (w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: FALinearFunction.apply(x, w, b, w.detach()), (x, w, b))


def test_gradcheck_bilinear_function():
    g = torch.Generator().manual_seed(0)
    x1, x2, w, b, B = (torch.randn(*s, generator=g, requires_grad=True)
                       for s in ((3, 2), (3, 4), (2, 2, 4), (2,), (2, 2, 4)))  # fmt: skip
    fa = FABilinearFunction.apply
    assert torch.autograd.gradcheck(lambda w, b: fa(x1.detach(), x2.detach(), w, b, B.detach()), (w, b))
    assert torch.autograd.gradcheck(lambda x1, x2, w, b: fa(x1, x2, w, b, w.detach()), (x1, x2, w, b))


GRADCHECK_CONVS = [  # (x shape, w shape, stride, padding, dilation, groups, transposed, output_padding)
    ((1, 4, 6), (4, 2, 3), (2,), (1,), (2,), 2, False, None),
    ((1, 2, 3, 3, 4), (2, 2, 2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 1), 1, False, None),
    ((1, 2, 3, 2), (2, 1, 2, 3), (2, 2), (1, 1), (1, 1), 2, True, [1, 0]),
    ((1, 2, 3), (2, 2, 3), (2,), (0,), (2,), 1, True, [1]),
]


@pytest.mark.parametrize("case", GRADCHECK_CONVS, ids=["conv1d", "conv3d", "convT2d", "convT1d"])
def test_gradcheck_conv_function(case):
    xs, ws, *conf = case
    g = torch.Generator().manual_seed(0)
    n_bias = ws[1] * conf[3] if conf[4] else ws[0]
    x, w, b, B = (torch.randn(*s, generator=g, requires_grad=True) for s in (xs, ws, (n_bias,), ws))
    fa = FAConvFunction.apply
    assert torch.autograd.gradcheck(lambda w, b: fa(x.detach(), w, b, B.detach(), *conf), (w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: fa(x, w, b, w.detach(), *conf), (x, w, b))
