"""Registry records: center_loss, center_update.

derivations/08-center-loss.md; family properties in tests/test_center.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests import strategies as S
from tests.samples import ErrorSample, LossRecord, Sample

BOUND = 10.0  # features and centers; the loss is at most D * BOUND^2 * 2 = 800


@st.composite
def features_labels_centers(draw):
    """(x, y, centers): B <= 6 features in D <= 4, C <= 8 centers; classes are often absent."""
    batch, classes = draw(S.batch_and_classes())
    dim = draw(st.integers(1, 4))
    x = draw(S.float_arrays((batch, dim), -BOUND, BOUND))
    centers = draw(S.float_arrays((classes, dim), -BOUND, BOUND))
    return x, draw(S.labels(batch, classes)), centers


def step_sizes():
    return S.finite_floats(0.0, 1.0).filter(lambda a: a > 0.0)


@st.composite
def _loss_samples(draw):
    x, y, centers = draw(features_labels_centers())
    return Sample({"x": x, "centers": centers}, {"y": y})


@st.composite
def _update_samples(draw):
    x, y, centers = draw(features_labels_centers())
    return Sample({"x": x, "centers": centers}, {"y": y}, {"alpha": draw(step_sizes())})


def _edge_arrays() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    centers = np.array([[0.0, 0.0], [1.0, -1.0], [-2.0, 3.0]])
    big = 1e4
    return [
        (np.array([[big, -big], [-big, big], [big, big]]), np.array([0, 0, 2]), centers, "features of 1e4"),
        (centers[[2, 1, 0, 1]].copy(), np.array([2, 1, 0, 1]), centers, "every feature on its center"),
        (
            np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]),
            np.zeros(4, dtype=np.int64),
            centers,
            "one class only, the others absent",
        ),
        (np.array([[0.5, -0.5]]), np.array([1]), centers, "a batch of one"),
        (np.array([[3.0], [-1.0]]), np.array([0, 0]), np.array([[1e4]]), "one class, D = 1, center at 1e4"),
    ]


def _loss_edges() -> list[Sample]:
    return [Sample({"x": x, "centers": c}, {"y": y}, note=note) for x, y, c, note in _edge_arrays()]


def _update_edges() -> list[Sample]:
    return [
        Sample({"x": x, "centers": c}, {"y": y}, {"alpha": alpha}, note=f"{note}, alpha={alpha}")
        for x, y, c, note in _edge_arrays()
        for alpha in (1.0, 1e-6)
    ]


def _shape_errors(extra: dict) -> list[ErrorSample]:
    x, centers, y = np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3])
    good = {"x": x, "centers": centers}
    return [
        ErrorSample(Sample(good, {"y": np.array([0, 4])}, extra), ValueError, r"\by\b.*\[0, 4\)"),
        ErrorSample(Sample(good, {"y": np.array([-1, 0])}, extra), ValueError, r"\by\b.*\[0, 4\)"),
        ErrorSample(Sample(good, {"y": np.array([0.0, 1.0])}, extra), TypeError, r"\by\b.*integer"),
        ErrorSample(Sample(good, {"y": np.array([0])}, extra), ValueError, r"\by\b.*shape"),
        ErrorSample(
            Sample({"x": x, "centers": np.ones((4, 2))}, {"y": y}, extra), ValueError, r"\bcenters\b.*\(C, 3\)"
        ),
        ErrorSample(Sample({"x": x, "centers": np.ones(3)}, {"y": y}, extra), ValueError, r"\bcenters\b.*2 dimensions"),
        ErrorSample(Sample({"x": np.ones(3), "centers": centers}, {"y": y}, extra), ValueError, r"\bx\b"),
    ]


def _loss_errors() -> list[ErrorSample]:
    good = Sample({"x": np.ones((2, 3)), "centers": np.ones((4, 3))}, {"y": np.array([0, 3])}, {"reduction": "avg"})
    return [*_shape_errors({}), ErrorSample(good, ValueError, r"reduction")]


def _update_errors() -> list[ErrorSample]:
    good = {"x": np.ones((2, 3)), "centers": np.ones((4, 3))}
    y = {"y": np.array([0, 3])}
    return [
        *_shape_errors({"alpha": 0.5}),
        ErrorSample(Sample(good, y, {"alpha": 0.0}), ValueError, r"\balpha\b.*\(0\.0, 1\.0\]"),
        ErrorSample(Sample(good, y, {"alpha": 1.5}), ValueError, r"\balpha\b.*\(0\.0, 1\.0\]"),
        ErrorSample(Sample(good, y, {"alpha": -0.1}), ValueError, r"\balpha\b"),
        ErrorSample(Sample(good, y, {"alpha": float("nan")}), ValueError, r"\balpha\b"),
        ErrorSample(Sample(good, y, {"alpha": "0.5"}), TypeError, r"\balpha\b"),
    ]


RECORDS: list[LossRecord] = [
    LossRecord(
        name="center_loss",
        reference=refimpl.center_loss,
        port=tpf.center_loss,
        samples=_loss_samples(),
        edge_cases=_loss_edges,
        error_inputs=_loss_errors,
    ),
    LossRecord(
        name="center_update",
        reference=refimpl.center_update,
        port=tpf.center_update,
        samples=_update_samples(),
        edge_cases=_update_edges,
        error_inputs=_update_errors,
        reductions=(),
    ),
]
