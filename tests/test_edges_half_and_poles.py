"""Zero rows in half precision, and the reference's gradient where the loss has one (issue 13, items 6, 7).

float16 cannot hold the ~s/NORM_EPS gradient of a zero row; the port returns it saturated at
+-65504 (torch_port.geometry.upcast), so the README's promise (finite gradients for zero features
and float16) holds. The reference used to return nan where the loss is differentiable (the ArcFace
and combined-margin fallbacks and the easy margin at cos theta_y = -1, zero features): sqrt's
infinite slope at 0 met a zero cotangent. The truths: the float32 path's own gradient clipped to
the half range (same inputs, exact in both), and central differences of the reference's values.
"""

from __future__ import annotations

import math

import autograd
import numpy as np
import pytest
import torch

import refimpl
import torch_port.functional as tpf
from tests.registry import RECORDS
from tests.tolerances import Tol, assert_close
from torch_port.geometry import NORM_EPS

# These tests build W as (C, D); sub-centre records (C k rows) run on every path in
# tests/test_shared_suites.py and tests/test_modern_margins.py.
MARGIN_RECORDS = [record for record in RECORDS if record.config is not None and record.rows_per_class == 1]
HALF = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# Item 7: zero rows of x and W in float16 and bfloat16, every margin loss, plain and chunked
# ---------------------------------------------------------------------------------------------


def zero_row_problem():
    """Features (6, 4) with two zero rows, weights (5, 4) with a zero row that is the target of a
    zero feature and of an ordinary one; small integers and halves, exact in every dtype."""
    rng = np.random.default_rng(7)
    x = rng.integers(-4, 5, size=(6, 4)) / 2.0
    W = rng.integers(-4, 5, size=(5, 4)) / 2.0 + np.eye(5, 4)
    x[[1, 4]] = 0.0
    W[2] = 0.0
    return x, W, np.array([0, 2, 2, 3, 1, 4])


def loss_and_grads(record, x, W, y, dtype, chunk_size):
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    Wt = torch.tensor(W, dtype=dtype, requires_grad=True)
    loss = record.port(xt, Wt, torch.tensor(y), **record.defaults, chunk_size=chunk_size)
    return (loss, *torch.autograd.grad(loss, (xt, Wt)))


def saturated(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 gradient as a ``dtype`` input should receive it: clipped to the dtype's range, rounded."""
    limit = torch.finfo(dtype).max
    return grad.clamp(-limit, limit).to(dtype)


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["plain", "chunked"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_half_zero_rows_get_finite_saturated_gradients(record, dtype, chunk_size):
    """Half-precision x and W with zero rows: the loss is the float32 one (computed in float32), and
    each gradient is the float32 gradient rounded to the input's dtype with saturation, so finite:
    +-65504 in float16 where the true value is ~s/NORM_EPS (before: inf)."""
    x, W, y = zero_row_problem()
    loss, gx, gW = loss_and_grads(record, x, W, y, dtype, chunk_size)
    loss32, gx32, gW32 = loss_and_grads(record, x, W, y, torch.float32, chunk_size)
    assert loss.dtype == torch.float32 and torch.equal(loss, loss32)
    for got, want, name in ((gx, gx32, "x"), (gW, gW32, "W")):
        assert got.dtype == dtype and torch.isfinite(got).all(), f"{record.name}: d/d{name} {got}"
        expected = saturated(want, dtype).float()
        assert_close(got.float().numpy(), expected.numpy(), Tol(rtol=torch.finfo(dtype).eps, atol=0.0), name)
    if dtype == torch.float16 and record.name in ("normface_loss", "arcface_loss", "sphereface_loss"):
        # the case in point: the zero rows' float32 gradients are beyond float16, and saturate
        # (SphereFace keeps |x|, so its zero feature's gradient is 0; its zero class weight's is not)
        limit = torch.finfo(torch.float16).max
        pairs = [(gW[2], gW32[2])] + ([] if record.name == "sphereface_loss" else [(gx[1], gx32[1])])
        for got, want in pairs:
            assert want.abs().max() > limit and got.abs().max() == limit


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["plain", "chunked"])
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_float16_heads_with_a_zero_weight_row(record, chunk_size):
    """A head whose weight is float16 (head.half()) with a zero class row, fed float16 features with
    a zero row: a float32 loss and finite float16 gradients for the weight and the features."""
    x, W, y = zero_row_problem()
    head = record.head(record.defaults, W.shape[0], W.shape[1], chunk_size=chunk_size).half()
    with torch.no_grad():
        head.weight.copy_(torch.tensor(W))
    xt = torch.tensor(x, dtype=torch.float16, requires_grad=True)
    loss = head(xt, torch.tensor(y))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert head.weight.grad.dtype == torch.float16 and torch.isfinite(head.weight.grad).all()
    assert torch.isfinite(xt.grad).all()


# ---------------------------------------------------------------------------------------------
# Item 6: the reference differentiates where the loss is differentiable
# ---------------------------------------------------------------------------------------------

W_POLES = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.0]])
Y_POLES = np.array([0, 1, 2, 0])
ALONG = np.array([2.0 * W_POLES[0], 0.5 * W_POLES[1], 4.0 * W_POLES[2], 3.0 * W_POLES[0]])  # cos theta_y = 1
ZERO_ROWS = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]])

