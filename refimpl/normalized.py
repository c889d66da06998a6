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
sqrt(1 - cos^2). ArcFace and the combined margin live in :mod:`refimpl.arcface` and are re-exported
here; the per-sample margins, ``margin_grad`` and ``ignore_index`` of every margin loss are described
in :mod:`refimpl.margins`. The hyperparameter checks and the two closed-form bounds of the family,
:func:`normface_lower_bound` and :func:`cosface_min_scale`, are plain Python shared with
``torch_port`` (``softmax_common``), so both packages reject the same input with the same message
and give the same bound.

Derivations: ``derivations/03-normface.md``, ``04-cosface-am-softmax.md``, ``05-arcface-combined.md``,
``10-subcenter-and-per-sample-margins.md``.
"""

from __future__ import annotations

import numpy as np

from refimpl.arcface import (
    PEAK_ANGLE,
    arcface_gap,
    arcface_logits,
    arcface_loss,
    combined_gap,
    combined_margin_logits,
    combined_margin_loss,
)
from refimpl.arrays import check_features_table_labels, pick, split_ignored
from refimpl.geometry import check_features_weights_labels, cosines
from refimpl.margins import margin_loss, margin_per_sample, with_margin
from softmax_common.checks import (
    check_cosine_margin,
    check_ignore_index,
    check_margin_grad,
    check_reduction,
    check_scale,
)
from softmax_common.closed_forms import cosface_min_scale, normface_lower_bound

# ---------------------------------------------------------------------------------------------
# Logits and losses
# ---------------------------------------------------------------------------------------------


def normface_logits(x, W, y=None, s=16.0, ignore_index=-1):
    r"""NormFace logits: the scaled cosine between each feature and each class weight.

    .. math:: z_{ij} = s \cos\theta_{ij} = s \frac{\langle x_i, W_j \rangle}{\|x_i\| \|W_j\|}

    Args:
        x: (B, D) features. W: (C, D) class weights, one row per class.
        y: optional (B,) labels in [0, C) or equal to ``ignore_index``; NormFace has no margin, so
            they are only validated (the argument is there so that every ``<name>_logits`` can be
            called the same way).
        s: scale in (0, 1e4]. ignore_index: a negative integer (default -1) or None.

    Returns:
        (B, C) logits.

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    s = check_scale(s)
    x, W, _ = check_features_table_labels(x, W, y, "W", check_ignore_index(ignore_index))
    return s * cosines(x, W)


def normface_loss(x, W, y, s=16.0, reduction="mean", ignore_index=-1):
    r"""NormFace: softmax cross-entropy of scaled cosines (normalized features and weights, no bias).

    .. math:: \ell_i = -\log \frac{e^{s \cos\theta_{i y_i}}}{\sum_j e^{s \cos\theta_{ij}}}

    Without the scale the logits lie in [-1, 1] and the loss cannot fall below
    :func:`normface_lower_bound` (n, 1), about 8.27 for 10575 classes: s is what lets it converge.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4] (default 16). reduction: "mean" (over the rows not ignored), "sum" or
        "none" (0 for an ignored row). ignore_index: a negative integer (default -1) or None.

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    reduction = check_reduction(reduction)
    logits = normface_logits(x, W, y, s, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


def cosface_logits(x, W, y, s=64.0, m=0.35, margin_grad="exact", ignore_index=-1):
    r"""CosFace (LMCL) logits: the target's cosine is lowered by m before scaling.

    .. math::

        z_{ij} = s \cos\theta_{ij} \ (j \ne y_i), \qquad z_{i y_i} = s (\cos\theta_{i y_i} - m)

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4]. m: cosine margin >= 0, or a (B,) array of them (one per sample).
        margin_grad: "exact" or "detached" (the value s (cos - m), the gradient of s cos: the same,
        as this margin is a constant shift). ignore_index: a negative integer or None; those rows
        keep s cos theta.

    Returns:
        (B, C) logits.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    s = check_scale(s)
    if np.ndim(m) == 0:  # a number is checked before the arrays, as every hyperparameter
        m = margin_per_sample(m, 0, "m", check_cosine_margin)
    margin_grad, ignore_index = check_margin_grad(margin_grad), check_ignore_index(ignore_index)
    x, W, y = check_features_weights_labels(x, W, y, ignore_index)
    m = margin_per_sample(m, len(y), "m", check_cosine_margin)
    y, kept = split_ignored(y, ignore_index)
    cos = cosines(x, W)
    return with_margin(s * cos, y, kept, s * (pick(cos, y) - m), margin_grad)


def cosface_loss(x, W, y, s=64.0, m=0.35, reduction="mean", margin_grad="exact", ignore_index=-1):
    r"""CosFace, the large margin cosine loss.

    .. math::

        \ell_i = -\log \frac{e^{s(\cos\theta_{i y_i} - m)}}
                           {e^{s(\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4] (default 64). m: cosine margin >= 0 (default 0.35), or a (B,) array.
        reduction: "mean" (over the rows not ignored), "sum" or "none" (0 for an ignored row).
        margin_grad: "exact" (default) or "detached". ignore_index: a negative integer (default -1)
        or None.

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    reduction = check_reduction(reduction)
    logits = cosface_logits(x, W, y, s, m, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


def am_softmax_logits(x, W, y, s=30.0, m=0.35, margin_grad="exact", ignore_index=-1):
    r"""AM-Softmax logits: the same formula as :func:`cosface_logits`, with AM-Softmax's default s = 30.

    .. math:: z_{i y_i} = s (\cos\theta_{i y_i} - m), \qquad z_{ij} = s \cos\theta_{ij}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4]. m: cosine margin >= 0, or a (B,) array of them (one per sample).
        margin_grad: "exact" or "detached" (the value s (cos - m), the gradient of s cos: the same,
        as this margin is a constant shift). ignore_index: a negative integer or None; those rows
        keep s cos theta.

    Returns:
        (B, C) logits.

    References:
        Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
    """
    return cosface_logits(x, W, y, s, m, margin_grad, ignore_index)


def am_softmax_loss(x, W, y, s=30.0, m=0.35, reduction="mean", margin_grad="exact", ignore_index=-1):
    r"""AM-Softmax: the additive cosine margin loss, CosFace's formula with s = 30 by default.

    .. math::

        \ell_i = -\log \frac{e^{s(\cos\theta_{i y_i} - m)}}
                           {e^{s(\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4] (default 30). m: cosine margin >= 0 (default 0.35), or a (B,) array.
        reduction: "mean" (over the rows not ignored), "sum" or "none" (0 for an ignored row).
        margin_grad: "exact" (default) or "detached". ignore_index: a negative integer (default -1)
        or None.

    Returns:
        The loss (float64): per sample for "none", else reduced over the batch.

    References:
        Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
    """
    return cosface_loss(x, W, y, s, m, reduction, margin_grad, ignore_index)


__all__ = [
    "PEAK_ANGLE",
    "am_softmax_logits",
    "am_softmax_loss",
    "arcface_gap",
    "arcface_logits",
    "arcface_loss",
    "combined_gap",
    "combined_margin_logits",
    "combined_margin_loss",
    "cosface_logits",
    "cosface_loss",
    "cosface_min_scale",
    "normface_logits",
    "normface_loss",
    "normface_lower_bound",
]
