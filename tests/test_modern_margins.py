"""Family properties of the modern margins (issue 15; shared/DESIGN.md "Modern margins").

Sub-center ArcFace (k = 1 is ArcFace, sub-centre order does not matter, only the arg-max row learns),
per-sample and per-class margins, the gradient convention ``margin_grad="detached"``, ignored rows
(``ignore_index``) on the plain, chunked and sharded paths, margins on given cosines, adaptive
margins, and the heads SubCenterArcFace, ElasticArcFace and ElasticCosFace. Expected values come
from another route each time: the reference, ArcFace itself, single-sample calls, a hand-written
formula under autograd, or a case built so that its answer is known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import refimpl
import torch_port.functional as F
from tests.sharded_runner import ShardedCall
from tests.tolerances import PATH_AGREEMENT, Tol, assert_close
from torch_port import (
    AMSoftmax,
    ArcFace,
    CosFace,
    ElasticArcFace,
    ElasticCosFace,
    SubCenterArcFace,
    adaptive_margins,
    margin_logits_from_cosines,
)
from torch_port.normalized import arcface_config, combined_margin_config, cosface_config

CHUNKS = (None, 1, 3, 100)  # plain, one class at a time, chunks not dividing C, one chunk > C
CLOSE = PATH_AGREEMENT["float64"]
T64 = torch.float64


def problem(seed=0, batch=6, classes=5, dim=4, rows_per_class=1):
    """A float64 problem (NumPy): x, W with classes * rows_per_class rows, labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim)) * 2.0
    W = rng.normal(size=(classes * rows_per_class, dim))
    y = rng.integers(0, classes, batch)
    return x, W, y


def port_loss_and_grads(fn, x, W, y, cotangent=None, **kwargs):
    xt = torch.tensor(x, requires_grad=True)
    Wt = torch.tensor(W, requires_grad=True)
    loss = fn(xt, Wt, torch.as_tensor(y), **kwargs)
    objective = loss.sum() if cotangent is None else (loss * torch.as_tensor(cotangent)).sum()
    gx, gW = torch.autograd.grad(objective, (xt, Wt), allow_unused=True)
    gx = torch.zeros_like(xt) if gx is None else gx
    gW = torch.zeros_like(Wt) if gW is None else gW
    return loss.detach().numpy(), gx.numpy(), gW.numpy()


def sharded(runner, record, x, W, y, kwargs, reduction="mean", cotangent=None):
    """Loss and (dx, dW) of ``record`` on the 2-rank sharded path (tests/sharded_runner.py)."""
    if cotangent is None:
        cotangent = np.ones(len(y)) if reduction == "none" else np.array(1.0)
    call = ShardedCall(record, x=x, W=W, y=np.asarray(y), kwargs=kwargs, reduction=reduction, cotangent=cotangent)
    result = runner.run(call)
    return result.loss, result.grads["x"], result.grads["W"]


# ---------------------------------------------------------------------------------------------
# Sub-center ArcFace
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", CHUNKS)
def test_subcenter_with_one_row_per_class_is_arcface(chunk):
    x, W, y = problem(1)
    kwargs = {"s": 30.0, "m": 0.4, "easy_margin": False}
    expected = port_loss_and_grads(F.arcface_loss, x, W, y, **kwargs, reduction="none")
    got = port_loss_and_grads(F.subcenter_arcface_loss, x, W, y, **kwargs, k=1, reduction="none", chunk_size=chunk)
    for a, b, what in zip(got, expected, ("loss", "dx", "dW")):
        assert_close(a, b, CLOSE, f"k=1 vs ArcFace, chunk={chunk}: {what}")
    reference = refimpl.subcenter_arcface_loss(x, W, y, **kwargs, k=1, reduction="none")
    assert_close(reference, refimpl.arcface_loss(x, W, y, **kwargs, reduction="none"), CLOSE, "reference k=1")


