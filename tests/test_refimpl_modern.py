"""The reference's modern margins, each against an independent route.

Sub-center ArcFace with k = 1 is ArcFace, is blind to the order of a class's sub-centres, and sends
gradient only to the arg-max row of each class; a per-sample margin vector of one value is the
scalar margin, and each row of a mixed vector is that row's scalar loss; ignored rows give no loss
and no gradient and the mean is over the others; the detached convention's gradient is the finite
difference of the un-margined loss with the margin's offset frozen; adaptive_margins, CurricularFace,
AdaFace and MagFace reduce to hand-computed cases or to the losses they extend.
"""

from __future__ import annotations

import math

import autograd
import numpy as np
import pytest

import refimpl
from softmax_common.closed_forms import magface_min_lambda_g

RNG = np.random.default_rng(20261202)
W = RNG.normal(size=(4, 5))
Y = np.array([0, 3, 1, 2, 1, 0])
X = 2.0 * W[Y] + RNG.normal(size=(6, 5))  # near their classes: margins in force, no fallback


def unit_rows(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def plain_cosines(x, w):
    return unit_rows(x) @ unit_rows(w).T


def plain_ce(logits, y):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]


def central_difference(f, a, h=1e-6):
    grad = np.zeros_like(a)
    for index in np.ndindex(a.shape):
        step = np.zeros_like(a)
        step[index] = h
        grad[index] = (f(a + step) - f(a - step)) / (2 * h)
    return grad


# ---------------------------------------------------------------------------------------------
# Sub-center ArcFace
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
def test_one_subcentre_is_arcface(margin_grad):
    kw = {"s": 30.0, "m": 0.4, "margin_grad": margin_grad}
    ours = refimpl.subcenter_arcface_loss(X, W, Y, k=1, **kw)
    assert ours == pytest.approx(refimpl.arcface_loss(X, W, Y, **kw), rel=1e-14)
    for argnum in (0, 1):
        got = autograd.grad(lambda *a: refimpl.subcenter_arcface_loss(*a, Y, k=1, **kw), argnum)(X, W)
        want = autograd.grad(lambda *a: refimpl.arcface_loss(*a, Y, **kw), argnum)(X, W)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_permuting_a_class_subcentres_changes_nothing():
    Wk = RNG.normal(size=(4 * 3, 5))
    order = np.arange(12).reshape(4, 3)[:, ::-1].copy()
    order[1] = order[1][[1, 2, 0]]
    permuted = Wk[order.ravel()]
    for reduction in ("none", "mean"):
        np.testing.assert_allclose(
            refimpl.subcenter_arcface_loss(X, permuted, Y, reduction=reduction),
            refimpl.subcenter_arcface_loss(X, Wk, Y, reduction=reduction),
            rtol=1e-14,
        )
    grad = autograd.grad(lambda w: refimpl.subcenter_arcface_loss(X, w, Y), 0)
    np.testing.assert_allclose(grad(permuted), grad(Wk)[order.ravel()], rtol=1e-12, atol=1e-15)


def test_only_the_argmax_row_of_each_class_gets_gradient():
    Wk = RNG.normal(size=(4 * 3, 5))
    best = plain_cosines(X[:2], Wk).reshape(2, 4, 3).argmax(axis=2)  # (B, C), by plain NumPy
    winners = {j * 3 + best[i, j] for i in range(2) for j in range(4)}  # two samples: at most 8 of 12
    grad = autograd.grad(lambda w: refimpl.subcenter_arcface_loss(X[:2], w, Y[:2], s=16.0), 0)(Wk)
    touched = {row for row in range(12) if np.any(grad[row] != 0)}
    assert touched == winners and len(winners) < 12


