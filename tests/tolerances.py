"""Tolerances, one table per dtype, for forward values and for gradients.

``dtype`` here is the dtype of the inputs given to the port. The port computes float16 and bfloat16
inputs in float32, so their rows are float32's: the suites compare the port against the float64
reference evaluated at the *same rounded inputs*, so input rounding is not charged to the loss. A
comparison passes when |port - reference| <= atol * scale + rtol * |reference| elementwise, where
scale = max(1, max |reference|) keeps absolute slack proportional to the size of the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


FORWARD = {
    "float64": Tol(rtol=1e-10, atol=1e-12),
    "float32": Tol(rtol=2e-5, atol=2e-6),
    "bfloat16": Tol(rtol=2e-5, atol=2e-6),
    "float16": Tol(rtol=2e-5, atol=2e-6),
}

GRADIENT = {
    "float64": Tol(rtol=1e-9, atol=1e-11),
    "float32": Tol(rtol=1e-4, atol=2e-5),
    "bfloat16": Tol(rtol=1e-4, atol=2e-5),
    "float16": Tol(rtol=1e-4, atol=2e-5),
}


def tolerance(kind: str, dtype: str, overrides: dict | None = None) -> Tol:
    """The table entry for (kind, dtype), replaced by a record's override when it has one."""
    table = {"forward": FORWARD, "gradient": GRADIENT}[kind]
    if overrides and (kind, dtype) in overrides:
        return overrides[(kind, dtype)]
    return table[dtype]


def assert_close(actual, expected, tol: Tol, what: str = "") -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    bound = tol.atol * scale + tol.rtol * np.abs(expected)
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements differ beyond rtol={tol.rtol}, atol={tol.atol}; "
            f"worst at {tuple(int(i) for i in worst)}: got {actual[worst]!r}, expected {expected[worst]!r}"
        )
