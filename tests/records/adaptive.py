"""Registry records: CurricularFace, AdaFace, MagFace (each _loss and _logits) on every margin path.

derivations/11-curricular-adaface-magface.md; family properties and the stateful heads in
tests/test_adaptive_margins.py.

The strategies build each row from its target angle and its feature norm (as tests/records/
normalized.py does), keeping both a gap away from every point where a transform has a jump or a
kink, because the gradient suite compares with central differences:

- CurricularFace: theta_y + m = pi (the fallback's jump), and the hard-negative comparison
  cos_j > cos(theta_y + m) (a jump in a non-target logit): every non-target cosine stays CURRICULAR_GAP
  away from its row's threshold;
- AdaFace: the norm carries no gradient by design, so central differences (which do move the norm)
  agree with the gradient only where g does not move with the norm: every row's g is saturated at
  +-1 (its norm a gap beyond mu +- (sigma + eps)/h), or its norm is clipped (above 100), or h = 0;
  and theta_y stays away from the angle clip's kinks theta_y - m g = eps, pi - eps. The interior of
  g (norms around norm_mean) is covered by tests/test_adaptive_margins.py, on every path, with the
  gradient checked against autograd and against differences along directions that keep the norm;
- MagFace: the norm stays a relative gap away from the clamp's l_a and u_a (below, inside, above),
  and theta_y away from the easy margin's switch (pi/2) or, without it, from pi - m(a) of its norm.

Samples also draw margin_grad ("detached" about one in three) and ignored rows (label -1, the default
ignore_index; sometimes every row).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refimpl
import torch_port.functional as tpf
from tests import strategies as S
from tests.paths import MARGIN_PATHS
from tests.records.normalized import (
    LOW_PRECISION_FORWARD,
    MIN_NORM,
    allowed_angle,
    orthogonal_unit,
    unit_rows,
)
from tests.samples import ErrorSample, LossRecord, Sample
from torch_port import AdaFace, CurricularFace, MagFace
from torch_port.adaptive import adaface_config, curricularface_config, magface_config

KINDS = ("curricularface", "adaface", "magface")
CURRICULAR_GAP = 0.02  # in cosine: far beyond float16 rounding of a cosine (~1e-3)
ADAFACE_NORM_CLIP = 100.0
NORM_GAP = 0.05  # relative, for MagFace's clamp and AdaFace's saturation of g

# The contract's defaults (/work/shared/DESIGN.md, "Modern margins").
DEFAULTS = {
    "curricularface": {"t": 0.0, "s": 64.0, "m": 0.5},
    "adaface": {"norm_mean": 20.0, "norm_std": 100.0, "s": 64.0, "m": 0.4, "h": 0.333, "eps": 1e-3},
    "magface": {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0, "easy_margin": True},
}


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def hyperparameters(draw, kind: str, loss: bool) -> dict:
    s = draw(S.finite_floats(0.5, 64.0))
    if kind == "curricularface":
        return {"t": draw(S.finite_floats(-1.0, 1.0)), "s": s, "m": draw(S.finite_floats(0.0, math.pi / 2))}
    if kind == "adaface":
        h = draw(st.one_of(st.just(0.0), S.finite_floats(0.3, 1.0)))
        return {
            "norm_mean": draw(S.finite_floats(5.0, 60.0)),
            "norm_std": draw(S.finite_floats(0.5, 15.0)),
            "s": s,
            "m": draw(S.finite_floats(0.0, math.pi / 2)),
            "h": h,
            "eps": draw(st.one_of(st.just(1e-3), S.finite_floats(1e-4, 0.3))),
        }
    if kind == "magface":
        l_a = draw(S.finite_floats(1.0, 20.0))
        l_m = draw(S.finite_floats(0.0, 1.0))
        kwargs = {
            "s": s,
            "l_a": l_a,
            "u_a": l_a + draw(S.finite_floats(5.0, 100.0)),
            "l_m": l_m,
            "u_m": draw(S.finite_floats(l_m, math.pi / 2)),
            "easy_margin": draw(st.booleans()),
        }
        if loss:
            kwargs["lambda_g"] = draw(S.finite_floats(0.0, 50.0))
        return kwargs
    raise ValueError(kind)


def adaface_g(norm: float, kwargs: dict) -> float:
    """AdaFace's g for a feature norm (the contract's formula, in plain Python)."""
    n = min(max(norm, 1e-3), ADAFACE_NORM_CLIP)
    return min(max(kwargs["h"] * (n - kwargs["norm_mean"]) / (kwargs["norm_std"] + kwargs["eps"]), -1.0), 1.0)


def magface_m(norm: float, kwargs: dict) -> float:
    a = min(max(norm, kwargs["l_a"]), kwargs["u_a"])
    return (kwargs["u_m"] - kwargs["l_m"]) / (kwargs["u_a"] - kwargs["l_a"]) * (a - kwargs["l_a"]) + kwargs["l_m"]


def row_norm(kind: str, kwargs: dict, u: float, region: int) -> float:
    """A feature norm in one of the regions where the loss is smooth in it (see the module doc)."""
    if kind == "curricularface":
        return MIN_NORM + u * 49.5
    if kind == "adaface":
        if kwargs["h"] == 0.0:
            return MIN_NORM + u * 80.0  # g = 0 whatever the norm: any norm, around the mean included
        width = (kwargs["norm_std"] + kwargs["eps"]) / kwargs["h"]
        low_top = kwargs["norm_mean"] - (1 + NORM_GAP) * width
        high_bottom = kwargs["norm_mean"] + (1 + NORM_GAP) * width
        if region == 0 and low_top > MIN_NORM:
            return MIN_NORM + u * (low_top - MIN_NORM)  # g = -1
        if region == 1 and high_bottom < 0.95 * ADAFACE_NORM_CLIP:
            return high_bottom + u * (0.95 * ADAFACE_NORM_CLIP - high_bottom)  # g = +1
        return ADAFACE_NORM_CLIP * (1 + NORM_GAP + 2 * u)  # clipped at 100: g constant
    if kind == "magface":
        l_a, u_a = kwargs["l_a"], kwargs["u_a"]
        if region == 0:
            return MIN_NORM + u * ((1 - NORM_GAP) * l_a - MIN_NORM)  # below l_a (l_a >= 1)
        if region == 1:
            return (1 + NORM_GAP) * l_a + u * ((1 - NORM_GAP) * u_a - (1 + NORM_GAP) * l_a)
        return (1 + NORM_GAP) * u_a + u * u_a
    raise ValueError(kind)


def avoided_angles(kind: str, kwargs: dict, norm: float) -> list[float]:
    """Target angles where this row's target has a jump or a kink."""
    if kind == "curricularface":
        return [math.pi - kwargs["m"]]
    if kind == "adaface":
        g, m, eps = adaface_g(norm, kwargs), kwargs["m"], kwargs["eps"]
        return [eps + m * g, math.pi - eps + m * g]
    if kind == "magface":
        return [math.pi / 2] if kwargs["easy_margin"] else [math.pi - magface_m(norm, kwargs)]
    raise ValueError(kind)


