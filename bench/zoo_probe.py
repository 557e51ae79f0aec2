"""The probes behind bench/zoo.py's `run_cell`: is any weight of a converted model
still trained by back-propagation?

needs_feedback  on the plain bp copy: which weights are multiplied (mm, addmm, bmm,
                convolution, …, read off the autograd graph) with an operand that
                itself needs an error. Only those must send the error down through a
                B; a first layer fed images or token ids needs none.
feedback_probe  per-layer rules: for each such weight, its B — the buffer or
                parameter `feedback_name(weight)` next to it (rules/feedback.py) — is
                perturbed, and some other parameter's gradient must change. A weight
                without a B, or whose B changes nothing, is trained by silent bp.
direct_probe    direct rules: perturbing the Output's B must change the gradient of
                every parameter outside the output layer; one that keeps its
                gradient learns by back-prop from the output, past every tap.

Fast path: the step's graph is kept and B is perturbed in place (`.data`, so autograd's
version check does not fire) before another backward; a stored B saved for the
backward is read there. Where that changes nothing (usf, frsf, brsf compute B from W
at the forward) the weight is checked again with fresh forward passes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from feedalign.rules import feedback as feedback_module
from feedalign.rules.dfa import IDS, Output, Tap
from feedalign.rules.feedback import feedback_name

# autograd nodes that only reshape, slice, copy or cast a weight on its way to a product
VIEWS = re.compile(
    r"(T|Transpose|Permute|View|UnsafeView|Reshape\w*|Expand|Squeeze|Unsqueeze|Select|Slice|Split\w*|"
    r"Unbind|AsStrided|Clone|ToCopy|Alias|Narrow|Unflatten|Flatten)Backward\d*$"
)
# product nodes -> the slot of their additive operand (a bias: not a weight, needs no B)
PRODUCTS = {"Mm": None, "Bmm": None, "Mv": None, "Dot": None, "Addmm": 0, "Baddbmm": 0, "Addbmm": 0,
            "Addmv": 0, "Addr": 0, "Convolution": 2, "MkldnnConvolution": 2, "MkldnnLinear": 2}  # fmt: skip
BOOST = 100.0  # B's perturbation, in units of its mean magnitude: a branch scaled by 1e-6 (convnext's
# LayerScale) still moves the gradients below it by ~1e-4 of their size, far above float32 rounding


def grads(model: nn.Module, only: list[str] | None = None) -> dict[str, Tensor | None]:
    """Parameter name -> a copy of its .grad (None where it got none); `only`: these names."""
    keep = None if only is None else set(only)
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters() if keep is None or n in keep}  # fmt: skip


def _backward(model: nn.Module, loss: Tensor, witnesses: list[str], retain: bool) -> dict:
    """The gradients of the `witnesses` alone (autograd skips what only other weights need)."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = None
    loss.backward(retain_graph=retain, inputs=[params[n] for n in witnesses])
    return grads(model, witnesses)


def needs_feedback(model: nn.Module, loss: Tensor) -> set[str]:
    """Names of the parameters that some product in `loss`'s graph multiplies with an
    operand requiring a gradient (call before backward, on the plain bp model)."""
    names = {id(p): n for n, p in model.named_parameters()}
    parents: dict = {}  # node -> [(consumer node, slot)]
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for slot, (child, _) in enumerate(node.next_functions):
            if child is not None:
                parents.setdefault(child, []).append((node, slot))
                stack.append(child)
    need = set()
    for node in seen:
        var = getattr(node, "variable", None)  # an AccumulateGrad: a leaf
        if var is None or id(var) not in names:
            continue
        frontier = list(parents.get(node, []))
        while frontier:
            consumer, slot = frontier.pop()
            kind = re.sub(r"Backward\d*$", "", type(consumer).__name__)
            if VIEWS.match(type(consumer).__name__):
                frontier += parents.get(consumer, [])
            elif kind in PRODUCTS and slot != PRODUCTS[kind]:
                others = [c for i, (c, _) in enumerate(consumer.next_functions)
                          if c is not None and i not in (slot, PRODUCTS[kind])]  # fmt: skip
                if others:
                    need.add(names[id(var)])
    return need


