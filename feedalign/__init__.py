"""feedalign: back-propagation, feedback alignment and direct feedback alignment
for PyTorch (a reimplementation of Nøkland, NIPS 2016)."""

from feedalign.describe import describe
from feedalign.losses import BCE, make_criterion
from feedalign.models import build_model, convert, feedback, rule_of
from feedalign.rules import RULES, backprop
from feedalign.rules.dfa import Output, Tap

__version__ = "0.1.0"

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
]


def __getattr__(name: str):
    # Heavier parts load on first use: `import feedalign` stays quick.
    if name in ("load_dataset",):
        from feedalign.data import load_dataset

        return load_dataset
    if name in ("alignment",):
        from feedalign.metrics.alignment import alignment

        return alignment
    if name in ("train",):
        from feedalign.train.loop import train

        return train
    raise AttributeError(f"module 'feedalign' has no attribute {name!r}")
