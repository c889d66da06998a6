"""Family properties of NormFace, CosFace/AM-Softmax, ArcFace and the combined margin.

The shared suites (tests/test_shared_suites.py, over tests/records/normalized.py) check that the
reference and the port agree in values and gradients, on random and on degenerate inputs. Here each
property is checked against a route independent of both: a closed form (the chain rule through
theta, the regular simplex), mpmath at 50 digits, central differences, another loss (the identities
between the family's members), or the paper's number (8.27 for CASIA-WebFace). Properties of the
math run on both implementations in float64; properties of the port (heads, autocast,
torch.compile, the state a failed call leaves) run on the port alone.
"""

from __future__ import annotations

import math
import sys

import autograd
import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import refimpl
import refimpl.normalized as refimpl_normalized
import torch_port.functional as tpf
from softmax_common.closed_forms import GAP_PEAK_ANGLE, arcface_fallback_gap, combined_margin_gap
from tests import strategies as S
from tests.records.normalized import KINDS, features_weights_labels, hyperparameters, jumps, unit_rows
from tests.tolerances import Tol, assert_close
from torch_port import AMSoftmax, ArcFace, CombinedMargin, CosFace, NormFace

EPS = float(np.finfo(np.float64).eps)
IMPLS = ["refimpl", "torch_port"]
MARGIN_KINDS = [kind for kind in KINDS if kind != "normface"]  # the family's records with a margin
FLOAT64_CLOSE = Tol(rtol=1e-12, atol=1e-12)


def call(impl: str, name: str, x, W, y=None, dtype=torch.float64, **kwargs) -> np.ndarray:
    """``name`` from one implementation on NumPy inputs; the result as float64 NumPy."""
    if impl == "refimpl":
        args = (x, W) if y is None else (x, W, y)
        return np.asarray(getattr(refimpl, name)(*args, **kwargs), dtype=np.float64)
    args = [torch.as_tensor(x, dtype=dtype), torch.as_tensor(W, dtype=dtype)]
    if y is not None:
        args.append(torch.as_tensor(y))
    return getattr(tpf, name)(*args, **kwargs).double().numpy()


def target_entries(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    return logits[np.arange(len(y)), y]


@st.composite
def kind_and_sample(draw, kinds=KINDS, gap=0.0):
    """A loss kind, its hyperparameters, and (x, W, y) with target angles anywhere in [0, pi] (gap = 0),
    or at least ``gap`` from the poles and from psi's jumps."""
    kind = draw(st.sampled_from(kinds))
    kwargs = draw(hyperparameters(kind))
    x, W, y = draw(features_weights_labels(jumps(kind, kwargs) if gap else [], gap=gap))
    return kind, kwargs, x, W, y


# ---------------------------------------------------------------------------------------------
# The target logit: below s cos theta, non-increasing in theta
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(case=kind_and_sample(MARGIN_KINDS))
def test_the_margin_never_helps(impl, case):
    """psi(theta) <= cos theta: every margin logit is at most NormFace's; the others are NormFace's."""
    kind, kwargs, x, W, y = case
    margin = call(impl, f"{kind}_logits", x, W, y, **kwargs)
    plain = call(impl, "normface_logits", x, W, y, s=kwargs["s"])
    assert np.all(target_entries(margin, y) <= target_entries(plain, y) + 4 * EPS * kwargs["s"])
    off_target = np.ones_like(plain, dtype=bool)
    off_target[np.arange(len(y)), y] = False
    assert_close(margin[off_target], plain[off_target], FLOAT64_CLOSE, "non-target logits")


def angle_grid(special: list[float]) -> np.ndarray:
    """721 angles over [0, pi] (both ends exact) plus each special angle and its 1e-9 / 1e-6 neighbours."""
    extra = [a + d for a in special for d in (-1e-6, -1e-9, 0.0, 1e-9, 1e-6) if 0.0 <= a + d <= math.pi]
    return np.unique(np.concatenate([np.linspace(0.0, math.pi, 721), extra]))


def target_logit_curve(impl: str, kind: str, kwargs: dict, theta: np.ndarray) -> np.ndarray:
    """The target logit of one class (W = e1) for features at the given angles."""
    x = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    y = np.zeros(len(theta), dtype=np.int64)
    return call(impl, f"{kind}_logits", x, np.array([[1.0, 0.0]]), y, **kwargs)[:, 0]


@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.data())
def test_target_logit_is_non_increasing_in_theta(impl, data):
    """On [0, pi], through the poles and every jump; the easy margin is the documented exception: it
    is non-increasing on each side of pi/2 and jumps up there by s sin m."""
    kind = data.draw(st.sampled_from(MARGIN_KINDS), label="kind")
    kwargs = data.draw(hyperparameters(kind), label="kwargs")
    if kind == "combined_margin":  # the extension's claims hold for any m1 >= 1; look past m1 = 3 too
        kwargs["m1"] = data.draw(S.finite_floats(1.0, 8.0), label="m1")
    theta = angle_grid([*jumps(kind, kwargs), math.pi / 2])
    curve = target_logit_curve(impl, kind, kwargs, theta)
    slack = 4 * EPS * kwargs["s"]
    if kind == "arcface" and kwargs["easy_margin"]:
        below, above = theta < math.pi / 2, theta > math.pi / 2
        assert np.all(np.diff(curve[below]) <= slack) and np.all(np.diff(curve[above]) <= slack)
        m, s = kwargs["m"], kwargs["s"]
        # Just below pi/2 the margin applies: s cos(pi/2 + m) = -s sin m; just above it does not: ~0.
        up = curve[above][0] - curve[below][-1]
        assert abs(up - s * math.sin(m)) <= 1e-5 * s
    else:
        assert np.all(np.diff(curve) <= slack), np.max(np.diff(curve))


