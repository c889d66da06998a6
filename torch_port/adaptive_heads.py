r"""nn.Module heads of the margins that adapt to the sample: CurricularFace, AdaFace, MagFace.

CurricularFace and AdaFace keep statistics of the batches they train on, in a small module of
buffers (:class:`CurricularStatistics`, :class:`AdaFaceStatistics`) that the head owns as
``statistics``: saved and loaded with the head (``statistics.t``, ``statistics.norm_mean``,
``statistics.norm_std``), moved by ``.to()``, and handed to the class-sharded head by
``ShardedMarginHead.from_head``. They move only in a training forward (training mode, autograd
enabled), only after the call's checks passed, and before the margin is computed, as the official
codes do; eval mode and ``torch.no_grad()`` never move them.

Which batch: under the sharded path the statistics are the global batch's (every rank sees the same
rows, and the target cosines come from the ranks holding the classes), so every rank keeps the same
values. Under DistributedDataParallel (each rank its own batch, the whole head on every rank) a head
built with ``statistics="global"`` (the default) all-reduces the batch's sums over the default
process group when one is initialised, so the replicas stay equal and the statistics are those of
the global batch, as a single process with the global batch would have them; ``statistics="local"``
keeps each rank's own (the official codes' behaviour under DDP, where the replicas drift apart).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from softmax_common.checks import check_interval, check_margin_grad
from torch_port.adaptive import (
    ADAFACE_NORM_RANGE,
    adaface_config,
    curricularface_config,
    magface_config,
    magface_min_lambda_g,
)
from torch_port.checkpoint_checks import AtomicLoad
from torch_port.engine import MarginConfig
from torch_port.geometry import target_cos_and_angle, unit_rows
from torch_port.heads import MarginHead
from torch_port.keyword_only import keyword_hyperparameters

STATISTICS_MODES = ("global", "local")


def _check_mode(mode) -> str:
    if mode not in STATISTICS_MODES:
        raise ValueError(f"statistics must be one of {STATISTICS_MODES}, got {mode!r}")
    return mode


def _state_dtype(dtype) -> torch.dtype:
    return torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)


class CurricularStatistics(AtomicLoad, nn.Module):
    """CurricularFace's curriculum parameter t (a 0-d buffer, initially 0), updated from the batch's
    target cosines: t <- momentum mean(cos theta_y) + (1 - momentum) t (the official 0.01), over the
    rows not ignored (a batch with none leaves t as it was)."""

    needs_target_cosines = True

    def __init__(self, *, s: float, m: float, margin_grad: str, momentum: float = 0.01, device=None, dtype=None):
        super().__init__()
        curricularface_config(0.0, s, m, margin_grad)  # checks s, m, margin_grad
        self.s, self.m, self.margin_grad = s, m, margin_grad
        self.momentum = check_interval(momentum, "momentum", 0.0, 1.0)
        self.register_buffer("t", torch.zeros((), device=device, dtype=_state_dtype(dtype)))

    def margin_config(self) -> MarginConfig:
        return curricularface_config(self.t, self.s, self.m, self.margin_grad)

    def sums(self, norms: torch.Tensor, cos_y: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The batch's sufficient statistics, (sum cos theta_y, count) in float64, for an all-reduce."""
        return torch.stack([torch.where(kept, cos_y, 0.0).sum(), kept.sum()]).double()

    def apply(self, sums: torch.Tensor) -> None:
        total, count = sums[0], sums[1]
        mean = total / count.clamp_min(1.0)
        updated = self.momentum * mean + (1.0 - self.momentum) * self.t.double()
        self.t.copy_(torch.where(count > 0, updated, self.t.double()))

    def update(self, norms, cos_y, kept, reduce=None) -> None:
        sums = self.sums(norms, cos_y, kept)
        self.apply(sums if reduce is None else reduce(sums))

    def check_state_values(self, state_dict, prefix: str) -> None:
        key = prefix + "t"
        if key in state_dict:
            value = float(state_dict[key])
            check_interval(value, f"the checkpoint's {key!r}", -1.0, 1.0)

    def extra_repr(self) -> str:
        return f"t={float(self.t):.4g}, momentum={self.momentum}"


