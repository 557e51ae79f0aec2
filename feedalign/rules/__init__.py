"""The learning rules: bp (plain autograd), fa (fa.py) and dfa (dfa.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

RULES = ("bp", "fa", "dfa", "drtp", "shallow")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown learning rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


@contextmanager
def backprop(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block a converted model computes plain back-propagation.

    Used for the adversarial step's input gradient (SPEC §4) and for comparing a
    rule's update with the true gradient (alignment diagnostics). Nests safely.
    """
    switched = [m for m in model.modules() if getattr(m, "rule_active", False)]
    for m in switched:
        m.rule_active = False
    try:
        yield model
    finally:
        for m in switched:
            m.rule_active = True
