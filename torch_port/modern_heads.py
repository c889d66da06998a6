r"""nn.Module heads of the modern margins, part I: Sub-center ArcFace and ElasticFace.

- :class:`SubCenterArcFace` (Deng et al., ECCV 2020): k weight rows per class, with the data
  cleaning of the paper: :meth:`SubCenterArcFace.dominant_subcenters` and
  :meth:`SubCenterArcFace.outliers`.
- :class:`ElasticArcFace`, :class:`ElasticCosFace` (Boutros et al., CVPRW 2022): the margin of each
  sample drawn from N(m, sigma) in every training forward (a per-sample margin of the engine).

State moves only in training mode (and with autograd enabled), only after the call's checks passed.
"""

from __future__ import annotations

import math

import torch

from softmax_common.checks import (
    check_flag,
    check_interval,
    check_margin_grad,
    check_nonnegative,
    check_positive_int,
    check_scale,
)
from torch_port.chunked_generic import target_rows_of
from torch_port.engine import MarginConfig, check_inputs
from torch_port.geometry import target_cos_and_angle, unit_rows
from torch_port.heads import MarginHead
from torch_port.keyword_only import keyword_hyperparameters
from torch_port.margins import angular_margin, arcface_config, cosface_config, cosine_margin, subcenter_arcface_config


def _options(reduction, chunk_size, ignore_index, device, dtype) -> dict:
    return dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index, device=device, dtype=dtype)


