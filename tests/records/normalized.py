"""Registry records: normface, cosface, am_softmax, arcface, combined_margin (each _loss and _logits).

derivations/03-normface.md, 04-cosface-am-softmax.md, 05-arcface-combined.md; family properties in
tests/test_normalized.py.

The strategy controls the target angle directly: it draws theta_y, then builds x_i at that angle from
its class weight. Drawn angles keep ANGLE_GAP away from the poles (theta = 0, pi: cone points where
ArcFace has no derivative) and from every jump of psi (ArcFace's pi - m, the easy margin's pi/2,
the combined margin's theta*), because the gradient suites compare against central differences,
which need a neighbourhood where the loss is smooth. Those points themselves are edge cases.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from softmax_common.checks import MAX_MARGIN_MULTIPLIER, MAX_SCALE
from tests import strategies as S
from tests.paths import MARGIN_PATHS
from tests.records.keywords import margin_keywords
from tests.samples import ErrorSample, LossRecord, Sample, config_kwargs
from tests.tolerances import Tol
from torch_port import AMSoftmax, ArcFace, CombinedMargin, CosFace, NormFace
from torch_port.normalized import arcface_config, combined_margin_config, cosface_config, normface_config

# 0.05 rad: far beyond float16 input rounding (which moves an angle by ~1e-3), so a sample rounded
# for the half-precision suites is still on the same side of every jump.
ANGLE_GAP = 0.05
MIN_NORM = 0.5  # 1/|x| enters the gradient; shorter rows would make central differences coarse
MAX_S = 64.0

# The kinds of loss in this family and their keyword hyperparameters.
KINDS = ("normface", "cosface", "am_softmax", "arcface", "combined_margin")


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def scales():
    return S.finite_floats(0.5, MAX_S)


# The range each margin is drawn from (m up to pi/2, m1 up to 3): one table for the scalar and the
# per-sample draws. The kinds whose margins may be a (B,) array, one margin per sample, list them.
MARGIN_RANGES = {
    "cosface": {"m": (0.0, 1.0)},
    "am_softmax": {"m": (0.0, 1.0)},
    "arcface": {"m": (0.0, math.pi / 2)},
    "combined_margin": {"m1": (1.0, 3.0), "m2": (0.0, math.pi / 2), "m3": (0.0, 0.5)},
}
MAX_BATCH = 4


@st.composite
def hyperparameters(draw, kind: str) -> dict:
    """Keyword arguments of one loss, drawn over its whole valid range (m up to pi/2, m1 up to 3)."""
    s = draw(scales())
    if kind == "normface":
        return {"s": s}
    if kind not in MARGIN_RANGES:
        raise ValueError(kind)
    kwargs = {"s": s, **{name: draw(S.finite_floats(*bounds)) for name, bounds in MARGIN_RANGES[kind].items()}}
    if kind == "arcface":
        kwargs["easy_margin"] = draw(st.booleans())
    return kwargs


@st.composite
def per_sample_margins(draw, kind: str, kwargs: dict, batch: int = MAX_BATCH) -> dict:
    """``kwargs`` with, about one time in three, some margins replaced by (batch,) arrays drawn from
    the same range (the scalar's check holds each entry); unchanged for kinds without margins."""
    ranges = MARGIN_RANGES.get(kind, {})
    if not ranges or draw(st.sampled_from(range(3)), label="per-sample margins") < 2:
        return kwargs
    names = list(ranges)
    chosen = [name for name in names if draw(st.booleans())] or names[:1]
    return {**kwargs, **{name: draw(S.float_arrays((batch,), *ranges[name])) for name in chosen}}


def row_kwargs(kwargs: dict, row: int) -> dict:
    """The hyperparameters of one row of the batch: per-sample arrays read at ``row``."""
    return {k: float(v[row]) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


def first_rows(kwargs: dict, batch: int) -> dict:
    """Per-sample arrays cut to the first ``batch`` rows (drawn for MAX_BATCH before the batch was)."""
    return {k: v[:batch] if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


def jumps(kind: str, kwargs: dict, row: int = 0) -> list[float]:
    """Target angles where psi jumps (or switches branch) for these hyperparameters (those of
    ``row`` where a margin is per sample)."""
    kwargs = row_kwargs(kwargs, row)
    if kind == "arcface":
        return [math.pi / 2] if kwargs["easy_margin"] else [math.pi - kwargs["m"]]
    if kind == "combined_margin":
        return [(math.pi - kwargs["m2"]) / kwargs["m1"]]
    return []


def allowed_angle(u: float, avoid: list[float], gap: float = ANGLE_GAP) -> float:
    """Map u in [0, 1] onto [gap, pi - gap] minus the gap-neighbourhoods of ``avoid``, by length."""
    pieces = [(gap, math.pi - gap)]
    for point in avoid:
        cut = []
        for low, high in pieces:
            cut += [(low, min(high, point - gap)), (max(low, point + gap), high)]
        pieces = [(low, high) for low, high in cut if high > low]
    total = sum(high - low for low, high in pieces)
    walk = u * total
    for low, high in pieces:
        if walk <= high - low:
            return low + walk
        walk -= high - low
    return pieces[-1][1]


def unit_rows(raw: np.ndarray) -> np.ndarray:
    """Rows of ``raw`` normalised; rows too short to have a direction become basis vectors."""
    rows = raw.copy()
    for j, row in enumerate(rows):
        if np.linalg.norm(row) < 0.1:
            rows[j] = np.eye(rows.shape[1])[j % rows.shape[1]]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def orthogonal_unit(w_hat: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """A unit vector orthogonal to the unit vector w_hat, from ``raw`` (a basis vector if ``raw`` is
    too close to w_hat's line). D >= 2."""
    v = raw - (raw @ w_hat) * w_hat
    if np.linalg.norm(v) < 0.1:
        e = np.eye(len(w_hat))[np.argmin(np.abs(w_hat))]  # |w_hat_k| <= 1/sqrt(D): far from w_hat's line
        v = e - (e @ w_hat) * w_hat
    return v / np.linalg.norm(v)


@st.composite
def features_weights_labels(draw, avoid=(), min_classes: int = 1, gap: float = ANGLE_GAP):
    """(x, W, y) with B <= 4, C <= 6, D in 2..4, norms in [0.5, 50] (features) and [0.2, 5]
    (weights), and every target angle theta_y in [gap, pi - gap] at least ``gap`` from each point of
    ``avoid`` (gap = 0: any angle, the poles included). ``avoid`` is a list of angles, or a function
    of the row giving that row's (per-sample margins: each row its own jump).

    Small shapes: the gradient suite's gradcheck costs two evaluations per input element, and the
    properties under test do not depend on size (the edge cases and family tests cover larger C)."""
    batch, classes = draw(S.batch_and_classes(max_batch=MAX_BATCH, min_classes=min_classes, max_classes=6))
    dim = draw(st.integers(2, 4))
    W_hat = unit_rows(draw(S.float_arrays((classes, dim), -1.0, 1.0)))
    W = W_hat * draw(S.float_arrays((classes, 1), 0.2, 5.0))
    y = draw(S.labels(batch, classes))
    u = draw(S.float_arrays((batch,), 0.0, 1.0))
    raw = draw(S.float_arrays((batch, dim), -1.0, 1.0))
    radii = draw(S.float_arrays((batch,), MIN_NORM, 50.0))
    x = np.empty((batch, dim))
    for i in range(batch):
        theta = allowed_angle(float(u[i]), list(avoid(i) if callable(avoid) else avoid), gap)
        w_hat = W_hat[y[i]]
        x[i] = radii[i] * (math.cos(theta) * w_hat + math.sin(theta) * orthogonal_unit(w_hat, raw[i]))
    return x, W, y


@st.composite
def loss_samples(draw, kind: str, with_keywords: bool = True):
    """x, W, y and the hyperparameters, sometimes with per-sample margins (each row kept away from
    its own jump), ignored rows, or ``margin_grad="detached"`` (tests/records/keywords.py); with
    ``with_keywords=False`` none of these."""
    kwargs = draw(hyperparameters(kind))
    if with_keywords:
        kwargs = draw(per_sample_margins(kind, kwargs))
    x, W, y = draw(features_weights_labels(lambda row: jumps(kind, kwargs, row)))
    keywords = {}
    if with_keywords:
        y, keywords = draw(margin_keywords(y, detachable=kind != "normface"))
    return Sample({"x": x, "W": W}, {"y": y}, {**first_rows(kwargs, len(y)), **keywords})


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------

# x_i at angle pi - atan(B/256) from W_y = e_1, with integer coordinates (exact in float16 and
# bfloat16): B = 140 puts theta 3.0e-4 below pi - 0.5 (ArcFace's jump at m = 0.5), B = 139 puts it
# 2.4e-3 above; both far beyond float32 rounding of theta (~1e-7).
STRADDLE_X = np.array([[-256.0, 140.0], [-256.0, 139.0], [-256.0, -140.0]])
STRADDLE_W = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
STRADDLE_THETA = (math.pi - math.atan(140 / 256), math.pi - math.atan(139 / 256))


def edge_kwargs(kind: str) -> list[dict]:
    """Hyperparameters the edge cases run with: the defaults, and the extremes of each range."""
    if kind == "normface":
        return [{"s": 16.0}, {"s": 64.0}]
    if kind == "cosface":
        return [{"s": 64.0, "m": 0.35}, {"s": 64.0, "m": 0.0}]
    if kind == "am_softmax":
        return [{"s": 30.0, "m": 0.35}]
    if kind == "arcface":
        return [
            {"s": 64.0, "m": 0.5, "easy_margin": False},
            {"s": 64.0, "m": 0.5, "easy_margin": True},
            # 1.5, not pi/2: with m = pi/2 the jump sits at theta = pi/2, exactly where the cos = 0
            # geometry puts theta, and which side rounding picks is not a property of the loss.
            {"s": 64.0, "m": 1.5, "easy_margin": False},
        ]
    if kind == "combined_margin":
        return [
            {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},
            {"s": 64.0, "m1": 1.35, "m2": 0.2, "m3": 0.1},
            # theta* = (pi - 0.1)/2.5, away from the exact angles above (m1 = 4 would put it at pi/4).
            {"s": 64.0, "m1": 2.5, "m2": 0.1, "m3": 0.2},
        ]
    raise ValueError(kind)


def edge_cases(kind: str) -> list[Sample]:
    """cos = +-1 exactly, cos = 0, zero features, a zero class weight, the jump straddled, ties, C = 1,
    B = 1, D = 1, s = 64 with features of 3e4, features of norm 1e-2 (1/|x| = 100 in the gradient,
    which still fits float16)."""
    W = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.0]])
    y = np.array([0, 1, 2, 0])
    zero_row_W = W * [[1.0], [0.0], [1.0]]
    parallel = np.array([2.0 * W[0], 0.5 * W[1], 4.0 * W[2], 3.0 * W[0]])
    geometries = [
        ({"x": parallel, "W": W}, y, "cos theta_y = +1 exactly (x parallel to W_y)", {}),
        ({"x": -parallel, "W": W}, y, "cos theta_y = -1 exactly (x antiparallel to W_y)", {}),
        (
            {"x": np.array([[0.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, 1.0, 0.0], [0.0, -3.0, 2.0]]), "W": W},
            y,
            "cos theta_y = 0 exactly (the easy margin's switch)",
            {},
        ),
        (
            {"x": np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]]), "W": W},
            y,
            "zero feature rows",
            {},
        ),
        (
            {"x": np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.5, -1.0, 1.0], [2.0, 0.0, -1.0]]), "W": zero_row_W},
            y,
            "a zero class weight, the target of two rows (cos = 0 with it by convention)",
            {},
        ),
        (
            {"x": np.array([[1.0, 256.0], [-1.0, 256.0], [256.0, 1.0]]), "W": STRADDLE_W},
            np.array([0, 0, 1]),
            "theta_y just below and above pi/2",
            {},
        ),
        ({"x": STRADDLE_X, "W": STRADDLE_W}, np.array([0, 0, 0]), "theta_y 3e-4 below and 2.4e-3 above pi - 0.5", {}),
        (
            {
                "x": np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]),
                "W": np.array([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0]]),
            },
            np.array([0, 1, 2]),
            "ties: two identical classes, features equidistant from two classes",
            {},
        ),
        (
            {"x": np.array([[1.0, 2.0], [-3.0, 0.5]]), "W": np.array([[0.3, -0.4]])},
            np.array([0, 0]),
            "one class (C = 1)",
            {},
        ),
        ({"x": np.array([[0.6, 0.8]]), "W": STRADDLE_W}, np.array([1]), "a batch of one (B = 1)", {}),
        (
            {"x": np.array([[2.0], [-1.0], [0.5]]), "W": np.array([[1.0], [-3.0]])},
            np.array([0, 0, 1]),
            "D = 1: every cosine is +-1",
            {},
        ),
        (
            {"x": np.array([[1e4, -2e4, 3e4], [-3e4, 3e4, 0.0], [3e4, 3e4, 3e4], [-1e4, 0.0, 0.0]]), "W": W},
            y,
            "features of 3e4 (their squared norms overflow float16)",
            {},
        ),
        (
            {"x": np.array([[1e-2, 0.0, 0.0], [0.0, -1e-2, 0.0], [1e-2, 1e-2, 1e-2], [0.0, 0.0, 1e-2]]), "W": W},
            y,
            "features of norm ~1e-2",
            {},
        ),
    ]
    out = []
    for kwargs in edge_kwargs(kind):
        for tensors, labels, note, skip in geometries:
            out.append(Sample(tensors, {"y": labels}, kwargs, note=f"{note}; {kwargs}", skip_dtypes=skip))
    if kind == "combined_margin":
        # theta* = (pi - m2)/m1 placed between the two straddling angles, for an m1 != 1.
        m1 = 1.1
        m2 = math.pi - m1 * sum(STRADDLE_THETA) / 2
        kwargs = {"s": 64.0, "m1": m1, "m2": m2, "m3": 0.05}
        out.append(
            Sample(
                {"x": STRADDLE_X, "W": STRADDLE_W},
                {"y": np.array([0, 0, 0])},
                kwargs,
                note=f"theta_y on both sides of theta* = (pi - m2)/m1; {kwargs}",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Error inputs
# ---------------------------------------------------------------------------------------------


def error_inputs(kind: str, with_reduction: bool) -> list[ErrorSample]:
    x, W, y = np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3])
    good = {"x": x, "W": W}

    def bad(kwargs, error, match, labels=y, tensors=good):
        return ErrorSample(Sample(tensors, {"y": labels}, kwargs), error, match)

    out = [
        bad({"s": 0.0}, ValueError, r"\bs\b.*> 0"),
        bad({"s": -1.0}, ValueError, r"\bs\b.*> 0"),
        bad({"s": float("nan")}, ValueError, r"\bs\b"),
        bad({"s": float("inf")}, ValueError, r"\bs\b"),
        bad({"s": "64"}, TypeError, r"\bs\b"),
        # Past MAX_SCALE = 1e4 (softmax_common.checks): the next float, and s = 1e39 (nan in float32).
        bad({"s": math.nextafter(MAX_SCALE, math.inf)}, ValueError, r"\bs\b.*\(0, 10000\]"),
        bad({"s": 1e39}, ValueError, r"\bs\b.*\(0, 10000\]"),
        bad({}, ValueError, r"\by\b.*\[0, 4\)", labels=np.array([0, 4])),
        bad({}, ValueError, r"\by\b.*\[0, 4\), got .*ignore_index=-1", labels=np.array([-2, 0])),
        bad({}, TypeError, r"\by\b.*integer", labels=np.array([0.0, 1.0])),
        bad({}, ValueError, r"\by\b.*shape", labels=np.array([0, 1, 2])),
        bad({}, ValueError, r"\bW\b.*\(C, 3\)", tensors={"x": x, "W": np.ones((4, 2))}),
        bad({}, ValueError, r"\bx\b.*2 dimensions", labels=np.array([0]), tensors={"x": np.ones(3), "W": W}),
        bad({}, ValueError, r"\bW\b.*2 dimensions", tensors={"x": x, "W": np.ones(3)}),
    ]
    if kind in ("cosface", "am_softmax"):
        out += [bad({"m": -0.1}, ValueError, r"\bm\b.*>= 0"), bad({"m": float("nan")}, ValueError, r"\bm\b")]
    if kind == "arcface":
        out += [
            bad({"m": -0.1}, ValueError, r"\bm\b.*\[0\.0, 1\.57"),
            bad({"m": 2.0}, ValueError, r"\bm\b.*\[0\.0, 1\.57"),
            bad({"easy_margin": "yes"}, TypeError, r"\beasy_margin\b.*bool"),
        ]
    if kind == "combined_margin":
        out += [
            bad({"m1": 0.5}, ValueError, r"\bm1\b.*\[1\.0, 16\]"),
            # Past MAX_MARGIN_MULTIPLIER = 16: the next float, and m1 = 1e308 (once a math domain error).
            bad({"m1": math.nextafter(MAX_MARGIN_MULTIPLIER, math.inf)}, ValueError, r"\bm1\b.*\[1\.0, 16\]"),
            bad({"m1": 1e308}, ValueError, r"\bm1\b.*\[1\.0, 16\]"),
            bad({"m2": -0.1}, ValueError, r"\bm2\b.*\[0\.0, 1\.57"),
            bad({"m2": 2.0}, ValueError, r"\bm2\b.*\[0\.0, 1\.57"),
            bad({"m3": -0.1}, ValueError, r"\bm3\b.*>= 0"),
        ]
    out += [
        bad({"ignore_index": 0}, ValueError, r"\bignore_index\b.*negative"),
        bad({"ignore_index": 1.5}, TypeError, r"\bignore_index\b"),
        bad({"ignore_index": None}, ValueError, r"\by\b.*\[0, 4\), got", labels=np.array([-1, 0])),
    ]
    if kind != "normface":
        out.append(bad({"margin_grad": "stopped"}, ValueError, r"\bmargin_grad\b.*exact"))
    if with_reduction:
        out.append(bad({"reduction": "avg"}, ValueError, r"reduction"))
    return out


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


