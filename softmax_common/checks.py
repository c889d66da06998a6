"""Argument and hyperparameter checks shared by both packages.

Everything here is plain Python (no NumPy, no torch), so that ``refimpl`` and ``torch_port``
reject the same bad input with the same message. Array checks live beside each package's
array type (``refimpl/arrays.py``, ``torch_port/tensor_checks.py``). Every check raises before
any computation or state change, so a failed call leaves nothing half-done.
"""

from __future__ import annotations

import math
import numbers

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def real_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be nan")
    return value


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0 (temperatures, scales)."""
    value = real_number(value, name)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_nonnegative(value: object, name: str) -> float:
    value = real_number(value, name)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_interval(
    value: object, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """A real number in the interval [low, high], either end optionally open."""
    value = real_number(value, name)
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


def check_flag(value: object, name: str) -> bool:
    """True or False. NumPy's bool scalar is accepted too (recognised by its type, so that this
    module need not import NumPy); 0, 1 and strings are refused."""
    kind = type(value)
    if not (isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))):
        raise TypeError(f"{name} must be a bool (True or False), got {kind.__name__}")
    return bool(value)


# ---------------------------------------------------------------------------------------------
# Hyperparameters of the margin losses (radians for angles)
# ---------------------------------------------------------------------------------------------


# Bounds where the computation stops making sense; docs/design.md ("Hyperparameter bounds") gives
# the measurements. s multiplies a float32 cosine's rounding (>= 2^-24) into every logit and so into
# p - onehot(y): 6e-4 at s = 1e4, and the logits stay far inside float32's range.
MAX_SCALE = 1e4
# The largest m at which the reference's multiple-angle sum for cos(m theta) stays within 128 ulp of
# the exact value (derivations/06-lsoftmax.md measures it); the combined margin's m1 shares it.
MAX_MARGIN_MULTIPLIER = 16


def check_scale(s: object) -> float:
    """The scale s of the normalized logits: a number in (0, MAX_SCALE] = (0, 1e4]."""
    s = check_positive(s, "s")
    if s > MAX_SCALE:
        raise ValueError(f"s must lie in (0, {MAX_SCALE:g}] (float32 logits lose their precision beyond), got {s}")
    return s


def check_margin_multiplier(m: object, name: str = "m") -> int:
    """The integer angular multiplier of L-Softmax and SphereFace: 1 <= m <= MAX_MARGIN_MULTIPLIER = 16."""
    m_int = check_positive_int(m, name)
    if m_int > MAX_MARGIN_MULTIPLIER:
        raise ValueError(
            f"{name} must be an integer in [1, {MAX_MARGIN_MULTIPLIER}] "
            f"(cos({name} theta) loses its accuracy beyond), got {m}"
        )
    return m_int


def check_cosine_margin(m: object) -> float:
    """CosFace/AM-Softmax margin: a finite number >= 0 (subtracted from a cosine)."""
    return check_nonnegative(m, "m")


def check_angular_margin(m: object, name: str = "m") -> float:
    """An additive angle in radians, in [0, pi/2]. Above a right angle the margin stops making sense:
    a feature on its class's direction (theta = 0) would get the target logit s cos m < 0, below that
    of any class orthogonal to it, and the ArcFace fallback's drop is proved non-negative (psi
    non-increasing) on [0, pi/2] (derivations/05-arcface-combined.md). A value refused above pi/2
    that is a valid margin in degrees (at most 90, e.g. pytorch-metric-learning's 28.6) gets its
    value in radians in the message (28.6 degrees = 0.4992)."""
    value = real_number(m, name)
    if 0.0 <= value <= math.pi / 2:
        return value
    hint = ""
    if math.pi / 2 < value <= 90.0:
        hint = f"; if {value:g} was meant in degrees, pass math.radians({value:g}) = {math.radians(value):.4g}"
    raise ValueError(
        f"{name} must lie in [0.0, {math.pi / 2}] (an angle in radians; pi/2 is 90 degrees), got {value}{hint}"
    )


def check_combined_margins(m1: object, m2: object, m3: object) -> tuple[float, float, float]:
    """m1 in [1, MAX_MARGIN_MULTIPLIER] = [1, 16] (multiplicative angle), m2 in [0, pi/2] (additive
    angle, radians), m3 >= 0 (cosine margin)."""
    m1 = check_interval(m1, "m1", 1.0, MAX_MARGIN_MULTIPLIER)
    m2 = check_angular_margin(m2, "m2")
    m3 = check_nonnegative(m3, "m3")
    return m1, m2, m3


# ---------------------------------------------------------------------------------------------
# The modern margins: gradient convention, ignored labels, per-sample margins
# ---------------------------------------------------------------------------------------------


MARGIN_GRADS = ("exact", "detached")


def check_margin_grad(margin_grad: object) -> str:
    """``"exact"`` (the derivative of the margin transform) or ``"detached"`` (the transform's value
    with the gradient of the un-margined logit, as insightface's arcface_torch computes it)."""
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
    return margin_grad  # type: ignore[return-value]


def check_ignore_index(ignore_index: object) -> int | None:
    """A negative integer (insightface and Partial FC mark rows to skip with -1), or None for none.

    A class index (>= 0) is refused: a class equal to ignore_index could never be trained, and
    whether it is one depends on C, which this check does not see.
    """
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be a negative integer or None, got {type(ignore_index).__name__}")
    if ignore_index >= 0:
        raise ValueError(
            f"ignore_index must be a negative integer or None (a class index would make that class "
            f"untrainable), got {ignore_index}"
        )
    return int(ignore_index)


def label_range_message(
    name: str, num_classes: int, smallest: int, largest: int, ignore_index: int | None, low: int = 0
) -> str:
    """The message for labels outside [low, C) (low is 0, or -1 on the engine's primitive, where -1
    marks a target held by another shard): smallest and largest are over the rows not ignored."""
    skipped = "" if ignore_index is None else f" (rows labelled ignore_index={ignore_index} are skipped)"
    return f"{name} must lie in [{low}, {num_classes}), got values in [{smallest}, {largest}]{skipped}"


def check_margin_vector_shape(shape: tuple[int, ...], batch: int, name: str = "m") -> None:
    """A margin given as an array holds one margin per sample: shape (batch,)."""
    if tuple(shape) != (batch,):
        raise ValueError(
            f"{name} must be a number or an array of shape ({batch},) (one margin per sample), got shape {tuple(shape)}"
        )


def check_subcenters(k: object, rows: int) -> int:
    """Sub-centres per class: an integer k >= 1 that divides the number of rows of W (C*k)."""
    k = check_positive_int(k, "k")
    if rows % k:
        raise ValueError(f"W must have a multiple of k = {k} rows (k sub-centres per class), got {rows} rows")
    return k


def check_margin_range(
    low: object, high: object, low_name: str = "m_min", high_name: str = "m_max"
) -> tuple[float, float]:
    """Two angular margins (radians, each in [0, pi/2]) with low <= high (the least and the largest
    margin of adaptive_margins, MagFace's l_m and u_m)."""
    low = check_angular_margin(low, low_name)
    high = check_angular_margin(high, high_name)
    if low > high:
        raise ValueError(f"{low_name} must be <= {high_name}, got {low_name}={low} > {high_name}={high}")
    return low, high


def check_bounds_pair(low: object, high: object, low_name: str, high_name: str) -> tuple[float, float]:
    """Two finite numbers with 0 < low < high (MagFace's feature-norm bounds l_a < u_a)."""
    low = check_positive(low, low_name)
    high = check_positive(high, high_name)
    if not low < high:
        raise ValueError(f"{low_name} must be < {high_name}, got {low_name}={low} >= {high_name}={high}")
    return low, high


def check_class_counts(size: int, smallest: float, largest: float) -> None:
    """Per-class sample counts (adaptive_margins): at least one class, every count finite and > 0
    (the margins use n^p with p < 0). Called with the counts' size and extremes."""
    if size == 0:
        raise ValueError("class_counts must hold one count per class, got none")
    if not (smallest > 0 and math.isfinite(largest)):
        raise ValueError(f"class_counts must be finite and > 0, got values in [{smallest}, {largest}]")


def check_margin_extremes(smallest: object, largest: object, check, name: str) -> None:
    """A vector of per-sample (or per-class) margins, held to the scalar margin's check ``check(value,
    name)`` through its smallest and largest entries (every range here is an interval, so the two
    ends decide; a nan among the entries makes them nan and is refused as such). The message names
    ``name`` and says it is the vector's smallest or largest entry."""
    for which, value in (("smallest", smallest), ("largest", largest)):
        try:
            check(value, name)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (the {which} entry of the per-sample margins {name})") from None
