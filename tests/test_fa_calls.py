"""The per-layer rules follow a weight through the calls a forward makes (rules/calls.py).

Each form of use is checked against the formula in float64: the error reaching the
call's data operand is δ through B (viewed as the weight was), never through W, and
the weight's gradient is the true one. Then the probe the promise rests on: for
every weight that has a B, perturbing that B changes the gradient below it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch import nn

import feedalign
from feedalign.metrics.alignment import feedback_angles
from feedalign.rules.calls import rule_weights
from feedalign.rules.feedback import feedback_name


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class Use(nn.Module):
    """One weight (6, 4) used by `how`; y has 6 features per position."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(6, 4) * 0.3)
        self.conv1d = zoo.Conv1D(6, 4)

    def weight(self) -> torch.Tensor:
        return (
            self.conv1d.weight.T
            if self.how == "addmm"
            else (self.lin.weight if self.how.startswith("lin.") else self.w)
        )

    def forward(self, x):  # x (N, T, 4)
        h = {
            "lin.F.linear": lambda: F.linear(x, self.lin.weight, self.lin.bias),
            "lin.F.linear(kw)": lambda: F.linear(x, weight=self.lin.weight, bias=self.lin.bias),
            "F.linear": lambda: F.linear(x, self.w),
            "matmul.T": lambda: x @ self.w.T,
            "rmatmul": lambda: self.w.T.__rmatmul__(x),
            "einsum": lambda: torch.einsum("nti,oi->nto", x, self.w),
            "einsum...": lambda: torch.einsum("...i,oi->...o", x, self.w),
            "left": lambda: (self.w @ x.transpose(1, 2)).transpose(1, 2),
            "chunk": lambda: torch.cat([F.linear(x, w) for w in self.w.chunk(2)], -1),
            "to": lambda: F.linear(x, self.w.to(x.dtype).contiguous()),
            "addmm": lambda: self.conv1d(x),
        }[self.how]()
        return h


HOWS = ["lin.F.linear", "lin.F.linear(kw)", "F.linear", "matmul.T", "rmatmul", "einsum", "einsum...",
        "left", "chunk", "to", "addmm"]  # fmt: skip


@pytest.mark.parametrize("how", HOWS)
def test_a_weight_used_through_a_call_gets_its_B(how):
    model = feedalign.convert(Use(how), "fa", seed=0)
    owner = {"addmm": model.conv1d}.get(how, model.lin if how.startswith("lin.") else model)
    attr = "weight" if how == "addmm" or how.startswith("lin.") else "w"
    B = getattr(owner, feedback_name(attr))
    B_as_used = B.T if how == "addmm" else B  # (out, in) as the call applies it
    x = torch.randn(3, 5, 4, requires_grad=True)
    y = model(x)
    delta = torch.randn_like(y)
    y.backward(delta)
    torch.testing.assert_close(x.grad, delta @ B_as_used)  # δ B, not δ W
    dW = torch.einsum("nto,nti->oi", delta, x.detach())  # the true gradient, (out, in)
    torch.testing.assert_close(getattr(owner, attr).grad, dW.T if how == "addmm" else dW)
    assert not torch.allclose(delta @ model.weight().detach(), delta @ B_as_used)
    prefix = {"addmm": "conv1d."}.get(how, "lin." if how.startswith("lin.") else "")
    assert rule_weights(model)[prefix + attr][2] in ("layer", "calls")


def test_conv_functional_and_kp_gets_the_weights_gradient_through_a_call():
    class Kernel(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(3, 2, 3) * 0.3)

        def forward(self, x):
            return F.conv1d(x, self.kernel, padding="same")

    model = feedalign.convert(Kernel(), "kp", seed=0)
    x = torch.randn(2, 2, 7, requires_grad=True)
    y = model(x)
    delta = torch.randn_like(y)
    y.backward(delta)
    B = model.kernel_feedback
    ref = torch.nn.grad.conv1d_input(x.shape, B.detach(), delta, padding=1)
    torch.testing.assert_close(x.grad, ref)
    torch.testing.assert_close(B.grad, model.kernel.grad)  # kp: B takes W's gradient


def test_in_place_ops_after_any_converted_layer():
    for rule in ("fa", "kp", "usf"):
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5),
                              nn.Dropout(0.1, inplace=True), nn.Linear(5, 3))  # fmt: skip
        feedalign.convert(model, rule, seed=0)
        for x in (torch.randn(2, 7, 4), torch.randn(4), torch.randn(3, 4)):
            h = model(x)
            h += 1
            h.sum().backward()


