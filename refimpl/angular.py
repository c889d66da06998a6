"""Multiplicative angular margins: L-Softmax and A-Softmax (SphereFace), the reference math.

Both losses replace the target logit's cos(theta) by a function psi(theta) that behaves like
cos(m theta) near theta = 0 but is defined, continuous and decreasing on the whole of [0, pi]:

    psi(theta) = (-1)^k cos(m theta) - 2k,   k = floor(m theta / pi) clamped to [0, m - 1].

Inside the losses cos(m theta) is evaluated as the Chebyshev polynomial T_m(cos theta) (the
multiple-angle expansion), so the loss is a polynomial in the cosine: exact at cos = +-1 and
differentiable there, which cos(m * arccos(c)) is not. Only the integer k comes from the angle,
and it carries no gradient (psi is continuously differentiable across the points where k jumps).
Derivations: ``derivations/06-lsoftmax.md`` and ``derivations/07-sphereface.md``.
"""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from refimpl.arrays import as_float64, check_ndim, pick, split_ignored
from refimpl.geometry import check_features_weights_labels, cosines, row_norms, target_angles
from refimpl.margins import margin_loss, with_margin
from softmax_common.checks import (
    check_ignore_index,
    check_margin_grad,
    check_margin_multiplier,
    check_nonnegative,
    check_reduction,
)


def _power(v, p: int):
    # v**0 is written as a constant: autograd differentiates v**0 as 0 * v**-1, which is nan at v = 0.
    return anp.ones_like(v) if p == 0 else v**p


def _clip_unit(c):
    # Clip to [-1, 1] with anp.where rather than anp.clip: at c = +-1 exactly the gradient passes
    # (the polynomial's derivative), as torch.clamp does; np.clip's gradient is 0 at its bounds.
    return anp.where(c > 1.0, 1.0, anp.where(c < -1.0, -1.0, c))


