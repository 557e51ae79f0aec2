"""The language models of the network registry (gpt, lstm) under every rule: shapes,
causality, tying, nanoGPT's initialisation, the direct rules' taps (macro and micro) and
their per-position error against the formula, and the zoo's probes for silent back-prop."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import feedalign
from feedalign.models import build_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))
import zoo_probe  # noqa: E402  (bench/zoo_probe.py: the zoo's probes)

_spec = importlib.util.spec_from_file_location("zoo_catalogue", BENCH / "zoo.py")
catalogue = importlib.util.module_from_spec(_spec)
sys.modules["zoo_catalogue"] = catalogue  # dataclasses look their module up by name
_spec.loader.exec_module(catalogue)

VOCAB, T = 11, 6


def small(network: str, rule: str = "bp", **kw) -> torch.nn.Module:
    opts = dict(num_layers=2, num_hidden=8, heads=2, criterion="ce", seed=3) | kw
    return build_model(network, (T,), VOCAB, rule=rule, **opts)


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_gpt_is_causal_tied_and_initialised_as_nanogpt():
    torch.manual_seed(0)
    model = build_model("gpt", (64,), 65, rule="bp", num_layers=4, num_hidden=128, bias=False, seed=1)
    assert model.lm_head.weight is model.wte.weight
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]  # bias=False: none at all
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 65 * 128 + 64 * 128 + 4 * (12 * 128 * 128 + 2 * 128) + 128  # tied head counted once
    assert abs(model.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert abs(model.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.0005
    ids = torch.randint(0, 65, (2, 10))
    out = model(ids)
    assert out.shape == (2, 10, 65)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 65
    after = model(changed)
    assert torch.equal(out[:, :7], after[:, :7]) and not torch.equal(out[:, 7:], after[:, 7:])
    with pytest.raises(ValueError, match="longer than the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_same_seed_same_model():
    a, b = small("gpt", seed=5), small("gpt", seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("network", ["gpt", "lstm"])
@pytest.mark.parametrize("rule", list(feedalign.RULES))
def test_every_rule_trains_every_parameter(network, rule):
    model = small(network, rule)
    if rule == "pred":  # its decoders start at zero, which sends the blocks nothing at the first step
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".heads." in n:
                    p.normal_()
    ids = torch.randint(0, VOCAB, (3, T))
    lm_loss(model(ids), torch.roll(ids, -1, 1)).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable, sorted(trainable - got)
    if rule == "shallow":  # only the output layer (tied to the embedding for gpt)
        assert got == ({"wte.weight"} if network == "gpt" else {"head.weight", "head.bias"})  # named once


@pytest.mark.parametrize(
    ("network", "taps", "n"), [("gpt", "macro", 3), ("gpt", "micro", 5), ("lstm", "macro", 3)]
)
def test_direct_taps_per_layer(network, taps, n):
    model = small(network)
    feedalign.convert(model, "dfa", taps=taps, seed=0)
    model(torch.randint(0, VOCAB, (2, T)))
    assert len(model.dfa_taps) == n  # one per layer (and per attention, micro), one at the head
    if taps == "micro":
        assert [t.site for t in model.dfa_taps if getattr(t, "cuts", "") == "output"] == [
            "h.0.attn",
            "h.1.attn",
        ]


@pytest.mark.parametrize("taps", ["macro", "micro"])
def test_dfa_error_is_taken_per_position_and_masked_positions_send_none(taps, float64):
    model = small("gpt", criterion="bce")  # logits out: e = dL/dlogits at the model output
    feedalign.convert(model, "dfa", taps=taps, seed=0)
    ids = torch.randint(0, VOCAB, (3, T))
    y = torch.roll(ids, -1, 1)
    y[1, 2] = y[2, 5] = -100  # ignore_index: no error there
    seen = {}

    def watch(module, args, out):  # the gradient reaching ln_f's output: the head's tap delivers it
        out.register_hook(lambda g: seen.update(h=g))

    model.ln_f.register_forward_hook(watch)
    out = model(ids)
    out.register_hook(lambda g: seen.update(e=g))
    F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)).backward()
    e = seen["e"]  # (B, T, V)
    assert not e[1, 2].any() and not e[2, 5].any()
    b_last = feedalign.feedback(model)[-1]  # (V, d): the tap at the head's input
    expected = (e.reshape(-1, VOCAB) @ b_last).reshape(3, T, -1)
    torch.testing.assert_close(seen["h"], expected, rtol=1e-12, atol=1e-12)
    assert not seen["h"][1, 2].any() and not seen["h"][2, 5].any()


def _case(network: str):
    def build():
        model = build_model(network, (T,), VOCAB, rule="bp", num_layers=2, num_hidden=8, heads=2, seed=3)
        ids = torch.randint(0, VOCAB, (2, T))
        return catalogue.Case(
            model, ids, torch.roll(ids, -1, 1), lambda out, y: lm_loss(F.log_softmax(out, -1), y)
        )

    return catalogue.Entry(f"feedalign/{network}", "torch", network, build)


@pytest.mark.parametrize("network", ["gpt", "lstm"])
@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "brsf", "kp", "dfa", "drtp"])
def test_every_b_is_read_no_silent_backprop(network, rule):
    """bench/zoo.py's cell: each weight that needs an error gets it through its B (perturbing B
    changes the gradients below), and the direct rules' B reaches every hidden parameter."""
    cell = catalogue.run_cell(_case(network), rule)
    assert cell.outcome == "ok", cell.text


def test_micro_taps_b_reaches_every_hidden_parameter():
    model = small("gpt")
    feedalign.convert(model, "dfa", taps="micro", seed=0)
    ids = torch.randint(0, VOCAB, (2, T))

    def forward():
        torch.manual_seed(0)
        return lm_loss(model(ids), torch.roll(ids, -1, 1))

    loss = forward()
    loss.backward(retain_graph=True)
    assert zoo_probe.direct_probe(model, loss, forward, [n for n, _ in model.named_parameters()]) == []
