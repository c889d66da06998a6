"""Registry records: subcenter_arcface_loss and subcenter_arcface_logits (issue 15, "Modern margins").

derivations/10-subcenter-and-per-sample-margins.md; family properties in tests/test_modern_margins.py.

W is (C k, D), rows j k .. j k + k - 1 class j's; a class's cosine is the largest of its rows'. The
maximum has no derivative where two rows tie, so the strategy keeps, for every (sample, class)
pair, the best and second-best sub-centre cosines SUBCENTER_GAP apart (central differences need a
neighbourhood where the arg-max does not change), and the target angle (to the target class's
arg-max row) ANGLE_GAP away from the poles and from ArcFace's jump (pi - m, or pi/2 with the easy
margin), as tests/records/normalized.py does for ArcFace. Ties, poles and zero rows are edge cases.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests import strategies as S
from tests.paths import MARGIN_PATHS
from tests.records.keywords import margin_keywords
from tests.records.normalized import ANGLE_GAP, LOW_PRECISION_FORWARD, MIN_NORM, jumps, scales, unit_rows
from tests.samples import ErrorSample, LossRecord, Sample, config_kwargs
from torch_port import SubCenterArcFace
from torch_port.margins import subcenter_arcface_config

# 0.02 in cosine: far beyond a central difference's step (1e-6) and float16 rounding of the inputs
# (~1e-3 in a cosine), so the arg-max is the same at every point the suites evaluate.
SUBCENTER_GAP = 0.02
MAX_K = 3
DEFAULTS = {"s": 64.0, "m": 0.5, "k": 3, "easy_margin": False}  # shared/DESIGN.md, "Modern margins"


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def pooled(x: np.ndarray, W: np.ndarray, k: int) -> np.ndarray:
    """(B, C, k) cosines of each sample with each class's sub-centres (NumPy, for the strategy)."""
    return (_unit(x) @ _unit(W).T).reshape(x.shape[0], -1, k)


def well_separated(x: np.ndarray, W: np.ndarray, y: np.ndarray, kwargs: dict, gap: float = ANGLE_GAP) -> bool:
    """Every (sample, class): best and second-best sub-centre cosines SUBCENTER_GAP apart; every
    target angle (to its class's best row) in [gap, pi - gap] and ``gap`` from ArcFace's jump."""
    k = kwargs["k"]
    cos = pooled(x, W, k)
    if k > 1:
        top = np.sort(cos, axis=2)
        if np.any(top[:, :, -1] - top[:, :, -2] < SUBCENTER_GAP):
            return False
    theta = np.arccos(np.clip(cos.max(axis=2)[np.arange(len(y)), y], -1.0, 1.0))
    points = [0.0, math.pi, *jumps("arcface", kwargs)]
    return all(np.all(np.abs(theta - point) >= gap) for point in points)


@st.composite
def subcenter_hyperparameters(draw) -> dict:
    return {
        "s": draw(scales()),
        "m": draw(S.finite_floats(0.0, math.pi / 2)),
        "k": draw(st.integers(1, MAX_K)),
        "easy_margin": draw(st.booleans()),
    }


@st.composite
def subcenter_samples(draw, with_keywords: bool = True):
    """x (B <= 3), W (C k rows, C <= 4, k <= 3, D in 2..4), y, the hyperparameters, and sometimes
    ignored rows or margin_grad="detached". Each x_i is drawn at an angle from one of its class's
    sub-centres (so target angles cover (0, pi)); samples whose pooled cosines come too close to a
    tie or a jump are rejected (:func:`well_separated`)."""
    kwargs = draw(subcenter_hyperparameters())
    k = kwargs["k"]
    batch, classes = draw(S.batch_and_classes(max_batch=3, max_classes=4))
    dim = draw(st.integers(2, 4))
    W = unit_rows(draw(S.float_arrays((classes * k, dim), -1.0, 1.0))) * draw(
        S.float_arrays((classes * k, 1), 0.2, 5.0)
    )
    y = draw(S.labels(batch, classes))
    near = draw(S.float_arrays((batch,), 0.0, 1.0))
    angles = draw(S.float_arrays((batch,), ANGLE_GAP, math.pi - ANGLE_GAP))
    raw = draw(S.float_arrays((batch, dim), -1.0, 1.0))
    radii = draw(S.float_arrays((batch,), MIN_NORM, 50.0))
    x = np.empty((batch, dim))
    for i in range(batch):
        w_hat = _unit(W[y[i] * k + min(int(near[i] * k), k - 1)])
        v = raw[i] - (raw[i] @ w_hat) * w_hat
        if np.linalg.norm(v) < 0.1:
            e = np.eye(dim)[np.argmin(np.abs(w_hat))]
            v = e - (e @ w_hat) * w_hat
        x[i] = radii[i] * (math.cos(angles[i]) * w_hat + math.sin(angles[i]) * _unit(v))
    assume(well_separated(x, W, y, kwargs))
    keywords = {}
    if with_keywords:
        y, keywords = draw(margin_keywords(y))
    return Sample({"x": x, "W": W}, {"y": y}, {**kwargs, **keywords})


