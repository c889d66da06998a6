"""L-Softmax and A-Softmax (SphereFace) in PyTorch: configurations of the margin engine.

Same names, arguments and defaults as ``refimpl.angular``. Each loss is a
:class:`torch_port.engine.MarginConfig`: L-Softmax keeps |x| and |W_j| (logits are W_j . x), A-Softmax
keeps |x| only (W normalised); both replace the target's cosine by

    (w * cos theta_y + psi(theta_y)) / (1 + w),   psi = (-1)^k T_m(cos theta_y) - 2k,

with w the annealing weight (beta for L-Softmax, lambda for SphereFace). T_m, the Chebyshev
polynomial, is cos(m theta) written in the cosine: a polynomial is exact and smooth at cos = +-1,
where cos(m * theta(x)) would inherit the angle's cone point. The integer k comes from the engine's
half-angle theta (accurate at the poles) and carries no gradient; psi is C^1 across its jumps.
Derivations: ``derivations/06-lsoftmax.md``, ``derivations/07-sphereface.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from softmax_common.checks import check_margin_multiplier, check_nonnegative
from torch_port.engine import ABSENT, MarginConfig, margin_cross_entropy, margin_logits
from torch_port.margins import with_margin_grad
from torch_port.tensor_checks import check_float_tensor, compute_dtype


def _chebyshev(c: torch.Tensor, m: int) -> torch.Tensor:
    """T_m(c) by the three-term recurrence T_{n+1} = 2c T_n - T_{n-1}: stable on [-1, 1] (error ~ m^2 eps)."""
    previous, current = torch.ones_like(c), c
    for _ in range(m - 1):
        previous, current = current, 2.0 * c * current - previous
    return current


def _clip_unit(c: torch.Tensor) -> torch.Tensor:
    # torch.where, not clamp: the gradient passes at c = +-1 exactly and is 0 only beyond, the same
    # convention as the reference (autograd's clip would zero it at the bounds themselves).
    return torch.where(c > 1.0, torch.ones_like(c), torch.where(c < -1.0, -torch.ones_like(c), c))


def _margin_index(theta: torch.Tensor, m: int) -> torch.Tensor:
    """k = floor(m theta / pi) clamped to [0, m - 1], as a float tensor without gradient."""
    return torch.floor(m * theta.detach() / math.pi).clamp_(0, m - 1)


def _psi_from_cosine(c: torch.Tensor, theta: torch.Tensor, m: int) -> torch.Tensor:
    k = _margin_index(theta, m)
    return (1.0 - 2.0 * torch.remainder(k, 2)) * _chebyshev(_clip_unit(c), m) - 2.0 * k


def _elementwise_input(t, name: str) -> torch.Tensor:
    """A floating tensor in the compute dtype (half upcast to float32, float64 kept)."""
    check_float_tensor(t, name)
    return t.to(compute_dtype((name, t)))


def cos_m_theta(c: torch.Tensor, m: int) -> torch.Tensor:
    r"""cos(m * arccos(c)): the Chebyshev polynomial T_m(c), by the three-term recurrence.

    .. math:: T_0 = 1,\quad T_1 = c,\quad T_{n+1}(c) = 2c\,T_n(c) - T_{n-1}(c)

    The same values as the multiple-angle expansion (``refimpl.cos_m_theta``); the recurrence is
    the numerically stable way to evaluate it on [-1, 1]. c is clipped to [-1, 1] first (a computed
    cosine can exceed 1 by a rounding error); the gradient is the polynomial's, finite everywhere.

    Args:
        c: cosines, any shape and floating dtype (computed in at least float32).
        m: the multiplier, an integer in [1, 16] (``softmax_common.checks.MAX_MARGIN_MULTIPLIER``:
            beyond it the reference's multiple-angle sum loses its accuracy).

    Returns:
        A tensor of the shape of ``c``.

    References:
        Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016, eq. (7).
    """
    m = check_margin_multiplier(m)
    c = _elementwise_input(c, "c")
    with torch.autocast(device_type=c.device.type, enabled=False):
        return _chebyshev(_clip_unit(c), m)


def lsoftmax_psi(theta: torch.Tensor, m: int) -> torch.Tensor:
    r"""The L-Softmax / A-Softmax margin function on angles theta in [0, pi].

    .. math::

        \psi(\theta) = (-1)^k \cos(m\theta) - 2k, \qquad k = \min(\lfloor m\theta/\pi \rfloor, m - 1)

    Continuous, non-increasing, C^1, psi(0) = 1, psi(pi) = 1 - 2m, psi <= cos. The range of theta is
    not checked (that would need a device synchronisation, and a float32 pi already exceeds the true
    pi); k is clamped to [0, m - 1], so values a rounding error outside [0, pi] stay on the end branches.

    Args:
        theta: angles, any shape and floating dtype (computed in at least float32).
        m: the angular multiplier, an integer in [1, 16].

    Returns:
        psi(theta), a tensor of the shape of ``theta``.

    References:
        Liu et al., ICML 2016, eq. (6); Liu et al., "SphereFace", CVPR 2017, eq. (7).
    """
    m = check_margin_multiplier(m)
    theta = _elementwise_input(theta, "theta")
    with torch.autocast(device_type=theta.device.type, enabled=False):
        k = _margin_index(theta, m)
        return (1.0 - 2.0 * torch.remainder(k, 2)) * torch.cos(m * theta) - 2.0 * k


@dataclass(frozen=True)
class AnnealedMarginTarget:
    """The engine's target transform psi_w(cos, theta) = (w cos + psi(theta)) / (1 + w), with psi
    the margin function of multiplier m (evaluated from the cosine, see :func:`lsoftmax_psi`).

    A frozen dataclass rather than a closure, so configurations pickle and compare by value. The
    weight is a number, or a 0-d tensor (a head's :meth:`~torch_port.MarginSchedule.weight`, computed
    on the device from the iteration buffer, so a compiled or CUDA step never reads it back)."""

    m: int
    weight: float | torch.Tensor

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor) -> torch.Tensor:
        return (self.weight * cos_y + _psi_from_cosine(cos_y, theta_y, self.m)) / (1.0 + self.weight)


def annealing_weight(value, name: str) -> float | torch.Tensor:
    """An annealing weight >= 0: a number (checked), or a 0-d floating-point tensor that a
    :class:`~torch_port.MarginSchedule` computed (>= 0 by construction; its value is not read)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dim() != 0:
            raise TypeError(f"{name} must be a number >= 0 or a floating-point 0-d tensor, got {value!r}")
        return value
    return check_nonnegative(value, name)


def lsoftmax_config(m: int, beta: float | torch.Tensor) -> MarginConfig:
    """L-Softmax as an engine configuration: logits |W_j||x| cos, target |W_y||x| psi_beta."""
    m = check_margin_multiplier(m)
    beta = annealing_weight(beta, "beta")
    return MarginConfig(target=AnnealedMarginTarget(m, beta), feature_norm=True, weight_norm=True)


def sphereface_config(m: int, lamb: float | torch.Tensor) -> MarginConfig:
    """A-Softmax as an engine configuration: logits |x| cos (W normalised), target |x| psi_lambda."""
    m = check_margin_multiplier(m)
    lamb = annealing_weight(lamb, "lamb")
    return MarginConfig(target=AnnealedMarginTarget(m, lamb), feature_norm=True)


def lsoftmax_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    m: int = 4,
    beta: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""The (B, C) L-Softmax logits :math:`\|W_j\|\|x\|\cos\theta_j`, the target's with the margin.

    .. math:: f_y = \|W_y\|\|x\| \frac{\beta\cos\theta_y + \psi(\theta_y)}{1 + \beta}

    Args:
        x: (B, D) features. W: (C, D) class weights (no bias). y: (B,) labels in [0, C).
        m: integer in [1, 16] (m = 1: the plain logits W x). beta: annealing weight >= 0 (0: full margin).
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of the
            un-margined logit; torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the others); the logits leave them margin-free.

    References:
        Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.
    """
    return margin_logits(x, W, y, with_margin_grad(lsoftmax_config(m, beta), margin_grad), ignore_index)


def lsoftmax_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    m: int = 4,
    beta: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""L-Softmax: cross-entropy of :func:`lsoftmax_logits` (the shared margin engine, no new CE code).

    .. math::

        \ell_i = -\log \frac{e^{f_{y_i}}}{e^{f_{y_i}} + \sum_{j \ne y_i} e^{\|W_j\|\|x_i\|\cos\theta_j}},
        \qquad f_{y} = \|W_y\|\|x\| \frac{\beta\cos\theta_y + \psi(\theta_y)}{1 + \beta}

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) integer labels in [0, C).
        m: the angular multiplier, an integer in [1, 16] (default 4).
        beta: annealing weight >= 0 (default 0.0, the full margin); see ``torch_port.MarginSchedule``.
        reduction: "mean" (over the batch), "sum" or "none".
        chunk_size: None for the plain path; an int for the engine's memory-efficient path.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of the
            un-margined logit; torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the others); the logits leave them margin-free.

    Returns:
        The loss in float32 (float64 for float64 inputs).

    Example:
        >>> loss = lsoftmax_loss(features, head_weight, labels, m=4, beta=schedule.value())

    References:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.
    """
    config = with_margin_grad(lsoftmax_config(m, beta), margin_grad)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


