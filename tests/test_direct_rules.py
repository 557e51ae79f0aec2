"""drtp and shallow against their formulas, taps placed by hand, and what keeps working
for direct-rule models of any shape (backprop(), alignment(), compile, bf16, state_dict).

drtp: hidden tap i receives −s·y*·B_i (y* one-hot; s = 1 under bce, summed over the
batch; s = 1/N under ce), whatever the prediction. shallow: only the output layer learns.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_direct import ResNet, _twins  # tests/ is on sys.path under pytest
from torch import nn

import feedalign
from feedalign.rules.dfa import target_signal


def mlp3(log_softmax: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers, *([nn.LogSoftmax(1)] if log_softmax else []))


def data(n=7):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, dtype=torch.float64, generator=g), torch.arange(n) % 3


def _hidden_grads(model, x, t, loss):
    model.zero_grad()
    loss(model(x), t).backward()
    return [model[i].weight.grad.clone() for i in (0, 3)]  # taps shift the output layer to 6


@pytest.mark.parametrize("criterion", ["bce", "ce"])
def test_drtp_hidden_taps_receive_the_projected_target(criterion):
    model = feedalign.convert(mlp3(criterion == "ce").double(), "drtp", seed=1)
    loss = feedalign.BCE() if criterion == "bce" else nn.NLLLoss()
    B1, B2 = feedalign.feedback(model)
    x, t = data()
    onehot = F.one_hot(t, 3).double()
    s = 1.0 if criterion == "bce" else 1.0 / len(t)
    g1, g2 = _hidden_grads(model, x, t, loss)
    h1 = torch.tanh(x @ model[0].weight.T + model[0].bias)
    h2 = torch.tanh(h1 @ model[3].weight.T + model[3].bias)
    d2 = (-s * onehot @ B2) * (1 - h2**2)
    d1 = (-s * onehot @ B1) * (1 - h1**2)
    torch.testing.assert_close(g2, d2.T @ h1)
    torch.testing.assert_close(g1, d1.T @ x)
    y = h2 @ model[6].weight.T + model[6].bias
    e = torch.sigmoid(y) - onehot if criterion == "bce" else (torch.softmax(y, 1) - onehot) / len(t)
    torch.testing.assert_close(model[6].weight.grad, e.T @ h2)  # the output layer: the true error
    with torch.no_grad():  # other logits, same hidden updates
        model[6].weight.mul_(-3).add_(1)
    assert all(torch.equal(a, b) for a, b in zip((g1, g2), _hidden_grads(model, x, t, loss)))


def test_dfa_with_error_at_output_under_ce_is_drtp():
    x, t = data()
    grads = []
    for rule, error_at in [("drtp", "logits"), ("drtp", "output"), ("dfa", "output")]:
        model = feedalign.convert(mlp3(True).double(), rule, seed=1, error_at=error_at)
        grads.append(_hidden_grads(model, x, t, nn.NLLLoss()))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)


def test_drtp_reads_the_target_of_rows_whose_softmax_saturated():
    """p(target) = 1 exactly (a confident net, float precision): the row's error is 0 at
    the target and ≥ 0 elsewhere, and the target is the largest logit among the zeros."""
    y = torch.tensor([[1000.0, 0.0, 0.0], [40.0, 0.0, 0.0], [0.1, 0.2, 0.3], [0.0, -5.0, 2000.0]],
                     dtype=torch.float64)  # fmt: skip
    t = torch.tensor([0, 0, 2, 2])
    onehot = F.one_hot(t, 3).double()
    e = (torch.softmax(y, 1) - onehot) / 4  # F.cross_entropy's error
    assert int((e < 0).sum()) == 1  # only row 2 shows its target by a negative entry
    torch.testing.assert_close(target_signal(e, y), -onehot / 4)
    torch.testing.assert_close(target_signal(torch.sigmoid(y) - onehot, y), -onehot)  # bce, s = 1
    model = feedalign.convert(mlp3(True).double(), "drtp", seed=1)
    x, t = data()
    before = _hidden_grads(model, x, t, nn.NLLLoss())
    with torch.no_grad():  # huge logits: the rows the net gets right saturate
        model[6].weight.mul_(1e4)
    after = _hidden_grads(model, x, t, nn.NLLLoss())
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


def test_drtp_refuses_an_error_that_hides_the_target():
    with pytest.raises(RuntimeError, match="one negative entry"):
        target_signal(torch.tensor([[0.1, -0.2, -0.3]]), torch.zeros(1, 3))
    model = feedalign.convert(mlp3().double(), "drtp", seed=1)
    x, _ = data()
    with pytest.raises(RuntimeError, match="drtp"):
        F.mse_loss(model(x), torch.randn(7, 3, dtype=torch.float64)).backward()


@pytest.mark.parametrize("build", [lambda: mlp3().double(), lambda: ResNet().double()])
def test_shallow_trains_only_the_output_layer(build):
    model = feedalign.convert(build(), "shallow", seed=0)
    head = model[-1] if isinstance(model, nn.Sequential) else model.fc
    head_ids = {id(p) for p in head.parameters()}
    hidden = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in head_ids}
    x = torch.randn(6, 5) if isinstance(model, nn.Sequential) else torch.randn(6, 3, 8, 8)
    x, t = x.double(), torch.arange(6) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    before = head.weight.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in hidden:
            assert p.grad is None and torch.equal(p, hidden[n]), n
    assert not torch.equal(head.weight, before)
    assert feedalign.feedback(model) == [] and "fixed: no gradient" in feedalign.describe(model)


class ByHand(nn.Module):
    """TinyDFA's DFALayer pattern: taps and the output marked in the forward."""

    def __init__(self, mark_output: bool = True):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)
        self.tap1, self.tap2 = feedalign.Tap(), feedalign.Tap()
        self.out = feedalign.Output() if mark_output else nn.Identity()

    def forward(self, x):
        h1 = torch.tanh(self.fc1(x))
        h2 = torch.tanh(self.fc2(self.tap1(h1)))
        return self.out(self.fc3(self.tap2(h2)))