class SubCenterArcFace(MarginHead):
    r"""Sub-center ArcFace head: k weight rows (sub-centres) per class, a class's cosine the largest of its rows'.

    .. math:: \cos\theta_{ij} = \max_{r < k} \cos\angle(x_i, W_{jk + r}), \qquad
              z_{i y_i} = s\,\psi(\theta_{i y_i}), \quad z_{ij} = s \cos\theta_{ij}

    ``weight`` is (num_classes k, dim), rows j k .. j k + k - 1 belonging to class j; psi is
    ArcFace's (torch_port.functional.subcenter_arcface_loss). The paper's data cleaning, after
    training with k sub-centres: each class's dominant sub-centre (the one most of its samples are
    closest to), then the samples farther than 75 degrees from their class's dominant sub-centre are
    dropped as label noise, and training goes on with k = 1 (the dominant rows,
    :meth:`dominant_weight`).

    State: ``subcenter_counts`` (C, k), a buffer: how many training samples of each class chose each
    sub-centre (their arg-max), counted in training forwards (training mode, autograd enabled,
    after the checks passed; ignored rows not counted).

    Args:
        num_classes: C >= 1. dim: D >= 1.
        k: sub-centres per class, an int >= 1 (default 3, the paper's).
        s: scale in (0, 1e4] (default 64). m: angular margin in radians in [0, pi/2] (default 0.5).
        easy_margin: a bool (default False). margin_grad: "exact" (default) or "detached".
        reduction, chunk_size (classes per chunk, cut at whole classes), ignore_index, device, dtype:
            as :class:`torch_port.heads.MarginHead`.

    References:
        Deng, Guo, Liu, Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by Large-Scale
        Noisy Web Faces", ECCV 2020; insightface, recognition/subcenter_arcface.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        k: int = 3,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        k = check_positive_int(k, "k")
        config = subcenter_arcface_config(s, m, k, easy_margin, margin_grad)  # checks every hyperparameter
        super().__init__(
            num_classes, dim, rows_per_class=k, **_options(reduction, chunk_size, ignore_index, device, dtype)
        )
        self.k, self.s, self.m = k, config.scale, m
        self.easy_margin, self.margin_grad = check_flag(easy_margin, "easy_margin"), margin_grad
        self.register_buffer("subcenter_counts", torch.zeros(self.num_classes, k, dtype=torch.long, device=device))

    def margin_config(self) -> MarginConfig:
        return subcenter_arcface_config(self.s, self.m, self.k, self.easy_margin, self.margin_grad)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = super().forward(x, y)  # checks everything first
        if self.training and torch.is_grad_enabled():
            self._count_nearest(x, self.checked_labels(x, y), self.subcenter_counts)
        return loss

    def _count_nearest(self, x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> None:
        """Add each sample's nearest sub-centre of its class to ``counts`` (C, k); ignored rows not counted."""
        with torch.no_grad():
            chosen = self.nearest_subcenters(x, labels.clamp_min(0))
            flat = (labels.clamp_min(0) * self.k + chosen)[labels >= 0]
            counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def nearest_subcenters(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """For each sample, the index in [0, k) of its class's sub-centre nearest to it (no gradient).
        Reads only the k rows of each sample's class, as the chunked path's target side does."""
        with torch.no_grad():
            dtype = torch.promote_types(x.dtype, torch.float32)
            x_hat, _ = unit_rows(x.detach().to(dtype))
            return target_rows_of(x_hat, self.weight, y, self.k, dtype) - y * self.k

    def dominant_subcenters(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """(C,) the dominant sub-centre of each class, in [0, k): the one most samples chose.

        With ``x, y`` (features and labels, e.g. the whole training set in batches concatenated): the
        counts of those samples' nearest sub-centres; without: the counts of the training forwards so
        far (``subcenter_counts``). A class no sample chose gets sub-centre 0."""
        if (x is None) != (y is None):
            raise ValueError("dominant_subcenters takes both x and y, or neither")
        if x is None:
            counts = self.subcenter_counts
        else:
            self.check_features(x)
            counts = torch.zeros_like(self.subcenter_counts)
            self._count_nearest(x, self.checked_labels(x, y), counts)
        return counts.argmax(dim=1)

    def dominant_weight(self, dominant: torch.Tensor | None = None) -> torch.Tensor:
        """(C, D): each class's dominant sub-centre row (a copy), the weight of an ArcFace head for the
        paper's second stage (``ArcFace(C, D).weight.copy_(head.dominant_weight())``)."""
        dominant = self.dominant_subcenters() if dominant is None else dominant
        rows = torch.arange(self.num_classes, device=dominant.device) * self.k + dominant
        return self.weight.detach()[rows].clone()

    def outliers(
        self, x: torch.Tensor, y: torch.Tensor, threshold: float = math.radians(75.0), dominant=None
    ) -> torch.Tensor:
        """A bool mask (B,): the samples whose angle to their class's dominant sub-centre exceeds
        ``threshold`` (radians; default 75 degrees = 1.309, the paper's), the noise to drop. Ignored
        rows (``ignore_index``) are never outliers. ``dominant``: (C,) from :meth:`dominant_subcenters`
        (default: from the counts of the training forwards)."""
        self.check_features(x)
        threshold = check_interval(threshold, "threshold (an angle in radians: 75 degrees is 1.309)", 0.0, math.pi)
        labels = check_inputs(x, self.weight, y, subcenters=self.k, ignore_index=self.ignore_index)
        dominant = self.dominant_subcenters() if dominant is None else dominant
        with torch.no_grad():
            kept, rows = labels >= 0, labels.clamp_min(0)
            x_hat, x_norm = unit_rows(x.detach().to(torch.promote_types(x.dtype, torch.float32)))
            w_hat, w_norm = unit_rows(self.weight.detach()[rows * self.k + dominant[rows]].to(x_hat.dtype))
            _, theta = target_cos_and_angle(x_hat, w_hat, ((x_norm > 0) & (w_norm > 0))[:, 0])
            return kept & (theta > threshold)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, s={self.s}, m={self.m}, easy_margin={self.easy_margin}"


class _ElasticMargin(MarginHead):
    """ElasticFace's draw: m_i ~ N(m, sigma) per sample in each training forward (eval mode: m)."""

    kind = "angular"

    def __init__(self, num_classes, dim, *, s, m, sigma, plus, margin_grad, generator, **options) -> None:
        s, margin_grad = check_scale(s), check_margin_grad(margin_grad)
        m = angular_margin(m) if self.kind == "angular" else cosine_margin(m)
        sigma, plus = check_nonnegative(sigma, "sigma"), check_flag(plus, "plus")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        super().__init__(num_classes, dim, **options)
        self.s, self.m, self.sigma, self.plus, self.margin_grad = s, m, sigma, plus, margin_grad
        self.generator = generator

    def config_with(self, m) -> MarginConfig:
        raise NotImplementedError

    def margin_config(self) -> MarginConfig:
        return self.config_with(self.m)

    def draw_margins(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) margins m_i ~ N(m, sigma), clipped to the margin's range ([0, pi/2] for the angular
        margin, >= 0 for the cosine one; the official code does not clip, and a draw outside would
        be refused). With ``plus``: the draws sorted and handed out by the rank of cos theta_y, the
        largest cosine (the easiest sample) getting the smallest margin."""
        if self.generator is None:  # torch's global generator: traced by torch.compile
            draws = torch.normal(self.m, self.sigma, (x.shape[0],), dtype=torch.float64, device=x.device)
        else:
            draws = _draw_with(self.generator, self.m, self.sigma, x.shape[0]).to(x.device)
        draws = draws.clamp(0.0, math.pi / 2) if self.kind == "angular" else draws.clamp_min(0.0)
        if not self.plus:
            return draws
        with torch.no_grad():
            labels = y.clamp_min(0)
            x_hat, _ = unit_rows(x.detach().to(torch.promote_types(x.dtype, torch.float32)))
            w_hat, _ = unit_rows(self.weight.detach()[labels].to(x_hat.dtype))
            order = torch.argsort(torch.linalg.vecdot(x_hat, w_hat), descending=True)
            assigned = torch.empty_like(draws)
            assigned[order] = torch.sort(draws).values  # rank r (r-th largest cosine) gets the r-th smallest draw
            return assigned

    def forward_config(self, x: torch.Tensor, y: torch.Tensor) -> MarginConfig:
        if not (self.training and torch.is_grad_enabled()):
            return self.margin_config()
        labels = self.checked_labels(x, y)  # checked before the draw, so a failed call draws nothing
        return self.config_with(self.draw_margins(x, labels))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, sigma={self.sigma}, plus={self.plus}"


@torch.compiler.disable
def _draw_with(generator: torch.Generator, mean: float, std: float, count: int) -> torch.Tensor:
    """count draws of N(mean, std^2) in float64 from ``generator``, on its device. Outside any compiled
    graph: torch.compile cannot trace a torch.Generator argument (torch 2.13: "Failed to convert
    args/kwargs to proxy"), so with a generator a compiled step breaks its graph here, once."""
    return torch.normal(mean, std, (count,), generator=generator, device=generator.device, dtype=torch.float64)


class ElasticArcFace(_ElasticMargin):
    r"""ElasticFace-Arc: ArcFace whose margin is drawn per sample, m_i ~ N(m, sigma), in every training step.

    .. math:: z_{i y_i} = s \cos(\theta_{i y_i} + m_i), \qquad m_i \sim \mathcal{N}(m, \sigma^2)

    (with ArcFace's fallback past pi - m_i, sample by sample; the official code has none). Eval mode,
    and forwards under ``torch.no_grad()``, use m itself. ``plus=True`` is ElasticFace-Arc+: the
    draws sorted and handed out by the rank of cos theta_y, the largest cosine getting the smallest
    margin, the paper's intent. The official code (fdbtrs/ElasticFace, utils/losses.py) writes
    ``margin[idicate_cosie]``, which gives sample i the draw at the position of the i-th largest
    cosine's index, not the draw of sample i's own rank; this head follows the paper.

    Args:
        num_classes: C >= 1. dim: D >= 1. s: scale (default 64). m: the mean margin in radians in
            [0, pi/2] (default 0.5). sigma: the standard deviation >= 0 (default 0.05, the
            repository's config/config.py for ElasticArcFace; 0.0175 there for the "+" variant).
            Draws are clipped to [0, pi/2].
        plus: the "+" variant (default False). margin_grad: "exact" (default) or "detached".
        generator: a torch.Generator for the draws (reproducible runs); default torch's global one.
            Under torch.compile the draw from a generator of one's own runs outside the graph (one
            graph break: Dynamo cannot trace a Generator); with the global one (seed it with
            torch.manual_seed) the step compiles with fullgraph=True.
        reduction, chunk_size, ignore_index, device, dtype: as :class:`torch_port.heads.MarginHead`.

    References:
        Boutros, Damer, Kirchbuchner, Kuijper, "ElasticFace: Elastic Margin Loss for Deep Face
        Recognition", CVPR Workshops 2022; github.com/fdbtrs/ElasticFace, utils/losses.py.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        m: float = 0.5,
        sigma: float = 0.05,
        plus: bool = False,
        easy_margin: bool = False,
        margin_grad: str = "exact",
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        self.easy_margin = check_flag(easy_margin, "easy_margin")
        options = _options(reduction, chunk_size, ignore_index, device, dtype)
        super().__init__(
            num_classes, dim, s=s, m=m, sigma=sigma, plus=plus, margin_grad=margin_grad, generator=generator, **options
        )

    def config_with(self, m) -> MarginConfig:
        return arcface_config(self.s, m, self.easy_margin, self.margin_grad)


class ElasticCosFace(_ElasticMargin):
    r"""ElasticFace-Cos: CosFace whose margin is drawn per sample, m_i ~ N(m, sigma), in every training step.

    .. math:: z_{i y_i} = s (\cos\theta_{i y_i} - m_i), \qquad m_i \sim \mathcal{N}(m, \sigma^2)

    As :class:`ElasticArcFace` (eval mode uses m; ``plus`` hands the sorted draws out by the rank of
    cos theta_y, the largest cosine getting the smallest margin); m is a cosine margin, draws clipped
    to >= 0.

    Args:
        num_classes: C >= 1. dim: D >= 1. s: scale (default 64). m: the mean cosine margin >= 0
            (default 0.35). sigma: >= 0 (default 0.05; 0.02 in the repository for the "+" variant).
        plus, margin_grad, generator, reduction, chunk_size, ignore_index, device, dtype: as
            :class:`ElasticArcFace`.

    References:
        Boutros, Damer, Kirchbuchner, Kuijper, "ElasticFace: Elastic Margin Loss for Deep Face
        Recognition", CVPR Workshops 2022; github.com/fdbtrs/ElasticFace, utils/losses.py.
    """

    kind = "cosine"

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        m: float = 0.35,
        sigma: float = 0.05,
        plus: bool = False,
        margin_grad: str = "exact",
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        options = _options(reduction, chunk_size, ignore_index, device, dtype)
        super().__init__(
            num_classes, dim, s=s, m=m, sigma=sigma, plus=plus, margin_grad=margin_grad, generator=generator, **options
        )

    def config_with(self, m) -> MarginConfig:
        return cosface_config(self.s, m, self.margin_grad)


__all__ = ["ElasticArcFace", "ElasticCosFace", "SubCenterArcFace"]
