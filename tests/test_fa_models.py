"""fa on models a user brings (written here: transformer, Embedding+LSTM, Conv1d,
ResNet- and ViT-shaped), random feedback by default, and weights fa cannot train
refused by name."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ResNet, ViT, adam_losses

import feedalign
from feedalign.rules.feedback import feedback_name


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=11, d=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        pad = tokens == 0
        h = self.encoder(self.embed(tokens), src_key_padding_mask=pad)
        return self.head(h.masked_fill(pad[..., None], 0).sum(1) / (~pad).sum(1, keepdim=True))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=11, d=6, hidden=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True, dropout=0.1, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out.mean(1))


def conv1d_net(classes=3):
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv1d(2, 6, 4, padding="same", padding_mode="reflect"), act1=nn.ReLU(),
        conv2=nn.Conv1d(6, 8, 3, stride=2, groups=2), bn=nn.BatchNorm1d(8), act2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool1d(1), flat=nn.Flatten(), head=nn.Linear(8, classes),
    ))  # fmt: skip


def _tokens(n=8, t=6):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(1, 11, (n, t), generator=g)
    tok[:2, -2:] = 0  # padding
    return tok


MODELS = {
    "transformer": (TransformerClassifier, lambda: _tokens()),
    "lstm": (LSTMClassifier, lambda: _tokens()),
    "conv1d": (conv1d_net, lambda: torch.randn(8, 2, 12)),
    "resnet": (ResNet, lambda: torch.randn(8, 3, 8, 8)),
    "vit": (lambda: ViT(layer_scale=True), lambda: torch.randn(8, 3, 8, 8)),
}


def _make(kind, seed=0):
    build, data = MODELS[kind]
    torch.manual_seed(seed)
    return build(), data(), torch.arange(8) % 3


@pytest.mark.parametrize("kind", MODELS)
def test_every_parameter_learns_by_fa_and_the_loss_falls(kind):
    plain, x, y = _make(kind)
    model = feedalign.convert(copy.deepcopy(plain), "fa", seed=0)
    torch.manual_seed(5)  # the same dropout masks in both passes
    F.cross_entropy(model(x), y).backward()
    torch.manual_seed(5)
    F.cross_entropy(plain(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith(("head.", "fc.")):  # the output layer receives the true error
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        else:
            assert not torch.allclose(p.grad, q.grad), f"{name} got back-prop's gradient"
    losses = adam_losses(model, x, y, 30)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("kind", MODELS)
def test_backprop_context_bf16_and_feedback_list(kind):
    plain, x, y = _make(kind)
    model = feedalign.convert(copy.deepcopy(plain), "fa", seed=0).eval()
    plain.eval()  # no dropout: both passes identical
    with feedalign.backprop(model):
        F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    slots = [(o, n) for m in model.modules() if hasattr(m, "fa_slots") for o, n, _ in m.fa_slots()]
    fb = feedalign.feedback(model)
    assert len(fb) == len(slots) and all(B.shape == getattr(o, n).shape for B, (o, n) in zip(fb, slots))
    model.float().train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.float() if x.is_floating_point() else x)
    F.cross_entropy(out.float(), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_transformer_eval_fast_path_matches_the_fa_forward():
    model, x, _ = _make("transformer")
    feedalign.convert(model, "fa", seed=0).eval()
    with torch.no_grad():  # torch's fused encoder path (no grad, eval)
        fast = model(x)
    with torch.enable_grad():  # the fa forward, written in Python
        slow = model(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True, norm_first=True)
    dec = feedalign.convert(nn.TransformerDecoder(layer, 2), "fa", seed=0)
    tgt, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(3)
    dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True).square().sum().backward()
    assert all(p.grad is not None for p in dec.parameters())
    dec.eval()
    with torch.no_grad():
        fast = dec(tgt, memory, tgt_mask=mask)
    torch.testing.assert_close(fast, dec(tgt, memory, tgt_mask=mask), atol=1e-5, rtol=1e-4)


# --- random feedback by default ---------------------------------------------------------

DEFAULT_INIT = {  # layers large enough that max |W| comes close to the bound of its distribution
    "linear": lambda: nn.Linear(300, 20),
    "conv2d": lambda: nn.Conv2d(8, 16, 3),
    "convT2d": lambda: nn.ConvTranspose2d(16, 4, 3, groups=2),
    "conv1d": lambda: nn.Conv1d(6, 40, 5),
    "lstm": lambda: nn.LSTM(10, 30),
    "gru": lambda: nn.GRU(12, 20, bidirectional=True),
    "lstm-cell": lambda: nn.LSTMCell(10, 30),
    "bilinear": lambda: nn.Bilinear(30, 4, 20),
    "attention": lambda: nn.MultiheadAttention(32, 4),
    "attention-kvdim": lambda: nn.MultiheadAttention(32, 4, kdim=20, vdim=12),
}


def _spread(t: torch.Tensor) -> tuple[float, float]:
    return t.abs().max().item(), t.std().item()


@pytest.mark.parametrize("kind", DEFAULT_INIT)
def test_default_feedback_is_a_fresh_draw_of_the_layers_default_init(kind):
    """B is distributed as torch's own initialisation of that weight (compared with a
    freshly initialised layer), and is not the weight, even when torch's global seed
    and convert's seed are the same."""
    torch.manual_seed(0)
    layer = DEFAULT_INIT[kind]()
    fresh = DEFAULT_INIT[kind]()  # another sample of torch's default init
    box = feedalign.convert(nn.Sequential(layer), "fa", seed=0)
    fa = box[0]
    for owner, name, _ in fa.fa_slots():
        W, B = getattr(owner, name), getattr(owner, feedback_name(name))
        ref = dict(fresh.named_parameters())[name if owner is fa else "out_proj." + name]
        assert B.shape == W.shape and not torch.equal(B, W), name
        (b_max, b_std), (r_max, r_std) = _spread(B), _spread(ref)
        assert b_max <= r_max * 1.05 + 1e-6 and b_max > 0.9 * r_max, (name, b_max, r_max)
        assert abs(b_std / r_std - 1) < 0.15, (name, b_std, r_std)


