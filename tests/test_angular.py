"""Family properties of L-Softmax and A-Softmax (SphereFace): psi, the multiple-angle expansion,
the reductions to plain softmax at m = 1, the annealing, the poles, and the heads with their schedule.

The shared suites (tests/test_shared_suites.py) already compare refimpl with the port; every
property here is checked against a route independent of both: numpy's Chebyshev module and
cos(m arccos c), the paper's piecewise definition of psi written out as a loop over its intervals,
logits assembled by hand from numpy's arccos, torch's own F.cross_entropy, finite differences,
and the schedule's closed form. derivations/06-lsoftmax.md and 07-sphereface.md explain the math.
"""

from __future__ import annotations

import math

import autograd
import numpy as np
import numpy.polynomial.chebyshev as cheb
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests import strategies as S
from tests.impls import IMPLS, call, grad_first
from tests.records.angular import annealing_weights, features_weights_labels, margins
from tests.tolerances import Tol, assert_close
from torch_port import LSoftmax, MarginSchedule, SphereFace

EPS = float(np.finfo(np.float64).eps)
# The two losses differ only in which norms multiply the cosines and in the annealing weight's name.
LOSSES = {"lsoftmax": "beta", "sphereface": "lamb"}


def psi_by_intervals(theta: np.ndarray, m: int) -> np.ndarray:
    """The paper's definition read literally: on [k pi/m, (k+1) pi/m], psi = (-1)^k cos(m theta) - 2k."""
    out = np.full(np.shape(theta), np.nan)
    for k in range(m):
        inside = (theta >= k * math.pi / m) & (theta <= (k + 1) * math.pi / m)
        out[inside] = (-1) ** k * np.cos(m * theta[inside]) - 2 * k
    return out


def unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def scales(loss: str, x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """|x_i| |W_j| for L-Softmax, |x_i| for SphereFace, as a (B, C) or (B, 1) array."""
    x_norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x_norm * np.linalg.norm(W, axis=1)[None, :] if loss == "lsoftmax" else x_norm


def logits_by_hand(loss: str, x, W, y, m: int, weight: float) -> np.ndarray:
    """The paper's logits from numpy's arccos and the interval definition of psi (independent of both packages)."""
    cos = unit_rows(x) @ unit_rows(W).T
    rows = np.arange(len(y))
    cos_y = cos[rows, y]
    psi = psi_by_intervals(np.arccos(np.clip(cos_y, -1.0, 1.0)), m)
    cos[rows, y] = (weight * cos_y + psi) / (1.0 + weight)
    return scales(loss, x, W) * cos


def torch_ce(logits: np.ndarray, y: np.ndarray, reduction: str = "none") -> np.ndarray:
    return F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y), reduction=reduction).numpy()


# ---------------------------------------------------------------------------------------------
# cos_m_theta and psi
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(c=S.float_arrays((9,), -1.0, 1.0), m=st.integers(1, 8))
def test_cos_m_theta_is_the_chebyshev_polynomial(impl, c, m):
    c = np.concatenate([c, [-1.0, 1.0, 0.0]])
    basis = [0.0] * m + [1.0]
    tol = Tol(rtol=0.0, atol=2.0**m * 4 * EPS)  # the alternating binomial sum cancels by up to 2^(m-1)
    got = call(impl, "cos_m_theta", c, m=m)
    assert_close(got, cheb.chebval(c, basis), tol, "T_m by numpy's Chebyshev module")
    assert_close(got, np.cos(m * np.arccos(c)), tol, "cos(m arccos c)")
    # Its derivative is the polynomial's, m U_{m-1}(c), finite at the poles: T_m'(+-1) = (+-1)^(m+1) m^2.
    slope = grad_first(impl, "cos_m_theta", c, m=m)
    assert_close(slope, cheb.chebval(c, cheb.chebder(basis)), Tol(rtol=1e-13, atol=2.0**m * 16 * EPS), "T_m'")
    assert slope[-3] == pytest.approx((-1) ** (m + 1) * m * m) and slope[-2] == pytest.approx(m * m)