@pytest.mark.parametrize("mark_output", [True, False])
def test_taps_placed_by_hand_match_formula(mark_output):
    torch.manual_seed(0)
    model = ByHand(mark_output).double()
    x, t = data()
    assert feedalign.rule_of(model) == "bp" and "not converted" in repr(model)  # identities until converted
    feedalign.convert(model, "dfa", seed=3, **({} if mark_output else {"output": "fc3"}))
    feedalign.BCE()(model(x), t).backward()
    B1, B2 = feedalign.feedback(model)
    with torch.no_grad():
        h1 = torch.tanh(model.fc1(x))
        h2 = torch.tanh(model.fc2(h1))
        e = torch.sigmoid(model.fc3(h2)) - F.one_hot(t, 3).double()
    torch.testing.assert_close(model.fc3.weight.grad, e.T @ h2)
    torch.testing.assert_close(model.fc2.weight.grad, ((e @ B2) * (1 - h2**2)).T @ h1)
    torch.testing.assert_close(model.fc1.weight.grad, ((e @ B1) * (1 - h1**2)).T @ x)


def test_backprop_alignment_bf16_and_compile_on_a_resnet():
    plain, model = _twins(ResNet, "dfa")
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(plain(x), t).backward()
    with feedalign.backprop(model):
        F.cross_entropy(model(x), t).backward()
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    model.zero_grad()
    angles = feedalign.alignment(model, x, t, nn.CrossEntropyLoss())
    assert angles["fc"]["update"] == pytest.approx(0.0, abs=1e-4)
    assert 0 < angles["layer1.0.conv1"]["update"] < 180
    assert all(p.grad is None for p in model.parameters())  # alignment() restores the grads
    f32 = copy.deepcopy(model).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f32(x.float())
    F.cross_entropy(out.float(), t).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in f32.parameters())
    compiled = torch.compile(model, backend="aot_eager")
    F.cross_entropy(compiled(x), t).backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    for a, p in zip(eager, model.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("signal", ["error", "target"])
def test_gradcheck_output_path_is_the_identity(signal):
    from feedalign.rules.dfa import DFAFunction

    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    taps = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, 2, dtype=torch.float64))
    B = torch.randn(3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y: DFAFunction.apply(y, B, signal, *taps), (y,))
