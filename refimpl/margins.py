r"""What every margin loss shares: per-sample margins, the gradient convention, ignored rows.

- **Per-sample margins.** A margin may be a number or a (B,) array, one margin per sample
  (ElasticFace draws them, per-class margins index them by label); :func:`margin_per_sample` holds
  each entry to the scalar's check.
- **The gradient convention** (``margin_grad``). ``"exact"`` differentiates the target transform
  psi. ``"detached"`` keeps psi's value but gives the target logit the gradient of the un-margined
  logit, as insightface's arcface_torch does (it computes the margin under ``torch.no_grad`` in
  place, ``recognition/arcface_torch/losses.py``): in stop-gradient notation

  .. math:: z_y = s\cos\theta_y + \mathrm{sg}\bigl(s\,\psi(\theta_y) - s\cos\theta_y\bigr),
            \qquad \frac{\partial z_y}{\partial \cos\theta_y} = s.

  :func:`value_with_gradient_of` is that construction as one autograd primitive, which returns psi's
  value to the last bit (the sum above rounds).
- **Ignored rows** (``ignore_index``): a row labelled ``ignore_index`` (a negative integer, -1 by
  default as in insightface and Partial FC, or None) contributes no loss and no gradient; its logits
  are the margin-free ones; "mean" averages over the other rows, and 0.0 when none is left.

Derivation: ``derivations/10-subcenter-and-per-sample-margins.md``.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive

from refimpl.arrays import check_labels, check_ndim, pick, reduce_kept, split_ignored
from refimpl.geometry import replace_target
from refimpl.softmax import log_softmax
from softmax_common.checks import check_margin_vector_shape


@primitive
def value_with_gradient_of(value, surrogate):
    """``value``, differentiated as if it were ``surrogate``: the stop-gradient construction
    surrogate + sg(value - surrogate), without its rounding. Autograd has no stop_gradient; this
    primitive's VJP sends the whole cotangent to ``surrogate`` and none to ``value``."""
    return value


defvjp(
    value_with_gradient_of,
    lambda ans, value, surrogate: lambda g: anp.zeros_like(g),
    lambda ans, value, surrogate: lambda g: g,
)


def stop_gradient(v):
    """v, with derivative 0 (the margin of a detached target, MagFace's margin under "detached")."""
    return value_with_gradient_of(v, anp.zeros_like(v))


def margin_per_sample(m, batch: int, name: str, check):
    """A margin as a float, or as a (batch,) float64 array (one margin per sample).

    ``check(value)`` is the scalar's check (its message names the argument): every entry must pass
    it; an array of another shape is a ValueError naming ``name``. A 0-d array counts as a number.
    """
    if np.ndim(m) == 0:
        return check(m.item() if isinstance(m, np.ndarray | np.generic) else m)
    values = np.asarray(m)
    check_margin_vector_shape(values.shape, batch, name)
    return np.array([check(v) for v in values.tolist()], dtype=np.float64)


def clamp(v, low, high):
    """v clipped to [low, high] with torch.clamp's derivative: 1 on the closed interval, 0 outside
    (``np.clip``'s derivative is 0 at the bounds themselves)."""
    return anp.where(v < low, low, anp.where(v > high, high, v))


def with_margin(plain_logits, y, kept, target_logit, margin_grad: str):
    """The (B, C) margin logits: ``plain_logits`` (the un-margined ones, e.g. s cos theta) with each
    kept row's target entry replaced by ``target_logit`` (e.g. s psi(theta_y)).

    margin_grad "exact": target_logit as it is; "detached": its value with the gradient of the
    plain target logit. Ignored rows keep their plain target logit.
    """
    plain_target = pick(plain_logits, y)
    if margin_grad == "detached":
        target_logit = value_with_gradient_of(target_logit, plain_target)
    return replace_target(plain_logits, y, anp.where(kept, target_logit, plain_target))


def margin_loss(logits, y, ignore_index, reduction: str, penalty=None):
    r"""Softmax cross-entropy of margin logits over the rows not ignored, plus an optional
    per-sample ``penalty`` (MagFace's regulariser), reduced by :func:`refimpl.arrays.reduce_kept`.

    .. math:: \ell_i = \mathrm{logsumexp}(z_i) - z_{i y_i} \ (+\ \text{penalty}_i), \quad y_i \ne \text{ignore\_index}
    """
    batch, classes = check_ndim(logits, "logits", ndim=2)
    y, kept = split_ignored(check_labels(y, batch, classes, ignore_index=ignore_index), ignore_index)
    per_sample = -pick(log_softmax(logits), y)
    if penalty is not None:
        per_sample = per_sample + penalty
    return reduce_kept(per_sample, kept, reduction)


__all__ = [
    "clamp",
    "margin_loss",
    "margin_per_sample",
    "stop_gradient",
    "value_with_gradient_of",
    "with_margin",
]