def edge_cases() -> list[Sample]:
    """The poles (x on a sub-centre of its class: cos = 1; x opposite every row of its class: cos =
    -1), zero feature rows, a zero sub-centre, tied sub-centres (a duplicated row: the max's
    gradient goes to one of them, the lowest index in both packages), k = 1, one class, a batch of
    one, features of 3e4, every row ignored."""
    # C = 3 classes, k = 2 sub-centres, D = 3.
    W = np.array(
        [
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 2.0],
            [-1.0, 1.0, 0.0],
            [0.5, -0.5, 1.0],
            [-1.0, -1.0, -1.0],
        ]
    )
    y = np.array([0, 1, 2, 0])
    on_subcentre = np.array([3.0 * W[1], 0.5 * W[2], 2.0 * W[5], 4.0 * W[0]])  # cos_y = 1 (rows 1, 2, 5, 0)
    # -(e1 + e2) has cos -1/sqrt2 with class 0's rows; against class 0 = {e1, e2} no x is opposite
    # both, so the antipodal pole uses a class whose two rows coincide in direction.
    W_pole = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    tied = W.copy()
    tied[1] = 3.0 * tied[0]  # class 0's two rows point the same way
    zero_row = W.copy()
    zero_row[3] = 0.0
    geometries = [
        ({"x": on_subcentre, "W": W}, y, 2, "cos theta_y = +1 (x on one sub-centre of its class)"),
        (
            {"x": np.array([[-1.0, 0.0, 0.0], [0.0, -2.0, 0.0], [-3.0, 0.0, 0.0]]), "W": W_pole},
            np.array([0, 1, 0]),
            2,
            "cos theta_y = -1 (x opposite every sub-centre of its class)",
        ),
        (
            {"x": np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]]), "W": W},
            y,
            2,
            "zero feature rows",
        ),
        (
            {"x": np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.5, -1.0, 1.0], [2.0, 0.0, -1.0]]), "W": zero_row},
            y,
            2,
            "a zero sub-centre (cos = 0 with it by convention)",
        ),
        (
            {"x": np.array([[1.0, 0.2, 0.1], [0.3, 1.0, 0.0], [-1.0, 0.5, 1.0], [0.9, -0.3, 0.2]]), "W": tied},
            y,
            2,
            "two sub-centres of class 0 in the same direction (a tie in the max)",
        ),
        (
            {"x": np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.5, -1.0, 1.0], [2.0, 0.0, -1.0]]), "W": W},
            np.array([0, 3, 4, 5]),
            1,
            "k = 1: six classes of one row (ArcFace)",
        ),
        (
            {"x": np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0]]), "W": W},
            np.array([0, 0]),
            6,
            "one class of six sub-centres (C = 1)",
        ),
        ({"x": np.array([[0.6, 0.8, 0.0]]), "W": W}, np.array([1]), 2, "a batch of one (B = 1)"),
        (
            {"x": np.array([[1e4, -2e4, 3e4], [-3e4, 3e4, 0.0], [3e4, 3e4, 3e4], [-1e4, 0.0, 0.0]]), "W": W},
            y,
            2,
            "features of 3e4 (their squared norms overflow float16)",
        ),
        (
            {"x": np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.5, -1.0, 1.0], [2.0, 0.0, -1.0]]), "W": W},
            np.array([-1, -1, -1, -1]),
            2,
            "every row ignored (a loss of 0, zero gradients)",
        ),
    ]
    out = []
    for kwargs in ({"s": 64.0, "m": 0.5, "easy_margin": False}, {"s": 64.0, "m": 0.5, "easy_margin": True}):
        for tensors, labels, k, note in geometries:
            full = {**kwargs, "k": k}
            out.append(Sample(tensors, {"y": labels}, full, note=f"{note}; {full}"))
    return out


