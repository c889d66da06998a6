"""Family-specific properties of softmax, cross-entropy and distillation (derivations/01, 02).

The shared suites (tests/test_shared_suites.py) already check that the reference and the port agree
with each other; here each property compares against a route that is independent of both: a closed
form, autograd, torch's own ``F.cross_entropy``/``nn.KLDivLoss``, an explicit Python loop, or the
numbers printed in the seed article. Every property runs on both implementations (float64) unless
it is about the port alone (its dtype contract, its module).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests import strategies as S
from tests.impls import IMPLS, call, grad_first
from tests.tolerances import Tol, assert_close
from torch_port import DistillationLoss

EPS = float(np.finfo(np.float64).eps)
# |z| <= 30 and T >= 0.25 keep every exponent above -240: nothing underflows, so entropies and
# KL divergences stay resolvable in float64 (the same bound the registry draws with).
LOGIT_BOUND = 30.0


def entropy(impl: str, z: np.ndarray, T: float) -> np.ndarray:
    """Row entropies -sum p log p of softmax(z, T), from the implementation's softmax and log_softmax."""
    return -np.sum(call(impl, "softmax", z, T=T) * call(impl, "log_softmax", z, T=T), axis=-1)


@st.composite
def logit_matrices(draw, bound: float = LOGIT_BOUND, min_classes: int = 1):
    batch, classes = draw(S.batch_and_classes(min_classes=min_classes))
    return draw(S.float_arrays((batch, classes), -bound, bound))


@st.composite
def logits_and_labels(draw, bound: float = S.VALUE_BOUND):
    z = draw(logit_matrices(bound))
    return z, draw(S.labels(*z.shape))


@st.composite
def distillation_inputs(draw, bound: float = LOGIT_BOUND):
    student = draw(logit_matrices(bound))
    teacher = draw(S.float_arrays(student.shape, -bound, bound))
    return student, teacher, draw(S.labels(*student.shape))


# ---------------------------------------------------------------------------------------------
# softmax and log_softmax
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(z=logit_matrices(S.VALUE_BOUND), T=S.temperatures(), c=S.finite_floats(-S.VALUE_BOUND, S.VALUE_BOUND))
def test_softmax_sums_to_one_and_ignores_a_common_shift(impl, z, T, c):
    p = call(impl, "softmax", z, T=T)
    assert np.all(p >= 0)
    assert np.all(np.abs(p.sum(axis=-1) - 1) <= 4 * z.shape[-1] * EPS)
    # z + c is itself rounded, by up to eps/2 * |z + c| per logit; after /T that moves each
    # exponent by at most delta, hence each probability by a relative 2 * delta (plus a few ulps of
    # its own arithmetic; atol only covers subnormal results, which have no relative precision).
    delta = 2 * EPS * (np.max(np.abs(z)) + abs(c) + 1) / T
    shifted = call(impl, "softmax", z + c, T=T)
    assert np.all(np.abs(shifted - p) <= p * (2 * delta + 16 * EPS) + 1e-300)