@pytest.mark.parametrize("impl", IMPLS)
@given(m=S.finite_floats(0.0, math.pi / 2), s=S.finite_floats(0.5, 64.0))
def test_arcface_jumps_down_at_pi_minus_m(impl, m, s):
    """Just below pi - m the target is s cos(pi) = -s; just above it is s(cos theta - m sin m): a drop
    of s (cos m + m sin m - 1) >= 0 (insightface's th/mm rule)."""
    theta = np.array([math.pi - m - 1e-9, math.pi - m + 1e-9])
    theta = theta[(theta >= 0) & (theta <= math.pi)]
    curve = target_logit_curve(impl, "arcface", {"s": s, "m": m}, theta)
    if len(theta) == 2:
        drop = curve[0] - curve[1]
        assert abs(drop - s * (math.cos(m) + m * math.sin(m) - 1)) <= 1e-7 * s
        assert curve[0] == pytest.approx(-s, abs=1e-7 * s)


@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.data())
def test_loss_is_non_decreasing_in_the_margin(impl, data):
    """CosFace in m >= 0, ArcFace in m in [0, pi/2] (with and without the easy margin), the combined margin in each
    of m1, m2, m3: a larger margin never lowers any sample's loss."""
    kind = data.draw(st.sampled_from(["cosface", "arcface", "arcface-easy", "m1", "m2", "m3"]), label="margin")
    x, W, y = data.draw(features_weights_labels([], gap=0.0), label="xWy")
    s = data.draw(S.finite_floats(0.5, 64.0), label="s")
    if kind == "cosface":
        bounds, name, fixed = (0.0, 2.0), "cosface_loss", {}
        key = "m"
    elif kind.startswith("arcface"):
        bounds, name, fixed, key = (0.0, math.pi / 2), "arcface_loss", {"easy_margin": kind == "arcface-easy"}, "m"
    else:
        name, key = "combined_margin_loss", kind
        fixed = {"m1": 1.0 + data.draw(S.finite_floats(0.0, 2.0)), "m2": data.draw(S.finite_floats(0.0, 1.5))}
        fixed["m3"] = data.draw(S.finite_floats(0.0, 0.5))
        bounds = {"m1": (1.0, 6.0), "m2": (0.0, math.pi / 2), "m3": (0.0, 1.0)}[kind]
    low, high = sorted(data.draw(S.finite_floats(*bounds), label="m") for _ in range(2))
    smaller = call(impl, name, x, W, y, s=s, reduction="none", **{**fixed, key: low})
    larger = call(impl, name, x, W, y, s=s, reduction="none", **{**fixed, key: high})
    assert np.all(smaller <= larger + 8 * EPS * s * (1 + larger)), (smaller, larger)


# ---------------------------------------------------------------------------------------------
# Identities between the family's members, and invariances
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.data(), s=S.finite_floats(0.5, 64.0), m=S.finite_floats(0.0, math.pi / 2))
def test_identities(impl, data, s, m):
    x, W, y = data.draw(features_weights_labels([], gap=0.0), label="xWy")

    def loss(name, **kwargs):
        return call(impl, f"{name}_loss", x, W, y, s=s, reduction="none", **kwargs)

    normface = loss("normface")
    assert_close(loss("cosface", m=0.0), normface, FLOAT64_CLOSE, "CosFace(m=0) = NormFace")
    assert_close(loss("arcface", m=0.0), normface, FLOAT64_CLOSE, "ArcFace(m=0) = NormFace")
    assert_close(loss("arcface", m=0.0, easy_margin=True), normface, FLOAT64_CLOSE, "easy ArcFace(m=0) = NormFace")
    assert_close(loss("combined_margin", m1=1.0, m2=0.0, m3=m), loss("cosface", m=m), FLOAT64_CLOSE, "(1,0,m)")
    assert_close(loss("combined_margin", m1=1.0, m2=m, m3=0.0), loss("arcface", m=m), FLOAT64_CLOSE, "(1,m,0)")
    assert np.array_equal(loss("am_softmax", m=m), loss("cosface", m=m)), "AM-Softmax and CosFace: one formula"