def test_subcenter_with_one_row_per_class_is_arcface_when_sharded(sharded_runner):
    x, W, y = problem(2)
    kwargs = {"s": 30.0, "m": 0.4, "easy_margin": True}
    got = sharded(sharded_runner, "subcenter_arcface_loss", x, W, y, {**kwargs, "k": 1})
    expected = port_loss_and_grads(F.arcface_loss, x, W, y, **kwargs)
    for a, b, what in zip(got, expected, ("loss", "dx", "dW")):
        assert_close(a, b, CLOSE, f"sharded k=1 vs ArcFace: {what}")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_permuting_a_class_s_subcentres_changes_nothing(chunk):
    k, classes = 3, 4
    x, W, y = problem(3, classes=classes, rows_per_class=k)
    rng = np.random.default_rng(0)
    order = np.concatenate([j * k + rng.permutation(k) for j in range(classes)])  # within each class
    kwargs = {"s": 20.0, "m": 0.5, "k": k}
    loss, gx, gW = port_loss_and_grads(F.subcenter_arcface_loss, x, W, y, **kwargs, chunk_size=chunk)
    loss_p, gx_p, gW_p = port_loss_and_grads(F.subcenter_arcface_loss, x, W[order], y, **kwargs, chunk_size=chunk)
    assert_close(loss_p, loss, CLOSE, "loss")
    assert_close(gx_p, gx, CLOSE, "dx")
    assert_close(gW_p, gW[order], CLOSE, "dW follows its rows")
    ref = refimpl.subcenter_arcface_loss(x, W, y, **kwargs)
    assert_close(refimpl.subcenter_arcface_loss(x, W[order], y, **kwargs), ref, CLOSE, "reference")
    assert_close(loss, ref, CLOSE, "port vs reference")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_only_the_arg_max_row_of_each_class_learns_from_a_sample(chunk):
    k, classes = 3, 4
    x, W, y = problem(4, batch=5, classes=classes, rows_per_class=k)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    best = (unit(x) @ unit(W).T).reshape(len(x), classes, k).argmax(axis=2)  # (B, C), NumPy's route
    for i in range(len(x)):
        cotangent = np.eye(len(x))[i]
        options = dict(s=16.0, m=0.5, k=k, reduction="none", chunk_size=chunk, cotangent=cotangent)
        _, _, gW = port_loss_and_grads(F.subcenter_arcface_loss, x, W, y, **options)
        rows = gW.reshape(classes, k, -1)
        for j in range(classes):
            for r in range(k):
                norm = np.abs(rows[j, r]).max()
                if r == best[i, j]:
                    assert norm > 0, (i, j, r)
                else:
                    assert norm == 0.0, f"sample {i}, class {j}: sub-centre {r} is not the arg-max but got {norm}"


# ---------------------------------------------------------------------------------------------
# Per-sample margins
# ---------------------------------------------------------------------------------------------

PER_SAMPLE = [
    ("arcface_loss", {"s": 30.0, "m": 0.45, "easy_margin": False}, "m", (0.1, 1.2)),
    ("cosface_loss", {"s": 30.0, "m": 0.35}, "m", (0.0, 0.8)),
    ("am_softmax_loss", {"s": 30.0, "m": 0.35}, "m", (0.0, 0.8)),
    ("combined_margin_loss", {"s": 30.0, "m1": 1.1, "m2": 0.3, "m3": 0.1}, "m1", (1.0, 2.0)),
    ("combined_margin_loss", {"s": 30.0, "m1": 1.1, "m2": 0.3, "m3": 0.1}, "m2", (0.0, 0.8)),
    ("combined_margin_loss", {"s": 30.0, "m1": 1.1, "m2": 0.3, "m3": 0.1}, "m3", (0.0, 0.4)),
]


@pytest.mark.parametrize("chunk", (None, 3))
@pytest.mark.parametrize(("name", "kwargs", "arg", "bounds"), PER_SAMPLE, ids=lambda v: v if isinstance(v, str) else "")
def test_a_constant_margin_vector_is_the_scalar(name, kwargs, arg, bounds, chunk):
    x, W, y = problem(5)
    vector = np.full(len(y), kwargs[arg])
    port = getattr(F, name)
    expected = port_loss_and_grads(port, x, W, y, **kwargs, reduction="none", chunk_size=chunk)
    got = port_loss_and_grads(
        port, x, W, y, **{**kwargs, arg: torch.tensor(vector)}, reduction="none", chunk_size=chunk
    )
    for a, b, what in zip(got, expected, ("loss", "dx", "dW")):
        assert_close(a, b, CLOSE, f"{name} {arg} vector: {what}")
    reference = getattr(refimpl, name)
    assert_close(
        reference(x, W, y, **{**kwargs, arg: vector}, reduction="none"),
        reference(x, W, y, **kwargs, reduction="none"),
        CLOSE,
        "reference",
    )