@pytest.mark.parametrize("impl", IMPLS)
@given(theta=S.float_arrays((12,), 0.0, math.pi), m=margins())
def test_psi_is_the_papers_piecewise_function(impl, theta, m):
    expected = psi_by_intervals(theta, m)
    assert_close(call(impl, "lsoftmax_psi", theta, m=m), expected, Tol(rtol=0.0, atol=8 * m * EPS), "psi")


@pytest.mark.parametrize("impl", IMPLS)
@given(theta=S.float_arrays((16,), 0.0, math.pi), m=margins())
def test_psi_is_monotone_below_cos_and_decreasing_in_m(impl, theta, m):
    """psi(0) = 1, psi(pi) = 1 - 2m, non-increasing on [0, pi], psi <= cos theta, psi_{m+1} <= psi_m."""
    theta = np.sort(np.concatenate([theta, np.arange(m + 1) * math.pi / m]))
    psi = call(impl, "lsoftmax_psi", theta, m=m)
    slack = 8 * m * EPS
    assert psi[0] == 1.0 and abs(psi[-1] - (1 - 2 * m)) <= slack
    assert np.all(np.diff(psi) <= slack)
    assert np.all(psi <= np.cos(theta) + slack)
    assert np.all(call(impl, "lsoftmax_psi", theta, m=m + 1) <= psi + slack)
    if m > 1:  # strictly below cos inside (0, pi): the margin is real
        inside = (theta > 1e-3) & (theta < math.pi - 1e-3)
        assert np.all(psi[inside] < np.cos(theta[inside]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", range(2, 7))
def test_psi_is_continuously_differentiable_across_its_branches(impl, m):
    """At theta = k pi/m the branch k changes: the values meet and both one-sided slopes are 0."""
    for k in range(1, m):
        edge = k * math.pi / m
        delta = 1e-5
        left, at, right = call(impl, "lsoftmax_psi", np.array([edge - delta, edge, edge + delta]), m=m)
        # psi'(edge) = 0 on both sides and |psi''| <= m^2, so each side is within m^2 delta^2 / 2 of psi(edge).
        assert abs(left - at) <= m * m * delta**2 and abs(right - at) <= m * m * delta**2
        assert at == pytest.approx(1 - 2 * k, abs=1e-12)
        slopes = grad_first(impl, "lsoftmax_psi", np.array([edge - delta, edge + delta]), m=m)
        assert np.all(np.abs(slopes) <= 2 * m * m * delta)


# ---------------------------------------------------------------------------------------------
# the losses: m = 1, the paper's formula, the annealing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
@given(sample=features_weights_labels(), weight=annealing_weights())
def test_m_equal_one_is_plain_softmax(impl, loss, sample, weight):
    """m = 1: psi = cos, so L-Softmax is the cross-entropy of W x and SphereFace that of |x| cos theta."""
    x, W, y = sample
    plain = x @ (W if loss == "lsoftmax" else unit_rows(W)).T  # |x| cos theta_j = x . W_j / |W_j|
    kwargs = {"m": 1, LOSSES[loss]: weight}
    tol = Tol(rtol=1e-12, atol=1e-13)
    assert_close(call(impl, f"{loss}_logits", x, W, y, **kwargs), plain, tol, "logits")
    for reduction in ("none", "mean", "sum"):
        got = call(impl, f"{loss}_loss", x, W, y, reduction=reduction, **kwargs)
        assert_close(got, torch_ce(plain, y, reduction), tol, reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
@given(sample=features_weights_labels(), m=margins(), weight=annealing_weights())
def test_loss_is_the_papers_formula(impl, loss, sample, m, weight):
    x, W, y = sample
    expected = logits_by_hand(loss, x, W, y, m, weight)
    kwargs = {"m": m, LOSSES[loss]: weight}
    tol = Tol(rtol=1e-11, atol=1e-12)
    assert_close(call(impl, f"{loss}_logits", x, W, y, **kwargs), expected, tol, "logits")
    assert_close(call(impl, f"{loss}_loss", x, W, y, reduction="none", **kwargs), torch_ce(expected, y), tol, "loss")


@st.composite
def ordered_weights(draw):
    low = draw(S.finite_floats(0.0, 50.0))
    return low, low + draw(S.finite_floats(1e-3, 50.0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
@given(sample=features_weights_labels(), m=margins(), weights=ordered_weights())
def test_annealing_moves_monotonically_from_full_margin_to_none(impl, loss, sample, m, weights):
    """weight = 0: the full margin; weight -> infinity: the margin-free loss; non-increasing in between.

    The target logit (w cos + psi) / (1 + w) grows with w because psi <= cos, and the cross-entropy
    falls as the target logit grows.
    """
    x, W, y = sample
    name = LOSSES[loss]

    def per_sample(weight):
        return call(impl, f"{loss}_loss", x, W, y, m=m, reduction="none", **{name: weight})

    free = torch_ce(logits_by_hand(loss, x, W, y, 1, 0.0), y)
    full = torch_ce(logits_by_hand(loss, x, W, y, m, 0.0), y)
    assert_close(per_sample(0.0), full, Tol(rtol=1e-11, atol=1e-12), "weight 0: full margin")
    # At w = 1e12 the target moves by |S| (cos - psi) / (1 + w) <= 36 * 2m / 1e12 from the margin-free one.
    assert_close(per_sample(1e12), free, Tol(rtol=1e-9, atol=1e-9), "weight 1e12: no margin")
    low, high = weights
    scale = 1e-12 * (1 + np.abs(per_sample(low)))
    assert np.all(per_sample(low) >= per_sample(high) - scale)
    assert np.all(full >= free - 1e-12 * (1 + np.abs(free)))


# ---------------------------------------------------------------------------------------------
# the poles and the port's precision
# ---------------------------------------------------------------------------------------------


def _pole_sample():
    """Features exactly parallel (cos = 1) and antiparallel (cos = -1) to their class weight."""
    W = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 1.0, 1.0]])
    y = np.array([0, 1, 2, 0, 1, 2])
    factors = np.array([2.0, 0.5, 3.0, -1.0, -4.0, -0.25])[:, None]
    return factors * W[y], W, y


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("m", range(1, 7))
def test_gradients_at_the_poles_are_exact_in_float64(loss, m):
    """At cos = +-1 the loss is a polynomial in a smooth cosine, hence differentiable: the port's
    gradient passes torch's finite-difference gradcheck there, and equals the reference's."""
    x, W, y = _pole_sample()
    fn = getattr(tpf, f"{loss}_loss")
    xt = torch.tensor(x, requires_grad=True)
    Wt = torch.tensor(W, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, torch.from_numpy(y), m=m), (xt, Wt))
    ref = autograd.grad(lambda a: getattr(refimpl, f"{loss}_loss")(a, W, y, m=m))(x)
    assert_close(grad_first("torch_port", f"{loss}_loss", x, W, y, m=m), ref, Tol(1e-10, 1e-12), "d/dx")


def _port_loss_and_grads(loss, x, W, y, m, dtype, autocast_dtype=None):
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    Wt = torch.tensor(W, dtype=dtype, requires_grad=True)
    context = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with context:
        out = getattr(tpf, f"{loss}_loss")(xt, Wt, torch.from_numpy(y), m=m)
    gx, gW = torch.autograd.grad(out, (xt, Wt))
    return out, gx, gW


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("m", range(1, 7))
@pytest.mark.parametrize(
    ("dtype", "autocast_dtype"),
    [
        (torch.float32, None),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, None),
        (torch.float16, None),
    ],
    ids=["float32", "autocast-bfloat16", "autocast-float16", "bfloat16", "float16"],
)
def test_gradients_at_the_poles_are_finite_in_low_precision(loss, m, dtype, autocast_dtype):
    """cos = +-1 for m = 1..6: finite values and gradients, close to the float64 reference."""
    x, W, y = _pole_sample()
    out, gx, gW = _port_loss_and_grads(loss, x, W, y, m, dtype, autocast_dtype)
    assert out.dtype == torch.float32
    assert torch.isfinite(out) and torch.isfinite(gx).all() and torch.isfinite(gW).all()
    # The sample is exact in every dtype (dyadic numbers), so the reference sees the same inputs.
    expected = refimpl_value_and_grads(loss, x, W, y, m)
    tol = Tol(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else Tol(rtol=1e-2, atol=1e-2)
    for got, want, what in zip((out, gx, gW), expected, ("loss", "d/dx", "d/dW")):
        assert_close(got.detach().double().numpy(), want, tol, what)


def refimpl_value_and_grads(loss, x, W, y, m):
    fn = getattr(refimpl, f"{loss}_loss")
    return (
        fn(x, W, y, m=m),
        autograd.grad(lambda a: fn(a, W, y, m=m))(x),
        autograd.grad(lambda b: fn(x, b, y, m=m))(W),
    )


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_large_features_and_a_zero_class_weight_stay_finite(loss, dtype):
    """Features of 1e4 (logits near 1e5 at m = 4) and a zero row of W: finite loss and gradients.

    (In float16 the gradients, ~1e5 and ~1/NORM_EPS, arrive saturated at 65504: torch_port.geometry.upcast.)
    """
    W = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.5, 0.5, 1.0]])
    y = np.array([0, 1, 2, 1])
    for x in (np.array([[1e4, -1e4, 5e3], [-1e4, 1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, 0.0, 1.0]]), np.eye(4, 3)):
        for m in (1, 4, 6):
            out, gx, gW = _port_loss_and_grads(loss, x, W, y, m, dtype)
            assert torch.isfinite(out) and torch.isfinite(gx).all() and torch.isfinite(gW).all(), (x, m)