ARTICLE_LOGITS = [1.1, 2.2, 5.0, 10.1]
ARTICLE_PRINTED = [1.2260e-04, 3.6832e-04, 6.0568e-03, 9.9345e-01]  # as the seed article prints them
IMPL_DTYPES = [("refimpl", torch.float64), ("torch_port", torch.float64), ("torch_port", torch.float32)]


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=["refimpl", "port-float64", "port-float32"])
def test_seed_article_examples(impl, dtype):
    p = call(impl, "softmax", np.array(ARTICLE_LOGITS), dtype=dtype)
    assert [float(f"{v:.4e}") for v in p] == ARTICLE_PRINTED  # to the printed five digits
    # exp(10000) overflows: the textbook formula gives inf/inf = nan; the shifted one is exact.
    naive = call(impl, "naive_softmax", np.array([5.0, 1.0, 1e4, 6.0]), dtype=dtype)
    assert np.isnan(naive[2]) and np.array_equal(naive[[0, 1, 3]], [0.0, 0.0, 0.0])
    assert np.array_equal(call(impl, "softmax", np.array([5.0, 1.0, 1e4, 6.0]), dtype=dtype), [0.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("impl", IMPLS)
@given(z=logit_matrices(S.VALUE_BOUND), T=S.temperatures())
def test_temperature_and_log_softmax_identities(impl, z, T):
    assert np.array_equal(call(impl, "softmax", z, T=1.0), call(impl, "softmax", z))
    p, log_p = call(impl, "softmax", z, T=T), call(impl, "log_softmax", z, T=T)
    # Temperature is a rescaling of the logits (z / T is rounded once more, hence the slack).
    assert_close(p, call(impl, "softmax", z / T), Tol(rtol=8 * EPS * (np.max(np.abs(z)) / T + 1), atol=1e-300))
    assert np.all(np.isfinite(log_p))
    normal = p >= np.finfo(np.float64).tiny
    assert np.all(np.abs(log_p - np.log(p, where=normal, out=np.zeros_like(p)))[normal] <= 1e-13 * (1 - log_p[normal]))
    # Where p rounded to zero, log_softmax still holds the (finite, very negative) true value.
    assert np.all(log_p[~normal] < np.log(np.finfo(np.float64).tiny))


@st.composite
def unsaturated_temperature_pairs(draw):
    """Logits with a spread of at least 0.1 in every row, and T1 < T2 = T1 * (1.01 .. 10).

    T1 >= spread / 20: a logit more than 20 T below the top has probability < e^-20 and would move the
    entropy (which can be as large as log of the number of tied maxima) by less than float64 resolves.
    """
    z = draw(logit_matrices(LOGIT_BOUND - 1, min_classes=2)).copy()
    flat = np.ptp(z, axis=-1) < 0.1
    z[flat, 0] += draw(S.finite_floats(0.1, 1.0))
    T1 = draw(S.temperatures(max(0.25, np.max(np.ptp(z, axis=-1)) / 20), 20.0))
    return z, T1, T1 * draw(S.finite_floats(1.01, 10.0))


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=unsaturated_temperature_pairs())
def test_entropy_strictly_increases_with_temperature(impl, sample):
    # dH/dT = Var_p(z) / T^3 > 0, and in this range the increase is far above float64 rounding.
    z, T1, T2 = sample
    h1, h2 = entropy(impl, z, T1), entropy(impl, z, T2)
    assert np.all(h1 < h2), (h1, h2)
    assert np.all(h2 <= np.log(z.shape[-1]) * (1 + 4 * EPS))


@pytest.mark.parametrize("impl", IMPLS)
@given(z=logit_matrices(1e3), c=S.finite_floats(-S.VALUE_BOUND, S.VALUE_BOUND), T=S.temperatures(0.01, 1e6))
def test_entropy_tends_to_log_classes(impl, z, c, T):
    log_c = np.log(z.shape[-1])
    # log C - H ~ Var(z / T) / 2 <= (2000 / 1e6)^2 / 8 = 5e-7 for |z| <= 1e3.
    assert np.all(np.abs(entropy(impl, z, 1e6) - log_c) < 1e-6)
    # Constant logits: the uniform distribution, log C to the last few ulps, at any T.
    assert np.all(np.abs(entropy(impl, np.full_like(z, c), T) - log_c) <= 4 * EPS * log_c)


# ---------------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=logits_and_labels())
def test_cross_entropy_matches_torch_and_its_gradient_is_p_minus_onehot(impl, sample):
    z, y = sample
    for reduction in ("none", "mean", "sum"):
        expected = F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y), reduction=reduction).numpy()
        assert_close(call(impl, "cross_entropy", z, y, reduction=reduction), expected, Tol(1e-13, 1e-15), reduction)
    batch, classes = z.shape
    closed_form = (torch.softmax(torch.from_numpy(z), dim=-1).numpy() - np.eye(classes)[y]) / batch
    assert_close(grad_first(impl, "cross_entropy", z, y), closed_form, Tol(1e-10, 1e-14), "d CE / d logits")


