"""The direct rules (dfa, drtp, shallow) on any nn.Module, against formulas in float64.

Notation: e = dL/dy at the output layer; B = [B_1 … B_L] drawn at the first pass.
A block's parameters get exactly the gradient of ⟨signal·B_k, block(h)⟩ where the
tap after it sits, its input h cut from everything below. The formulas use the
loss ⟨y, G⟩ (so e = G) or feedalign.BCE (e = σ(y) − y*, summed over the batch).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ResNet, ViT, adam_losses

import feedalign
from feedalign.describe import LOCAL, classify
from feedalign.rules.dfa import Tap

pytestmark = pytest.mark.usefixtures("float64")  # every tensor here is float64 (conftest.py)


# --- models written here (shaped like torchvision's ResNet, timm's ViT, torch's encoder) ---


class Encoder(nn.Module):
    """Token ids -> Embedding -> nn.TransformerEncoder (seq-first unless batch_first) -> logits."""

    def __init__(self, batch_first: bool, per_token: bool, d: int = 8, classes: int = 3):
        super().__init__()
        self.batch_first, self.per_token = batch_first, per_token
        self.embed = nn.Embedding(11, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):  # ids: (N, T)
        x = self.embed(ids if self.batch_first else ids.t())
        x = self.encoder(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(x if self.per_token else x.mean(1))


class LSTMNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.fc = nn.Linear(8, classes)

    def forward(self, ids):
        return self.fc(self.lstm(self.embed(ids))[0][:, -1])


def conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding="same"), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3, 3))  # fmt: skip


def _ids(n=6, t=5):
    return torch.randint(0, 11, (n, t), generator=torch.Generator().manual_seed(1))


ZOO = {
    "resnet": (ResNet, lambda: torch.randn(6, 3, 8, 8)),
    "vit": (ViT, lambda: torch.randn(6, 3, 8, 8)),
    "encoder": (lambda: Encoder(batch_first=False, per_token=False), _ids),
    "lstm": (LSTMNet, _ids),
    "conv1d": (conv1d_net, lambda: torch.randn(6, 2, 8)),
}
SITES = {
    "resnet": ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"],
    "vit": ["blocks.0", "blocks.1", "head"],
    "encoder": ["encoder.layers.0", "encoder.layers.1", "head"],
    "lstm": ["lstm", "fc"],
}


def _sites(model):
    return [m.site for m in model.modules() if isinstance(m, Tap) and m.rule]


def _twins(build, rule, **kw):
    torch.manual_seed(0)
    plain = build()
    converted = copy.deepcopy(plain)
    return plain, feedalign.convert(converted, rule, seed=3, **kw)


@pytest.mark.parametrize("name", SITES)
def test_blocks_are_found_automatically_and_listed(name):
    build, _ = ZOO[name]
    model = feedalign.convert(build(), "dfa", seed=0)
    assert _sites(model) == SITES[name]
    text = feedalign.describe(model)
    for block in SITES[name][:-1]:
        assert block in text
    assert f"output layer {SITES[name][-1]}: learns from the true error e" in text
    assert "dfa_taps" in repr(model)  # the taps, kept together on the root


def test_describe_says_which_tap_trains_which_block_in_plain_words():
    model = feedalign.build_model("mlp", (1, 8, 8), 10, rule="dfa", seed=0, num_hidden=16)
    model(torch.rand(2, 1, 8, 8))  # sizes the taps
    text = feedalign.describe(model)
    assert text.startswith("Sequential learning by dfa: each hidden block gets e·B_i")
    assert "tap 0 at the input of 3 (16 values per sample): e·B_0 trains block 1 (Linear)" in text
    assert "tap 1 at the input of 5 (16 values per sample): e·B_1 trains block 3 (Linear)" in text
    assert "e·B_1 at tap 1, back-propagated within the block: 3" in text
    assert "the true error e (the output layer): 5.weight, 5.bias" in text
    drtp = feedalign.describe(feedalign.build_model("mlp", (1, 8, 8), 10, rule="drtp", seed=0, num_hidden=16))
    assert "tap 0 at the input of 3 (16 values per sample): the projected target −s·y*·B_0 trains" in drtp


def test_describe_lists_locally_learning_parameters():
    model = feedalign.convert(ViT(), "dfa", seed=0)
    g = classify(model)
    assert g["cls_token"] == g["pos_embed"] == g["patch_embed.weight"] == g["norm.weight"] == LOCAL
    assert g["blocks.0.attn.in_proj_weight"] == "dfa block blocks.0"
    assert g["head.weight"].startswith("output layer")


@pytest.mark.parametrize("name", ZOO)
def test_every_parameter_learns_and_only_the_head_by_backprop(name):
    build, data = ZOO[name]
    plain, model = _twins(build, "dfa")
    x = data()
    t = torch.arange(len(x)) % 3
    for m in (plain, model):
        F.cross_entropy(m(x), t).backward()
    head = _sites(model)[-1] if name != "conv1d" else "5"
    for (n, p), q in zip(plain.named_parameters(), model.parameters()):
        assert q.grad is not None and q.grad.abs().sum() > 0, n
        same = torch.allclose(p.grad, q.grad)
        assert same == n.startswith(head + "."), n


@pytest.mark.parametrize("name", ZOO)
def test_a_few_dozen_steps_reduce_the_loss(name):
    build, data = ZOO[name]
    torch.manual_seed(0)
    model = feedalign.convert(build(), "dfa", seed=1)
    x = data()
    t = torch.arange(len(x)) % 3
    if x.is_floating_point():  # a class-dependent shift the model can find
        x = x + t.view(-1, *[1] * (x.dim() - 1))
    else:
        x[:, ::2] = t[:, None]
    losses = adam_losses(model, x, t, 40)
    assert losses[-1] < 0.5 * losses[0], losses


class ResNet1(nn.Module):
    """stem -> ResBlock -> head: the formula test's residual model (tap after the addition)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.block = ResBlock()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.block(torch.tanh(self.inp(x)))))


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return x + self.lin2(torch.tanh(self.lin1(x)))