def test_combined_gap_is_arcface_fallback_at_m1_one():
    """The extension's gap equals insightface's m sin m to the last bit when m1 = 1, and its parts
    behave as derivations/05 states: >= 1 - cos(Delta) (the jump goes down), non-decreasing in Delta."""
    for m in np.linspace(0.0, math.pi / 2, 201):
        assert combined_margin_gap(1.0, float(m)) == arcface_fallback_gap(float(m))
    m1 = 1.0 + np.concatenate([np.linspace(0.0, 4.0, 1001), np.logspace(0.61, 4, 200)])
    deltas = math.pi * (m1 - 1.0) / m1  # m2 = 0; Delta grows with m1 towards pi
    gaps = np.array([combined_margin_gap(float(a), 0.0) for a in m1])
    assert np.all(np.diff(deltas) > 0) and np.all(np.diff(gaps) >= 0)
    assert np.all(gaps >= 1 - np.cos(deltas) - 2 * EPS)
    assert np.all(gaps[deltas <= math.pi / 2] == (deltas * np.sin(deltas))[deltas <= math.pi / 2])
    # GAP_PEAK_ANGLE is where Delta sin Delta peaks: its derivative sin D + D cos D vanishes there.
    assert abs(math.sin(GAP_PEAK_ANGLE) + GAP_PEAK_ANGLE * math.cos(GAP_PEAK_ANGLE)) < 1e-15


def test_the_two_routes_to_the_fallback_gaps_agree():
    """The port's gaps (softmax_common.closed_forms, written in Delta) and the reference's own
    (refimpl.normalized, written in theta* with the peak angle found by bisection) agree to rounding
    over the whole hyperparameter range; the two peak angles agree to the last bits."""
    assert abs(refimpl_normalized.PEAK_ANGLE - GAP_PEAK_ANGLE) < 4 * EPS
    for m in np.linspace(0.0, math.pi / 2, 101):
        assert abs(refimpl_normalized.arcface_gap(float(m)) - arcface_fallback_gap(float(m))) <= 4 * EPS
    for m1 in np.concatenate([np.linspace(1.0, 4.0, 61), [8.0, 100.0]]):
        for m2 in np.linspace(0.0, math.pi / 2, 21):
            ours = refimpl_normalized.combined_gap(float(m1), float(m2))
            theirs = combined_margin_gap(float(m1), float(m2))
            assert abs(ours - theirs) <= 16 * EPS * max(1.0, abs(theirs)), (m1, m2, ours, theirs)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=kind_and_sample(gap=1e-3), data=st.data())
def test_invariances(impl, case, data):
    """Positive rescaling of the rows of x or W, and permuting classes together with the labels,
    leave every sample's loss unchanged."""
    kind, kwargs, x, W, y = case
    loss = call(impl, f"{kind}_loss", x, W, y, reduction="none", **kwargs)
    row_scale = data.draw(S.float_arrays((len(x), 1), 1e-2, 1e2), label="x row scales")
    class_scale = data.draw(S.float_arrays((len(W), 1), 1e-2, 1e2), label="W row scales")
    perm = np.asarray(data.draw(st.permutations(range(len(W))), label="class permutation"))
    inverse = np.argsort(perm)
    tol = Tol(rtol=1e-10, atol=1e-12)
    assert_close(call(impl, f"{kind}_loss", x * row_scale, W, y, reduction="none", **kwargs), loss, tol, "x rows")
    assert_close(call(impl, f"{kind}_loss", x, W * class_scale, y, reduction="none", **kwargs), loss, tol, "W rows")
    # Class j moves to position inverse[j]: W_perm[inverse[j]] = W[j], so label y becomes inverse[y].
    permuted = call(impl, f"{kind}_loss", x, W[perm], inverse[y], reduction="none", **kwargs)
    assert_close(permuted, loss, tol, "classes permuted with the labels")


# ---------------------------------------------------------------------------------------------
# NormFace lower bound
# ---------------------------------------------------------------------------------------------


def exact_normface_bound(n: int, s: float) -> mpmath.mpf:
    with mpmath.workdps(50):
        n_, s_ = mpmath.mpf(n), mpmath.mpf(s)  # s is a float: mpf(s) is its exact value
        return mpmath.log1p((n_ - 1) * mpmath.exp(-n_ * s_ / (n_ - 1)))


def relative_error(got: float, exact: mpmath.mpf) -> float:
    with mpmath.workdps(50):
        return float(abs((mpmath.mpf(got) - exact) / exact))


BOUND_RTOL = 4e-16  # ~2 ulp: the one rounding of exp, of log1p and of the final sum