def test_subcentre_logits_are_the_max_over_rows_and_the_target_angle_is_the_argmax_rows():
    Wk = RNG.normal(size=(4 * 2, 5))
    cos = plain_cosines(X, Wk).reshape(6, 4, 2).max(axis=2)
    theta = np.arccos(cos[np.arange(6), Y])
    want = 8.0 * cos
    fallback = cos[np.arange(6), Y] - 0.3 * np.sin(0.3)
    want[np.arange(6), Y] = 8.0 * np.where(theta + 0.3 <= math.pi, np.cos(theta + 0.3), fallback)
    np.testing.assert_allclose(refimpl.subcenter_arcface_logits(X, Wk, Y, s=8.0, m=0.3, k=2), want, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 3}, ValueError, r"\bW\b.*multiple of k = 3"),
        ({"k": 0}, ValueError, r"\bk\b.*>= 1"),
        ({"k": 1.5}, ValueError, r"\bk\b"),
        ({"k": "2"}, TypeError, r"\bk\b"),
    ],
)
def test_subcentre_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        refimpl.subcenter_arcface_loss(X, np.ones((8, 5)), Y, **kwargs)


def test_subcentre_labels_are_checked_against_the_classes_not_the_rows():
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\)"):
        refimpl.subcenter_arcface_loss(X, RNG.normal(size=(8, 5)), np.array([0, 4, 1, 2, 1, 0]), k=2)


# ---------------------------------------------------------------------------------------------
# Per-sample margins
# ---------------------------------------------------------------------------------------------

PER_SAMPLE = [
    (refimpl.arcface_loss, {"m": 0.5}),
    (refimpl.cosface_loss, {"m": 0.35}),
    (refimpl.am_softmax_loss, {"m": 0.35}),
    (refimpl.combined_margin_loss, {"m1": 1.2, "m2": 0.3, "m3": 0.1}),
]


@pytest.mark.parametrize(("loss", "margins"), PER_SAMPLE, ids=lambda v: getattr(v, "__name__", ""))
def test_a_constant_margin_vector_is_the_scalar_margin(loss, margins):
    vectors = {name: np.full(6, value) for name, value in margins.items()}
    assert loss(X, W, Y, **vectors) == loss(X, W, Y, **margins)
    np.testing.assert_array_equal(
        autograd.grad(lambda x: loss(x, W, Y, **vectors))(X), autograd.grad(lambda x: loss(x, W, Y, **margins))(X)
    )


def test_each_row_of_a_margin_vector_is_that_rows_scalar_loss_fallback_included():
    x = np.vstack([X[:3], -W[Y[3:]]])  # the last three rows at theta = pi: the fallback, sample by sample
    m = np.array([0.1, 0.5, 1.2, 0.2, 0.6, 1.5])
    per_row = refimpl.arcface_loss(x, W, Y, m=m, reduction="none")
    for i in range(6):
        one = refimpl.arcface_loss(x[i : i + 1], W, Y[i : i + 1], m=float(m[i]))
        assert per_row[i] == pytest.approx(one, rel=1e-13)


def test_per_class_margins_index_by_label():
    margins = refimpl.adaptive_margins([5, 50, 500, 5000])
    per_row = refimpl.arcface_loss(X, W, Y, m=margins[Y], reduction="none")
    for i in range(6):
        one = refimpl.arcface_loss(X[i : i + 1], W, Y[i : i + 1], m=float(margins[Y[i]]))
        assert per_row[i] == pytest.approx(one, rel=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": np.full(5, 0.5)}, r"^m must be a number or an array of shape \(6,\)"),
        ({"m": np.full((6, 1), 0.5)}, r"^m must be a number or an array of shape \(6,\)"),
        ({"m": np.array([0.5] * 5 + [2.0])}, r"^m must lie in \[0\.0, 1\.57"),
        ({"m": np.array([0.5] * 5 + [np.nan])}, r"^m must not be nan"),
    ],
)
def test_margin_vector_errors_name_m(kwargs, match):
    with pytest.raises(ValueError, match=match):
        refimpl.arcface_loss(X, W, Y, **kwargs)


