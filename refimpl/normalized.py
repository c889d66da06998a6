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

Angles come from ``refimpl._geometry.target_angles`` (the half-angle form, exact to rounding at
cos = +-1), so the target transforms are written in theta, as the papers write them, never as
sqrt(1 - cos^2). The two closed-form bounds of the family, :func:`normface_lower_bound` and
:func:`cosface_min_scale`, live here too. The hyperparameter checks are plain Python and shared
with ``torch_port``, so both packages reject the same input with the same message.

Derivations: ``derivations/03-normface.md``, ``04-cosface-am-softmax.md``, ``05-arcface-combined.md``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import autograd.numpy as anp
import numpy as np

from refimpl._arrays import check_features_table_labels, pick
from refimpl._geometry import check_features_weights_labels, cosines, replace_target, target_angles
from refimpl._validate import (
    check_interval,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_reduction,
)
from refimpl.softmax import cross_entropy

# The angle where Delta * sin(Delta) peaks on [0, pi]: the root of sin(D) + D cos(D) = 0 in (pi/2, pi).
# Past it the first-order cosine gap of the combined margin's extension is held at its peak, so the
# gap never shrinks as the margin grows (derivations/05-arcface-combined.md checks the root).
GAP_PEAK_ANGLE = 2.028757838110434

# ---------------------------------------------------------------------------------------------
# Hyperparameter checks (shared with torch_port: same ranges, same messages)
# ---------------------------------------------------------------------------------------------


def check_scale(s) -> float:
    """The scale s of the normalized logits: a finite number > 0."""
    return check_positive(s, "s")


def check_cosine_margin(m) -> float:
    """CosFace/AM-Softmax margin: a finite number >= 0 (subtracted from a cosine)."""
    return check_nonnegative(m, "m")


def check_angular_margin(m, name: str = "m") -> float:
    """An additive angle in [0, pi/2]: on that range the ArcFace fallback keeps psi non-increasing."""
    return check_interval(m, name, 0.0, math.pi / 2)


def check_combined_margins(m1, m2, m3) -> tuple[float, float, float]:
    """m1 >= 1 (multiplicative angle), m2 in [0, pi/2] (additive angle), m3 >= 0 (cosine margin)."""
    m1 = check_interval(m1, "m1", 1.0, math.inf, high_open=True)
    m2 = check_angular_margin(m2, "m2")
    m3 = check_nonnegative(m3, "m3")
    return m1, m2, m3


def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")
    return bool(value)


def arcface_fallback_gap(m: float) -> float:
    """m sin m: the cosine gap ArcFace subtracts once theta + m > pi (insightface's ``mm``)."""
    return m * math.sin(m)


def combined_margin_gap(m1: float, m2: float) -> float:
    r"""The cosine gap c of the combined margin's extension past theta* = (pi - m2) / m1.

    .. math::

        \Delta = \pi - \theta^* = \frac{\pi (m_1 - 1) + m_2}{m_1}, \qquad
        c = \max\bigl(g(\Delta),\; 1 - \cos\Delta\bigr), \qquad
        g(\Delta) = \Delta' \sin\Delta',\ \Delta' = \min(\Delta, \Delta_{peak})

    Delta is the angular margin left at theta*; Delta sin(Delta) = Delta sin(theta*) turns it into a
    cosine gap to first order (for m1 = 1 it is ArcFace's m2 sin m2 exactly). The term 1 - cos(Delta)
    = 1 + cos(theta*) makes the jump at theta* go down, never up; holding g at its peak keeps c
    non-decreasing in Delta, hence in m1 and m2.
    """
    # Delta written so that m1 = 1 gives exactly m2 (not pi - (pi - m2), which rounds).
    delta = (math.pi * (m1 - 1.0) + m2) / m1
    held = min(delta, GAP_PEAK_ANGLE)
    return max(held * math.sin(held), 1.0 - math.cos(delta))


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
        s: scale > 0.

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
        s: scale > 0 (default 16). reduction: "mean", "sum" or "none".

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

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0. m: cosine margin >= 0.

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

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0 (default 64). m: cosine margin >= 0 (default 0.35).
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

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0. m: cosine margin >= 0.

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

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0 (default 30). m: cosine margin >= 0 (default 0.35).
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

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0. m: angular margin in [0, pi/2]. easy_margin: a bool.

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
        psi = anp.where(theta_y + m <= math.pi, anp.cos(theta_y + m), cos_y - arcface_fallback_gap(m))
    return s * replace_target(cos, y, psi)


