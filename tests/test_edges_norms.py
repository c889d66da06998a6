"""Norms at the edges of the float range, in both packages (issue 13, item 3).

sqrt(sum v^2) overflows past 1.8e19 in float32 (1.3e154 in float64) and loses digits below
3e-16 (1.5e-146); both packages form norms by the scaled route instead (refimpl.geometry.scaled_rows,
torch_port.geometry.unit_rows and row_norms). The truths here come from elsewhere: the float64
reference at ordinary magnitudes (the losses' scale invariance), Python's math.hypot (which
scales), the eps policy written out in NumPy, and a max-shifted log-sum-exp of logits scaled by hand.
"""

from __future__ import annotations

import math

import autograd
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests.registry import BY_NAME
from tests.samples import TORCH_DTYPES
from tests.tolerances import Tol, assert_close, assert_no_farther_than_plain, tolerance
from torch_port import geometry
from torch_port.geometry import NORM_EPS, plain_norms_suffice, row_norms, unit_rows

NORMALISED = ["normface_loss", "cosface_loss", "am_softmax_loss", "arcface_loss", "combined_margin_loss"]
# The largest factors drawn for x (row norms up to 50 in the records' strategy) and W (up to 5):
# c x and c W and their norms stay finite; 1e37 in float32 is within a factor 10 of its largest.
LARGEST = {"float64": (1e300, 1e300), "float32": (1e36, 1e37)}
# The smallest: the rows (norms >= 0.5 and >= 0.2) stay above NORM_EPS, where the losses are invariant.
SMALLEST = 1e-11


def factors(high: float, low: float = SMALLEST):
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: 10.0**e)


def hypot_rows(v: np.ndarray) -> np.ndarray:
    """|v_i| by math.hypot, which scales: right for every finite row, subnormal ones too."""
    return np.array([math.hypot(*row) for row in np.asarray(v, dtype=np.float64)])


# ---------------------------------------------------------------------------------------------
# Scale invariance of the normalised losses, values and gradients, plain and chunked
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["plain", "chunked"])
@pytest.mark.parametrize("name", NORMALISED)
@given(data=st.data())
def test_normalised_losses_are_scale_invariant_to_the_largest_float(name, chunk_size, dtype, data):
    """loss(c_x x, c_W W) = loss(x, W) and c_x dloss/dx(c_x x, c_W W) = dloss/dx(x, W) (W alike),
    for c from 1e-11 to 1e300 (float64) or 1e36 / 1e37 (float32); before the scaled route, norms past
    1.8e19 overflowed in float32 (ArcFace gave 0 or 32.07 for 58.45). The truth is the float64
    reference at the rounded inputs divided back by c (ordinary magnitudes). In float32 the scaled
    call must be within the table of it, or no farther from it than the same call at unit scale (the
    suites' rule for float32 paths: near a pole, float32 itself is farther than the table)."""
    record = BY_NAME[name]
    sample = data.draw(record.keyword_free_samples(), label="sample")
    c_x = data.draw(factors(LARGEST[dtype][0]), label="c_x")
    c_W = data.draw(factors(LARGEST[dtype][1]), label="c_W")
    x, W, y, kwargs = sample.tensors["x"], sample.tensors["W"], sample.labels["y"], sample.kwargs

    def port(x_, W_):
        xt = torch.tensor(x_, dtype=TORCH_DTYPES[dtype], requires_grad=True)
        Wt = torch.tensor(W_, dtype=TORCH_DTYPES[dtype], requires_grad=True)
        loss = record.port(xt, Wt, torch.tensor(y), **kwargs, reduction="none", chunk_size=chunk_size)
        return [loss.detach(), *torch.autograd.grad(loss.sum(), (xt, Wt)), xt.detach(), Wt.detach()]

    loss, gx, gW, xs, Ws = port(c_x * x, c_W * W)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gW).all()
    x0, W0 = xs.double().numpy() / c_x, Ws.double().numpy() / c_W
    got = [loss.double().numpy(), c_x * gx.double().numpy(), c_W * gW.double().numpy()]
    truth = [record.reference(x0, W0, y, **kwargs, reduction="none")]
    truth += [autograd.grad(lambda *a: record.reference(*a, y, **kwargs, reduction="sum"), i)(x0, W0) for i in (0, 1)]
    tols = [tolerance(kind, dtype, record.tolerances) for kind in ("forward", "gradient", "gradient")]
    unit_scale = [t.double().numpy() for t in port(x0, W0)[:3]] if dtype == "float32" else None
    for k, what in enumerate(("loss", "c_x d/dx", "c_W d/dW")):
        if unit_scale is None:
            assert_close(got[k], truth[k], tols[k], what)
        else:
            assert_no_farther_than_plain(got[k], unit_scale[k], truth[k], tols[k], 0.0, what)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["plain", "chunked"])
