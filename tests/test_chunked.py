"""The memory-efficient (chunked) path of the margin engine against the plain path.

The plain path (``chunk_size=None``) builds the (B, C) logits and calls ``F.cross_entropy``; it is
itself checked against the float64 reference by the shared suites. The chunked path
(torch_port/chunked.py) must give the same loss and the same gradients for x, W and a learnable
scale, for every engine configuration, every reduction, any chunk size (dividing C or not, larger
than C, one class at a time) and any label layout (all labels in one chunk included).

"Equal" means, in float64: |chunked - plain| <= rtol * (max(1, max |plain|) + |plain|) elementwise,
the max over each compared tensor, rtol = 1e-10; in float32: the same bound with rtol = 1e-5
around the float64 truth, widened by 4x the float32 plain path's own distance from that truth
(where a gradient cancels to ~0, no float32 computation is within 1e-5 of it relatively).
Finite differences (gradcheck) give a third, independent route for the gradients. Further: the
stability cases of the plain path (cos = +-1, zero features and weights, s = 64 with large
features, half precision, autocast), a structural check that no (B, C)-sized tensor is ever
produced, and the argument checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import torch_port.functional as tpf
from tests import strategies as S
from tests.dispatch_probe import OpProbe
from tests.tolerances import Tol, assert_close
from torch_port import AMSoftmax, ArcFace, CombinedMargin, CosFace, LSoftmax, NormFace, SphereFace
from torch_port.chunked import CHUNK_BUDGET_BYTES, FEATURE_BLOCK_BYTES, MIN_CHUNK, chunk_size_for
from torch_port.engine import MarginConfig, margin_cross_entropy

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
BOUND = 3.0  # feature and weight entries; D <= 6, so |x|, |W_j| <= 7.4
MIN_NORM = 0.25  # drawn rows are kept away from the origin (zero rows are edge cases below)


def _arcface_target(m):
    return lambda cos_y, theta_y: torch.cos(theta_y + m)


# Engine configurations, one per kind of loss; the scale is supplied by the test.
CONFIGS = {
    "normface": lambda s: MarginConfig(scale=s),
    "cosface": lambda s: MarginConfig(target=lambda c, t: c - 0.35, scale=s),
    "arcface": lambda s: MarginConfig(target=_arcface_target(0.5), scale=s),
    "combined": lambda s: MarginConfig(target=lambda c, t: torch.cos(0.9 * t + 0.3) - 0.2, scale=s),
    "sphereface-like": lambda s: MarginConfig(target=lambda c, t: torch.cos(2.0 * t), scale=s, feature_norm=True),
    "lsoftmax-like": lambda s: MarginConfig(
        target=lambda c, t: torch.cos(2.0 * t) - 0.5, scale=s, feature_norm=True, weight_norm=True
    ),
}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """The project's comparison (tests/tolerances.py) with rtol = atol: relative to each element and
    to the compared tensor's largest element (at least 1), so gradients that cancel to rounding
    noise are compared at the scale of the problem, not at the scale of the noise."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    assert_close(actual.detach().double().numpy(), expected.detach().double().numpy(), Tol(rtol, rtol), what)


def loss_and_grads(x, W, y, config, reduction, chunk_size, cotangent=None):
    """The loss and d(sum(loss * cotangent))/d(x, W[, scale]) from fresh leaves."""
    x = x.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    leaves = [x, W]
    if isinstance(config.scale, torch.Tensor):
        scale = config.scale.detach().clone().requires_grad_()
        config = MarginConfig(config.target, scale, config.feature_norm, config.weight_norm)
        leaves.append(scale)
    loss = margin_cross_entropy(x, W, y, config, reduction, chunk_size=chunk_size)
    weighted = loss if cotangent is None else loss * cotangent
    return loss.detach(), torch.autograd.grad(weighted.sum(), leaves)


