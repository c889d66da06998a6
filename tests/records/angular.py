"""Registry records: cos_m_theta, lsoftmax_psi, lsoftmax_loss/_logits, sphereface_loss/_logits.

derivations/06-lsoftmax.md and 07-sphereface.md; family properties in tests/test_angular.py.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import refimpl
import refimpl.geometry as refimpl_geometry
import torch_port.functional as tpf
from softmax_common.checks import MAX_MARGIN_MULTIPLIER
from tests import strategies as S
from tests.paths import MARGIN_PATHS
from tests.records.keywords import margin_keywords
from tests.samples import ErrorSample, LossRecord, Sample
from torch_port import LSoftmax, MarginSchedule, SphereFace
from torch_port.angular import lsoftmax_config, sphereface_config
from torch_port.margins import with_margin_grad

# Feature and weight entries are drawn in [-BOUND, BOUND] with D <= 4, so |W_j||x| <= 36 and the
# logits stay within +-36 (2m - 1) <= 400: wide enough to saturate the softmax, small enough that
# central differences (step 1e-6) resolve the gradient in float64.
BOUND = 3.0
MIN_NORM = 0.25  # rows shorter than this are moved away from the origin (1/|x| enters the gradient)
MAX_M = 6  # the papers use m <= 4; gradients at the poles are required up to m = 6


def margins():
    return st.integers(1, MAX_M)


def annealing_weights():
    """beta / lambda: the full margin (0) often, otherwise anything up to well past the crossover."""
    return st.one_of(st.just(0.0), S.finite_floats(0.0, 10.0))


def _away_from_origin(rows: np.ndarray) -> np.ndarray:
    rows = rows.copy()
    short = np.linalg.norm(rows, axis=1) < MIN_NORM
    rows[short, 0] = 1.0
    return rows


@st.composite
def features_weights_labels(draw):
    """(x, W, y): B <= 5 features and C <= 6 classes in D in 2..4, rows away from the origin.

    Small, because properties, not sizes, are under test, and the gradient suite's finite
    differences cost two forward passes per input element.
    """
    batch, classes = draw(S.batch_and_classes(max_batch=5, max_classes=6))
    dim = draw(st.integers(2, 4))
    x = _away_from_origin(draw(S.float_arrays((batch, dim), -BOUND, BOUND)))
    W = _away_from_origin(draw(S.float_arrays((classes, dim), -BOUND, BOUND)))
    return x, W, draw(S.labels(batch, classes))


def off_branch_boundaries(x: np.ndarray, W: np.ndarray, y: np.ndarray, m: int, gap: float = 1e-3) -> bool:
    """True when no target angle is within ``gap`` (in units of pi/m) of an interior k boundary.

    psi is C^1 but its second derivative jumps at theta = k pi/m (0 < k < m), so a central difference
    straddling one is only first-order accurate (it errs by ~h m^2 |W||x|, beyond autograd's 1e-6
    check). The boundaries themselves are edge cases, where the two analytic gradients are compared,
    and tests/test_angular.py checks that the one-sided derivatives meet there.
    """
    u = m * refimpl_geometry.target_angles(x, W, y) / math.pi
    nearest = np.clip(np.round(u), 1, m - 1)
    return m == 1 or bool(np.all(np.abs(u - nearest) > gap))


@st.composite
def _loss_samples(draw, weight_name: str, with_keywords: bool = True):
    x, W, y = draw(features_weights_labels())
    m = draw(margins())
    assume(off_branch_boundaries(x, W, y, m))
    kwargs = {"m": m, weight_name: draw(annealing_weights())}
    keywords = {}
    if with_keywords:  # ignored rows, margin_grad (tests/records/keywords.py)
        y, keywords = draw(margin_keywords(y))
    return Sample({"x": x, "W": W}, {"y": y}, {**kwargs, **keywords})


@st.composite
def _cosine_samples(draw):
    # Kept 1e-3 inside [-1, 1]: a central difference straddling +-1 would see the clip, not the polynomial
    # (the poles themselves are edge cases).
    shape = draw(st.sampled_from([(5,), (2, 3)]))
    c = draw(S.float_arrays(shape, -0.999, 0.999))
    return Sample({"c": c}, kwargs={"m": draw(st.integers(1, 8))})


@st.composite
def _angle_samples(draw):
    shape = draw(st.sampled_from([(5,), (2, 3)]))
    theta = draw(S.float_arrays(shape, 0.0, math.pi))
    m = draw(margins())
    u = m * theta / math.pi  # the interior k boundaries are edge cases (see off_branch_boundaries)
    assume(m == 1 or np.all(np.abs(u - np.clip(np.round(u), 1, m - 1)) > 1e-3))
    return Sample({"theta": theta}, kwargs={"m": m})


def _cosine_edges() -> list[Sample]:
    poles = np.array([1.0, -1.0, 0.0, 1 - 1e-8, -1 + 1e-8, 0.5, -0.5])
    return [Sample({"c": poles}, kwargs={"m": m}, note="poles, centre, near-poles") for m in range(1, 9)]


def _angle_edges() -> list[Sample]:
    out = []
    for m in range(1, MAX_M + 1):
        boundaries = np.arange(m + 1) * math.pi / m  # where k jumps, and both ends
        out.append(Sample({"theta": boundaries}, kwargs={"m": m}, note="every k boundary, 0 and pi"))
        out.append(Sample({"theta": np.array([1e-12, math.pi - 1e-12, 1e-6])}, kwargs={"m": m}, note="near ends"))
    return out


def _multiplier_errors(base: Sample) -> list[ErrorSample]:
    """m past MAX_MARGIN_MULTIPLIER = 16 (softmax_common.checks): 17, and 1e300 (once an OverflowError)."""
    return [
        ErrorSample(Sample(base.tensors, base.labels, {"m": m}), ValueError, r"\bm\b.*\[1, 16\]")
        for m in (MAX_MARGIN_MULTIPLIER + 1, 1e300)
    ]


def _elementwise_errors(name: str, value: np.ndarray) -> list[ErrorSample]:
    return [
        ErrorSample(Sample({name: value}, kwargs={"m": 0}), ValueError, r"\bm\b.*>= 1"),
        ErrorSample(Sample({name: value}, kwargs={"m": 2.5}), ValueError, r"\bm\b.*integer"),
        ErrorSample(Sample({name: value}, kwargs={"m": "4"}), TypeError, r"\bm\b"),
        ErrorSample(Sample({name: value}, kwargs={"m": -3}), ValueError, r"\bm\b"),
        *_multiplier_errors(Sample({name: value})),
    ]


def _loss_edges(weight_name: str) -> list[Sample]:
    """The poles (cos = +-1) for every m, a k boundary, zero, tiny and large features, a zero class
    weight and one shorter than NORM_EPS, D = 1.

    Every case runs in every dtype. Features of 1e4 and, for SphereFace, a zero class weight have
    gradients past float16's 65504 by the mathematics of the loss (~1e5 for W at 1e4; ~1/NORM_EPS
    for a zero row that SphereFace normalises): a float16 input receives them saturated at +-65504
    (torch_port.geometry.upcast), which the shared suite compares with the reference clipped alike.
    """
    W = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.0]])
    y = np.array([0, 1, 2, 0])
    out = []
    for m in range(1, MAX_M + 1):
        parallel = np.array([2.0 * W[0], 0.5 * W[1], 4.0 * W[2], -3.0 * W[0]])  # cos = 1, 1, 1, -1
        out.append(Sample({"x": parallel, "W": W}, {"y": y}, {"m": m, weight_name: 0.0}, f"cos = +-1, m={m}"))
        antiparallel = -parallel
        out.append(Sample({"x": antiparallel, "W": W}, {"y": y}, {"m": m, weight_name: 2.0}, f"cos = -+1, m={m}"))
    on_boundary = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 45 degrees
    extreme = [
        (on_boundary, W, "theta = pi/4 (a k boundary for m = 4)", {}),
        (np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]]), W, "zero features", {}),
        (np.array([[2e3, -2e3, 1e3], [-2e3, 2e3, 0.0], [2e3, 2e3, 2e3], [-2e3, 0.0, 0.0]]), W, "features of 2e3", {}),
        (
            np.array([[1e4, -1e4, 5e3], [-1e4, 1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, 0.0, 0.0]]),
            W,
            "features of 1e4",
            {},
        ),
        (np.array([[1e-3, 0.0, 0.0], [0.0, -1e-3, 0.0], [1e-3, 1e-3, 1e-3], [0.0, 0.0, 1e-3]]), W, "tiny features", {}),
        (
            np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [2.0, 2.0, -1.0], [0.0, 1.0, 0.0]]),
            W * [[1], [0], [1]],
            "W_1 = 0",
            {},
        ),
        (
            np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [2.0, 2.0, -1.0], [0.0, 1.0, 0.0]]),
            np.array([[1.0, 0.0, 0.0], [3e-13, -4e-13, 0.0], [-0.5, 0.5, 1.0]]),
            "0 < |W_1| < NORM_EPS (max(|W_j|, eps) is flat there; in float16 the row rounds to 0)",
            {},
        ),
    ]
    for x, weights, note, skips in extreme:
        for m in (1, 4):
            kwargs = {"m": m, weight_name: 0.0}
            out.append(Sample({"x": x, "W": weights}, {"y": y}, kwargs, note, skip_dtypes=skips))
    line = {"x": np.array([[2.0], [-1.0], [0.5]]), "W": np.array([[1.0], [-3.0]])}
    out.append(Sample(line, {"y": np.array([0, 0, 1])}, {"m": 4, weight_name: 0.0}, "D = 1: every cos is +-1"))
    return out


def _loss_errors(weight_name: str) -> list[ErrorSample]:
    x, W, y = np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3])
    good = {"x": x, "W": W}
    return [
        ErrorSample(Sample(good, {"y": y}, {"m": 0}), ValueError, r"\bm\b.*>= 1"),
        ErrorSample(Sample(good, {"y": y}, {"m": 1.5}), ValueError, r"\bm\b.*integer"),
        ErrorSample(Sample(good, {"y": y}, {"m": None}), TypeError, r"\bm\b"),
        *_multiplier_errors(Sample(good, {"y": y})),
        ErrorSample(Sample(good, {"y": y}, {weight_name: -0.5}), ValueError, rf"\b{weight_name}\b.*>= 0"),
        ErrorSample(Sample(good, {"y": y}, {weight_name: float("nan")}), ValueError, rf"\b{weight_name}\b"),
        ErrorSample(Sample(good, {"y": np.array([0, 4])}), ValueError, r"\by\b.*\[0, 4\)"),
        ErrorSample(Sample(good, {"y": np.array([-2, 0])}), ValueError, r"\by\b.*\[0, 4\), got .*ignore_index=-1"),
        ErrorSample(Sample(good, {"y": np.array([0.0, 1.0])}), TypeError, r"\by\b.*integer"),
        ErrorSample(Sample(good, {"y": np.array([0, 1, 2])}), ValueError, r"\by\b.*shape"),
        ErrorSample(Sample({"x": x, "W": np.ones((4, 2))}, {"y": y}), ValueError, r"\bW\b.*\(C, 3\)"),
        ErrorSample(Sample({"x": np.ones(3), "W": W}, {"y": np.array([0])}), ValueError, r"\bx\b.*2 dimensions"),
    ]


def _with_reduction_error(errors: list[ErrorSample]) -> list[ErrorSample]:
    good = Sample({"x": np.ones((2, 3)), "W": np.ones((4, 3))}, {"y": np.array([0, 3])}, {"reduction": "avg"})
    return [*errors, ErrorSample(good, ValueError, r"reduction")]


CONFIG_BUILDERS = {"lsoftmax": lsoftmax_config, "sphereface": sphereface_config}
HEADS = {"lsoftmax": LSoftmax, "sphereface": SphereFace}


def _head(name: str, weight_name: str):
    """The head with a constant annealing weight: its training loss is the functional loss with those
    hyperparameters (the released schedules change the weight every step)."""

    def build(kwargs: dict, num_classes: int, dim: int, **options):
        schedule = MarginSchedule.constant(kwargs[weight_name])
        keywords = {k: kwargs[k] for k in ("margin_grad", "ignore_index") if k in kwargs}
        return HEADS[name](num_classes, dim, m=kwargs["m"], schedule=schedule, **keywords, **options)

    return build


def _config(name: str, weight_name: str, kwargs: dict):
    """The engine configuration of a sample's hyperparameters (``ignore_index`` is the call's, not
    the configuration's; ``margin_grad`` wraps the target)."""
    config = CONFIG_BUILDERS[name](kwargs["m"], kwargs[weight_name])
    return with_margin_grad(config, kwargs.get("margin_grad", "exact"))


