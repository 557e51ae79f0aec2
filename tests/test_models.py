"""The paper's networks under every rule, feedback buffers, conversion errors,
and the headline property: dfa learns from zero weights where bp cannot."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import feedalign
from feedalign.rules.dfa import ErrorTap
from feedalign.rules.local import LocalOutput

NETS = {"mlp": (1, 8, 8), "conv": (3, 16, 16)}


@pytest.mark.parametrize(
    "network,rule,nonlin", list(itertools.product(NETS, feedalign.RULES, ["tanh", "sigm", "relu"]))
)
def test_every_parameter_gets_a_gradient_and_no_buffer_does(network, rule, nonlin):
    shape = NETS[network]
    model = feedalign.build_model(
        network,
        shape,
        5,
        rule=rule,
        nonlin=nonlin,
        num_hidden=16,
        batchnorm=1,
        dropout=1,
        seed=0,
    )
    x = torch.rand(4, *shape)
    feedalign.BCE()(model(x), torch.tensor([0, 1, 2, 3])).backward()
    heads = {id(m) for o in model.modules() if isinstance(o, LocalOutput) for m in o.modules()}  # local rules
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in heads]
    first, last = layers[0], layers[-1]
    for name, p in model.named_parameters():
        if rule == "shallow" and not any(p is q for q in last.parameters()):
            assert p.grad is None, name  # shallow: only the output layer learns
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # From zero weights every hidden activation is f(0), constant, so at the first
        # step only the first layer's weights (fed by x) can move; with relu (random
        # init) all of them must.
        # pred's decoders start at zero (the reference's init), so its first step sends
        # nothing into the blocks; only the decoders move.
        if rule not in ("bp", "shallow", "pred") and p.dim() > 1 and (nonlin == "relu" or p is first.weight):
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    fb = feedalign.feedback(model)
    spec = feedalign.RULES[rule]
    # B's: every per-layer weight, dfa's and drtp's taps, a -bio pred decoder (fa-trained)
    has_b = spec.kind == "per-layer" or rule in ("dfa", "drtp") or (spec.kind == "local" and spec.bio and
                                                                     spec.loss != "sim")  # fmt: skip
    assert (len(fb) == 0) != has_b
    assert all(not b.requires_grad and b.grad is None for b in fb)
    params = {id(p) for p in model.parameters()}
    assert not any(id(b) in params for b in fb)
    zeroed = feedalign.RULES[rule].original_init and nonlin != "relu"  # docs/original.md §1
    assert all((m.weight.abs().sum() == 0) == zeroed for m in layers[:-1])
    # the local rules zero the output layer, as the reference does (its input is cut)
    assert (last.weight.abs().sum() == 0) == (zeroed or spec.kind == "local")


def test_feedback_shapes_and_order():
    dfa = feedalign.build_model("conv", (3, 32, 32), 10, rule="dfa", seed=0)
    assert [tuple(b.shape) for b in feedalign.feedback(dfa)] == [
        (10, 96 * 15 * 15),
        (10, 128 * 7 * 7),
        (10, 256 * 3 * 3),
        (10, 2048),
        (10, 2048),
    ]
    fa = feedalign.build_model("mlp", (1, 28, 28), 10, rule="fa", num_layers=3, seed=0)
    assert [tuple(b.shape) for b in feedalign.feedback(fa)] == [
        (800, 784),
        (800, 800),
        (800, 800),
        (10, 800),
    ]
    mnist_conv = feedalign.build_model("conv", (1, 28, 28), 10, rule="dfa", seed=0)
    assert feedalign.feedback(mnist_conv)[2].shape == (10, 256 * 2 * 2)  # inferred, not 3×32×32


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_feedback_is_a_seeded_buffer_that_round_trips(rule, tmp_path):
    def build(seed):
        return feedalign.build_model("mlp", (1, 8, 8), 4, rule=rule, num_hidden=8, seed=seed)

    a, b, c = build(1), build(1), build(2)
    assert all(torch.equal(x, y) for x, y in zip(feedalign.feedback(a), feedalign.feedback(b)))
    assert not any(torch.equal(x, y) for x, y in zip(feedalign.feedback(a), feedalign.feedback(c)))
    torch.save(a.state_dict(), tmp_path / "m.pt")
    c.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert all(torch.equal(x, y) for x, y in zip(feedalign.feedback(a), feedalign.feedback(c)))
    c.to(torch.float64)
    assert all(x.dtype == torch.float64 for x in feedalign.feedback(c))
    opt = torch.optim.SGD(c.parameters(), lr=1.0)
    before = [x.clone() for x in feedalign.feedback(c)]
    feedalign.BCE()(c(torch.rand(3, 1, 8, 8, dtype=torch.float64)), torch.tensor([0, 1, 2])).backward()
    opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, feedalign.feedback(c)))


def test_convert_with_seed_is_reproducible_and_nested_sequential_works():
    def net():
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), inner, nn.Sequential(nn.Linear(5, 3)))

    a, b = feedalign.convert(net(), "dfa", seed=7), feedalign.convert(net(), "dfa", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(feedalign.feedback(a), feedalign.feedback(b)))
    assert [tuple(x.shape) for x in feedalign.feedback(a)] == [(3, 6), (3, 5)]
    assert sum(isinstance(m, ErrorTap) for m in a.modules()) == 2
    assert set(net().state_dict()) <= set(a.state_dict())  # parameter names unchanged
    feedalign.BCE()(a(torch.randn(2, 4)), torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in a.parameters())


def test_dfa_cuts_the_graph_at_every_tap():
    """No error may pass through another block's transposed weight: the inputs of
    every layer after the first must not require grad, so autograd cannot form W^T δ."""
    model = feedalign.build_model(
        "mlp", (1, 8, 8), 4, rule="dfa", num_layers=3, nonlin="relu", num_hidden=8, seed=0
    )
    seen = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].requires_grad))
    model(torch.rand(2, 1, 8, 8, requires_grad=True))
    assert seen == [True, False, False, False]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.lin(x)


def test_unconvertible_models_get_an_error_that_says_why():
    with pytest.raises(ValueError, match="no module named"):
        feedalign.convert(nn.Sequential(Residual(), nn.Linear(4, 2)), "dfa", blocks=["lin"])
    with pytest.raises(ValueError, match="no weight layer"):
        feedalign.convert(nn.Sequential(nn.Tanh()), "dfa")
    with pytest.raises(ValueError, match="bp, fa, usf, frsf, brsf, kp, dfa"):
        feedalign.convert(nn.Sequential(nn.Linear(4, 2)), "hebb")
    conv_first = feedalign.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), "dfa")
    with pytest.raises(RuntimeError, match="first forward pass"):
        feedalign.feedback(conv_first)  # sized at the first forward pass, no input_shape needed
    conv_first(torch.rand(3, 1, 4, 4))
    assert [tuple(b.shape) for b in feedalign.feedback(conv_first)] == [(2, 8)]
    m = feedalign.convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), "fa")
    with pytest.raises(ValueError, match="already converted"):
        feedalign.convert(m, "dfa")
    # fa works on any module tree, not only Sequential
    r = feedalign.convert(Residual(), "fa")
    assert len(feedalign.feedback(r)) == 1
    with pytest.raises(ValueError, match="unknown network 'resnet'; choose one of mlp, conv"):
        feedalign.build_model("resnet", (1, 8, 8), 4)


def _blobs(n=256, dim=10, classes=4):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + 0.5 * torch.randn(n, dim, generator=g), y


def _train(model, x, y, steps=150):
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    crit = feedalign.BCE()
    for _ in range(steps):
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return crit(model(x), y).item(), (model(x).argmax(1) == y).float().mean().item()


def test_dfa_learns_from_zero_weights_where_bp_cannot():
    x, y = _blobs()
    dfa = feedalign.build_model("mlp", (10,), 4, rule="dfa", num_hidden=32, seed=0)
    assert all(p.abs().sum() == 0 for p in dfa.parameters())
    bp = feedalign.build_model("mlp", (10,), 4, rule="bp", num_hidden=32, seed=0)
    with torch.no_grad():
        for p in bp.parameters():
            p.zero_()
    dfa_loss, dfa_acc = _train(dfa, x, y)
    bp_loss, bp_acc = _train(bp, x, y)
    # bp from zeros: hidden units stay identical (zero); only the output bias learns,
    # so it is stuck at the class-prior loss with chance-level accuracy.
    assert all(p.abs().sum() == 0 for n, p in bp.named_parameters() if "weight" in n)
    assert bp_acc < 0.45 and dfa_acc > 0.95
    assert dfa_loss < 0.5 * bp_loss


def test_build_model_feedback_init_chooses_fa_feedback_independent_of_the_weights():
    """feedback_init "original": fa's B copies the initial weights (docs/original.md §1; relu keeps W, so
    B == W); "random": B is drawn independently (BioTorch's fa), with the init's bound."""
    kw = dict(rule="fa", nonlin="relu", num_layers=1, num_hidden=32, seed=3)
    same = feedalign.build_model("mlp", (1, 8, 8), 10, **kw)
    drawn = feedalign.build_model("mlp", (1, 8, 8), 10, feedback_init="random", **kw)
    for model, equal in ((same, True), (drawn, False)):
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        for layer, b in zip(layers, feedalign.feedback(model)):
            assert torch.equal(b, layer.weight) is equal
            assert b.abs().max() <= 1 / layer.in_features**0.5
    with pytest.raises(ValueError, match="original, random, weights"):
        feedalign.build_model("mlp", (1, 8, 8), 10, feedback_init="copy", **kw)


@pytest.mark.parametrize("rule", ["bp", "fa", "usf", "kp", "dfa", "drtp"])
def test_channels_last_gives_the_same_gradients(rule, float64):
    """-memory_format only changes the layout: one step of LeNet (float64) has the same
    loss and the same gradient for every parameter in both layouts."""
    from feedalign.models import build_model

    def grads(channels_last: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model = build_model("lenet", (1, 32, 32), 10, rule=rule, nonlin="relu", criterion="ce", seed=3,
                            feedback_init="random")  # fmt: skip
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(5, 1, 32, 32, generator=g), torch.randint(0, 10, (5,), generator=g)
        loss = torch.nn.functional.nll_loss(model(x), y)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    (loss_a, a), (loss_b, b) = grads(False), grads(True)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-12, msg=name)


def test_memory_format_auto_picks_channels_last_for_conv_networks_on_the_cpu():
    from feedalign.train.inputs import use_channels_last

    cpu = torch.device("cpu")
    conv, mlp = nn.Sequential(nn.Conv2d(1, 2, 3)), nn.Sequential(nn.Linear(2, 2))
    assert use_channels_last("auto", conv, cpu) and not use_channels_last("auto", mlp, cpu)
    assert not use_channels_last("auto", conv, torch.device("cuda"))
    assert not use_channels_last("contiguous", conv, cpu) and use_channels_last("channels_last", mlp, cpu)


@pytest.mark.parametrize("rule", ["fa", "dfa", "drtp"])
def test_convert_without_a_seed_leaves_torchs_global_rng_alone(rule):
    """No seed: a fresh seed from the OS, for every rule kind; torch's global stream (which
    the user's own init and dropout read) is not advanced, and two conversions differ."""
    a, b = (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)) for _ in range(2))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    feedalign.convert(a, rule, input_shape=(4,))
    assert torch.equal(torch.rand(3), expected)
    feedalign.convert(b, rule, input_shape=(4,))
    assert not torch.equal(feedalign.feedback(a)[0], feedalign.feedback(b)[0])
