"""Alignment diagnostics: angles against oracles (fa with B = W is back-prop; bp is
back-prop), random vectors are ~90° apart, and the call leaves no trace on the model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import feedalign
from feedalign import BCE, convert
from feedalign.metrics.alignment import alignment, angle


def small_mlp(dropout: bool = True, batchnorm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(12, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers += [nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)]
    return nn.Sequential(*layers)


def batch(n: int = 32, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 12, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def test_angle_basics():
    a = torch.tensor([1.0, 0.0])
    assert angle(a, a) == pytest.approx(0.0, abs=1e-6)
    assert angle(torch.randn(1000), torch.ones(1000)) > 0  # not the identity by accident
    assert angle(a, torch.tensor([0.0, 2.0])) == pytest.approx(90.0)
    assert angle(a, -a) == pytest.approx(180.0)
    assert math.isnan(angle(a, torch.zeros(2)))
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g)
    assert 87.0 < angle(u, v) < 93.0
    with pytest.raises(ValueError, match="sizes differ"):
        angle(u, a)


@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_backprop_equivalents_give_zero(rule):
    torch.manual_seed(0)
    model = convert(small_mlp().double(), rule, feedback_init="weights")  # fa: B is a copy of W
    x, y = batch()
    angles = alignment(model, x, y, BCE())
    assert list(angles) == ["1", "5", "7"]  # the Linear layers by their module names
    for name, metrics in angles.items():
        expected = {"update", "error"} | ({"feedback"} if rule == "fa" else set())
        assert set(metrics) == expected, name
        for metric, value in metrics.items():
            assert value == pytest.approx(0.0, abs=1e-3), (name, metric, value)


def test_fa_feedback_angle_and_exported_name():
    torch.manual_seed(0)
    model = convert(small_mlp(dropout=False, batchnorm=False), "fa", rfb_mag=0.5, seed=1)
    x, y = batch(dtype=torch.float32)
    angles = feedalign.alignment(model, x, y, BCE())
    assert list(angles) == ["1", "3", "5"]
    assert angles["5"]["error"] == pytest.approx(0.0, abs=1e-3)  # output layer: the true error
    last = dict(model.named_modules())["5"]
    assert angles["5"]["feedback"] == pytest.approx(angle(last.feedback, last.weight))
    assert all(60 < angles[n]["feedback"] < 120 for n in angles)  # unrelated random B
    assert angles["1"]["error"] > 1.0  # the error below an fa layer is not back-prop's


def test_dfa_angles_are_finite_and_model_untouched():
    torch.manual_seed(0)
    model = convert(small_mlp(), "dfa", seed=2)
    layers = dict(model.named_modules())
    x, y = batch(dtype=torch.float32)
    crit = BCE()
    # one real backward so that .grad and the BN statistics hold something to preserve
    crit(model(x), y).backward()
    layers["5"].bias.grad = None  # a parameter without a gradient must stay without one
    before = {n: p.grad for n, p in model.named_parameters()}
    values = {n: None if g is None else g.clone() for n, g in before.items()}
    bn_state = {k: v.clone() for k, v in layers["2"].state_dict().items()}
    torch.manual_seed(1234)
    rng = torch.get_rng_state()

    angles = alignment(model, x, y, crit)

    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    for n, p in model.named_parameters():
        assert p.grad is before[n], n
        assert values[n] is None or torch.equal(p.grad, values[n]), n
    for k, v in layers["2"].state_dict().items():
        assert torch.equal(v, bn_state[k]), k
    assert set(angles) == {"1", "5", "7"}  # state_dict names survive the taps' insertion
    for name, metrics in angles.items():
        assert set(metrics) == {"update", "error"}
        for value in metrics.values():
            assert math.isfinite(value) and 0.0 <= value <= 180.0, (name, metrics)
    assert angles["7"]["error"] == pytest.approx(0.0, abs=1e-3)  # dfa trains the output with e
    assert angles["1"]["update"] > 1.0


def test_same_dropout_masks_in_both_passes():
    """With bp and dropout, the two passes agree only if they drew the same masks."""
    torch.manual_seed(0)
    model = convert(small_mlp(batchnorm=False).double(), "bp")
    x, y = batch()
    for _ in range(3):
        angles = alignment(model, x, y, BCE())
        assert all(v == pytest.approx(0.0, abs=1e-3) for m in angles.values() for v in m.values())


def test_eval_mode_is_kept():
    model = convert(small_mlp(), "fa").eval()
    x, y = batch(dtype=torch.float32)
    alignment(model, x, y, BCE())
    assert not any(m.training for m in model.modules())


def test_every_weight_of_attention_and_recurrent_layers_is_reported():
    """fa on an encoder layer + LSTM: attention's packed in_proj_weight, out_proj and the
    LSTM's input and recurrent weights each get an update angle, and a feedback angle that
    is the angle between their B and W (here B = W, so both are 0°: fa with B = W is bp)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.lstm = nn.LSTM(8, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):  # (N, T, 8)
            return self.head(self.lstm(self.enc(x))[0].mean(1))

    torch.manual_seed(0)
    model = convert(Net().double(), "fa", feedback_init="weights")
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.arange(4) % 3
    angles = alignment(model, x, y, nn.CrossEntropyLoss())
    for key in ("enc.self_attn.in_proj_weight", "enc.self_attn.out_proj", "enc.linear1",
                "lstm.weight_ih_l0", "lstm.weight_hh_l0", "head"):  # fmt: skip
        assert angles[key]["update"] == pytest.approx(0.0, abs=1e-4), key  # fa with B = W is bp
        assert angles[key]["feedback"] == pytest.approx(0.0, abs=1e-5), key
    assert "error" in angles["head"] and "error" not in angles["lstm.weight_hh_l0"]  # LSTM returns a tuple
