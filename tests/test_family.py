"""The per-layer rule family against its formulas (float64, small shapes).

A layer y = x Wᵀ + b (or conv2d(x, W)) with output error δ sends δ B to its input:
Linear dx = δ B, Conv2d dx = conv_transpose2d(δ, B). The rules' B:
    usf   B = s · sign(W),  s = 1/√(3·fan_in)
    frsf  B = |M| ∘ sign(W), M fixed
    brsf  B = |M_t| ∘ sign(W), M_t ~ U(±1/√fan_in) drawn at every training forward
    kp    B trainable with dL/dB = dL/dW, so B − W = (1 − ηλ)^k (B₀ − W₀) under SGD
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedalign
from feedalign.metrics.alignment import alignment, angle, feedback_angles
from feedalign.rules import RULES, check_rule
from feedalign.rules.fa import FAConv2dFunction, FALinearFunction
from feedalign.rules.feedback import add_feedback, feedback_for

SIGN_RULES = ("usf", "frsf", "brsf")


pytestmark = pytest.mark.usefixtures("float64")  # every tensor here is float64 (conftest.py)


def linear() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4))


def conv() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))


LAYERS = {"linear": (linear, (6, 5)), "conv": (conv, (2, 2, 5, 5))}


def converted(kind: str, rule: str, seed: int = 0) -> tuple[nn.Sequential, tuple[int, ...]]:
    build, x_shape = LAYERS[kind]
    torch.manual_seed(seed)
    return feedalign.convert(build(), rule, seed=seed + 100), x_shape


def input_grad_formula(layer: nn.Module, grad_out: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """δ B for Linear; for Conv2d the adjoint of the convolution, applied with kernel B."""
    if isinstance(layer, nn.Linear):
        return grad_out @ B  # (N, out) @ (out, in)
    return F.conv_transpose2d(grad_out, B, padding=layer.padding)


def backward_once(model: nn.Module, x_shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """One forward + backward with a random output error; returns (x.grad, δ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g).requires_grad_()
    y = model(x)
    delta = torch.randn(y.shape, generator=g)
    y.backward(delta)
    return x.grad, delta


def current(layer: nn.Module) -> torch.Tensor:
    """The B the layer's backward uses now. Under no_grad: in a training forward's
    context (training mode, gradients on) feedback_for would make brsf draw."""
    with torch.no_grad():
        return feedback_for(layer)


def sgd_steps(model: nn.Module, x_shape, k: int, opt: torch.optim.Optimizer):
    """k optimizer steps on a squared-error loss; yields after each step."""
    g = torch.Generator().manual_seed(7)
    for _ in range(k):
        x = torch.randn(x_shape, generator=g)
        opt.zero_grad()
        (model(x) - 1.0).pow(2).sum().backward()
        opt.step()
        yield


# --- the table ------------------------------------------------------------------


def test_the_table_names_every_rule_with_its_kind():
    local = ["pred", "sim", "predsim", "pred-bio", "sim-bio", "predsim-bio"]
    assert list(RULES) == ["bp", "fa", "usf", "frsf", "brsf", "kp", "dfa", "drtp", "shallow", *local]
    kinds = {name: r.kind for name, r in RULES.items()}
    assert kinds == {"bp": "bp", "fa": "per-layer", "usf": "per-layer", "frsf": "per-layer",
                     "brsf": "per-layer", "kp": "per-layer", "dfa": "direct", "drtp": "direct",
                     "shallow": "direct"} | dict.fromkeys(local, "local")  # fmt: skip
    assert {RULES[n].signal for n in ("dfa", "drtp", "shallow")} == {"error", "target", "none"}
    assert all(r.summary for r in RULES.values())


def test_unknown_rules_are_refused_with_the_list():
    local = "pred, sim, predsim, pred-bio, sim-bio, predsim-bio"
    valid = f"bp, fa, usf, frsf, brsf, kp, dfa, drtp, shallow, {local}"
    with pytest.raises(ValueError, match=f"unknown learning rule 'hebb'; choose one of {valid}"):
        check_rule("hebb")
    with pytest.raises(ValueError, match=valid):
        feedalign.convert(linear(), "hebb")
    with pytest.raises(ValueError, match=valid):
        feedalign.build_model("mlp", (1, 4, 4), 3, rule="hebb")
    with pytest.raises(ValueError, match="not a per-layer rule; choose one of fa, usf, frsf, brsf, kp"):
        add_feedback(nn.Linear(2, 2), "weight", torch.zeros(2, 2), "dfa")
    from feedalign.train.config import OptionError, Options

    with pytest.raises(OptionError, match=f"-gradient 'hebb' is not allowed; choose one of {valid}"):
        Options(gradient="hebb").check()