def test_residual_block_matches_formula():
    torch.manual_seed(0)
    model = feedalign.convert(ResNet1(), "dfa", seed=2)
    x = torch.randn(4, 5)
    G = torch.randn(4, 3)
    (model(x) * G).sum().backward()  # e = G
    B0, B1 = feedalign.feedback(model)  # taps: input of block, input of head
    h0 = torch.tanh(model.inp(x))
    a1 = h0 @ model.block.lin1.weight.T + model.block.lin1.bias
    z = h0 + torch.tanh(a1) @ model.block.lin2.weight.T + model.block.lin2.bias  # after the addition
    h1 = torch.relu(z)
    dz = (G @ B1) * (z > 0)
    da1 = (dz @ model.block.lin2.weight) * (1 - torch.tanh(a1) ** 2)
    d0 = (G @ B0) * (1 - h0**2)
    torch.testing.assert_close(model.head.weight.grad, G.T @ h1)
    torch.testing.assert_close(model.block.lin2.weight.grad, dz.T @ torch.tanh(a1))
    torch.testing.assert_close(model.block.lin1.weight.grad, da1.T @ h0)
    torch.testing.assert_close(model.inp.weight.grad, d0.T @ x)
    assert B0.shape == B1.shape == (3, 6)


def _surrogate(module, h, cotangent):
    """Gradients of ⟨cotangent, module(h)⟩ for module's parameters: the rule's formula
    for a block whose input is cut and whose output receives `cotangent`."""
    params = list(module.parameters())
    out = module(h.detach())
    return torch.autograd.grad((out * cotangent).sum(), params)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_per_token_logits_match_formula(batch_first):
    """(N, T, C) logits: e is projected at every position; layer k gets ⟨e·B_{k+1}, layer_k(h_k)⟩."""
    torch.manual_seed(0)
    model = feedalign.convert(Encoder(batch_first, per_token=True), "dfa", seed=4)
    ids = _ids()
    seen = []
    for layer in model.encoder.layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    y = model(ids)
    assert y.shape == (6, 5, 3)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    B = feedalign.feedback(model)  # taps: input of layer 0, of layer 1, of head: (3, 8) each
    assert [tuple(b.shape) for b in B] == [(3, 8)] * 3
    plain = Encoder(batch_first, per_token=True)
    plain.load_state_dict(model.state_dict(), strict=False)
    layers = plain.encoder.layers
    for k, h in enumerate(seen):  # h: the input of layer k, (N, T, d) or (T, N, d)
        cot = G @ B[k + 1]  # (N, T, d): e·B per position
        cot = cot if batch_first else cot.transpose(0, 1)
        expected = _surrogate(layers[k], h, cot)
        for p, g in zip(model.encoder.layers[k].parameters(), expected):
            torch.testing.assert_close(p.grad, g)
    d_embed = (G @ B[0]).reshape(-1, 8)  # the embedding learns from the first tap
    expected = torch.zeros(11, 8).index_add_(0, ids.reshape(-1), d_embed)
    torch.testing.assert_close(model.embed.weight.grad, expected)


