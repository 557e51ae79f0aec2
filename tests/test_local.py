"""The local rules (pred, sim, predsim and their -bio variants) against formulas
written here, in float64: each block's weight gradient is the gradient of its own
local loss and of nothing else; the output layer's is the true one; a -bio decoder
learns by feedback alignment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedalign
from feedalign.rules.local import LOCAL_RULES, LocalOutput, decoder_pool

N, C = 6, 3  # batch, classes
LOCAL = list(LOCAL_RULES)


def heads(model: nn.Module):
    return next(m for m in model.modules() if isinstance(m, LocalOutput)).heads


def layers(model: nn.Module) -> list[nn.Module]:
    """The model's own weight layers, in order (the taps shift Sequential indices)."""
    inside = {id(m) for m in heads(model).modules()}
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside]


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Random values in every head parameter (pred's decoders start at zero, which would
    make the pred terms vanish) and the output layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def similarity(x: torch.Tensor) -> torch.Tensor:
    """The reference's adjusted cosine similarity, written out: rows centred over their
    features, divided by (1e-8 + norm), Gram matrix, clamped to [-1, 1]."""
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.reshape(x.shape[0], x.shape[1], -1).std(dim=2)
    x = x.reshape(x.shape[0], -1)
    xc = x - x.mean(dim=1, keepdim=True)
    norm = (xc * xc).sum(dim=1, keepdim=True).sqrt()
    xn = xc / (1e-8 + norm)
    return (xn @ xn.T).clamp(-1, 1)


def local_loss(rule: str, head, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Nøkland & Eidnes (2019), eqs. as in their train.py, from the head's parameters."""
    spec = LOCAL_RULES[rule]
    onehot = F.one_hot(y, C).double()
    target = onehot @ head.projection.T if spec.bio else onehot
    beta = spec.beta if spec.loss == "predsim" else (0.0 if spec.loss == "pred" else 1.0)
    loss = torch.zeros((), dtype=torch.float64)
    if beta > 0:
        if spec.bio:
            seen = h
        elif h.dim() == 4:
            seen = F.conv2d(h, head.transform.weight, padding=1)
        else:
            seen = h @ head.transform.weight.T
        loss = loss + beta * ((similarity(seen) - similarity(target)) ** 2).mean()
    if beta < 1:
        flat, d = h.reshape(len(h), -1), head.decoder
        z = flat @ d.weight.T + d.bias
        if spec.bio:  # fa: z's value, but the error reaches h through the fixed B, not through D
            z = flat @ d.feedback.T + (flat @ (d.weight - d.feedback).T).detach() + d.bias
            t = (target > 0).double()
            bce = (z.clamp(min=0) - z * t + torch.log1p(torch.exp(-z.abs()))).mean()
            loss = loss + (1 - beta) * bce
        else:
            loss = loss + (1 - beta) * (torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]).mean()
    return loss


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, C)).double()


