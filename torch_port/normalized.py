r"""Normalized-margin losses in PyTorch: NormFace, CosFace/AM-Softmax, ArcFace, the combined margin.

Same names, arguments and defaults as ``refimpl.normalized``. Every loss is a :class:`MarginConfig`
of the engine (``torch_port/engine.py``): a fixed scale s, unit features and weights, and a target
transform psi(cos theta_y, theta_y); the engine computes cosines, angles and the cross-entropy in
float32 (float64 stays float64) with autocast disabled. The heads in ``torch_port/normalized_heads.py``
use the same ``*_config`` builders.

Gradients: psi is written in theta (cos(theta + m), not sqrt(1 - cos^2)), and the engine's theta is
2*atan2(|x^ - w^|, |x^ + w^|), whose gradient is exact away from the poles and zero at theta = 0
and pi (the cone points, where ArcFace has no derivative); the chain rule then carries the true
factor d cos(theta + m) / d cos(theta) = sin(theta + m) / sin(theta) (derivations/05-arcface-combined.md).

The closed-form bounds :func:`normface_lower_bound` and :func:`cosface_min_scale` take and return
Python numbers (they are functions of hyperparameters, not of tensors): both packages export the
one plain-Python implementation in ``softmax_common.closed_forms``, so they give the same number to
the last bit.
"""

from __future__ import annotations

import torch

from softmax_common.checks import check_ignore_index
from softmax_common.closed_forms import cosface_min_scale, normface_lower_bound
from torch_port.engine import ABSENT, check_inputs, margin_cross_entropy, margin_logits, plain_logits
from torch_port.margins import (
    ArcFaceTarget,
    CombinedMarginTarget,
    CosFaceTarget,
    arcface_config,
    combined_margin_config,
    cosface_config,
    normface_config,
)

# ---------------------------------------------------------------------------------------------
# The functional API
# ---------------------------------------------------------------------------------------------


def normface_logits(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor | None = None, s: float = 16.0, ignore_index: int | None = ABSENT
):
    r"""NormFace logits: the scaled cosine between each feature and each class weight.

    .. math:: z_{ij} = s \cos\theta_{ij}

    Args:
        x: (B, D) features. W: (C, D) class weights.
        y: optional (B,) labels in [0, C), only validated (NormFace has no margin).
        s: scale in (0, 1e4]: a number, or a floating-point 0-d tensor (see :func:`normface_loss`).

    Returns:
        (B, C) logits in float32 (float64 for float64 inputs).

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    config = normface_config(s)
    if y is not None:
        check_inputs(x, W, y, ignore_index=check_ignore_index(ignore_index))
    return plain_logits(x, W, config)


def normface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 16.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""NormFace: cross-entropy of scaled cosines of unit features and unit weights (no bias).

    .. math:: \ell_i = -\log \frac{e^{s \cos\theta_{i y_i}}}{\sum_j e^{s \cos\theta_{ij}}}

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 16): a number, or a floating-point 0-d tensor such as a
            learnable scale (differentiable), held to the same rules with the same errors. A
            tensor's value is read back once per call to check it (one synchronisation on GPU);
            ``NormFace(learn_scale=True)`` keeps s = exp(log_scale) > 0 by construction and skips
            that read.
        reduction: "mean", "sum" or "none".
        chunk_size: None, or the number of classes per chunk on the memory-efficient path.
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient.

    Returns:
        The loss in float32 (float64 for float64 inputs).

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    return margin_cross_entropy(x, W, y, normface_config(s), reduction, chunk_size, ignore_index)


def cosface_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m: float = 0.35,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
):
    r"""CosFace logits: the target's cosine lowered by m (a cosine margin, not an angle), every cosine scaled by s.

    .. math:: z_{i y_i} = s (\cos\theta_{i y_i} - m), \qquad z_{ij} = s \cos\theta_{ij} \ (j \ne y_i)

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m: cosine margin >= 0.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        (B, C) logits in float32 (float64 for float64 inputs).

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    return margin_logits(x, W, y, cosface_config(s, m, margin_grad), ignore_index)