class Tied(nn.Module):
    """An embedding whose table is also the output layer: nanoGPT's / Hugging Face's tie
    (an nn.Linear sharing the Parameter) or a functional one."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.wte = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        if not functional:
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.wte.weight

    def forward(self, ids):
        h = torch.tanh(self.mid(self.wte(ids)))
        return F.linear(h, self.wte.weight) if self.functional else self.head(h)


def test_a_tied_embedding_gets_the_output_layers_rule_and_the_embeddings_error():
    model = feedalign.convert(Tied(False), "fa", seed=0)
    ids = torch.randint(0, 11, (2, 5))
    model(ids).sum().backward()
    assert rule_weights(model)["head.weight"][2] == "layer" and not hasattr(model.wte, "feedback")
    groups = feedalign.describe(model)
    assert "tied" in groups and "head.weight" in groups
    with pytest.raises(ValueError, match=r"wte\.weight: linear\(\) \(it has no B\)"):
        feedalign.convert(Tied(True), "fa", seed=0)(ids)


class Offender(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm_w = nn.Parameter(torch.randn(3, 4))
        self.t = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        h = self.lin(x)
        bias = self.t[:2, :2].expand(h.shape[0], 1, 2, 2)  # an additive attention bias (BEiT's): fine
        q = h[:, None, None, :2].expand(-1, 1, 2, 2)
        h = h + F.scaled_dot_product_attention(q, q, q, attn_mask=bias).sum((1, 2)).repeat(1, 2)
        a = F.linear(h, self.norm_w / self.norm_w.norm(dim=1, keepdim=True))
        b = torch.tensordot(h, self.t, dims=1)
        return a + b


def test_every_weight_a_rule_cannot_follow_is_named_with_its_call():
    model = feedalign.convert(Offender(), "fa", seed=0)
    with torch.no_grad():
        model(torch.randn(2, 4))  # inference: nothing to follow
    with pytest.raises(ValueError) as err:
        model(torch.randn(2, 4))
    msg = str(err.value)
    assert "norm_w: computed by " in msg and "then linear()" in msg and "t: tensordot()" in msg
    with feedalign.backprop(model):
        model(torch.randn(2, 4)).sum().backward()  # the true gradient is asked for: no rule, no refusal


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_layer_with_its_own_forward_is_followed():
    model = feedalign.convert(nn.Sequential(nn.Linear(4, 4), OwnForward(4, 2)), "fa", seed=0)
    x = torch.randn(3, 4, requires_grad=True)
    h = model[0](x).detach().requires_grad_()
    model[1](h).backward(torch.ones(3, 2))
    torch.testing.assert_close(h.grad, 2 * torch.ones(3, 2) @ model[1].feedback)


MODELS = {"use": lambda: Use("chunk"), "tied": lambda: Tied(False), "conv1d": lambda: Use("addmm"),
          "qkv": lambda: Use("lin.F.linear(kw)"),  # a layer's weight in its parent's forward (Swin, BEiT)
          "gpt": lambda: zoo.GPT(), "vit": lambda: zoo.ViT(layer_scale=True)}  # fmt: skip


@pytest.mark.parametrize("rule", ["fa", "kp", "frsf"])
@pytest.mark.parametrize("name", list(MODELS))
def test_probe_every_B_is_read(name, rule):
    """Perturb each weight's B in turn: some gradient of the model must move. Every
    weight of ≥ 2 dims but an embedding table has a B, read or reported unused."""
    torch.manual_seed(0)
    model = feedalign.convert(MODELS[name](), rule, seed=0)
    ids = torch.randint(0, 11, (2, 5))
    x = {"tied": ids, "gpt": ids, "vit": torch.randn(2, 3, 8, 8)}.get(name, torch.randn(2, 5, 4))
    x.requires_grad_(x.is_floating_point())

    def grads():  # every parameter's gradient and the input's: all that lies below some weight
        model.zero_grad()
        x.grad = None
        out = model(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return [t.grad.clone() for t in (x, *model.parameters()) if t.grad is not None]

    base = grads()
    for qual, (owner, attr, status) in rule_weights(model).items():
        if getattr(owner, attr).grad is None:  # not used by this forward at all
            continue
        if status == "unused":  # only ViT's class token and positions: added, never multiplied
            assert name == "vit" and qual in ("cls_token", "pos_embed"), qual
            continue
        B = getattr(owner, feedback_name(attr))
        saved = B.detach().clone()
        with torch.no_grad():
            B.add_(torch.randn_like(B))
        moved = any(not torch.allclose(a, b) for a, b in zip(grads(), base))
        with torch.no_grad():
            B.copy_(saved)
        assert moved, f"{qual}'s B is never read"


def test_deepcopy_and_eval_no_grad_keep_working():
    model = feedalign.convert(Use("chunk"), "fa", seed=0)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 4)
    model(x).sum().backward()
    twin(x).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with torch.inference_mode():
        model.eval()(x)


def test_feedback_angles_cover_the_weights_whose_B_is_read():
    model = feedalign.convert(zoo.ViT(layer_scale=True), "fa", seed=0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    angles = feedback_angles(model)
    assert "pos_embed" not in angles and "cls_token" not in angles  # added, never multiplied
    assert {"patch_embed", "head", "blocks.0.attn.in_proj_weight", "blocks.0.mlp.fc1"} <= set(angles)
    assert len(feedalign.feedback(model)) == len(angles)
