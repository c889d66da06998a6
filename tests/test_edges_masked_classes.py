"""Distillation with masked classes: teacher (and student) logits of -inf.

A teacher logit of -inf is a class of probability 0; the KL divergence sums over the classes the
teacher gives mass to (0 log 0 = 0), so the loss is finite, and so are its gradients. The expected
values come from mpmath at 50 digits, summing over the teacher's finite classes only; the gradients
from their closed forms (derivations/02-distillation.md), with torch's own float64 softmax. A student
logit of -inf where the teacher has mass makes the KL divergence, and the loss, +inf.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import strategies as S
from tests.impls import call, distillation_grads

IMPL_DTYPES = [("refimpl", torch.float64), ("torch_port", torch.float64), ("torch_port", torch.float32)]
IDS = ["refimpl", "port-float64", "port-float32"]
LOGIT_BOUND = 30.0  # |z| / T <= 120 for T >= 0.25: every probability of a finite logit is resolvable
TEMPERATURES = st.one_of(S.temperatures(), st.sampled_from([1e-30, 1e-3, 1.0, 100.0]))


def exact_loss(zs, zt, y: int, T: float, alpha: float) -> mpmath.mpf:
    """alpha T^2 sum_{k: z_t,k finite} p_t,k (log p_t,k - log p_s,k) + (1 - alpha) CE, at 50 digits.

    Each softmax normalises over its own finite logits (exp(-inf) = 0); the KL runs over the
    teacher's finite classes alone, which never include a -inf of the student in these samples.
    """
    with mpmath.workdps(50):
        T_ = mpmath.mpf(T)

        def log_softmax(row, temperature):
            finite = [mpmath.mpf(v) / temperature for v in row if np.isfinite(v)]
            top = max(finite)
            lse = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in finite))
            return [mpmath.mpf(v) / temperature - lse if np.isfinite(v) else None for v in row]

        log_pt, log_ps = log_softmax(zt, T_), log_softmax(zs, T_)
        kl = mpmath.fsum(mpmath.exp(a) * (a - b) for a, b in zip(log_pt, log_ps) if a is not None)
        ce = -log_softmax(zs, mpmath.mpf(1))[y]
        return mpmath.mpf(alpha) * T_ * T_ * kl + (1 - mpmath.mpf(alpha)) * ce


@st.composite
def masked_distillation(draw):
    """Teacher rows with a nonempty proper subset of classes at -inf; the student at -inf on some of
    those classes (never where the teacher has mass, never at the label)."""
    batch, classes = draw(S.batch_and_classes(max_batch=4, min_classes=2))
    teacher = draw(S.float_arrays((batch, classes), -LOGIT_BOUND, LOGIT_BOUND))
    student = draw(S.float_arrays((batch, classes), -LOGIT_BOUND, LOGIT_BOUND))
    y = np.zeros(batch, dtype=np.int64)
    for i in range(batch):
        masked = draw(st.sets(st.integers(0, classes - 1), min_size=1, max_size=classes - 1), label="masked")
        teacher[i, sorted(masked)] = -np.inf
        student_masked = draw(st.sets(st.sampled_from(sorted(masked))), label="student masked")
        student[i, sorted(student_masked)] = -np.inf
        y[i] = draw(st.sampled_from([k for k in range(classes) if k not in student_masked]), label="y")
    return student, teacher, y, draw(TEMPERATURES), draw(S.unit_interval())


def rounding_bound(student, teacher, T: float, alpha: float, dtype: torch.dtype) -> np.ndarray:
    """Per-sample bound on the rounding error of the loss: the soft term alpha T sum p_t (T log p_t -
    T log p_s) is good to a few u of the finite logits and of T log C; the cross-entropy to a few u of
    the student's."""
    u, classes = float(torch.finfo(dtype).eps) / 2, student.shape[-1]
    span = np.max(np.abs(np.nan_to_num(student, neginf=0.0)), axis=-1)
    span_t = np.max(np.abs(np.nan_to_num(teacher, neginf=0.0)), axis=-1)
    soft = alpha * T * 8 * (classes + 2) * u * (2 * (span + span_t) + T * np.log(classes) + 1)
    return soft + (1 - alpha) * 8 * (classes + 2) * u * (span + 1)


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@given(sample=masked_distillation())
def test_masked_teacher_classes_add_zero_log_zero(impl, dtype, sample):
    student, teacher, y, T, alpha = sample
    loss = call(impl, "distillation_loss", student, teacher, y, T=T, alpha=alpha, reduction="none", dtype=dtype)
    assert np.all(np.isfinite(loss)), loss
    student, teacher = (torch.tensor(a, dtype=dtype).double().numpy() for a in (student, teacher))
    expected = np.array([float(exact_loss(zs, zt, int(k), T, alpha)) for zs, zt, k in zip(student, teacher, y)])
    bound = rounding_bound(student, teacher, T, alpha, dtype) + 4 * float(torch.finfo(dtype).eps) * np.abs(expected)
    assert np.all(np.abs(loss - expected) <= bound), (loss, expected)


