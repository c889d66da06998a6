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

    Args:
        z: logits, any shape with at least one axis; the softmax is over the last axis.
        T: temperature, a finite number > 0.

    Returns:
        Probabilities of the same shape as ``z``, each row summing to 1.
    """
    zt = _scaled(z, T)
    e = anp.exp(zt - _shift(zt))
    return e / anp.sum(e, axis=-1, keepdims=True)


def log_softmax(z, T=1.0):
    r"""log softmax(z; T) by the log-sum-exp identity: z/T - c - log sum_j exp(z_j/T - c).

    Never takes the log of a rounded-to-zero probability, so it stays finite for logits of +-1e4.
    """
    zt = _scaled(z, T)
    shifted = zt - _shift(zt)
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
    log_p_teacher = log_softmax(teacher_logits, T)
    log_p_student = log_softmax(student_logits, T)
    kl = anp.sum(anp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    hard = -pick(log_softmax(student_logits), y)
    return reduce_loss(alpha * T**2 * kl + (1.0 - alpha) * hard, reduction)
