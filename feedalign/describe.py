"""`describe(model)`: what a conversion did — which rule trains which parameter.

Every parameter falls in one group:

    per-layer rule   `layer.<w>` with a feedback attribute (feedalign/rules/feedback.py):
                     fa, usf, frsf, brsf, kp send the error down through B instead of Wᵀ;
    output layer     a direct rule's output layer: trained with the true error e;
    block            a direct rule's block (a tap cuts its input): dfa's e·B_i or drtp's
                     −s·y*·B_i, arriving at the next tap downstream, back-propagated within it;
    fixed            shallow: a hidden parameter, never updated (grad stays None);
    local error      learns from the error that reaches it (a bias or norm next to an
                     fa layer, an Embedding, a raw nn.Parameter used in a custom forward
                     such as a position embedding, a stem before the first tap);
    bp               a back-propagation model: the true gradient.
"""

from __future__ import annotations

from torch import nn

from feedalign.models.convert import rule_of
from feedalign.rules.dfa import Output, Tap
from feedalign.rules.feedback import feedback_name

LOCAL = "learns from the error that reaches it"


def _owner(name: str, sites: list[str]) -> str | None:
    """The longest site (module name) that `name` (a parameter's) lies in."""
    inside = [s for s in sites if s and (name == s or name.startswith(s + "."))]
    return max(inside, key=len) if inside else None


def classify(model: nn.Module) -> dict[str, str]:
    """Parameter name -> its group (see the module docstring), in named_parameters order."""
    rule = rule_of(model)
    taps = [m for m in model.modules() if isinstance(m, Tap) and m.rule]
    outputs = [m for m in model.modules() if isinstance(m, Output) and m.rule]
    out_site = outputs[0].site if outputs else (taps[-1].site if rule == "shallow" and taps else "")
    blocks = outputs[0].blocks if outputs else []
    handled = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            if hasattr(m, feedback_name(pname)):
                handled[f"{mname}.{pname}" if mname else pname] = f"per-layer rule {m.feedback_rule}"
    groups: dict[str, str] = {}
    for name, p in model.named_parameters():
        if out_site and _owner(name, [out_site]):
            groups[name] = "output layer: the true error e"
        elif rule == "shallow":
            groups[name] = "fixed: no gradient (shallow)"
        elif not p.requires_grad:
            groups[name] = "frozen (requires_grad=False)"
        elif name in handled:
            groups[name] = handled[name]
        elif rule == "bp":
            groups[name] = "bp: the true gradient"
        elif (block := _owner(name, blocks)) is not None:
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
    for tap in taps:
        sizes = tap.broadcast.sizes if tap.broadcast is not None else []
        n = sizes[tap.index] if tap.index < len(sizes) else ("-" if tap.broadcast is None else "?")
        where = f"input of {tap.site}" if tap.site else "placed by hand"
        lines.append(f"  tap {tap.index if tap.broadcast is not None else '-'}: {where}, n_i = {n}")
    by_group: dict[str, list[str]] = {}
    for name, group in classify(model).items():
        holder = name
        if group.startswith(f"{rule} block "):  # one entry per block, not per parameter inside
            group, holder = f"{rule}, blocks (the signal at the next tap down)", group.split()[-1]
        entries = by_group.setdefault(group, [])
        if holder not in entries:
            entries.append(holder)
    lines.append("  parameters:")
    for group, holders in by_group.items():
        lines.append(f"    {group}: {', '.join(holders)}")
    return "\n".join(lines)