class AdaFaceStatistics(AtomicLoad, nn.Module):
    """AdaFace's running mean and standard deviation of the feature norms (0-d buffers, initially 20
    and 100), from the norms clipped to [0.001, 100]: stat <- momentum batch_stat + (1 - momentum)
    stat (momentum 0.01, the official t_alpha of its training script). The standard deviation is the
    unbiased one, as torch.std in the official code; a batch of fewer than two rows (not ignored)
    leaves both as they were (the official code would write nan)."""

    needs_target_cosines = False

    def __init__(self, *, s: float, m: float, h: float, eps: float, margin_grad: str, momentum: float = 0.01, **where):
        super().__init__()
        adaface_config(20.0, 100.0, s, m, h, eps, margin_grad)  # checks the hyperparameters
        self.s, self.m, self.h, self.eps, self.margin_grad = s, m, h, eps, margin_grad
        self.momentum = check_interval(momentum, "momentum", 0.0, 1.0)
        where = dict(device=where.get("device"), dtype=_state_dtype(where.get("dtype")))
        self.register_buffer("norm_mean", torch.full((), 20.0, **where))
        self.register_buffer("norm_std", torch.full((), 100.0, **where))

    def margin_config(self) -> MarginConfig:
        return adaface_config(self.norm_mean, self.norm_std, self.s, self.m, self.h, self.eps, self.margin_grad)

    def sums(self, norms: torch.Tensor, cos_y: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """(sum n, sum n^2, count) of the clipped norms in float64, for an all-reduce."""
        n = torch.where(kept, norms.detach().double().clamp(*ADAFACE_NORM_RANGE), 0.0)
        return torch.stack([n.sum(), (n * n).sum(), kept.sum().double()])

    def apply(self, sums: torch.Tensor) -> None:
        total, squares, count = sums[0], sums[1], sums[2]
        mean = total / count.clamp_min(1.0)
        variance = ((squares - total * mean) / (count - 1.0).clamp_min(1.0)).clamp_min(0.0)
        enough = count >= 2
        for buffer, value in ((self.norm_mean, mean), (self.norm_std, variance.sqrt())):
            updated = self.momentum * value + (1.0 - self.momentum) * buffer.double()
            buffer.copy_(torch.where(enough, updated, buffer.double()))

    def update(self, norms, cos_y, kept, reduce=None) -> None:
        sums = self.sums(norms, cos_y, kept)
        self.apply(sums if reduce is None else reduce(sums))

    def check_state_values(self, state_dict, prefix: str) -> None:
        for name in ("norm_mean", "norm_std"):
            key = prefix + name
            if key in state_dict and not bool(torch.isfinite(state_dict[key]).all()):
                raise ValueError(f"the checkpoint's {key!r} must be finite, got {state_dict[key]}")
        key = prefix + "norm_std"
        if key in state_dict and float(state_dict[key]) < 0:
            raise ValueError(f"the checkpoint's {key!r} must be >= 0, got {float(state_dict[key])}")

    def extra_repr(self) -> str:
        mean, std = float(self.norm_mean), float(self.norm_std)
        return f"norm_mean={mean:.4g}, norm_std={std:.4g}, momentum={self.momentum}"


class _StatisticsHead(MarginHead):
    """A head whose configuration is its ``statistics``' (updated in training forwards first). Its
    hyperparameters live there; ``head.s``, ``head.m``, ``head.margin_grad`` read them."""

    s = property(lambda self: self.statistics.s)
    m = property(lambda self: self.statistics.m)
    margin_grad = property(lambda self: self.statistics.margin_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, statistics={self.statistics_mode!r}"

    def margin_config(self) -> MarginConfig:
        return self.statistics.margin_config()

    def _all_reduce(self):
        if self.statistics_mode == "local" or not (dist.is_available() and dist.is_initialized()):
            return None

        def reduce(sums: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(sums)
            return sums

        return reduce

    def forward_config(self, x: torch.Tensor, y: torch.Tensor) -> MarginConfig:
        if self.training and torch.is_grad_enabled():
            labels = self.checked_labels(x, y)  # every check first: a failed call moves nothing
            with torch.no_grad():
                x_hat, norms = unit_rows(x.detach().to(_state_dtype(x.dtype)))
                cos_y = torch.zeros_like(norms[:, 0])
                if self.statistics.needs_target_cosines:
                    w_hat, w_norm = unit_rows(self.weight.detach()[labels.clamp_min(0)].to(x_hat.dtype))
                    cos_y, _ = target_cos_and_angle(x_hat, w_hat, ((norms > 0) & (w_norm > 0))[:, 0])
                self.statistics.update(norms[:, 0], cos_y, labels >= 0, reduce=self._all_reduce())
        return self.statistics.margin_config()


class CurricularFace(_StatisticsHead):
    r"""CurricularFace head: ArcFace's target, hard negatives modulated by the curriculum parameter t.

    See :func:`torch_port.functional.curricularface_loss` for the logits. t lives in
    ``statistics.t`` (a buffer, initially 0), updated in each training forward before the logits
    are computed: t <- 0.01 mean(cos theta_y) + 0.99 t, without gradient (HuangYG123/CurricularFace,
    head/metrics.py).

    Args:
        num_classes: C >= 1. dim: D >= 1. s: scale (default 64). m: angular margin in radians in
            [0, pi/2] (default 0.5). margin_grad: "exact" (default) or "detached" (the target only).
        momentum: of t's update (default 0.01). statistics: "global" (default; under DDP t is the
            global batch's) or "local" (each rank's own).
        reduction, chunk_size, ignore_index, device, dtype: as :class:`torch_port.heads.MarginHead`.

    References:
        Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition",
        CVPR 2020.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        m: float = 0.5,
        margin_grad: str = "exact",
        momentum: float = 0.01,
        statistics: str = "global",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        hyper = dict(s=s, m=m, margin_grad=margin_grad, momentum=momentum)
        state = CurricularStatistics(**hyper, device=device, dtype=dtype)
        mode = _check_mode(statistics)
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        super().__init__(num_classes, dim, **options, device=device, dtype=dtype)
        self.statistics, self.statistics_mode = state, mode


class AdaFace(_StatisticsHead):
    r"""AdaFace head: a margin set by each feature norm's standing among the batches' norms.

    See :func:`torch_port.functional.adaface_loss`. The running ``statistics.norm_mean`` and
    ``statistics.norm_std`` (buffers, initially 20 and 100) are updated from each training batch's
    norms before the margins are computed, with momentum 0.01 (mk-minchul/AdaFace head.py, with the
    t_alpha of its training script). Feed ``x`` unnormalised: its norm is the quality proxy.

    Args:
        num_classes: C >= 1. dim: D >= 1. s: scale (default 64). m: margin in radians (default
            0.4). h: concentration >= 0 (default 0.333). eps: in (0, 1] (default 1e-3).
        margin_grad, momentum, statistics, reduction, chunk_size, ignore_index, device, dtype: as
            :class:`CurricularFace`.

    References:
        Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        eps: float = 1e-3,
        margin_grad: str = "exact",
        momentum: float = 0.01,
        statistics: str = "global",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        hyper = dict(s=s, m=m, h=h, eps=eps, margin_grad=margin_grad, momentum=momentum)
        state = AdaFaceStatistics(**hyper, device=device, dtype=dtype)
        mode = _check_mode(statistics)
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        super().__init__(num_classes, dim, **options, device=device, dtype=dtype)
        self.statistics, self.statistics_mode = state, mode

    h = property(lambda self: self.statistics.h)
    eps = property(lambda self: self.statistics.eps)


class MagFace(MarginHead):
    r"""MagFace head: ArcFace with a margin growing with the feature norm, plus the norm regulariser.

    See :func:`torch_port.functional.magface_loss`. No state. Warns (UserWarning) when lambda_g is
    below :func:`torch_port.functional.magface_min_lambda_g` of its other hyperparameters (the
    bound the paper's convergence argument needs; the official trainer refuses such a run).

    Args:
        num_classes: C >= 1. dim: D >= 1. s (64), l_a (10), u_a (110), l_m (0.45), u_m (0.8),
            lambda_g (35), easy_margin (True), margin_grad ("exact"): as the functional loss.
        reduction, chunk_size, ignore_index, device, dtype: as :class:`torch_port.heads.MarginHead`.

    References:
        Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
        Assessment", CVPR 2021.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        magface_config(s, l_a, u_a, l_m, u_m, easy_margin, margin_grad, lambda_g)  # every check first
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        super().__init__(num_classes, dim, **options, device=device, dtype=dtype)
        self.s, self.l_a, self.u_a, self.l_m, self.u_m = s, l_a, u_a, l_m, u_m
        self.lambda_g, self.easy_margin, self.margin_grad = lambda_g, easy_margin, check_margin_grad(margin_grad)
        bound = magface_min_lambda_g(s, l_a, u_a, l_m, u_m)
        if lambda_g < bound:
            warnings.warn(
                f"MagFace lambda_g={lambda_g} is below magface_min_lambda_g(s, l_a, u_a, l_m, u_m) = {bound:.4g}, "
                "the least value of the paper's convergence argument (the official trainer refuses it)",
                UserWarning,
                stacklevel=2,
            )

    def margin_config(self) -> MarginConfig:
        args = (self.s, self.l_a, self.u_a, self.l_m, self.u_m, self.easy_margin, self.margin_grad, self.lambda_g)
        return magface_config(*args)

    def extra_repr(self) -> str:
        bounds = f"l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}"
        return f"{super().extra_repr()}, s={self.s}, {bounds}, lambda_g={self.lambda_g}"


__all__ = ["AdaFace", "AdaFaceStatistics", "CurricularFace", "CurricularStatistics", "MagFace"]