@pytest.mark.parametrize("chunk", (None, 3))
@pytest.mark.parametrize(("name", "kwargs", "arg", "bounds"), PER_SAMPLE, ids=lambda v: v if isinstance(v, str) else "")
def test_a_varying_margin_vector_is_each_row_s_own_call(name, kwargs, arg, bounds, chunk):
    x, W, y = problem(6)
    margins = np.linspace(*bounds, len(y))
    port = getattr(F, name)
    loss, gx, _ = port_loss_and_grads(
        port, x, W, y, **{**kwargs, arg: torch.tensor(margins)}, reduction="none", chunk_size=chunk
    )
    reference = getattr(refimpl, name)(x, W, y, **{**kwargs, arg: margins}, reduction="none")
    assert_close(loss, reference, CLOSE, f"{name}: port vs reference")
    for i in range(len(y)):
        row = slice(i, i + 1)
        one = {**kwargs, arg: float(margins[i])}
        alone, gx_alone, _ = port_loss_and_grads(port, x[row], W, y[row], **one, reduction="none")
        assert_close(loss[row], alone, CLOSE, f"{name}, row {i}: loss")
        assert_close(gx[row], gx_alone, CLOSE, f"{name}, row {i}: dx")


# ---------------------------------------------------------------------------------------------
# margin_grad="detached"
# ---------------------------------------------------------------------------------------------


def _cosines(x, W, k=1):
    """(B, C) cosines by a route of this test (pooled over k rows by max)."""
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    return cos.view(cos.shape[0], -1, k).max(dim=2).values


def _psi(kind, cos_y, kwargs):
    """The target transform's value (only the value is used: the formula detaches it)."""
    theta = torch.arccos(cos_y.clamp(-1.0, 1.0))
    if kind in ("cosface", "am_softmax"):
        return cos_y - kwargs["m"]
    if kind in ("arcface", "subcenter_arcface"):
        m = kwargs["m"]
        return torch.where(theta + m <= math.pi, torch.cos(theta + m), cos_y - m * math.sin(m))
    m1, m2, m3 = kwargs["m1"], kwargs["m2"], kwargs["m3"]
    assert bool((m1 * theta + m2 <= math.pi).all()), "keep the problem on the main branch"
    return torch.cos(m1 * theta + m2) - m3


def detached_by_hand(kind, x, W, y, kwargs, k=1):
    """Cross-entropy of s cos theta_j, with the target s cos theta_y + sg(s psi - s cos theta_y)."""
    s = kwargs["s"]
    cos = _cosines(x, W, k)
    cos_y = cos.gather(1, y[:, None])[:, 0]
    target = s * cos_y + (s * _psi(kind, cos_y, kwargs) - s * cos_y).detach()
    logits = (s * cos).scatter(1, y[:, None], target[:, None])
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


DETACHED = [
    ("arcface", {"s": 20.0, "m": 0.5, "easy_margin": False}, 1),
    ("cosface", {"s": 20.0, "m": 0.35}, 1),
    ("am_softmax", {"s": 20.0, "m": 0.35}, 1),
    ("combined_margin", {"s": 20.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}, 1),
    ("subcenter_arcface", {"s": 20.0, "m": 0.5, "k": 2}, 2),
]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("kind", "kwargs", "k"), DETACHED, ids=lambda v: v if isinstance(v, str) else "")
def test_detached_keeps_the_value_to_the_bit_and_has_the_hand_written_gradient(kind, kwargs, k, chunk):
    x, W, y = problem(7, classes=4, rows_per_class=k)
    if "arcface" in kind:
        x[0] = -W[y[0] * k]  # theta = pi: ArcFace's fallback (its value kept, its gradient s's)
    port = getattr(F, f"{kind}_loss")
    exact = port_loss_and_grads(port, x, W, y, **kwargs, reduction="sum", chunk_size=chunk)
    detached = port_loss_and_grads(port, x, W, y, **kwargs, reduction="sum", chunk_size=chunk, margin_grad="detached")
    assert np.array_equal(detached[0], exact[0]), "the detached value is the exact one, to the bit"
    logits = getattr(F, f"{kind}_logits")
    args = (torch.tensor(x), torch.tensor(W), torch.tensor(y))
    assert torch.equal(logits(*args, **kwargs, margin_grad="detached"), logits(*args, **kwargs))
    xt, Wt = torch.tensor(x, requires_grad=True), torch.tensor(W, requires_grad=True)
    by_hand = torch.autograd.grad(detached_by_hand(kind, xt, Wt, torch.tensor(y), kwargs, k), (xt, Wt))
    assert_close(detached[1], by_hand[0].numpy(), CLOSE, f"{kind}: dx")
    assert_close(detached[2], by_hand[1].numpy(), CLOSE, f"{kind}: dW")
    if kind in ("cosface", "am_softmax"):  # psi = cos - m: d psi / d cos = 1 already
        assert_close(detached[1], exact[1], CLOSE, "a cosine margin's exact gradient is the detached one")
    else:
        assert not np.allclose(detached[1], exact[1]), "the positive control: the exact gradient differs"
    reference = getattr(refimpl, f"{kind}_loss")
    ref = reference(x, W, y, **kwargs, reduction="sum", margin_grad="detached")
    assert ref == reference(x, W, y, **kwargs, reduction="sum")