@given(sample=features_weights_labels(), m=margins(), weight=annealing_weights())
@settings(max_examples=20)
def test_float32_port_is_as_close_to_float64_as_its_inputs_allow(sample, m, weight):
    """In float32 the logits stay within ~m^2 |W||x| float32 epsilons of the float64 ones.

    The target logit is |W||x| T_m(cos), and T_m' reaches m^2 at the poles: a cosine rounded to
    float32 moves it by up to m^2 |W||x| eps32; the bound allows 8 times that.
    """
    x, W, y = sample
    x32, W32 = x.astype(np.float32).astype(np.float64), W.astype(np.float32).astype(np.float64)
    for loss, name in LOSSES.items():
        got = call("torch_port", f"{loss}_logits", x32, W32, y, dtype=torch.float32, m=m, **{name: weight})
        want = call("refimpl", f"{loss}_logits", x32, W32, y, m=m, **{name: weight})
        bound = 8 * m * m * float(np.finfo(np.float32).eps) * scales(loss, x32, W32)
        assert np.all(np.abs(got - want) <= bound + 1e-6), (loss, np.max(np.abs(got - want)))


# ---------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------


def test_released_schedules_and_their_closed_form():
    lsoftmax, sphereface = MarginSchedule.lsoftmax(), MarginSchedule.sphereface()
    assert (lsoftmax.base, lsoftmax.gamma, lsoftmax.power, lsoftmax.minimum) == (1000.0, 2.5e-5, 35.0, 0.0)
    assert (sphereface.base, sphereface.gamma, sphereface.power, sphereface.minimum) == (1000.0, 0.12, 1.0, 5.0)
    for t in (0, 1, 10, 1000, 12345, 10**6):
        assert lsoftmax.value_at(t) == pytest.approx(max(0.0, 1000.0 * (1.0 + 2.5e-5 * t) ** -35.0), rel=4 * EPS)
        assert sphereface.value_at(t) == pytest.approx(max(5.0, 1000.0 / (1.0 + 0.12 * t)), rel=4 * EPS)
    # SphereFace reaches lambda_min = 5 when 1000 / (1 + 0.12 t) = 5, i.e. t = 199 / 0.12 = 1658.3.
    assert sphereface.value_at(1658) > 5.0 and sphereface.value_at(1659) == 5.0
    # L-Softmax's beta falls to base / r at t = (r^(1/35) - 1) / 2.5e-5: 800.06 for r = 2, 8727.1 for r = 1000.
    for ratio in (2.0, 1000.0):
        crossing = math.floor((ratio ** (1 / 35) - 1) / 2.5e-5)
        assert lsoftmax.value_at(crossing) > 1000.0 / ratio > lsoftmax.value_at(crossing + 1)
    assert MarginSchedule.constant(0.0).value_at(10**9) == 0.0
    resumed = MarginSchedule(base=1000.0, gamma=0.12, power=1.0, minimum=5.0, iteration=1000)
    assert resumed.value() == sphereface.value_at(1000)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"base": -1.0}, ValueError, "base"),
        ({"gamma": -0.1}, ValueError, "gamma"),
        ({"power": -1.0}, ValueError, "power"),
        ({"minimum": -5.0}, ValueError, "minimum"),
        ({"base": float("nan")}, ValueError, "base"),
        ({"gamma": float("inf")}, ValueError, "gamma"),
        ({"base": "1000"}, TypeError, "base"),
        ({"iteration": -1}, ValueError, "iteration"),
        ({"iteration": 2.5}, ValueError, "iteration"),
    ],
    ids=str,
)
def test_schedule_rejects_bad_parameters(kwargs, error, name):
    args = {"base": 1000.0, "gamma": 0.12, "power": 1.0, "minimum": 5.0, **kwargs}
    with pytest.raises(error, match=rf"\b{name}\b"):
        MarginSchedule(**args)