def _float32_noise_floor(x, W, config, reduction, cotangent) -> float:
    """16 float32 ulps of the largest intermediate a gradient is a difference of: the logit scale
    s (times |x| and |W| where the config keeps them) times the total upstream weight, over the
    smallest row norm (normalising a row divides its gradient by its norm). A gradient that is
    exactly 0 in truth (D = 1: a loss of x / |x| is flat in x) comes out as rounding noise of
    that size in float32 on any route; the plain path lands on 0 by luck of its roundings."""
    scale = abs(float(config.scale))
    if config.feature_norm:
        scale *= float(x.double().norm(dim=1).max())
    if config.weight_norm:
        scale *= float(W.double().norm(dim=1).max())
    weight = float(cotangent.abs().sum()) if cotangent is not None else (1.0 if reduction == "mean" else x.shape[0])
    norms = torch.cat([x.double().norm(dim=1), W.double().norm(dim=1)])
    smallest = max(float(norms[norms > 0].min()) if bool((norms > 0).any()) else 1.0, MIN_NORM)
    return 16 * torch.finfo(torch.float32).eps * scale * weight / min(1.0, smallest)


def assert_paths_agree(x, W, y, config, reduction, chunk_size, cotangent=None):
    """float64: chunked == plain to 1e-10. float32: chunked is within 1e-5 of the float64 truth, or
    at least no farther from it than 4x the float32 plain path's own error (where the exact value
    cancels to ~0, e.g. dx of a loss flat in x, no float32 route gets a relative error of 1e-5),
    plus the float32 noise floor of the problem's intermediates (_float32_noise_floor; found by the
    thorough profile: D = 1, dx exactly 0, plain float32 0 by luck, chunked 1.5e-5 = 1 ulp of s/|x|)."""
    plain_loss, plain_grads = loss_and_grads(x, W, y, config, reduction, None, cotangent)
    loss, grads = loss_and_grads(x, W, y, config, reduction, chunk_size, cotangent)
    got, plain = (loss, *grads), (plain_loss, *plain_grads)
    names = ("loss", "dx", "dW", "ds")
    if x.dtype == torch.float64:
        for name, a, b in zip(names, got, plain):
            assert_matches(a, b, RTOL[torch.float64], name)
        return
    scale = config.scale.double() if isinstance(config.scale, torch.Tensor) else config.scale
    config64 = MarginConfig(config.target, scale, config.feature_norm, config.weight_norm)
    cotangent64 = None if cotangent is None else cotangent.double()
    truth_loss, truth_grads = loss_and_grads(x.double(), W.double(), y, config64, reduction, None, cotangent64)
    floor = _float32_noise_floor(x, W, config, reduction, cotangent)
    for name, a, b, truth in zip(names, got, plain, (truth_loss, *truth_grads)):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values {a}"
        a, b, truth = a.double(), b.double(), truth.double()
        rtol = RTOL[torch.float32]
        allowed = rtol * (max(1.0, float(truth.abs().max())) + truth.abs()) + 4 * float((b - truth).abs().max())
        allowed = allowed + (floor if name != "loss" else 0.0)
        err = (a - truth).abs()
        assert (err <= allowed).all(), (
            f"{name}: chunked float32 is {float(err.max()):.3g} from the float64 truth, plain float32 "
            f"{float((b - truth).abs().max()):.3g}"
        )


def _away_from_origin(rows: np.ndarray) -> np.ndarray:
    rows = rows.copy()
    rows[np.linalg.norm(rows, axis=1) < MIN_NORM, 0] = 1.0
    return rows


