"""feedalign: back-propagation, feedback alignment and direct feedback alignment
for PyTorch (a reimplementation of Nøkland, NIPS 2016).

The library API is `__all__`. Every name loads on first use (`feedalign.convert` imports
the rules and models, `feedalign.run_training` the trainer), so `import feedalign` imports
no torch: the command line starts with a Ctrl-C handler in place before torch loads
(feedalign/cli.py). Training is `feedalign.run_training(options)`: `feedalign.train` is the
trainer's subpackage (feedalign/train/), not a function.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# name -> (module, attribute): loaded on first access
_LAZY = {
    "BCE": ("feedalign.losses", "BCE"),
    "make_criterion": ("feedalign.losses", "make_criterion"),
    "build_model": ("feedalign.models", "build_model"),
    "convert": ("feedalign.models", "convert"),
    "feedback": ("feedalign.models", "feedback"),
    "rule_of": ("feedalign.models", "rule_of"),
    "RULES": ("feedalign.rules", "RULES"),
    "backprop": ("feedalign.rules", "backprop"),
    "Output": ("feedalign.rules.dfa", "Output"),
    "Tap": ("feedalign.rules.dfa", "Tap"),
    "describe": ("feedalign.describe", "describe"),
    "load_dataset": ("feedalign.data", "load_dataset"),
    "alignment": ("feedalign.metrics.alignment", "alignment"),
    "feedback_angles": ("feedalign.metrics.alignment", "feedback_angles"),
    "Options": ("feedalign.train.config", "Options"),
    "run_training": ("feedalign.train.session", "train"),
    "evaluate_run": ("feedalign.train.session", "evaluate_run"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module 'feedalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package object: loading the submodule feedalign/describe.py (the import system sets
    it as an attribute of its package) must not hide the function `feedalign.describe`."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