def test_rule_of_reports_what_convert_recorded():
    assert feedalign.rule_of(linear()) == "bp"
    for rule in ("fa", "usf", "kp", "dfa"):
        model = feedalign.convert(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)), rule)
        assert feedalign.rule_of(model) == rule
        assert feedalign.rule_of(model[0]) == (rule if RULES[rule].kind == "per-layer" else "bp")
    with pytest.raises(ValueError, match="already converted"):
        feedalign.convert(model, "fa")


# --- usf ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYERS)
def test_usf_sends_the_scaled_sign_of_the_current_weights(kind):
    model, x_shape = converted(kind, "usf")
    layer = model[0]
    s = 1 / math.sqrt(3 * layer.weight[0].numel())  # std of U(±1/√fan_in)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        if step:
            next(sgd_steps(model, x_shape, 1, opt))
        signs = torch.sign(layer.weight.detach())
        grad_x, delta = backward_once(model, x_shape, seed=step)
        direction = input_grad_formula(layer, delta, signs)
        torch.testing.assert_close(grad_x, s * direction)
        assert angle(grad_x, direction) == pytest.approx(0.0, abs=1e-5)
        assert torch.equal(torch.sign(current(layer)), signs)
    assert feedback_angles(model)["0"] == pytest.approx(angle(torch.sign(layer.weight), layer.weight))


# --- frsf and brsf ----------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYERS)
def test_frsf_keeps_its_magnitudes_and_follows_the_signs(kind):
    model, x_shape = converted(kind, "frsf")
    layer = model[0]
    magnitude = layer.feedback.clone()  # |M|, M drawn once from U(±1/√fan_in)
    assert 0 < magnitude.min() and magnitude.max() <= 1 / math.sqrt(layer.weight[0].numel())
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(4):
        if step:
            next(sgd_steps(model, x_shape, 1, opt))
        grad_x, delta = backward_once(model, x_shape, seed=step)
        B = magnitude * torch.sign(layer.weight.detach())
        torch.testing.assert_close(grad_x, input_grad_formula(layer, delta, B))
        torch.testing.assert_close(current(layer).abs(), magnitude)
        assert torch.equal(torch.sign(current(layer)), torch.sign(layer.weight))


@pytest.mark.parametrize("kind", LAYERS)
def test_brsf_draws_new_magnitudes_every_training_step(kind):
    model, x_shape = converted(kind, "brsf")
    layer = model[0]
    bound = 1 / math.sqrt(layer.weight[0].numel())
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    previous = None
    for step in range(4):
        if step:
            next(sgd_steps(model, x_shape, 1, opt))  # this forward draws too
        signs = torch.sign(layer.weight.detach())
        grad_x, delta = backward_once(model, x_shape, seed=step)
        B = current(layer)  # outside a training forward: the draw this backward used
        magnitude = B.abs()
        assert torch.equal(torch.sign(B), signs)
        assert magnitude.max() <= bound and magnitude.std() > 0
        torch.testing.assert_close(grad_x, input_grad_formula(layer, delta, B))
        if previous is not None:
            assert not torch.allclose(magnitude, previous)
        previous = magnitude
    with torch.no_grad():
        model(torch.randn(x_shape))
    model.eval()
    model(torch.randn(x_shape)).sum().backward()
    assert torch.equal(current(layer).abs(), previous)  # no draw in eval or under no_grad


def test_sign_rules_take_the_recurrent_layers_own_init_bound():
    """nn.LSTM draws every weight from U(±1/√hidden), whatever its fan-in: usf's scale
    and brsf's draws use that bound, not 1/√fan_in (here fan-in 16 ≠ hidden 4)."""
    torch.manual_seed(0)
    hidden, n_in = 4, 16
    bound = 1 / math.sqrt(hidden)
    usf = feedalign.convert(nn.LSTM(n_in, hidden), "usf", seed=1)
    B = feedback_for(usf, "weight_ih_l0")
    torch.testing.assert_close(B, torch.sign(usf.weight_ih_l0.detach()) * bound / math.sqrt(3))
    brsf = feedalign.convert(nn.LSTM(n_in, hidden), "brsf", seed=1)
    magnitudes = []
    for _ in range(20):
        brsf(torch.randn(3, 2, n_in))[0].sum().backward()
        magnitudes.append(feedback_for(brsf.eval(), "weight_ih_l0").abs())
        brsf.train()
    m = torch.stack(magnitudes)
    assert m.max() <= bound and m.max() > 1 / math.sqrt(n_in)  # U(0, 1/2), not U(0, 1/4)


