r"""ArcFace and the combined margin: margins on the target's angle, with their fallbacks.

=================  =====================================================================
ArcFace            psi = cos(theta + m)                (additive angular margin), with a fallback
combined margin    psi = cos(m1 theta + m2) - m3       (all three), with a fallback
=================  =====================================================================

Angles come from ``refimpl.geometry.target_angles`` (the half-angle form, exact to rounding at
cos = +-1), so psi is written in theta as the papers write it, never with sqrt(1 - cos^2).

Every margin may be a number or a (B,) array, one margin per sample (each entry in the scalar's
range); the fallback past pi - m is then taken sample by sample with that sample's margin.
``margin_grad`` and ``ignore_index`` are as in :mod:`refimpl.margins`: "detached" keeps psi's
value with d z_y / d cos theta_y = s; rows labelled ``ignore_index`` get the margin-free logits and
no loss.

Derivations: ``derivations/05-arcface-combined.md``, ``10-subcenter-and-per-sample-margins.md``.
"""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np

from refimpl.arrays import pick, split_ignored
from refimpl.geometry import check_features_weights_labels, cosines, target_angles
from refimpl.margins import margin_loss, margin_per_sample, with_margin
from softmax_common.checks import (
    MAX_MARGIN_MULTIPLIER,
    check_angular_margin,
    check_flag,
    check_ignore_index,
    check_interval,
    check_margin_grad,
    check_nonnegative,
    check_reduction,
    check_scale,
)

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


def arcface_psi(theta, cos, m, easy_margin: bool):
    r"""ArcFace's target transform on the target angles theta (B,) with their cosines.

    .. math::

        \psi(\theta) = \begin{cases}
            \cos(\theta + m) & \theta + m \le \pi \\
            \cos\theta - m \sin m & \theta + m > \pi
        \end{cases}
        \qquad \text{(easy margin: } \cos(\theta + m) \text{ where } \cos\theta > 0 \text{, else } \cos\theta)

    m is a number or a (B,) array, and may carry a gradient (MagFace's m(|x|)): the gap
    m sin(pi - m) is then differentiated too, as in MagFace's official code.
    """
    if easy_margin:
        return anp.where(cos > 0, anp.cos(theta + m), cos)
    gap = arcface_gap(m) if isinstance(m, float) else anp.sin(math.pi - m) * m
    return anp.where(theta + m <= math.pi, anp.cos(theta + m), cos - gap)


def _checked(margin_grad, ignore_index):
    return check_margin_grad(margin_grad), check_ignore_index(ignore_index)


# ---------------------------------------------------------------------------------------------
# Logits and losses
# ---------------------------------------------------------------------------------------------


def arcface_logits(x, W, y, s=64.0, m=0.5, easy_margin=False, margin_grad="exact", ignore_index=-1):
    r"""ArcFace logits: the margin is added to the target's angle.

    .. math::

        z_{i y_i} = s\,\psi(\theta_{i y_i}), \quad z_{ij} = s \cos\theta_{ij}, \qquad
        \psi(\theta) = \cos(\theta + m) \text{ while } \theta + m \le \pi,
        \text{ else } \cos\theta - m \sin m

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
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4]. m: angular margin in [0, pi/2], or a (B,) array of them (per sample).
        easy_margin: a bool. margin_grad: "exact" or "detached" (psi's value, the gradient of
        s cos theta_y). ignore_index: a negative integer or None; those rows keep s cos theta.

    Returns:
        (B, C) logits.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.
    """
    s = check_scale(s)
    easy_margin = check_flag(easy_margin, "easy_margin")
    margin_grad, ignore_index = _checked(margin_grad, ignore_index)
    if np.ndim(m) == 0:  # a number is checked before the arrays, as every hyperparameter
        m = margin_per_sample(m, 0, "m", check_angular_margin)
    x, W, y = check_features_weights_labels(x, W, y, ignore_index)
    m = margin_per_sample(m, len(y), "m", check_angular_margin)
    y, kept = split_ignored(y, ignore_index)
    cos = cosines(x, W)
    psi = arcface_psi(target_angles(x, W, y), pick(cos, y), m, easy_margin)
    return with_margin(s * cos, y, kept, s * psi, margin_grad)