# Logits are s cos(theta) with s up to 64. A float32 cosine (or an angle fed to cos) carries an absolute
# error of a few 1e-8, so in float32 a logit carries ~s * 1e-7 (measured 2.0e-6 at s = 46 for a target
# logit whose true value is -7e-15), and the losses built on them the same. The shared table's atol of
# 2e-6 times max(1, max |value|) is tighter than that when every value is near zero (C = 1, theta near
# pi/2), so the low-precision forward bound is widened to s_max * 3e-7 ~ 2e-5, still relative to scale.
LOW_PRECISION_FORWARD = {("forward", d): Tol(rtol=2e-5, atol=2e-5) for d in ("float32", "bfloat16", "float16")}


# The engine configuration of each kind (a sample's kwargs are the builder's arguments by name; AM-Softmax
# is CosFace's configuration with its own defaults) and its head.
CONFIG_BUILDERS = {
    "normface": normface_config,
    "cosface": cosface_config,
    "am_softmax": cosface_config,
    "arcface": arcface_config,
    "combined_margin": combined_margin_config,
}
HEADS = {
    "normface": NormFace,
    "cosface": CosFace,
    "am_softmax": AMSoftmax,
    "arcface": ArcFace,
    "combined_margin": CombinedMargin,
}
# The contract's defaults (the papers' values, docs/design.md).
DEFAULTS = {
    "normface": {"s": 16.0},
    "cosface": {"s": 64.0, "m": 0.35},
    "am_softmax": {"s": 30.0, "m": 0.35},
    "arcface": {"s": 64.0, "m": 0.5, "easy_margin": False},
    "combined_margin": {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},
}