def test_brsf_draws_are_the_same_on_every_rank_and_continue_after_a_resume():
    def run(model, steps):
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        for _ in range(steps):
            model(x).sum().backward()
        return current(model[0]).clone()

    a, _ = converted("linear", "brsf", seed=0)
    b, _ = converted("linear", "brsf", seed=0)  # another rank: same seeds
    other, _ = converted("linear", "brsf", seed=1)
    assert torch.equal(run(a, 3), run(b, 3))
    assert not torch.equal(run(a, 1), run(other, 4))  # a and other both at draw 4
    resumed, _ = converted("linear", "brsf", seed=5)
    resumed.load_state_dict(a.state_dict())  # a checkpoint taken after 4 draws
    assert int(resumed[0].feedback_step) == 4
    assert torch.equal(run(a, 2), run(resumed, 2))


def test_alignment_leaves_brsf_where_it_was():
    torch.manual_seed(0)
    model = feedalign.convert(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), "brsf", seed=0)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    model(x).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    angles = alignment(model, x, y, feedalign.BCE())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(angles) == {"0", "2"} and all(0 <= m["feedback"] < 90 for m in angles.values())
    model(x).sum().backward()  # the sequence continues from draw 2, as without alignment()
    assert int(model[2].feedback_step) == 2
    assert int(model[0].feedback_step) == 0  # its input has no gradient: B unused, nothing drawn


