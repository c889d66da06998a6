r"""Normalized-margin losses: NormFace, CosFace/AM-Softmax, ArcFace and the combined margin.

Every loss here is a softmax cross-entropy over the logits ``s * cos(theta_j)`` of unit features
against unit class weights (no bias); the margin losses replace the target class's cosine by
``psi(theta_y) <= cos(theta_y)``:

=================  =====================================================================
NormFace           psi = cos theta                     (no margin)
CosFace/AM-Softmax psi = cos theta - m                 (additive cosine margin)
ArcFace            psi = cos(theta + m)                (additive angular margin), with a fallback
combined margin    psi = cos(m1 theta + m2) - m3       (all three), with a fallback
=================  =====================================================================

Angles come from ``refimpl.geometry.target_angles`` (the half-angle form, exact to rounding at
cos = +-1), so the target transforms are written in theta, as the papers write them, never as
sqrt(1 - cos^2). The hyperparameter checks and the two closed-form bounds of the family,
:func:`normface_lower_bound` and :func:`cosface_min_scale`, are plain Python shared with
``torch_port`` (``softmax_common``), so both packages reject the same input with the same message
and give the same bound.

Derivations: ``derivations/03-normface.md``, ``04-cosface-am-softmax.md``, ``05-arcface-combined.md``.
"""

from __future__ import annotations

import math

import autograd.numpy as anp

from refimpl.arrays import check_features_table_labels, pick
from refimpl.geometry import check_features_weights_labels, cosines, replace_target, target_angles
from refimpl.softmax import cross_entropy
from softmax_common.checks import (
    check_angular_margin,
    check_combined_margins,
    check_cosine_margin,
    check_flag,
    check_reduction,
    check_scale,
)
from softmax_common.closed_forms import cosface_min_scale, normface_lower_bound

# ---------------------------------------------------------------------------------------------
# The fallback gaps, by the reference's own route
#
# The port takes these gaps from softmax_common.closed_forms; the reference writes them as the
# papers and insightface do (from theta* rather than Delta, sin(pi - m) rather than sin m, the peak
# angle found here by bisection), so a slip in either route shows up in the agreement tests.
# ---------------------------------------------------------------------------------------------


def _peak_of_angle_times_sine() -> float:
    """The root of d/dD (D sin D) = sin D + D cos D in (pi/2, pi), by bisection (it falls from 1 to -pi)."""
    low, high = math.pi / 2, math.pi
    for _ in range(200):
        middle = 0.5 * (low + high)
        if math.sin(middle) + middle * math.cos(middle) > 0:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


PEAK_ANGLE = _peak_of_angle_times_sine()


def arcface_gap(m: float) -> float:
    """ArcFace's fallback gap m sin(pi - m), as insightface's ``mm = sin(pi - m) * m``."""
    return math.sin(math.pi - m) * m


def combined_gap(m1: float, m2: float) -> float:
    """The combined margin's extension gap c(m1, m2) (derivations/05-arcface-combined.md), from the
    switch angle theta* = (pi - m2)/m1: the first-order gap Delta sin Delta of the angle Delta = pi -
    theta* left over at theta* (held at its peak), or 1 + cos(theta*) if that is larger."""
    switch = (math.pi - m2) / m1
    delta = min(math.pi - switch, PEAK_ANGLE)
    return max(delta * math.sin(delta), 1.0 + math.cos(switch))


# ---------------------------------------------------------------------------------------------
# Logits and losses
# ---------------------------------------------------------------------------------------------


def _features_and_weights(x, W, y=None):
    """Validated float64 (x, W) and, when given, integer labels."""
    return check_features_table_labels(x, W, y, "W")


def normface_logits(x, W, y=None, s=16.0):
    r"""NormFace logits: the scaled cosine between each feature and each class weight.

    .. math:: z_{ij} = s \cos\theta_{ij} = s \frac{\langle x_i, W_j \rangle}{\|x_i\| \|W_j\|}

    Args:
        x: (B, D) features. W: (C, D) class weights, one row per class.
        y: optional (B,) labels in [0, C); NormFace has no margin, so they are only validated (the
            argument is there so that every ``<name>_logits`` can be called the same way).
        s: scale in (0, 1e4].

    Returns:
        (B, C) logits.

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    s = check_scale(s)
    x, W, _ = _features_and_weights(x, W, y)
    return s * cosines(x, W)


def normface_loss(x, W, y, s=16.0, reduction="mean"):
    r"""NormFace: softmax cross-entropy of scaled cosines (normalized features and weights, no bias).

    .. math:: \ell_i = -\log \frac{e^{s \cos\theta_{i y_i}}}{\sum_j e^{s \cos\theta_{ij}}}

    Without the scale the logits lie in [-1, 1] and the loss cannot fall below
    :func:`normface_lower_bound` (n, 1), about 8.27 for 10575 classes: s is what lets it converge.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 16). reduction: "mean", "sum" or "none".

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    reduction = check_reduction(reduction)
    logits = normface_logits(x, W, y, s)
    return cross_entropy(logits, y, reduction)


