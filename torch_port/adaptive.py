r"""The margins that adapt to the sample: CurricularFace, AdaFace, MagFace (the functional API).

Each is a configuration of the engine (torch_port/engine.py), so it runs on the plain, chunked and
sharded paths; the stateful heads (the statistics each keeps between steps) are in
torch_port/adaptive_heads.py.

- CurricularFace (Huang et al., CVPR 2020): ArcFace's target, and every non-target class whose
  cosine exceeds the row's cos(theta_y + m) is a hard negative whose cosine becomes cos (t + cos):
  the engine's non-target modulation (torch_port/plain_path.py), threshold from the target side.
- AdaFace (Kim et al., CVPR 2022): an angular and an additive margin scaled by the feature norm's
  standing in the batch, g = clip(h (|x| - mean) / (std + eps), -1, 1): a transform of the target
  that reads the features' norms (``takes_norms``), without gradient through them.
- MagFace (Meng et al., CVPR 2021): ArcFace with a margin growing with the feature norm, m(a), a =
  clamp(|x|, l_a, u_a), and the per-sample regulariser lambda_g g(a) (the engine's ``penalty``);
  the gradient reaches |x| through both, as in the official code.

The official codes write sin theta as sqrt(1 - cos^2), whose slope is infinite at |cos| = 1; the
engine's angle is the half-angle form, with finite gradients everywhere (torch_port/geometry.py).
Derivation: derivations/11-curricular-adaface-magface.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from softmax_common.checks import (
    check_angular_margin,
    check_bounds_pair,
    check_flag,
    check_interval,
    check_margin_range,
    check_nonnegative,
    check_scale,
)
from softmax_common.closed_forms import magface_min_lambda_g
from torch_port.engine import ABSENT, MarginConfig, margin_cross_entropy, margin_logits
from torch_port.margins import ArcFaceTarget, with_margin_grad

# AdaFace's official head clips the feature norms to [0.001, 100] before anything reads them.
ADAFACE_NORM_RANGE = (0.001, 100.0)


def _like(value, ref: torch.Tensor):
    """A number as it is; a (0-d) tensor statistic in ref's dtype and device, without gradient."""
    return value.detach().to(dtype=ref.dtype, device=ref.device) if isinstance(value, torch.Tensor) else value