def clear_of_hard_negative_threshold(x_row, W, label, m) -> bool:
    """Every non-target cosine of the row is CURRICULAR_GAP away from cos(theta_y + m)."""
    cos = (W @ x_row) / (np.linalg.norm(W, axis=1) * np.linalg.norm(x_row))
    threshold = math.cos(math.acos(min(1.0, max(-1.0, cos[label]))) + m)
    others = np.delete(cos, label)
    return bool(np.all(np.abs(others - threshold) >= CURRICULAR_GAP))


@st.composite
def ignored_rows(draw, y: np.ndarray):
    """(labels, keywords): some rows ignored (label -1, the default ignore_index, which the suites'
    engine calls and the sharded runner rely on; sometimes every row), and margin_grad="detached"
    about one sample in three. Another ignore_index is the error inputs' and the properties' business."""
    kwargs = {}
    if draw(st.integers(0, 2), label="detached") == 2:
        kwargs["margin_grad"] = "detached"
    mode = draw(st.integers(0, 8), label="ignored rows")
    if mode >= 5:
        ignored = np.ones(len(y), dtype=bool) if mode == 8 else draw(hnp.arrays(np.bool_, (len(y),)))
        y = np.where(ignored, -1, y).astype(np.int64)
    return y, kwargs


@st.composite
def loss_samples(draw, kind: str, loss: bool = True, with_keywords: bool = True):
    """(x, W, y) with B <= 4, C <= 6, D in 2..4, weight norms in [0.2, 5], each row built at a target
    angle and a norm clear of the kind's jumps and kinks (module doc), and (``with_keywords``) the
    keywords every margin loss takes: margin_grad and ignored rows."""
    kwargs = draw(hyperparameters(kind, loss))
    batch, classes = draw(S.batch_and_classes(max_batch=4, max_classes=6))
    dim = draw(st.integers(2, 4))
    W_hat = unit_rows(draw(S.float_arrays((classes, dim), -1.0, 1.0)))
    W = W_hat * draw(S.float_arrays((classes, 1), 0.2, 5.0))
    y = draw(S.labels(batch, classes))
    u = draw(S.float_arrays((batch, 2), 0.0, 1.0))
    regions = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, 2)))
    raw = draw(S.float_arrays((batch, dim), -1.0, 1.0))
    x = np.empty((batch, dim))
    for i in range(batch):
        norm = row_norm(kind, kwargs, float(u[i, 1]), int(regions[i]))
        avoid = avoided_angles(kind, kwargs, norm)
        direction = orthogonal_unit(W_hat[y[i]], raw[i])
        for attempt in range(24):  # CurricularFace: walk the angle until no non-target sits at the threshold
            theta = allowed_angle((float(u[i, 0]) + 0.37 * attempt) % 1.0, avoid)
            x[i] = norm * (math.cos(theta) * W_hat[y[i]] + math.sin(theta) * direction)
            if kind != "curricularface" or clear_of_hard_negative_threshold(x[i], W, y[i], kwargs["m"]):
                break
        else:
            assume(False)
    y, keywords = draw(ignored_rows(y)) if with_keywords else (y, {})
    return Sample({"x": x, "W": W}, {"y": y}, {**kwargs, **keywords})


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