def _loss_records(name: str, weight_name: str) -> list[LossRecord]:
    common = dict(
        samples=_loss_samples(weight_name),
        base_samples=_loss_samples(weight_name, with_keywords=False),
        edge_cases=lambda: _loss_edges(weight_name),
    )
    return [
        LossRecord(
            name=f"{name}_loss",
            reference=getattr(refimpl, f"{name}_loss"),
            port=getattr(tpf, f"{name}_loss"),
            error_inputs=lambda: _with_reduction_error(_loss_errors(weight_name)),
            paths=MARGIN_PATHS,
            config=lambda kwargs: _config(name, weight_name, kwargs),
            head=_head(name, weight_name),
            defaults={"m": 4, weight_name: 0.0},  # the contract's defaults (docs/design.md)
            **common,
        ),
        LossRecord(
            name=f"{name}_logits",
            reference=getattr(refimpl, f"{name}_logits"),
            port=getattr(tpf, f"{name}_logits"),
            error_inputs=lambda: _loss_errors(weight_name),
            reductions=(),
            **common,
        ),
    ]


RECORDS: list[LossRecord] = [
    LossRecord(
        name="cos_m_theta",
        reference=refimpl.cos_m_theta,
        port=tpf.cos_m_theta,
        samples=_cosine_samples(),
        edge_cases=_cosine_edges,
        error_inputs=lambda: _elementwise_errors("c", np.array([0.5, -0.5])),
        reductions=(),
    ),
    LossRecord(
        name="lsoftmax_psi",
        reference=refimpl.lsoftmax_psi,
        port=tpf.lsoftmax_psi,
        samples=_angle_samples(),
        edge_cases=_angle_edges,
        error_inputs=lambda: _elementwise_errors("theta", np.array([0.5, 2.0])),
        reductions=(),
    ),
    *_loss_records("lsoftmax", "beta"),
    *_loss_records("sphereface", "lamb"),
]
