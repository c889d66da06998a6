"""The class-sharded margin head: an nn.Module whose class weights are split over the ranks."""

from __future__ import annotations

import copy

import torch
from torch import nn

from softmax_common.checks import (
    check_ignore_index,
    check_interval,
    check_positive,
    check_positive_int,
    check_reduction,
)
from torch_port.distributed.agreement import shard_range
from torch_port.distributed.checkpoints import check_shard_metadata, shard_metadata
from torch_port.distributed.collectives import rank_and_world
from torch_port.distributed.loss import sharded_logits, sharded_loss
from torch_port.engine import MarginConfig
from torch_port.heads import MarginHead
from torch_port.keyword_only import keyword_hyperparameters
from torch_port.row_params import by_label_tables, with_by_label_table
from torch_port.tensor_checks import check_chunk_size


class ShardedMarginHead(nn.Module):
    """A margin head whose class weights are split over the ranks of a process group.

    Used like the single-process heads on every rank: ``loss = head(x, y)`` with the rank's own
    batch, then ``loss.backward()`` and the optimizer step; ``head.logits(x)`` gives the margin-free
    (B_r, C) logits for inference. The loss is that of the global batch (the same on every rank);
    see :func:`sharded_margin_cross_entropy` for what it computes and what gradients it gives.

    The head owns ``weight`` of shape ``(class_end - class_start, dim)``: the rows
    ``[class_start, class_end) = shard_range(num_classes, world_size, rank)`` of the full (C, D)
    weight. Initialisation is that of :class:`torch_port.heads.MarginHead`, N(0, 0.01^2), drawn
    from each rank's own random state.

    Checkpoints: ``state_dict()`` holds the shard and its place (``_extra_state``: num_classes,
    dim, world_size, rank, class_start, class_end). Save one file per rank and load it back on the
    same rank of a group of the same size; ``load_state_dict`` refuses another rank's shard before
    changing anything. To change the world size (or go to a single-process head), merge the files
    with :func:`merge_shard_weights` and give the full weight to :meth:`load_full_weight` of each
    new head (or copy it into a single-process head's ``weight``). A head on the default group
    (``group=None``) also pickles and saves whole (``torch.save(head, f)``; load it with
    ``weights_only=False`` on the same rank); one on an explicit group holds that ProcessGroup,
    which does not pickle (a TypeError): save its ``state_dict()`` instead.

    Every rank must make the same call at the same time (``head(x, y)`` or ``head.logits(x)``):
    the ranks compare the call they are making before anything is sent, and all raise a ValueError
    if they differ. A rank may hold an empty batch (x of shape (0, D)) as long as some rank does not.

    Args:
        num_classes: C >= the world size. dim: D >= 1.
        config: the loss, a :class:`torch_port.engine.MarginConfig` (e.g.
            ``arcface_config(64.0, 0.5, False)`` from :mod:`torch_port.normalized`); the same on
            every rank. A learned scale is a config whose ``scale`` is an ``nn.Parameter``: the head
            registers it as ``self.scale`` (so the optimizer and ``state_dict`` see it) and each
            rank's copy receives the whole gradient.
        reduction, sample_rate, feature_grad_scale, chunk_size, generator, group, ignore_index: as
            :func:`sharded_margin_cross_entropy`.
        statistics: the batch statistics of a stateful head (``CurricularFace(...).statistics``,
            ``AdaFace(...).statistics``; ``from_head`` copies them): updated from the global batch in
            training forwards, the same on every rank; their configuration replaces ``config``.
            A configuration with k sub-centres per class (``subcenter_arcface_config``) makes
            ``weight`` ((class_end - class_start) k, dim).
        device, dtype: where and in which dtype to create ``weight``.

    References:
        An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCV 2021
        Workshops.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        config: MarginConfig,
        *,
        reduction: str = "mean",
        sample_rate: float = 1.0,
        feature_grad_scale: float = 1.0,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        group=None,
        ignore_index: int | None = -1,
        statistics: nn.Module | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.ignore_index = check_ignore_index(ignore_index)
        if statistics is not None and not (hasattr(statistics, "update") and hasattr(statistics, "margin_config")):
            raise TypeError(f"statistics must be a head's statistics module (update, margin_config), got {statistics}")
        # A stateful head's batch statistics (CurricularFace's t, AdaFace's norm mean and std): a
        # submodule, so its buffers are saved, loaded and moved with the shard; updated from the
        # global batch in training forwards, and its configuration replaces ``config`` in every call.
        self.statistics = statistics
        if not isinstance(config, MarginConfig):
            raise TypeError(f"config must be a torch_port.engine.MarginConfig, got {type(config).__name__}")
        tables = by_label_tables(config)
        if tables:  # per-class margins: a buffer, so that .to() moves them and state_dict() saves them
            self.register_buffer("class_margins", tables[0].detach().clone())
        self.rank, self.world_size = rank_and_world(group)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.dim = check_positive_int(dim, "dim")
        self.class_start, self.class_end = shard_range(self.num_classes, self.world_size, self.rank)
        self.config = config
        self.reduction = check_reduction(reduction)
        self.sample_rate = check_interval(sample_rate, "sample_rate", 0.0, 1.0, low_open=True)
        self.feature_grad_scale = check_positive(feature_grad_scale, "feature_grad_scale")
        self.chunk_size = check_chunk_size(chunk_size)
        self.generator = generator
        self.group = group
        if isinstance(config.scale, nn.Parameter):
            # A learned scale: registered here so that parameters(), the optimizer and state_dict()
            # see it. Every rank holds a copy; its gradient is summed over the ranks (the whole ds).
            self.scale = config.scale
        # Global indices of the classes the last sampled forward kept on this rank (None: all).
        self.last_kept_classes: torch.Tensor | None = None
        rows = (self.class_end - self.class_start) * config.subcenters  # k rows per class for sub-centres
        self.weight = nn.Parameter(torch.empty(rows, self.dim, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def from_head(cls, head: MarginHead, *, group=None, **options) -> ShardedMarginHead:
        """The sharded twin of a single-process head: its configuration, reduction, chunk size,
        device and dtype, and this rank's rows of its weight. ``options`` go to the constructor
        (sample_rate, feature_grad_scale, generator). Annealed heads (L-Softmax, SphereFace) give
        the configuration of their current step, which then stays fixed; a head whose scale is
        learned (``NormFace(learn_scale=True)``) is refused, see ``config`` above instead."""
        if not isinstance(head, MarginHead):
            raise TypeError(f"head must be a torch_port.heads.MarginHead, got {type(head).__name__}")
        config = head.margin_config()
        if isinstance(config.scale, torch.Tensor) and config.scale.requires_grad:
            raise ValueError(
                f"from_head copies fixed configurations; {type(head).__name__}'s scale is learned. Build "
                "ShardedMarginHead(num_classes, dim, config) with config.scale an nn.Parameter instead "
                "(e.g. normface_config(nn.Parameter(torch.tensor(16.0))))"
            )
        sharded = cls(
            head.num_classes,
            head.dim,
            config,
            reduction=head.reduction,
            chunk_size=head.chunk_size,
            ignore_index=head.ignore_index,
            statistics=copy.deepcopy(head.statistics) if hasattr(head, "statistics") else None,
            group=group,
            device=head.weight.device,
            dtype=head.weight.dtype,
            **options,
        )
        sharded.load_full_weight(head.weight)
        return sharded

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def current_config(self) -> MarginConfig:
        """The configuration of the next call: ``config``, or the statistics' current one."""
        config = self.config if self.statistics is None else self.statistics.margin_config()
        if hasattr(self, "class_margins"):
            config = with_by_label_table(config, self.class_margins)
        return config

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        updating = self.statistics is not None and self.training and torch.is_grad_enabled()
        loss, kept = sharded_loss(
            x,
            self.weight,
            y,
            self.current_config(),
            num_classes=self.num_classes,
            reduction=self.reduction,
            sample_rate=self.sample_rate if self.training else 1.0,
            feature_grad_scale=self.feature_grad_scale,
            chunk_size=self.chunk_size,
            generator=self.generator,
            group=self.group,
            owner=type(self).__name__,
            ignore_index=self.ignore_index,
            statistics=self.statistics if updating else None,
        )
        self.last_kept_classes = kept
        return loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Margin-free logits (B_r, C) of this rank's samples, all classes (a collective)."""
        config, owner = self.current_config(), type(self).__name__
        return sharded_logits(x, self.weight, config, num_classes=self.num_classes, group=self.group, owner=owner)

    # --- checkpoints ---

    def get_extra_state(self) -> dict:
        start, end, k = self.class_start, self.class_end, self.config.subcenters
        return shard_metadata(self.num_classes, self.dim, self.world_size, self.rank, start, end, k)

    def set_extra_state(self, state) -> None:
        check_shard_metadata(state, self.get_extra_state())  # already checked before any copy; cheap to repeat

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checked before the weight is copied, so a refused checkpoint changes nothing.
        key = prefix + "_extra_state"
        if key in state_dict:
            check_shard_metadata(state_dict[key], self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows of a full (num_classes k, dim) weight into the shard (k sub-centre
        rows per class, 1 without sub-centres)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        k = self.config.subcenters
        if tuple(weight.shape) != (self.num_classes * k, self.dim):
            raise ValueError(
                f"weight must have shape ({self.num_classes * k}, {self.dim}) (the full weight), "
                f"got {tuple(weight.shape)}"
            )
        self.weight.copy_(weight[self.class_start * k : self.class_end * k])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, classes=[{self.class_start}, {self.class_end}), "
            f"rank={self.rank}/{self.world_size}, reduction={self.reduction!r}, sample_rate={self.sample_rate}"
        )


__all__ = ["ShardedMarginHead"]