def test_pooled_seq_first_encoder_projects_per_sample():
    torch.manual_seed(0)
    model = feedalign.convert(Encoder(batch_first=False, per_token=False), "dfa", seed=4)
    ids = _ids()
    y = model(ids)
    assert [tuple(b.shape) for b in feedalign.feedback(model)] == [(3, 5 * 8), (3, 5 * 8), (3, 8)]
    G = torch.randn_like(y)
    seen = []
    model.encoder.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.zero_grad()
    (model(ids) * G).sum().backward()
    B1 = feedalign.feedback(model)[1]  # (3, T·d): the tap at layer 1's input, per sample
    cot = (G @ B1).reshape(6, 5, 8).transpose(0, 1)  # back to (T, N, d)
    plain = Encoder(batch_first=False, per_token=False)
    plain.load_state_dict(model.state_dict(), strict=False)
    expected = _surrogate(plain.encoder.layers[0], plain.embed(ids.t()), cot)
    for p, g in zip(model.encoder.layers[0].parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    assert not seen[0].requires_grad  # layer 1's input is cut


def test_embedding_input_needs_no_probe_and_feedback_is_lazy_deterministic_and_loadable():
    def build():
        torch.manual_seed(0)
        return feedalign.convert(LSTMNet(), "dfa", seed=5)

    a, b, fresh = build(), build(), build()
    with pytest.raises(RuntimeError, match="first forward pass"):
        feedalign.feedback(a)
    ids = _ids()
    a(ids), b(ids)
    assert all(torch.equal(p, q) for p, q in zip(feedalign.feedback(a), feedalign.feedback(b)))
    assert "fc.dfa_output.feedback" in a.state_dict()
    fresh.load_state_dict(a.state_dict())  # before its first pass
    twin = copy.deepcopy(fresh)
    for m in (a, fresh, twin):
        F.cross_entropy(m(ids), torch.arange(6) % 3).backward()
    for p, q, r in zip(a.parameters(), fresh.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
        torch.testing.assert_close(p.grad, r.grad)
    other = feedalign.convert(LSTMNet(), "dfa", seed=6)
    other(ids)
    assert not torch.equal(feedalign.feedback(other)[1], feedalign.feedback(a)[1])


def test_token_ids_at_a_tap_get_no_columns():
    class EmbMlp(nn.Module):  # no recognised block: every weight layer but the Embedding is one
        def __init__(self):
            super().__init__()
            self.emb, self.fc1, self.fc2 = nn.Embedding(11, 4), nn.Linear(20, 6), nn.Linear(6, 3)

        def forward(self, ids):
            return self.fc2(torch.tanh(self.fc1(self.emb(ids).flatten(1))))

    auto = feedalign.convert(EmbMlp(), "dfa", seed=0)
    assert _sites(auto) == ["fc1", "fc2"]  # an Embedding's input is ids: no tap there
    model = feedalign.convert(EmbMlp(), "dfa", seed=0, blocks=["emb", "fc1"])  # one named anyway
    assert _sites(model) == ["emb", "fc1", "fc2"]
    for m in (auto, model):
        F.cross_entropy(m(_ids()), torch.arange(6) % 3).backward()
        assert [tuple(b.shape) for b in feedalign.feedback(m)] == [(3, 20), (3, 6)]
        assert all(p.grad is not None for p in m.parameters())


def test_blocks_by_name_or_predicate_and_a_tap_that_drops_the_positions_is_refused():
    by_name = feedalign.convert(ResNet(), "dfa", seed=0, blocks=["layer2.0"], output="fc")
    by_rule = feedalign.convert(ResNet(), "dfa", seed=0, blocks=lambda name, m: name in ("layer1", "layer2"))
    assert _sites(by_name) == ["layer2.0", "fc"] and _sites(by_rule) == ["layer1", "layer2", "fc"]
    by_rule(torch.randn(2, 3, 8, 8))
    assert [b.shape[1] for b in feedalign.feedback(by_rule)] == [4 * 8 * 8, 4 * 8 * 8, 8]
    with pytest.raises(ValueError, match="no module named"):
        feedalign.convert(ResNet(), "dfa", blocks=["layer9"])

    class Pooled(nn.Module):  # per-token logits, but the tap before `mix` sees pooled (N, d)
        def __init__(self):
            super().__init__()
            self.inp, self.mix, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):  # (N, T, 4)
            h = torch.tanh(self.inp(x))
            return self.head(h + self.mix(h.mean(1))[:, None])

    model = feedalign.convert(Pooled(), "dfa", seed=0)
    with pytest.raises(RuntimeError, match="must start with the output's batch"):
        model(torch.randn(2, 5, 4))
