"""Hypothesis strategies, bounded per dtype: shapes first, then values.

Every strategy draws float64 NumPy arrays; the suites cast them to the dtype under test. Bounds
keep values where the dtype represents them with room to spare, so a failure means the loss is
wrong, not that the input was unrepresentable.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Largest magnitude drawn for generic float inputs: exactly representable in float16 (max 65504)
# and far inside bfloat16/float32, so half-precision suites can reuse every drawn sample.
VALUE_BOUND = 1e4


def finite_floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def float_arrays(shape: tuple[int, ...], low: float = -VALUE_BOUND, high: float = VALUE_BOUND):
    """float64 arrays of a given shape with every element in [low, high]."""
    return hnp.arrays(np.float64, shape, elements=finite_floats(low, high))


@st.composite
def batch_and_classes(draw, max_batch: int = 6, min_classes: int = 1, max_classes: int = 8):
    """(B, C) with B >= 1 and C >= min_classes: small, because properties, not sizes, are under test."""
    batch = draw(st.integers(1, max_batch))
    classes = draw(st.integers(min_classes, max_classes))
    return batch, classes


def labels(batch: int, classes: int):
    """Integer labels (batch,) in [0, classes), as int64."""
    return hnp.arrays(np.int64, (batch,), elements=st.integers(0, classes - 1))


def temperatures(low: float = 0.25, high: float = 20.0):
    return finite_floats(low, high)


def unit_interval():
    return finite_floats(0.0, 1.0)