def feedback_sites(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name -> (module, attribute) of its B, for every weight that has one
    (the protocol of rules/feedback.py; a tied weight counts where any module holding it has one)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    sites: dict[str, tuple[nn.Module, str]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            attr = feedback_name(pname)
            if isinstance(getattr(m, attr, None), Tensor) and id(p) in canonical:
                sites.setdefault(canonical[id(p)], (m, attr))
    return sites


@contextlib.contextmanager
def perturbed(module: nn.Module, attr: str, seed: int = 0) -> Iterator[None]:
    """`module.<attr>` (a B, or a rule's stored state) perturbed in place, restored on exit:
    a 0-dim scale (usf's s) ×BOOST, a tensor + BOOST × noise of its mean magnitude; brsf's
    draw bound ×BOOST (it redraws |M| ~ U(0, bound) at every training forward)."""
    t = getattr(module, attr)
    saved = t.detach().clone()
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():  # .data: autograd's saved-tensor version check must not see it
        if t.dim() == 0:
            t.data.mul_(BOOST)
        else:
            t.data.add_((noise * BOOST * float(saved.abs().mean() + 1e-3)).to(t.dtype))
    bounds = module.__dict__.get("_feedback_bounds", {})
    old = bounds.get(attr)
    if old is not None:
        bounds[attr] = old * BOOST
    try:
        yield
    finally:
        with torch.no_grad():
            t.data.copy_(saved)
        if old is not None:
            bounds[attr] = old


def _kept(model: nn.Module):
    """Rules' random state put back after a pass (brsf draws the same M every time)."""
    keep = getattr(feedback_module, "feedback_kept", None)
    return keep(model) if keep is not None else contextlib.nullcontext()


def _gap(a: Tensor | None, b: Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def _changed(after: dict, before: dict, noise: dict) -> list[str]:
    """The names whose gradient moved by more than twice the run-to-run `noise`
    (0 where two unperturbed passes agree bit for bit, as on the CPU they do)."""
    return [n for n in before if _gap(after.get(n), before[n]) > 2 * noise[n]]


def _baseline(run: Callable[[], dict]) -> tuple[dict, dict]:
    """Gradients of one unperturbed pass, and how far a second one lands from them."""
    first, second = run(), run()
    return first, {n: _gap(first[n], second[n]) for n in first}


def _unmoved(model, loss, forward, targets, witnesses) -> list:
    """The targets [(module, attr, label)] whose perturbation moves no witness gradient:
    fast path on `loss`'s kept graph, then fresh forward passes for the suspects."""

    def kept() -> dict:
        return _backward(model, loss, witnesses, retain=True)

    def fresh() -> dict:
        with _kept(model):  # brsf: the same draw in every pass
            return _backward(model, forward(), witnesses, retain=False)

    for run in (kept, fresh):
        base, noise = _baseline(run)
        unmoved = []
        for module, attr, label in targets:
            with perturbed(module, attr):
                if not _changed(run(), base, noise):
                    unmoved.append((module, attr, label))
        if not unmoved:
            return []
        targets = unmoved
    return [label for _, _, label in targets]


def feedback_probe(model: nn.Module, loss: Tensor, forward: Callable[[], Tensor], need: set[str],
                   compare: list[str]) -> list[str]:  # fmt: skip
    """Per-layer rules: the weights of `need` trained by silent bp — no B, or a B whose
    perturbation moves no gradient (call right after the step's backward: a weight whose
    gradient is zero is not probed). The witnesses are the plain model's parameters
    (`compare`) outside `need`: biases, norms, embeddings, first layers. Below any
    weight of `need` lies one of them (its product's other operand needs an error:
    some parameter below made it so; follow it down to a parameter outside `need`)."""
    sites = feedback_sites(model)
    params = dict(model.named_parameters())
    witnesses = [n for n in compare if n not in need]
    # no error at a weight's output (its gradient is 0: a zero-initialised head under a
    # sign rule, sign(0) = 0): there is nothing for its B to carry, nothing to probe
    reached = {n for n in need if params[n].grad is not None and params[n].grad.any()}
    targets = [(*sites[n], n) for n in compare if n in reached and n in sites]
    silent = {n for n in need if n not in sites}
    if targets and witnesses:
        silent.update(_unmoved(model, loss, forward, targets, witnesses))
    return [n for n in compare if n in silent]


def direct_probe(
    model: nn.Module, loss: Tensor, forward: Callable[[], Tensor], compare: list[str]
) -> list[str]:
    """Direct rules: the parameters outside the output layer whose gradient does not
    depend on the Output's B (all Outputs perturbed at once)."""
    outputs = [m for m in model.modules() if isinstance(m, Output) and m.rule and m.ready]
    if not outputs or any(not o.site for o in outputs):
        return []  # no B yet, or an Output placed by hand: no output layer to tell apart
    canonical = {id(p): n for n, p in model.named_parameters()}
    head = {canonical[id(p)] for o in outputs for p in model.get_submodule(o.site).parameters()}
    witnesses = [n for n in compare if n not in head]
    got = _backward(model, loss, witnesses, retain=True)
    witnesses = [n for n in witnesses if got[n] is not None and got[n].any()]  # "no grad" is reported apart
    if not witnesses:
        return []
    passes = [lambda: _backward(model, loss, witnesses, retain=True),
              lambda: _backward(model, forward(), witnesses, retain=False)]  # fmt: skip
    for run in passes:  # fast path, then fresh passes for what did not move
        base, noise = _baseline(run)
        with contextlib.ExitStack() as stack:
            for k, o in enumerate(outputs):
                stack.enter_context(perturbed(o, "feedback", seed=k))
            moved = set(_changed(run(), base, noise))
        witnesses = [n for n in witnesses if n not in moved]
        if not witnesses:
            return []
    return witnesses


def taps_of(model: nn.Module) -> tuple[int, int]:
    """(taps placed by a direct rule, of which fed integer inputs such as token ids)."""
    taps = [m for m in model.modules() if isinstance(m, Tap) and m.rule]
    on_ids = 0
    for t in taps:
        shapes = getattr(t.broadcast, "shapes", None) or []
        on_ids += 0 <= t.index < len(shapes) and shapes[t.index] == IDS
    return len(taps), on_ids