def arcface_loss(x, W, y, s=64.0, m=0.5, easy_margin=False, reduction="mean"):
    r"""ArcFace, the additive angular margin loss.

    .. math::

        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}},
        \qquad \psi(\theta) = \cos(\theta + m) \text{ while } \theta + m \le \pi,
        \text{ else } \cos\theta - m \sin m

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0 (default 64). m: angular margin in [0, pi/2] (default 0.5).
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

    with c from :func:`combined_margin_gap`. The extension past theta* = (pi - m2)/m1 keeps psi
    non-increasing in theta and below cos theta, jumps down at theta*, and is ArcFace's fallback
    when m1 = 1, m3 = 0 (derivations/05-arcface-combined.md). (m1, m2, m3) = (1, 0, m) is CosFace,
    (1, m, 0) is ArcFace; m1 > 1 is SphereFace's multiplicative margin without its piecewise psi.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0. m1: >= 1. m2: in [0, pi/2]. m3: >= 0.

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
    psi = anp.where(angle <= math.pi, anp.cos(angle) - m3, (cos_y - m3) - combined_margin_gap(m1, m2))
    return s * replace_target(cos, y, psi)


def combined_margin_loss(x, W, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, reduction="mean"):
    r"""The combined margin loss: target logit s*(cos(m1 theta + m2) - m3), extended monotonically past pi.

    .. math::

        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    with psi as in :func:`combined_margin_logits`.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale > 0 (default 64). m1 >= 1 (default 1). m2 in [0, pi/2] (default 0.5).
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


# ---------------------------------------------------------------------------------------------
# Closed-form bounds
# ---------------------------------------------------------------------------------------------


def normface_lower_bound(n, s) -> float:
    r"""The least mean NormFace loss n classes can reach at scale s (NormFace, Proposition 2).

    .. math:: L_{min}(n, s) = \log\bigl(1 + (n-1)\, e^{-\frac{n}{n-1} s}\bigr)
                            = \mathrm{softplus}\bigl(\log(n-1) - \tfrac{n}{n-1} s\bigr)

    For unit class weights with each class's feature at its own weight, the mean loss is at least
    this, with equality exactly for a regular simplex (possible when n <= D + 1). With s = 1 (no
    scale) and n = 10575 (CASIA-WebFace) it is about 8.27.

    Computed to full relative precision for every s: the exponent n s/(n-1) is split exactly into
    hi + lo (rational arithmetic on the float inputs), u = (n-1) e^{-hi} (1 - lo) is formed exactly
    from the one rounded exp, and the result is log1p(u). Forming log(n-1) - n s/(n-1) first and
    taking softplus would not do: that difference carries an absolute rounding error of about
    1e-16 * max(log n, s), which exp turns into a relative error of up to 1e-13 when the bound is
    tiny. log1p(u) has condition number <= 1, so the one rounding of exp is all that remains.

    Args:
        n: number of classes, an integer >= 2.
        s: scale > 0 (the NormFace paper's l^2: features and weights both of norm l).

    Returns:
        The bound as a Python float (0.0 once it underflows, for n s/(n-1) above ~745 + log n).

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    n = check_positive_int(n, "n", minimum=2)
    s = check_positive(s, "s")
    exponent = Fraction(n) * Fraction(s) / (n - 1)
    hi = float(exponent)
    lo = exponent - Fraction(hi)  # |lo| <= ulp(hi)/2, so exp(-lo) = 1 - lo to far beyond double precision
    if hi < 700.0:
        decay = Fraction(math.exp(-hi))
    else:
        # exp(-hi) alone would be subnormal (and imprecise) while (n-1) exp(-hi) may still be normal.
        decay = Fraction(math.exp(-0.5 * hi)) ** 2
    # u = (n-1) e^{-s n/(n-1)} exactly up to exp's own rounding, kept as hi + lo parts so that neither
    # the products nor the conversion to float add a rounding: log1p(u_hi + u_lo) ~ log1p(u_hi) + u_lo/(1 + u_hi).
    u = (n - 1) * decay * (1 - lo)
    u_hi = float(u)
    u_lo = float(u - Fraction(u_hi))
    return math.log1p(u_hi) + u_lo / (1.0 + u_hi)


def cosface_min_scale(C, p) -> float:
    r"""The least scale at which C perfectly separated classes can all reach posterior p (CosFace).

    .. math:: s_{min} = \frac{C - 1}{C} \log \frac{(C - 1)\, p}{1 - p}

    Assumption (CosFace, the section on feature normalization): every feature sits at its own class
    weight (all unit vectors). Then for at least one class the posterior of its own weight is at most
    e^s / (e^s + (C-1) e^{-s/(C-1)}), with equality for a regular simplex; reaching p for every class
    therefore needs s >= s_min. A value <= 0 (p <= 1/C) means every positive scale suffices.

    Args:
        C: number of classes, an integer >= 2.
        p: the desired posterior, in (0, 1).

    Returns:
        s_min as a Python float.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    C = check_positive_int(C, "C", minimum=2)
    p = check_interval(p, "p", 0.0, 1.0, low_open=True, high_open=True)
    return (C - 1) / C * math.log((C - 1) * p / (1.0 - p))
