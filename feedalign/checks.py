"""One validation shared by the library (`build_model`) and the command line (`Options.check`).

A value outside its range is refused with the value given and what is allowed. Floats
must be finite: an `inf` or `nan` learning rate, step or magnitude trains nothing and
only shows up as a NaN loss much later.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Limit = tuple[Callable[[Any], bool], str]  # (accepts the value?, what is allowed, in words)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def finite_at_least(low: float) -> Limit:
    return (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= low, f"finite and >= {low:g}")


def finite_above(low: float) -> Limit:
    return (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > low, f"finite and > {low:g}")


def int_at_least(low: int) -> Limit:
    return (lambda v: is_int(v) and v >= low, f"an integer >= {low}")


def one_of(*allowed: int) -> Limit:
    words = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
    return (lambda v: is_int(v) and v in allowed, words)


def probability() -> Limit:
    return (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)")


def shape() -> Limit:
    """A per-sample input shape: a tuple (or list) of integers >= 1, e.g. (1, 28, 28)."""
    return (lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(is_int(d) and d >= 1 for d in v),
            "a non-empty tuple of integers >= 1, the per-sample shape, e.g. (1, 28, 28)")  # fmt: skip


SEED_LIMIT = 2**63  # seeds are int64 tensors across ranks; torch takes up to 2**64 - 1
SEED: Limit = (lambda v: v is None or (is_int(v) and 0 <= v < SEED_LIMIT),
               "an integer in [0, 2**63), or none (drawn)")  # fmt: skip

# convert's numeric arguments (also options: -rfb_mag, -seed).
CONVERT_LIMITS: dict[str, Limit] = {"rfb_mag": finite_at_least(0), "seed": SEED}

# build_model's arguments that are also options (same names): one table for both.
MODEL_LIMITS: dict[str, Limit] = CONVERT_LIMITS | {
    "n_classes": int_at_least(1),
    "num_layers": int_at_least(1),
    "num_hidden": int_at_least(1),
    "dropout": one_of(0, 1, 2),
    "batchnorm": one_of(0, 1, 2),
    "heads": int_at_least(1),
    "dropout_rate": probability(),
}


def check_limits(values: dict[str, Any], limits: dict[str, Limit], *, prefix: str = "",
                 error: type[ValueError] = ValueError) -> None:  # fmt: skip
    """Raise `error` for the first value outside its limit; `prefix` is "-" for options."""
    for name, value in values.items():
        if name not in limits:
            continue
        ok, allowed = limits[name]
        if not ok(value):
            raise error(f"{prefix}{name} {value!r} is not allowed; it must be {allowed}")
