r"""Sub-center ArcFace and per-class adaptive margins: ArcFace for noisy and for long-tailed data.

- **Sub-center ArcFace** (Deng, Guo, Liu, Yu, Zafeiriou, "Sub-center ArcFace: Boosting Face
  Recognition by Large-Scale Noisy Web Faces", ECCV 2020) gives each class k weight rows (sub-centres)
  and takes the class's cosine as the largest of them, so that noisy samples can gather at a
  non-dominant sub-centre instead of pulling the class's main direction;
- **adaptive margins** (Ha, Ko, Hwang, "Google Landmark Recognition 2020 Competition Third Place
  Solution", arXiv:2010.05350) give rare classes larger ArcFace margins than frequent ones; the
  (C,) margins index into ``arcface_loss``'s per-sample ``m`` as ``margins[y]``.

Derivation: ``derivations/10-subcenter-and-per-sample-margins.md``.
"""

from __future__ import annotations

import math

import numpy as np
from autograd.tracer import getval

from refimpl.arcface import arcface_psi
from refimpl.arrays import as_float64, check_features_table_labels, check_labels, pick, split_ignored
from refimpl.geometry import cosines, target_angles
from refimpl.margins import margin_loss, with_margin
from softmax_common.checks import (
    check_angular_margin,
    check_class_counts,
    check_flag,
    check_ignore_index,
    check_margin_grad,
    check_margin_range,
    check_positive_int,
    check_reduction,
    check_scale,
    check_subcenters,
    real_number,
)