# ---------------------------------------------------------------------------------------------
# ignore_index
# ---------------------------------------------------------------------------------------------

IGNORED = [
    ("arcface_loss", {"s": 30.0, "m": 0.5, "easy_margin": False}, 1),
    ("cosface_loss", {"s": 30.0, "m": 0.35}, 1),
    ("sphereface_loss", {"m": 4, "lamb": 0.0}, 1),
    ("subcenter_arcface_loss", {"s": 30.0, "m": 0.5, "k": 3}, 3),
]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("name", "kwargs", "k"), IGNORED, ids=lambda v: v if isinstance(v, str) else "")
def test_ignored_rows_give_no_gradient_and_the_mean_is_over_the_rest(name, kwargs, k, chunk):
    x, W, y = problem(8, batch=6, classes=4, rows_per_class=k)
    ignored = np.array([False, True, False, True, True, False])
    port = getattr(F, name)
    for label, extra in ((-1, {}), (-5, {"ignore_index": -5})):
        labels = np.where(ignored, label, y)
        loss, gx, gW = port_loss_and_grads(port, x, W, labels, **kwargs, **extra, chunk_size=chunk)
        kept, gx_kept, gW_kept = port_loss_and_grads(port, x[~ignored], W, y[~ignored], **kwargs, chunk_size=chunk)
        assert np.all(gx[ignored] == 0.0), "an ignored row gets no gradient"
        assert_close(loss, kept, CLOSE, f"{name}: mean over the kept rows")
        assert_close(gx[~ignored], gx_kept, CLOSE, f"{name}: dx of the kept rows")
        assert_close(gW, gW_kept, CLOSE, f"{name}: dW")
        reference = getattr(refimpl, name)(x, W, labels, **kwargs, **extra)
        assert_close(loss, reference, CLOSE, f"{name}: port vs reference")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("name", "kwargs", "k"), IGNORED, ids=lambda v: v if isinstance(v, str) else "")
def test_every_row_ignored_is_a_loss_of_zero_with_zero_gradients_on_every_path(
    name, kwargs, k, reduction, sharded_runner
):
    x, W, _ = problem(9, batch=4, classes=4, rows_per_class=k)
    y = np.full(4, -1)
    port = getattr(F, name)
    for chunk in CHUNKS:
        loss, gx, gW = port_loss_and_grads(port, x, W, y, **kwargs, reduction=reduction, chunk_size=chunk)
        assert np.all(loss == 0.0) and np.all(gx == 0.0) and np.all(gW == 0.0), (chunk, loss)
    loss, gx, gW = sharded(sharded_runner, name, x, W, y, kwargs, reduction)
    assert np.all(loss == 0.0) and np.all(gx == 0.0) and np.all(gW == 0.0), ("sharded", loss)
    assert np.all(getattr(refimpl, name)(x, W, y, **kwargs, reduction=reduction) == 0.0)


# ---------------------------------------------------------------------------------------------
# Margins on given cosines
# ---------------------------------------------------------------------------------------------

FROM_COSINES = [
    ("arcface", arcface_config, {"s": 30.0, "m": 0.5, "easy_margin": False}),
    ("arcface", arcface_config, {"s": 30.0, "m": 0.5, "easy_margin": True}),
    ("cosface", cosface_config, {"s": 30.0, "m": 0.35}),
    ("combined_margin", combined_margin_config, {"s": 30.0, "m1": 1.2, "m2": 0.3, "m3": 0.1}),
]