def test_combined_margin_vectors_are_checked_by_name():
    with pytest.raises(ValueError, match=r"^m3 must be a number or an array of shape \(6,\)"):
        refimpl.combined_margin_loss(X, W, Y, m3=np.zeros(2))
    with pytest.raises(ValueError, match=r"^m1 must lie in \[1\.0, 16"):
        refimpl.combined_margin_loss(X, W, Y, m1=np.array([1.0] * 5 + [0.5]))


# ---------------------------------------------------------------------------------------------
# Ignored rows
# ---------------------------------------------------------------------------------------------

IGNORING = [
    (refimpl.arcface_loss, {}),
    (refimpl.cosface_loss, {}),
    (refimpl.combined_margin_loss, {"m1": 1.1}),
    (refimpl.normface_loss, {}),
    (refimpl.lsoftmax_loss, {"m": 3}),
    (refimpl.sphereface_loss, {}),
    (refimpl.subcenter_arcface_loss, {"k": 1}),
    (refimpl.curricularface_loss, {"t": 0.4}),
    (refimpl.adaface_loss, {"norm_mean": 2.0, "norm_std": 1.0}),
    (refimpl.magface_loss, {"l_a": 1.0, "u_a": 5.0}),
]


@pytest.mark.parametrize(("loss", "kwargs"), IGNORING, ids=lambda v: getattr(v, "__name__", ""))
def test_ignored_rows_give_no_loss_and_no_gradient(loss, kwargs):
    y = np.where([False, True, False, False, True, False], -1, Y)
    kept = y != -1
    mean = loss(X, W, y, **kwargs)
    assert mean == pytest.approx(loss(X[kept], W, y[kept], **kwargs), rel=1e-13)
    per_row = loss(X, W, y, reduction="none", **kwargs)
    assert np.all(per_row[~kept] == 0)
    np.testing.assert_allclose(per_row[kept], loss(X[kept], W, y[kept], reduction="none", **kwargs), rtol=1e-13)
    gx, gw = autograd.grad(lambda x, w: loss(x, w, y, reduction="sum", **kwargs), (0, 1))(X, W)
    assert np.all(gx[~kept] == 0)
    gw_kept = autograd.grad(lambda w: loss(X[kept], w, y[kept], reduction="sum", **kwargs))(W)
    np.testing.assert_allclose(gw, gw_kept, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("loss", "kwargs"), IGNORING, ids=lambda v: getattr(v, "__name__", ""))
def test_all_rows_ignored_is_a_loss_of_zero_with_zero_gradient(loss, kwargs, reduction):
    y = np.full(6, -3)
    assert loss(X, W, y, reduction=reduction, ignore_index=-3, **kwargs) == 0.0
    grad = autograd.grad(lambda x: loss(x, W, y, reduction=reduction, ignore_index=-3, **kwargs))(X)
    assert np.all(grad == 0)


def test_ignored_rows_get_the_margin_free_logits():
    y = np.where(np.arange(6) % 2 == 0, -1, Y)
    logits = refimpl.arcface_logits(X, W, y, s=10.0)
    np.testing.assert_allclose(logits[::2], 10.0 * plain_cosines(X, W)[::2], rtol=1e-13)
    assert np.all(logits[1::2] <= 10.0 * plain_cosines(X, W)[1::2] + 1e-12)


def test_ignore_index_none_makes_minus_one_an_error_and_other_bad_labels_stay_errors():
    y = np.where(np.arange(6) == 2, -1, Y)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\), got values in \[-1, 3\]$"):
        refimpl.arcface_loss(X, W, y, ignore_index=None)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\), got values in \[-2, 3\] \(rows labelled"):
        refimpl.arcface_loss(X, W, np.where(np.arange(6) == 2, -2, Y))


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (3, ValueError), (-1.0, TypeError), (True, TypeError)])
def test_ignore_index_must_be_a_negative_integer(value, error):
    with pytest.raises(error, match=r"^ignore_index must be a negative integer or None"):
        refimpl.cosface_loss(X, W, Y, ignore_index=value)


# ---------------------------------------------------------------------------------------------
# The detached convention
# ---------------------------------------------------------------------------------------------


