"""feedalign: back-propagation, feedback alignment and direct feedback alignment
for PyTorch (a reimplementation of Nøkland, NIPS 2016).

The library API is `__all__`. The rules and models load with `import feedalign`;
the heavier parts (data, training, diagnostics) load on first use, so that
`import feedalign` stays quick. Training is `feedalign.run_training(options)`:
`feedalign.train` is the trainer's subpackage (feedalign/train/), not a function.
"""

from __future__ import annotations

import importlib

from feedalign.describe import describe
from feedalign.losses import BCE, make_criterion
from feedalign.models import build_model, convert, feedback, rule_of
from feedalign.rules import RULES, backprop
from feedalign.rules.dfa import Output, Tap

__version__ = "0.1.0"

# name -> (module, attribute): loaded on first access
_LAZY = {
    "load_dataset": ("feedalign.data", "load_dataset"),
    "alignment": ("feedalign.metrics.alignment", "alignment"),
    "feedback_angles": ("feedalign.metrics.alignment", "feedback_angles"),
    "Options": ("feedalign.train.config", "Options"),
    "run_training": ("feedalign.train.session", "train"),
    "evaluate_run": ("feedalign.train.session", "evaluate_run"),
}

__all__ = [
    "BCE",
    "Output",
    "RULES",
    "Tap",
    "backprop",
    "build_model",
    "convert",
    "describe",
    "feedback",
    "make_criterion",
    "rule_of",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module 'feedalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