def _multiple_angle(c, m: int):
    """cos(m theta) from c = cos(theta): sum_n (-1)^n C(m, 2n) c^(m - 2n) (1 - c^2)^n (no checks)."""
    sin2 = 1.0 - c * c
    return sum((-1) ** n * math.comb(m, 2 * n) * _power(c, m - 2 * n) * _power(sin2, n) for n in range(m // 2 + 1))


def _margin_index(theta, m: int) -> np.ndarray:
    """k = floor(m theta / pi) clamped to [0, m - 1]: piecewise constant, so it carries no gradient."""
    return np.clip(np.floor(m * np.asarray(getval(theta)) / np.pi), 0, m - 1)


def _psi_from_cosine(c, theta, m: int):
    """psi with cos(m theta) evaluated as the polynomial T_m(c); theta only picks the branch k."""
    k = _margin_index(theta, m)
    return (1.0 - 2.0 * (k % 2)) * _multiple_angle(_clip_unit(c), m) - 2.0 * k


def cos_m_theta(c, m):
    r"""cos(m * arccos(c)) by the multiple-angle expansion: the Chebyshev polynomial T_m(c).

    .. math::

        \cos(m\theta) = \sum_{n=0}^{\lfloor m/2 \rfloor} (-1)^n \binom{m}{2n}
                        \cos^{m-2n}\theta \, (1 - \cos^2\theta)^n

    A polynomial in c, so it is exact and smooth at c = +-1, where arccos has an infinite slope.
    Following the numerics policy (theta = arccos(clip(c, -1, 1))), c is clipped to [-1, 1] first:
    a computed cosine can exceed 1 by a rounding error. The alternating sum cancels terms as large
    as 2^(m/2), so its error grows like 2^(m/2) eps: within 128 ulp up to m = 16, the bound on m
    (derivations/06-lsoftmax.md measures it; the port's three-term recurrence errs by ~ m eps).

    Args:
        c: cosines, any shape.
        m: the multiplier, an integer in [1, 16] (``softmax_common.checks.MAX_MARGIN_MULTIPLIER``:
            beyond it the reference's multiple-angle sum loses its accuracy).

    Returns:
        An array of the shape of ``c``.

    References:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016, eq. (7).
    """
    m = check_margin_multiplier(m)
    c = as_float64(c, "c")
    check_ndim(c, "c")
    return _multiple_angle(_clip_unit(c), m)


def lsoftmax_psi(theta, m):
    r"""The margin function of L-Softmax and A-Softmax, elementwise on angles.

    .. math::

        \psi(\theta) = (-1)^k \cos(m\theta) - 2k, \qquad
        k = \min(\lfloor m\theta/\pi \rfloor, m - 1), \ \theta \in [0, \pi]

    psi(0) = 1 and psi(pi) = 1 - 2m; it is continuous, non-increasing, continuously differentiable,
    and psi(theta) <= cos(theta) (equality for m = 1). The clamp of k to [0, m - 1] makes psi(pi) use
    the last branch (m theta / pi = m lands on k = m - 1, where both branches give 1 - 2m) and keeps a
    value a rounding error outside [0, pi] on the nearest branch; other angles are not meaningful.

    Args:
        theta: angles in [0, pi], any shape.
        m: the angular multiplier, an integer in [1, 16].

    Returns:
        psi(theta), an array of the shape of ``theta``.

    References:
        Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016, eq. (6);
        Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017, eq. (7).
    """
    m = check_margin_multiplier(m)
    theta = as_float64(theta, "theta")
    check_ndim(theta, "theta")
    k = _margin_index(theta, m)
    return (1.0 - 2.0 * (k % 2)) * anp.cos(m * theta) - 2.0 * k


def _annealed_logits(x, W, y, m, weight, weight_name: str, keep_weight_norms: bool, margin_grad, ignore_index):
    """Logits |x| (|W_j|) cos theta_j, the target's cos replaced by (weight * cos + psi) / (1 + weight).

    "detached" keeps that target logit's value with the gradient of the plain one, |x| (|W_y|) cos
    theta_y; rows labelled ignore_index keep the plain logits.
    """
    m = check_margin_multiplier(m)
    weight = check_nonnegative(weight, weight_name)
    margin_grad, ignore_index = check_margin_grad(margin_grad), check_ignore_index(ignore_index)
    x, W, y = check_features_weights_labels(x, W, y, ignore_index)
    y, kept = split_ignored(y, ignore_index)
    cos = cosines(x, W)
    cos_y = pick(cos, y)
    psi = _psi_from_cosine(cos_y, target_angles(x, W, y), m)
    target = (weight * cos_y + psi) / (1.0 + weight)
    scale = row_norms(x) * row_norms(W).T if keep_weight_norms else anp.broadcast_to(row_norms(x), cos.shape)
    return with_margin(scale * cos, y, kept, pick(scale, y) * target, margin_grad)


def lsoftmax_logits(x, W, y, m=4, beta=0.0, margin_grad="exact", ignore_index=-1):
    r"""The (B, C) logits of L-Softmax: :math:`\|W_j\|\|x\|\cos\theta_j`, the target's with the margin.

    .. math::

        f_{y} = \|W_y\| \|x\| \frac{\beta \cos\theta_y + \psi(\theta_y)}{1 + \beta}, \qquad
        f_j = \|W_j\| \|x\| \cos\theta_j = W_j^\top x \quad (j \ne y)

    Args:
        x: (B, D) features. W: (C, D) class weights (no bias). y: (B,) labels in [0, C).
        m: the angular multiplier, an integer in [1, 16] (m = 1 is plain softmax of W x).
        beta: the annealing weight >= 0: 0 is the full margin, beta -> infinity the plain logits.
        margin_grad: "exact" or "detached" (the target logit's value, the gradient of W_y^T x).
        ignore_index: a negative integer (default -1) or None; those rows keep the plain logits.

    References:
        Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016, eqs. (5)-(7)
        and section 5 (the beta annealing).
    """
    return _annealed_logits(x, W, y, m, beta, "beta", True, margin_grad, ignore_index)


def lsoftmax_loss(x, W, y, m=4, beta=0.0, reduction="mean", margin_grad="exact", ignore_index=-1):
    r"""L-Softmax: softmax cross-entropy of :func:`lsoftmax_logits`.

    .. math::

        \ell_i = -\log \frac{e^{f_{y_i}}}{e^{f_{y_i}} + \sum_{j \ne y_i} e^{\|W_j\|\|x_i\|\cos\theta_j}}

    With beta = 0 the target logit is :math:`\|W_y\|\|x\|\psi(\theta_y)`; training from scratch
    starts with a large beta and lowers it (``torch_port.MarginSchedule``).

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        m: integer in [1, 16] (default 4). beta: >= 0 (default 0, the full margin).
        reduction: "mean" (over the rows not ignored), "sum" or "none" (0 for an ignored row).
        margin_grad: "exact" (default) or "detached". ignore_index: a negative integer (default -1)
        or None.

    Returns:
        The loss: a scalar, or (B,) for ``reduction="none"``.

    References:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.
    """
    reduction = check_reduction(reduction)
    logits = lsoftmax_logits(x, W, y, m, beta, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


def sphereface_logits(x, W, y, m=4, lamb=0.0, margin_grad="exact", ignore_index=-1):
    r"""The (B, C) logits of A-Softmax: :math:`\|x\|\cos\theta_j` (W normalised, no bias), the target's
    with the margin.

    .. math::

        f_{y} = \|x\| \frac{\lambda \cos\theta_y + \psi(\theta_y)}{1 + \lambda}, \qquad
        f_j = \|x\| \cos\theta_j \quad (j \ne y)

    Args:
        x: (B, D) features. W: (C, D) class weights; only their directions matter. y: (B,) labels.
        m: the angular multiplier, an integer in [1, 16] (default 4).
        lamb: the annealing weight lambda >= 0: 0 is the full margin.
        margin_grad: "exact" or "detached" (the target logit's value, the gradient of |x| cos theta_y).
        ignore_index: a negative integer (default -1) or None; those rows keep the plain logits.

    References:
        Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017, eq. (7)
        and the released margin_inner_product layer (lambda).
    """
    return _annealed_logits(x, W, y, m, lamb, "lamb", False, margin_grad, ignore_index)


def sphereface_loss(x, W, y, m=4, lamb=0.0, reduction="mean", margin_grad="exact", ignore_index=-1):
    r"""A-Softmax (SphereFace): softmax cross-entropy of :func:`sphereface_logits`.

    .. math::

        \ell_i = -\log \frac{e^{\|x_i\|\psi(\theta_{y_i})}}
                 {e^{\|x_i\|\psi(\theta_{y_i})} + \sum_{j \ne y_i} e^{\|x_i\|\cos\theta_j}}
        \quad (\lambda = 0)

    Args:
        x: (B, D) features. W: (C, D) class weights. y: (B,) labels in [0, C).
        m: integer in [1, 16] (default 4). lamb: >= 0 (default 0, the full margin).
        reduction: "mean" (over the rows not ignored), "sum" or "none" (0 for an ignored row).
        margin_grad: "exact" (default) or "detached". ignore_index: a negative integer (default -1)
        or None.

    Returns:
        The loss: a scalar, or (B,) for ``reduction="none"``.

    References:
        Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
    """
    reduction = check_reduction(reduction)
    logits = sphereface_logits(x, W, y, m, lamb, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


__all__ = [
    "cos_m_theta",
    "lsoftmax_logits",
    "lsoftmax_loss",
    "lsoftmax_psi",
    "sphereface_logits",
    "sphereface_loss",
]