def frozen_offset_loss(plain_logits, offset, y, penalty):
    """The mean CE of plain_logits(x, w) + offset, the offset (exact - plain) frozen at the point, plus
    a per-sample penalty(x): the detached loss, written without autograd (its gradient is that of
    the plain logits)."""
    return lambda x, w: np.mean(plain_ce(plain_logits(x, w) + offset, y) + penalty(x))


def no_penalty(x):
    return 0.0


def magface_penalty(x):
    a = np.clip(np.linalg.norm(x, axis=1), 1.0, 5.0)
    return 35.0 * (a / 25.0 + 1.0 / a)


def curricular_negatives(t, s, m):
    """CurricularFace's logits with the target left plain: hard negatives (frozen at X, W, as the
    comparison carries no gradient) modulated to c (t + c)."""
    cos = plain_cosines(X, W)
    shifted = np.cos(np.arccos(cos[np.arange(6), Y]) + m)
    hard = (cos > shifted[:, None]) & ~np.eye(4, dtype=bool)[Y]
    assert hard.any()  # the case exercises the modulation

    def logits(x, w):
        c = plain_cosines(x, w)
        return s * np.where(hard, c * (t + c), c)

    return logits


def scaled_cosines(x, w):
    return 20.0 * plain_cosines(x, w)


DETACHED = [
    (refimpl.arcface_logits, {"s": 20.0, "m": 0.5}, scaled_cosines, no_penalty),
    (refimpl.combined_margin_logits, {"s": 20.0, "m1": 1.3, "m2": 0.2, "m3": 0.1}, scaled_cosines, no_penalty),
    (refimpl.subcenter_arcface_logits, {"s": 20.0, "k": 1}, scaled_cosines, no_penalty),
    (refimpl.lsoftmax_logits, {"m": 3}, lambda x, w: x @ w.T, no_penalty),
    (refimpl.curricularface_logits, {"s": 20.0, "t": 0.3, "m": 0.9}, curricular_negatives(0.3, 20.0, 0.9), no_penalty),
    (refimpl.adaface_logits, {"s": 20.0, "norm_mean": 2.0, "norm_std": 1.0}, scaled_cosines, no_penalty),
    (refimpl.magface_logits, {"s": 20.0, "l_a": 1.0, "u_a": 5.0}, scaled_cosines, magface_penalty),
]


@pytest.mark.parametrize(("logits", "kwargs", "plain", "penalty"), DETACHED, ids=lambda v: getattr(v, "__name__", ""))
def test_detached_gradient_is_the_unmargined_gradient_with_the_offset_frozen(logits, kwargs, plain, penalty):
    loss_name = logits.__name__.replace("_logits", "_loss")
    loss = getattr(refimpl, loss_name)
    exact = logits(X, W, Y, **kwargs)
    detached = logits(X, W, Y, margin_grad="detached", **kwargs)
    np.testing.assert_array_equal(detached, exact)  # the value, to the last bit
    offset = exact - plain(X, W)
    frozen = frozen_offset_loss(plain, offset, Y, penalty)
    gx, gw = autograd.grad(lambda x, w: loss(x, w, Y, margin_grad="detached", **kwargs), (0, 1))(X, W)
    np.testing.assert_allclose(gx, central_difference(lambda x: frozen(x, W), X), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gw, central_difference(lambda w: frozen(X, w), W), rtol=1e-6, atol=1e-8)
    exact_gx = autograd.grad(lambda x: loss(x, W, Y, **kwargs))(X)
    assert not np.allclose(gx, exact_gx)  # the convention matters here


def test_the_detached_margin_of_cosface_changes_nothing():
    for argnum in (0, 1):
        exact = autograd.grad(lambda *a: refimpl.cosface_loss(*a, Y), argnum)(X, W)
        detached = autograd.grad(lambda *a: refimpl.cosface_loss(*a, Y, margin_grad="detached"), argnum)(X, W)
        np.testing.assert_allclose(detached, exact, rtol=1e-13, atol=1e-16)