def error_inputs(with_reduction: bool) -> list[ErrorSample]:
    x, W, y = np.ones((2, 3)), np.ones((6, 3)), np.array([0, 2])
    good = {"x": x, "W": W}

    def bad(kwargs, error, match, labels=y, tensors=good):
        return ErrorSample(Sample(tensors, {"y": labels}, {"k": 2, **kwargs}), error, match)

    out = [
        bad({"k": 4}, ValueError, r"\bW\b.*multiple of k = 4"),
        bad({"k": 0}, ValueError, r"\bk\b.*integer >= 1"),
        bad({"k": -2}, ValueError, r"\bk\b.*integer >= 1"),
        bad({"k": 1.5}, ValueError, r"\bk\b.*integer >= 1"),
        bad({"k": "3"}, TypeError, r"\bk\b.*integer"),
        bad({"k": True}, TypeError, r"\bk\b.*integer"),
        bad({"m": -0.1}, ValueError, r"\bm\b.*\[0\.0, 1\.57"),
        bad({"m": 2.0}, ValueError, r"\bm\b.*\[0\.0, 1\.57"),
        bad({"m": float("nan")}, ValueError, r"\bm\b"),
        bad({"s": 0.0}, ValueError, r"\bs\b.*> 0"),
        bad({"s": float("inf")}, ValueError, r"\bs\b"),
        bad({"easy_margin": "yes"}, TypeError, r"\beasy_margin\b.*bool"),
        # C = 6 rows / k = 2 = 3 classes: a label of 3 names a row, not a class.
        bad({}, ValueError, r"\by\b.*\[0, 3\)", labels=np.array([0, 3])),
        bad({}, ValueError, r"\by\b.*\[0, 3\), got .*ignore_index=-1", labels=np.array([-2, 0])),
        bad({}, TypeError, r"\by\b.*integer", labels=np.array([0.0, 1.0])),
        bad({}, ValueError, r"\bW\b.*\(C, 3\)", tensors={"x": x, "W": np.ones((6, 2))}),
        bad({"ignore_index": 0}, ValueError, r"\bignore_index\b.*negative"),
        bad({"margin_grad": "stopped"}, ValueError, r"\bmargin_grad\b.*exact"),
    ]
    if with_reduction:
        out.append(bad({"reduction": "avg"}, ValueError, r"reduction"))
    return out


def _config(kwargs: dict):
    """The configuration of a sample's hyperparameters (the contract's defaults for those not given)."""
    return subcenter_arcface_config(**{**DEFAULTS, **config_kwargs(kwargs)})


def _head(kwargs: dict, num_classes: int, dim: int, **options):
    """``num_classes`` is C, the classes (the head's weight has C k rows)."""
    return SubCenterArcFace(num_classes, dim, **kwargs, **options)


RECORDS: list[LossRecord] = [
    LossRecord(
        name="subcenter_arcface_loss",
        reference=refimpl.subcenter_arcface_loss,
        port=tpf.subcenter_arcface_loss,
        samples=subcenter_samples(),
        base_samples=subcenter_samples(with_keywords=False),
        edge_cases=edge_cases,
        error_inputs=lambda: error_inputs(with_reduction=True),
        tolerances=LOW_PRECISION_FORWARD,
        paths=MARGIN_PATHS,
        config=_config,
        head=_head,
        defaults=DEFAULTS,
    ),
    LossRecord(
        name="subcenter_arcface_logits",
        reference=refimpl.subcenter_arcface_logits,
        port=tpf.subcenter_arcface_logits,
        samples=subcenter_samples(),
        base_samples=subcenter_samples(with_keywords=False),
        edge_cases=edge_cases,
        error_inputs=lambda: error_inputs(with_reduction=False),
        tolerances=LOW_PRECISION_FORWARD,
        reductions=(),
    ),
]