def subcenter_cosines(x, W, k: int):
    """((B, C) class cosines, (B, C) arg-max sub-centre of each class) for W of shape (C*k, D).

    cos_ij = max over the rows j*k .. j*k + k - 1 of W (class j's sub-centres, in the layout of
    insightface's ``reshape(fc7, (-1, C, K))``) of the cosine between x_i and the row. The maximum is
    taken by index, so its derivative reaches only the arg-max row; ties go to the lowest index.
    """
    every = cosines(x, W)  # (B, C*k)
    batch, rows = np.shape(getval(every))
    grouped = every.reshape(batch, rows // k, k)
    best = np.argmax(getval(grouped), axis=2)
    return grouped[np.arange(batch)[:, None], np.arange(rows // k)[None, :], best], best


def subcenter_arcface_logits(
    x, W, y, s=64.0, m=0.5, k=3, easy_margin=False, margin_grad="exact", ignore_index=-1
):
    r"""Sub-center ArcFace logits: ArcFace on the largest cosine over each class's k sub-centres.

    .. math::

        \cos\theta_{ij} = \max_{r < k} \cos\angle(x_i, W_{jk + r}), \qquad
        z_{i y_i} = s\,\psi(\theta_{i y_i}), \quad z_{ij} = s \cos\theta_{ij}

    with ArcFace's psi (:func:`refimpl.arcface.arcface_psi`: cos(theta + m), and cos theta - m sin m
    past pi - m). The target angle is measured to the arg-max sub-centre of the target class
    (by the half-angle form), so gradient reaches only the arg-max row of each class. k = 1 is
    ArcFace. The fallback past pi - m is ArcFace's, sample by sample; the official code has none (it
    takes cos(arccos(cos) + m) of the pooled cosine, which rises again past pi - m).

    Args:
        x: (B, D) features. W: (C*k, D) sub-centres, rows j*k .. j*k + k - 1 belonging to class j.
        y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale in (0, 1e4] (default 64). m: angular margin in [0, pi/2] (default 0.5).
        k: sub-centres per class, an integer >= 1 dividing W's rows (default 3).
        easy_margin: a bool (default False). margin_grad: "exact" (default) or "detached".
        ignore_index: a negative integer (default -1) or None; those rows keep s cos theta.

    Returns:
        (B, C) logits.

    References:
        Deng, Guo, Liu, Yu, Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by Large-Scale
        Noisy Web Faces", ECCV 2020; insightface ``recognition/subcenter_arcface/train_parall.py``
        (the ``loss_K`` reshape and max over sub-centres).
    """
    s, m = check_scale(s), check_angular_margin(m)
    k = check_positive_int(k, "k")
    easy_margin = check_flag(easy_margin, "easy_margin")
    margin_grad, ignore_index = check_margin_grad(margin_grad), check_ignore_index(ignore_index)
    x, W, _ = check_features_table_labels(x, W, None, "W")
    k = check_subcenters(k, np.shape(W)[0])
    y = check_labels(y, np.shape(x)[0], np.shape(W)[0] // k, ignore_index=ignore_index)
    y, kept = split_ignored(y, ignore_index)
    cos, best = subcenter_cosines(x, W, k)
    theta = target_angles(x, W, y * k + pick(best, y))
    psi = arcface_psi(theta, pick(cos, y), m, easy_margin)
    return with_margin(s * cos, y, kept, s * psi, margin_grad)


def subcenter_arcface_loss(
    x, W, y, s=64.0, m=0.5, k=3, easy_margin=False, reduction="mean", margin_grad="exact", ignore_index=-1
):
    r"""Sub-center ArcFace: softmax cross-entropy of :func:`subcenter_arcface_logits`.

    .. math::

        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}},
        \qquad \cos\theta_{ij} = \max_{r < k} \cos\angle(x_i, W_{jk + r})

    Args:
        x: (B, D) features. W: (C*k, D) sub-centres. y: (B,) labels in [0, C), or ``ignore_index``.
        s: scale (default 64). m: angular margin in [0, pi/2] (default 0.5). k: integer >= 1
        (default 3). easy_margin: a bool. reduction: "mean" (over the rows not ignored), "sum" or
        "none". margin_grad: "exact" or "detached". ignore_index: a negative integer or None.

    Returns:
        The loss (float64): per sample for "none", else reduced over the rows not ignored.

    References:
        Deng, Guo, Liu, Yu, Zafeiriou, "Sub-center ArcFace", ECCV 2020; insightface
        ``recognition/subcenter_arcface``.
    """
    reduction = check_reduction(reduction)
    logits = subcenter_arcface_logits(x, W, y, s, m, k, easy_margin, margin_grad, ignore_index)
    return margin_loss(logits, y, check_ignore_index(ignore_index), reduction)


def adaptive_margins(class_counts, m_min=0.05, m_max=0.5, p=-0.25):
    r"""Per-class ArcFace margins from class frequencies (Ha et al. 2020, the dynamic margins).

    .. math::

        m_j = (m_{max} - m_{min}) \frac{n_j^p - \min_c n_c^p}{\max_c n_c^p - \min_c n_c^p} + m_{min}

    With p < 0 the rarest class gets m_max and the most frequent m_min, the others in between on
    the n^p scale (p = -1/4 by default, as in the paper). When every count is the same (max = min,
    one class included) the fraction is 0/0 and no class is rarer than another: every margin is then
    m_max, i.e. plain ArcFace at the largest margin (0.5 with the defaults, ArcFace's own). Use the
    result as ``arcface_loss(..., m=margins[y])``.

    Args:
        class_counts: (C,) samples per class, finite and > 0 (need not be integers).
        m_min, m_max: angular margins in radians, 0 <= m_min <= m_max <= pi/2 (defaults 0.05, 0.5).
        p: the exponent, a finite real number (default -0.25).

    Returns:
        (C,) float64 margins in [m_min, m_max].

    References:
        Ha, Ko, Hwang, "Google Landmark Recognition 2020 Competition Third Place Solution",
        arXiv:2010.05350, section 3 (dynamic margins).
    """
    m_min, m_max = check_margin_range(m_min, m_max)
    p = real_number(p, "p")
    if not math.isfinite(p):
        raise ValueError(f"p must be a finite number, got {p}")
    counts = as_float64(class_counts, "class_counts")
    if counts.ndim != 1:
        raise ValueError(f"class_counts must have 1 dimension (one count per class), got shape {counts.shape}")
    check_class_counts(counts.size, float(counts.min(initial=np.inf)), float(counts.max(initial=-np.inf)))
    powered = counts**p
    low, high = powered.min(), powered.max()
    if high == low:
        return np.full(counts.shape, m_max)
    return (m_max - m_min) * (powered - low) / (high - low) + m_min


__all__ = ["adaptive_margins", "subcenter_arcface_logits", "subcenter_arcface_loss", "subcenter_cosines"]