def test_the_detached_target_keeps_its_value_past_the_fallback():
    x = -W[Y]  # theta = pi: the fallback branch
    exact = refimpl.arcface_logits(x, W, Y, s=10.0, m=0.5)
    np.testing.assert_array_equal(refimpl.arcface_logits(x, W, Y, s=10.0, m=0.5, margin_grad="detached"), exact)
    assert np.allclose(exact[np.arange(6), Y], 10.0 * (-1.0 - 0.5 * math.sin(0.5)))


@pytest.mark.parametrize("loss", [refimpl.arcface_loss, refimpl.sphereface_loss, refimpl.magface_loss])
def test_margin_grad_is_checked_by_name(loss):
    with pytest.raises(ValueError, match=r"^margin_grad must be one of \('exact', 'detached'\), got 'stop'"):
        loss(X, W, Y, margin_grad="stop")


# ---------------------------------------------------------------------------------------------
# adaptive_margins
# ---------------------------------------------------------------------------------------------


def test_adaptive_margins_by_hand():
    # n^(-1/4) of 1, 16, 81, 10000 is 1, 1/2, 1/3, 1/10; over the range 9/10 they sit at 1, 4/9, 7/27, 0.
    want = [0.5, 0.05 + 0.45 * 4 / 9, 0.05 + 0.45 * 7 / 27, 0.05]
    np.testing.assert_allclose(refimpl.adaptive_margins([1, 16, 81, 10000]), want, rtol=1e-14)
    np.testing.assert_allclose(refimpl.adaptive_margins([4.0, 1.0], 0.1, 0.3, p=-0.5), [0.1, 0.3], rtol=1e-15)


def test_adaptive_margins_with_equal_counts_are_m_max():
    np.testing.assert_array_equal(refimpl.adaptive_margins([7, 7, 7], m_max=0.4), [0.4, 0.4, 0.4])
    np.testing.assert_array_equal(refimpl.adaptive_margins([3]), [0.5])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([3, 0],), ValueError, r"^class_counts must be finite and > 0"),
        (([3, -1],), ValueError, r"^class_counts must be finite and > 0"),
        (([3, np.nan],), ValueError, r"^class_counts must be finite and > 0"),
        (([],), ValueError, r"^class_counts must hold one count per class"),
        (([[3, 4]],), ValueError, r"^class_counts must have 1 dimension"),
        ((["a"],), TypeError, r"^class_counts"),
        (([3, 4], 0.4, 0.3), ValueError, r"^m_min must be <= m_max"),
        (([3, 4], 0.1, 2.0), ValueError, r"^m_max must lie in \[0\.0, 1\.57"),
        (([3, 4], 0.1, 0.5, math.inf), ValueError, r"^p must be a finite number"),
    ],
)
def test_adaptive_margins_errors(args, error, match):
    with pytest.raises(error, match=match):
        refimpl.adaptive_margins(*args)


# ---------------------------------------------------------------------------------------------
# CurricularFace, AdaFace, MagFace
# ---------------------------------------------------------------------------------------------


def test_curricularface_without_hard_negatives_is_arcface():
    basis = np.eye(5)[:4]
    x = 3.0 * basis[Y] + 0.05 * RNG.normal(size=(6, 5))
    cos = plain_cosines(x, basis)
    shifted = np.cos(np.arccos(cos[np.arange(6), Y]) + 0.5)
    others = np.where(np.eye(4, dtype=bool)[Y], -np.inf, cos)
    assert np.all(others < shifted[:, None])  # no hard negative
    for t in (0.0, 0.7):
        ours = refimpl.curricularface_loss(x, basis, Y, t=t)
        assert ours == pytest.approx(refimpl.arcface_loss(x, basis, Y), rel=1e-14)
    grad = autograd.grad(lambda x: refimpl.curricularface_loss(x, basis, Y, t=0.7))(x)
    np.testing.assert_allclose(grad, autograd.grad(lambda x: refimpl.arcface_loss(x, basis, Y))(x), rtol=1e-12)


