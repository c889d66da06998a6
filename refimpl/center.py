"""Center loss and its center update rule (Wen et al., ECCV 2016): the reference math.

The loss pulls each feature towards a center of its class; the centers are not learned by the
gradient of the loss but moved, once per training step, towards the mean of their class's
features in the batch. Derivation: ``derivations/08-center-loss.md``.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from refimpl.arrays import check_features_table_labels, reduce_loss
from softmax_common.checks import check_interval


def _check_features_labels_centers(x, y, centers):
    x, centers, y = check_features_table_labels(x, centers, y, "centers")
    return x, y, centers


def center_loss(x, y, centers, reduction="mean"):
    r"""Center loss: half the squared distance of each feature to the center of its class.

    .. math:: \ell_i = \tfrac{1}{2} \| x_i - c_{y_i} \|_2^2

    With ``reduction="mean"`` the gradient is :math:`\partial L / \partial x_i = (x_i - c_{y_i}) / B`.
    Wen et al. sum over the mini-batch (their eq. 2); the mean only rescales the weight lambda it is
    trained with (their caffe layer divides by the batch size too).

    Args:
        x: (B, D) features.
        y: (B,) integer labels in [0, C).
        centers: (C, D) class centers.
        reduction: "mean" (over the batch), "sum" or "none".

    Returns:
        The loss: a scalar, or (B,) for ``reduction="none"``.

    References:
        Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face Recognition",
        ECCV 2016, eq. (2).
    """
    x, y, centers = _check_features_labels_centers(x, y, centers)
    diff = x - centers[y]
    return reduce_loss(0.5 * anp.sum(diff * diff, axis=-1), reduction)


def center_update(x, y, centers, alpha=0.5):
    r"""The centers after one step of Wen et al.'s update rule (a new array; nothing is modified).

    .. math::

        c_j \leftarrow c_j - \alpha \, \frac{\sum_{i:\, y_i = j} (c_j - x_i)}{1 + n_j},
        \qquad n_j = |\{i : y_i = j\}|

    The 1 in the denominator keeps the step defined for classes absent from the batch (n_j = 0:
    the center stays where it is) and makes it a damped move towards the batch mean:
    :math:`c_j + \alpha \frac{n_j}{1 + n_j} (\bar x_j - c_j)`.

    Non-finite features: a row of x with a nan or an infinite entry says nothing about where its
    class's center is, and would make that center non-finite for good (every later loss inf or
    nan). Such rows are skipped: they count neither in n_j nor in the sum, exactly as if they were
    not in the batch (a batch of only such rows leaves every center as it was). The loss itself
    (:func:`center_loss`) still reports them as non-finite.

    Args:
        x: (B, D) features (treated as data: detach them in a training loop).
        y: (B,) integer labels in [0, C).
        centers: (C, D) current centers.
        alpha: the step size, in (0, 1] (default 0.5).

    Returns:
        The (C, D) updated centers.

    References:
        Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition", ECCV 2016,
        eq. (4) and Algorithm 1.
    """
    alpha = check_interval(alpha, "alpha", 0.0, 1.0, low_open=True)
    x, y, centers = _check_features_labels_centers(x, y, centers)
    classes = np.shape(getval(centers))[0]
    finite = np.all(np.isfinite(getval(x)), axis=1)  # (B,): the rows the rule may use
    # (C, B): member i of class j, for the finite rows only
    onehot = ((np.arange(classes)[:, None] == y[None, :]) & finite[None, :]).astype(np.float64)
    counts = onehot.sum(axis=1)[:, None]
    # sum_{i: y_i = j} (c_j - x_i) = n_j c_j - sum_{i: y_i = j} x_i; skipped rows enter as 0, not as 0 * nan
    delta = counts * centers - anp.dot(onehot, anp.where(finite[:, None], x, 0.0))
    return centers - alpha * delta / (1.0 + counts)


__all__ = ["center_loss", "center_update"]
