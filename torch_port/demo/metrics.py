"""What the table measures of the held-out features (angles, the directions of the classes), and a metric's
mean and range over several runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def unit_vectors(v: np.ndarray) -> np.ndarray:
    """The rows of ``v`` scaled to unit length (a zero row stays zero)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def angle_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Angle between the rows of ``a`` and ``b``, in degrees.

    .. math:: \angle(a, b) = 2 \operatorname{atan2}(\|\hat a - \hat b\|, \|\hat a + \hat b\|),
        \qquad \hat v = v / \max(\|v\|, 10^{-12})

    The half-angle form stays accurate for nearly parallel vectors, where arccos of the dot product
    loses half the digits (and returns exactly 0 below about 1e-8 rad).

    Args:
        a, b: arrays of shape (..., D) that broadcast against each other.

    Returns:
        The angles in [0, 180], shape (...), float64.
    """
    a, b = unit_vectors(np.asarray(a, dtype=np.float64)), unit_vectors(np.asarray(b, dtype=np.float64))
    return np.degrees(2.0 * np.arctan2(np.linalg.norm(a - b, axis=-1), np.linalg.norm(a + b, axis=-1)))


@dataclass(frozen=True)
class Geometry:
    """Class directions of a set of features: ``centers[k]`` is the unit mean direction of class
    ``classes[k]`` (the mean of the unit features, normalised)."""

    classes: np.ndarray
    centers: np.ndarray
    intra_class_angle_deg: float
    min_center_angle_deg: float


def class_geometry(features: np.ndarray, labels: np.ndarray) -> Geometry:
    r"""Mean intra-class angle and minimum angle between class centres, in degrees.

    .. math::
        \mu_k = \mathrm{normalize}\Big(\sum_{i: y_i = k} \hat x_i\Big), \qquad
        \text{intra} = \frac{1}{N} \sum_i \angle(x_i, \mu_{y_i}), \qquad
        \text{gap} = \min_{k \ne l} \angle(\mu_k, \mu_l)

    Only directions count: each feature is normalised before the class mean is taken, so a long
    feature (softmax grows them) does not outweigh a short one.

    Args:
        features: (N, D) held-out features. labels: (N,) their integer classes.

    Returns:
        :class:`Geometry` with the classes present, their unit mean directions, the mean
        intra-class angle, and the minimum angle between centres (nan with fewer than two classes).
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    units = unit_vectors(features)
    classes = np.unique(labels)
    centers = unit_vectors(np.stack([units[labels == k].mean(axis=0) for k in classes]))
    center_of = centers[np.searchsorted(classes, labels)]
    intra = float(angle_degrees(units, center_of).mean())
    i, j = np.triu_indices(len(classes), k=1)
    min_gap = float(angle_degrees(centers[i], centers[j]).min()) if len(i) else math.nan
    return Geometry(classes, centers, intra, min_gap)


@dataclass(frozen=True)
class Spread:
    """One metric of one loss over several runs (seeds, rotations): the mean and the range (``low`` to ``high``)."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The arithmetic mean (correctly rounded, :func:`statistics.fmean`), minimum and maximum."""
        return cls(statistics.fmean(values), min(values), max(values))

    def cell(self) -> str:
        """``mean (min-max)`` to one decimal, as the Markdown table shows it: ``95.5 (95.1-96.2)``."""
        return f"{self.mean:.1f} ({self.low:.1f}-{self.high:.1f})"
