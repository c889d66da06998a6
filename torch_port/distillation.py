"""``DistillationLoss``: the module form of :func:`torch_port.functional.distillation_loss`."""

from __future__ import annotations

import torch
from torch import nn

from softmax_common.checks import check_interval, check_positive, check_reduction
from torch_port.keyword_only import keyword_hyperparameters
from torch_port.softmax import distillation_loss


class DistillationLoss(nn.Module):
    r"""Hinton et al. (2015) distillation loss with fixed temperature and weight.

    .. math:: \alpha T^2 \mathrm{KL}(p_t^T \| p_s^T) + (1 - \alpha)\,\mathrm{CE}(z_s, y)

    Args:
        T: temperature > 0 (default 4.0).
        alpha: weight of the soft term in [0, 1] (default 0.9).
        reduction: "mean" (KL summed over classes, averaged over the batch), "sum" or "none".

    Example:
        >>> criterion = DistillationLoss(T=4.0, alpha=0.9)
        >>> with torch.no_grad():
        ...     teacher_logits = teacher(images)
        >>> loss = criterion(student(images), teacher_logits, labels)
    """

    @keyword_hyperparameters
    def __init__(self, *, T: float = 4.0, alpha: float = 0.9, reduction: str = "mean") -> None:
        super().__init__()
        self.T = check_positive(T, "T")
        self.alpha = check_interval(alpha, "alpha", 0.0, 1.0)
        self.reduction = check_reduction(reduction)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, y, self.T, self.alpha, self.reduction)

    def extra_repr(self) -> str:
        return f"T={self.T}, alpha={self.alpha}, reduction={self.reduction!r}"