def edge_kwargs(kind: str, loss: bool) -> list[dict]:
    if kind == "curricularface":
        detached = {"t": 0.7, "s": 64.0, "m": 0.5, "margin_grad": "detached"}
        return [DEFAULTS[kind], detached, {"t": -1.0, "s": 30.0, "m": 1.5}]
    if kind == "adaface":
        return [
            DEFAULTS[kind],
            # sigma = 0: g = +-1 for every norm off the mean (h / eps = 1000 per unit of norm)
            {"norm_mean": 1.0, "norm_std": 0.0, "s": 64.0, "m": 0.4, "h": 1.0, "eps": 1e-3, "margin_grad": "detached"},
            {"norm_mean": 0.5, "norm_std": 2.0, "s": 64.0, "m": 1.5, "h": 0.333, "eps": 1.0},
        ]
    if kind == "magface":
        out = [dict(DEFAULTS[kind]), {"s": 64.0, "l_a": 0.5, "u_a": 3.0, "l_m": 0.2, "u_m": 1.5, "easy_margin": False}]
        out[1]["margin_grad"] = "detached"
        out.append({"s": 32.0, "l_a": 0.015, "u_a": 2.0, "l_m": 0.0, "u_m": 0.5, "easy_margin": True})
        if loss:
            out[1]["lambda_g"], out[2]["lambda_g"] = 0.0, 2.0
        else:
            out[0].pop("lambda_g")
        return out
    raise ValueError(kind)


