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


# build_model's arguments that are also options (same names): one table for both.
MODEL_LIMITS: dict[str, Limit] = {
    "n_classes": int_at_least(1),
    "num_layers": int_at_least(1),
    "num_hidden": int_at_least(1),
    "dropout": one_of(0, 1, 2),
    "batchnorm": one_of(0, 1, 2),
    "rfb_mag": finite_at_least(0),
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
