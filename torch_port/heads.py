"""The base of every margin head: an nn.Module that owns the class weights and asks the engine.

A head is a configuration of torch_port/engine.py plus parameters and state. Subclasses implement
:meth:`MarginHead.margin_config` (the configuration used for training); the margin-free
configuration used by :meth:`MarginHead.logits` is the same with the target transform removed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from softmax_common.checks import check_ignore_index, check_positive_int, check_reduction
from torch_port.checkpoint_checks import AtomicLoad
from torch_port.engine import MarginConfig, check_inputs, margin_cross_entropy, plain_logits
from torch_port.keyword_only import keyword_hyperparameters
from torch_port.tensor_checks import check_chunk_size, check_feature_width


class MarginHead(AtomicLoad, nn.Module):
    """Owns ``weight`` of shape (num_classes, dim), one row per class like ``nn.Linear.weight``.

    ``forward(x, y)`` returns the loss (with the margin); ``logits(x)`` returns margin-free logits
    for inference. Arguments are checked before anything is computed, so a failed call changes no
    parameter or buffer. ``load_state_dict`` is all or nothing: the checkpoint is checked whole
    (shapes, and the values a subclass vets) before anything is copied
    (:class:`torch_port.checkpoint_checks.AtomicLoad`).

    Not thread-safe: one head must not be called from several threads at once. L-Softmax and
    SphereFace advance their schedule in place in each training forward (as ``CenterLoss`` moves
    its centers); like any PyTorch module with running state, a head promises nothing under
    concurrent calls.

    Initialisation: ``weight`` ~ N(0, 0.01^2) elementwise. For heads that normalise W only the
    directions matter, and an isotropic Gaussian gives directions uniform on the sphere; heads
    whose logits use |W_j| override :meth:`reset_parameters`.

    Args:
        num_classes: C >= 1. dim: feature dimension D >= 1.
        reduction: "mean" (over the batch), "sum" or "none".
        chunk_size: None for the plain path; an int for the memory-efficient path over class chunks.
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient.
        rows_per_class: weight rows per class (sub-centres; ``weight`` is (num_classes k, dim)).
        device, dtype: where and in which dtype to create ``weight``.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        rows_per_class: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.dim = check_positive_int(dim, "dim")
        self.reduction = check_reduction(reduction)
        self.chunk_size = check_chunk_size(chunk_size)
        self.ignore_index = check_ignore_index(ignore_index)
        rows = self.num_classes * check_positive_int(rows_per_class, "rows_per_class")
        self.weight = nn.Parameter(torch.empty(rows, self.dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def margin_config(self) -> MarginConfig:
        raise NotImplementedError

    def inference_config(self) -> MarginConfig:
        return dataclasses.replace(self.margin_config(), target=None)

    def check_features(self, x) -> None:
        """x must have this head's dim columns; a mismatch is x's error, naming the head's dim (the
        engine's check, given x and W, would name W's shape)."""
        check_feature_width(x, self.weight, type(self).__name__)

    def checked_labels(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The labels checked against x and this head's weight (range, shape, device; ``ignore_index``
        allowed), as int64: for heads whose configuration depends on them (per-class margins)."""
        k = self.weight.shape[0] // self.num_classes
        return check_inputs(x, self.weight, y, subcenters=k, ignore_index=self.ignore_index)

    def forward_config(self, x: torch.Tensor, y: torch.Tensor) -> MarginConfig:
        """The configuration of this forward: :meth:`margin_config`, unless the margin depends on the
        labels (per-class margins) or on the batch (ElasticFace's draws, AdaFace's statistics)."""
        return self.margin_config()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_features(x)
        config = self.forward_config(x, y)
        return margin_cross_entropy(x, self.weight, y, config, self.reduction, self.chunk_size, self.ignore_index)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Margin-free logits (B, C) for inference: what the argmax and the softmax are taken of."""
        self.check_features(x)
        return plain_logits(x, self.weight, self.inference_config())

    def extra_repr(self) -> str:
        ignored = "" if self.ignore_index == -1 else f", ignore_index={self.ignore_index}"
        return f"num_classes={self.num_classes}, dim={self.dim}, reduction={self.reduction!r}{ignored}"
