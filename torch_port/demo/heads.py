"""The demo's own heads: plain softmax, and softmax with the center loss.

The margin heads are the package's (:mod:`torch_port.normalized_heads`, :mod:`torch_port.angular_heads`);
these two give the table its baselines with the same interface: ``head(x, y)`` is the loss,
``head.logits(x)`` the margin-free logits, ``head.weight`` the (num_classes, dim) class weights.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_port import CenterLoss
from torch_port.functional import cross_entropy
from torch_port.keyword_only import keyword_hyperparameters


class SoftmaxHead(nn.Module):
    """The baseline: a bias-free linear layer and cross-entropy, so logit_j = |W_j| |x| cos theta_j
    like the margin heads' (only without a margin or a normalisation)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.linear(x), y)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SoftmaxCenterHead(SoftmaxHead):
    """Softmax plus the center loss of Wen et al. (2016); the CenterLoss module moves its own centers."""

    @keyword_hyperparameters
    def __init__(self, num_classes: int, dim: int, *, alpha: float, loss_weight: float) -> None:
        super().__init__(num_classes, dim)
        self.center = CenterLoss(num_classes, dim, alpha=alpha, loss_weight=loss_weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(x, y) + self.center(x, y)
