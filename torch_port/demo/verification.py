r"""Verification by cosine similarity: the pairs, their ROC curve, its area, TAR at a FAR, and the EER.

A verification system accepts a pair of images as "the same identity" when the cosine similarity of
their embeddings is at least a threshold t. Over a set of labelled images, every unordered pair
i < j is scored once; it is *genuine* when both images have the same label, an *impostor* pair
otherwise. At threshold t,

.. math::
    \mathrm{TAR}(t) = \frac{\#\{\text{genuine}: s \ge t\}}{G}, \qquad
    \mathrm{FAR}(t) = \frac{\#\{\text{impostor}: s \ge t\}}{I}.

**The ROC curve** is the polyline through the operating points (FAR(t), TAR(t)) for t at every
distinct score, from (0, 0) (t above every score) to (1, 1), joined by straight segments; a run of
tied scores is one vertex, so ties give a diagonal segment. Any point of a segment is reached by
accepting, at random, a fixed share of the pairs at the lower threshold's score, so the straight
segments are operating points too. Everything below reads this one polyline:

- **ROC AUC** is its area (the trapezoid rule, exact for a polyline). It equals the Mann-Whitney
  statistic P(s_genuine > s_impostor) + P(s_genuine = s_impostor) / 2 over all genuine-impostor
  couples (Hanley and McNeil, Radiology 1982).
- **TAR at FAR = f** is the polyline's height at abscissa f, interpolated linearly between the two
  vertices around f; where the polyline is vertical at f (several thresholds share FAR = f) it is
  the highest of them, the best TAR any threshold with FAR <= f gives.
- **The equal error rate (EER)** is the FAR where the polyline meets the line FAR = 1 - TAR (the
  false reject rate): FAR + TAR - 1 rises strictly from -1 to 1 along the vertices, so there is one
  crossing, interpolated linearly on its segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from torch_port.demo.metrics import unit_vectors

# The operating point the table reports: TAR when 1 in 100 impostor pairs is accepted.
FAR_TARGET = 1e-2
# The FARs at which each ROC curve is kept for the figure (a log axis from 1e-4 to 1).
FAR_GRID = np.logspace(-4.0, 0.0, 161)


def pair_scores(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Cosine similarity of every unordered pair of rows, and whether the pair is genuine.

    .. math:: s_{ij} = \hat x_i \cdot \hat x_j, \quad i < j, \qquad
        \hat x = x / \max(\|x\|, 10^{-12})

    Args:
        features: (N, D) embeddings (a zero row scores 0 against everything). labels: (N,) classes.

    Returns:
        ``(scores, genuine)``: float64 and bool arrays of length N (N - 1) / 2, pairs in the order of
        ``numpy.triu_indices(N, 1)``.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"features must be (N, D) and labels (N,), got shapes {features.shape} and {labels.shape}"
        )
    units = unit_vectors(features)
    first, second = np.triu_indices(features.shape[0], k=1)
    scores = np.einsum("ij,ij->i", units[first], units[second])
    return scores, labels[first] == labels[second]


def roc_curve(scores: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of the ROC polyline: (FAR, TAR) from (0, 0), one vertex per distinct score, to (1, 1).

    A pair is accepted at threshold t when its score is >= t; the k-th vertex is the threshold at
    the k-th highest distinct score. Both coordinates are non-decreasing, and each vertex moves at
    least one of them.

    Args:
        scores: (P,) finite pair scores. genuine: (P,) bool, True for a genuine pair; at least one
        genuine and one impostor pair.

    Returns:
        ``(far, tar)``, float64 arrays of the same length (the number of distinct scores plus one).
    """
    scores = np.asarray(scores, dtype=np.float64)
    genuine = np.asarray(genuine)
    if scores.ndim != 1 or genuine.shape != scores.shape:
        raise ValueError(f"scores and genuine must be 1-D of one length, got {scores.shape} and {genuine.shape}")
    if genuine.dtype != np.bool_:
        raise TypeError(f"genuine must be a bool array, got dtype {genuine.dtype}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    positives = int(genuine.sum())
    negatives = genuine.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"a ROC curve needs genuine and impostor pairs, got {positives} genuine and {negatives} impostor"
        )
    order = np.argsort(-scores, kind="stable")
    ranked, accepted = scores[order], genuine[order]
    # the last pair of each run of equal scores: the threshold at that score accepts the whole run
    ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
    true_accepts = np.cumsum(accepted)[ends]
    false_accepts = ends + 1 - true_accepts
    far = np.concatenate([[0.0], false_accepts / negatives])
    tar = np.concatenate([[0.0], true_accepts / positives])
    return far, tar