def edge_cases(kind: str, loss: bool) -> list[Sample]:
    """cos theta_y = +-1 exactly, zero features, a hard negative, norms at the clamps (MagFace's
    l_a, u_a of the defaults; AdaFace's 1e-3 and 100), every row ignored, a batch of one, norms of
    3e4 and 1e-2."""
    W = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.0]])
    y = np.array([0, 1, 2, 0])
    parallel = np.array([2.0 * W[0], 0.5 * W[1], 4.0 * W[2], 3.0 * W[0]])
    near = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [3.0, 0.0, 4.0]])
    geometries = [
        (parallel, y, "cos theta_y = +1 exactly"),
        (-parallel, y, "cos theta_y = -1 exactly"),
        (np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]]), y, "zero feature rows"),
        # row 3 sits between classes 0 and 2: class 2 is a hard negative at m = 0.5 (cosine 0.41 against
        # the threshold cos(0.93 + 0.5) = 0.14); row 1 is parallel to its class
        (near, y, "features near their class and between classes"),
        (np.array([[10.0, 0.0, 0.0], [0.0, 110.0, 0.0], [1e-3, 0.0, 0.0], [100.0, 0.0, 0.0]]), y, "norms at clamps"),
        (near, np.array([-1, -1, -1, -1]), "every row ignored"),
        (np.array([[0.6, 0.8, 0.0]]), np.array([1]), "a batch of one (B = 1)"),
        (np.array([[1e4, -2e4, 3e4], [-3e4, 3e4, 0.0], [3e4, 3e4, 3e4], [-1e4, 0.0, 0.0]]), y, "features of 3e4"),
        (np.array([[1e-2, 0.0, 0.0], [0.0, -1e-2, 0.0], [1e-2, 1e-2, 1e-2], [0.0, 0.0, 1e-2]]), y, "norms ~1e-2"),
    ]
    return [
        Sample({"x": x, "W": W}, {"y": labels}, kwargs, note=f"{note}; {kwargs}")
        for kwargs in edge_kwargs(kind, loss)
        for x, labels, note in geometries
    ]


# ---------------------------------------------------------------------------------------------
# Error inputs
# ---------------------------------------------------------------------------------------------


def error_inputs(kind: str, loss: bool) -> list[ErrorSample]:
    x, W, y = np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3])
    good = {"x": x, "W": W}

    def bad(kwargs, error, match, labels=y, tensors=good):
        return ErrorSample(Sample(tensors, {"y": labels}, kwargs), error, match)

    out = [
        bad({"s": 0.0}, ValueError, r"\bs\b.*> 0"),
        bad({"s": float("nan")}, ValueError, r"\bs\b"),
        bad({"s": 1e39}, ValueError, r"\bs\b.*\(0, 10000\]"),
        bad({}, ValueError, r"\by\b.*\[0, 4\)", labels=np.array([0, 4])),
        bad({}, ValueError, r"\by\b.*\[0, 4\), got .*ignore_index=-1", labels=np.array([-2, 0])),
        bad({}, ValueError, r"\bW\b.*\(C, 3\)", tensors={"x": x, "W": np.ones((4, 2))}),
        bad({"margin_grad": "stopped"}, ValueError, r"\bmargin_grad\b.*exact"),
        bad({"ignore_index": 0}, ValueError, r"\bignore_index\b.*negative"),
        bad({"ignore_index": 1.5}, TypeError, r"\bignore_index\b"),
        bad({"ignore_index": None}, ValueError, r"\by\b.*\[0, 4\), got", labels=np.array([-1, 0])),
    ]
    if kind == "curricularface":
        out += [
            bad({"t": 1.01}, ValueError, r"\bt\b.*\[-1(\.0)?, 1(\.0)?\]"),
            bad({"t": -1.5}, ValueError, r"\bt\b.*\[-1(\.0)?, 1(\.0)?\]"),
            bad({"t": float("nan")}, ValueError, r"\bt\b"),
            bad({"m": -0.1}, ValueError, r"\bm\b.*\[0\.0, 1\.57"),
            bad({"m": 2.0}, ValueError, r"\bm\b.*\[0\.0, 1\.57"),
        ]
    if kind == "adaface":
        out += [
            bad({"norm_std": -0.5}, ValueError, r"\bnorm_std\b.*>= 0"),
            bad({"norm_mean": float("inf")}, ValueError, r"\bnorm_mean\b"),
            bad({"eps": 0.0}, ValueError, r"\beps\b.*\(0(\.0)?, 1(\.0)?\]"),
            bad({"eps": 1.5}, ValueError, r"\beps\b.*\(0(\.0)?, 1(\.0)?\]"),
            bad({"h": -0.1}, ValueError, r"\bh\b.*>= 0"),
            bad({"m": 2.0}, ValueError, r"\bm\b.*\[0\.0, 1\.57"),
        ]
    if kind == "magface":
        out += [
            bad({"l_a": 110.0}, ValueError, r"\bl_a\b.*< u_a"),
            bad({"l_a": 120.0}, ValueError, r"\bl_a\b.*< u_a"),
            bad({"l_a": 0.0}, ValueError, r"\bl_a\b.*> 0"),
            bad({"l_m": 0.9}, ValueError, r"\bl_m\b.*<= u_m"),
            bad({"u_m": 2.0}, ValueError, r"\bu_m\b.*\[0\.0, 1\.57"),
            bad({"easy_margin": "yes"}, TypeError, r"\beasy_margin\b.*bool"),
        ]
        if loss:
            out.append(bad({"lambda_g": -1.0}, ValueError, r"\blambda_g\b.*>= 0"))
    if loss:
        out.append(bad({"reduction": "avg"}, ValueError, r"reduction"))
    return out


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------