def cosface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m: float = 0.35,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""CosFace, the large margin cosine loss.

    .. math::

        \ell_i = -\log \frac{e^{s(\cos\theta_{i y_i} - m)}}
                           {e^{s(\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 64). m: cosine margin >= 0 (default 0.35).
        reduction: "mean", "sum" or "none". chunk_size: None or classes per chunk.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        The loss in float32 (float64 for float64 inputs): per sample for "none", else reduced.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    return margin_cross_entropy(x, W, y, cosface_config(s, m, margin_grad), reduction, chunk_size, ignore_index)


def am_softmax_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 30.0,
    m: float = 0.35,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
):
    r"""AM-Softmax logits: CosFace's formula with AM-Softmax's default s = 30 (m a cosine margin, not an angle).

    .. math:: z_{i y_i} = s (\cos\theta_{i y_i} - m), \qquad z_{ij} = s \cos\theta_{ij} \ (j \ne y_i)

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m: cosine margin >= 0.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        (B, C) logits in float32 (float64 for float64 inputs).

    References:
        Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
    """
    return cosface_logits(x, W, y, s, m, margin_grad, ignore_index)


def am_softmax_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 30.0,
    m: float = 0.35,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""AM-Softmax: the additive cosine margin loss (CosFace's formula, default s = 30).

    .. math::

        \ell_i = -\log \frac{e^{s(\cos\theta_{i y_i} - m)}}
                           {e^{s(\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 30). m: cosine margin >= 0 (default 0.35).
        reduction: "mean", "sum" or "none". chunk_size: None or classes per chunk.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        The loss in float32 (float64 for float64 inputs): per sample for "none", else reduced.

    References:
        Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
    """
    return cosface_loss(x, W, y, s, m, reduction, chunk_size, margin_grad, ignore_index)


def arcface_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m: float = 0.5,
    easy_margin: bool = False,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
):
    r"""ArcFace logits: the margin m, an angle in radians in [0, pi/2], added to the target's angle.

    .. math::

        z_{i y_i} = s\,\psi(\theta_{i y_i}), \quad z_{ij} = s \cos\theta_{ij}, \qquad
        \psi(\theta) = \cos(\theta + m) \text{ if } \theta + m \le \pi \text{ else } \cos\theta - m\sin m

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m: angular margin in [0, pi/2]. easy_margin: margin only where cos theta_y > 0.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        (B, C) logits in float32 (float64 for float64 inputs).

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.
    """
    return margin_logits(x, W, y, arcface_config(s, m, easy_margin, margin_grad), ignore_index)


def arcface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m: float = 0.5,
    easy_margin: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""ArcFace, the additive angular margin loss.

    .. math::

        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}},
        \qquad \psi(\theta) = \cos(\theta + m) \text{ while } \theta + m \le \pi,
        \text{ else } \cos\theta - m \sin m

    psi jumps down at theta = pi - m (by cos m + m sin m - 1 >= 0), so it never rewards a worse
    feature. ``easy_margin=True`` applies the margin only where cos theta_y > 0 (psi = cos theta
    elsewhere; that psi jumps up by sin m at pi/2). Gradients are exact away from theta = 0, pi - m
    and pi, finite everywhere (zero through theta at the poles).

    m is an angle in radians (0.5 rad = 28.6 degrees; pytorch-metric-learning's ArcFaceLoss takes degrees), at most
    pi/2: past a right angle a feature on its class's direction would score s cos m < 0, below every class orthogonal
    to it. A larger m is refused, with its value in radians when it reads as degrees (28.6 -> 0.4992).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 64). m: angular margin in [0, pi/2] (default 0.5).
        easy_margin: a bool (default False). reduction: "mean", "sum" or "none".
        chunk_size: None or classes per chunk.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        The loss in float32 (float64 for float64 inputs): per sample for "none", else reduced.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.
    """
    config = arcface_config(s, m, easy_margin, margin_grad)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


def combined_margin_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
):
    r"""Combined-margin logits: the target logit s (cos(m1 theta + m2) - m3), extended monotonically past pi.

    .. math::

        z_{i y_i} = s\,\psi(\theta_{i y_i}), \quad z_{ij} = s \cos\theta_{ij}, \qquad
        \psi(\theta) = \cos(m_1\theta + m_2) - m_3 \text{ if } m_1\theta + m_2 \le \pi
        \text{ else } \cos\theta - m_3 - c(m_1, m_2)

    Units: m1 multiplies the angle; m2 is an angle in radians (see :func:`combined_margin_loss`); m3 a cosine margin.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4]. m1: in [1, 16]. m2: in [0, pi/2]. m3: >= 0.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        (B, C) logits in float32 (float64 for float64 inputs).

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019 (the combined margin).
    """
    return margin_logits(x, W, y, combined_margin_config(s, m1, m2, m3, margin_grad), ignore_index)


def combined_margin_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""The combined margin loss (m1, m2, m3): SphereFace's, ArcFace's and CosFace's margins at once.

    .. math::

        \psi(\theta) = \begin{cases}
            \cos(m_1 \theta + m_2) - m_3 & m_1 \theta + m_2 \le \pi \\
            \cos\theta - m_3 - c(m_1, m_2) & \text{otherwise}
        \end{cases}

    with c from ``softmax_common.closed_forms.combined_margin_gap``: psi is non-increasing, <= cos theta, and
    equals ArcFace's psi for (1, m, 0) and CosFace's for (1, 0, m).

    Units: m1 multiplies the angle (a number >= 1); m2 is an angle in radians, in [0, pi/2] as ArcFace's m; m3 is a
    cosine margin, not an angle.

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        s: scale in (0, 1e4] (default 64). m1 in [1, 16] (default 1). m2 in [0, pi/2] (default 0.5).
        m3 >= 0 (default 0). reduction: "mean", "sum" or "none". chunk_size: None or classes per chunk.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of
            s cos theta_y, insightface's convention: torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the other rows; 0 when all are ignored); *_logits leave them margin-free.
        m (and m1, m2, m3): a number, or a (B,) tensor of per-sample margins (constants, not learned).

    Returns:
        The loss in float32 (float64 for float64 inputs): per sample for "none", else reduced.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019 (the combined margin).
    """
    config = combined_margin_config(s, m1, m2, m3, margin_grad)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


__all__ = [
    "ArcFaceTarget",
    "CombinedMarginTarget",
    "CosFaceTarget",
    "am_softmax_logits",
    "am_softmax_loss",
    "arcface_config",
    "arcface_logits",
    "arcface_loss",
    "combined_margin_config",
    "combined_margin_logits",
    "combined_margin_loss",
    "cosface_config",
    "cosface_logits",
    "cosface_loss",
    "cosface_min_scale",
    "normface_config",
    "normface_logits",
    "normface_loss",
    "normface_lower_bound",
]