def roc_auc(far: np.ndarray, tar: np.ndarray) -> float:
    """The area under the ROC polyline (trapezoid rule over its vertices, from :func:`roc_curve`)."""
    far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1])) / 2.0)


def tar_at_far(far: np.ndarray, tar: np.ndarray, target: float | np.ndarray) -> float | np.ndarray:
    """TAR at FAR = ``target`` on the ROC polyline: linear between the vertices around it, the highest
    TAR where the polyline is vertical at ``target``.

    Args:
        far, tar: the vertices of :func:`roc_curve`. target: one FAR or an array of them, in [0, 1].

    Returns:
        A float for one target, an array (the shape of ``target``) for several.
    """
    far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
    targets = np.asarray(target, dtype=np.float64)
    if not np.all((targets >= 0.0) & (targets <= 1.0)):
        raise ValueError(f"target FAR must lie in [0, 1], got {target!r}")
    # the last vertex with FAR <= target: the top of a vertical run at exactly that FAR
    low = np.searchsorted(far, targets, side="right") - 1
    high = np.minimum(low + 1, far.size - 1)
    width = far[high] - far[low]
    # width is 0 only at the last vertex, or when far[low] == target exactly: the vertex's own TAR then
    share = np.divide(targets - far[low], width, out=np.zeros_like(targets), where=width > 0)
    values = tar[low] + share * (tar[high] - tar[low])
    return float(values) if values.ndim == 0 else values


def equal_error_rate(far: np.ndarray, tar: np.ndarray) -> float:
    """The FAR at which the ROC polyline meets FAR = 1 - TAR (the false reject rate), interpolated linearly.

    Along the vertices FAR + TAR - 1 rises strictly from -1 (at (0, 0)) to 1 (at (1, 1)), so the
    crossing is unique: a vertex, or one point of the segment where the sign changes.
    """
    far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
    balance = far + tar - 1.0
    k = int(np.searchsorted(balance, 0.0, side="left"))  # the first vertex with balance >= 0 (k >= 1)
    if balance[k] == 0.0:
        return float(far[k])
    share = -balance[k - 1] / (balance[k] - balance[k - 1])
    return float(far[k - 1] + share * (far[k] - far[k - 1]))


@dataclass(frozen=True)
class Verification:
    """Verification over every pair of a set of embeddings: the numbers of the table and the curve of the
    figure. ``auc``, ``tar`` (at :data:`FAR_TARGET`) and ``eer`` are fractions in [0, 1];
    ``roc_tar[k]`` is the TAR at FAR ``FAR_GRID[k]``."""

    auc: float
    tar: float
    eer: float
    genuine_pairs: int
    impostor_pairs: int
    roc_tar: np.ndarray


def verify(features: np.ndarray, labels: np.ndarray) -> Verification:
    """Score every pair of ``features`` by cosine similarity and read the ROC (see the module's docstring)."""
    scores, genuine = pair_scores(features, labels)
    far, tar = roc_curve(scores, genuine)
    positives = int(genuine.sum())
    return Verification(
        auc=roc_auc(far, tar),
        tar=tar_at_far(far, tar, FAR_TARGET),
        eer=equal_error_rate(far, tar),
        genuine_pairs=positives,
        impostor_pairs=genuine.size - positives,
        roc_tar=tar_at_far(far, tar, FAR_GRID),
    )