def _head(kind: str):
    def build(kwargs: dict, num_classes: int, dim: int, **options):
        return HEADS[kind](num_classes, dim, **kwargs, **options)

    return build


def _records(kind: str) -> list[LossRecord]:
    common = dict(
        samples=loss_samples(kind),
        base_samples=loss_samples(kind, with_keywords=False),
        edge_cases=lambda: edge_cases(kind),
        tolerances=LOW_PRECISION_FORWARD,
    )
    return [
        LossRecord(
            name=f"{kind}_loss",
            reference=getattr(refimpl, f"{kind}_loss"),
            port=getattr(tpf, f"{kind}_loss"),
            error_inputs=lambda: error_inputs(kind, with_reduction=True),
            paths=MARGIN_PATHS,
            config=lambda kwargs: CONFIG_BUILDERS[kind](**config_kwargs(kwargs)),
            head=_head(kind),
            defaults=DEFAULTS[kind],
            **common,
        ),
        LossRecord(
            name=f"{kind}_logits",
            reference=getattr(refimpl, f"{kind}_logits"),
            port=getattr(tpf, f"{kind}_logits"),
            error_inputs=lambda: error_inputs(kind, with_reduction=False),
            reductions=(),
            **common,
        ),
    ]


RECORDS: list[LossRecord] = [record for kind in KINDS for record in _records(kind)]
