"""Softmax, cross-entropy and knowledge distillation: the reference math.

Everything is float64 NumPy written with ``autograd.numpy`` so that ``autograd.grad``
differentiates it. Derivations: ``derivations/01-softmax.md`` and ``derivations/02-distillation.md``.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from refimpl.arrays import as_float64, check_labels, check_ndim, pick, reduce_loss
from softmax_common.checks import check_interval, check_positive


def _scaled(z, T):
    T = check_positive(T, "T")
    z = as_float64(z, "z")
    check_ndim(z, "z", min_ndim=1)
    return z / T


def _shift(zt):
    # The row maximum. Softmax is invariant to adding a constant to every logit, so the shift
    # changes nothing but the range of exp's argument; it is treated as a constant (getval), and
    # no gradient needs to flow through it.
    return anp.max(getval(zt), axis=-1, keepdims=True)


def _shifted_scaled(z, T):
    """(z - max z) / T: the tempered logits with their maximum at exactly 0.

    The order of the two steps follows T, so that an intermediate overflows only where the result
    does: for T < 1 subtract first (z / T alone overflows for a tiny T, and inf - inf is nan), for
    T >= 1 divide first (dividing can only shrink, and z - max z alone may overflow for logits that
    span more than the float range).
    """
    T = check_positive(T, "T")
    z = as_float64(z, "z")
    check_ndim(z, "z", min_ndim=1)
    if T < 1.0:
        with np.errstate(over="ignore"):  # a quotient beyond the float range is -inf, correctly rounded
            return (z - _shift(z)) / T
    zt = z / T
    return zt - _shift(zt)


def naive_softmax(z, T=1.0):
    r"""The textbook softmax, exp(z/T) / sum exp(z/T), with no max shift.

    Kept only to show why the shift matters: any logit above ~709.78 overflows exp in float64, and
    inf/inf gives nan (the seed's example [5, 1, 10000, 6] returns [0, 0, nan, 0]).
    """
    zt = _scaled(z, T)
    with np.errstate(over="ignore", invalid="ignore"):  # the failure is the point; keep it quiet
        e = anp.exp(zt)
        return e / anp.sum(e, axis=-1, keepdims=True)


def softmax(z, T=1.0):
    r"""Temperature softmax over the last axis, computed with the max shift.

    .. math:: \mathrm{softmax}(z; T)_k = \frac{e^{(z_k - c)/T}}{\sum_j e^{(z_j - c)/T}}, \quad c = \max_j z_j

    The shift is exact (it cancels between numerator and denominator) and keeps every exponent <= 0,
    so nothing overflows and the largest term is exactly 1. T = 1 is the plain softmax; T > 1 softens
    the distribution (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015).
    The shift comes before the division when T < 1, so every T > 0 works: as T -> 0 the result is
    the one-hot vector of the largest logit, ties sharing the mass equally (z / T first would
    overflow to inf - inf = nan). The gradient, p (g - p.g) / T, is exact; it is 0 where p is
    one-hot and as large as (g_i - g_j) / (4T) at a tie, which may exceed the float range only there.

    Args:
        z: logits, any shape with at least one axis; the softmax is over the last axis.
        T: temperature, a finite number > 0.

    Returns:
        Probabilities of the same shape as ``z``, each row summing to 1.
    """
    e = anp.exp(_shifted_scaled(z, T))
    return e / anp.sum(e, axis=-1, keepdims=True)


def log_softmax(z, T=1.0):
    r"""log softmax(z; T) by the log-sum-exp identity: (z - c)/T - log sum_j exp((z_j - c)/T), c = max z.

    Never takes the log of a rounded-to-zero probability, so it stays finite for logits of +-1e4.
    For a tiny T the true value (z_k - c)/T can lie below the float range: it is then -inf, the
    correctly rounded result, and never nan (the maximum's entry is -log(number of ties)).
    """
    shifted = _shifted_scaled(z, T)
    return shifted - anp.log(anp.sum(anp.exp(shifted), axis=-1, keepdims=True))


def cross_entropy(logits, y, reduction="mean"):
    r"""Softmax cross-entropy with integer labels.

    .. math:: \ell_i = -\log \mathrm{softmax}(z_i)_{y_i} = \mathrm{logsumexp}(z_i) - z_{i, y_i}

    Args:
        logits: (B, C) scores.
        y: (B,) integer labels in [0, C).
        reduction: "mean" (over the batch), "sum" or "none".
    """
    logits = as_float64(logits, "logits")
    batch, classes = check_ndim(logits, "logits", ndim=2)
    y = check_labels(y, batch, classes)
    return reduce_loss(-pick(log_softmax(logits), y), reduction)


def distillation_loss(student_logits, teacher_logits, y, T=4.0, alpha=0.9, reduction="mean"):
    r"""Knowledge distillation (Hinton et al. 2015): soft targets at temperature T plus hard labels.

    .. math::

        \ell_i = \alpha T^2 \sum_c p^T_{t,ic} (\log p^T_{t,ic} - \log p^T_{s,ic})
                 + (1 - \alpha)\,\mathrm{CE}(z_{s,i}, y_i)

    with :math:`p^T = \mathrm{softmax}(z / T)`. The KL divergence is summed over classes and averaged
    over the batch (with ``reduction="mean"``); averaging it over classes as well would divide the soft
    term by C. The factor T^2 keeps the soft gradients, which scale as 1/T^2, comparable to the hard
    ones as T changes (``derivations/02-distillation.md``).

    The soft term is computed as alpha T sum_c p_t (T log p_t - T log p_s), whose factors stay finite
    for every T > 0 (as T -> 0 it tends to alpha T (max z_s - z_s at the teacher's top class)).
    Masked classes: a teacher logit of -inf is a class of probability 0, and 0 log 0 = 0, so the
    loss and its gradients stay finite (the class gets no gradient). A student logit of -inf where
    the teacher has mass (a computed probability > 0) makes the KL divergence +inf, and the loss is
    +inf: the student rules out what the teacher deems possible, the convention of
    ``torch.nn.functional.kl_div``; no gradient is promised there, and at alpha = 0 the soft term is
    0 * inf = nan by IEEE. A student logit of -inf where the teacher has no mass is harmless.

    Args:
        student_logits: (B, C) logits of the model being trained.
        teacher_logits: (B, C) logits of the teacher.
        y: (B,) integer labels in [0, C).
        T: temperature > 0.
        alpha: weight of the soft term, in [0, 1].
        reduction: "mean", "sum" or "none".
    """
    T = check_positive(T, "T")
    alpha = check_interval(alpha, "alpha", 0.0, 1.0)
    student_logits = as_float64(student_logits, "student_logits")
    teacher_logits = as_float64(teacher_logits, "teacher_logits")
    batch, classes = check_ndim(student_logits, "student_logits", ndim=2)
    if anp.shape(getval(teacher_logits)) != (batch, classes):
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {(batch, classes)}, "
            f"got {anp.shape(getval(teacher_logits))}"
        )
    y = check_labels(y, batch, classes)
    p_teacher = softmax(teacher_logits, T)
    # The double where: a class without teacher mass (a logit of -inf, a masked class) adds
    # 0 log 0 = 0. Its log-probabilities, -inf there, become 0 before they meet the zero, so neither
    # the value nor the gradient forms 0 * inf.
    has_mass = getval(p_teacher) > 0
    teacher_term = anp.where(has_mass, _tempered_log_softmax(teacher_logits, T), 0.0)
    student_term = anp.where(has_mass, _tempered_log_softmax(student_logits, T), 0.0)
    tempered_kl = anp.sum(p_teacher * (teacher_term - student_term), axis=-1)  # T * KL
    hard = -pick(log_softmax(student_logits), y)
    return reduce_loss(alpha * T * tempered_kl + (1.0 - alpha) * hard, reduction)


def _tempered_log_softmax(z, T):
    """T log softmax(z; T) = (z - c) - T log sum_j exp((z_j - c)/T), c = max z: finite at every T > 0.

    log softmax(z; T) alone tends to -inf like (z_k - c)/T as T -> 0, and T^2 KL would then be
    0 * inf; T times it tends to z_k - c. For T >= 1 it is T times :func:`log_softmax`.
    """
    if T < 1.0:
        gap = z - _shift(z)
        return gap - T * anp.log(anp.sum(anp.exp(_shifted_scaled(z, T)), axis=-1, keepdims=True))
    return T * log_softmax(z, T)
