"""Center loss in PyTorch: the functions (same names and arguments as ``refimpl.center``) and the
``CenterLoss`` module, whose centers move by Wen et al.'s rule during training, no optimizer needed.

Derivation: ``derivations/08-center-loss.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from softmax_common.checks import check_interval, check_nonnegative, check_positive_int, check_reduction
from torch_port.checkpoint_checks import AtomicLoad
from torch_port.keyword_only import keyword_hyperparameters
from torch_port.tensor_checks import (
    check_feature_width,
    check_features_table_labels,
    compute_dtype,
    reduce_loss,
)


def _check_features_labels_centers(x, y, centers):
    """Validate x (B, D), y (B,), centers (C, D); returns them in the compute dtype, y as int64."""
    y = check_features_table_labels(x, centers, y, "centers")
    dtype = compute_dtype(("x", x), ("centers", centers))
    return x.to(dtype), y, centers.to(dtype)


def center_loss(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""Center loss: half the squared distance of each feature to its class center.

    .. math:: \ell_i = \tfrac{1}{2} \| x_i - c_{y_i} \|_2^2

    Under ``reduction="mean"``, :math:`\partial L / \partial x_i = (x_i - c_{y_i}) / B`. Computed in
    float32 at least (float64 stays float64), with autocast disabled inside.

    Args:
        x: (B, D) features.
        y: (B,) integer labels in [0, C).
        centers: (C, D) class centers (a buffer, or a parameter when the centers are learned).
        reduction: "mean" (over the batch), "sum" or "none".

    Returns:
        The loss: a scalar, or (B,) for ``reduction="none"``.

    References:
        Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face Recognition",
        ECCV 2016, eq. (2).
    """
    reduction = check_reduction(reduction)
    x, y, centers = _check_features_labels_centers(x, y, centers)
    with torch.autocast(device_type=x.device.type, enabled=False):
        diff = x - centers.index_select(0, y)
        return reduce_loss(0.5 * (diff * diff).sum(dim=1), reduction)


def center_update(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    r"""The centers after one step of Wen et al.'s rule, as a new tensor (``centers`` is not modified).

    .. math::

        c_j \leftarrow c_j - \alpha \, \frac{\sum_{i:\, y_i = j} (c_j - x_i)}{1 + n_j}

    Classes absent from the batch (n_j = 0) keep their centers exactly. The per-class sums use
    ``index_add`` (memory O(C D), not a (C, B) one-hot matrix, which matters at 1e5+ classes).

    Rows of x with a nan or infinite entry are skipped, as ``refimpl.center_update`` skips them:
    they count neither in n_j nor in the sum, so one bad batch cannot make a center non-finite
    for good. The mask is computed on the device (no host synchronisation).

    Args:
        x: (B, D) features; pass ``x.detach()`` in a training loop (the rule is not a gradient step).
        y: (B,) integer labels in [0, C).
        centers: (C, D) current centers.
        alpha: step size in (0, 1] (default 0.5).

    Returns:
        (C, D) updated centers in the compute dtype (float32, or float64 for float64 inputs).

    References:
        Wen et al., ECCV 2016, eq. (4) and Algorithm 1.
    """
    alpha = check_interval(alpha, "alpha", 0.0, 1.0, low_open=True)
    x, y, centers = _check_features_labels_centers(x, y, centers)
    with torch.autocast(device_type=x.device.type, enabled=False):
        finite = torch.isfinite(x).all(dim=1)  # (B,): the rows the rule may use
        members = torch.zeros(centers.shape[0], dtype=centers.dtype, device=centers.device)
        counts = members.index_add(0, y, finite.to(centers.dtype))[:, None]
        # skipped rows add 0, not 0 * nan (torch.where, not a multiplication by the mask)
        pulls = torch.where(finite[:, None], centers.index_select(0, y) - x, 0.0)
        delta = torch.zeros_like(centers).index_add(0, y, pulls)
        return centers - alpha * delta / (1.0 + counts)


class CenterLoss(AtomicLoad, nn.Module):
    r"""Center loss with its own centers, updated by Wen et al.'s rule in training mode.

    .. math:: L = \lambda \cdot \mathrm{reduce}_i \tfrac{1}{2}\|x_i - c_{y_i}\|^2

    ``forward(x, y)`` returns ``loss_weight * center_loss(x, y, centers)``. When it is a training
    step (the module is in training mode and autograd is enabled, so not under ``torch.no_grad()``
    or ``torch.inference_mode()``) and the centers are not learned, it then moves the centers by
    :func:`center_update` with ``x.detach()``, inside ``torch.no_grad()``. The update happens after
    the loss is computed, so the loss (and its gradient) uses the centers from before the step, as in
    Wen et al.'s Algorithm 1; the buffer is written in place, and the loss does not keep it for the
    backward pass, so ``loss.backward()`` afterwards is valid. Add it to the softmax loss of the
    same features: ``loss = F.cross_entropy(logits, y) + center(features, y)``.

    Non-finite features (an overflow under float16 autocast, a diverging backbone): the update
    skips those rows (:func:`center_update`), so the centers stay finite, while the loss and its
    gradient still carry the inf or nan. AMP's ``GradScaler`` sees them and skips the optimizer
    step; the centers, which the scaler does not govern, have moved by the finite rows only.

    ``learn_centers=True`` makes the centers an ``nn.Parameter`` that the optimizer moves by the
    gradient of the loss instead (no rule update then).

    ``load_state_dict`` is all or nothing (centers of another shape are refused before anything is
    copied). Not thread-safe: the training forward writes the centers in place, so one module must
    not be called from several threads at once.

    Initialisation: zeros. The released caffe prototxt fills the centers with xavier noise; we start
    at zeros because the rule moves each center most of the way to its class mean the first time its
    class appears (by alpha n/(1+n)), so the start is forgotten within a few steps, and zeros make the
    module deterministic without drawing random numbers.

    Args:
        num_classes: C >= 1. dim: feature dimension D >= 1.
        alpha: the centers' step size in (0, 1] (default 0.5).
        loss_weight: lambda >= 0, the weight of the center loss (default 1.0).
        learn_centers: learn the centers by gradient (an ``nn.Parameter``) instead of the rule.
        reduction: "mean" (over the batch), "sum" or "none".
        device, dtype: where and in which dtype to create the centers.

    References:
        Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face Recognition",
        ECCV 2016, Algorithm 1.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        alpha: float = 0.5,
        loss_weight: float = 1.0,
        learn_centers: bool = False,
        reduction: str = "mean",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.dim = check_positive_int(dim, "dim")
        self.alpha = check_interval(alpha, "alpha", 0.0, 1.0, low_open=True)
        self.loss_weight = check_nonnegative(loss_weight, "loss_weight")
        if not isinstance(learn_centers, bool):
            raise TypeError(f"learn_centers must be a bool, got {type(learn_centers).__name__}")
        self.learn_centers = learn_centers
        self.reduction = check_reduction(reduction)
        centers = torch.zeros(self.num_classes, self.dim, device=device, dtype=dtype)
        if learn_centers:
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_feature_width(x, self.centers, "CenterLoss", "centers")
        loss = self.loss_weight * center_loss(x, y, self.centers, self.reduction)
        if self.training and not self.learn_centers and torch.is_grad_enabled():
            with torch.no_grad():
                self.centers.copy_(center_update(x.detach(), y, self.centers, self.alpha))
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, alpha={self.alpha}, "
            f"loss_weight={self.loss_weight}, learn_centers={self.learn_centers}, reduction={self.reduction!r}"
        )


__all__ = ["CenterLoss", "center_loss", "center_update"]
