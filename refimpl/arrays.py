"""Array plumbing for the reference: float64 conversion, shape and label checks, reduction.

Inputs may be autograd boxes (when ``autograd.grad`` traces a loss); checks look at the
underlying values with ``getval`` and never change what is traced.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval, isbox

from softmax_common.checks import check_reduction, label_range_message


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


def check_labels(y, batch: int, num_classes: int, name: str = "y", ignore_index: int | None = None) -> np.ndarray:
    """Integer labels of shape (batch,) with every value in [0, num_classes), or equal to
    ``ignore_index`` (a negative integer, already checked, or None) for a row to skip."""
    y = np.asarray(getval(y))
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of class indices, got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {y.shape}")
    kept = y if ignore_index is None else y[y != ignore_index]
    if kept.size and (kept.min() < 0 or kept.max() >= num_classes):
        raise ValueError(label_range_message(name, num_classes, kept.min(), kept.max(), ignore_index))
    return y.astype(np.intp, copy=False)


def split_ignored(y, ignore_index: int | None):
    """(labels, kept) for checked labels: ``kept`` marks the rows whose label is not ``ignore_index``,
    and the ignored rows' labels become 0, a valid index, so that every row can be computed alike
    and the ignored ones masked out at the end (:func:`reduce_kept`)."""
    kept = np.ones(len(y), dtype=bool) if ignore_index is None else np.asarray(y) != ignore_index
    return np.where(kept, y, 0), kept


def check_features_table_labels(x, table, y, table_name: str, ignore_index: int | None = None):
    """Features x (B, D), a per-class table (C, D) (weights W or centers) and labels y (B,), which may
    equal ``ignore_index`` where given.

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
    return x, table, None if y is None else check_labels(y, batch, classes, ignore_index=ignore_index)


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


def reduce_kept(per_sample, kept, reduction: str):
    """:func:`reduce_loss` over the kept rows: the ignored rows give 0 (and no gradient) for "none",
    "mean" divides by the number of kept rows, and a batch with none kept gives 0.0 for "mean" and
    "sum" (nothing to learn from, rather than 0/0)."""
    reduction = check_reduction(reduction)
    masked = anp.where(kept, per_sample, 0.0)
    if reduction == "mean":
        return anp.sum(masked) / max(int(np.count_nonzero(kept)), 1)
    return anp.sum(masked) if reduction == "sum" else masked