@st.composite
def problems(draw, max_classes: int = 40):
    """(x, W, y, chunk_size): B <= 6, C <= 40, D <= 6, chunk in 1..50, a quarter of the time every
    label inside one chunk."""
    batch, classes = draw(S.batch_and_classes(max_batch=6, max_classes=max_classes))
    dim = draw(st.integers(1, 6))
    chunk = draw(st.integers(1, 50))
    x = _away_from_origin(draw(S.float_arrays((batch, dim), -BOUND, BOUND)))
    W = _away_from_origin(draw(S.float_arrays((classes, dim), -BOUND, BOUND)))
    if draw(st.booleans()) and draw(st.booleans()):
        start = draw(st.integers(0, (classes - 1) // chunk)) * chunk
        y = draw(S.labels(batch, min(chunk, classes - start))) + start
    else:
        y = draw(S.labels(batch, classes))
    return x, W, y, chunk


@given(
    problem=problems(),
    kind=st.sampled_from(sorted(CONFIGS)),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scale=S.finite_floats(1.0, 64.0),
    learnable=st.booleans(),
)
def test_chunked_equals_plain(problem, kind, dtype, reduction, scale, learnable):
    x, W, y, chunk = problem
    x, W, y = torch.tensor(x, dtype=dtype), torch.tensor(W, dtype=dtype), torch.tensor(y)
    config = CONFIGS[kind](torch.tensor(scale, dtype=dtype) if learnable else scale)
    # Non-uniform upstream gradients for "none": the backward may not assume a mean.
    cotangent = torch.linspace(0.5, 1.5, x.shape[0], dtype=dtype) if reduction == "none" else None
    assert_paths_agree(x, W, y, config, reduction, chunk, cotangent)


@settings(max_examples=10)
@given(problem=problems(max_classes=12), kind=st.sampled_from(sorted(CONFIGS)))
def test_chunked_gradients_match_finite_differences(problem, kind):
    """A route independent of both paths: central differences on x, W and a learnable scale.

    Away from the cone points theta_y = 0 and pi (where the margins have a kink and the engine's
    gradient is a convention, checked against the plain path above, not a derivative)."""
    x, W, y, chunk = problem
    target_rows = W[y]
    cos_y = np.sum(x * target_rows, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(target_rows, axis=1))
    assume(np.all(np.abs(cos_y) < 1 - 1e-6))
    y = torch.tensor(y)
    config = CONFIGS[kind](1.0)

    def loss(x, W, s):
        cfg = MarginConfig(config.target, s, config.feature_norm, config.weight_norm)
        return margin_cross_entropy(x, W, y, cfg, "none", chunk_size=chunk)

    inputs = (
        torch.tensor(x, requires_grad=True),
        torch.tensor(W, requires_grad=True),
        torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(loss, inputs)


def test_single_class_and_one_chunk_per_class():
    """C = 1 (no competitor: loss 0, zero gradients) and chunk 1 over many classes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    config = CONFIGS["arcface"](8.0)
    assert_paths_agree(
        x, torch.randn(1, 3, dtype=torch.float64, generator=gen), torch.zeros(4, dtype=torch.long), config, "mean", 5
    )
    W = torch.randn(30, 3, dtype=torch.float64, generator=gen)
    assert_paths_agree(x, W, torch.tensor([0, 29, 7, 7]), config, "sum", 1)
    loss, (dx, dW) = loss_and_grads(x, W[:1], torch.zeros(4, dtype=torch.long), config, "mean", 3)
    assert float(loss) == 0.0 and not dx.any() and not dW.any()


# ---- stability: the plain path's edge cases, on the chunked path ------------------------------------


def _edge_problems():
    """(name, x, W, y, config): cos = +-1, zero rows, huge logits; all in float64."""
    d = torch.float64
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]], dtype=d)
    at_poles = torch.tensor([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -1.0]], dtype=d)
    pole_labels = torch.tensor([0, 0, 1, 3])  # cos_y = 1, -1, 1, -1
    yield "cos=+-1", at_poles, W, pole_labels, CONFIGS["arcface"](64.0)
    yield "cos=+-1 combined", at_poles, W, pole_labels, CONFIGS["combined"](64.0)
    zero_x = at_poles.clone()
    zero_x[1] = 0.0
    yield "zero feature", zero_x, W, pole_labels, CONFIGS["cosface"](64.0)
    yield "zero feature, |x| kept", zero_x, W, pole_labels, CONFIGS["sphereface-like"](1.0)
    zero_w = W.clone()
    zero_w[3] = 0.0
    yield "zero class weight", at_poles + 0.1, zero_w, pole_labels, CONFIGS["normface"](16.0)
    yield "zero class weight, |W| kept", at_poles + 0.1, zero_w, pole_labels, CONFIGS["lsoftmax-like"](1.0)
    tiny_w = W.clone()
    tiny_w[3] = torch.tensor([3e-13, -4e-13, 0.0], dtype=d)  # 0 < |W_j| < eps: max(|W_j|, eps) is flat
    yield "class weight below eps, |W| kept", at_poles + 0.1, tiny_w, pole_labels, CONFIGS["lsoftmax-like"](1.0)
    big = torch.tensor([[1e4, 2e3, -5e3], [-7e3, 1e4, 1e2], [3e3, -3e3, 1e4], [1e4, 1e4, 1e4]], dtype=d)
    yield "s=64, |x|~1e4 (logits ~1e6)", big, W, torch.tensor([0, 1, 3, 4]), CONFIGS["sphereface-like"](64.0)
    yield "s=64, |x||W|~1e4", big, W, torch.tensor([2, 1, 3, 4]), CONFIGS["lsoftmax-like"](64.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(_edge_problems()), ids=lambda case: case[0])
def test_stability_edge_cases(case, dtype):
    """Finite, and equal to the plain path, on every degenerate input; every reduction."""
    _, x, W, y, config = case
    for reduction, chunk in (("mean", 2), ("none", 3), ("sum", 100)):
        cotangent = torch.linspace(0.5, 1.5, x.shape[0], dtype=dtype) if reduction == "none" else None
        assert_paths_agree(x.to(dtype), W.to(dtype), y, config, reduction, chunk, cotangent)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_inputs_upcast(half):
    """Half inputs compute in float32 on both paths: a float32 loss, gradients in the inputs' dtype."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 16, generator=gen) * 30).to(half)
    W = torch.randn(50, 16, generator=gen).to(half)
    y = torch.randint(0, 50, (6,), generator=gen)
    plain_loss, plain_grads = loss_and_grads(x, W, y, CONFIGS["arcface"](64.0), "mean", None)
    loss, grads = loss_and_grads(x, W, y, CONFIGS["arcface"](64.0), "mean", 7)
    assert loss.dtype == torch.float32
    assert_matches(loss, plain_loss, 1e-5, "loss")
    eps = torch.finfo(half).eps  # the gradient is rounded to the input's dtype on the way out
    for got, expected in zip(grads, plain_grads):
        assert got.dtype == half
        assert_matches(got, expected, eps, "grad")


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_disabled_inside(autocast_dtype):
    """Under autocast the chunked path still computes in float32: bit-for-bit the same as without."""
    gen = torch.Generator().manual_seed(2)
    x, W = torch.randn(5, 32, generator=gen) * 100, torch.randn(300, 32, generator=gen)
    y = torch.randint(0, 300, (5,), generator=gen)
    config = CONFIGS["arcface"](64.0)
    loss, grads = loss_and_grads(x, W, y, config, "mean", 64)
    with torch.autocast("cpu", dtype=autocast_dtype):
        auto_loss, auto_grads = loss_and_grads(x, W, y, config, "mean", 64)
    assert auto_loss.dtype == torch.float32
    assert torch.equal(auto_loss, loss)
    for got, expected in zip(auto_grads, grads):
        assert torch.equal(got, expected)


# ---- memory: no (B, C) tensor, inputs untouched ----------------------------------------------------


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("kind", ["arcface", "lsoftmax-like"])
def test_no_batch_by_class_tensor_is_produced(kind, learnable):
    """Forward and backward never create a tensor of B*C elements: the largest is the (C, D)
    gradient of W (D < B here), or a (B, chunk) block. The plain path is the positive control."""
    batch, classes, dim, chunk = 64, 1000, 8, 100
    gen = torch.Generator().manual_seed(3)
    x, W = torch.randn(batch, dim, generator=gen), torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    scale = torch.tensor(30.0, requires_grad=True) if learnable else 30.0
    config = CONFIGS[kind](scale)
    for chunk_size, limit in ((chunk, max(classes * dim, batch * chunk)), (None, None)):
        xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
        with OpProbe() as probe:
            margin_cross_entropy(xs, Ws, y, config, "mean", chunk_size=chunk_size).backward()
        if limit is None:
            assert probe.largest >= batch * classes  # the probe sees the plain path's logits
        else:
            assert probe.largest <= limit < batch * classes


@pytest.mark.parametrize(
    ("classes", "chunk", "products"),
    [(10, 10, 3), (10, 64, 3), (10, 5, 7), (10, 3, 15), (10, 1, 39)],
)
def test_products_per_step(classes, chunk, products):
    """Forward + backward does 4n - 1 matrix products for n chunks: one per chunk in forward, and in
    backward G^T u and G W per chunk plus the recomputation of every chunk's logits but the last
    (kept from forward). With C <= chunk_size that is 3, the plain path's count."""
    gen = torch.Generator().manual_seed(6)
    x, W = torch.randn(4, 3, generator=gen, requires_grad=True), torch.randn(classes, 3, generator=gen)
    W.requires_grad_()
    y = torch.tensor([0, 9, 4, 4])
    with OpProbe() as probe:
        margin_cross_entropy(x, W, y, CONFIGS["arcface"](8.0), chunk_size=chunk).backward()
    assert probe.products == products


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_batches_larger_than_a_feature_block(kind):
    """The feature side runs blocks of rows (FEATURE_BLOCK_BYTES): a batch of two full blocks and a
    partial one, with a learnable scale (its gradient summed over the blocks), equals the plain path."""
    dim = 4
    batch = 2 * (FEATURE_BLOCK_BYTES["cpu"] // (4 * dim)) + 3
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(batch, dim, dtype=torch.float64, generator=gen)
    W = torch.randn(50, dim, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 50, (batch,), generator=gen)
    cotangent = torch.linspace(0.5, 1.5, batch, dtype=torch.float64)
    config = CONFIGS[kind](torch.tensor(4.0, dtype=torch.float64))
    assert_paths_agree(x, W, y, config, "none", 7, cotangent)


def test_repeated_backward_is_bit_identical():
    """retain_graph=True: the first backward uses the kept last block, the second recomputes it;
    both give the same bits (the order of summation does not depend on which happened)."""
    gen = torch.Generator().manual_seed(7)
    x, W = torch.randn(5, 4, generator=gen, requires_grad=True), torch.randn(23, 4, generator=gen)
    W.requires_grad_()
    scale = torch.tensor(16.0, requires_grad=True)
    loss = margin_cross_entropy(x, W, torch.tensor([0, 22, 7, 7, 21]), CONFIGS["lsoftmax-like"](scale), "sum", 6)
    first = torch.autograd.grad(loss, (x, W, scale), retain_graph=True)
    second = torch.autograd.grad(loss, (x, W, scale))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(4)
    x, W = torch.randn(4, 5, generator=gen), torch.randn(33, 5, generator=gen)
    y = torch.randint(0, 33, (4,), generator=gen)
    scale = torch.tensor(8.0, requires_grad=True)
    before = (x.clone(), W.clone(), y.clone(), scale.detach().clone())
    x.requires_grad_()
    W.requires_grad_()
    margin_cross_entropy(x, W, y, CONFIGS["lsoftmax-like"](scale), "none", chunk_size=4).sum().backward()
    for now, then in zip((x, W, y, scale), before):
        assert torch.equal(now.detach(), then)


def test_weights_changed_between_forward_and_backward_are_caught():
    """The backward recomputes the logits from x and W: an in-place update of W in between (an
    optimizer step before backward) must raise autograd's version error, not give a wrong gradient."""
    W = torch.randn(12, 3, requires_grad=True)
    loss = margin_cross_entropy(
        torch.randn(4, 3), W, torch.tensor([0, 1, 2, 11]), MarginConfig(scale=8.0), chunk_size=5
    )
    with torch.no_grad():
        W.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_and_partial_grads():
    """Without autograd the loss is the same; with only W (or only x) requiring grad, that one grad."""
    gen = torch.Generator().manual_seed(5)
    x, W = torch.randn(4, 5, dtype=torch.float64, generator=gen), torch.randn(20, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 20, (4,), generator=gen)
    config = CONFIGS["cosface"](16.0)
    plain_loss, (plain_dx, plain_dW) = loss_and_grads(x, W, y, config, "mean", None)
    with torch.no_grad():
        assert_matches(margin_cross_entropy(x, W, y, config, chunk_size=6), plain_loss, 1e-10, "no_grad loss")
    Wl = W.clone().requires_grad_()
    margin_cross_entropy(x, Wl, y, config, chunk_size=6).backward()
    assert_matches(Wl.grad, plain_dW, 1e-10, "dW alone")
    xl = x.clone().requires_grad_()
    margin_cross_entropy(xl, W, y, config, chunk_size=6).backward()
    assert_matches(xl.grad, plain_dx, 1e-10, "dx alone")


# ---- the functional losses and heads pass chunk_size through ------------------------------------------

FUNCTIONAL = {
    "normface_loss": (tpf.normface_loss, {"s": 16.0}),
    "cosface_loss": (tpf.cosface_loss, {"s": 64.0, "m": 0.35}),
    "am_softmax_loss": (tpf.am_softmax_loss, {"s": 30.0, "m": 0.35}),
    "arcface_loss": (tpf.arcface_loss, {"s": 64.0, "m": 0.5}),
    "arcface_loss-easy": (tpf.arcface_loss, {"s": 32.0, "m": 0.5, "easy_margin": True}),
    # m1 theta + m2 passes pi for theta > 2.28: the monotone extension is exercised as well.
    "combined_margin_loss": (tpf.combined_margin_loss, {"s": 64.0, "m1": 1.2, "m2": 0.4, "m3": 0.15}),
    "lsoftmax_loss": (tpf.lsoftmax_loss, {"m": 4, "beta": 0.5}),
    "sphereface_loss": (tpf.sphereface_loss, {"m": 3, "lamb": 0.0}),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
@settings(max_examples=10)
@given(problem=problems(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_functional_losses_take_chunk_size(name, problem, reduction):
    """Every margin loss of torch_port.functional: chunk_size=k gives chunk_size=None's loss and grads."""
    loss_fn, kwargs = FUNCTIONAL[name]
    x, W, y, chunk = problem
    results = []
    for chunk_size in (None, chunk):
        xs, Ws = torch.tensor(x, requires_grad=True), torch.tensor(W, requires_grad=True)
        loss = loss_fn(xs, Ws, torch.tensor(y), **kwargs, reduction=reduction, chunk_size=chunk_size)
        cotangent = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        results.append((loss.detach(), *torch.autograd.grad((loss * cotangent).sum(), (xs, Ws))))
    for what, got, expected in zip(("loss", "dx", "dW"), results[1], results[0]):
        assert_matches(got, expected, RTOL[torch.float64], f"{name} {what}")


HEADS = {
    "NormFace": lambda **kw: NormFace(37, 6, s=16.0, **kw),
    "NormFace-learned-scale": lambda **kw: NormFace(37, 6, s=16.0, learn_scale=True, **kw),
    "CosFace": lambda **kw: CosFace(37, 6, **kw),
    "AMSoftmax": lambda **kw: AMSoftmax(37, 6, **kw),
    "ArcFace": lambda **kw: ArcFace(37, 6, **kw),
    "CombinedMargin": lambda **kw: CombinedMargin(37, 6, m1=1.2, m2=0.4, m3=0.15, **kw),
    "LSoftmax": lambda **kw: LSoftmax(37, 6, m=4, **kw),
    "SphereFace": lambda **kw: SphereFace(37, 6, m=4, **kw),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_take_chunk_size(name, reduction):
    """Every margin head: the same loss and gradients (weight, learnable scale, features) chunked."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen) * 3
    y = torch.tensor([0, 36, 12, 12, 5])
    heads = [HEADS[name](chunk_size=chunk, reduction=reduction, dtype=torch.float64) for chunk in (None, 8)]
    heads[1].load_state_dict(heads[0].state_dict())
    results = []
    for head in heads:
        features = x.clone().requires_grad_()
        loss = head(features, y)
        loss.sum().backward()
        grads = {name: p.grad for name, p in head.named_parameters()}
        results.append((loss.detach(), features.grad, grads))
    (plain_loss, plain_dx, plain_grads), (loss, dx, grads) = results
    assert_matches(loss, plain_loss, RTOL[torch.float64], f"{name} loss")
    assert_matches(dx, plain_dx, RTOL[torch.float64], f"{name} d/dx")
    assert grads.keys() == plain_grads.keys()
    for param in grads:
        assert_matches(grads[param], plain_grads[param], RTOL[torch.float64], f"{name} d/d{param}")


# ---- arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "error"),
    [(0, ValueError), (-3, ValueError), (2.5, ValueError), ("8", TypeError), (True, TypeError), (None, None)],
)
def test_chunk_size_is_checked_first(chunk_size, error):
    W = torch.randn(10, 4, requires_grad=True)
    x = torch.randn(3, 4)
    bad_labels = torch.tensor([0, 1, 99])  # invalid too: the chunk_size error must come first
    if error is None:
        with pytest.raises(ValueError, match="y must lie"):
            margin_cross_entropy(x, W, bad_labels, MarginConfig(), chunk_size=chunk_size)
        return
    with pytest.raises(error, match="chunk_size"):
        margin_cross_entropy(x, W, bad_labels, MarginConfig(), chunk_size=chunk_size)
    with pytest.raises(error, match="chunk_size"):
        SphereFace(10, 4, chunk_size=chunk_size)
    assert W.grad is None


def test_integral_float_chunk_size_is_accepted():
    gen = torch.Generator().manual_seed(7)
    x, W = torch.randn(3, 4, dtype=torch.float64, generator=gen), torch.randn(10, 4, dtype=torch.float64, generator=gen)
    y = torch.tensor([1, 2, 9])
    assert_paths_agree(x, W, y, MarginConfig(scale=4.0), "mean", 4.0)


@given(batch=st.integers(1, 10**5), classes=st.integers(1, 10**7), budget=st.floats(1.0, 1e10))
def test_chunk_size_for_fits_the_budget(batch, classes, budget):
    k = chunk_size_for(batch, classes, budget_bytes=budget)
    assert 1 <= k <= classes
    # the largest k whose float32 (B, k) block fits, unless clipped to C or raised to the minimum
    assert k == classes or k == MIN_CHUNK or 4 * batch * k <= budget < 4 * batch * (k + 1)


def test_chunk_size_for_defaults_by_device():
    assert chunk_size_for(256, 10**6) == CHUNK_BUDGET_BYTES["cpu"] // (4 * 256) == 512
    assert chunk_size_for(4096, 10**6, device=torch.device("cuda")) == CHUNK_BUDGET_BYTES["cuda"] // (4 * 4096)
    assert chunk_size_for(256, 300) == 300
    assert chunk_size_for(10**5, 10**6) == MIN_CHUNK


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "name"),
    [
        ((0, 10), {}, ValueError, "batch_size"),
        ((4, 0), {}, ValueError, "num_classes"),
        ((4, 10), {"budget_bytes": -1.0}, ValueError, "budget_bytes"),
        ((4.5, 10), {}, ValueError, "batch_size"),
    ],
)
def test_chunk_size_for_checks_arguments(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        chunk_size_for(*args, **kwargs)


def test_rounding_of_a_large_problem_matches_float64_truth():
    """At B = 32, C = 5000 in float32 the chunked loss is no farther from the float64 plain loss than
    the float32 plain loss is (times 2): summing in chunks costs no accuracy."""
    gen = torch.Generator().manual_seed(8)
    x, W = (
        torch.randn(32, 24, dtype=torch.float64, generator=gen),
        torch.randn(5000, 24, dtype=torch.float64, generator=gen),
    )
    y = torch.randint(0, 5000, (32,), generator=gen)
    config = CONFIGS["arcface"](64.0)
    truth = margin_cross_entropy(x, W, y, config, "none")
    plain32 = margin_cross_entropy(x.float(), W.float(), y, config, "none").double()
    chunked32 = margin_cross_entropy(x.float(), W.float(), y, config, "none", chunk_size=333).double()
    plain_err = float((plain32 - truth).abs().max())
    chunked_err = float((chunked32 - truth).abs().max())
    eps = torch.finfo(torch.float32).eps
    assert chunked_err <= max(2 * plain_err, 4 * eps * float(truth.abs().max())), (chunked_err, plain_err)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_paths_agree_on_each_device(kind, dtype, device):
    """The chunked path equals the plain path on every device the machine has, with a learnable
    scale, several chunks (the last partial) and a batch larger than a CPU feature block at D = 512
    (so the row blocks are exercised where they apply)."""
    batch, classes, dim = 70, 1000, 512
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(batch, dim, dtype=dtype, generator=gen).to(device)
    W = torch.randn(classes, dim, dtype=dtype, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    config = CONFIGS[kind](torch.tensor(8.0, dtype=dtype, device=device))
    assert_paths_agree(x, W, y, config, "mean", 96)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_inputs_agree_on_each_device(device):
    """bfloat16 x and W (the CUDA benchmark's inputs): both paths compute in float32 and return
    bfloat16 gradients; they agree to a bfloat16 rounding of each other."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(70, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    W = (0.05 * torch.randn(1000, 64, generator=gen)).to(device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (70,), generator=gen).to(device)
    config = CONFIGS["arcface"](30.0)
    plain_loss, plain_grads = loss_and_grads(x, W, y, config, "mean", None)
    loss, grads = loss_and_grads(x, W, y, config, "mean", 96)
    assert loss.dtype == plain_loss.dtype == torch.float32
    assert torch.allclose(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, plain_grads):
        assert a.dtype == b.dtype == torch.bfloat16
        assert_matches(a.float().cpu(), b.float().cpu(), 1e-2, "bfloat16 gradient")