def test_normface_lower_bound_to_full_precision_on_a_grid():
    worst = 0.0
    for n in (2, 3, 4, 10, 100, 10575, 123457, 10**6, 10**7):
        for s in np.logspace(-3, 4, 241):
            exact = exact_normface_bound(n, float(s))
            if exact < sys.float_info.min:
                assert refimpl.normface_lower_bound(n, float(s)) < sys.float_info.min
                continue  # subnormal or zero: no relative precision to ask for
            worst = max(worst, relative_error(refimpl.normface_lower_bound(n, float(s)), exact))
    assert worst <= BOUND_RTOL, worst


@given(n=st.integers(2, 10**7), log_s=S.finite_floats(-3.0, 4.0))
def test_normface_lower_bound_to_full_precision(n, log_s):
    s = 10.0**log_s
    exact = exact_normface_bound(n, s)
    got = tpf.normface_lower_bound(n, s)
    assert got == refimpl.normface_lower_bound(n, s)  # one implementation, re-exported by the port
    if exact >= sys.float_info.min:
        assert relative_error(got, exact) <= BOUND_RTOL


def test_normface_lower_bound_casia_webface():
    """NormFace (and the seed article): 10575 classes without a scale cannot go below ~8.27."""
    assert round(refimpl.normface_lower_bound(10575, 1.0), 2) == 8.27


@given(
    n=st.integers(2, 10**6),
    low=S.finite_floats(1e-3, 1e3),
    ratio=S.finite_floats(1e-6, 10.0),
    extra=st.integers(1, 100),
)
def test_normface_lower_bound_falls_with_s_and_rises_with_n(n, low, ratio, extra):
    # s grows by a relative 1e-6 at least, so the change is far above the bound's own ~1e-16 rounding.
    high = low * (1 + ratio)
    assert refimpl.normface_lower_bound(n, low) >= refimpl.normface_lower_bound(n, high)
    assert refimpl.normface_lower_bound(n, low) <= refimpl.normface_lower_bound(n + extra, low)