@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
@pytest.mark.parametrize(("kind", "builder", "kwargs"), FROM_COSINES, ids=lambda v: v if isinstance(v, str) else "")
def test_margin_logits_from_cosines_are_the_reference_logits(kind, builder, kwargs, margin_grad):
    x, W, y = problem(10, batch=7)
    x[0] = 3.0 * W[y[0]]  # cos = +1
    x[1] = -2.0 * W[y[1]]  # cos = -1
    y = np.where(np.arange(len(y)) == 2, -1, y)  # an ignored row keeps s cos theta
    cos = _cosines(torch.tensor(x), torch.tensor(W)).requires_grad_()
    config = builder(**kwargs, margin_grad=margin_grad)
    got = margin_logits_from_cosines(cos, torch.tensor(y), config)
    expected = getattr(refimpl, f"{kind}_logits")(x, W, y, **kwargs, margin_grad=margin_grad)
    assert_close(got.detach().numpy(), expected, Tol(rtol=1e-10, atol=1e-12), f"{kind} logits from cosines")
    (grad,) = torch.autograd.grad(got.sum(), cos)
    assert torch.isfinite(grad).all(), "the gradient w.r.t. the cosines is finite at cos = +-1"


# ---------------------------------------------------------------------------------------------
# Adaptive margins
# ---------------------------------------------------------------------------------------------


def test_adaptive_margins_by_hand_and_against_the_reference():
    # counts 1, 16, 81: n^(-1/4) = 1, 1/2, 1/3 -> (0.45 (v - 1/3) / (2/3)) + 0.05 = 0.5, 0.1625, 0.05
    got = adaptive_margins(torch.tensor([1, 16, 81]))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.1625, 0.05], dtype=T64), rtol=1e-12, atol=1e-12)
    counts = np.array([3.0, 50.0, 7.0, 1000.0, 1.0])
    for kwargs in ({}, {"m_min": 0.1, "m_max": 0.7, "p": -0.5}, {"p": 0.3}):
        got = adaptive_margins(torch.tensor(counts), **kwargs).numpy()
        assert_close(got, refimpl.adaptive_margins(counts, **kwargs), CLOSE, str(kwargs))
    assert torch.equal(adaptive_margins([5, 5, 5]), torch.full((3,), 0.5, dtype=T64)), "equal counts: m_max"


# ---------------------------------------------------------------------------------------------
# Per-class margins in the heads
# ---------------------------------------------------------------------------------------------

PER_CLASS_HEADS = [(ArcFace, F.arcface_loss, 0.6), (CosFace, F.cosface_loss, 0.5), (AMSoftmax, F.am_softmax_loss, 0.5)]


@pytest.mark.parametrize(("head_type", "loss", "top"), PER_CLASS_HEADS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_per_class_head_is_the_loss_with_each_sample_s_class_margin(head_type, loss, top):
    x, W, y = problem(11)
    margins = torch.linspace(0.05, top, 5, dtype=T64)
    head = head_type(5, 4, s=30.0, m=margins, reduction="none", dtype=T64)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(W))
    labels = torch.tensor(y)
    expected = loss(torch.tensor(x), torch.tensor(W), labels, s=30.0, m=margins[labels], reduction="none")
    torch.testing.assert_close(head(torch.tensor(x), torch.tensor(y)), expected, rtol=1e-12, atol=1e-12)
    state = head.state_dict()
    assert "m" in state and torch.equal(state["m"], margins)


def test_a_checkpoint_with_an_out_of_range_class_margin_is_refused_before_anything_is_copied():
    head = ArcFace(5, 4, m=torch.full((5,), 0.3, dtype=T64), dtype=T64)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["weight"] = torch.randn(5, 4, dtype=T64)
    state["m"] = torch.tensor([0.1, 0.2, 2.0, 0.3, 0.4], dtype=T64)  # 2.0 > pi/2
    with pytest.raises(ValueError, match=r"\bm\b"):
        head.load_state_dict(state)
    for key, value in before.items():
        assert torch.equal(head.state_dict()[key], value), f"{key} changed by a refused checkpoint"


# ---------------------------------------------------------------------------------------------
# SubCenterArcFace: the data cleaning
# ---------------------------------------------------------------------------------------------


