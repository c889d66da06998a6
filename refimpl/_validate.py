"""Argument checks shared by both packages.

Everything here is plain Python (no NumPy, no torch), so that ``refimpl`` and ``torch_port``
reject the same bad input with the same message. Array checks live beside each package's
array type (``refimpl._arrays``, ``torch_port._checks``). Every check raises before any
computation or state change, so a failed call leaves nothing half-done.
"""

from __future__ import annotations

import math
import numbers

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be nan")
    return value


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0 (temperatures, scales)."""
    value = _real(value, name)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_nonnegative(value: object, name: str) -> float:
    value = _real(value, name)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_interval(
    value: object, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """A real number in the interval [low, high], either end optionally open."""
    value = _real(value, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """An integer >= minimum; floats with an integral value (4.0) are accepted, 4.5 is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        as_int = int(value)
    else:
        fvalue = float(value)
        if not (math.isfinite(fvalue) and fvalue == int(fvalue)):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
        as_int = int(fvalue)
    if as_int < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return as_int


def check_class_count(num_classes: int, name: str = "number of classes") -> int:
    if num_classes < 1:
        raise ValueError(f"{name} must be >= 1, got {num_classes}")
    return num_classes
