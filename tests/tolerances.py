"""Every tolerance of the tests: per-dtype tables and the named comparators.

Against the float64 reference (the shared suites, the family tests): ``FORWARD`` and ``GRADIENT``,
one table per dtype, overridable per record, compared by ``assert_close``. ``dtype`` here is the
dtype of the inputs given to the port. The port computes float16 and bfloat16 inputs in float32, so
their rows are float32's: the suites compare the port against the float64 reference evaluated at
the *same rounded inputs*, so input rounding is not charged to the loss. A comparison passes when
|port - reference| <= atol * scale + rtol * |reference| elementwise, where scale = max(1, max
|reference|) keeps absolute slack proportional to the size of the values.

Path against path (chunked or sharded against plain, sharded against the single-process engine):
``PATH_AGREEMENT``; ``for_rounded_gradient`` for a gradient that reaches a half-precision input.

A path other than the plain one, in float32 or half precision, against the float64 truth:
``assert_no_farther_than_plain`` (within the table of the truth, or no farther from it than a small
multiple of the plain float32 path's own error, plus ``float32_noise_floor``). A gradient reaching a
half-precision input is rounded once to that dtype on every path (the chunked and sharded paths
add their partial gradients in float32 before the cast, as the plain path does), so no path gets
more slack than that rounding.
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


# ---------------------------------------------------------------------------------------------
# Path against path: the same engine, the same arithmetic in another order (chunks, ranks)
# ---------------------------------------------------------------------------------------------

# A chunked or sharded result against the plain path (or the single-process engine) at the same
# inputs: float64 to 1e-10; float32 (and half inputs, computed in float32) to 1e-5, both relative to
# each element and to the compared tensor's largest element (at least 1).
PATH_AGREEMENT = {
    "float64": Tol(rtol=1e-10, atol=1e-10),
    "float32": Tol(rtol=1e-5, atol=1e-5),
    "bfloat16": Tol(rtol=1e-5, atol=1e-5),
    "float16": Tol(rtol=1e-5, atol=1e-5),
}

HALF_EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}  # torch.finfo(dtype).eps


def for_rounded_gradient(tol: Tol, dtype: str) -> Tol:
    """``tol`` widened for a gradient that reaches a half-precision input: it is rounded to that
    dtype on the way out, so two routes may differ by one unit in its last place."""
    eps = HALF_EPS.get(dtype)
    return tol if eps is None else Tol(rtol=max(tol.rtol, eps), atol=max(tol.atol, eps))


FLOAT32_EPS = 2.0**-23
# How many times the plain float32 path's own error another path may be off the truth.
PLAIN_ERROR_FACTOR = 4


def noise_floor(config, x, W, upstream: float, wrt: str, eps: float, ulps: float) -> float:
    """``ulps`` units of ``eps`` of the largest intermediate the gradient w.r.t. ``wrt`` ("x" or "W")
    is a difference of: the logit scale s (times max |x_i| and max |W_j| where the engine
    configuration keeps the norms), times the total upstream weight on the per-sample losses, over
    the smallest nonzero row norm of ``wrt`` (normalising a row divides its gradient by its norm).
    config: a ``MarginConfig`` (its ``scale``, ``feature_norm``, ``weight_norm``); x, W: arrays."""
    x = np.asarray(x, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    size = 1.0 if config.scale is None else abs(float(config.scale))
    if config.feature_norm and x.size:
        size *= float(np.linalg.norm(x, axis=1).max())
    if config.weight_norm and W.size:
        size *= float(np.linalg.norm(W, axis=1).max())
    norms = np.linalg.norm({"x": x, "W": W}[wrt], axis=1)
    nonzero = norms[norms > 0]
    smallest = float(nonzero.min()) if nonzero.size else 1.0
    return ulps * eps * size * upstream / min(1.0, smallest)


def float32_noise_floor(config, x, W, upstream: float, wrt: str) -> float:
    """16 float32 ulps of the problem's largest intermediate (:func:`noise_floor`).

    A gradient that is exactly 0 in truth (D = 1: a loss of x / |x| is flat in x) comes out as
    rounding noise of that size on any float32 route; the plain path may land on 0 by the luck of
    its roundings, so "no farther than the plain path" alone would demand the impossible there."""
    return noise_floor(config, x, W, upstream, wrt, FLOAT32_EPS, 16)


def assert_no_farther_than_plain(actual, plain, truth, tol: Tol, floor: float = 0.0, what: str = "") -> None:
    """The rule for a path other than the plain one, in float32 (or half inputs computed in float32):
    elementwise, |actual - truth| <= tol.atol * max(1, max |truth|) + tol.rtol * |truth|
    + PLAIN_ERROR_FACTOR * max |plain - truth| + floor.

    That is: within ``tol`` of the float64 truth, or no farther from it than a small multiple of the
    plain float32 path's own error (where the exact value cancels to ~0, e.g. dx of a loss flat in x,
    no float32 route gets a relative error of 1e-5), plus the float32 noise floor of the problem's
    intermediates (:func:`float32_noise_floor`; 0 for values, whose intermediates the scale covers).
    """
    actual = np.asarray(actual, dtype=np.float64)
    plain = np.asarray(plain, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    assert actual.shape == plain.shape == truth.shape, f"{what}: shapes {actual.shape}, {plain.shape}, {truth.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    scale = max(1.0, float(np.max(np.abs(truth)))) if truth.size else 1.0
    plain_error = float(np.max(np.abs(plain - truth))) if truth.size else 0.0
    bound = tol.atol * scale + tol.rtol * np.abs(truth) + PLAIN_ERROR_FACTOR * plain_error + floor
    err = np.abs(actual - truth)
    bad = ~(err <= bound)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements farther from the float64 truth than allowed; worst "
            f"at {tuple(int(i) for i in worst)}: got {actual[worst]!r}, truth {truth[worst]!r}, plain path "
            f"{plain[worst]!r} (plain's largest error {plain_error:.3g}, floor {floor:.3g})"
        )