def test_curricularface_hard_negatives_by_hand():
    w = np.array([[1.0, 0.0], [math.cos(0.3), math.sin(0.3)], [0.0, -1.0]])
    x = np.array([[math.cos(0.2), math.sin(0.2)]])  # theta_y = 0.2 to class 0; class 1 at 0.1 is hard
    t, s, m = 0.3, 10.0, 0.5
    cos = np.cos([0.2, 0.1, math.pi / 2 + 0.2])
    want = s * np.array([math.cos(0.7), cos[1] * (t + cos[1]), cos[2]])
    np.testing.assert_allclose(refimpl.curricularface_logits(x, w, np.array([0]), t=t, s=s, m=m)[0], want, rtol=1e-13)
    # its gradient: d z_1 / d cos_1 = s (t + 2 cos_1), through the cosine's derivative along the circle
    g = autograd.grad(lambda x: refimpl.curricularface_logits(x, w, np.array([0]), t=t, s=s, m=m)[0, 1])(x)
    tangent = np.array([-math.sin(0.2), math.cos(0.2)])
    assert g[0] @ tangent == pytest.approx(s * (t + 2 * cos[1]) * -math.sin(-0.1), rel=1e-12)


def test_adaface_at_the_mean_norm_is_cosface():
    x = 20.0 * unit_rows(X)  # every norm at norm_mean: g = 0, target cos theta - m
    kw = {"s": 64.0, "m": 0.4}
    ours = refimpl.adaface_loss(x, W, Y, norm_mean=20.0, **kw)
    assert ours == pytest.approx(refimpl.cosface_loss(x, W, Y, **kw), rel=1e-14)
    for argnum in (0, 1):
        got = autograd.grad(lambda *a: refimpl.adaface_loss(*a, Y, norm_mean=20.0, **kw), argnum)(x, W)
        want = autograd.grad(lambda *a: refimpl.cosface_loss(*a, Y, **kw), argnum)(x, W)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-15)


def test_adaface_at_low_norms_is_arcface_and_at_high_norms_by_hand():
    low = 0.5 * unit_rows(X)  # g = clip(h (0.5 - 20) / (100.001), -1, 1) = -1 with h = 10: ArcFace
    kw = {"s": 64.0, "m": 0.4}
    ours = refimpl.adaface_loss(low, W, Y, h=10.0, **kw)
    assert ours == pytest.approx(refimpl.arcface_loss(low, W, Y, **kw), rel=1e-13)
    high = 90.0 * unit_rows(X)  # g = +1: cos(theta - m) - 2m
    theta = np.arccos(plain_cosines(high, W)[np.arange(6), Y])
    target = np.cos(np.clip(theta - 0.4, 1e-3, math.pi - 1e-3)) - 0.8
    logits = refimpl.adaface_logits(high, W, Y, h=10.0, **kw)
    np.testing.assert_allclose(logits[np.arange(6), Y], 64.0 * target, rtol=1e-12)


def test_adaface_margin_takes_no_gradient_from_the_norm():
    x = 20.0 * unit_rows(X) * RNG.uniform(0.5, 2.0, size=(6, 1))
    g = autograd.grad(lambda x: refimpl.adaface_loss(x, W, Y, norm_mean=20.0, norm_std=5.0))(x)
    radial = np.sum(g * unit_rows(x), axis=1)
    np.testing.assert_allclose(radial, 0.0, atol=1e-12)  # the loss depends on |x| only through g