# ---------------------------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=distillation_inputs(S.VALUE_BOUND), T=S.temperatures(), data=st.data())
def test_distillation_soft_term_vanishes_for_the_teacher_itself(impl, sample, T, data):
    student, _, y = sample
    # The teacher is the student shifted by a per-row constant: the same distribution, so KL = 0.
    shift = data.draw(S.float_arrays((student.shape[0], 1), -S.VALUE_BOUND, S.VALUE_BOUND), label="shift")
    loss = call(impl, "distillation_loss", student, student + shift, y, T=T, alpha=1.0, reduction="none")
    # Rounding of z + shift and of the log-probabilities enters the KL at first order:
    # T^2 * O(eps * |z| / T).
    assert np.all(np.abs(loss) <= 16 * EPS * (np.max(np.abs(student)) + np.max(np.abs(shift)) + 1) * T)
    same = call(impl, "distillation_loss", student, student, y, T=T, alpha=1.0, reduction="none")
    assert np.array_equal(same, np.zeros(len(y)))  # identical rows: every log-ratio is exactly 0


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=distillation_inputs(S.VALUE_BOUND), T=S.temperatures())
def test_distillation_with_alpha_zero_is_cross_entropy(impl, sample, T):
    student, teacher, y = sample
    for reduction in ("none", "mean", "sum"):
        loss = call(impl, "distillation_loss", student, teacher, y, T=T, alpha=0.0, reduction=reduction)
        assert np.array_equal(loss, call(impl, "cross_entropy", student, y, reduction=reduction)), reduction


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=distillation_inputs(), T=S.temperatures(), alpha=S.unit_interval())
def test_distillation_gradient_closed_form(impl, sample, T, alpha):
    """d loss / d z_s = [alpha T (p_s^T - p_t^T) + (1 - alpha)(p_s - onehot(y))] / B (reduction="mean").

    The first term is the soft term's gradient: T^2 times the KL's (p_s^T - p_t^T) / T.
    """
    student, teacher, y = sample
    batch, classes = student.shape
    zs, zt = torch.from_numpy(student), torch.from_numpy(teacher)
    soft = alpha * T * (torch.softmax(zs / T, -1) - torch.softmax(zt / T, -1)).numpy()
    hard = (1 - alpha) * (torch.softmax(zs, -1).numpy() - np.eye(classes)[y])
    got = grad_first(impl, "distillation_loss", student, teacher, y, T=T, alpha=alpha)
    assert_close(got, (soft + hard) / batch, Tol(1e-10, 1e-14 * T), "d loss / d student_logits")


def _matching_logits_limit(student, teacher):
    """(1/2C) ||(z_s - mean z_s) - (z_t - mean z_t)||^2 per sample: Hinton et al.'s high-T limit."""
    d = (student - student.mean(-1, keepdims=True)) - (teacher - teacher.mean(-1, keepdims=True))
    return np.sum(d**2, axis=-1) / (2 * student.shape[-1])


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=distillation_inputs(bound=4.0))
def test_distillation_tends_to_matching_logits_at_high_temperature(impl, sample):
    """T^2 KL(p_t^T || p_s^T) -> (1/2C) ||dz_s - dz_t||^2, with a relative gap of O(1/T).

    The KL is the Bregman divergence of logsumexp, whose Hessian diag(p) - pp^T is within a factor
    exp(+-R/T) of its value at the uniform point when every logit row spans at most R; so the gap is
    bounded by expm1(R / T) (derivations/02-distillation.md).
    """
    student, teacher, y = sample
    limit = _matching_logits_limit(student, teacher)
    assume(np.all(limit > 1e-6))  # the relative gap needs a limit well above rounding
    spread = max(np.max(np.ptp(student, axis=-1)), np.max(np.ptp(teacher, axis=-1)))
    gaps = {}
    for T in (1e2, 1e3):
        loss = call(impl, "distillation_loss", student, teacher, y, T=T, alpha=1.0, reduction="none")
        gaps[T] = np.abs(loss / limit - 1)
        assert np.all(gaps[T] <= np.expm1(spread / T) + 1e-12 * T**2 / limit), (T, gaps[T])
    assert np.all(gaps[1e3] < 1e-2)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")  # the point here