@pytest.mark.parametrize("rule", LOCAL)
def test_each_mlp_block_learns_from_its_own_loss_only(rule):
    model = feedalign.convert(mlp(), rule)
    randomise(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(x), y).backward()

    # by hand: h1 = tanh(W1 x + b1), h2 = tanh(W2 h1 + b2), each block's input cut
    l1, l2, l3 = layers(model)
    w1, w2, w3 = l1.weight, l2.weight, l3.weight
    h1 = torch.tanh(x @ w1.detach().T + l1.bias.detach())
    h2 = torch.tanh(h1 @ w2.detach().T + l2.bias.detach())
    for i, (h, w, inp) in enumerate([(h1, w1, x), (h2, w2, h1)]):
        leaf = h.detach().requires_grad_()
        (dh,) = torch.autograd.grad(local_loss(rule, heads(model)[i], leaf, y), leaf)
        expected = (dh * (1 - h * h)).T @ inp  # dℓ_i/dW_i = (δ ⊙ tanh')ᵀ x_i
        torch.testing.assert_close(w.grad, expected, rtol=1e-10, atol=1e-12)
    # the output layer: the true error, on its (cut) input h2
    z = h2 @ w3.detach().T + l3.bias.detach()
    e = (torch.softmax(z, 1) - F.one_hot(y, C)) / N
    torch.testing.assert_close(w3.grad, e.T @ h2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", LOCAL)
def test_blocks_with_batch_norm_learn_as_the_reference_trains_them_layer_by_layer(rule):
    """The recipe's block, Linear -> BatchNorm (batch statistics) -> leaky ReLU: its
    weight, gain and shift get the gradient of its own loss on its own output, computed
    here layer by layer as the reference's train.py does (each block's input detached)."""
    torch.manual_seed(0)
    model = feedalign.build_model("mlp", (1, 4, 4), C, rule=rule, nonlin="leakyrelu", num_layers=2,
                                  num_hidden=8, batchnorm=1, criterion="ce", seed=1).double()  # fmt: skip
    randomise(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(4 * C, 1, 4, 4, dtype=torch.float64), torch.arange(4 * C) % C
    F.cross_entropy(model(x), y).backward()
    h = x.flatten(1)
    for linear, bn, head in zip(layers(model)[:2], norms, heads(model)):
        w, gain, shift = (p.detach().clone().requires_grad_() for p in (linear.weight, bn.weight, bn.bias))
        z = h @ w.T + linear.bias.detach()
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn.eps) * gain + shift
        a = F.leaky_relu(z, 0.01)
        expected = torch.autograd.grad(local_loss(rule, head, a, y), (w, gain, shift))
        for got, want in zip((linear.weight.grad, bn.weight.grad, bn.bias.grad), expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        h = a.detach()


def test_pred_by_hand_and_no_gradient_crosses_blocks():
    """pred's block gradient in closed form: δ = Dᵀ(softmax(D h + d) − Y)/N; and block 1's
    gradient is the same whatever happens above it (output layer, block 2, its head)."""
    model = feedalign.convert(mlp(), "pred")
    randomise(model)
    x = torch.randn(N, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([2, 1, 0, 0, 1, 2])
    F.cross_entropy(model(x), y).backward()
    d = heads(model)[0].decoder
    l1, l2, l3 = layers(model)
    h1 = torch.tanh(x @ l1.weight.detach().T + l1.bias.detach())
    p = torch.softmax(h1 @ d.weight.detach().T + d.bias.detach(), 1)
    delta = (p - F.one_hot(y, C)) @ d.weight.detach() / N
    first = l1.weight.grad.clone()
    torch.testing.assert_close(first, (delta * (1 - h1 * h1)).T @ x, rtol=1e-10, atol=1e-12)
    # the decoder's own gradient: (P − Y)ᵀ h / N
    torch.testing.assert_close(d.weight.grad, (p - F.one_hot(y, C)).T @ h1 / N, rtol=1e-10, atol=1e-12)

    model.zero_grad()
    with torch.no_grad():  # everything above block 1 changes
        for m in (l2, l3, heads(model)[1].decoder):
            m.weight.mul_(-3).add_(0.7)
    F.cross_entropy(model(x), y).backward()
    assert torch.equal(l1.weight.grad, first)


def test_the_bio_decoder_learns_by_feedback_alignment():
    """pred-bio: z = D h + d against t = [Y Pᵀ > 0]; e = (σ(z) − t)/(N·128) (mean BCE);
    dD = eᵀ h (its true gradient), and h receives e·B, not e·D."""
    model = feedalign.convert(mlp(), "pred-bio")
    randomise(model)
    x = torch.randn(N, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    F.cross_entropy(model(x), y).backward()
    head = heads(model)[0]
    d, b, proj = head.decoder, head.decoder.feedback, head.projection
    assert b.shape == d.weight.shape == (128, 4) and proj.shape == (128, C)
    assert not b.requires_grad and not proj.requires_grad
    l1 = layers(model)[0]
    h1 = torch.tanh(x @ l1.weight.detach().T + l1.bias.detach())
    t = (F.one_hot(y, C).double() @ proj.T > 0).double()
    e = (torch.sigmoid(h1 @ d.weight.detach().T + d.bias.detach()) - t) / (N * 128)
    torch.testing.assert_close(d.weight.grad, e.T @ h1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d.bias.grad, e.sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l1.weight.grad, ((e @ b) * (1 - h1 * h1)).T @ x, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(e @ b, e @ d.weight.detach())  # B is not D: no weight transport


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, C),
    ).double()  # fmt: skip


@pytest.mark.parametrize("rule", LOCAL)
def test_each_conv_block_learns_from_its_own_loss_only(rule):
    model = feedalign.convert(conv_net(), rule, input_shape=(2, 5, 5))
    randomise(model)
    x = torch.randn(N, 2, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    F.cross_entropy(model(x), y).backward()
    c1, c2, out_layer = layers(model)
    h1 = F.relu(F.conv2d(x, c1.weight.detach(), c1.bias.detach(), padding=1))  # (N, 5, 5, 5): sim by std
    h2 = F.adaptive_avg_pool2d(F.relu(F.conv2d(h1, c2.weight.detach(), c2.bias.detach(), padding=1)), 2)
    h2 = h2.flatten(1)  # the second tap cuts the output layer's input: (N, 16)
    assert [hd.features for hd in heads(model)] == [(5, 5, 5), (16,)]
    for i, (conv, inp) in enumerate([(c1, x), (c2, h1)]):
        w = conv.weight.detach().requires_grad_()
        bias = conv.bias.detach()
        out = F.relu(F.conv2d(inp, w, bias, padding=1))
        feats = out if i == 0 else F.adaptive_avg_pool2d(out, 2).flatten(1)
        (expected,) = torch.autograd.grad(local_loss(rule, heads(model)[i], feats, y), w)
        torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-10, atol=1e-12)
    z = h2 @ out_layer.weight.detach().T + out_layer.bias.detach()
    e = (torch.softmax(z, 1) - F.one_hot(y, C)) / N
    torch.testing.assert_close(out_layer.weight.grad, e.T @ h2, rtol=1e-10, atol=1e-12)


def test_masked_positions_send_no_local_loss():
    """A sequence model's ignore_index positions carry no label: the heads see only the
    others (the same gradient as a batch without them); all masked: no gradient at all."""
    model = feedalign.convert(mlp(), "predsim")
    randomise(model)
    x = torch.randn(N, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 2, -100, 1])
    F.cross_entropy(model(x), y, ignore_index=-100).backward()
    first = layers(model)[0]
    masked = first.weight.grad.clone()
    model.zero_grad()
    keep = y >= 0
    F.cross_entropy(model(x[keep]), y[keep]).backward()
    torch.testing.assert_close(masked, first.weight.grad, rtol=1e-10, atol=1e-13)
    model.zero_grad()
    F.cross_entropy(model(x), torch.full((N,), -100), ignore_index=-100).sum().backward()
    assert not first.weight.grad.any()


def test_decoder_pooling_follows_the_reference():
    """Kernels doubled, height first, until C·H'·W' <= 4096 (the reference's
    --dim-in-decoder), padded for the ceiling."""
    pool = decoder_pool((128, 32, 32))
    assert pool.kernel_size == (8, 4)
    assert tuple(pool(torch.zeros(1, 128, 32, 32)).shape) == (1, 128, 4, 8)
    assert decoder_pool((16, 16, 16)) is None  # 4096 already
    pool = decoder_pool((64, 28, 28))
    out = pool(torch.zeros(1, 64, 28, 28))
    assert math.prod(out.shape[1:]) <= 4096


def test_one_loop_for_every_rule_and_describe_names_each_head():
    """The user's loop is one loss, one backward, one optimizer over model.parameters():
    the heads' parameters are among them and move."""
    for rule in LOCAL:
        model = feedalign.build_model("mlp", (1, 4, 4), C, rule=rule, num_hidden=8, nonlin="relu", seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        before = [p.detach().clone() for p in heads(model).parameters()]
        x, y = torch.randn(N, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        after = list(heads(model).parameters())
        assert all(not torch.equal(a, b) for a, b in zip(after, before)), rule
        assert bool(before) != (rule == "sim-bio")  # sim-bio's head learns nothing: no transform
        text = feedalign.describe(model)
        assert f"learning by {rule}" in text and "local head 0:" in text and "local head 1:" in text
        assert ("decoder" in text) == (LOCAL_RULES[rule].loss != "sim")


def test_local_rules_need_a_shape_to_build_their_heads():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ValueError, match=r"predsim: .*pass input_shape=\(per-sample shape\) or example="):
        feedalign.convert(Net(), "predsim")
    model = feedalign.convert(Net(), "predsim", example=torch.zeros(3, 4))
    assert len(heads(model)) == 1


def test_the_trainer_runs_the_recipe_and_resumes_bit_exactly(tmp_path):
    """feedalign train -gradient predsim with the local-loss recipe's options (batch norm,
    leaky ReLU, dropout after each block, jitter and flips, Adam with a step decay):
    it learns, and a run interrupted mid-epoch resumes to the same weights, heads included."""
    import json

    from feedalign.train.config import Options
    from feedalign.train.session import Interrupted, train

    def opts(where, **kw):
        return Options(dataset="digits", datapath=str(tmp_path / "D"), preProcDir=str(tmp_path / "P"),
                       network="mlp", num_layers=2, num_hidden=32, batchnorm=1, dropout_rate=0.1,
                       nonlin="leakyrelu", gradient="predsim", optimization="adam", LR=5e-3, batchSize=32,
                       criterion="ce", normalization="simple", jitter=1, hflip=True, epoch=3,
                       lr_milestones="2", lr_gamma=0.25, seed=4, quiet=True, threads=1, type="float",
                       save=str(where), **kw)  # fmt: skip

    ref = train(opts(tmp_path / "a"))
    rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_error"] < 0.5 and rows[-1]["lr"] == pytest.approx(5e-3 * 0.25)
    with pytest.raises(Interrupted):
        train(opts(tmp_path / "b"), stop_at=(2, 5))
    resumed = train(Options.from_dict(json.loads((tmp_path / "b" / "options.json").read_text())),
                    resume=tmp_path / "b")  # fmt: skip
    from feedalign.train import checkpoint as ckpt

    a, b = ckpt.load(ref / "checkpoint.pt")["model"], ckpt.load(resumed / "checkpoint.pt")["model"]
    assert any(".heads." in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _zoo():
    """The suite's stand-ins for torchvision, timm and transformers models (tests/zoo*.py)."""
    from zoo import GPT, ResNet, ViT
    from zoo_layouts import Bertish, Decoder, SqueezeNet, densenet, efficientnet, mobilenet

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (4, 5), generator=gen)
    image = torch.randn(4, 3, 8, 8, generator=gen)
    return {"resnet": (ResNet, image), "vit": (ViT, image), "gpt-tied": (GPT, ids), "llama": (Decoder, ids),
            "bert": (Bertish, ids), "densenet": (densenet, image), "squeezenet": (SqueezeNet, image),
            "efficientnet": (efficientnet, image), "mobilenet": (mobilenet, image)}  # fmt: skip


def _grads(model, x):
    y = model(x)
    labels = torch.arange(y[..., 0].numel()).reshape(y.shape[:-1]) % y.shape[-1]
    if labels.dim() > 1:
        labels[:, -1] = -100  # a masked position per sequence
    F.cross_entropy(y.reshape(-1, y.shape[-1]), labels.reshape(-1), ignore_index=-100).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if ".heads." not in n}


@pytest.mark.parametrize("rule", ["predsim", "predsim-bio"])
@pytest.mark.parametrize("name", list(_zoo()))
def test_every_block_of_the_zoos_layouts_learns_from_its_own_head(name, rule):
    """Every parameter gets a gradient; perturbing head i moves the gradients of some
    parameters (block i's) and of no parameter that another head moves: each block's
    signal is its own head's loss, and none crosses into another block."""
    import copy

    build, x = _zoo()[name]
    torch.manual_seed(0)
    model = feedalign.convert(build(), rule, example=x, seed=1)
    randomise(model)
    base = _grads(copy.deepcopy(model), x)
    assert all(torch.isfinite(g).all() and g.any() for g in base.values()), name
    moved = []
    for i in range(len(heads(model))):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in heads(other)[i].parameters():
                p.mul_(-2).add_(0.3)
            for b in heads(other)[i].buffers():
                b.mul_(-2).add_(0.3)
        g = _grads(other, x)
        moved.append({n for n in base if not torch.allclose(g[n], base[n], rtol=1e-4, atol=1e-7)})
    assert len(moved) >= 2 and all(moved), moved
    assert all(a.isdisjoint(b) for k, a in enumerate(moved) for b in moved[k + 1 :]), moved
