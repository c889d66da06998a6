"""The memory-efficient (chunked) path of the margin engine: what is specific to it.

The chunked path's agreement with the float64 reference (values, gradients, edge cases, half
precision, autocast) for every margin loss of the registry, at chunk sizes 1, 3 and > C, is a path
of the shared suites (tests/test_shared_suites.py, tests/paths.py). Here, with the losses taken from
the registry (a margin record's ``config`` of its hyperparameters, its ``head``):

- the chunked path equals the plain path (``chunk_size=None``) over more classes and chunk sizes
  than the registry's samples hold (C up to 40, any chunk size, every label inside one chunk), with
  a learnable scale (a record's configuration whose ``scale`` is a 0-d tensor leaf), whose gradient
  is also checked against central differences on the chunked path;
- its structure: no (B, C) tensor (a dispatch probe, with the plain path as positive control),
  4n - 1 matrix products per step, repeated backward bit-identical, inputs untouched, an in-place
  change of W between forward and backward caught, partial gradients and no_grad, batches larger
  than a feature block, bit-identical results under autocast;
- the heads pass chunk_size through; the chunk_size checks; chunk_size_for; every device present;
  the rounding of a large problem;
- on peaked (trained-like) inputs whose softmax numerators fall in the subnormal band, the chunked
  path computes no subnormal number (a dispatch probe, the plain path as positive control) and
  still agrees with the plain path.

Comparisons (tests/tolerances.py): in float64 chunked == plain to PATH_AGREEMENT (1e-10, relative to
each element and to the tensor's largest, at least 1); in float32 the chunked result must be no
farther from the float64 truth than the plain float32 path allows (``assert_no_farther_than_plain``
with PATH_AGREEMENT's 1e-5 and the float32 noise floor).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import strategies as S
from tests.dispatch_probe import OpProbe, SubnormalProbe
from tests.registry import BY_NAME, RECORDS
from tests.tolerances import (
    PATH_AGREEMENT,
    Tol,
    assert_close,
    assert_no_farther_than_plain,
    float32_noise_floor,
)
from torch_port.chunked import FEATURE_BLOCK_BYTES, MIN_CHUNK, chunk_size_for
from torch_port.engine import MarginConfig, margin_cross_entropy

# Every margin loss of the registry: the records the engine computes (they have a configuration).
# These tests build W as (C, D); sub-centre records (C k rows) run on every path in
# tests/test_shared_suites.py and tests/test_modern_margins.py.
MARGIN_RECORDS = [record for record in RECORDS if record.config is not None and record.rows_per_class == 1]
BOUND = 3.0  # feature and weight entries; D <= 6, so |x|, |W_j| <= 7.4
MIN_NORM = 0.25  # drawn rows are kept away from the origin (zero rows are edge cases of the records)
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32"}


def default_config(name: str) -> MarginConfig:
    """The engine configuration of a registry loss at its defaults (the papers' hyperparameters)."""
    record = BY_NAME[name]
    return record.config(record.defaults)


def with_learnable_scale(config: MarginConfig, value: float, dtype=torch.float64, device="cpu") -> MarginConfig:
    """The same loss with a learnable scale: ``scale`` a 0-d tensor (a fresh leaf is made of it by
    ``loss_and_grads``). For the L-Softmax and SphereFace configurations, which have no scale, this
    multiplies every logit by it: a loss of the engine, if not of a paper."""
    return dataclasses.replace(config, scale=torch.tensor(value, dtype=dtype, device=device))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """tests/tolerances.py's comparison with rtol = atol: relative to each element and to the
    compared tensor's largest element (at least 1), so gradients that cancel to rounding noise are
    compared at the scale of the problem, not at the scale of the noise."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    assert_close(
        actual.detach().double().cpu().numpy(), expected.detach().double().cpu().numpy(), Tol(rtol, rtol), what
    )


def loss_and_grads(x, W, y, config, reduction, chunk_size, cotangent=None):
    """The loss and d(sum(loss * cotangent))/d(x, W[, scale]) from fresh leaves."""
    x = x.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    leaves = [x, W]
    if isinstance(config.scale, torch.Tensor):
        scale = config.scale.detach().clone().requires_grad_()
        config = dataclasses.replace(config, scale=scale)
        leaves.append(scale)
    loss = margin_cross_entropy(x, W, y, config, reduction, chunk_size=chunk_size)
    weighted = loss if cotangent is None else loss * cotangent
    return loss.detach(), torch.autograd.grad(weighted.sum(), leaves)


def _upstream(x, reduction, cotangent) -> float:
    if cotangent is not None:
        return float(cotangent.abs().sum())
    return 1.0 if reduction == "mean" else float(x.shape[0])


def assert_paths_agree(x, W, y, config, reduction, chunk_size, cotangent=None):
    """float64: chunked == plain to PATH_AGREEMENT. float32: chunked no farther from the float64
    truth (the plain path in float64) than the plain float32 path allows."""
    plain_loss, plain_grads = loss_and_grads(x, W, y, config, reduction, None, cotangent)
    loss, grads = loss_and_grads(x, W, y, config, reduction, chunk_size, cotangent)
    got, plain = (loss, *grads), (plain_loss, *plain_grads)
    names = ("loss", "dx", "dW", "ds")
    if x.dtype == torch.float64:
        for name, a, b in zip(names, got, plain):
            assert_matches(a, b, PATH_AGREEMENT["float64"].rtol, name)
        return
    scale = config.scale.double() if isinstance(config.scale, torch.Tensor) else config.scale
    config64 = dataclasses.replace(config, scale=scale)
    cotangent64 = None if cotangent is None else cotangent.double()
    truth_loss, truth_grads = loss_and_grads(x.double(), W.double(), y, config64, reduction, None, cotangent64)
    x_np, W_np = x.double().cpu().numpy(), W.double().cpu().numpy()
    upstream = _upstream(x, reduction, cotangent)
    floors = {name: float32_noise_floor(config, x_np, W_np, upstream, wrt) for name, wrt in (("dx", "x"), ("dW", "W"))}
    floors["loss"], floors["ds"] = 0.0, max(floors["dx"], floors["dW"])
    for name, a, b, truth in zip(names, got, plain, (truth_loss, *truth_grads)):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_no_farther_than_plain(
            a.double().cpu().numpy(),
            b.double().cpu().numpy(),
            truth.double().cpu().numpy(),
            PATH_AGREEMENT["float32"],
            floors[name],
            f"chunked float32 {name}",
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


@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
@given(
    data=st.data(),
    problem=problems(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    learnable=st.booleans(),
)
def test_chunked_equals_plain(record, data, problem, dtype, reduction, learnable):
    """Any chunk size (dividing C or not, above C, one class at a time), any label layout, the
    record's hyperparameters drawn over their range, a fixed or a learnable scale."""
    x, W, y, chunk = problem
    x, W, y = torch.tensor(x, dtype=dtype), torch.tensor(W, dtype=dtype), torch.tensor(y)
    config = record.config(data.draw(record.keyword_free_samples(), label="hyperparameters").kwargs)
    if learnable:
        config = with_learnable_scale(config, data.draw(S.finite_floats(1.0, 64.0), label="scale"), dtype)
    # Non-uniform upstream gradients for "none": the backward may not assume a mean.
    cotangent = torch.linspace(0.5, 1.5, x.shape[0], dtype=dtype) if reduction == "none" else None
    assert_paths_agree(x, W, y, config, reduction, chunk, cotangent)


@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
@settings(max_examples=10)  # gradcheck: two chunked evaluations per input element, 7 records
@given(data=st.data())
def test_learnable_scale_gradient_matches_finite_differences(record, data):
    """A route independent of both paths for a learnable scale (and x, W with it): central
    differences of the chunked loss, on the record's samples (which keep every target angle away
    from the cone points and the jumps of psi, where the loss has no derivative)."""
    sample = data.draw(record.keyword_free_samples(), label="sample")
    classes = sample.tensors["W"].shape[0]
    chunk = data.draw(st.integers(1, classes + 1), label="chunk_size")
    config = record.config(sample.kwargs)
    start = 1.0 if config.scale is None else float(config.scale)
    y = torch.as_tensor(sample.labels["y"])

    def loss(x, W, s):
        return margin_cross_entropy(x, W, y, dataclasses.replace(config, scale=s), "none", chunk_size=chunk)

    inputs = (
        torch.tensor(sample.tensors["x"], requires_grad=True),
        torch.tensor(sample.tensors["W"], requires_grad=True),
        torch.tensor(start, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_autocast_is_disabled_inside(record, autocast_dtype):
    """Under autocast the chunked path still computes in float32: bit-for-bit the same as without."""
    gen = torch.Generator().manual_seed(2)
    x, W = torch.randn(5, 32, generator=gen) * 100, torch.randn(300, 32, generator=gen)
    y = torch.randint(0, 300, (5,), generator=gen)
    config = record.config(record.defaults)
    loss, grads = loss_and_grads(x, W, y, config, "mean", 64)
    with torch.autocast("cpu", dtype=autocast_dtype):
        auto_loss, auto_grads = loss_and_grads(x, W, y, config, "mean", 64)
    assert auto_loss.dtype == torch.float32
    assert torch.equal(auto_loss, loss)
    for got, expected in zip(auto_grads, grads):
        assert torch.equal(got, expected)


# ---- memory: no (B, C) tensor, inputs untouched ----------------------------------------------------


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_no_batch_by_class_tensor_is_produced(record, learnable):
    """Forward and backward never create a tensor of B*C elements: the largest is the (C, D)
    gradient of W (D < B here), or a (B, chunk) block. The plain path is the positive control."""
    batch, classes, dim, chunk = 64, 1000, 8, 100
    gen = torch.Generator().manual_seed(3)
    x, W = torch.randn(batch, dim, generator=gen), torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    config = record.config(record.defaults)
    if learnable:
        config = dataclasses.replace(config, scale=torch.tensor(30.0, requires_grad=True))
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
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_products_per_step(record, classes, chunk, products):
    """Forward + backward does 4n - 1 matrix products for n chunks: one per chunk in forward, and in
    backward G^T u and G W per chunk plus the recomputation of every chunk's logits but the last
    (kept from forward). With C <= chunk_size that is 3, the plain path's count."""
    gen = torch.Generator().manual_seed(6)
    x, W = torch.randn(4, 3, generator=gen, requires_grad=True), torch.randn(classes, 3, generator=gen)
    W.requires_grad_()
    y = torch.tensor([0, 9, 4, 4])
    config = record.config(record.defaults)
    # CurricularFace's hard negatives compare with a threshold from the target side, computed before
    # the chunks (torch_port/chunked_generic.py): one more product (the target cosines) per step
    extra = 1 if getattr(config.target, "modulates_negatives", False) else 0
    with OpProbe() as probe:
        margin_cross_entropy(x, W, y, config, chunk_size=chunk).backward()
    assert probe.products == products + extra


@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_batches_larger_than_a_feature_block(record):
    """The feature side runs blocks of rows (FEATURE_BLOCK_BYTES): a batch of two full blocks and a
    partial one, with a learnable scale (its gradient summed over the blocks), equals the plain path."""
    dim = 4
    batch = 2 * (FEATURE_BLOCK_BYTES["cpu"] // (4 * dim)) + 3
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(batch, dim, dtype=torch.float64, generator=gen)
    W = torch.randn(50, dim, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 50, (batch,), generator=gen)
    cotangent = torch.linspace(0.5, 1.5, batch, dtype=torch.float64)
    config = with_learnable_scale(record.config(record.defaults), 4.0)
    assert_paths_agree(x, W, y, config, "none", 7, cotangent)


def test_repeated_backward_is_bit_identical():
    """retain_graph=True: the first backward uses the kept last block, the second recomputes it;
    both give the same bits (the order of summation does not depend on which happened)."""
    gen = torch.Generator().manual_seed(7)
    x, W = torch.randn(5, 4, generator=gen, requires_grad=True), torch.randn(23, 4, generator=gen)
    W.requires_grad_()
    scale = torch.tensor(16.0, requires_grad=True)
    config = dataclasses.replace(default_config("lsoftmax_loss"), scale=scale)
    loss = margin_cross_entropy(x, W, torch.tensor([0, 22, 7, 7, 21]), config, "sum", 6)
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
    config = dataclasses.replace(default_config("lsoftmax_loss"), scale=scale)
    margin_cross_entropy(x, W, y, config, "none", chunk_size=4).sum().backward()
    for now, then in zip((x, W, y, scale), before):
        assert torch.equal(now.detach(), then)


def test_weights_changed_between_forward_and_backward_are_caught():
    """The backward recomputes the logits from x and W: an in-place update of W in between (an
    optimizer step before backward) must raise autograd's version error, not give a wrong gradient."""
    W = torch.randn(12, 3, requires_grad=True)
    config = default_config("normface_loss")
    loss = margin_cross_entropy(torch.randn(4, 3), W, torch.tensor([0, 1, 2, 11]), config, chunk_size=5)
    with torch.no_grad():
        W.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_and_partial_grads():
    """Without autograd the loss is the same; with only W (or only x) requiring grad, that one grad."""
    gen = torch.Generator().manual_seed(5)
    x, W = torch.randn(4, 5, dtype=torch.float64, generator=gen), torch.randn(20, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 20, (4,), generator=gen)
    config = default_config("cosface_loss")
    rtol = PATH_AGREEMENT["float64"].rtol
    plain_loss, (plain_dx, plain_dW) = loss_and_grads(x, W, y, config, "mean", None)
    with torch.no_grad():
        assert_matches(margin_cross_entropy(x, W, y, config, chunk_size=6), plain_loss, rtol, "no_grad loss")
    Wl = W.clone().requires_grad_()
    margin_cross_entropy(x, Wl, y, config, chunk_size=6).backward()
    assert_matches(Wl.grad, plain_dW, rtol, "dW alone")
    xl = x.clone().requires_grad_()
    margin_cross_entropy(xl, W, y, config, chunk_size=6).backward()
    assert_matches(xl.grad, plain_dx, rtol, "dx alone")


# ---- the heads pass chunk_size through ------------------------------------------------------------

# (id, record name, head options): every margin record's head at its defaults, and NormFace's
# learned scale (a head parameter the functional losses do not have).
HEAD_VARIANTS = [(record.name, record.name, {}) for record in MARGIN_RECORDS]
HEAD_VARIANTS.append(("normface_loss-learned-scale", "normface_loss", {"learn_scale": True}))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("name", "options"), [pytest.param(n, o, id=i) for i, n, o in HEAD_VARIANTS])
def test_heads_take_chunk_size(name, options, reduction):
    """Every margin head: chunk_size=8 gives the same loss and gradients (weight, learnable scale,
    features) as chunk_size=None, whose loss is the reference's at the same hyperparameters."""
    record = BY_NAME[name]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen) * 3
    y = torch.tensor([0, 36, 12, 12, 5])
    heads = [
        record.head(record.defaults, 37, 6, chunk_size=chunk, reduction=reduction, dtype=torch.float64, **options)
        for chunk in (None, 8)
    ]
    heads[1].load_state_dict(heads[0].state_dict())
    results = []
    for head in heads:
        features = x.clone().requires_grad_()
        loss = head(features, y)
        loss.sum().backward()
        grads = {param: p.grad for param, p in head.named_parameters()}
        results.append((loss.detach(), features.grad, grads))
    (plain_loss, plain_dx, plain_grads), (loss, dx, grads) = results
    # The head is the record's loss: the reference at the same weight and hyperparameters.
    weight = heads[0].weight.detach().numpy()
    expected = record.reference(x.numpy(), weight, y.numpy(), **record.defaults, reduction=reduction)
    assert_close(plain_loss.numpy(), expected, PATH_AGREEMENT["float64"], f"{name} head vs reference")
    rtol = PATH_AGREEMENT["float64"].rtol
    assert_matches(loss, plain_loss, rtol, f"{name} loss")
    assert_matches(dx, plain_dx, rtol, f"{name} d/dx")
    assert grads.keys() == plain_grads.keys()
    for param in grads:
        assert_matches(grads[param], plain_grads[param], rtol, f"{name} d/d{param}")


# ---- arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "error"),
    [(0, ValueError), (-3, ValueError), (2.5, ValueError), ("8", TypeError), (True, TypeError), (None, None)],
)
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_chunk_size_is_checked_first(record, chunk_size, error):
    """A bad chunk_size is refused before the labels are looked at, by the engine and every head."""
    W = torch.randn(10, 4, requires_grad=True)
    x = torch.randn(3, 4)
    bad_labels = torch.tensor([0, 1, 99])  # invalid too: the chunk_size error must come first
    config = record.config(record.defaults)
    if error is None:
        with pytest.raises(ValueError, match="y must lie"):
            margin_cross_entropy(x, W, bad_labels, config, chunk_size=chunk_size)
        return
    with pytest.raises(error, match="chunk_size"):
        margin_cross_entropy(x, W, bad_labels, config, chunk_size=chunk_size)
    with pytest.raises(error, match="chunk_size"):
        record.head(record.defaults, 10, 4, chunk_size=chunk_size)
    assert W.grad is None


def test_integral_float_chunk_size_is_accepted():
    gen = torch.Generator().manual_seed(7)
    x, W = torch.randn(3, 4, dtype=torch.float64, generator=gen), torch.randn(10, 4, dtype=torch.float64, generator=gen)
    y = torch.tensor([1, 2, 9])
    assert_paths_agree(x, W, y, default_config("normface_loss"), "mean", 4.0)


@given(batch=st.integers(1, 10**5), classes=st.integers(1, 10**7), budget=st.floats(1.0, 1e10))
def test_chunk_size_for_fits_the_budget(batch, classes, budget):
    """k is the largest chunk whose float32 (B, k) block fits the budget, clipped to [MIN_CHUNK, C]:
    below C it is either that largest k or, when not even MIN_CHUNK fits, MIN_CHUNK; it reaches C
    only when C fits or C is at most MIN_CHUNK."""
    k = chunk_size_for(batch, classes, budget_bytes=budget)
    assert isinstance(k, int) and 1 <= k <= classes
    fits = 4 * batch * k <= budget
    if k < classes:
        if fits:
            assert budget < 4 * batch * (k + 1), "a larger chunk would fit the budget"
        else:
            assert k == MIN_CHUNK, "over budget below the minimum chunk"
    else:
        assert fits or classes <= MIN_CHUNK, "C chosen though it does not fit and exceeds the minimum chunk"


def test_chunk_size_for_defaults_by_device():
    """512 KiB on CPU (k = 512 at B = 256), 256 MiB on CUDA; C when it fits; MIN_CHUNK at least."""
    assert chunk_size_for(256, 10**6) == 2**19 // (4 * 256) == 512
    assert chunk_size_for(4096, 10**6, device=torch.device("cuda")) == 256 * 2**20 // (4 * 4096)
    assert chunk_size_for(4096, 10**6, device="cuda:0") == chunk_size_for(4096, 10**6, device="cuda")
    assert chunk_size_for(256, 300) == 300
    assert chunk_size_for(10**5, 10**6) == MIN_CHUNK == 128


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
    config = default_config("arcface_loss")
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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
def test_paths_agree_on_each_device(record, dtype, device):
    """The chunked path equals the plain path on every device the machine has, with a learnable
    scale, several chunks (the last partial) and a batch larger than a CPU feature block at D = 512
    (so the row blocks are exercised where they apply)."""
    batch, classes, dim = 70, 1000, 512
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(batch, dim, dtype=dtype, generator=gen).to(device)
    W = torch.randn(classes, dim, dtype=dtype, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    config = with_learnable_scale(record.config(record.defaults), 8.0, dtype, device)
    assert_paths_agree(x, W, y, config, "mean", 96)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_inputs_agree_on_each_device(device):
    """bfloat16 x and W (the CUDA benchmark's inputs): both paths compute in float32 and return
    bfloat16 gradients; they agree to a bfloat16 rounding of each other."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(70, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    W = (0.05 * torch.randn(1000, 64, generator=gen)).to(device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (70,), generator=gen).to(device)
    config = BY_NAME["arcface_loss"].config({"s": 30.0, "m": 0.5, "easy_margin": False})
    plain_loss, plain_grads = loss_and_grads(x, W, y, config, "mean", None)
    loss, grads = loss_and_grads(x, W, y, config, "mean", 96)
    assert loss.dtype == plain_loss.dtype == torch.float32
    assert_matches(loss, plain_loss, PATH_AGREEMENT["float32"].rtol, "bfloat16 inputs: loss")
    for a, b in zip(grads, plain_grads):
        assert a.dtype == b.dtype == torch.bfloat16
        assert_matches(a.float(), b.float(), 1e-2, "bfloat16 gradient")


def peaked_inputs(batch, dim, classes, norm, dtype, seed=11):
    """Trained-like inputs: each x_i at 0.1 rad from W[y_i] with |x_i| = ``norm``, W of N(0, 1/D)
    entries, so that SphereFace's and L-Softmax's non-target logits sit about ``norm`` below the
    target one (benchmarks/subnormal_trap.py, "peaked")."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (batch,), generator=gen)
    W = torch.randn(classes, dim, dtype=torch.float64, generator=gen) / math.sqrt(dim)
    w_hat = torch.nn.functional.normalize(W[y])
    noise = torch.randn(batch, dim, dtype=torch.float64, generator=gen)
    noise = torch.nn.functional.normalize(noise - (noise * w_hat).sum(1, keepdim=True) * w_hat)
    x = norm * (math.cos(0.1) * w_hat + math.sin(0.1) * noise)
    return x.to(dtype), W.to(dtype), y


@pytest.mark.parametrize(
    ("dtype", "norm"), [(torch.float32, 100.0), (torch.float64, 740.0)], ids=["float32", "float64"]
)
@pytest.mark.parametrize("name", ["sphereface_loss", "lsoftmax_loss"])
def test_peaked_inputs_make_no_subnormals(name, dtype, norm):
    """SphereFace and L-Softmax (m = 4) on peaked inputs, whose numerators exp(logit - M) fall in
    the dtype's subnormal band (below 2^-126 in float32, 2^-1022 in float64): the chunked step
    (forward and backward) computes no subnormal entry in any tensor (numerators below tiny / eps are
    exactly 0; subnormal operands run on a CPU's slow path, 60x slower, benchmarks/RESULTS.md), while
    the plain path, the positive control, computes thousands; and the two paths still agree."""
    x, W, y = peaked_inputs(32, 64, 2000, norm, dtype)
    config = default_config(name)
    found = {}
    for chunk_size in (256, None):
        xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
        with SubnormalProbe() as probe:
            margin_cross_entropy(xs, Ws, y, config, "mean", chunk_size=chunk_size).backward()
        found[chunk_size] = probe.found
    assert sum(found[None].values()) > 1000, found[None]  # the inputs do reach the band
    assert found[256] == {}, found[256]
    assert_paths_agree(x, W, y, config, "mean", 256)
