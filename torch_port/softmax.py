"""Softmax, cross-entropy and knowledge distillation in PyTorch.

Same names, arguments and defaults as ``refimpl.softmax``; inputs of any floating dtype, computed
in float32 (float64 stays float64). See ``derivations/01-softmax.md`` and ``02-distillation.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from softmax_common.checks import check_interval, check_positive, check_reduction
from torch_port.tensor_checks import (
    check_float_tensor,
    check_labels,
    check_same_device,
    compute_dtype,
    reduce_loss,
)


def _scaled(z, T, name="z"):
    T = check_positive(T, "T")
    check_float_tensor(z, name, min_ndim=1)
    return z.to(compute_dtype((name, z))) / T


def _divide_small(gap: torch.Tensor, T: float) -> torch.Tensor:
    """gap / T for 0 < T < 1 without forming T, or 1/T, in the compute dtype.

    A tiny T rounds to 0 in float32 (below 1.4e-45), and CUDA divides by a scalar as a product with
    its reciprocal, which overflows (for T < 3e-39): either way 0 / T becomes nan. With T = f 2^e
    (math.frexp, f in [0.5, 1)), gap is scaled by 2^-e in exact power-of-two steps and then divided
    by f: one rounding, and a step overflows only where the quotient does.
    """
    fraction, exponent = math.frexp(T)
    while exponent < 0:
        step = max(exponent, -64)
        gap = gap * 2.0 ** (-step)
        exponent -= step
    return gap / fraction


def _shifted_scaled(z: torch.Tensor, T: float) -> torch.Tensor:
    """(z - max z) / T in the compute dtype, the maximum at exactly 0 (and treated as a constant).

    Subtract first for T < 1 (z / T alone overflows for a tiny T, and inf - inf is nan), divide
    first for T >= 1 (dividing only shrinks; z - max z alone may overflow for a span beyond the
    float range): an intermediate overflows only where the result does.
    """
    T = check_positive(T, "T")
    check_float_tensor(z, "z", min_ndim=1)
    z = z.to(compute_dtype(("z", z)))
    if T < 1.0:
        return _divide_small(z - z.detach().amax(dim=-1, keepdim=True), T)
    zt = z / T
    return zt - zt.detach().amax(dim=-1, keepdim=True)


def _tempered_log_softmax(z: torch.Tensor, T: float) -> torch.Tensor:
    """T log softmax(z; T) = (z - c) - T logsumexp((z - c)/T), c = max z: finite at every T > 0
    (log softmax(z; T) alone tends to -inf like (z - c)/T as T -> 0)."""
    if T < 1.0:
        gap = z - z.detach().amax(dim=-1, keepdim=True)
        return gap - T * torch.logsumexp(_divide_small(gap, T), dim=-1, keepdim=True)
    return T * torch.log_softmax(z / T, dim=-1)


def naive_softmax(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """exp(z/T) / sum exp(z/T) with no max shift: overflows to nan once a logit/T exceeds ~88.7
    in float32 (~709.8 in float64). Kept to show why :func:`softmax` shifts; do not train with it."""
    e = torch.exp(_scaled(z, T))
    return e / e.sum(dim=-1, keepdim=True)


def softmax(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    r"""Temperature softmax over the last dimension, max-shifted.

    .. math:: \mathrm{softmax}(z; T)_k = e^{(z_k - \max_j z_j)/T} / \sum_j e^{(z_j - \max_j z_j)/T}

    Half-precision inputs are upcast; the result is float32 (float64 for float64 input). Every
    T > 0 works: the max is subtracted before a T < 1 divides, so as T -> 0 the result tends to the
    one-hot vector of the largest logit, ties sharing the mass (``refimpl.softmax`` says more).

    Example:
        >>> softmax(torch.tensor([1.1, 2.2, 5.0, 10.1]))
        tensor([1.2260e-04, 3.6832e-04, 6.0568e-03, 9.9345e-01])

    Reference: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 (temperature).
    """
    return torch.softmax(_shifted_scaled(z, T), dim=-1)


def log_softmax(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    r"""log softmax(z; T) = (z - c)/T - logsumexp((z - c)/T), c = max z, finite for logits of +-1e4.

    Where a tiny T puts the true value below the float range the result is -inf (correctly
    rounded), never nan.
    """
    return torch.log_softmax(_shifted_scaled(z, T), dim=-1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""Softmax cross-entropy with integer labels: :math:`\ell_i = \mathrm{logsumexp}(z_i) - z_{i,y_i}`.

    Args:
        logits: (B, C) scores, any floating dtype (computed in at least float32).
        y: (B,) integer labels in [0, C).
        reduction: "mean" (over the batch), "sum" or "none".
    """
    reduction = check_reduction(reduction)
    check_float_tensor(logits, "logits", ndim=2)
    y = check_labels(y, *logits.shape, same_device_as=("logits", logits))
    logits = logits.to(compute_dtype(("logits", logits)))
    return reduce_loss(F.cross_entropy(logits, y, reduction="none"), reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    T: float = 4.0,
    alpha: float = 0.9,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Knowledge distillation: :math:`\alpha T^2 \mathrm{KL}(p_t^T \| p_s^T) + (1-\alpha)\mathrm{CE}(z_s, y)`.

    The KL divergence is summed over classes and averaged over the batch (``reduction="mean"``);
    ``torch.nn.KLDivLoss(reduction="mean")`` would average over classes too and shrink the soft term
    by a factor C. The teacher is not detached here: pass ``teacher_logits.detach()`` (or compute it
    under ``torch.no_grad()``) unless you mean to train the teacher as well. Every T > 0 works (the
    soft term is alpha T sum p_t (T log p_t - T log p_s)). A teacher logit of -inf (a masked class)
    adds 0 log 0 = 0: loss and gradients stay finite. A student logit of -inf where the teacher has
    mass makes the KL, and the loss, +inf, as ``F.kl_div`` does (``refimpl.distillation_loss``).

    Args:
        student_logits, teacher_logits: (B, C) logits.
        y: (B,) integer labels in [0, C).
        T: temperature > 0 (default 4). alpha: weight of the soft term in [0, 1] (default 0.9).
        reduction: "mean", "sum" or "none".

    Reference: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, section 2.
    """
    T = check_positive(T, "T")
    alpha = check_interval(alpha, "alpha", 0.0, 1.0)
    reduction = check_reduction(reduction)
    check_float_tensor(student_logits, "student_logits", ndim=2)
    check_float_tensor(teacher_logits, "teacher_logits", ndim=2)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    check_same_device(("student_logits", student_logits), ("teacher_logits", teacher_logits))
    y = check_labels(y, *student_logits.shape, same_device_as=("student_logits", student_logits))
    dtype = compute_dtype(("student_logits", student_logits), ("teacher_logits", teacher_logits))
    zs, zt = student_logits.to(dtype), teacher_logits.to(dtype)
    p_teacher = torch.softmax(_shifted_scaled(zt, T), dim=-1)
    # The double where: a class without teacher mass (a logit of -inf, a masked class) adds
    # 0 log 0 = 0; its log-probabilities become 0 before they meet the zero, so neither the value
    # nor the gradient forms 0 * inf.
    has_mass = p_teacher > 0
    zero = p_teacher.new_zeros(())
    teacher_term = torch.where(has_mass, _tempered_log_softmax(zt, T), zero)
    student_term = torch.where(has_mass, _tempered_log_softmax(zs, T), zero)
    tempered_kl = (p_teacher * (teacher_term - student_term)).sum(dim=-1)  # T * KL(p_t || p_s)
    hard = F.cross_entropy(zs, y, reduction="none")
    return reduce_loss(alpha * T * tempered_kl + (1.0 - alpha) * hard, reduction)