def _cleaning_case():
    """Two classes, k = 2, D = 3. Class 0: rows e1 (dominant: three samples near it) and e2 (one
    sample); class 1: rows e3 and -e3 (two samples near -e3, one near e3)."""
    head = SubCenterArcFace(2, 3, k=2, s=16.0, m=0.3, dtype=T64)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, -1.0]], dtype=T64))
    x = torch.tensor(
        [[1.0, 0.1, 0], [1.0, -0.1, 0.1], [2.0, 0, 0.2], [0.1, 1.0, 0], [0, 0.1, -1.0], [0.1, 0, -2.0], [0, 0.1, 1.0]],
        dtype=T64,
    )
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    return head, x, y


def test_dominant_subcentres_and_outliers_of_a_constructed_case():
    head, x, y = _cleaning_case()
    assert head.dominant_subcenters(x, y).tolist() == [0, 1]
    dominant = head.dominant_subcenters(x, y)
    # sample 3 (near e2: ~84 degrees from e1) and sample 6 (near e3: ~174 degrees from -e3) are noise
    assert head.outliers(x, y, dominant=dominant).tolist() == [False, False, False, True, False, False, True]
    assert head.outliers(x, y, threshold=math.radians(90.0), dominant=dominant).tolist() == [False] * 6 + [True]
    assert torch.equal(head.dominant_weight(dominant), head.weight.detach()[[0, 3]])


def test_subcentre_counts_move_only_in_training_with_grad_and_after_the_checks():
    head, x, y = _cleaning_case()
    zero = torch.zeros(2, 2, dtype=torch.long)
    head.eval()
    head(x, y)
    assert torch.equal(head.subcenter_counts, zero), "eval mode counts nothing"
    head.train()
    with torch.no_grad():
        head(x, y)
    assert torch.equal(head.subcenter_counts, zero), "no_grad counts nothing"
    with pytest.raises(ValueError):
        head(x, torch.tensor([0, 0, 0, 0, 1, 1, 2]))  # a label out of range: the call fails
    assert torch.equal(head.subcenter_counts, zero), "a failed call counts nothing"
    head(x, torch.tensor([0, 0, 0, 0, 1, 1, -1]))  # the ignored row is not counted
    assert head.subcenter_counts.tolist() == [[3, 1], [0, 2]]
    assert head.dominant_subcenters().tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------
# ElasticFace
# ---------------------------------------------------------------------------------------------


def _elastic_problem():
    """Six samples at known target angles 0.2 .. 1.2 (theta + m stays below pi for any m <= pi/2)."""
    W = torch.eye(3, dtype=T64)[:2] * torch.tensor([[1.0], [2.0]], dtype=T64)
    angles = torch.tensor([0.7, 0.2, 1.2, 0.5, 1.0, 0.35], dtype=T64)
    x = torch.stack([torch.cos(angles), torch.zeros(6, dtype=T64), torch.sin(angles)], dim=1) * 3.0
    y = torch.zeros(6, dtype=torch.long)
    return x, W, y, angles


def _elastic(cls, seed, **kwargs):
    head = cls(2, 3, s=16.0, reduction="none", generator=torch.Generator().manual_seed(seed), dtype=T64, **kwargs)
    return head


def _recovered_margins(per_sample, x, W, y, loss, top):
    """Each sample's margin, found by bisection on the single-sample loss (increasing in m here)."""
    out = []
    for i in range(len(y)):
        low, high = 0.0, top
        for _ in range(60):
            middle = 0.5 * (low + high)
            value = loss(x[i : i + 1], W, y[i : i + 1], s=16.0, m=middle)
            low, high = (middle, high) if value < per_sample[i] else (low, middle)
        out.append(0.5 * (low + high))
    return np.array(out)


ELASTIC = [(ElasticArcFace, F.arcface_loss), (ElasticCosFace, F.cosface_loss)]


