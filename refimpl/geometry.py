"""Cosines and angles between features and class weights, for the margin losses.

theta_j is the angle between x_i and W_j. Mathematically theta = arccos(clip(cos, -1, 1)) (the
numerics policy, docs/design.md); we evaluate the same function by the half-angle form

    theta = 2 * atan2(|x_hat - w_hat|, |x_hat + w_hat|)

because arccos loses half the digits near cos = +-1 (a cosine of 1 - 1e-16 is an angle of 1.5e-8,
which arccos cannot resolve) and has infinite slope there. Both packages use this form, so they
agree to rounding everywhere, including at the poles. See derivations/05-arcface-combined.md.
"""

from __future__ import annotations

import autograd.numpy as anp

from refimpl.arrays import check_features_table_labels

# Normalisation divides by max(|v|, NORM_EPS): a zero vector maps to zero (cos = 0 with every class).
NORM_EPS = 1e-12


def row_norms(v):
    return anp.sqrt(anp.sum(v * v, axis=-1, keepdims=True))


def normalize_rows(v):
    return v / anp.maximum(row_norms(v), NORM_EPS)


def check_features_weights_labels(x, W, y):
    """Validate (x, W, y) for a margin loss and return them as float64 arrays and integer labels."""
    return check_features_table_labels(x, W, y, "W")


def cosines(x, W):
    """(B, C) matrix of cos theta_ij = <x_i, W_j> / (|x_i| |W_j|)."""
    return anp.dot(normalize_rows(x), normalize_rows(W).T)


def target_angles(x, W, y):
    """(B,) angles theta_{i, y_i} in [0, pi] between each feature and its own class weight."""
    x_hat = normalize_rows(x)
    w_hat = normalize_rows(W)[y]
    gap = anp.sqrt(anp.sum((x_hat - w_hat) ** 2, axis=-1))
    span = anp.sqrt(anp.sum((x_hat + w_hat) ** 2, axis=-1))
    return 2.0 * anp.arctan2(gap, span)


def replace_target(matrix, y, values):
    """The (B, C) matrix with entry (i, y_i) replaced by values[i] (autograd-friendly: no assignment)."""
    onehot = anp.arange(matrix.shape[1])[None, :] == anp.asarray(y)[:, None]
    # broadcast_to first: autograd's vjp of where does not un-broadcast, so a (B, 1) operand would
    # receive a (B, C) gradient and fail in the backward pass.
    return anp.where(onehot, anp.broadcast_to(values[:, None], anp.shape(matrix)), matrix)