def test_rows_whose_norm_float32_cannot_hold(chunk_size):
    """Entries of 3e38, whose norm (4.4e38) is past float32's largest: the unit vector is still right,
    for features on both paths and for class weights on the plain path (the chunked path needs
    |W_j| below the largest float, since it forms the products u . W_j: docs/design.md). The truth:
    the reference in float64, where these norms are ordinary numbers."""
    big = torch.tensor([[3e38, -3e38, 1e38], [1.0, 2.0, -0.5]], dtype=torch.float32)
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.5, 0.5, 1.0]])
    y = torch.tensor([0, 2])
    for features, weights, labels in [(big, W, y), (W[:2] + 0.25, big, y.new_tensor([0, 1]))]:
        if chunk_size is not None and weights is big:
            continue
        expected = refimpl.arcface_loss(
            features.double().numpy(), weights.double().numpy(), labels.numpy(), reduction="none"
        )
        got = tpf.arcface_loss(features, weights, labels, reduction="none", chunk_size=chunk_size)
        assert_close(got.double().numpy(), expected, Tol(rtol=2e-5, atol=2e-5), "rows of 3e38")


# ---------------------------------------------------------------------------------------------
# SphereFace and L-Softmax: the loss grows with |x| (and |W|), legitimately
# ---------------------------------------------------------------------------------------------


def stable_cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=1, keepdims=True)
    return peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1)) - logits[np.arange(len(y)), y]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["plain", "chunked"])
@pytest.mark.parametrize("name", ["sphereface", "lsoftmax"])
@given(data=st.data())
def test_angular_losses_at_large_norms_are_the_scaled_logits_cross_entropy(name, chunk_size, dtype, data):
    """SphereFace's logits are |x| psi (L-Softmax's |x||W| psi): homogeneous, so at c x (and c W)
    they are c times those at x, and the loss is the cross-entropy of those (finite wherever the
    logits are: |x||W_j|(2m - 1) below the largest float). Factors up to 1e300 / 1e150 in float64,
    1e35 / 1e17 in float32; the truth is the reference's logits at ordinary scale, multiplied by the
    factors and fed to a max-shifted cross-entropy in float64. Before the scaled route SphereFace
    gave nan past 1.8e19 in float32."""
    record = BY_NAME[f"{name}_loss"]
    sample = data.draw(record.keyword_free_samples(), label="sample")
    high = {("sphereface", "float64"): 1e300, ("sphereface", "float32"): 1e35}.get((name, dtype))
    high = high or {"float64": 1e150, "float32": 1e17}[dtype]
    c_x = data.draw(factors(high), label="c_x")
    low_W, high_W = SMALLEST, LARGEST[dtype][1] if name == "sphereface" else high
    if name == "sphereface":
        # W is normalised: dt/dW is of size |x| / |W|, and the chunked path forms the products
        # u . W_j = |x| |W_j| cos theta (docs/design.md); both must stay below the largest float
        largest = float(torch.finfo(TORCH_DTYPES[dtype]).max)
        low_W = max(low_W, 1e3 * c_x / largest)
        high_W = high_W if chunk_size is None else min(high_W, largest / (1e3 * c_x))
    c_W = data.draw(factors(high_W, low_W), label="c_W")
    x, W, y, kwargs = sample.tensors["x"], sample.tensors["W"], sample.labels["y"], sample.kwargs
    xs = torch.tensor(c_x * x, dtype=TORCH_DTYPES[dtype], requires_grad=True)
    Ws = torch.tensor(c_W * W, dtype=TORCH_DTYPES[dtype], requires_grad=True)
    loss = record.port(xs, Ws, torch.tensor(y), **kwargs, reduction="none", chunk_size=chunk_size)
    gx, gW = torch.autograd.grad(loss.sum(), (xs, Ws))
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gW).all()

    x0, W0 = xs.detach().double().numpy() / c_x, Ws.detach().double().numpy() / c_W
    factor = c_x * (c_W if name == "lsoftmax" else 1.0)
    logits = getattr(refimpl, f"{name}_logits")(x0, W0, y, **kwargs)
    expected = stable_cross_entropy(factor * logits, y)
    # float32 logits carry ~m^2 eps32 |x||W| (tests/test_angular.py); the loss a difference of two
    eps = float(np.finfo(np.float32 if dtype == "float32" else np.float64).eps)
    bound = 16 * kwargs["m"] ** 2 * eps * factor * float(np.abs(logits).max()) + 8 * eps * np.maximum(1.0, expected)
    assert np.all(np.abs(loss.detach().double().numpy() - expected) <= bound)


