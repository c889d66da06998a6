"""Array plumbing for the reference: float64 conversion, shape and label checks, reduction.

Inputs may be autograd boxes (when ``autograd.grad`` traces a loss); checks look at the
underlying values with ``getval`` and never change what is traced.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval, isbox

from softmax_common.checks import check_reduction


def as_float64(a, name: str):
    """Return ``a`` as a float64 array (boxes pass through untouched)."""
    if isbox(a):
        value = getval(a)
        if np.asarray(value).dtype != np.float64:
            raise TypeError(f"{name} must be float64 inside the reference, got {np.asarray(value).dtype}")
        return a
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def check_ndim(a, name: str, ndim: int | None = None, min_ndim: int = 0):
    shape = np.shape(getval(a))
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {shape}")
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} must not be empty, got shape {shape}")
    return shape


def check_labels(y, batch: int, num_classes: int, name: str = "y") -> np.ndarray:
    """Integer labels of shape (batch,) with every value in [0, num_classes)."""
    y = np.asarray(getval(y))
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of class indices, got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.intp, copy=False)


def check_features_table_labels(x, table, y, table_name: str):
    """Features x (B, D), a per-class table (C, D) (weights W or centers) and labels y (B,).

    Returns x and the table as float64 arrays and the labels as integers (None when y is None).
    """
    x = as_float64(x, "x")
    table = as_float64(table, table_name)
    batch, dim = check_ndim(x, "x", ndim=2)
    classes, width = check_ndim(table, table_name, ndim=2)
    if width != dim:
        raise ValueError(
            f"{table_name} must have shape (C, {dim}) to match x's feature dimension, got {(classes, width)}"
        )
    return x, table, None if y is None else check_labels(y, batch, classes)


def pick(matrix, y):
    """matrix[i, y_i] for each row i: the target column of a (B, C) array."""
    return matrix[np.arange(len(y)), y]


def reduce_loss(per_sample, reduction: str):
    """The one reduction every loss ends with: mean over the batch, sum, or none."""
    reduction = check_reduction(reduction)
    if reduction == "mean":
        return anp.mean(per_sample)
    if reduction == "sum":
        return anp.sum(per_sample)
    return per_sample