def regular_simplex(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors in R^dim (dim >= n - 1) with every pairwise cosine -1/(n-1), randomly rotated."""
    centred = np.eye(n) - 1.0 / n  # the standard basis, centred: a simplex in the plane sum = 0
    _, _, vt = np.linalg.svd(centred)
    coords = centred @ vt[: n - 1].T  # coordinates in that (n-1)-dimensional plane
    coords /= np.linalg.norm(coords, axis=1, keepdims=True)
    embedded = np.zeros((n, dim))
    embedded[:, : n - 1] = coords
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return embedded @ rotation


def features_at_their_weights(impl: str, W: np.ndarray, s: float) -> float:
    """Mean NormFace loss when each class's feature is its own (unit) weight."""
    return float(call(impl, "normface_loss", W, W, np.arange(len(W)), s=s))


@pytest.mark.parametrize("impl", IMPLS)
@given(n=st.integers(2, 12), dim=st.integers(1, 8), s=S.finite_floats(0.1, 64.0), data=st.data())
def test_normface_bound_holds_for_any_class_vectors(impl, n, dim, s, data):
    """n <= dim + 1 and n > dim + 1 alike: the bound needs no room in the space."""
    W = unit_rows(data.draw(S.float_arrays((n, dim), -1.0, 1.0), label="W"))
    bound = refimpl.normface_lower_bound(n, s)
    assert features_at_their_weights(impl, W, s) >= bound * (1 - 1e-12) - 1e-13


@pytest.mark.parametrize("impl", IMPLS)
@given(n=st.integers(2, 10), extra_dims=st.integers(0, 3), s=S.finite_floats(0.1, 64.0), seed=st.integers(0, 2**32 - 1))
def test_normface_bound_is_attained_by_a_regular_simplex(impl, n, extra_dims, s, seed):
    W = regular_simplex(n, n - 1 + extra_dims, np.random.default_rng(seed))
    assert_close(features_at_their_weights(impl, W, s), refimpl.normface_lower_bound(n, s), FLOAT64_CLOSE)


# ---------------------------------------------------------------------------------------------
# CosFace scale bound
# ---------------------------------------------------------------------------------------------


def own_class_posteriors(impl: str, W: np.ndarray, s: float) -> np.ndarray:
    """p_i = softmax(s cos theta_i.)_i with each class's feature at its own weight (no margin)."""
    logits = call(impl, "normface_logits", W, W, s=s)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return np.diag(probs)


@pytest.mark.parametrize("impl", IMPLS)
@given(C=st.integers(2, 40), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_cosface_min_scale_reaches_p_on_the_simplex(impl, C, data, seed):
    """CosFace's assumption: features at their class weights. The regular simplex is the best such
    configuration; at s = cosface_min_scale(C, p) every class's posterior is p (to rounding)."""
    p = data.draw(S.finite_floats(1.0 / C + 1e-3, 1.0 - 1e-6), label="p")
    s = refimpl.cosface_min_scale(C, p)
    assert s == tpf.cosface_min_scale(C, p)
    W = regular_simplex(C, C - 1, np.random.default_rng(seed))
    assert np.all(own_class_posteriors(impl, W, s) >= p * (1 - 1e-12))


@pytest.mark.parametrize("impl", IMPLS)
@given(C=st.integers(2, 20), dim=st.integers(1, 8), data=st.data())
def test_no_configuration_reaches_p_below_the_min_scale(impl, C, dim, data):
    """For any unit class vectors, some class's posterior is <= the simplex's; so below s_min at
    least one class stays under p."""
    p = data.draw(S.finite_floats(1.0 / C + 1e-2, 1.0 - 1e-6), label="p")
    W = unit_rows(data.draw(S.float_arrays((C, dim), -1.0, 1.0), label="W"))
    s = refimpl.cosface_min_scale(C, p) * (1 - 1e-6)
    assert np.min(own_class_posteriors(impl, W, s)) < p


def test_cosface_min_scale_is_not_positive_for_p_at_most_uniform():
    for C in (2, 10, 1000):
        assert refimpl.cosface_min_scale(C, 1.0 / C) == pytest.approx(0.0, abs=1e-15)
        assert refimpl.cosface_min_scale(C, 0.5 / C) < 0


@pytest.mark.parametrize(
    ("call_bad", "match"),
    [
        (lambda: refimpl.normface_lower_bound(1, 1.0), r"\bn\b.*>= 2"),
        (lambda: refimpl.normface_lower_bound(2.5, 1.0), r"\bn\b.*integer"),
        (lambda: refimpl.normface_lower_bound(10, 0.0), r"\bs\b.*> 0"),
        (lambda: refimpl.cosface_min_scale(1, 0.9), r"\bC\b.*>= 2"),
        (lambda: refimpl.cosface_min_scale(10, 1.0), r"\bp\b.*\(0\.0, 1\.0\)"),
        (lambda: refimpl.cosface_min_scale(10, 0.0), r"\bp\b.*\(0\.0, 1\.0\)"),
    ],
)
def test_bound_arguments_are_checked(call_bad, match):
    with pytest.raises(ValueError, match=match):
        call_bad()


# ---------------------------------------------------------------------------------------------
# Gradients: the exact chain rule through theta, and finite values at the poles
# ---------------------------------------------------------------------------------------------


@given(data=st.data())
def test_angular_margin_gradient_is_the_chain_rule(data):
    """d s psi(theta) / dx = s psi'(theta) / (-sin theta) * d cos theta / dx, with
    d cos / dx = (w^ - cos x^) / |x| and psi' = -m1 sin(m1 theta + m2): the true factor
    sin(m1 theta + m2) m1 / sin(theta), which the port carries through its atan2 angle."""
    kind = data.draw(st.sampled_from(["arcface", "combined_margin"]), label="kind")
    kwargs = data.draw(hyperparameters(kind), label="kwargs")
    if kind == "arcface":
        kwargs["easy_margin"] = False
        m1, m2 = 1.0, kwargs["m"]
    else:
        m1, m2 = kwargs["m1"], kwargs["m2"]
    x, W, y = data.draw(features_weights_labels(jumps(kind, kwargs)), label="xWy")
    xt = torch.tensor(x, requires_grad=True)
    Wt = torch.tensor(W, requires_grad=True)
    logits = getattr(tpf, f"{kind}_logits")(xt, Wt, torch.as_tensor(y), **kwargs)
    gx, gW = torch.autograd.grad(target_entries(logits, y).sum(), (xt, Wt))
    x_norm = np.linalg.norm(x, axis=1, keepdims=True)
    w_norm = np.linalg.norm(W[y], axis=1, keepdims=True)
    x_hat, w_hat = x / x_norm, W[y] / w_norm
    cos = np.sum(x_hat * w_hat, axis=1, keepdims=True)
    theta = np.arccos(np.clip(cos, -1, 1))  # the independent route; the samples keep away from the poles
    primary = m1 * theta + m2 <= math.pi
    factor = np.where(primary, m1 * np.sin(m1 * theta + m2) / np.sin(theta), 1.0)
    expected_x = kwargs["s"] * factor * (w_hat - cos * x_hat) / x_norm
    assert_close(gx.numpy(), expected_x, Tol(rtol=1e-8, atol=1e-10), "d target / dx")
    expected_W = np.zeros_like(W)
    np.add.at(expected_W, y, kwargs["s"] * factor * (x_hat - cos * w_hat) / w_norm)
    assert_close(gW.numpy(), expected_W, Tol(rtol=1e-8, atol=1e-10), "d target / dW")
    # And central differences of the reference's target logit (a third route, no autograd at all).
    h = 1e-6
    i = data.draw(st.integers(0, len(y) - 1), label="row")
    direction = data.draw(S.float_arrays((x.shape[1],), -1.0, 1.0), label="direction")

    def target(x_row):
        moved = x.copy()
        moved[i] = x_row
        return getattr(refimpl, f"{kind}_logits")(moved, W, y, **kwargs)[i, y[i]]

    numeric = (target(x[i] + h * direction) - target(x[i] - h * direction)) / (2 * h)
    assert numeric == pytest.approx(float(gx[i].numpy() @ direction), rel=1e-5, abs=1e-6 * kwargs["s"])


def pole_and_zero_inputs(dtype: torch.dtype):
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.0]], dtype=dtype)
    x = torch.stack([3.0 * W[0], -0.5 * W[1], torch.zeros(3, dtype=dtype), 2.0 * W[2]])  # cos = 1, -1, zero, 1
    return x, W, torch.tensor([0, 1, 2, 2])