def test_magface_is_arcface_with_the_norms_margin_plus_the_regulariser():
    norms = np.array([0.5, 12.0, 30.0, 75.0, 110.0, 400.0])  # below l_a, inside, at u_a, above
    x = unit_rows(X) * norms[:, None]
    a = np.clip(norms, 10.0, 110.0)
    m = 0.45 + 0.35 / 100.0 * (a - 10.0)
    reg = a / 110.0**2 + 1.0 / a
    for easy in (True, False):
        want = refimpl.arcface_loss(x, W, Y, s=64.0, m=m, easy_margin=easy, reduction="none") + 35.0 * reg
        got = refimpl.magface_loss(x, W, Y, easy_margin=easy, reduction="none")
        np.testing.assert_allclose(got, want, rtol=1e-13)
        assert refimpl.magface_loss(x, W, Y, easy_margin=easy) == pytest.approx(np.mean(want), rel=1e-13)


def test_magface_gradient_reaches_the_norm_through_the_margin_and_the_regulariser():
    x = unit_rows(X) * np.array([[12.0], [30.0], [60.0], [75.0], [90.0], [100.0]])
    for easy in (True, False):

        def loss(x, easy=easy):
            return refimpl.magface_loss(x, W, Y, easy_margin=easy)

        np.testing.assert_allclose(autograd.grad(loss)(x), central_difference(loss, x), rtol=1e-6, atol=1e-9)
    # without the regulariser, |x| acts only through the margin: cosines ignore the norm
    radial = np.sum(autograd.grad(lambda x: refimpl.magface_loss(x, W, Y, lambda_g=0.0))(x) * unit_rows(x), axis=1)
    assert np.all(radial > 0)  # a larger norm, a larger margin, a larger cross-entropy


def test_magface_min_lambda_g_by_hand():
    # s k u_a^2 l_a^2 / (u_a^2 - l_a^2) with k = 0.35 / 100: 64 * 0.0035 * 1210000 / 12000
    assert magface_min_lambda_g(64.0, 10.0, 110.0, 0.45, 0.8) == pytest.approx(22.586666666666666, rel=1e-14)
    assert refimpl.magface_min_lambda_g(32.0, 2.0, 4.0, 0.2, 0.6) == pytest.approx(32 * 0.2 * 64 / 12, rel=1e-14)
    with pytest.raises(ValueError, match=r"^l_a must be < u_a"):
        magface_min_lambda_g(64.0, 110.0, 10.0, 0.45, 0.8)
    with pytest.raises(ValueError, match=r"^l_m must be <= u_m"):
        magface_min_lambda_g(64.0, 10.0, 110.0, 0.8, 0.45)


def test_at_the_bound_the_regulariser_outweighs_the_margin_at_l_a():
    # The worst case of d CE / d a is s k (p_y -> 0, sin(theta + m) -> 1); lambda_g g'(l_a) cancels it.
    s, l_a, u_a, l_m, u_m = 64.0, 10.0, 110.0, 0.45, 0.8
    bound = magface_min_lambda_g(s, l_a, u_a, l_m, u_m)
    assert s * (u_m - l_m) / (u_a - l_a) + bound * (1 / u_a**2 - 1 / l_a**2) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("loss", "kwargs", "match"),
    [
        (refimpl.curricularface_loss, {"t": 1.5}, r"^t must lie in \[-1\.0, 1\.0\]"),
        (refimpl.curricularface_loss, {"m": 2.0}, r"^m must lie in"),
        (refimpl.adaface_loss, {"norm_std": -1.0}, r"^norm_std must be"),
        (refimpl.adaface_loss, {"eps": 0.0}, r"^eps must lie in \(0\.0, 1\.0\]"),
        (refimpl.adaface_loss, {"h": -0.1}, r"^h must be"),
        (refimpl.adaface_loss, {"norm_mean": math.nan}, r"^norm_mean must not be nan"),
        (refimpl.magface_loss, {"l_a": 0.0}, r"^l_a must be a finite number > 0"),
        (refimpl.magface_loss, {"u_m": 0.3}, r"^l_m must be <= u_m"),
        (refimpl.magface_loss, {"lambda_g": -1.0}, r"^lambda_g must be"),
        (refimpl.magface_loss, {"easy_margin": 1}, r"^easy_margin must be a bool"),
    ],
)
def test_modern_errors_name_the_argument(loss, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        loss(X, W, Y, **kwargs)
