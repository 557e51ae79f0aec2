"""The learning rules against hand-written formulas (float64, small shapes).

Notation as docs/original.md §1: e = dL/dy at the logits; for bce e = sigmoid(y) - onehot
(summed over the batch). f' is the nonlinearity's derivative at the
pre-activation. fa: δ_below = (δ B) ⊙ f'. dfa: δ_i = (e B_i) ⊙ f'(a_i).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedalign
from feedalign.rules.dfa import DFAFunction
from feedalign.rules.fa import FAConv2dFunction, FALinearFunction

pytestmark = pytest.mark.usefixtures("float64")  # every tensor here is float64 (conftest.py)


DERIV = {  # f'(a) written from the output h = f(a), as the formulas use it
    "tanh": (nn.Tanh, lambda a: 1 - torch.tanh(a) ** 2),
    "sigm": (nn.Sigmoid, lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a))),
    "relu": (nn.ReLU, lambda a: (a > 0).to(a.dtype)),
}


def bce_error(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(y) - F.one_hot(t, y.shape[1]).to(y.dtype)


def mlp3(act: type[nn.Module], n_in=5, h1=6, h2=4, n_out=3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, h1), act(), nn.Linear(h1, h2), act(), nn.Linear(h2, n_out))


def data(n=7, n_in=5, n_out=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, n_in, generator=g), torch.randint(0, n_out, (n,), generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_mlp3_grads(model, x, h1, h2, e, d1, d2):
    """dW = δᵀ·input and db = Σ δ for the three layers of mlp3, δ = (d1, d2, e)."""
    expect = {"4.weight": e.T @ h2, "4.bias": e.sum(0), "2.weight": d2.T @ h1, "2.bias": d2.sum(0),
              "0.weight": d1.T @ x, "0.bias": d1.sum(0)}  # fmt: skip
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expect[name], msg=name)


@pytest.mark.parametrize("nonlin", DERIV)
def test_fa_mlp_matches_formula(nonlin):
    act, deriv = DERIV[nonlin]
    model = feedalign.convert(mlp3(act), "fa", rfb_mag=0.5, seed=3)
    x, t = data()
    feedalign.BCE()(model(x), t).backward()
    W1, W2, W3 = model[0].weight, model[2].weight, model[4].weight
    B2, B3 = model[2].feedback, model[4].feedback
    a1 = x @ W1.T + model[0].bias
    h1 = act()(a1)
    a2 = h1 @ W2.T + model[2].bias
    h2 = act()(a2)
    e = bce_error(h2 @ W3.T + model[4].bias, t)
    d2 = (e @ B3) * deriv(a2)  # B replaces W in the error path
    d1 = (d2 @ B2) * deriv(a1)
    assert_mlp3_grads(model, x, h1, h2, e, d1, d2)


@pytest.mark.parametrize("nonlin", DERIV)
def test_dfa_mlp_matches_formula(nonlin):
    act, deriv = DERIV[nonlin]
    model = feedalign.convert(mlp3(act), "dfa", seed=4)
    B1, B2 = feedalign.feedback(model)
    assert B1.shape == (3, 6) and B2.shape == (3, 4)
    x, t = data()
    feedalign.BCE()(model(x), t).backward()
    W1, W2, W3 = model[0].weight, model[3].weight, model[6].weight  # taps shift positions
    a1 = x @ W1.T + model[0].bias
    h1 = act()(a1)
    a2 = h1 @ W2.T + model[3].bias
    h2 = act()(a2)
    e = bce_error(h2 @ W3.T + model[6].bias, t)
    d2, d1 = (e @ B2) * deriv(a2), (e @ B1) * deriv(a1)  # each tap from e directly
    assert_mlp3_grads(model, x, h1, h2, e, d1, d2)


def test_dfa_bounds_and_rfb_mag():
    model = feedalign.convert(mlp3(nn.Tanh, h1=400, h2=100), "dfa", seed=0)
    B1, B2 = feedalign.feedback(model)
    assert 0.9 / 20 < B1.abs().max() <= 1 / 20 and 0.9 / 10 < B2.abs().max() <= 1 / 10
    fb = feedalign.feedback(feedalign.convert(mlp3(nn.Tanh, h1=400, h2=100), "fa", rfb_mag=2.0))
    assert all(1.5 < b.abs().max() <= 2.0 for b in fb)
    m = mlp3(nn.Tanh)
    w = [m[i].weight.clone() for i in (0, 2, 4)]
    fb = feedalign.feedback(feedalign.convert(m, "fa", feedback_init="weights"))
    assert all(torch.equal(a, b) for a, b in zip(w, fb))


def _bn_backward(dy, xhat, gamma, var, eps):
    """Training-mode batch-norm backward over dim 0, from the textbook derivation."""
    n = dy.shape[0]
    dxhat = dy * gamma
    return (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0)) / (n * torch.sqrt(var + eps))


def test_dfa_block_with_batchnorm_and_dropout_matches_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    feedalign.convert(model, "dfa", seed=1)
    (B1,) = feedalign.feedback(model)
    x, t = data()
    seen = {}
    model[3].register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    feedalign.BCE()(model(x), t).backward()
    mask = seen["out"] / seen["inp"]  # the dropout mask actually drawn: 0 or 1/(1-p)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    a = x @ model[0].weight.T + model[0].bias
    mean, var = a.mean(0), a.var(0, unbiased=False)
    xhat = (a - mean) / torch.sqrt(var + 1e-5)
    z = xhat * model[1].weight + model[1].bias
    h = torch.tanh(z) * mask
    e = bce_error(h @ model[5].weight.T + model[5].bias, t)
    dz = (e @ B1) * mask * (1 - torch.tanh(z) ** 2)
    da = _bn_backward(dz, xhat, model[1].weight, var, 1e-5)
    g = grads(model)
    torch.testing.assert_close(g["1.weight"], (dz * xhat).sum(0))
    torch.testing.assert_close(g["1.bias"], dz.sum(0))
    torch.testing.assert_close(g["0.weight"], da.T @ x)
    torch.testing.assert_close(g["4.weight"], e.T @ h)


def _conv_grads(x, delta, weight_or_feedback, k, pad):
    """dW and dx of a stride-1 conv from im2col, no autograd: y = W_flat @ cols(x)."""
    n, c, h, w = x.shape
    cols = F.unfold(x, k, padding=pad)  # (N, C·k·k, L)
    d = delta.flatten(2)  # (N, C_out, L)
    dW = torch.einsum("nol,nil->oi", d, cols).reshape(-1, c, k, k)
    dcols = torch.einsum("oi,nol->nil", weight_or_feedback.flatten(1), d)
    return dW, F.fold(dcols, (h, w), k, padding=pad)


def _maxpool_backward(a, d_out):
    """Route each pooled error to the arg-max of its 2×2 window (stride 2)."""
    _, idx = F.max_pool2d(a, 2, return_indices=True)
    return torch.zeros_like(a).flatten(2).scatter_add(2, idx.flatten(2), d_out.flatten(2)).view_as(a)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_conv_block_matches_formula(rule):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    )
    feedalign.convert(model, rule, seed=2, input_shape=(2, 4, 4), rfb_mag=0.3)
    conv, lin = model[0], model[-1] if rule == "fa" else model[-2]
    x = torch.randn(5, 2, 4, 4)
    t = torch.randint(0, 4, (5,))
    feedalign.BCE()(model(x), t).backward()
    a = F.conv2d(x, conv.weight, conv.bias, padding=1)
    p = F.max_pool2d(torch.relu(a), 2)
    e = bce_error(p.flatten(1) @ lin.weight.T + lin.bias, t)
    B = lin.feedback if rule == "fa" else feedalign.feedback(model)[0]  # both (4, 12)
    d_pool = (e @ B).view_as(p)
    d_a = _maxpool_backward(torch.relu(a), d_pool) * (a > 0)
    dW, _ = _conv_grads(x, d_a, conv.weight, 3, 1)
    torch.testing.assert_close(conv.weight.grad, dW)
    torch.testing.assert_close(conv.bias.grad, d_a.sum((0, 2, 3)))
    torch.testing.assert_close(lin.weight.grad, e.T @ p.flatten(1))


def test_fa_conv_input_error_uses_feedback_kernel():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5, requires_grad=True)
    w, b, B = torch.randn(4, 2, 3, 3), torch.randn(4), torch.randn(4, 2, 3, 3)
    y = FAConv2dFunction.apply(x, w, b, B, (1, 1), (1, 1), (1, 1), 1)
    delta = torch.randn_like(y)
    y.backward(delta)
    _, dx = _conv_grads(x.detach(), delta, B, 3, 1)
    torch.testing.assert_close(x.grad, dx)


def _twin_models(build, rule, **kw):
    a = build()
    b = build()
    b.load_state_dict(a.state_dict())
    feedalign.convert(b, rule, **kw)
    return a, b


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    )


@pytest.mark.parametrize("build", [lambda: mlp3(nn.Tanh), conv_net])
def test_fa_with_feedback_equal_to_weights_is_bp(build):
    plain, fa = _twin_models(build, "fa", feedback_init="weights")  # B = copy of W
    x = torch.randn(6, 2, 4, 4) if build is conv_net else torch.randn(6, 5)
    t = torch.randint(0, 3, (6,))
    for m in (plain, fa):
        feedalign.BCE()(m(x), t).backward()
    for (n, p), q in zip(plain.named_parameters(), fa.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_backprop_context_gives_true_gradient(rule):
    plain, conv = _twin_models(conv_net, rule, rfb_mag=1.0, input_shape=(2, 4, 4))
    x = torch.randn(6, 2, 4, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    t = torch.randint(0, 3, (6,))
    F.cross_entropy(plain(x), t).backward()
    with feedalign.backprop(conv):
        F.cross_entropy(conv(x2), t).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for p, q in zip(plain.parameters(), conv.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert all(getattr(m, "rule_active", True) for m in conv.modules())  # restored


def test_bp_equals_plain_autograd_and_bce_semantics():
    plain, bp = _twin_models(lambda: mlp3(nn.Tanh), "bp")
    x, t = data()
    onehot = F.one_hot(t, 3).double()
    F.binary_cross_entropy_with_logits(plain(x), onehot, reduction="sum").backward()
    loss = feedalign.BCE()(bp(x), t)
    loss.backward()
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(bp(x), onehot))  # mean
    for p, q in zip(plain.parameters(), bp.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_ce_error_at_logits_and_original_option():
    torch.manual_seed(0)
    x, t = data()
    for error_at in ("logits", "output"):
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3), nn.LogSoftmax(1))
        feedalign.convert(m, "dfa", seed=0, error_at=error_at)
        (B,) = feedalign.feedback(m)
        nn.NLLLoss()(m(x), t).backward()
        a = x @ m[0].weight.T + m[0].bias
        h = torch.tanh(a)
        onehot = F.one_hot(t, 3).double()
        y = h @ m[3].weight.T + m[3].bias
        e = (torch.softmax(y, 1) - onehot) / len(t) if error_at == "logits" else -onehot / len(t)
        torch.testing.assert_close(m[0].weight.grad, ((e @ B) * (1 - h**2)).T @ x)


def test_gradcheck_custom_functions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, requires_grad=True)
    w = torch.randn(2, 3, generator=g, requires_grad=True)
    b = torch.randn(2, generator=g, requires_grad=True)
    # weight and bias paths are true gradients whatever B is; the input path is when B = W
    B = torch.randn(2, 3, generator=g)
    assert torch.autograd.gradcheck(lambda w, b: FALinearFunction.apply(x.detach(), w, b, B), (w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: FALinearFunction.apply(x, w, b, w.detach()), (x, w, b))
    xc = torch.randn(2, 2, 5, 5, generator=g, requires_grad=True)
    wc = torch.randn(3, 2, 3, 3, generator=g, requires_grad=True)
    bc = torch.randn(3, generator=g, requires_grad=True)
    conf = ((2, 1), (1, 0), (1, 1), 1)
    assert torch.autograd.gradcheck(
        lambda w, b: FAConv2dFunction.apply(xc.detach(), w, b, torch.randn(3, 2, 3, 3), *conf),
        (wc, bc),
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b: FAConv2dFunction.apply(x, w, b, w.detach(), *conf), (xc, wc, bc)
    )
    y = torch.randn(4, 2, generator=g, requires_grad=True)
    taps = (torch.randn(4, 3, generator=g), torch.randn(4, 2, 2, generator=g))
    assert torch.autograd.gradcheck(lambda y: DFAFunction.apply(y, torch.randn(2, 7), "error", *taps), (y,))


def test_dfa_projects_every_tap_from_one_product():
    y = torch.randn(4, 2, requires_grad=True)
    taps = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 2, 2, requires_grad=True)]
    B = torch.randn(2, 7)
    e = torch.randn(4, 2)
    DFAFunction.apply(y, B, "error", *taps).backward(e)
    torch.testing.assert_close(y.grad, e)
    torch.testing.assert_close(taps[0].grad, e @ B[:, :3])
    torch.testing.assert_close(taps[1].grad, (e @ B[:, 3:]).view(4, 2, 2))


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_rules_run_under_bf16_autocast(rule):
    """--amp bf16: the backward products run in the gradient's dtype, parameters keep float32."""
    model = feedalign.build_model("conv", (3, 16, 16), 4, rule=rule, nonlin="relu", seed=0).float()
    x, t = torch.randn(4, 3, 16, 16, dtype=torch.float32), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    feedalign.BCE()(out.float(), t).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
