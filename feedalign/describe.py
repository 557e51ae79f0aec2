"""`describe(model)`: what a conversion did — which rule trains which parameter.

Every parameter falls in one group:

    per-layer rule   a weight with a B (feedalign/rules/feedback.py) that a layer's
                     forward, or a call in some forward (rules/calls.py), multiplies by:
                     fa, usf, frsf, brsf, kp send the error down through B instead of Wᵀ;
    output layer     a direct rule's output layer: trained with the true error e;
    block            a direct rule's block (a tap cuts its input): dfa's e·B_i or drtp's
                     −s·y*·B_i, arriving at the next tap downstream, back-propagated within it;
    fixed            shallow: a hidden parameter, never updated (grad stays None);
    local loss       a local rule's block (a tap cuts its output): the gradient of its own
                     loss, back-propagated within it; the head computing that loss (its
                     decoder, transform) learns from the same loss;
    local error      learns from the error that reaches it (a bias or norm next to an
                     fa layer, an Embedding, a parameter only added or multiplied
                     elementwise such as a position embedding, a stem before the first tap);
    bp               a back-propagation model: the true gradient.

A weight tied to another use (an output layer sharing an embedding's table) is
listed once, under the rule of the use named first, with the others in parentheses:
its gradient is the sum of what each use sends it.
"""

from __future__ import annotations

from torch import nn

from feedalign.models.convert import rule_of
from feedalign.rules.calls import follower_of, rule_weights
from feedalign.rules.dfa import Output, Tap
from feedalign.rules.local import LocalOutput

LOCAL = "learns from the error that reaches it"


def _owner(name: str, sites: list[str]) -> str | None:
    """The longest site (module name) that `name` (a parameter's) lies in."""
    inside = [s for s in sites if s and (name == s or name.startswith(s + "."))]
    return max(inside, key=len) if inside else None


def _names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (a tied weight has one per module holding it)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _per_layer_group(rule: str, status: str, calls: set[str]) -> str:
    if status == "layer":
        return f"per-layer rule {rule}"
    if status == "calls":
        return f"per-layer rule {rule} (through {', '.join(sorted(calls))} in a forward)"
    if status == "pending":
        return (
            f"per-layer rule {rule} where a forward uses it as a weight (known at the first training forward)"
        )
    return f"{LOCAL} (a training forward never used it as a weight)"


def classify(model: nn.Module) -> dict[str, str]:
    """Parameter name -> its group (see the module docstring), in named_parameters order.
    A tied parameter is listed once, by the name the group concerns (the output layer's
    or the one holding its B), with its other names in parentheses."""
    rule = rule_of(model)
    taps = [m for m in model.modules() if isinstance(m, Tap) and m.rule]
    outputs = [m for m in model.modules() if isinstance(m, Output) and m.rule]
    out_site = outputs[0].site if outputs else (taps[-1].site if rule == "shallow" and taps else "")
    blocks = outputs[0].blocks if outputs else []
    follower = follower_of(model)
    reads = follower.reads if follower is not None else {}
    with_b = {id(getattr(m, a)): (q, status) for q, (m, a, status) in rule_weights(model).items()}
    all_names = _names(model)
    heads = {id(q): f"local head {i}: its own loss" for out in outputs if isinstance(out, LocalOutput)
             for i, head in enumerate(out.heads) for q in head.parameters()}  # fmt: skip
    groups: dict[str, str] = {}
    for first, p in model.named_parameters():
        names = all_names[id(p)]
        if id(p) in heads:
            groups[first] = heads[id(p)]
            continue
        at_output = [n for n in names if out_site and _owner(n, [out_site])]
        name = at_output[0] if at_output else with_b.get(id(p), (first,))[0]
        if len(names) > 1:  # tied: the other uses add their own error to this weight's gradient
            others = ", ".join(n for n in names if n != name)
            name = f"{name} (tied: as {others} it also learns from the error reaching it there)"
        if at_output:
            groups[name] = "output layer: the true error e"
        elif rule == "shallow":
            groups[name] = "fixed: no gradient (shallow)"
        elif not p.requires_grad:
            groups[name] = "frozen (requires_grad=False)"
        elif id(p) in with_b:
            qual, status = with_b[id(p)]
            groups[name] = _per_layer_group(rule, status, reads.get(qual, set()))
        elif rule == "bp":
            groups[name] = "bp: the true gradient"
        elif (block := _owner(first, blocks)) is not None:
            groups[name] = f"{rule} block {block}"
        else:
            groups[name] = LOCAL
    return groups


def describe(model: nn.Module) -> str:
    """A summary of `model`'s conversion: its rule, the direct rules' taps (the blocks
    whose input each cuts, and n_i once sized) and output layer, and which rule trains
    each parameter (parameters grouped by the module holding them)."""
    rule = rule_of(model)
    lines = [f"{type(model).__name__} learning by {rule}"]
    taps = [m for m in model.modules() if isinstance(m, Tap) and m.rule]
    outputs = [m for m in model.modules() if isinstance(m, Output) and m.rule]
    for out in outputs:
        n_out = out.feedback.shape[0] if out.ready else "?"
        lines.append(f"  output: {out.site or 'the model output'} (error e over {n_out} outputs)")
    heads = [h for out in outputs if isinstance(out, LocalOutput) for h in out.heads]
    for tap in taps:
        sizes = tap.broadcast.sizes if tap.broadcast is not None else []
        n = sizes[tap.index] if tap.index < len(sizes) else ("-" if tap.broadcast is None else "?")
        where = f"{getattr(tap, 'cuts', 'input')} of {tap.site}" if tap.site else "placed by hand"
        lines.append(f"  tap {tap.index if tap.broadcast is not None else '-'}: {where}, n_i = {n}")
        used = [i for i, k in enumerate(sizes) if k]  # taps with a head (not fed token ids)
        if tap.index in used and used.index(tap.index) < len(heads):
            lines.append(f"    local head {used.index(tap.index)}: {heads[used.index(tap.index)].summary()}")
    signal = "its own loss, at the tap after it" if heads else "the signal at the next tap down"
    by_group: dict[str, list[str]] = {}
    for name, group in classify(model).items():
        holder = name
        if group.startswith(f"{rule} block "):  # one entry per block, not per parameter inside
            group, holder = f"{rule}, blocks ({signal})", group.split()[-1]
        entries = by_group.setdefault(group, [])
        if holder not in entries:
            entries.append(holder)
    lines.append("  parameters:")
    for group, holders in by_group.items():
        lines.append(f"    {group}: {', '.join(holders)}")
    return "\n".join(lines)