HEADS = {
    "NormFace": lambda: NormFace(3, 3),
    "NormFace(learn_scale)": lambda: NormFace(3, 3, s=30.0, learn_scale=True),
    "CosFace": lambda: CosFace(3, 3),
    "AMSoftmax": lambda: AMSoftmax(3, 3),
    "ArcFace": lambda: ArcFace(3, 3),
    "ArcFace(easy)": lambda: ArcFace(3, 3, easy_margin=True),
    "CombinedMargin": lambda: CombinedMargin(3, 3, m1=1.35, m2=0.25, m3=0.1),
}
PRECISIONS = [
    ("float32", torch.float32, None),
    ("autocast-bfloat16", torch.float32, torch.bfloat16),
    ("autocast-float16", torch.float32, torch.float16),
    ("bfloat16-leaves-autocast", torch.bfloat16, torch.bfloat16),
    ("float16-leaves", torch.float16, None),
]


@pytest.mark.parametrize(("precision", "leaf_dtype", "autocast"), PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("head_name", list(HEADS))
def test_gradients_are_finite_at_the_poles_and_for_zero_features(head_name, precision, leaf_dtype, autocast):
    """cos theta_y exactly 1 and -1 and a zero feature, in float32, under autocast and with half
    leaves: a finite loss and finite gradients for x, W and the learned scale. (A float16 leaf gets
    the zero feature's ~s/1e-12 saturated at 65504: derivations/05-arcface-combined.md.)"""
    head = HEADS[head_name]()
    x, W, y = pole_and_zero_inputs(leaf_dtype)
    with torch.no_grad():
        head.weight.copy_(W)
    head.to(leaf_dtype)
    x.requires_grad_(True)
    context = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        loss = head(x, y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, param in [("x", x), *head.named_parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}: {param.grad}"


@pytest.mark.parametrize("kind", ["arcface", "combined_margin"])
def test_pole_gradient_conventions(kind):
    """At theta = 0 the margin logit has no derivative (a cone point); the port's convention is
    dtheta/dx = 0 there, i.e. the gradient of the loss with the target logit held at its value
    s psi(0). At theta = pi the fallback s(cos theta - c) is smooth: its gradient is CosFace's with
    margin c. Both expected values come from the reference (autograd), by another formula."""
    kwargs = {"s": 64.0, "m": 0.5} if kind == "arcface" else {"s": 64.0, "m1": 1.35, "m2": 0.25, "m3": 0.1}
    W = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.0]])
    y = np.array([0, 1, 2])
    at_zero = np.array([3.0 * W[0], 2.0 * W[1], 0.5 * W[2]])
    psi0 = math.cos(kwargs["m"]) if kind == "arcface" else math.cos(kwargs["m2"]) - kwargs["m3"]
    gap = (kwargs["m"] * math.sin(kwargs["m"])) if kind == "arcface" else combined_margin_gap(1.35, 0.25) + 0.1

    def frozen_target_loss(x_):
        logits = refimpl.normface_logits(x_, W, y, s=kwargs["s"])
        onehot = np.eye(3)[y].astype(bool)
        logits = autograd.numpy.where(onehot, kwargs["s"] * psi0, logits)
        return refimpl.cross_entropy(logits, y)

    xt = torch.tensor(at_zero, requires_grad=True)
    getattr(tpf, f"{kind}_loss")(xt, torch.tensor(W), torch.tensor(y), **kwargs).backward()
    assert_close(xt.grad.numpy(), autograd.grad(frozen_target_loss)(at_zero), FLOAT64_CLOSE, "theta = 0")

    at_pi = -at_zero
    xt = torch.tensor(at_pi, requires_grad=True)
    getattr(tpf, f"{kind}_loss")(xt, torch.tensor(W), torch.tensor(y), **kwargs).backward()
    expected = autograd.grad(lambda x_: refimpl.cosface_loss(x_, W, y, s=kwargs["s"], m=gap))(at_pi)
    assert_close(xt.grad.numpy(), expected, FLOAT64_CLOSE, "theta = pi")


