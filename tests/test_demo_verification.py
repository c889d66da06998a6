"""The open-set demo's verification metrics (torch_port/demo/verification.py) against independent routes.

- Closed forms: perfectly separated scores give AUC 1, EER 0 and TAR 1; reversed ones AUC 0, EER 1
  and TAR 0; one score for every pair gives the diagonal (AUC 1/2, EER 1/2, TAR = FAR); two
  uniform score distributions give the AUC, TAR and EER of their integrals.
- Brute force on small cases with ties (Hypothesis): the ROC vertices by counting the pairs at or
  above every threshold, the AUC by comparing every genuine score with every impostor score, TAR
  at a FAR and the EER by searching every segment of the polyline; and scikit-learn's
  ``roc_auc_score`` and ``roc_curve``, a second implementation.
- The pairs: every unordered pair once, scored by a cosine computed pair by pair.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from torch_port.demo.verification import (
    FAR_GRID,
    FAR_TARGET,
    equal_error_rate,
    pair_scores,
    roc_auc,
    roc_curve,
    tar_at_far,
    verify,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def scored(genuine_scores, impostor_scores):
    scores = np.array([*genuine_scores, *impostor_scores], dtype=np.float64)
    genuine = np.array([True] * len(genuine_scores) + [False] * len(impostor_scores))
    return scores, genuine


def everything(genuine_scores, impostor_scores, target=FAR_TARGET):
    far, tar = roc_curve(*scored(genuine_scores, impostor_scores))
    return roc_auc(far, tar), tar_at_far(far, tar, target), equal_error_rate(far, tar)


# ------------------------------------------------------------------------------------------------
# The brute-force route: counting, and every segment searched
# ------------------------------------------------------------------------------------------------


def brute_vertices(genuine_scores, impostor_scores):
    """(FAR, TAR) at t = +inf and at each distinct score, by counting the pairs with score >= t."""
    thresholds = [math.inf, *sorted(set(genuine_scores) | set(impostor_scores), reverse=True)]
    return [
        (
            sum(s >= t for s in impostor_scores) / len(impostor_scores),
            sum(s >= t for s in genuine_scores) / len(genuine_scores),
        )
        for t in thresholds
    ]


def brute_auc(genuine_scores, impostor_scores):
    wins = sum((g > i) + 0.5 * (g == i) for g in genuine_scores for i in impostor_scores)
    return wins / (len(genuine_scores) * len(impostor_scores))


def brute_tar_at_far(vertices, target):
    """The highest point of the polyline at abscissa ``target``, over every segment that reaches it."""
    best = -1.0
    for (far_a, tar_a), (far_b, tar_b) in itertools.pairwise(vertices):
        if far_a <= target <= far_b:
            if far_b == far_a:
                best = max(best, tar_a, tar_b)
            else:
                best = max(best, tar_a + (target - far_a) / (far_b - far_a) * (tar_b - tar_a))
    return best


def brute_eer(vertices):
    """FAR where FAR = 1 - TAR, solved on every segment; all solutions must agree."""
    found = []
    for (far_a, tar_a), (far_b, tar_b) in itertools.pairwise(vertices):
        step = (far_b - far_a) + (tar_b - tar_a)
        share = (1.0 - tar_a - far_a) / step
        if 0.0 <= share <= 1.0:
            found.append(far_a + share * (far_b - far_a))
    assert found and max(found) - min(found) < 1e-12, found
    return found[0]


score_lists = st.lists(st.integers(0, 6), min_size=1, max_size=12)


@given(score_lists, score_lists, st.sampled_from([0.0, 0.01, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0]))
def test_against_brute_force_with_ties(genuine_scores, impostor_scores, target):
    scores, genuine = scored(genuine_scores, impostor_scores)
    far, tar = roc_curve(scores, genuine)
    vertices = brute_vertices(genuine_scores, impostor_scores)
    np.testing.assert_allclose(np.c_[far, tar], vertices, rtol=0, atol=1e-15)
    assert roc_auc(far, tar) == pytest.approx(brute_auc(genuine_scores, impostor_scores), abs=1e-12)
    assert tar_at_far(far, tar, target) == pytest.approx(brute_tar_at_far(vertices, target), abs=1e-12)
    assert equal_error_rate(far, tar) == pytest.approx(brute_eer(vertices), abs=1e-12)


@given(score_lists, score_lists)
def test_against_scikit_learn(genuine_scores, impostor_scores):
    scores, genuine = scored(genuine_scores, impostor_scores)
    far, tar = roc_curve(scores, genuine)
    assert roc_auc(far, tar) == pytest.approx(sklearn_metrics.roc_auc_score(genuine, scores), abs=1e-12)
    their_far, their_tar, _ = sklearn_metrics.roc_curve(genuine, scores, drop_intermediate=False)
    np.testing.assert_allclose(np.c_[far, tar], np.c_[their_far, their_tar], rtol=0, atol=1e-15)


def test_order_of_pairs_does_not_matter():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=300).astype(np.float64)
    genuine = rng.random(300) < 0.3
    shuffle = rng.permutation(300)
    first, second = roc_curve(scores, genuine), roc_curve(scores[shuffle], genuine[shuffle])
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


# ------------------------------------------------------------------------------------------------
# Closed forms
# ------------------------------------------------------------------------------------------------


def test_perfectly_separated_scores():
    assert everything([0.9, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4]) == (1.0, 1.0, 0.0)


def test_reversed_scores():
    assert everything([0.1, 0.2], [0.7, 0.8, 0.9]) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("target", [0.0, 1e-2, 0.37, 1.0])
def test_one_score_for_every_pair_is_the_diagonal(target):
    auc, tar, eer = everything([0.5] * 7, [0.5] * 11, target)
    assert (auc, eer) == (0.5, 0.5)
    assert tar == pytest.approx(target, abs=1e-15)


def test_interleaved_scores():
    # genuine {1, 3}, impostor {0, 2}: 3 of the 4 couples rank the genuine higher; the polyline is
    # (0,0) (0,1/2) (1/2,1/2) (1/2,1) (1,1), which meets FAR = 1 - TAR at its vertex (1/2, 1/2)
    auc, tar, eer = everything([1.0, 3.0], [0.0, 2.0], target=0.25)
    assert (auc, tar, eer) == (0.75, 0.5, 0.5)


def test_a_vertical_run_at_the_target_gives_its_highest_tar():
    # with 100 impostors, FAR = 1e-2 is exactly one impostor accepted: the threshold at the top
    # impostor (FAR 1/100, TAR 1/2), and at the genuine score below it (FAR 1/100, TAR 1)
    far, tar = roc_curve(*scored([5.0, 7.0], [6.0] + [0.0] * 99))
    assert tar_at_far(far, tar, 0.01) == 1.0


def test_two_uniform_distributions():
    """Impostors uniform on [0, 1], genuine scores uniform on [1/2, 3/2]: P(impostor > genuine) is
    the integral of (1 - g) over g in [1/2, 1], 1/8, so AUC = 7/8; threshold t in [1/2, 1] gives
    FAR = 1 - t and TAR = 3/2 - t, so TAR = 1/2 + FAR there, and FAR = 1 - TAR at t = 3/4: EER 1/4.
    Midpoint quantiles of each, N points: the sample differs from the integral by O(1/N)."""
    n = 2000
    grid = (np.arange(n) + 0.5) / n
    genuine_scores, impostor_scores = 0.5 + grid + 1e-9, grid  # shifted off the other's grid: no ties
    auc, tar, eer = everything(genuine_scores, impostor_scores, target=0.2)
    assert auc == pytest.approx(7 / 8, abs=2 / n)
    assert tar == pytest.approx(0.7, abs=2 / n)
    assert eer == pytest.approx(0.25, abs=2 / n)


def test_tar_at_far_takes_an_array():
    far, tar = roc_curve(*scored([1.0, 3.0], [0.0, 2.0]))
    np.testing.assert_allclose(tar_at_far(far, tar, np.array([0.0, 0.25, 0.5, 0.75, 1.0])), [0.5, 0.5, 1, 1, 1])


# ------------------------------------------------------------------------------------------------
# Pairs from embeddings
# ------------------------------------------------------------------------------------------------


def test_pair_scores_are_every_pair_once_by_cosine():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(9, 3)) * rng.uniform(0.1, 10, size=(9, 1))
    labels = np.array([0, 0, 1, 2, 1, 0, 2, 2, 1])
    scores, genuine = pair_scores(features, labels)
    norms = [math.sqrt(sum(v * v for v in row)) for row in features]
    expected = {
        (i, j): (sum(a * b for a, b in zip(features[i], features[j])) / norms[i] / norms[j], labels[i] == labels[j])
        for i, j in itertools.combinations(range(9), 2)
    }
    assert len(scores) == len(expected) == 36
    for (score, same), (want_score, want_same) in zip(zip(scores, genuine), expected.values()):
        assert score == pytest.approx(want_score, rel=1e-12, abs=1e-15)
        assert same == want_same
    assert int(genuine.sum()) == 3 + 3 + 3  # three classes of three: three pairs each


def test_verify_on_well_separated_classes():
    """Three classes on three rays 120 degrees apart (norms differ; only directions count)."""
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], 20)
    angles = np.radians(labels * 120.0 + rng.uniform(-5, 5, size=60))
    features = np.c_[np.cos(angles), np.sin(angles)] * rng.uniform(0.5, 30, size=(60, 1))
    result = verify(features, labels)
    assert (result.auc, result.tar, result.eer) == (1.0, 1.0, 0.0)
    assert (result.genuine_pairs, result.impostor_pairs) == (3 * 190, 3 * 400)
    assert result.roc_tar.shape == FAR_GRID.shape and np.all(result.roc_tar == 1.0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: roc_curve(np.zeros(3), np.array([True, True, True])), ValueError, "0 impostor"),
        (lambda: roc_curve(np.zeros(3), np.array([0, 1, 0])), TypeError, "genuine must be a bool array"),
        (lambda: roc_curve(np.array([0.0, np.nan]), np.array([True, False])), ValueError, "finite"),
        (lambda: roc_curve(np.zeros(3), np.array([True, False])), ValueError, "one length"),
        (lambda: tar_at_far(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 1.5), ValueError, r"\[0, 1\]"),
        (lambda: pair_scores(np.zeros((3, 2)), np.zeros(4)), ValueError, "labels"),
    ],
)
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()