def arcface_loss(
    x, W, y, s=64.0, m=0.5, easy_margin=False, reduction="mean", margin_grad="exact", ignore_index=-1
):
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
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4] (default 64). m: angular margin in [0, pi/2] (default 0.5), or a (B,)
        array of them. easy_margin: apply the margin only where cos theta_y > 0 (default False).
        reduction: "mean" (over the rows not ignored), "sum" or "none" (0 for ignored rows).
        margin_grad: "exact" (default) or "detached". ignore_index: a negative integer (default -1)
        or None.

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch (0.0 if every row
        is ignored).

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.
    """
    reduction = check_reduction(reduction)
    logits = arcface_logits(x, W, y, s, m, easy_margin, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


def _check_m1(value):
    return check_interval(value, "m1", 1.0, MAX_MARGIN_MULTIPLIER)


def _check_m2(value):
    return check_angular_margin(value, "m2")


def _check_m3(value):
    return check_nonnegative(value, "m3")


def combined_margin_logits(x, W, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_grad="exact", ignore_index=-1):
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
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4]. m1: in [1, 16]. m2: in [0, pi/2]. m3: >= 0. Each margin may be a (B,)
        array (per sample). margin_grad: "exact" or "detached". ignore_index: negative int or None.

    Returns:
        (B, C) logits.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019 (the combined margin).
    """
    s = check_scale(s)
    checks = (_check_m1, _check_m2, _check_m3)
    for value, check in zip((m1, m2, m3), checks):
        if np.ndim(value) == 0:  # numbers are checked before the arrays, as every hyperparameter
            margin_per_sample(value, 0, "", check)
    margin_grad, ignore_index = _checked(margin_grad, ignore_index)
    x, W, y = check_features_weights_labels(x, W, y, ignore_index)
    m1, m2, m3 = (
        margin_per_sample(v, len(y), name, check)
        for v, name, check in zip((m1, m2, m3), ("m1", "m2", "m3"), checks)
    )
    y, kept = split_ignored(y, ignore_index)
    cos = cosines(x, W)
    gap = combined_gap(m1, m2) if np.ndim(m1) == np.ndim(m2) == 0 else np.vectorize(combined_gap)(m1, m2)
    angle = m1 * target_angles(x, W, y) + m2
    psi = anp.where(angle <= math.pi, anp.cos(angle) - m3, (pick(cos, y) - m3) - gap)
    return with_margin(s * cos, y, kept, s * psi, margin_grad)


def combined_margin_loss(
    x, W, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, reduction="mean", margin_grad="exact", ignore_index=-1
):
    r"""The combined margin loss: target logit s*(cos(m1 theta + m2) - m3), extended monotonically past pi.

    .. math::

        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    with psi as in :func:`combined_margin_logits`.

    Units: m1 multiplies the target's angle (a number >= 1, no unit); m2 is an angle in radians added to
    it, in [0, pi/2] as ArcFace's m (a larger m2 is refused, with its value in radians when it reads as
    degrees); m3 is a cosine margin subtracted from the cosine, not an angle.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4] (default 64). m1 in [1, 16] (default 1). m2 in [0, pi/2] (default 0.5).
        m3 >= 0 (default 0); each may be a (B,) array. reduction: "mean", "sum" or "none".
        margin_grad: "exact" (default) or "detached". ignore_index: a negative integer (default -1)
        or None.

    Returns:
        The loss (float64): per sample for "none", else reduced over the rows not ignored.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019 (the combined margin).
    """
    reduction = check_reduction(reduction)
    logits = combined_margin_logits(x, W, y, s, m1, m2, m3, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


__all__ = [
    "PEAK_ANGLE",
    "arcface_gap",
    "arcface_logits",
    "arcface_loss",
    "arcface_psi",
    "combined_gap",
    "combined_margin_logits",
    "combined_margin_loss",
]
