"""The learning rules, one table: name → rule object (docs/rules.md lists them all).

Every rule says its kind:
    "bp"         plain autograd back-propagation;
    "per-layer"  each Linear / Conv layer sends the error to its input through a
                 matrix B of its weight's shape instead of W (rules/feedback.py says
                 where each rule's B comes from; rules/fa.py holds the layers);
    "direct"     taps after the hidden blocks replace the error arriving from above
                 by a fixed random projection of a broadcast signal (rules/dfa.py):
                 the output error (dfa), the target (drtp) or nothing (shallow);
    "local"      the same taps, but each hidden block learns from a loss of its own on
                 its output, with the labels read from the output error (rules/local.py):
                 pred, sim, predsim and their backprop-free "-bio" variants.
`convert`, `build_model`, the CLI's `-gradient`, the reproduce runner and the
alignment diagnostics all look rules up here. A new per-layer rule is one class
and one entry in rules/feedback.py's PER_LAYER.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from feedalign.rules.feedback import PER_LAYER, Rule
from feedalign.rules.local import LOCAL_RULES

RULES: dict[str, Rule] = {
    "bp": Rule("bp", "bp", "back-propagation: the reference every other rule is compared with"),
    **PER_LAYER,
    "dfa": Rule("dfa", "direct", "each hidden block gets e·B_i, e the output error (Nøkland 2016)",
                original_init=True, signal="error"),
    "drtp": Rule("drtp", "direct", "each hidden block gets a projection of the target, not the error "
                 "(Frenkel et al. 2021): no backward pass at all", original_init=True, signal="target"),
    "shallow": Rule("shallow", "direct", "only the output layer learns; hidden layers keep their initial "
                    "random weights: the floor every rule must beat", signal="none"),
    **LOCAL_RULES,
}  # fmt: skip


def check_rule(rule: str) -> str:
    """`rule` if it names a rule of RULES; else ValueError listing them."""
    if rule not in RULES:
        raise ValueError(f"unknown learning rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


@contextmanager
def backprop(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block a converted model computes plain back-propagation.

    Used for the adversarial step's input gradient (docs/original.md §4) and for
    comparing a rule's update with the true gradient (alignment diagnostics). Nests safely.
    """
    switched = [m for m in model.modules() if getattr(m, "rule_active", False)]
    # the call follower of a per-layer rule (rules/calls.py), one per model, kept in __dict__
    followers = {id(f): f for m in model.modules() if (f := m.__dict__.get("_fa_calls")) is not None}
    switched += [f for f in followers.values() if f.rule_active]
    for m in switched:
        m.rule_active = False
    try:
        yield model
    finally:
        for m in switched:
            m.rule_active = True