# ---------------------------------------------------------------------------------------------
# Tiny rows: the eps policy, written out
# ---------------------------------------------------------------------------------------------

# Rows below NORM_EPS, down to subnormal numbers of each dtype (float32's smallest is 1.4e-45).
# The middle ones are where sqrt(sum v^2) loses digits (its squares are subnormal) while
# SphereFace's logits |x|^2 / eps * cos are still normal numbers.
TINY = {"float64": (1e-13, 1e-155, 3e-310), "float32": (1e-13, 1e-20, 2e-42)}
W_TINY = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.0]])
X_DIRECTIONS = np.array([[0.6, -0.8, 0.0], [0.3, 0.4, -0.5], [-1.0, 0.25, 0.5]])
Y_TINY = np.array([0, 1, 2])


def policy_cosines(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """cos = x^ . w^ with v^ = v / max(|v|, eps), |v| by math.hypot."""

    def unit(v):
        return v / np.maximum(hypot_rows(v), NORM_EPS)[:, None]

    return unit(x) @ unit(W).T


def both(name: str, x: np.ndarray, W: np.ndarray, y, dtype: str, **kwargs) -> list[np.ndarray]:
    """``name`` in both packages (the port in ``dtype``), as float64 arrays."""
    xt, Wt = (torch.tensor(a, dtype=TORCH_DTYPES[dtype]) for a in (x, W))
    port = getattr(tpf, name)(xt, Wt, torch.tensor(y), **kwargs)
    return [np.asarray(getattr(refimpl, name)(x, W, y, **kwargs)), port.double().numpy()]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("size", range(3))
def test_tiny_rows_follow_the_eps_policy(dtype, size):
    """A row shorter than NORM_EPS normalises to v / eps (cosines shrink with it); theta is then
    arccos of that cosine (near pi/2), not the angle between the raw vectors; SphereFace's |x| keeps
    its digits even for subnormal rows. Independent truth: the policy in NumPy with math.hypot."""
    scale = TINY[dtype][size]
    x = np.asarray(torch.tensor(scale * X_DIRECTIONS, dtype=TORCH_DTYPES[dtype]).double())
    for W in (W_TINY, np.asarray(torch.tensor(scale * W_TINY, dtype=TORCH_DTYPES[dtype]).double())):
        cos = policy_cosines(x, W)
        tol = Tol(rtol=1e-12, atol=1e-12) if dtype == "float64" else Tol(rtol=2e-6, atol=2e-6)
        for got in both("normface_logits", x, W, Y_TINY, dtype, s=16.0):
            assert_close(got, 16.0 * cos, tol, f"NormFace at |x| ~ {scale}")
        target = np.arccos(np.clip(cos[np.arange(3), Y_TINY], -1.0, 1.0)) + 0.5
        arcface = np.where(target <= math.pi, np.cos(target), cos[np.arange(3), Y_TINY] - 0.5 * math.sin(0.5))
        for got in both("arcface_logits", x, W, Y_TINY, dtype, s=64.0, m=0.5):
            assert_close(got[np.arange(3), Y_TINY], 64.0 * arcface, tol, f"ArcFace's theta at |x| ~ {scale}")
        sphere = hypot_rows(x)[:, None] * cos  # m = 1: psi = cos
        info = np.finfo(np.float64 if dtype == "float64" else np.float32)
        if np.abs(sphere).min() > info.tiny / info.eps:  # not when they underflow, in truth too
            for got in both("sphereface_logits", x, W, Y_TINY, dtype, m=1):
                assert_close(got, sphere, Tol(tol.rtol, 0.0), f"SphereFace's |x| at |x| ~ {scale}")


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["plain", "chunked"])
@pytest.mark.parametrize("size", range(3))
def test_tiny_feature_gradient_is_the_policy_derivative(size, chunk_size):
    """For |x| < eps, x^ = x / eps is linear: NormFace's gradient is (s / eps) sum_j (p_j - [j = y]) w^_j
    (closed form), in both packages and on both paths, down to subnormal rows (float64)."""
    x = TINY["float64"][size] * X_DIRECTIONS
    logits = 16.0 * policy_cosines(x, W_TINY)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = (16.0 / NORM_EPS) * (p - np.eye(3)[Y_TINY]) @ (W_TINY / hypot_rows(W_TINY)[:, None])
    got = autograd.grad(lambda a: refimpl.normface_loss(a, W_TINY, Y_TINY, reduction="sum"))(x)
    assert_close(got, expected, Tol(rtol=1e-10, atol=1e-12), "refimpl")
    xt = torch.tensor(x, requires_grad=True)
    tpf.normface_loss(xt, torch.tensor(W_TINY), torch.tensor(Y_TINY), reduction="sum", chunk_size=chunk_size).backward()
    assert_close(xt.grad.numpy(), expected, Tol(rtol=1e-10, atol=1e-12), "torch_port")


