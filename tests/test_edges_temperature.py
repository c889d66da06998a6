"""Softmax, log_softmax and distillation at every temperature T > 0, tiny or huge.

Expected values come from mpmath at 50 digits, computed on the very inputs each implementation sees
(the logits rounded to its dtype, T exact), and from the limit T -> 0 in closed form: the one-hot
vector of the largest logit, ties sharing the mass equally. Both packages, the port in float64 and
float32. The tolerances are rounding bounds: an exponent a_k = (z_k - max z)/T is computed with a
relative error of a few u (the subtraction, the division, for float32 the rounding of T), plus
u (|z_k| + |max z|)/T when T >= 1 divides first; a probability inherits that error, plus a few u
per class from the sum.
"""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests import strategies as S
from tests.impls import call, distillation_grads

IMPL_DTYPES = [("refimpl", torch.float64), ("torch_port", torch.float64), ("torch_port", torch.float32)]
IDS = ["refimpl", "port-float64", "port-float32"]
# Temperatures at the ends: subnormal float64, float32's subnormal range and below it, the float
# range's top. Hypothesis adds log-uniform ones over 1e-300 .. 1e300.
EDGE_TEMPERATURES = [5e-324, 1e-320, 1e-308, 1e-46, 1e-40, 1e-35, 1e-19, 0.5, 1.0, 2.0, 1e300, 1.7e308]


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def rounded(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The values an implementation computing in ``dtype`` actually receives, as float64."""
    return torch.tensor(a, dtype=dtype).double().numpy()


def exact_exponents(row, T: float) -> list[mpmath.mpf]:
    """a_k = (z_k - max z) / T, exactly (at 50 digits)."""
    with mpmath.workdps(50):
        top = max(mpmath.mpf(v) for v in row)
        return [(mpmath.mpf(v) - top) / mpmath.mpf(T) for v in row]


def exact_log_softmax(row, T: float) -> list[mpmath.mpf]:
    """log softmax(row; T) at 50 digits: a_k - log sum_j exp(a_j)."""
    with mpmath.workdps(50):
        a = exact_exponents(row, T)
        # exp(a) for a < -1e6 is far below every float; mpmath would compute it, slowly
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in a if v > -1e6))
        return [v - lse for v in a]


def exact(z: np.ndarray, T: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(softmax, log_softmax, exponents a) at 50 digits, rounded to float64 (log-probabilities and
    exponents clipped at -1e308, so that they stay comparable)."""
    with mpmath.workdps(50):
        logs = [exact_log_softmax(row, T) for row in z.tolist()]
        p = np.array([[float(mpmath.exp(v)) if v > -1e6 else 0.0 for v in row] for row in logs])
        log_p = np.array([[float(max(v, -1e308)) for v in row] for row in logs])
        a = np.array([[float(max(v, -1e308)) for v in exact_exponents(row, T)] for row in z.tolist()])
    return p, log_p, a


def exponent_error(z: np.ndarray, a: np.ndarray, T: float, dtype: torch.dtype) -> np.ndarray:
    """Bound on the absolute error of each computed exponent (z_k - max z)/T (module docstring)."""
    u = unit_roundoff(dtype)
    err = 4 * u * np.abs(a)
    if T >= 1.0:
        err = err + 2 * u * (np.abs(z) + np.max(np.abs(z), axis=-1, keepdims=True)) / T
    return err


def temperatures(low: float = 1e-300, high: float = 1e300):
    """T log-uniform in [low, high], or one of the edge temperatures in [low / 1e30, high]."""
    edges = [T for T in EDGE_TEMPERATURES if low / 1e30 <= T <= high]
    log_uniform = S.finite_floats(np.log10(low), np.log10(high)).map(lambda e: 10.0**e)
    return st.one_of(log_uniform, st.sampled_from(edges))


def logit_matrices(shape: tuple[int, int], T: float):
    """Logits mixing small integers (ties), multiples of T (a soft distribution at any T) and values
    up to +-1e4."""
    element = st.one_of(
        st.integers(-3, 3).map(float),
        S.finite_floats(-40.0, 40.0).map(lambda v: float(np.clip(v * T, -S.VALUE_BOUND, S.VALUE_BOUND))),
        S.finite_floats(-S.VALUE_BOUND, S.VALUE_BOUND),
    )
    size = shape[0] * shape[1]
    return st.lists(element, min_size=size, max_size=size).map(lambda v: np.array(v).reshape(shape))


@st.composite
def tempered_logits(draw):
    T = draw(temperatures())
    return draw(logit_matrices(draw(S.batch_and_classes(max_batch=3, max_classes=6)), T)), T


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@given(sample=tempered_logits())
def test_softmax_and_log_softmax_are_exact_to_rounding_at_any_temperature(impl, dtype, sample):
    z, T = sample
    z = rounded(z, dtype)
    u, classes = unit_roundoff(dtype), z.shape[-1]
    p = call(impl, "softmax", z, T=T, dtype=dtype)
    log_p = call(impl, "log_softmax", z, T=T, dtype=dtype)
    assert np.all(np.isfinite(p)) and np.all(p >= 0) and not np.any(np.isnan(log_p)), (p, log_p)
    assert np.all(np.abs(p.sum(axis=-1) - 1) <= 2 * (classes + 2) * u)

    p_exact, log_p_exact, a = exact(z, T)
    err_a = exponent_error(z, a, T, dtype)
    # log p_k = a_k - lse(a): the error of a_k, the p-weighted errors of the others (each p_j |a_j|
    # <= 1/e), and a few roundings of the sum and its log.
    row_err = np.max(np.where(p_exact > 0, p_exact * err_a, 0.0), axis=-1, keepdims=True) * classes
    log_err = err_a + row_err + 2 * (classes + 2) * u * (1 + np.abs(log_p_exact))
    tiny = float(torch.finfo(dtype).tiny)
    in_range = np.abs(log_p_exact) < 0.5 * float(torch.finfo(dtype).max)
    assert np.all(np.abs(log_p - log_p_exact)[in_range] <= log_err[in_range]), (log_p, log_p_exact)
    # Below the float range the correctly rounded value is -inf (or a number of that size).
    assert np.all(log_p[~in_range] <= -0.25 * float(torch.finfo(dtype).max))
    relative = np.minimum(log_err, 1.0)
    assert np.all(np.abs(p - p_exact) <= p_exact * np.expm1(relative) + 2 * tiny), (p, p_exact)


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@given(sample=tempered_logits(), data=st.data())
def test_softmax_gradient_is_exact_to_rounding_at_any_temperature(impl, dtype, sample, data):
    """d/dz sum_k w_k softmax(z; T)_k = p (w - p.w) / T, against mpmath.

    It is finite wherever its exact value is: in float64 for every T >= 1e-300 (|w| <= 1 bounds it by
    1/(2T)); in float32 at a tie with T below ~1e-38 the exact value itself exceeds the range, and
    there the port returns an infinity of the right sign, never nan.
    """
    z, T = sample
    z = rounded(z, dtype)
    if dtype == torch.float64:
        T = max(T, 1e-300)
    w = data.draw(S.float_arrays(z.shape, -1.0, 1.0), label="w")
    if impl == "refimpl":
        g = autograd.grad(lambda a: anp.sum(w * refimpl.softmax(a, T)))(z)
    else:
        zt = torch.tensor(z, dtype=dtype, requires_grad=True)
        (g,) = torch.autograd.grad((torch.tensor(w, dtype=dtype) * tpf.softmax(zt, T)).sum(), zt)
        g = g.double().numpy()
    assert not np.any(np.isnan(g)), g

    p, _, a = exact(z, T)
    u, classes, big = unit_roundoff(dtype), z.shape[-1], float(torch.finfo(dtype).max)
    g_exact = np.array([exact_softmax_gradient(row, w_row, T) for row, w_row in zip(z.tolist(), w.tolist())])
    # p carries the relative error of its exponents; w - p.w an absolute u-sized error per class.
    eps_p = np.minimum(np.max(exponent_error(z, a, T, dtype), axis=-1, keepdims=True), 1.0)
    with np.errstate(over="ignore"):
        tol = 4 * p / T * (eps_p + (classes + 2) * u) + 4 * u * np.abs(g_exact) + 2 * float(torch.finfo(dtype).tiny)
    representable = np.abs(g_exact) <= 0.25 * big
    # compared where the exact gradient is representable (elsewhere g may be inf: inf - inf is no error)
    assert np.all(np.abs(g[representable] - g_exact[representable]) <= tol[representable]), (g, g_exact)
    beyond = (np.abs(g_exact) > 4 * big) & (np.abs(g_exact) > 2 * tol)
    assert np.all(np.sign(g[beyond]) == np.sign(g_exact[beyond])) and np.all(np.abs(g[beyond]) > 0.25 * big)


def exact_softmax_gradient(row, w_row, T: float) -> list[float]:
    """d/dz sum_k w_k softmax(z; T)_k = p_k (w_k - sum_j w_j p_j) / T at 50 digits (inf past the float range)."""
    with mpmath.workdps(50):
        p = [mpmath.exp(v) if v > -1e6 else mpmath.mpf(0) for v in exact_log_softmax(row, T)]
        mean = mpmath.fsum(mpmath.mpf(wj) * pj for wj, pj in zip(w_row, p))
        return [float(pk * (mpmath.mpf(wk) - mean) / mpmath.mpf(T)) for pk, wk in zip(p, w_row)]


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@given(
    z=st.integers(1, 3).flatmap(lambda b: S.float_arrays((b, 5), -3, 3).map(np.round)),
    T=S.finite_floats(-300.0, -3.0).map(lambda e: 10.0**e),
)
def test_small_temperature_gives_the_one_hot_of_the_maximum_with_ties_shared(impl, dtype, z, T):
    """Integer logits trail the maximum by >= 1, so at T <= 1e-3 their weight is below e^-1000, zero
    in every float: softmax is exactly 1/S on the S tied maxima, and log_softmax is -log S there and
    (z - max z)/T - log S (or -inf, below the range) elsewhere."""
    is_top = z == z.max(axis=-1, keepdims=True)
    ties = is_top.sum(axis=-1, keepdims=True)
    p = call(impl, "softmax", z, T=T, dtype=dtype)
    share = (torch.ones((), dtype=dtype) / torch.tensor(ties, dtype=dtype)).double().numpy()
    assert np.array_equal(p, np.where(is_top, share, 0.0)), (z, T, p)
    log_p = call(impl, "log_softmax", z, T=T, dtype=dtype)
    log_ties = np.log(ties) * np.ones_like(z)
    assert np.allclose(log_p[is_top], -log_ties[is_top], rtol=4 * unit_roundoff(dtype), atol=0)
    with np.errstate(over="ignore"):
        expected = (z - z.max(axis=-1, keepdims=True)) / T - log_ties
    finite = np.abs(expected) < 0.5 * float(torch.finfo(dtype).max)
    assert np.allclose(log_p[~is_top & finite], expected[~is_top & finite], rtol=8 * unit_roundoff(dtype), atol=0)
    assert np.all(log_p[~is_top & ~finite] == -np.inf)


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
def test_the_seed_logits_at_tiny_temperatures(impl, dtype):
    """[5, 1, 1e4, 6] at T = 1e-35 (and at 1e-40, 1e-308): the one-hot of 1e4 (they once gave nan).
    log_softmax is (z - 1e4)/T: -9.995e38 and its neighbours, finite in float64, -inf in float32."""
    seed = np.array([5.0, 1.0, 1e4, 6.0])
    for T in (1e-35, 1e-40, 1e-308):
        assert np.array_equal(call(impl, "softmax", seed, T=T, dtype=dtype), [0.0, 0.0, 1.0, 0.0])
    log_p = call(impl, "log_softmax", seed, T=1e-35, dtype=dtype)
    if dtype == torch.float32:
        assert np.array_equal(log_p, [-np.inf, -np.inf, 0.0, -np.inf])
    else:
        assert np.allclose(log_p, (seed - 1e4) / 1e-35, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# distillation at T < 1
# ---------------------------------------------------------------------------------------------


def exact_distillation(student, teacher, y, T: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample loss, per-sample T * KL) at 50 digits: alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE."""
    losses, tempered = [], []
    with mpmath.workdps(50):
        T_, alpha_ = mpmath.mpf(T), mpmath.mpf(alpha)
        for zs, zt, label in zip(student.tolist(), teacher.tolist(), y.tolist()):
            log_pt, log_ps = exact_log_softmax(zt, T), exact_log_softmax(zs, T)
            kl = mpmath.fsum(mpmath.exp(a) * (a - b) for a, b in zip(log_pt, log_ps) if a > -1e6)
            ce = -exact_log_softmax(zs, 1.0)[label]
            losses.append(float(alpha_ * T_ * T_ * kl + (1 - alpha_) * ce))
            tempered.append(float(T_ * kl))
    return np.array(losses), np.array(tempered)


@st.composite
def tempered_distillation(draw):
    """(student, teacher, y, T, alpha) with T < 1 (subnormal ones included)."""
    T = draw(temperatures(1e-300, 0.5))
    shape = draw(S.batch_and_classes(max_batch=3, max_classes=6))
    student, teacher = draw(logit_matrices(shape, T)), draw(logit_matrices(shape, T))
    return student, teacher, draw(S.labels(*shape)), T, draw(S.unit_interval())


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@given(sample=tempered_distillation())
def test_distillation_is_exact_to_rounding_at_small_temperatures(impl, dtype, sample):
    """The soft term alpha T (T KL) keeps its factors finite at every T: as T -> 0 it tends to
    alpha T (max z_s - z_s at the teacher's top class), where alpha T^2 KL would be 0 * inf."""
    student, teacher, y, T, alpha = sample
    student, teacher = rounded(student, dtype), rounded(teacher, dtype)
    loss = call(impl, "distillation_loss", student, teacher, y, T=T, alpha=alpha, reduction="none", dtype=dtype)
    assert np.all(np.isfinite(loss)), loss
    expected, tempered_kl = exact_distillation(student, teacher, y, T, alpha)
    u, classes = unit_roundoff(dtype), student.shape[-1]
    subnormal = float(torch.finfo(dtype).tiny * torch.finfo(dtype).eps)  # the smallest positive float
    span = np.max(np.abs(student), axis=-1) + np.max(np.abs(teacher), axis=-1)
    # T KL = sum_k p_t (gap_t - gap_s - T (lse_t - lse_s)): each term good to a few u of the gaps; the
    # cross-entropy to a few u of the logits. alpha T may be subnormal (or round to 0): it then
    # carries an absolute error of the smallest float (or all of itself).
    soft_tol = alpha * T * (4 * (classes + 2) * u * (2 * span + 1) + 4 * u * np.abs(tempered_kl))
    soft_tol += (subnormal + alpha * T * (alpha * T < subnormal)) * (np.abs(tempered_kl) + 1)
    hard_tol = (1 - alpha) * 4 * (classes + 2) * u * (np.max(np.abs(student), axis=-1) + 1)
    assert np.all(np.abs(loss - expected) <= soft_tol + hard_tol + 4 * u * np.abs(expected)), (loss, expected)


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@given(sample=tempered_distillation())
def test_distillation_gradients_are_finite_and_exact_at_small_temperatures(impl, dtype, sample):
    """d loss / d z_s = alpha T (p_s^T - p_t^T) + (1 - alpha)(p_s - onehot(y)) per sample.

    Where T^2 underflows the dtype (T < 1.5e-154 in float64, 1.1e-19 in float32) the soft term's
    gradient, at most alpha T in size, keeps only its teacher part: the backward of T lse(gap/T)
    multiplies by T, then divides by T. The tolerance says so; everything stays finite.
    """
    student, teacher, y, T, alpha = sample
    student, teacher = rounded(student, dtype), rounded(teacher, dtype)
    gs, gt = distillation_grads(impl, student, teacher, y, T, alpha, dtype)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt)), (gs, gt)
    p_s, _, a_s = exact(student, T)
    p_t, _, a_t = exact(teacher, T)
    p_hard, _, _ = exact(student, 1.0)
    expected = alpha * T * (p_s - p_t) + (1 - alpha) * (p_hard - np.eye(student.shape[-1])[y])
    u, classes, tiny = unit_roundoff(dtype), student.shape[-1], float(torch.finfo(dtype).tiny)
    eps = np.max(exponent_error(student, a_s, T, dtype) + exponent_error(teacher, a_t, T, dtype), axis=-1)
    tol = alpha * T * (np.minimum(eps, 1.0)[:, None] + 4 * (classes + 2) * u) + 8 * (classes + 2) * u + 2 * tiny
    tol = tol + (alpha * T * T < tiny) * 2 * alpha * T
    assert np.all(np.abs(gs - expected) <= tol), (gs, expected)