@pytest.mark.parametrize("impl", IMPLS)
@given(sample=distillation_inputs(), T=S.temperatures(), alpha=S.unit_interval())
def test_distillation_batch_mean_is_kl_summed_over_classes(impl, sample, T, alpha):
    student, teacher, y = sample
    batch, classes = student.shape
    total = 0.0
    for zs, zt, label in zip(student.tolist(), teacher.tolist(), y.tolist()):
        ms, mt = max(v / T for v in zs), max(v / T for v in zt)
        log_zs = ms + math.log(sum(math.exp(v / T - ms) for v in zs))
        log_zt = mt + math.log(sum(math.exp(v / T - mt) for v in zt))
        kl = sum(math.exp(b / T - log_zt) * ((b / T - log_zt) - (a / T - log_zs)) for a, b in zip(zs, zt))
        m1 = max(zs)
        ce = m1 + math.log(sum(math.exp(v - m1) for v in zs)) - zs[label]
        total += alpha * T**2 * kl + (1 - alpha) * ce
    loss = float(call(impl, "distillation_loss", student, teacher, y, T=T, alpha=alpha))
    assert_close(loss, total / batch, Tol(1e-9, 1e-12), "explicit float64 loop")

    # For alpha = 1 it is KLDivLoss(reduction="batchmean") * T^2; reduction="mean" divides by B*C.
    soft = float(call(impl, "distillation_loss", student, teacher, y, T=T, alpha=1.0))
    log_ps = torch.log_softmax(torch.from_numpy(student) / T, -1)
    pt = torch.softmax(torch.from_numpy(teacher) / T, -1)
    batchmean = T**2 * torch.nn.KLDivLoss(reduction="batchmean")(log_ps, pt).item()
    elementwise_mean = T**2 * torch.nn.KLDivLoss(reduction="mean")(log_ps, pt).item()
    assert_close(soft, batchmean, Tol(1e-9, 1e-12), "KLDivLoss batchmean")
    assert_close(soft, classes * elementwise_mean, Tol(1e-9, 1e-12), "KLDivLoss mean, times C")
    if classes > 1 and soft > 1e-9:
        assert not math.isclose(soft, elementwise_mean, rel_tol=0.1)


# ---------------------------------------------------------------------------------------------
# the port: DistillationLoss and the dtype/device contract
# ---------------------------------------------------------------------------------------------


@given(
    sample=distillation_inputs(),
    T=S.temperatures(),
    alpha=S.unit_interval(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_distillation_module_equals_functional_and_reference(sample, T, alpha, reduction):
    student, teacher, y = sample
    zs, zt, labels = torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(y)
    got = DistillationLoss(T=T, alpha=alpha, reduction=reduction)(zs, zt, labels)
    assert torch.equal(got, tpf.distillation_loss(zs, zt, labels, T=T, alpha=alpha, reduction=reduction))
    expected = refimpl.distillation_loss(student, teacher, y, T=T, alpha=alpha, reduction=reduction)
    assert_close(got.numpy(), expected, Tol(1e-10, 1e-12), "module vs refimpl")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"T": 0.0}, "T"), ({"T": -4.0}, "T"), ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha")],
    ids=["T=0", "T<0", "alpha<0", "alpha>1"],
)
def test_distillation_module_rejects_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        DistillationLoss(**kwargs)


def test_distillation_module_repr_shows_hyperparameters():
    text = repr(DistillationLoss(T=2.5, alpha=0.25))
    assert "T=2.5" in text and "alpha=0.25" in text


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
PORT_CALLS = {
    "softmax": lambda z, t, y: tpf.softmax(z, T=2.0),
    "log_softmax": lambda z, t, y: tpf.log_softmax(z, T=2.0),
    "naive_softmax": lambda z, t, y: tpf.naive_softmax(z, T=2.0),
    "cross_entropy": lambda z, t, y: tpf.cross_entropy(z, y),
    "distillation_loss": lambda z, t, y: tpf.distillation_loss(z, t, y, reduction="none"),
    "DistillationLoss": lambda z, t, y: DistillationLoss()(z, t, y),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "result_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
    ids=str,
)
def test_port_dtype_and_device_contract(dtype, result_dtype, device):
    """Half inputs compute and return float32, float64 stays float64; results and gradients stay on
    the input's device, and gradients come back in the input's dtype."""
    t = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]], dtype=dtype, device=device)
    y = torch.tensor([2, 0], device=device)
    for name, fn in PORT_CALLS.items():
        z = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -0.5]], dtype=dtype, device=device, requires_grad=True)
        out = fn(z, t, y)
        assert (out.dtype, out.device) == (result_dtype, z.device), name
        assert torch.isfinite(out).all(), name
        (g,) = torch.autograd.grad(out.sum(), z)
        assert (g.dtype, g.device) == (dtype, z.device), name
    if dtype != torch.float64:
        with pytest.raises(TypeError, match="float64"):  # a float64 teacher for a lower-precision student
            tpf.distillation_loss(z, t.double(), y)