@pytest.mark.parametrize(("cls", "loss", "m"), [(*ELASTIC[0], 0.3), (*ELASTIC[1], 0.35)])
def test_elastic_heads_draw_reproducibly_and_eval_and_sigma_zero_are_the_plain_loss(cls, loss, m):
    """m = 0.3 and 0.35 have no exact float32 value: a draw made in float32 would not be m at sigma = 0."""
    x, W, y, _ = _elastic_problem()

    def run(head, train=True):
        with torch.no_grad():
            head.weight.copy_(W)
        head.train(train)
        return head(x.clone().requires_grad_(), y).detach()

    first, second = run(_elastic(cls, 3, m=m)), run(_elastic(cls, 3, m=m))
    assert torch.equal(first, second), "the same seed draws the same margins"
    assert not torch.equal(first, run(_elastic(cls, 4, m=m))), "another seed draws others"
    plain = loss(x, W, y, s=16.0, m=m, reduction="none")
    torch.testing.assert_close(run(_elastic(cls, 3, m=m), train=False), plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run(_elastic(cls, 3, m=m, sigma=0.0)), plain, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(first, plain), "a training forward with sigma > 0 draws"


@pytest.mark.parametrize(("cls", "loss", "top"), [(*ELASTIC[0], math.pi / 2), (*ELASTIC[1], 3.0)])
def test_elastic_plus_gives_the_largest_cosine_the_smallest_margin(cls, loss, top):
    x, W, y, angles = _elastic_problem()
    recovered = {}
    for plus in (False, True):
        head = _elastic(cls, 5, sigma=0.1, plus=plus)
        with torch.no_grad():
            head.weight.copy_(W)
        per_sample = head(x.clone().requires_grad_(), y).detach()
        recovered[plus] = _recovered_margins(per_sample, x, W, y, loss, top)
    # The same seed, the same draws: "+" only hands them out differently.
    assert_close(np.sort(recovered[True]), np.sort(recovered[False]), Tol(1e-8, 1e-8), "the same draws")
    by_cosine = np.argsort(angles.numpy())  # the largest cos theta_y first
    assert np.all(np.diff(recovered[True][by_cosine]) >= -1e-9), (recovered[True], angles)
    assert not np.all(np.diff(recovered[False][by_cosine]) >= -1e-9), "the control: without '+' the order is the draw's"


@pytest.mark.parametrize(("cls", "loss", "low", "high"), [(*ELASTIC[0], 0.0, math.pi / 2), (*ELASTIC[1], 0.0, None)])
def test_elastic_draws_are_clipped_to_the_margin_s_range(cls, loss, low, high):
    x, W, y, _ = _elastic_problem()
    head = _elastic(cls, 6, m=0.5, sigma=3.0)  # most draws fall outside [0, pi/2]
    with torch.no_grad():
        head.weight.copy_(W)
    per_sample = head(x.clone().requires_grad_(), y).detach()
    assert torch.isfinite(per_sample).all()
    top = high if high is not None else 20.0
    recovered = _recovered_margins(per_sample, x, W, y, loss, top)
    assert np.all(recovered >= low - 1e-9) and np.all(recovered <= top + 1e-9)
    assert np.any(np.abs(recovered - low) < 1e-9), ("some draw clipped at the bottom", recovered)
    if high is not None:
        assert np.any(np.abs(recovered - high) < 1e-9), ("some draw clipped at the top", recovered)


# ---------------------------------------------------------------------------------------------
# ShardedMarginHead: sub-centres and per-sample margins over 2 ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["subcenter", "per-sample", "per-class"])
def test_a_sharded_head_equals_one_process(case, sharded_runner):
    from tests.sharded_heads import K, class_margins, config_of, global_problem
    from torch_port.engine import margin_cross_entropy

    per_rank = sharded_runner.request(("head-case", case))
    x, W, y, margins = global_problem(K[case])
    if case == "per-class":  # the per-sample margins those of each row's class (ignored rows: any)
        margins = class_margins()[np.maximum(y, 0)]
    xs, Ws = torch.tensor(x, requires_grad=True), torch.tensor(W, requires_grad=True)
    expected = margin_cross_entropy(xs, Ws, torch.tensor(y), config_of(case, margins))
    expected.backward()
    for rank, got in enumerate(per_rank):
        assert_close(np.array(got["loss"]), expected.detach().numpy(), CLOSE, f"{case}: rank {rank}'s loss")
    assert_close(np.concatenate([got["x"] for got in per_rank]), xs.grad.numpy(), CLOSE, f"{case}: dx")
    assert_close(np.concatenate([got["W"] for got in per_rank]), Ws.grad.numpy(), CLOSE, f"{case}: dW")
    reference = refimpl.subcenter_arcface_loss(x, W, y, s=30.0, m=0.5, k=3) if case == "subcenter" else (
        refimpl.arcface_loss(x, W, y, s=30.0, m=margins)
    )
    assert_close(expected.detach().numpy(), reference, CLOSE, f"{case}: one process vs the reference")