# ---------------------------------------------------------------------------------------------
# the heads
# ---------------------------------------------------------------------------------------------

HEADS = {"lsoftmax": LSoftmax, "sphereface": SphereFace}


def _head(loss: str, schedule=None, m=4, dtype=torch.float64):
    torch.manual_seed(0)
    return HEADS[loss](5, 3, m=m, schedule=schedule, dtype=dtype)


def _batch(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=generator, dtype=torch.float64).to(dtype)
    return x, torch.tensor([0, 1, 2, 3, 4, 0, 2])


@pytest.mark.parametrize("loss", LOSSES)
def test_head_trains_with_the_scheduled_weight_and_advances_once_per_training_forward(loss):
    schedule = MarginSchedule(base=50.0, gamma=0.5, power=1.5, minimum=0.1)
    head = _head(loss, schedule)
    x, y = _batch()
    for step in range(4):
        weight = max(0.1, 50.0 * (1 + 0.5 * step) ** -1.5)
        expected = call(
            "refimpl", f"{loss}_loss", x.numpy(), head.weight.detach().numpy(), y.numpy(), m=4, **{LOSSES[loss]: weight}
        )
        got = head(x, y)
        assert_close(got.detach().numpy(), expected, Tol(1e-12, 1e-13), f"step {step}")
        assert int(head.schedule.iteration) == step + 1
        got.backward()  # the loss is an ordinary graph; nothing was modified in place
    assert "schedule.iteration" in head.state_dict()


