"""Cosines and angles between features and class weights, for the margin losses.

theta_j is the angle between x_i and W_j. Mathematically theta = arccos(clip(cos, -1, 1)) (the
numerics policy, docs/design.md); we evaluate the same function by the half-angle form

    theta = 2 * atan2(|x_hat - w_hat|, |x_hat + w_hat|)

because arccos loses half the digits near cos = +-1 (a cosine of 1 - 1e-16 is an angle of 1.5e-8,
which arccos cannot resolve) and has infinite slope there. Both packages use this form, so they
agree to rounding everywhere, including at the poles. See derivations/05-arcface-combined.md. (It
is arccos(cos) only for unit vectors; a row shorter than NORM_EPS takes arccos itself.)

Norms are p |v / p| with p a power of two near the row's largest entry (:func:`scaled_rows`), so
that no square overflows or underflows, and have derivative 0 at a zero vector (:func:`length`),
as in torch.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from refimpl.arrays import check_features_table_labels

# Normalisation divides by max(|v|, NORM_EPS): a zero vector maps to zero (cos = 0 with every class).
NORM_EPS = 1e-12


def length(v):
    """|v| along the last axis, with derivative 0 at v = 0.

    sqrt has an infinite slope at 0, and autograd would multiply it by the zero derivative of the
    sum of squares: 0 * inf = nan. The double where takes sqrt of a harmless 1 there, so neither
    branch's derivative is infinite, and gives 0 as torch gives the norm of a zero vector: the
    cone points of theta (x along or against its class weight) and a zero row get a finite
    gradient, the port's convention (derivations/05-arcface-combined.md).
    """
    squares = anp.sum(v * v, axis=-1)
    positive = squares > 0
    return anp.where(positive, anp.sqrt(anp.where(positive, squares, 1.0)), 0.0)


def scaled_rows(v):
    """(v / p, p) with p the power of two at or below the largest |v_ik| of each row, as a column.

    |v| = p |v / p|, and the entries of v / p lie in (-2, 2) with one of them at least 1 in size, so
    their squares neither overflow (|v| up to float64's largest value, not just 1e154) nor underflow
    (subnormal rows keep their digits). Dividing by a power of two is exact, so for every other row
    the result has the same bits as sqrt(sum v^2). p is a constant to autograd (getval): the norm is
    homogeneous, so its derivative is the same whatever p is.
    """
    peak = np.max(np.abs(getval(v)), axis=-1, keepdims=True)
    power = np.ldexp(1.0, np.frexp(peak)[1] - 1)  # peak = f 2^e with f in [1/2, 1): p = 2^(e - 1)
    return v / power, power


def row_norms(v):
    """|v_i| for each row, as a column (B, 1), by the scaled route of :func:`scaled_rows`."""
    scaled, peak = scaled_rows(v)
    return peak * length(scaled)[..., None]


def normalize_rows(v):
    """v_i / max(|v_i|, NORM_EPS) for each row: the unit vector (v_i / p) / |v_i / p| where |v_i| >=
    NORM_EPS, and v_i / NORM_EPS below (a zero row stays zero).

    Written in the scaled rows of :func:`scaled_rows`, so that neither the value nor its derivative
    forms |v|^2 (which overflows past 1e154 and underflows below 1e-154); the inner where gives the
    short rows' unselected branch a harmless divisor.
    """
    scaled, peak = scaled_rows(v)
    size = length(scaled)[..., None]
    long = getval(peak * size) >= NORM_EPS
    return anp.where(long, scaled / anp.where(long, size, 1.0), v / NORM_EPS)


def check_features_weights_labels(x, W, y, ignore_index=None):
    """Validate (x, W, y) for a margin loss and return them as float64 arrays and integer labels
    (labels equal to ``ignore_index``, a checked negative integer or None, pass)."""
    return check_features_table_labels(x, W, y, "W", ignore_index)


def cosines(x, W):
    """(B, C) matrix of cos theta_ij = <x_i, W_j> / (|x_i| |W_j|)."""
    return anp.dot(normalize_rows(x), normalize_rows(W).T)


def target_angles(x, W, y):
    """(B,) angles theta_{i, y_i} in [0, pi] between each feature and its own class weight.

    theta = arccos(clip(cos, -1, 1)) (the numerics policy), by the half-angle form where both rows
    are at least NORM_EPS long (their normalised vectors are unit), and by arccos where one is
    shorter (it normalises to v / eps, shorter than 1, and the half-angle form would measure the
    angle between x and W rather than take the arccos of their cosine); there |cos| < 1, and the
    double where keeps arccos's infinite slope at +-1 out of the other rows' derivative.
    """
    x_hat = normalize_rows(x)
    w_hat = normalize_rows(W)[y]
    half_angle = 2.0 * anp.arctan2(length(x_hat - w_hat), length(x_hat + w_hat))
    unit = (getval(row_norms(x))[:, 0] >= NORM_EPS) & (getval(row_norms(W))[y, 0] >= NORM_EPS)
    short_cos = anp.where(unit, 0.0, anp.clip(anp.sum(x_hat * w_hat, axis=-1), -1.0, 1.0))
    return anp.where(unit, half_angle, anp.arccos(short_cos))


def replace_target(matrix, y, values):
    """The (B, C) matrix with entry (i, y_i) replaced by values[i] (autograd-friendly: no assignment)."""
    onehot = anp.arange(matrix.shape[1])[None, :] == anp.asarray(y)[:, None]
    # broadcast_to first: autograd's vjp of where does not un-broadcast, so a (B, 1) operand would
    # receive a (B, C) gradient and fail in the backward pass.
    return anp.where(onehot, anp.broadcast_to(values[:, None], anp.shape(matrix)), matrix)
