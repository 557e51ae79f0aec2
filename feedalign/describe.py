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
    """In plain words, what a conversion did: the rule, the output layer and, for the direct
    and local rules, where each tap is, what feeds it and which block it trains; then
    every parameter by the error it learns from (grouped by the module holding it)."""
    from feedalign.rules import RULES

    rule = rule_of(model)
    known = RULES.get(rule)
    lines = [f"{type(model).__name__} learning by {rule}" + (f": {known.summary}" if known else "")]
    taps = [m for m in model.modules() if isinstance(m, Tap) and m.rule]
    outputs = [m for m in model.modules() if isinstance(m, Output) and m.rule]
    blocks = outputs[0].blocks if outputs else []
    out_site = outputs[0].site if outputs else ""
    for out in outputs:
        n_out = f"{out.feedback.shape[0]} outputs" if out.ready else "outputs counted at the first forward"
        lines.append(f"  output layer {out.site or '(the model output)'}: learns from the true error "
                     f"e = dL/dy ({n_out})")  # fmt: skip
    heads = [h for out in outputs if isinstance(out, LocalOutput) for h in out.heads]
    trains: dict[str, str] = {}  # block -> the signal that trains it, as the tap lines name it
    for tap in taps:
        if tap.broadcast is None:  # shallow: the tap only stops the error
            lines.append(f"  a tap at the {tap.cuts} of {tap.site or 'a hand-placed Tap'} stops the error: "
                         "nothing before it learns")  # fmt: skip
            continue
        sizes = tap.broadcast.sizes
        n = (
            f"{sizes[tap.index]} values per sample"
            if tap.index < len(sizes)
            else "sized at the first forward"
        )
        used = [i for i, k in enumerate(sizes) if k]  # taps with a head (not fed token ids)
        head = used.index(tap.index) if tap.index in used and used.index(tap.index) < len(heads) else None
        signal = _signal(known, tap.index, head)
        block = _block_before(tap, blocks, out_site)
        if block is not None and block not in trains:
            trains[block] = f"{signal} at tap {tap.index}"
        what = "what runs before it, outside the blocks" if tap.site else "the layers up to the tap before it"
        if block:
            what = f"block {block} ({type(model.get_submodule(block)).__name__})"
        where = f"the {tap.cuts} of {tap.site}" if tap.site else "a hand-placed Tap"
        lines.append(f"  tap {tap.index} at {where} ({n}): {signal} trains {what}")
        if head is not None:
            lines.append(f"    local head {head}: {heads[head].summary()}")
    lines.append("  each parameter learns from:")
    by_group: dict[str, list[str]] = {}
    for name, group in classify(model).items():
        holder = name
        if group.startswith(f"{rule} block "):  # one entry per block, not per parameter inside
            holder = group.split()[-1]
            group = (
                f"{trains.get(holder, 'the signal at the next tap down')}, back-propagated within the block"
            )
        else:
            group = _plain(group, rule, bool(taps))
        entries = by_group.setdefault(group, [])
        if holder not in entries:
            entries.append(holder)
    for group, holders in by_group.items():
        lines.append(f"    {group}: {', '.join(holders)}")
    return "\n".join(lines)


def _signal(rule, index: int, head: int | None) -> str:
    """What tap `index` hands back, in the rule's terms."""
    if head is not None or (rule is not None and rule.kind == "local"):
        return f"the gradient of local head {head if head is not None else index}'s own loss"
    if rule is not None and rule.signal == "target":
        return f"the projected target −s·y*·B_{index}"
    return f"e·B_{index}"


def _block_before(tap: Tap, blocks: list[str], out_site: str) -> str | None:
    """The block a tap's signal trains: the one before the block (or output layer) whose
    input it cuts; under taps="micro", the block holding the sub-module whose output it cuts."""
    if tap.cuts == "output":
        return _owner(tap.site, blocks)
    order = [*blocks, out_site]
    at = order.index(tap.site) if tap.site in order else -1
    return blocks[at - 1] if at >= 1 else None


def _plain(group: str, rule: str, direct: bool) -> str:
    """classify()'s group names as a start-up summary reads them."""
    if group == LOCAL and direct:
        return "the error that reaches it from the tap after it (outside the blocks; before the first: tap 0)"
    if group == LOCAL:
        return f"the error that reaches it (the usual gradient, given the error {rule} delivers)"
    if group.startswith("per-layer rule "):
        return f"{rule}: the error sent down through B instead of Wᵀ" + group.removeprefix(
            f"per-layer rule {rule}"
        )
    if group.startswith("output layer"):
        return "the true error e (the output layer)"
    if group.startswith("fixed"):
        return "fixed: no gradient (shallow: hidden layers keep their initial random weights)"
    return group