@pytest.mark.parametrize("loss", LOSSES)
def test_head_outside_training_does_not_advance_and_is_margin_free(loss):
    head = _head(loss, MarginSchedule.constant(0.0))
    x, y = _batch()
    with torch.no_grad():
        head(x, y)
    with torch.inference_mode():
        head(x, y)
    head.eval()
    loss_eval = head(x, y)
    assert int(head.schedule.iteration) == 0
    # Eval mode: the cross-entropy of the margin-free logits, which are W x (L-Softmax) or |x| cos (SphereFace).
    W = head.weight.detach().numpy()
    plain = (
        x.numpy() @ W.T if loss == "lsoftmax" else scales(loss, x.numpy(), W) * (unit_rows(x.numpy()) @ unit_rows(W).T)
    )
    assert_close(head.logits(x).detach().numpy(), plain, Tol(1e-12, 1e-13), "logits")
    assert_close(loss_eval.detach().numpy(), torch_ce(plain, y.numpy(), "mean"), Tol(1e-12, 1e-13), "eval loss")
    head.train()
    assert_close(head.logits(x).detach().numpy(), plain, Tol(1e-12, 1e-13), "logits in training mode")
    assert head(x, y) > loss_eval  # the full margin (weight 0) costs more than no margin


@pytest.mark.parametrize("loss", LOSSES)
def test_state_dict_round_trips_weights_and_schedule(loss):
    head = _head(loss)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    x, y = _batch()
    for _ in range(3):
        optimizer.zero_grad()
        head(x, y).backward()
        optimizer.step()
    restored = HEADS[loss](5, 3, dtype=torch.float64)
    restored.load_state_dict(head.state_dict())
    assert int(restored.schedule.iteration) == 3
    assert restored.schedule.value() == head.schedule.value() < head.schedule.value_at(0)
    assert torch.equal(restored(x, y), head(x, y))