# (loss, hyperparameters, features): differentiable points where the reference gave nan.
DIFFERENTIABLE = [
    ("arcface", {"s": 64.0, "m": 0.5}, -ALONG),  # theta_y = pi: the fallback, smooth in cos theta
    ("arcface", {"s": 64.0, "m": 1.5}, -ALONG),
    ("arcface", {"s": 64.0, "m": 0.5, "easy_margin": True}, -ALONG),  # cos < 0: no margin there
    ("combined_margin", {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}, -ALONG),
    ("combined_margin", {"s": 64.0, "m1": 1.35, "m2": 0.2, "m3": 0.1}, -ALONG),
    ("normface", {"s": 16.0}, ZERO_ROWS),  # |x| < eps: x^ = x / eps, linear
    ("cosface", {"s": 64.0, "m": 0.35}, ZERO_ROWS),
    ("am_softmax", {"s": 30.0, "m": 0.35}, ZERO_ROWS),
    ("sphereface", {"m": 4}, ZERO_ROWS),  # |x| x^ = x |x| / eps: quadratic, gradient 0
    ("lsoftmax", {"m": 4}, ZERO_ROWS),
    ("arcface", {"s": 64.0, "m": 0.5}, ZERO_ROWS),
]


def central_differences(loss, x: np.ndarray) -> np.ndarray:
    """d loss / dx by central differences, with a step inside the eps regime on the zero rows
    (|x| < NORM_EPS, where x / max(|x|, eps) is linear) and an ordinary one elsewhere."""
    out = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        h = 1e-4 * NORM_EPS if not x[index[0]].any() else 1e-6
        step = np.zeros_like(x)
        step[index] = h
        out[index] = (loss(x + step) - loss(x - step)) / (2 * h)
    return out


@pytest.mark.parametrize(
    ("kind", "kwargs", "x"), DIFFERENTIABLE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(DIFFERENTIABLE)]
)
def test_reference_gradient_where_the_loss_is_differentiable(kind, kwargs, x):
    """The reference's autograd gradient is finite, equals central differences of its values (an
    independent route), and equals the port's, for x and W."""

    def loss(x_, W_=W_POLES):
        return getattr(refimpl, f"{kind}_loss")(x_, W_, Y_POLES, **kwargs)

    gx = autograd.grad(loss)(x)
    gW = autograd.grad(lambda W_: loss(x, W_))(W_POLES)
    assert np.isfinite(gx).all() and np.isfinite(gW).all()
    assert_close(gx, central_differences(loss, x), Tol(rtol=1e-6, atol=1e-6), "d/dx vs central differences")
    xt, Wt = torch.tensor(x, requires_grad=True), torch.tensor(W_POLES, requires_grad=True)
    for chunk_size in (None, 2):
        port = getattr(tpf, f"{kind}_loss")(xt, Wt, torch.tensor(Y_POLES), **kwargs, chunk_size=chunk_size)
        px, pW = torch.autograd.grad(port, (xt, Wt))
        assert_close(px.numpy(), gx, Tol(rtol=1e-10, atol=1e-12), f"d/dx, port ({chunk_size})")
        assert_close(pW.numpy(), gW, Tol(rtol=1e-10, atol=1e-12), f"d/dW, port ({chunk_size})")


@pytest.mark.parametrize("impl", ["refimpl", "torch_port"])
@pytest.mark.parametrize("kind", ["arcface", "combined_margin"])
def test_cone_point_convention_in_both_packages(kind, impl):
    """At theta_y = 0 the margin logit has no derivative (a cone point): both packages take
    dtheta/dx = 0 there, i.e. the gradient of the loss with the target logit held at s psi(0)
    (derivations/05-arcface-combined.md). The expected value is NormFace's logits with that entry
    frozen, differentiated by autograd."""
    kwargs = {"s": 64.0, "m": 0.5} if kind == "arcface" else {"s": 64.0, "m1": 1.35, "m2": 0.25, "m3": 0.1}
    psi0 = math.cos(0.5) if kind == "arcface" else math.cos(0.25) - 0.1
    onehot = np.eye(3)[Y_POLES].astype(bool)

    def frozen_target(x_):
        logits = autograd.numpy.where(onehot, 64.0 * psi0, refimpl.normface_logits(x_, W_POLES, Y_POLES, s=64.0))
        return refimpl.cross_entropy(logits, Y_POLES)

    expected = autograd.grad(frozen_target)(ALONG)
    if impl == "refimpl":
        got = autograd.grad(lambda x_: getattr(refimpl, f"{kind}_loss")(x_, W_POLES, Y_POLES, **kwargs))(ALONG)
    else:
        xt = torch.tensor(ALONG, requires_grad=True)
        getattr(tpf, f"{kind}_loss")(xt, torch.tensor(W_POLES), torch.tensor(Y_POLES), **kwargs).backward()
        got = xt.grad.numpy()
    assert_close(got, expected, Tol(rtol=1e-12, atol=1e-12), "theta_y = 0")