def test_float16_inputs_with_a_zero_feature():
    """Float16 leaves: the loss is still right (computed in float32) and the gradients finite; x's
    gradient at the zero row is out of float16's range, as its float32 value (~s/1e-12) shows, and
    arrives saturated at 65504 (tests/test_edges_half_and_poles.py checks every margin loss)."""
    x, W, y = pole_and_zero_inputs(torch.float16)
    x32, W32 = x.float().requires_grad_(True), W.float().requires_grad_(True)
    x.requires_grad_(True)
    W.requires_grad_(True)
    loss16 = tpf.arcface_loss(x, W, y)
    loss32 = tpf.arcface_loss(x32, W32, y)
    assert loss16.dtype == torch.float32 and loss16.item() == loss32.item()
    loss16.backward()
    loss32.backward()
    assert torch.isfinite(W.grad).all() and torch.isfinite(x32.grad).all() and torch.isfinite(x.grad).all()
    assert x32.grad[2].abs().max() > torch.finfo(torch.float16).max  # why float16 leaves cannot hold it
    assert x.grad[2].abs().max() == torch.finfo(torch.float16).max  # so it saturates


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------

HEAD_CASES = [
    (NormFace, "normface", {"s": 16.0}),
    (CosFace, "cosface", {"s": 64.0, "m": 0.35}),
    (AMSoftmax, "am_softmax", {"s": 30.0, "m": 0.35}),
    (ArcFace, "arcface", {"s": 64.0, "m": 0.5, "easy_margin": False}),
    (CombinedMargin, "combined_margin", {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}),
]


@pytest.mark.parametrize(("head_cls", "kind", "defaults"), HEAD_CASES, ids=[c[1] for c in HEAD_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heads_are_their_functional_losses(head_cls, kind, defaults, dtype):
    """forward = the functional loss (the contract's defaults); logits = margin-free s cos theta."""
    torch.manual_seed(0)
    head = head_cls(7, 5, dtype=dtype)
    for key, value in defaults.items():
        assert getattr(head, key) == value, key
    assert head.weight.shape == (7, 5) and head.weight.dtype == dtype
    x, y = torch.randn(6, 5, dtype=dtype), torch.randint(0, 7, (6,))
    expected = getattr(tpf, f"{kind}_loss")(x, head.weight, y, **defaults)
    assert torch.equal(head(x, y), expected)
    assert torch.equal(head.logits(x), tpf.normface_logits(x, head.weight, s=defaults["s"]))
    head_none = head_cls(7, 5, reduction="none", dtype=dtype)
    assert head_none(x, y).shape == (6,)


def test_learnable_scale_stays_positive_and_gets_the_right_gradient():
    torch.manual_seed(0)
    head = NormFace(5, 4, s=10.0, learn_scale=True, dtype=torch.float64)
    assert "log_scale" in dict(head.named_parameters()) and head.s == pytest.approx(10.0, rel=1e-15)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 5, (8,))
    head(x, y).backward()
    # d L / d log s = s dL/ds; dL/ds by central differences of the functional loss (another route).
    W = head.weight.detach()
    h = 1e-6
    dL_ds = (tpf.normface_loss(x, W, y, s=10.0 + h) - tpf.normface_loss(x, W, y, s=10.0 - h)) / (2 * h)
    assert head.log_scale.grad.item() == pytest.approx(10.0 * dL_ds.item(), rel=1e-6)
    # However far an optimiser pushes the parameter, the scale stays positive.
    with torch.no_grad():
        head.log_scale.fill_(-50.0)
    assert head.s > 0 and torch.isfinite(head(x, y))
    state = head.state_dict()
    clone = NormFace(5, 4, learn_scale=True, dtype=torch.float64)
    clone.load_state_dict(state)
    assert clone.s == head.s and torch.equal(clone(x, y), head(x, y))


@pytest.mark.parametrize("head_name", list(HEADS))
def test_a_failed_call_changes_nothing(head_name):
    head = HEADS[head_name]()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.randn(4, 3)
    bad_calls = [
        (lambda: head(x, torch.tensor([0, 1, 2, 3])), ValueError, r"\by\b.*\[0, 3\)"),
        (lambda: head(x, torch.tensor([0.0, 1.0, 2.0, 0.0])), TypeError, r"\by\b.*integer"),
        (lambda: head(x[:, :2], torch.tensor([0, 1, 2, 0])), ValueError, r"^x must have 3 columns, the dim of"),
        (lambda: head(x.double(), torch.tensor([0, 1, 2, 0])), TypeError, r"float64"),
        (lambda: head(x, torch.tensor([0, 1])), ValueError, r"\by\b.*shape"),
    ]
    for bad, error, match in bad_calls:
        with pytest.raises(error, match=match):
            bad().backward()
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in head.parameters())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: NormFace(3, 2, s=0.0), r"\bs\b.*> 0"),
        (lambda: NormFace(3, 2, learn_scale=1), r"\blearn_scale\b.*bool"),
        (lambda: CosFace(3, 2, m=-0.1), r"\bm\b.*>= 0"),
        (lambda: AMSoftmax(3, 2, s=-30.0), r"\bs\b.*> 0"),
        (lambda: ArcFace(3, 2, m=1.6), r"\bm\b.*\[0\.0, 1\.57"),
        (lambda: ArcFace(3, 2, easy_margin="no"), r"\beasy_margin\b"),
        (lambda: CombinedMargin(3, 2, m1=0.9), r"\bm1\b"),
        (lambda: CombinedMargin(3, 2, m2=1.6), r"\bm2\b"),
        (lambda: CombinedMargin(3, 2, m3=-0.2), r"\bm3\b"),
        (lambda: CosFace(0, 2), r"\bnum_classes\b"),
        (lambda: ArcFace(3, 2, reduction="avg"), r"reduction"),
    ],
)
def test_bad_hyperparameters_are_refused(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_a_bad_attribute_fails_the_next_call_before_any_computation():
    head = ArcFace(3, 2)
    head.m = 3.0
    x = torch.randn(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"\bm\b.*\[0\.0, 1\.57"):
        head(x, torch.tensor([0, 1]))
    assert x.grad is None and head.weight.grad is None


def test_functional_refuses_mixed_dtypes():
    x, W, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3), torch.tensor([0, 1])
    for name in ("normface_loss", "cosface_loss", "arcface_loss", "combined_margin_loss", "arcface_logits"):
        with pytest.raises(TypeError, match=r"x: torch\.float64, W: torch\.float32"):
            getattr(tpf, name)(x, W, y)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("head_cls", "kind", "defaults"), HEAD_CASES, ids=[c[1] for c in HEAD_CASES])