@pytest.mark.parametrize("loss", LOSSES)
def test_a_failed_call_changes_no_weight_and_no_schedule(loss):
    head = _head(loss)
    x, y = _batch()
    head(x, y)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    for bad_x, bad_y, error in [
        (x, torch.tensor([0, 1, 2, 3, 5, 0, 2]), ValueError),  # a label outside [0, 5)
        (x, y[:3], ValueError),  # a label vector of the wrong length
        (x[:, :2], y, ValueError),  # features of the wrong dimension
        (x, y.double(), TypeError),  # float labels
    ]:
        with pytest.raises(error):
            head(bad_x, bad_y)
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("loss", LOSSES)
def test_head_rejects_bad_arguments(loss):
    with pytest.raises(ValueError, match=r"\bm\b"):
        HEADS[loss](5, 3, m=0)
    with pytest.raises(ValueError, match=r"\bm\b"):
        HEADS[loss](5, 3, m=2.5)
    with pytest.raises(TypeError, match=r"\bschedule\b"):
        HEADS[loss](5, 3, schedule=0.5)
    with pytest.raises(ValueError, match=r"\bnum_classes\b"):
        HEADS[loss](0, 3)


def test_default_schedules_and_initialisation():
    torch.manual_seed(0)
    lsoftmax, sphereface = LSoftmax(256, 512), SphereFace(256, 512)
    assert lsoftmax.schedule.value() == 1000.0 and lsoftmax.schedule.gamma == 2.5e-5
    assert sphereface.schedule.value() == 1000.0 and sphereface.schedule.minimum == 5.0
    assert lsoftmax.schedule is not LSoftmax(2, 2).schedule  # each head gets its own counter
    # L-Softmax: the msra filler, N(0, 2 / D); 131072 draws put the sample std within 1% of sqrt(2/512).
    assert lsoftmax.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.01)
    assert abs(lsoftmax.weight.mean().item()) < 3 * math.sqrt(2 / 512) / math.sqrt(256 * 512)
    assert sphereface.weight.std().item() == pytest.approx(0.01, rel=0.01)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_head_dtype_device_and_autocast_contract(loss, dtype, device):
    head = HEADS[loss](5, 3, schedule=MarginSchedule.constant(2.0), device=device)
    x, y = _batch(dtype)
    x, y = x.to(device).requires_grad_(True), y.to(device)
    out = head(x, y)
    assert out.dtype == torch.float32 and out.device.type == device and torch.isfinite(out)
    (g,) = torch.autograd.grad(out, x)
    assert g.dtype == dtype and torch.isfinite(g).all()
    autocast_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x32 = x.detach().float()
    with torch.autocast(device, dtype=autocast_dtype):
        under_autocast = head(x32, y)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, head(x32, y), rtol=1e-6, atol=1e-6)
    assert head.logits(x32).dtype == torch.float32