def test_feedback_seeds_rfb_mag_and_weights_option():
    def draw(**kw):
        torch.manual_seed(0)
        return feedalign.feedback(feedalign.convert(nn.Sequential(nn.Linear(50, 40)), "fa", **kw))[0]

    assert torch.equal(draw(seed=3), draw(seed=3))
    assert not torch.equal(draw(seed=3), draw(seed=4))
    state = torch.get_rng_state()
    a, b = draw(), draw()
    assert not torch.equal(a, b)  # seed None: a fresh seed each time ...
    torch.manual_seed(0)
    nn.Linear(50, 40)
    assert torch.equal(torch.get_rng_state(), state)  # ... not taken from torch's global stream
    assert 0.9 * 2.0 < draw(seed=1, rfb_mag=2.0).abs().max() <= 2.0
    torch.manual_seed(0)
    w = nn.Linear(50, 40).weight
    assert torch.equal(draw(feedback_init="weights"), w)
    with pytest.raises(ValueError, match="feedback_init must be one of"):
        draw(feedback_init="copy")


# --- refused by name --------------------------------------------------------------------


class Tagged(nn.Linear):  # a subclass that keeps Linear.forward
    tag = "mine"


def test_layers_fa_cannot_train_are_refused_by_name():
    for model, match in [
        (nn.Sequential(nn.LazyLinear(3)), r"0 \(LazyLinear: a lazy module"),
        (nn.Sequential(nn.ReLU()), "no layer with weights"),
    ]:
        with pytest.raises(ValueError, match=match):
            feedalign.convert(model, "fa")
    lstm = feedalign.convert(nn.Sequential(nn.LSTM(3, 4)), "fa")[0]
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="FALSTM got a PackedSequence"):
        lstm(packed)
    with torch.no_grad():
        lstm(packed)  # inference: torch's own kernels take it
    tagged = feedalign.convert(nn.Sequential(Tagged(3, 2)), "fa", seed=0)[0]
    assert isinstance(tagged, Tagged) and tagged.tag == "mine" and hasattr(tagged, "feedback")
    x = torch.randn(4, 3, requires_grad=True)
    tagged(x).backward(torch.ones(4, 2))
    torch.testing.assert_close(x.grad, torch.ones(4, 2) @ tagged.feedback)


# --- state_dict, deepcopy, torch.compile ----------------------------------------------------


def test_state_dict_round_trip_and_deepcopy():
    plain, x, y = _make("vit")
    a = feedalign.convert(copy.deepcopy(plain), "fa", seed=1)
    b = feedalign.convert(copy.deepcopy(plain), "fa", seed=2)
    assert set(plain.state_dict()) < set(a.state_dict())  # parameter names unchanged, B's added
    assert {k for k in a.state_dict() if "feedback" in k} >= {"blocks.0.attn.in_proj_weight_feedback",
                                                              "blocks.0.attn.out_proj.feedback"}  # fmt: skip
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(feedalign.feedback(a), feedalign.feedback(b)))
    c = copy.deepcopy(a)
    assert all(torch.equal(u, v) and u is not v for u, v in zip(feedalign.feedback(a), feedalign.feedback(c)))
    for m in (a, c):
        F.cross_entropy(m(x), y).backward()
    for (n, p), q in zip(a.named_parameters(), c.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.slow
def test_torch_compile_smoke():
    model, x, y = _make("conv1d")
    feedalign.convert(model, "fa", seed=0)
    eager = copy.deepcopy(model)
    F.cross_entropy(eager(x), y).backward()
    compiled = torch.compile(model)
    F.cross_entropy(compiled(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n, atol=1e-5, rtol=1e-4)


class ScaledLinear(nn.Linear):
    """A user's Linear subclass that keeps nn.Linear's forward: fa makes its twin at run time."""


@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_whole_model_torch_save_round_trip_keeps_the_rule(rule):
    """torch.save(model) of a converted model whose twins were made at run time (a
    Linear subclass, attention's out_proj) loads back (a trusted file: weights_only=False)
    with the same outputs and the same fa input gradients, δ B, not δ W."""
    import io

    torch.manual_seed(0)
    model = feedalign.convert(nn.Sequential(TransformerClassifier(), ScaledLinear(3, 2)), rule, seed=1)
    model.eval()
    tokens = torch.randint(1, 11, (4, 5))
    buf = io.BytesIO()
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert type(loaded[1]).__name__ == "FAScaledLinear" and isinstance(loaded[1], ScaledLinear)
    assert feedalign.rule_of(loaded) == rule
    torch.testing.assert_close(loaded(tokens), model(tokens))
    x = torch.randn(4, 3, requires_grad=True)
    loaded[1](x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 2) @ loaded[1].feedback.detach())
    assert not torch.allclose(loaded[1].feedback, loaded[1].weight)
    assert copy.deepcopy(model)[1].feedback is not model[1].feedback
