r"""Margins that adapt to the sample: CurricularFace, AdaFace and MagFace, the reference math.

=================  ==========================================================================
CurricularFace     target: ArcFace's cos(theta + m) (fallback cos theta - m sin m past pi - m);
                   a hard negative cos_j > cos(theta_y + m) becomes cos_j (t + cos_j)
AdaFace            target: cos(clip(theta - m g, eps, pi - eps)) - (m + m g), g from the
                   feature norm's place in the batch statistics (no gradient)
MagFace            target: ArcFace with margin m(a), a = |x| clamped to [l_a, u_a]; plus the
                   regulariser lambda_g (a / u_a^2 + 1 / a) per sample
=================  ==========================================================================

These are the losses for *given* state: CurricularFace's t and AdaFace's norm_mean / norm_std are
arguments here; the heads of ``torch_port`` keep and update them. Every angle comes from
``refimpl.geometry.target_angles`` (the half-angle form), where the official codes take
sqrt(1 - cos^2), whose derivative is infinite at cos = +-1. ``margin_grad`` and ``ignore_index``
are as in :mod:`refimpl.margins`: "detached" gives the *target* logit the gradient of s cos theta_y
(CurricularFace's hard negatives keep their exact gradient; MagFace's margin then carries none).

Derivation: ``derivations/11-curricular-adaface-magface.md``.
"""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from refimpl.arcface import arcface_psi
from refimpl.arrays import pick, split_ignored
from refimpl.geometry import check_features_weights_labels, cosines, row_norms, target_angles
from refimpl.margins import clamp, margin_loss, with_margin
from softmax_common.checks import (
    check_angular_margin,
    check_bounds_pair,
    check_flag,
    check_ignore_index,
    check_interval,
    check_margin_grad,
    check_margin_range,
    check_nonnegative,
    check_reduction,
    check_scale,
)

# AdaFace's official head clips the feature norms to [0.001, 100] before the statistics see them.
ADAFACE_NORM_RANGE = (0.001, 100.0)


def _prepared(x, W, y, margin_grad, ignore_index):
    """Checked (x, W, labels, kept, cosines, target angles, target cosines) of a margin loss."""
    margin_grad, ignore_index = check_margin_grad(margin_grad), check_ignore_index(ignore_index)
    x, W, y = check_features_weights_labels(x, W, y, ignore_index)
    y, kept = split_ignored(y, ignore_index)
    cos = cosines(x, W)
    return x, W, y, kept, cos, target_angles(x, W, y), pick(cos, y), margin_grad


# ---------------------------------------------------------------------------------------------
# CurricularFace
# ---------------------------------------------------------------------------------------------


def curricularface_logits(x, W, y, t=0.0, s=64.0, m=0.5, margin_grad="exact", ignore_index=-1):
    r"""CurricularFace logits: ArcFace's target, and hard negatives re-weighted by the curriculum t.

    .. math::

        z_{iy} = s \begin{cases} \cos(\theta_y + m) & \cos\theta_y > \cos(\pi - m) \\
                                 \cos\theta_y - m \sin m & \text{otherwise} \end{cases}
        \qquad
        z_{ij} = s \begin{cases} \cos\theta_j (t + \cos\theta_j) & \cos\theta_j > \cos(\theta_y + m) \\
                                 \cos\theta_j & \text{otherwise} \end{cases}

    A negative is *hard* when its cosine beats the target's cos(theta_y + m), compared without the
    fallback (as the official code compares it) and without gradient through the comparison; its
    logit keeps the gradient of cos_j (t + cos_j). Early in training t ~ 0 lowers hard negatives
    (easy samples first); as t -> 1 it raises them. The head keeps t, t <- 0.01 mean(cos theta_y)
    + 0.99 t, and passes it here. Differences from the official code: theta from the half-angle
    form (finite gradient at cos = +-1) where it takes sqrt(1 - cos^2), no clamp of the cosines.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        t: the curriculum parameter in [-1, 1] (default 0). s: scale in (0, 1e4] (default 64).
        m: angular margin in [0, pi/2] (default 0.5). margin_grad: "exact" or "detached" (the
        target only). ignore_index: a negative integer (default -1) or None; those rows keep s cos.

    Returns:
        (B, C) logits.

    References:
        Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition",
        CVPR 2020, eqs. (8)-(9); HuangYG123/CurricularFace ``head/metrics.py`` (class CurricularFace).
    """
    t = check_interval(t, "t", -1.0, 1.0)
    s, m = check_scale(s), check_angular_margin(m)
    x, W, y, kept, cos, theta, cos_y, margin_grad = _prepared(x, W, y, margin_grad, ignore_index)
    shifted = anp.cos(theta + m)
    target = anp.where(theta + m < math.pi, shifted, cos_y - m * math.sin(m))
    not_target = np.arange(np.shape(cos)[1])[None, :] != y[:, None]
    hard = (getval(cos) > getval(shifted)[:, None]) & not_target & kept[:, None]
    modulated = anp.where(hard, cos * (t + cos), cos)
    return with_margin(s * modulated, y, kept, s * target, margin_grad)