CONFIG_BUILDERS = {"curricularface": curricularface_config, "adaface": adaface_config, "magface": magface_config}
STATISTICS = {"curricularface": ("t",), "adaface": ("norm_mean", "norm_std"), "magface": ()}
HEADS = {"curricularface": CurricularFace, "adaface": AdaFace, "magface": MagFace}


def config(kind: str, kwargs: dict):
    """The engine configuration of a sample's keywords (ignore_index is the call's, not the config's)."""
    return CONFIG_BUILDERS[kind](**{k: v for k, v in kwargs.items() if k != "ignore_index"})


def _head(kind: str):
    """The head at a sample's hyperparameters, its statistics set to the sample's (t; norm_mean,
    norm_std) and held there (momentum 0), so that every forward is the functional loss at those
    values: the shared suites compare heads with functions. How the statistics move is
    tests/test_adaptive_margins.py's (with the heads' own momentum)."""

    def build(kwargs: dict, num_classes: int, dim: int, **options):
        hyper = {k: v for k, v in kwargs.items() if k not in STATISTICS[kind]}
        if STATISTICS[kind]:
            hyper["momentum"] = 0.0
        with warnings.catch_warnings():
            # drawn hyperparameters may put lambda_g below MagFace's bound: the head says so, by
            # design (tests/test_adaptive_margins.py checks that warning); not this builder's business
            warnings.filterwarnings("ignore", message="MagFace lambda_g=", category=UserWarning)
            head = HEADS[kind](num_classes, dim, **hyper, **options)
        for name in STATISTICS[kind]:
            getattr(head.statistics, name).fill_(kwargs.get(name, DEFAULTS[kind][name]))
        return head

    return build


def _records(kind: str) -> list[LossRecord]:
    common = dict(tolerances=LOW_PRECISION_FORWARD)
    return [
        LossRecord(
            name=f"{kind}_loss",
            reference=getattr(refimpl, f"{kind}_loss"),
            port=getattr(tpf, f"{kind}_loss"),
            samples=loss_samples(kind, loss=True),
            edge_cases=lambda: edge_cases(kind, loss=True),
            error_inputs=lambda: error_inputs(kind, loss=True),
            paths=MARGIN_PATHS,
            config=lambda kwargs: config(kind, kwargs),
            head=_head(kind),
            defaults=DEFAULTS[kind],
            base_samples=loss_samples(kind, loss=True, with_keywords=False),
            **common,
        ),
        LossRecord(
            name=f"{kind}_logits",
            reference=getattr(refimpl, f"{kind}_logits"),
            port=getattr(tpf, f"{kind}_logits"),
            samples=loss_samples(kind, loss=False),
            edge_cases=lambda: edge_cases(kind, loss=False),
            error_inputs=lambda: error_inputs(kind, loss=False),
            reductions=(),
            base_samples=loss_samples(kind, loss=False, with_keywords=False),
            **common,
        ),
    ]


RECORDS: list[LossRecord] = [record for kind in KINDS for record in _records(kind)]
