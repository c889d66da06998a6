"""Softmax, cross-entropy and knowledge distillation in PyTorch.

Same names, arguments and defaults as ``refimpl.softmax``; inputs of any floating dtype, computed
in float32 (float64 stays float64). See ``derivations/01-softmax.md`` and ``02-distillation.md``.
"""

from __future__ import annotations

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


def naive_softmax(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """exp(z/T) / sum exp(z/T) with no max shift: overflows to nan once a logit/T exceeds ~88.7
    in float32 (~709.8 in float64). Kept to show why :func:`softmax` shifts; do not train with it."""
    e = torch.exp(_scaled(z, T))
    return e / e.sum(dim=-1, keepdim=True)


def softmax(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    r"""Temperature softmax over the last dimension, max-shifted.

    .. math:: \mathrm{softmax}(z; T)_k = e^{(z_k - \max_j z_j)/T} / \sum_j e^{(z_j - \max_j z_j)/T}

    Half-precision inputs are upcast; the result is float32 (float64 for float64 input).

    Example:
        >>> softmax(torch.tensor([1.1, 2.2, 5.0, 10.1]))
        tensor([1.2260e-04, 3.6832e-04, 6.0568e-03, 9.9345e-01])

    Reference: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 (temperature).
    """
    return torch.softmax(_scaled(z, T), dim=-1)  # torch.softmax subtracts the row max internally


def log_softmax(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    r"""log softmax(z; T) = z/T - logsumexp(z/T), finite for logits of +-1e4."""
    return torch.log_softmax(_scaled(z, T), dim=-1)


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
    under ``torch.no_grad()``) unless you mean to train the teacher as well.

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
    log_ps = torch.log_softmax(zs / T, dim=-1)
    log_pt = torch.log_softmax(zt / T, dim=-1)
    # KL(p_t || p_s) per sample; exp(log_pt) is exactly 0 where the teacher underflows, so the
    # 0 * log 0 terms vanish instead of becoming nan.
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    hard = F.cross_entropy(zs, y, reduction="none")
    return reduce_loss(alpha * T**2 * kl + (1.0 - alpha) * hard, reduction)