def sphereface_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    m: int = 4,
    lamb: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""The (B, C) A-Softmax logits :math:`\|x\|\cos\theta_j` (W normalised), the target's with the margin.

    .. math:: f_y = \|x\| \frac{\lambda\cos\theta_y + \psi(\theta_y)}{1 + \lambda}

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        m: integer in [1, 16]. lamb: annealing weight >= 0 (0: full margin).
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of the
            un-margined logit; torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the others); the logits leave them margin-free.

    References:
        Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
    """
    return margin_logits(x, W, y, with_margin_grad(sphereface_config(m, lamb), margin_grad), ignore_index)


def sphereface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    m: int = 4,
    lamb: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""A-Softmax (SphereFace): cross-entropy of :func:`sphereface_logits`.

    .. math::

        \ell_i = -\log \frac{e^{f_{y_i}}}{e^{f_{y_i}} + \sum_{j \ne y_i} e^{\|x_i\|\cos\theta_j}},
        \qquad f_y = \|x\| \frac{\lambda\cos\theta_y + \psi(\theta_y)}{1 + \lambda}

    Args:
        x: (B, D) features. W: (C, D) class weights (only directions matter). y: (B,) labels in [0, C).
        m: integer in [1, 16] (default 4). lamb: annealing weight lambda >= 0 (default 0.0, the full margin).
        reduction: "mean" (over the batch), "sum" or "none".
        chunk_size: None for the plain path; an int for the engine's memory-efficient path.
        margin_grad: "exact" (default) or "detached" (the margin's value with the gradient of the
            un-margined logit; torch_port/margins.py).
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient
            ("mean" averages over the others); the logits leave them margin-free.

    Returns:
        The loss in float32 (float64 for float64 inputs).

    References:
        Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
    """
    config = with_margin_grad(sphereface_config(m, lamb), margin_grad)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


__all__ = [
    "AnnealedMarginTarget",
    "cos_m_theta",
    "lsoftmax_logits",
    "lsoftmax_loss",
    "lsoftmax_psi",
    "sphereface_logits",
    "sphereface_loss",
]
