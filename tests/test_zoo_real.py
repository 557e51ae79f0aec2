"""Real models of the three zoos × rules (bench/zoo.py): every cell must be "ok" — no
refusal, no crash, no weight silently left on back-propagation, every parameter that
plain bp trains given a gradient.

Optional: each cell skips where its zoo does not import (`pip install -e ".[zoo]"`
for transformers and timm; torchvision comes with torch's own index). The models are
tiny configs; the heavier convnets and vision transformers are marked slow. First,
the probes themselves are checked on models written here, whose answer is known.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedalign

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # bench/zoo.py imports zoo_probe; appended: tests/zoo.py keeps the name `zoo`
_spec = importlib.util.spec_from_file_location("zoo_catalogue", BENCH / "zoo.py")
catalogue = importlib.util.module_from_spec(_spec)
sys.modules["zoo_catalogue"] = catalogue  # dataclasses look their module up by name
_spec.loader.exec_module(catalogue)
import zoo_probe  # noqa: E402  (found on the path appended above)

RULES = ("fa", "kp", "usf", "dfa", "drtp")


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: steady timings on a shared two-core machine; restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- the probes on models whose answer is known -------------------------------------


class _Feedback(torch.autograd.Function):
    """y = x Wᵀ; the error goes to x through `b` (B, or W itself: back-prop)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, b)
        return x @ w.T

    @staticmethod
    def backward(ctx, g):  # g: (N, out)
        x, b = ctx.saved_tensors
        return g @ b, g.T @ x, None


class Layer(nn.Linear):
    """A Linear with a `feedback` buffer, as feedalign's per-layer rules keep it;
    reads=False: its backward uses W, leaving B unread (silent back-prop)."""

    def __init__(self, n_in: int, n_out: int, reads: bool):
        super().__init__(n_in, n_out)
        self.register_buffer("feedback", torch.randn(n_out, n_in) / n_in**0.5)
        self.reads, self.plain = reads, False

    def forward(self, x):
        if self.plain:
            return super().forward(x)
        b = getattr(self, "feedback", None) if self.reads else None  # no B: W, as back-prop
        return _Feedback.apply(x, self.weight, self.weight.detach() if b is None else b) + self.bias


def _net(reads: tuple[bool, bool, bool]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Layer(6, 8, reads[0]), nn.Tanh(), Layer(8, 8, reads[1]), nn.Tanh(), Layer(8, 3, reads[2])
    )


def _probe(net: nn.Sequential, drop_b: str | None = None) -> list[str]:
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    forward = lambda: F.cross_entropy(net(x), y)  # noqa: E731
    for m in net.modules():
        m.plain = True
    need = zoo_probe.needs_feedback(net, forward())  # on plain bp, as run_cell does
    for m in net.modules():
        m.plain = False
    if drop_b:
        del net.get_submodule(drop_b).feedback
    loss = forward()
    loss.backward(retain_graph=True)
    return zoo_probe.feedback_probe(net, loss, forward, need, [n for n, _ in net.named_parameters()])


def test_needs_feedback_leaves_out_first_layers():
    net = _net((True, True, True))
    for m in net.modules():
        m.plain = True
    loss = F.cross_entropy(net(torch.randn(5, 6)), torch.arange(5) % 3)
    assert zoo_probe.needs_feedback(net, loss) == {"2.weight", "4.weight"}  # 0.weight's input is data


def test_feedback_probe_finds_an_unread_b():
    assert _probe(_net((True, True, True))) == []
    assert _probe(_net((True, False, True))) == ["2.weight"]
    assert _probe(_net((False, True, True))) == []  # the first layer's B is never needed
    assert _probe(_net((True, True, True)), drop_b="4") == ["4.weight"]  # a weight with no B at all


class _Side(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out, self.side = (
            nn.Linear(6, 8),
            nn.Linear(8, 8),
            nn.Linear(8, 3),
            nn.Linear(6, 3),
        )

    def forward(self, x):  # side(x) joins after the output layer: trained by the true error, past every tap
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))) + self.side(x)


def test_direct_probe_finds_a_path_past_the_taps():
    torch.manual_seed(0)
    model = feedalign.convert(_Side(), "dfa", seed=0, blocks=["fc2"], output="out")
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    forward = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    loss = forward()
    loss.backward(retain_graph=True)
    found = zoo_probe.direct_probe(model, loss, forward, [n for n, _ in model.named_parameters()])
    assert found == ["side.weight", "side.bias"]


# --- the zoo: every entry × rule ----------------------------------------------------


def _cells() -> list:
    out = []
    for entry in catalogue.catalogue(usable_only=False):
        marks = [pytest.mark.slow] if entry.slow else []
        out += [pytest.param(entry, rule, id=f"{entry.name}-{rule}", marks=marks) for rule in RULES]
    return out


@pytest.mark.parametrize(("entry", "rule"), _cells())
def test_zoo_cell(entry, rule):
    why = catalogue.missing(entry.zoo)
    if why is not None:
        pytest.skip(f"{entry.zoo} does not import ({why}); pip install -e '.[zoo]'")
    cell = catalogue.run_cell(entry, rule)
    assert cell.outcome == "ok", f"{entry.name} under {rule}: {cell.text}"