def cosface_logits(x, W, y, s=64.0, m=0.35):
    r"""CosFace (LMCL) logits: the target's cosine is lowered by m before scaling.

    .. math::

        z_{ij} = s \cos\theta_{ij} \ (j \ne y_i), \qquad z_{i y_i} = s (\cos\theta_{i y_i} - m)

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m: cosine margin >= 0.

    Returns:
        (B, C) logits.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    s, m = check_scale(s), check_cosine_margin(m)
    x, W, y = check_features_weights_labels(x, W, y)
    cos = cosines(x, W)
    return s * replace_target(cos, y, pick(cos, y) - m)


def cosface_loss(x, W, y, s=64.0, m=0.35, reduction="mean"):
    r"""CosFace, the large margin cosine loss.

    .. math::

        \ell_i = -\log \frac{e^{s(\cos\theta_{i y_i} - m)}}
                           {e^{s(\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 64). m: cosine margin >= 0 (default 0.35).
        reduction: "mean", "sum" or "none".

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    reduction = check_reduction(reduction)
    logits = cosface_logits(x, W, y, s, m)
    return cross_entropy(logits, y, reduction)


def am_softmax_logits(x, W, y, s=30.0, m=0.35):
    r"""AM-Softmax logits: the same formula as :func:`cosface_logits`, with AM-Softmax's default s = 30.

    .. math:: z_{i y_i} = s (\cos\theta_{i y_i} - m), \qquad z_{ij} = s \cos\theta_{ij}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m: cosine margin >= 0.

    Returns:
        (B, C) logits.

    References:
        Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
    """
    return cosface_logits(x, W, y, s, m)


def am_softmax_loss(x, W, y, s=30.0, m=0.35, reduction="mean"):
    r"""AM-Softmax: the additive cosine margin loss, CosFace's formula with s = 30 by default.

    .. math::

        \ell_i = -\log \frac{e^{s(\cos\theta_{i y_i} - m)}}
                           {e^{s(\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 30). m: cosine margin >= 0 (default 0.35).
        reduction: "mean", "sum" or "none".

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
    """
    return cosface_loss(x, W, y, s, m, reduction)


def arcface_logits(x, W, y, s=64.0, m=0.5, easy_margin=False):
    r"""ArcFace logits: the margin is added to the target's angle.

    .. math::

        \psi(\theta) = \begin{cases}
            \cos(\theta + m) & \theta + m \le \pi \\
            \cos\theta - m \sin m & \theta + m > \pi
        \end{cases}
        \qquad z_{i y_i} = s\,\psi(\theta_{i y_i}), \quad z_{ij} = s \cos\theta_{ij}

    Past theta = pi - m, cos(theta + m) would rise again (the angle wraps past pi) and reward a
    worse feature; the fallback (insightface's rule) is CosFace with margin m sin m there. psi jumps
    down at pi - m by cos m + m sin m - 1 >= 0, so it stays non-increasing. With ``easy_margin`` the
    margin applies only where cos theta > 0, and psi = cos theta elsewhere (this psi jumps *up* by
    sin m at theta = pi/2).

    m is an angle in radians (the default 0.5 rad is 28.6 degrees; pytorch-metric-learning's ArcFaceLoss
    takes degrees), in [0, pi/2]: past a right angle a feature on its class's direction would get the
    target logit s cos m < 0, below that of any class orthogonal to it. A larger m is refused, with its
    value in radians when it reads as degrees (28.6 -> 0.4992).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m: angular margin in [0, pi/2]. easy_margin: a bool.

    Returns:
        (B, C) logits.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.
    """
    s, m = check_scale(s), check_angular_margin(m)
    easy_margin = check_flag(easy_margin, "easy_margin")
    x, W, y = check_features_weights_labels(x, W, y)
    cos = cosines(x, W)
    cos_y = pick(cos, y)
    theta_y = target_angles(x, W, y)
    if easy_margin:
        psi = anp.where(cos_y > 0, anp.cos(theta_y + m), cos_y)
    else:
        psi = anp.where(theta_y + m <= math.pi, anp.cos(theta_y + m), cos_y - arcface_gap(m))
    return s * replace_target(cos, y, psi)


def arcface_loss(x, W, y, s=64.0, m=0.5, easy_margin=False, reduction="mean"):
    r"""ArcFace, the additive angular margin loss.

    .. math::

        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}},
        \qquad \psi(\theta) = \cos(\theta + m) \text{ while } \theta + m \le \pi,
        \text{ else } \cos\theta - m \sin m

    m is an angle in radians (the default 0.5 rad is 28.6 degrees; pytorch-metric-learning's ArcFaceLoss
    takes degrees), in [0, pi/2]: past a right angle a feature on its class's direction would get the
    target logit s cos m < 0, below that of any class orthogonal to it. A larger m is refused, with its
    value in radians when it reads as degrees (28.6 -> 0.4992).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 64). m: angular margin in [0, pi/2] (default 0.5).
        easy_margin: apply the margin only where cos theta_y > 0 (default False).
        reduction: "mean", "sum" or "none".

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.
    """
    reduction = check_reduction(reduction)
    logits = arcface_logits(x, W, y, s, m, easy_margin)
    return cross_entropy(logits, y, reduction)


def combined_margin_logits(x, W, y, s=64.0, m1=1.0, m2=0.5, m3=0.0):
    r"""Combined-margin logits: multiplicative and additive angular margins and a cosine margin.

    .. math::

        \psi(\theta) = \begin{cases}
            \cos(m_1 \theta + m_2) - m_3 & m_1 \theta + m_2 \le \pi \\
            \cos\theta - m_3 - c(m_1, m_2) & \text{otherwise}
        \end{cases}

    with c from :func:`combined_gap`. The extension past theta* = (pi - m2)/m1 keeps psi
    non-increasing in theta and below cos theta, jumps down at theta*, and is ArcFace's fallback
    when m1 = 1, m3 = 0 (derivations/05-arcface-combined.md). (m1, m2, m3) = (1, 0, m) is CosFace,
    (1, m, 0) is ArcFace; m1 > 1 is SphereFace's multiplicative margin without its piecewise psi.

    Units: m1 multiplies the target's angle (a number >= 1, no unit); m2 is an angle in radians added to
    it, in [0, pi/2] as ArcFace's m (a larger m2 is refused, with its value in radians when it reads as
    degrees); m3 is a cosine margin subtracted from the cosine, not an angle.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m1: in [1, 16]. m2: in [0, pi/2]. m3: >= 0.

    Returns:
        (B, C) logits.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019 (the combined margin).
    """
    s = check_scale(s)
    m1, m2, m3 = check_combined_margins(m1, m2, m3)
    x, W, y = check_features_weights_labels(x, W, y)
    cos = cosines(x, W)
    cos_y = pick(cos, y)
    angle = m1 * target_angles(x, W, y) + m2
    psi = anp.where(angle <= math.pi, anp.cos(angle) - m3, (cos_y - m3) - combined_gap(m1, m2))
    return s * replace_target(cos, y, psi)


def combined_margin_loss(x, W, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, reduction="mean"):
    r"""The combined margin loss: target logit s*(cos(m1 theta + m2) - m3), extended monotonically past pi.

    .. math::

        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    with psi as in :func:`combined_margin_logits`.

    Units: m1 multiplies the target's angle (a number >= 1, no unit); m2 is an angle in radians added to
    it, in [0, pi/2] as ArcFace's m (a larger m2 is refused, with its value in radians when it reads as
    degrees); m3 is a cosine margin subtracted from the cosine, not an angle.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 64). m1 in [1, 16] (default 1). m2 in [0, pi/2] (default 0.5).
        m3 >= 0 (default 0). reduction: "mean", "sum" or "none".

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019 (the combined margin).
    """
    reduction = check_reduction(reduction)
    logits = combined_margin_logits(x, W, y, s, m1, m2, m3)
    return cross_entropy(logits, y, reduction)


__all__ = [
    "am_softmax_logits",
    "am_softmax_loss",
    "arcface_logits",
    "arcface_loss",
    "combined_margin_logits",
    "combined_margin_loss",
    "cosface_logits",
    "cosface_loss",
    "cosface_min_scale",
    "normface_logits",
    "normface_loss",
    "normface_lower_bound",
]