# ---------------------------------------------------------------------------------------------
# The norm helpers themselves
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-route", "accelerator-route"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_row_norms_match_hypot_across_the_range(dtype, accelerator, monkeypatch):
    """row_norms (the chunked path's |W_j|) and unit_rows against math.hypot, rows from subnormal to
    near the largest float, zero rows included, in blocks smaller than the rows; by the CPU's route
    (the scaled one where sqrt(sum v^2) is wrong) and an accelerator's (the scaled one always)."""
    if accelerator:
        monkeypatch.setattr(geometry, "host_reads_are_free", lambda t: False)
    info = torch.finfo(dtype)
    exponents = np.linspace(math.log10(info.smallest_normal) - 3, math.log10(info.max) - 1, 40)
    rng = np.random.default_rng(0)
    rows = torch.tensor(rng.uniform(-1, 1, (40, 5)) * 10.0 ** exponents[:, None], dtype=dtype)
    rows[7] = 0.0
    exact = hypot_rows(rows.double().numpy())
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    # relative to the norm, plus the spacing of the subnormal numbers a norm below tiny falls on
    rtol, floor = 8 * torch.finfo(wide).eps, 2 * torch.finfo(wide).smallest_normal * torch.finfo(wide).eps
    got = row_norms(rows, wide, block_rows=3).double().numpy()
    assert np.all(np.abs(got - exact) <= rtol * exact + floor), "row_norms"
    unit, norms = unit_rows(rows.to(wide))
    assert np.all(np.abs(norms[:, 0].double().numpy() - exact) <= rtol * exact + floor), "unit_rows"
    long = torch.as_tensor(exact >= NORM_EPS)
    lengths = unit[long].double().numpy()
    assert np.all(np.abs(hypot_rows(lengths) - 1.0) < 8 * torch.finfo(wide).eps)
    short = rows.to(wide)[~long].double() / NORM_EPS
    assert_close(unit[~long].double().numpy(), short.numpy(), Tol(rtol=4 * torch.finfo(wide).eps, atol=0.0), "v/eps")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_scaled_route_on_ordinary_rows(dtype, monkeypatch):
    """An accelerator takes the scaled route for every row and the chunked backward's unit rows (no
    flag is read back). On ordinary rows the scaled route gives the bits sqrt(sum v^2) gives (it
    divides by powers of two), values and gradients; the unit rows give the CPU's (k,) slopes'
    dW to rounding. Rows of every size from 1e-10 to 1e10, on both paths."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=dtype) * 10.0 ** torch.linspace(-10, 10, 6, dtype=dtype)[:, None]
    W = torch.randn(9, 5, generator=gen, dtype=dtype) * 10.0 ** torch.linspace(-10, 10, 9, dtype=dtype)[:, None]
    x.requires_grad_(True)
    W.requires_grad_(True)
    y = torch.tensor([0, 3, 8, 2, 2, 5])
    results = []
    for everywhere in (False, True):
        if everywhere:
            monkeypatch.setattr(geometry, "host_reads_are_free", lambda t: False)  # as on an accelerator
        for name in ("arcface_loss", "sphereface_loss", "lsoftmax_loss"):
            for chunk_size in (None, 4):
                loss = getattr(tpf, name)(x, W, y, chunk_size=chunk_size)
                results.append([chunk_size, loss, *torch.autograd.grad(loss, (x, W))])
    assert not geometry.plain_norms_suffice(torch.ones(3, dtype=dtype))  # the patch took
    eps = torch.finfo(dtype).eps
    for (chunk_size, *cpu), (_, *accelerator) in zip(results[:6], results[6:]):
        assert torch.equal(cpu[0], accelerator[0]) and torch.equal(cpu[1], accelerator[1])
        if chunk_size is None:
            assert torch.equal(cpu[2], accelerator[2])
        else:
            assert_close(accelerator[2].numpy(), cpu[2].numpy(), Tol(rtol=16 * eps, atol=16 * eps), "chunked dW")


def test_plain_norms_suffice_only_in_their_range():
    """The CPU takes sqrt(sum v^2) where it is right, and the scaled route elsewhere (zero rows too)."""
    assert plain_norms_suffice(torch.tensor([1e-15, 1.0, 1e19]))
    for bad in (0.0, 1e-17, math.inf, math.nan):
        assert not plain_norms_suffice(torch.tensor([1.0, bad]))
    assert plain_norms_suffice(torch.tensor([1e-145, 1e150], dtype=torch.float64))
    assert not plain_norms_suffice(torch.tensor([1e-147], dtype=torch.float64))