def test_heads_under_autocast(head_cls, kind, defaults, autocast_dtype):
    """A mixed-precision model: half features from the backbone, float32 head weights, s = 64 and
    features of norm ~1e3 (their squared norm overflows float16). Cosines and softmax stay in
    float32: the loss and gradients equal the float32 computation on the same (rounded) features."""
    torch.manual_seed(1)
    head = head_cls(10, 16)
    features = (300.0 * torch.randn(5, 16)).to(autocast_dtype).requires_grad_(True)
    y = torch.randint(0, 10, (5,))
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = head(features, y)
    loss.backward()
    grads = (features.grad.clone(), head.weight.grad.clone())
    features.grad, head.weight.grad = None, None
    reference = getattr(tpf, f"{kind}_loss")(features.float(), head.weight, y, **defaults)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    features_32 = features.detach().float().requires_grad_(True)
    weight_32 = head.weight.detach().clone().requires_grad_(True)
    getattr(tpf, f"{kind}_loss")(features_32, weight_32, y, **defaults).backward()
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[0], features_32.grad.to(autocast_dtype))
    torch.testing.assert_close(grads[1], weight_32.grad)


def test_margin_head_under_torch_compile():
    """Once, on CPU with the default backend: the compiled head gives the eager loss and gradients.
    (check_labels reads two numbers back, so dynamo breaks the graph there; the rest compiles.)"""
    torch.manual_seed(0)
    head = CombinedMargin(10, 8, m1=1.2, m2=0.3, m3=0.1)
    x, y = torch.randn(6, 8, requires_grad=True), torch.randint(0, 10, (6,))
    compiled = torch.compile(head)
    loss = compiled(x, y)
    loss.backward()
    grads = (x.grad.clone(), head.weight.grad.clone())
    x.grad, head.weight.grad = None, None
    eager = head(x, y)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for got, expected in zip(grads, (x.grad, head.weight.grad)):
        # Fused float32 kernels round differently: compare against the gradient's own scale.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device-agnostic check)")
@pytest.mark.parametrize(("head_cls", "kind", "defaults"), HEAD_CASES, ids=[c[1] for c in HEAD_CASES])
def test_heads_on_cuda_match_cpu(head_cls, kind, defaults):
    torch.manual_seed(0)
    head = head_cls(50, 32)
    x, y = torch.randn(16, 32), torch.randint(0, 50, (16,))
    cpu_loss = head(x, y)
    gpu = head.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu_loss = gpu(x.cuda(), y.cuda())
    assert gpu_loss.device.type == "cuda" and gpu_loss.dtype == torch.float32
    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-5)
    assert gpu.logits(x.cuda()).shape == (16, 50)