@pytest.mark.parametrize("rule", SIGN_RULES)
@pytest.mark.parametrize("kind", LAYERS)
def test_sign_rules_skip_b_where_the_input_has_no_gradient(kind, rule):
    """A first layer's backward never reads B: the rule skips building it (and brsf its
    draw), and the weight gradients are exactly those of the path that builds it."""
    grads = []
    for needs in (False, True):
        model, x_shape = converted(kind, rule, seed=0)
        x = torch.randn(x_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        model(x.requires_grad_(needs)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if rule == "brsf":
            assert int(model[0].feedback_step) == int(needs)
    for skipped, built in zip(*grads):
        torch.testing.assert_close(skipped, built, rtol=0, atol=0)


class _SeqModel(nn.Module):
    """A recurrent or attention layer as a first layer: x (N, T, 5) -> a scalar."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layer = {
            "lstm": lambda: nn.LSTM(5, 4, num_layers=2, batch_first=True, bidirectional=True),
            "grucell": lambda: nn.GRUCell(5, 4),
            "mha-self": lambda: nn.MultiheadAttention(5, 1, batch_first=True),
            "mha-cross": lambda: nn.MultiheadAttention(5, 1, batch_first=True),
            "mha-kvdim": lambda: nn.MultiheadAttention(5, 1, kdim=3, vdim=3, batch_first=True),
        }[kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "lstm":
            return self.layer(x)[0].sum()
        if self.kind == "grucell":
            return self.layer(x[:, 0], self.layer(x[:, 1])).sum()  # the second step's h has a gradient
        if self.kind == "mha-self":
            return self.layer(x, x, x)[0].sum()
        kv = x.flip(1) if self.kind == "mha-cross" else x[..., :3]
        return self.layer(x, kv, kv, need_weights=False)[0].sum()


@pytest.mark.parametrize("rule", SIGN_RULES)
@pytest.mark.parametrize("kind", ["lstm", "grucell", "mha-self", "mha-cross", "mha-kvdim"])
def test_sign_rules_skip_b_in_recurrent_and_attention_first_layers(kind, rule):
    """The same skip in fa's recurrent and attention layers: B_ih (B_in) of a layer
    fed by an input without gradient is not built, and every weight gradient is
    exactly that of the path that builds it."""
    grads = []
    for needs in (False, True):
        torch.manual_seed(0)
        model = feedalign.convert(_SeqModel(kind), rule, seed=100)
        x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        model(x.requires_grad_(needs)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if rule == "brsf":
            first = {"lstm": "weight_ih_l0", "grucell": "weight_ih"}.get(kind, "in_proj_weight")
            if kind == "mha-kvdim":
                first = "q_proj_weight"
            calls = 2 if kind == "grucell" else 1  # the cell runs twice: one draw per call
            assert int(getattr(model.layer, f"{first}_feedback_step")) == calls * int(needs)
    assert len(grads[0]) == len(list(model.parameters()))
    for skipped, built in zip(*grads):
        torch.testing.assert_close(skipped, built, rtol=0, atol=0)


# --- kp -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYERS)
def test_kp_difference_decays_geometrically_under_sgd_with_weight_decay(kind):
    model, x_shape = converted(kind, "kp")
    layer = model[0]
    assert isinstance(layer.feedback, nn.Parameter)
    B0, W0 = layer.feedback.detach().clone(), layer.weight.detach().clone()
    assert not torch.allclose(B0, W0)
    lr, decay, k = 0.05, 0.3, 6
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay)
    for _ in sgd_steps(model, x_shape, k, opt):
        torch.testing.assert_close(layer.feedback.grad, layer.weight.grad)
    assert not torch.allclose(layer.weight, W0)  # it did train
    torch.testing.assert_close(layer.feedback - layer.weight, (1 - lr * decay) ** k * (B0 - W0))
    grad_x, delta = backward_once(model, x_shape, seed=0)
    torch.testing.assert_close(grad_x, input_grad_formula(layer, delta, layer.feedback.detach()))


@pytest.mark.parametrize("kind", LAYERS)
def test_kp_gets_the_same_update_as_w_under_adam(kind):
    """Adam: identical gradients, identical moments, identical steps. AdamW's decoupled
    decay then shrinks B − W by (1 − ηλ) per step. (Adam's L2 decay adds λB and λW to
    different gradients, which Adam's normalisation does not keep apart: no law there.)"""
    model, x_shape = converted(kind, "kp")
    layer = model[0]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    B, W = layer.feedback.detach().clone(), layer.weight.detach().clone()
    for _ in sgd_steps(model, x_shape, 4, opt):
        torch.testing.assert_close(layer.feedback - B, layer.weight - W)
        assert (layer.weight - W).abs().max() > 0
        B, W = layer.feedback.detach().clone(), layer.weight.detach().clone()
    lr, decay, k = 0.01, 0.5, 5
    for _ in sgd_steps(model, x_shape, k, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)):
        pass
    torch.testing.assert_close(layer.feedback - layer.weight, (1 - lr * decay) ** k * (B - W))
    angles = [feedback_angles(model)["0"]]
    for _ in sgd_steps(model, x_shape, 100, torch.optim.SGD(model.parameters(), lr=0.02, weight_decay=2.0)):
        angles.append(feedback_angles(model)["0"])
    assert angles[-1] < 0.5 * angles[0]  # B aligns with W: the curve users plot


def test_kp_feedback_gradient_is_the_weight_gradient_formula():
    """dL/dB := δᵀ x (Linear) and the kernel gradient x ⋆ δ (Conv2d), as for W."""
    x, W, b, B = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4), torch.randn(4, 5, requires_grad=True)
    delta = torch.randn(6, 4)
    FALinearFunction.apply(x, W, b, B).backward(delta)
    torch.testing.assert_close(B.grad, delta.T @ x)
    x, W = torch.randn(2, 2, 5, 5), torch.randn(3, 2, 3, 3)
    B = torch.randn(3, 2, 3, 3, requires_grad=True)
    y = FAConv2dFunction.apply(x, W, None, B, (1, 1), (1, 1), (1, 1), 1)
    delta = torch.randn(y.shape)
    y.backward(delta)
    W_ = W.clone().requires_grad_()
    F.conv2d(x, W_, None, 1, 1).backward(delta)  # back-prop's dL/dW, the oracle
    torch.testing.assert_close(B.grad, W_.grad)


# --- every per-layer rule --------------------------------------------------------


@pytest.mark.parametrize("rule", [n for n, r in RULES.items() if r.kind == "per-layer"])
def test_every_per_layer_rule_trains_through_the_protocol(rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    feedalign.convert(model, rule, seed=0)
    fb = feedalign.feedback(model)
    assert [tuple(b.shape) for b in fb] == [(2, 1, 3, 3), (3, 32)]
    assert all(not b.requires_grad for b in fb)
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    angles = alignment(model, x, y, feedalign.BCE())
    assert set(angles) == {"0", "3"}
    assert all(set(m) == {"update", "error", "feedback"} for m in angles.values())
    if rule in SIGN_RULES:
        assert all(torch.equal(torch.sign(b), torch.sign(w))
                   for b, w in zip(fb, (model[0].weight, model[3].weight)))  # fmt: skip
    names = set(model.state_dict())
    assert {"0.feedback", "3.feedback"} <= names


# --- through the trainer ----------------------------------------------------------


@pytest.mark.parametrize("rule", ["brsf", "kp"])
def test_an_interrupted_and_resumed_run_is_bit_identical(rule, tmp_path):
    """brsf's draw counter and kp's trainable B travel in the checkpoint."""
    import json

    from feedalign.train import checkpoint
    from feedalign.train.config import Options
    from feedalign.train.session import Interrupted, train

    torch.set_default_dtype(torch.float32)  # the trainer's; the float64 fixture restores its own after

    def opts(where: str) -> Options:
        return Options(dataset="digits", datapath=str(tmp_path / "D"), preProcDir=str(tmp_path / "P"),
                       epoch=2, LR=1e-3, num_hidden=32, seed=5, quiet=True, threads=1, type="float",
                       gradient=rule, optimization="adam", weightDecay=1e-3,
                       save=str(tmp_path / where))  # fmt: skip

    ref = train(opts("a"))
    with pytest.raises(Interrupted):
        train(opts("b"), stop_at=(1, 10))
    part = tmp_path / "b"
    resumed = train(Options.from_dict(json.loads((part / "options.json").read_text())), resume=part)
    a, b = (checkpoint.load(r / "checkpoint.pt")["model"] for r in (ref, resumed))
    assert set(a) == set(b) and any("feedback" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brsf_draw_is_uniform_on_zero_to_bound_and_seeded(dtype):
    """draw_uniform: U(0, b) moments (mean b/2, variance b²/12) on 200k draws, the same
    numbers for the same seed, others for the next one."""
    from feedalign.rules.feedback import draw_uniform

    b = 0.3
    x, again, other = (torch.empty(400, 500, dtype=dtype) for _ in range(3))
    draw_uniform(x, b, seed=7)
    draw_uniform(again, b, seed=7)
    draw_uniform(other, b, seed=8)
    assert x.min() >= 0 and x.max() < b
    assert abs(x.mean().item() - b / 2) < 4 * b / math.sqrt(12 * x.numel())
    assert x.var().item() == pytest.approx(b * b / 12, rel=0.02)
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_xavier_init_draws_weights_and_every_rules_feedback_like_xavier():
    """build_model(init="xavier") (BioTorch's default): W ~ U(±b), b = √(6/(fan_in+fan_out)),
    zero biases; fa's B_0 from the same U(±b), independent of W; usf's s = b/√3; brsf's
    draws U(0, b); the feedback of init="default" keeps 1/√fan_in."""
    from feedalign.models import build_model
    from feedalign.rules.feedback import xavier_bound

    def xb(w):  # the formula, by hand: fans of a (out, in, kh, kw) kernel
        k = w[0][0].numel() if w.dim() > 2 else 1
        return math.sqrt(6 / (w.shape[0] * k + w.shape[1] * k))

    conv, lin = nn.Conv2d(6, 16, 5), nn.Linear(120, 84)
    assert xavier_bound(conv.weight) == pytest.approx(math.sqrt(6 / (150 + 400)))
    assert xavier_bound(lin.weight) == pytest.approx(math.sqrt(6 / 204))
    kw = dict(nonlin="relu", criterion="ce", seed=4, feedback_init="random", init="xavier")
    fa = build_model("lenet", (1, 32, 32), 10, rule="fa", **kw)
    for m in fa.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            b = xb(m.weight)
            assert m.weight.abs().max() <= b and m.weight.abs().max() > 0.9 * b
            assert torch.all(m.bias == 0)
            assert m.feedback.abs().max() <= b and m.feedback.abs().max() > 0.9 * b
            assert not torch.equal(m.feedback, m.weight)
    big = fa[3].weight  # 2,400 weights: the std of U(±b) is b/√3
    assert big.std().item() == pytest.approx(xb(big) / math.sqrt(3), rel=0.05)
    usf = build_model("lenet", (1, 32, 32), 10, rule="usf", **kw)
    assert usf[9].feedback.item() == pytest.approx(xb(usf[9].weight) / math.sqrt(3))
    brsf = build_model("lenet", (1, 32, 32), 10, rule="brsf", **kw)
    assert brsf[9]._feedback_bounds["feedback"] == pytest.approx(xb(brsf[9].weight))
    classic = build_model("lenet", (1, 32, 32), 10, rule="usf", **(kw | {"init": "classic"}))
    assert classic[9].feedback.item() == pytest.approx(1 / math.sqrt(3 * 120))
    with pytest.raises(ValueError, match="classic, xavier"):
        build_model("lenet", (1, 32, 32), 10, rule="fa", **(kw | {"init": "he"}))