def curricularface_loss(x, W, y, t=0.0, s=64.0, m=0.5, reduction="mean", margin_grad="exact", ignore_index=-1):
    r"""CurricularFace: softmax cross-entropy of :func:`curricularface_logits`.

    .. math::

        \ell_i = -\log \frac{e^{s\,T(\cos\theta_{y})}}
                 {e^{s\,T(\cos\theta_{y})} + \sum_{j \ne y} e^{s\,N(t, \cos\theta_j)}}

    with T ArcFace's target and N(t, c) = c (t + c) for hard negatives, c otherwise.

    Args:
        x, W, y, t, s, m, margin_grad, ignore_index: as :func:`curricularface_logits`.
        reduction: "mean" (over the rows not ignored), "sum" or "none".

    References:
        Huang et al., "CurricularFace", CVPR 2020; HuangYG123/CurricularFace ``head/metrics.py``.
    """
    reduction = check_reduction(reduction)
    logits = curricularface_logits(x, W, y, t, s, m, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


# ---------------------------------------------------------------------------------------------
# AdaFace
# ---------------------------------------------------------------------------------------------


def adaface_logits(
    x, W, y, norm_mean=20.0, norm_std=100.0, s=64.0, m=0.4, h=0.333, eps=1e-3, margin_grad="exact", ignore_index=-1
):
    r"""AdaFace logits: a margin between ArcFace's and CosFace's, chosen by the feature norm.

    .. math::

        n_i = \mathrm{clip}(\|x_i\|, 0.001, 100), \qquad
        g_i = \mathrm{clip}\Bigl(h \frac{n_i - \mu}{\sigma + \epsilon}, -1, 1\Bigr) \quad (\text{no gradient})

        z_{iy} = s \bigl(\cos(\mathrm{clip}(\theta_y - m g_i, \epsilon, \pi - \epsilon)) - (m + m g_i)\bigr),
        \qquad z_{ij} = s \cos\theta_j

    A low-norm (poor quality) feature, g = -1, gets ArcFace's cos(theta + m); g = 0 (a norm at the
    mean) gets CosFace's cos theta - m; a high-norm one, g = 1, gets cos(theta - m) - 2m, a larger
    cosine margin with the angle relaxed. The clip of the angle has torch.clamp's derivative (1 on the closed
    interval). Differences from the official head: theta by the half-angle form of exact cosines,
    where it clamps every cosine to [-1 + eps, 1 - eps] and takes arccos (so its non-target logits
    are clamped too; here they are s cos theta_j as the paper writes them).

    Args:
        x: (B, D) features (not normalised: their norms drive the margin). W: (C, D) class weights.
        y: (B,) labels in [0, C), or ``ignore_index``.
        norm_mean, norm_std: the batch statistics mu (finite) and sigma (finite, >= 0) of the norms,
        kept by the head (defaults 20 and 100, the official initial values).
        s: scale (default 64). m: margin in [0, pi/2] (default 0.4). h: >= 0 (default 0.333).
        eps: in (0, 1] (default 1e-3). margin_grad: "exact" or "detached". ignore_index: as usual.

    Returns:
        (B, C) logits.

    References:
        Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022, eqs.
        (10)-(12); mk-minchul/AdaFace ``head.py`` (class AdaFace, ``forward``).
    """
    norm_mean = check_interval(norm_mean, "norm_mean", -math.inf, math.inf, low_open=True, high_open=True)
    norm_std = check_nonnegative(norm_std, "norm_std")
    s, m = check_scale(s), check_angular_margin(m)
    h = check_nonnegative(h, "h")
    eps = check_interval(eps, "eps", 0.0, 1.0, low_open=True)
    x, W, y, kept, cos, theta, _, margin_grad = _prepared(x, W, y, margin_grad, ignore_index)
    norms = np.clip(getval(row_norms(x))[:, 0], *ADAFACE_NORM_RANGE)
    g = np.clip(h * (norms - norm_mean) / (norm_std + eps), -1.0, 1.0)
    target = anp.cos(clamp(theta - m * g, eps, math.pi - eps)) - (m + m * g)
    return with_margin(s * cos, y, kept, s * target, margin_grad)


def adaface_loss(
    x,
    W,
    y,
    norm_mean=20.0,
    norm_std=100.0,
    s=64.0,
    m=0.4,
    h=0.333,
    eps=1e-3,
    reduction="mean",
    margin_grad="exact",
    ignore_index=-1,
):
    r"""AdaFace: softmax cross-entropy of :func:`adaface_logits`, for given batch statistics.

    .. math:: \ell_i = -\log \frac{e^{z_{iy}}}{e^{z_{iy}} + \sum_{j \ne y} e^{s \cos\theta_j}}

    Args:
        as :func:`adaface_logits`; reduction: "mean" (over the rows not ignored), "sum" or "none".

    References:
        Kim, Jain, Liu, "AdaFace", CVPR 2022; mk-minchul/AdaFace ``head.py``.
    """
    reduction = check_reduction(reduction)
    logits = adaface_logits(x, W, y, norm_mean, norm_std, s, m, h, eps, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


# ---------------------------------------------------------------------------------------------
# MagFace
# ---------------------------------------------------------------------------------------------


def magface_margin(a, l_a, u_a, l_m, u_m):
    """m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m, written as the official ``_margin``."""
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regulariser(a, u_a):
    """g(a) = a / u_a^2 + 1 / a, MagFace's ``calc_loss_G`` per sample."""
    return a / u_a**2 + 1.0 / a


def _magface_checks(s, l_a, u_a, l_m, u_m, easy_margin):
    s = check_scale(s)
    l_a, u_a = check_bounds_pair(l_a, u_a, "l_a", "u_a")
    l_m, u_m = check_margin_range(l_m, u_m, "l_m", "u_m")
    return s, l_a, u_a, l_m, u_m, check_flag(easy_margin, "easy_margin")


def magface_logits(
    x, W, y, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, easy_margin=True, margin_grad="exact", ignore_index=-1
):
    r"""MagFace logits: ArcFace with a margin that grows with the feature norm.

    .. math::

        a_i = \mathrm{clamp}(\|x_i\|, l_a, u_a), \qquad
        m(a) = \frac{u_m - l_m}{u_a - l_a} (a - l_a) + l_m, \qquad
        z_{iy} = s\,\psi_{m(a_i)}(\theta_y), \quad z_{ij} = s \cos\theta_j

    psi is ArcFace's (:func:`refimpl.arcface.arcface_psi`) with the sample's margin, easy margin by
    default as in the official MagLinear. The derivative reaches |x| through a (torch.clamp's: 1 on
    the closed interval, 0 outside) and m, the fallback gap included, as in the official code;
    "detached" drops it (the target keeps the gradient of s cos theta_y only).

    Args:
        x: (B, D) features (not normalised). W: (C, D) class weights. y: (B,) labels or ``ignore_index``.
        s: scale (default 64). l_a < u_a: norm bounds > 0 (defaults 10, 110). l_m <= u_m: margins in
        [0, pi/2] at l_a and u_a (defaults 0.45, 0.8). easy_margin: a bool (default True).
        margin_grad: "exact" or "detached". ignore_index: a negative integer (default -1) or None.

    Returns:
        (B, C) logits (the regulariser is not a logit: see :func:`magface_loss`).

    References:
        Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
        Assessment", CVPR 2021; IrvingMeng/MagFace ``models/magface.py`` (MagLinear, SoftmaxBuilder).
    """
    s, l_a, u_a, l_m, u_m, easy_margin = _magface_checks(s, l_a, u_a, l_m, u_m, easy_margin)
    x, W, y, kept, cos, theta, cos_y, margin_grad = _prepared(x, W, y, margin_grad, ignore_index)
    a = clamp(row_norms(x)[:, 0], l_a, u_a)
    psi = arcface_psi(theta, cos_y, magface_margin(a, l_a, u_a, l_m, u_m), easy_margin)
    return with_margin(s * cos, y, kept, s * psi, margin_grad)


def magface_loss(
    x,
    W,
    y,
    s=64.0,
    l_a=10.0,
    u_a=110.0,
    l_m=0.45,
    u_m=0.8,
    lambda_g=35.0,
    easy_margin=True,
    reduction="mean",
    margin_grad="exact",
    ignore_index=-1,
):
    r"""MagFace: the cross-entropy of :func:`magface_logits` plus the norm regulariser, per sample.

    .. math::

        \ell_i = -\log \frac{e^{z_{iy}}}{\sum_j e^{z_{ij}}} + \lambda_g\, g(a_i), \qquad
        g(a) = \frac{a}{u_a^2} + \frac{1}{a}

    "mean" averages ell_i over the rows not ignored, which is the official CE mean + lambda_g
    mean(g). The regulariser keeps its gradient under either ``margin_grad``. lambda_g should be at
    least :func:`softmax_common.closed_forms.magface_min_lambda_g` (22.59 for the defaults).

    Args:
        as :func:`magface_logits`; lambda_g: >= 0 (default 35, the official run script's);
        reduction: "mean", "sum" or "none".

    References:
        Meng et al., "MagFace", CVPR 2021; IrvingMeng/MagFace ``models/magface.py`` (MagLoss).
    """
    reduction = check_reduction(reduction)
    lambda_g = check_nonnegative(lambda_g, "lambda_g")
    logits = magface_logits(x, W, y, s, l_a, u_a, l_m, u_m, easy_margin, margin_grad, ignore_index)
    a = clamp(row_norms(x)[:, 0], float(l_a), float(u_a))
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction, lambda_g * magface_regulariser(a, u_a))


__all__ = [
    "adaface_logits",
    "adaface_loss",
    "curricularface_logits",
    "curricularface_loss",
    "magface_logits",
    "magface_loss",
    "magface_margin",
    "magface_regulariser",
]