def closed_form_gradients(student, teacher, y, T: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """d (sum of per-sample losses) / d (z_s, z_t), from torch's float64 softmax:

    d/dz_s = alpha T (p_s^T - p_t^T) + (1 - alpha)(p_s - onehot(y));
    d/dz_t,j = alpha T p_t,j (r_j - KL), r = log p_t^T - log p_s^T (0 where p_t,j = 0).
    """
    zs, zt = torch.from_numpy(student), torch.from_numpy(teacher)
    p_s, p_t = torch.softmax(zs / T, -1).numpy(), torch.softmax(zt / T, -1).numpy()
    d_student = alpha * T * (p_s - p_t) + (1 - alpha) * (torch.softmax(zs, -1).numpy() - np.eye(zs.shape[-1])[y])
    ratio = (torch.log_softmax(zt / T, -1) - torch.log_softmax(zs / T, -1)).numpy()
    ratio = np.where(p_t > 0, ratio, 0.0)
    kl = np.sum(p_t * ratio, axis=-1, keepdims=True)
    return d_student, alpha * T * p_t * (ratio - kl)


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@given(sample=masked_distillation())
def test_masked_classes_keep_gradients_finite_and_exact(impl, dtype, sample):
    """The double where: -inf log-probabilities are replaced before they meet p_t = 0, so no 0 * inf
    reaches the backward pass; a masked class gets exactly zero gradient from the teacher's side."""
    student, teacher, y, T, alpha = sample
    gs, gt = distillation_grads(impl, student, teacher, y, T, alpha, dtype)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt)), (gs, gt)
    assert np.all(gt[np.isneginf(teacher)] == 0.0)
    student, teacher = (torch.tensor(a, dtype=dtype).double().numpy() for a in (student, teacher))
    d_student, d_teacher = closed_form_gradients(student, teacher, y, T, alpha)
    u, classes = float(torch.finfo(dtype).eps) / 2, student.shape[-1]
    # Each exponent z/T carries u |z| / T; a probability that relative error, the log-ratios r the
    # same in absolute terms, plus a few u per class.
    eps = 8 * (classes + 2) * u * (2 * LOGIT_BOUND / T + 1)
    # alpha T below the dtype's range (Hypothesis draws such alphas) leaves an absolute error of its size.
    tiny = 2 * float(torch.finfo(dtype).tiny) * (4 * LOGIT_BOUND / T + 2)
    assert np.all(np.abs(gs - d_student) <= (alpha * T + 1) * eps + tiny), (gs, d_student)
    assert np.all(np.abs(gt - d_teacher) <= alpha * T * eps * (4 * LOGIT_BOUND / T + 2) + tiny), (gt, d_teacher)


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
def test_a_masked_class_by_hand(impl, dtype):
    """Teacher [2, -inf, 0.5, 1], student [1, 0.3, -2, 0.5], y = 0, T = 1, alpha = 0.9: the KL over the
    teacher's classes 0, 2, 3, written out (it was nan: 0 * (-inf - log p_s))."""
    teacher, student, y = np.array([[2.0, -np.inf, 0.5, 1.0]]), np.array([[1.0, 0.3, -2.0, 0.5]]), np.array([0])
    with mpmath.workdps(50):
        e = mpmath.e
        zt, zs = [2, 0.5, 1], [1, -2, 0.5]  # the teacher's finite classes 0, 2, 3
        norm_t, norm_s = mpmath.fsum(e**v for v in zt), mpmath.fsum(e ** mpmath.mpf(v) for v in [1, 0.3, -2, 0.5])
        kl = mpmath.fsum(e**a / norm_t * ((a - mpmath.log(norm_t)) - (b - mpmath.log(norm_s))) for a, b in zip(zt, zs))
        alpha = mpmath.mpf(0.9)  # the float 0.9, as the implementations see it
        expected = float(alpha * kl + (1 - alpha) * (mpmath.log(norm_s) - 1))
    loss = call(impl, "distillation_loss", student, teacher, y, T=1.0, alpha=0.9, dtype=dtype)
    assert abs(float(loss) - expected) <= 8 * float(torch.finfo(dtype).eps) * expected, (loss, expected)


@pytest.mark.parametrize(("impl", "dtype"), IMPL_DTYPES, ids=IDS)
@pytest.mark.parametrize("T", [1e-30, 1.0, 4.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_a_student_ruling_out_a_teacher_class_is_infinite_kl(impl, dtype, T, alpha):
    """KL(p_t || p_s) = +inf when p_s = 0 where p_t > 0 (F.kl_div's convention): the loss is +inf,
    never nan, in the rows concerned; the other rows keep their finite loss. (At alpha = 0 the soft
    term is 0 * inf, nan by IEEE; the docstrings say so.) Mass means a computed p_t > 0: the teacher
    ties classes 0 and 1, so class 1 keeps half the mass even at T = 1e-30."""
    teacher = np.array([[2.0, 2.0, 0.5], [2.0, 2.0, 0.5]])
    student = np.array([[1.0, -np.inf, 0.5], [1.0, 0.2, 0.5]])
    y = np.array([0, 0])
    loss = call(impl, "distillation_loss", student, teacher, y, T=T, alpha=alpha, reduction="none", dtype=dtype)
    assert loss[0] == np.inf and np.isfinite(loss[1])
    mean = call(impl, "distillation_loss", student, teacher, y, T=T, alpha=alpha, dtype=dtype)
    assert mean == np.inf