def _statistic(value, name: str, check):
    """A statistic given as a number (checked) or as a 0-d floating tensor (a head's buffer, not read)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dim() != 0:
            raise TypeError(f"{name} must be a number or a floating-point 0-d tensor, got {value!r}")
        return value
    return check(value, name)


# ---------------------------------------------------------------------------------------------
# CurricularFace
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurricularTarget:
    """CurricularFace: target cos(theta + m) while theta + m < pi, else cos theta - m sin m; a
    non-target cosine above the row's threshold cos(theta_y + m) becomes cos (t + cos)."""

    m: float
    t: float | torch.Tensor
    modulates_negatives = True  # class attribute: the engine's protocol (torch_port/plain_path.py)

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor) -> torch.Tensor:
        return torch.where(theta_y + self.m < math.pi, torch.cos(theta_y + self.m), cos_y - self.m * math.sin(self.m))

    def threshold(self, cos_y: torch.Tensor, theta_y: torch.Tensor) -> torch.Tensor:
        return torch.cos(theta_y + self.m)

    def hard_negatives(self, cos: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return torch.where(cos > threshold[:, None], cos * (_like(self.t, cos) + cos), cos)


def curricularface_config(t, s, m, margin_grad: str = "exact") -> MarginConfig:
    """CurricularFace as an engine configuration; t a number in [-1, 1] or a 0-d tensor (a head's buffer)."""
    t = _statistic(t, "t", lambda v, n: check_interval(v, n, -1.0, 1.0))
    s, m = check_scale(s), check_angular_margin(m)
    return with_margin_grad(MarginConfig(target=CurricularTarget(m, t), scale=s), margin_grad)


def curricularface_logits(
    x, W, y, t: float = 0.0, s: float = 64.0, m: float = 0.5, margin_grad: str = "exact", ignore_index=ABSENT
) -> torch.Tensor:
    r"""CurricularFace logits (B, C).

    .. math::

        z_{iy} = s\,\psi(\theta_{iy}),\ \psi = \cos(\theta + m) \text{ while } \theta + m < \pi
        \text{ else } \cos\theta - m\sin m; \qquad
        z_{ij} = s\,\cos\theta_{ij}\,(t + \cos\theta_{ij}) \text{ if } \cos\theta_{ij} > \cos(\theta_{iy} + m)
        \text{ else } s\cos\theta_{ij}

    The comparison takes no gradient; a hard negative's gradient is that of cos (t + cos). Ignored
    rows keep s cos theta (no margin, no hard negatives). Arguments as :func:`curricularface_loss`.
    """
    return margin_logits(x, W, y, curricularface_config(t, s, m, margin_grad), ignore_index)


def curricularface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    t: float = 0.0,
    s: float = 64.0,
    m: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""CurricularFace: ArcFace's target and hard negatives re-weighted by the curriculum parameter t.

    Cross-entropy of :func:`curricularface_logits`. Early in training t ~ 0 and a hard negative's
    cosine cos^2 is below cos: easy samples dominate; as t grows towards the mean target cosine the
    hard negatives weigh more (the curriculum). The head :class:`torch_port.CurricularFace` keeps t.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        t: the curriculum parameter in [-1, 1] (default 0). s: scale in (0, 1e4] (default 64).
        m: angular margin in radians in [0, pi/2] (default 0.5). reduction: "mean", "sum" or "none".
        chunk_size: None or classes per chunk (torch_port/chunked_generic.py).
        margin_grad: "exact" (default) or "detached" (the target only: hard negatives keep their
            gradient). ignore_index: rows with this label (default -1; None: none) give no loss.

    References:
        Huang, Wang, Tai, Liu, Shen, Li, Li, Huang, "CurricularFace: Adaptive Curriculum Learning
        Loss for Deep Face Recognition", CVPR 2020; HuangYG123/CurricularFace, head/metrics.py.
    """
    config = curricularface_config(t, s, m, margin_grad)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


# ---------------------------------------------------------------------------------------------
# AdaFace
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaFaceTarget:
    """AdaFace: g = clip(h (n - norm_mean) / (norm_std + eps), -1, 1) with n = clip(|x|, 1e-3, 100)
    (no gradient); psi = cos(clip(theta - m g, eps, pi - eps)) - (m + m g)."""

    m: float
    h: float
    eps: float
    norm_mean: float | torch.Tensor
    norm_std: float | torch.Tensor
    takes_norms = True

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        n = norms.detach().clamp(*ADAFACE_NORM_RANGE)
        mean, std = _like(self.norm_mean, n), _like(self.norm_std, n)
        g = (self.h * (n - mean) / (std + self.eps)).clamp(-1.0, 1.0)
        return torch.cos((theta_y - self.m * g).clamp(self.eps, math.pi - self.eps)) - (self.m + self.m * g)


def adaface_config(norm_mean, norm_std, s, m, h, eps, margin_grad: str = "exact") -> MarginConfig:
    """AdaFace as an engine configuration; norm_mean, norm_std numbers or 0-d tensors (a head's buffers)."""
    finite = lambda value, name: check_interval(value, name, -math.inf, math.inf, low_open=True, high_open=True)  # noqa: E731
    mean = _statistic(norm_mean, "norm_mean", finite)
    std = _statistic(norm_std, "norm_std", check_nonnegative)
    s, m = check_scale(s), check_angular_margin(m)
    h, eps = check_nonnegative(h, "h"), check_interval(eps, "eps", 0.0, 1.0, low_open=True)
    return with_margin_grad(MarginConfig(target=AdaFaceTarget(m, h, eps, mean, std), scale=s), margin_grad)


def adaface_logits(
    x,
    W,
    y,
    norm_mean: float = 20.0,
    norm_std: float = 100.0,
    s: float = 64.0,
    m: float = 0.4,
    h: float = 0.333,
    eps: float = 1e-3,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""AdaFace logits (B, C): the target's margin set by the feature norm's standing in the batch.

    .. math::

        g_i = \mathrm{clip}\Big(h \frac{n_i - \mu}{\sigma + \epsilon}, -1, 1\Big),\quad
        z_{iy} = s\big(\cos(\mathrm{clip}(\theta_{iy} - m g_i, \epsilon, \pi - \epsilon)) - (m + m g_i)\big),
        \quad z_{ij} = s\cos\theta_{ij}

    Arguments as :func:`adaface_loss`.
    """
    return margin_logits(x, W, y, adaface_config(norm_mean, norm_std, s, m, h, eps, margin_grad), ignore_index)


def adaface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    norm_mean: float = 20.0,
    norm_std: float = 100.0,
    s: float = 64.0,
    m: float = 0.4,
    h: float = 0.333,
    eps: float = 1e-3,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""AdaFace: the quality-adaptive margin, for given norm statistics (the head keeps them).

    A high-norm (high-quality) sample gets g > 0: an angular margin m g and an additive one m + m g,
    ArcFace-like emphasis on hard samples; a low-norm sample g < 0: the angular margin turns negative,
    CosFace-like emphasis on easy ones. n_i = clip(|x_i|, 1e-3, 100) carries no gradient (the norm
    only sets the margin). Non-target logits are s cos theta_j as the paper writes them (the official
    head also clamps every cosine to [-1 + eps, 1 - eps]).

    Args:
        x: (B, D) features, not normalised (their norms are the quality proxy). W: (C, D). y: (B,).
        norm_mean: the running mean of the norms (default 20). norm_std: their running standard
            deviation >= 0 (default 100). s: scale (default 64). m: margin in radians in [0, pi/2]
            (default 0.4). h: the concentration >= 0 (default 0.333). eps: in (0, 1] (default 1e-3).
        reduction, chunk_size, margin_grad, ignore_index: as for every margin loss.

    References:
        Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022;
        mk-minchul/AdaFace, head.py (class AdaFace).
    """
    config = adaface_config(norm_mean, norm_std, s, m, h, eps, margin_grad)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


# ---------------------------------------------------------------------------------------------
# MagFace
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagFaceTarget:
    """MagFace: ArcFace with the per-sample margin m(a) = (u_m - l_m)/(u_a - l_a) (a - l_a) + l_m,
    a = clamp(|x|, l_a, u_a), differentiable in |x|."""

    l_a: float
    u_a: float
    l_m: float
    u_m: float
    easy_margin: bool
    takes_norms = True

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        margin = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        return ArcFaceTarget(margin, self.easy_margin)(cos_y, theta_y)


@dataclass(frozen=True)
class MagFacePenalty:
    """lambda_g g(a) = lambda_g (a / u_a^2 + 1 / a), a = clamp(|x|, l_a, u_a): MagFace's regulariser."""

    lambda_g: float
    l_a: float
    u_a: float

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a)


def magface_config(s, l_a, u_a, l_m, u_m, easy_margin, margin_grad: str = "exact", lambda_g=0.0) -> MarginConfig:
    """MagFace as an engine configuration (with its regulariser when lambda_g > 0)."""
    s = check_scale(s)
    l_a, u_a = check_bounds_pair(l_a, u_a, "l_a", "u_a")
    l_m, u_m = check_margin_range(l_m, u_m, "l_m", "u_m")
    target = MagFaceTarget(l_a, u_a, l_m, u_m, check_flag(easy_margin, "easy_margin"))
    lambda_g = check_nonnegative(lambda_g, "lambda_g")
    penalty = MagFacePenalty(lambda_g, l_a, u_a) if lambda_g > 0 else None
    return with_margin_grad(MarginConfig(target=target, scale=s, penalty=penalty), margin_grad)


def magface_logits(
    x,
    W,
    y,
    s: float = 64.0,
    l_a: float = 10.0,
    u_a: float = 110.0,
    l_m: float = 0.45,
    u_m: float = 0.8,
    easy_margin: bool = True,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""MagFace logits (B, C): ArcFace whose margin grows with the feature norm (no regulariser here).

    .. math:: a_i = \mathrm{clamp}(\|x_i\|, l_a, u_a),\quad m(a) = \frac{u_m - l_m}{u_a - l_a}(a - l_a) + l_m,
              \quad z_{iy} = s\,\psi_{m(a_i)}(\theta_{iy}),\quad z_{ij} = s\cos\theta_{ij}

    Arguments as :func:`magface_loss`.
    """
    return margin_logits(x, W, y, magface_config(s, l_a, u_a, l_m, u_m, easy_margin, margin_grad), ignore_index)


def magface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    l_a: float = 10.0,
    u_a: float = 110.0,
    l_m: float = 0.45,
    u_m: float = 0.8,
    lambda_g: float = 35.0,
    easy_margin: bool = True,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""MagFace: a margin that grows with the feature norm, and a regulariser that rewards larger norms.

    .. math:: \ell_i = -\log\frac{e^{z_{iy}}}{\sum_j e^{z_{ij}}} + \lambda_g\, g(a_i), \qquad
              g(a) = \frac{a}{u_a^2} + \frac{1}{a}

    with the logits of :func:`magface_logits`. The gradient reaches |x_i| through a_i in both m(a_i)
    and g(a_i) (the official code's), so the norm of an easy sample grows (the paper's quality
    claim). lambda_g should be at least :func:`magface_min_lambda_g` (22.59 for the defaults; the
    official trainer's argument default of 20 is below it, its run script's 35 above).

    Args:
        x: (B, D) features, not normalised. W: (C, D). y: (B,) labels. s: scale (default 64).
        l_a < u_a: the norm bounds > 0 (defaults 10, 110). l_m <= u_m: margins at l_a and u_a, radians
            in [0, pi/2] (0.45, 0.8). lambda_g: >= 0 (default 35). easy_margin: default True (the
            official MagLinear's). reduction, chunk_size, margin_grad ("detached" drops the margin's
            gradient, m(a) included; the regulariser keeps its own), ignore_index: as usual.

    References:
        Meng, Zhao, Jiang, Wang, Zhou, "MagFace: A Universal Representation for Face Recognition and
        Quality Assessment", CVPR 2021; IrvingMeng/MagFace, models/magface.py.
    """
    config = magface_config(s, l_a, u_a, l_m, u_m, easy_margin, margin_grad, lambda_g)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


__all__ = [
    "ADAFACE_NORM_RANGE",
    "AdaFaceTarget",
    "CurricularTarget",
    "MagFacePenalty",
    "MagFaceTarget",
    "adaface_config",
    "adaface_logits",
    "adaface_loss",
    "curricularface_config",
    "curricularface_logits",
    "curricularface_loss",
    "magface_config",
    "magface_logits",
    "magface_loss",
    "magface_min_lambda_g",
]
