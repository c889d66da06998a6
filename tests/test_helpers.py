"""The test helpers do what the tests rely on them for.

A helper that silently does less than it claims weakens every test built on it without failing one;
each claim is checked here directly: the records' strategies (angles kept away from poles, jumps
and branch boundaries; the geometry helpers), samples (rounding, a repr that rebuilds them), the
registry (every margin loss of the port has a record on every path, whose configuration and head
are that loss), the paths' chunk sizes, the tolerance comparators (they pass what they claim and
fail beyond it), the dispatch probe, the sharded runner (reassembly, timeouts, errors, no process
group in the test process, no worker left behind) and the distributed cases.
"""

from __future__ import annotations

import inspect
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import refimpl.geometry as refimpl_geometry
import torch_port.functional as tpf
from tests.dispatch_probe import OpProbe
from tests.distributed_cases import CASES, global_inputs
from tests.paths import MARGIN_PATHS, PATHS
from tests.records.angular import off_branch_boundaries
from tests.records.normalized import ANGLE_GAP, jumps, orthogonal_unit, unit_rows
from tests.records.normalized import KINDS as NORMALIZED_KINDS
from tests.registry import BY_NAME, RECORDS
from tests.samples import Sample, has_row_arrays, torch_kwargs
from tests.sharded_runner import ShardedCall, ShardedRunError, ShardedRunner
from tests.tolerances import (
    FLOAT32_EPS,
    PATH_AGREEMENT,
    Tol,
    assert_close,
    assert_no_farther_than_plain,
    float32_noise_floor,
    for_rounded_gradient,
)
from torch_port.distributed import shard_range
from torch_port.engine import margin_cross_entropy

MARGIN_RECORDS = [record for record in RECORDS if record.config is not None]


# ---- strategies and geometry of the records ------------------------------------------------------


def test_orthogonal_unit_helper_is_orthogonal():
    """The records' geometry helper (it places x at a drawn angle): unit and orthogonal to w^."""
    rng = np.random.default_rng(0)
    for dim in (2, 3, 5):
        w_hat = unit_rows(rng.standard_normal((1, dim)))[0]
        for raw in (rng.standard_normal(dim), w_hat * 3.0, np.zeros(dim)):
            v = orthogonal_unit(w_hat, raw)
            assert abs(v @ w_hat) < 1e-15 and abs(np.linalg.norm(v) - 1) < 1e-15


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("m", range(1, 7))
def test_branch_boundary_filter_is_as_narrow_as_claimed(m, dim):
    """The angular records drop samples near k boundaries (for finite differences only): a point on
    a boundary is rejected (for m > 1, where there are boundaries), one 0.01 rad away is kept."""
    edge = math.pi / m if m > 1 else 0.3
    w0 = np.zeros((1, dim))
    w0[0, 0] = 2.0

    def at(angle):
        return np.array([[math.cos(angle), math.sin(angle)] + [0.0] * (dim - 2)])

    assert off_branch_boundaries(at(edge), w0, np.array([0]), m) == (m == 1)
    assert off_branch_boundaries(at(edge + 0.01), w0, np.array([0]), m)


@pytest.mark.parametrize("kind", NORMALIZED_KINDS)
@given(data=st.data())
def test_normalized_samples_keep_target_angles_away_from_poles_and_jumps(kind, data):
    """The normalized records promise target angles at least ANGLE_GAP from 0, pi and every jump of
    psi for the drawn hyperparameters (the gradient suites' central differences rely on it)."""
    sample = data.draw(BY_NAME[f"{kind}_loss"].samples)
    x, W, y = sample.tensors["x"], sample.tensors["W"], sample.labels["y"]
    kept = y >= 0  # an ignored row (ignore_index < 0) has no target angle
    theta = refimpl_geometry.target_angles(x[kept], W, y[kept])
    for row, angle in zip(np.flatnonzero(kept), theta):
        for point in [0.0, math.pi, *jumps(kind, sample.kwargs, row)]:  # each row's own margins
            assert abs(angle - point) >= ANGLE_GAP - 1e-9, (row, point, theta)


# ---- samples --------------------------------------------------------------------------------------


def test_rounded_to_rounds_the_float_inputs_only():
    sample = Sample({"x": np.array([[1.0 + 2**-12, 3.0]])}, {"y": np.array([0])}, {"s": 1.0 + 2**-12})
    rounded = sample.rounded_to("bfloat16")
    assert rounded.tensors["x"][0, 0] == 1.0  # 2^-12 is below bfloat16's half-ulp at 1 (2^-8)
    assert rounded.tensors["x"].dtype == np.float64
    assert rounded.labels is sample.labels and rounded.kwargs == {"s": 1.0 + 2**-12}


def test_sample_repr_rebuilds_the_sample():
    """A failure prints repr(sample); pasting it back must give the same inputs to the last bit."""
    sample = Sample(
        {"x": np.array([[0.1, -1 / 3]]), "W": np.array([[math.pi, 1e-300]])},
        {"y": np.array([0])},
        {"s": 0.7, "easy_margin": True},
        note="a note",
    )

    def rebuilt(**parts):
        return parts

    parts = eval(repr(sample), {"Sample": rebuilt, "np": np})
    for name, value in {**sample.tensors, **sample.labels}.items():
        assert np.array_equal(parts[name], value) and np.asarray(parts[name]).dtype == value.dtype
    assert {k: parts[k] for k in sample.kwargs} == sample.kwargs


# ---- the registry and its paths ---------------------------------------------------------------------


def test_every_margin_loss_of_the_port_runs_on_every_path():
    """Each loss of torch_port.functional that takes chunk_size (the engine's losses) has a record
    that lists every path and has what those paths need: a configuration and a head."""
    engine_losses = [
        name
        for name in tpf.__all__
        if name.endswith("_loss") and "chunk_size" in inspect.signature(getattr(tpf, name)).parameters
    ]
    assert len(engine_losses) == 11, engine_losses  # the first plan's 7, sub-centres, CurricularFace, AdaFace, MagFace
    for name in engine_losses:
        record = BY_NAME[name]
        assert record.paths == MARGIN_PATHS, name
        assert record.config is not None and record.head is not None and record.defaults, name


def test_the_paths_are_the_required_chunk_sizes_and_ranks():
    """k = 1, k = 3 and k > C for every C; the sharded path splits over 2 ranks; plain is unchunked."""
    for classes in range(1, 12):
        assert PATHS["chunked-k1"].chunk_size(classes) == 1
        assert PATHS["chunked-k3"].chunk_size(classes) == 3
        assert PATHS["chunked-k-over-C"].chunk_size(classes) > classes
        assert PATHS["plain"].chunk_size(classes) is None and PATHS["sharded-2"].chunk_size(classes) is None
    assert PATHS["sharded-2"].world == 2 and not PATHS["plain"].sharded
    assert set(MARGIN_PATHS) == {"plain", "chunked-k1", "chunked-k3", "chunked-k-over-C", "sharded-2"}


@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
@given(data=st.data())
def test_record_configs_and_heads_are_their_losses(record, data):
    """The engine on ``record.config(kwargs)`` and ``record.head(kwargs, ...)`` (its weight set to W)
    give the record's functional loss at those hyperparameters, per sample, in float64."""
    sample = data.draw(record.samples)
    x = torch.tensor(sample.tensors["x"])
    W = torch.tensor(sample.tensors["W"])
    y = torch.as_tensor(sample.labels["y"])
    expected = record.port(x, W, y, **torch_kwargs(sample.kwargs), reduction="none")
    ignore_index = sample.kwargs.get("ignore_index", -1)
    by_config = margin_cross_entropy(x, W, y, record.config(sample.kwargs), "none", ignore_index=ignore_index)
    tol = PATH_AGREEMENT["float64"]
    assert_close(by_config.numpy(), expected.numpy(), tol, f"{record.name}: engine on its config")
    if has_row_arrays(sample.kwargs):
        return  # a head's margin is a number or one per class, not one per sample of this batch
    classes = W.shape[0] // sample.kwargs.get("k", 1)  # sub-centres: k rows of W per class
    head = record.head(sample.kwargs, classes, W.shape[1], reduction="none", dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(W)
    by_head = head(x, y).detach()
    assert_close(by_head.numpy(), expected.numpy(), tol, f"{record.name}: its head")


# ---- tolerance comparators ----------------------------------------------------------------------------


def test_assert_close_passes_at_the_bound_and_fails_beyond_it():
    tol = Tol(rtol=1e-3, atol=1e-4)
    expected = np.array([10.0, 0.0])  # scale = 10: the bound is 1e-3 + 1e-3 * |expected|
    assert_close(expected + np.array([0.011 * 0.999, 1e-3 * 0.999]), expected, tol)
    with pytest.raises(AssertionError, match=r"1 of 2 elements .* worst at \(1,\)"):
        assert_close(expected + np.array([0.0, 1.1e-3]), expected, tol, "x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(3), np.zeros(2), tol)
    with pytest.raises(AssertionError):
        assert_close(np.array([np.nan]), np.array([0.0]), tol)


def test_assert_no_farther_than_plain_allows_the_plain_error_and_no_more():
    tol = Tol(rtol=1e-5, atol=1e-5)
    truth = np.array([0.5, -2.0])
    plain = truth + np.array([1e-3, 0.0])  # the plain path's own error: 1e-3
    # no farther than 4x plain's error (4e-3), plus tol's 1e-5 * (2 + |truth|)
    assert_no_farther_than_plain(truth + np.array([0.0, 3.9e-3]), plain, truth, tol)
    with pytest.raises(AssertionError, match="farther from the float64 truth"):
        assert_no_farther_than_plain(truth + np.array([0.0, 4.2e-3]), plain, truth, tol)
    # exact plain path: only tol (and the floor) remain
    with pytest.raises(AssertionError):
        assert_no_farther_than_plain(truth + np.array([0.0, 1e-4]), truth, truth, tol)
    assert_no_farther_than_plain(truth + np.array([0.0, 1e-4]), truth, truth, tol, floor=1e-4)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_no_farther_than_plain(np.array([np.inf, 0.0]), plain, truth, tol)


def test_for_rounded_gradient_widens_to_the_half_dtypes_eps_only():
    tol = Tol(rtol=1e-4, atol=2e-5)
    assert for_rounded_gradient(tol, "float32") == tol
    assert for_rounded_gradient(tol, "bfloat16") == Tol(2**-7, 2**-7) == Tol(*[torch.finfo(torch.bfloat16).eps] * 2)
    assert for_rounded_gradient(tol, "float16") == Tol(*[torch.finfo(torch.float16).eps] * 2)
    assert FLOAT32_EPS == torch.finfo(torch.float32).eps


def test_the_float32_noise_floor_covers_a_gradient_that_is_zero_in_truth():
    """D = 1: NormFace's loss depends on x only through x / |x|, so dL/dx is exactly 0; float32
    routes give rounding noise instead, which the floor must cover while staying far below the
    problem's scale."""
    config = BY_NAME["normface_loss"].config({"s": 64.0})
    x = np.array([[2.0], [-1.0], [0.5]])
    W = np.array([[1.0], [-3.0]])
    y = torch.tensor([0, 0, 1])
    floor = float32_noise_floor(config, x, W, upstream=1.0, wrt="x")
    assert floor < 1e-3
    for chunk_size in (None, 1):
        xs = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        loss = margin_cross_entropy(xs, torch.tensor(W, dtype=torch.float32), y, config, chunk_size=chunk_size)
        (dx,) = torch.autograd.grad(loss, xs)
        assert float(dx.abs().max()) <= floor


# ---- the dispatch probe -------------------------------------------------------------------------------


def test_dispatch_probe_counts_products_and_the_largest_tensor():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with OpProbe() as probe:
        torch.sigmoid(torch.randn(10, 10))
    assert probe.products == 0 and probe.largest == 100
    with OpProbe() as probe:
        a @ b
        torch.addmm(torch.zeros(3, 5), a, b)
    assert probe.products == 2 and probe.largest == 15
    with OpProbe() as probe:
        torch.randn(2, 3, requires_grad=True).matmul(torch.randn(3, 7)).sum().backward()
    assert probe.products == 2  # forward mm, and backward's one product for the leaf that needs grad


# ---- the sharded runner --------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sharded_runner_reassembles_the_ranks_and_leaves_the_test_process_out_of_any_group(sharded_runner):
    """Rank order for x's rows, shard order for W's rows: the result is the single-process loss and
    gradients of the global problem (uneven: 3 rows, 5 classes over 2 ranks)."""
    record = BY_NAME["cosface_loss"]
    kwargs = {"s": 8.0, "m": 0.2}
    rng = np.random.default_rng(0)
    x, W, y = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), np.array([4, 0, 2])
    cotangent = np.array([0.5, 1.0, 2.0])
    result = sharded_runner.run(ShardedCall(record.name, x, W, y, kwargs, reduction="none", cotangent=cotangent))
    xs, Ws = torch.tensor(x, requires_grad=True), torch.tensor(W, requires_grad=True)
    loss = record.port(xs, Ws, torch.tensor(y), **kwargs, reduction="none")
    dx, dW = torch.autograd.grad((loss * torch.tensor(cotangent)).sum(), (xs, Ws))
    tol = PATH_AGREEMENT["float64"]
    assert result.loss_dtype == "float64"
    assert_close(result.loss, loss.detach().numpy(), tol, "loss")
    assert_close(result.grads["x"], dx.numpy(), tol, "dx")
    assert_close(result.grads["W"], dW.numpy(), tol, "dW")
    assert not dist.is_initialized()


def test_sharded_runner_times_out_kills_its_workers_and_starts_afresh():
    runner = ShardedRunner(call_timeout=2.0)
    try:
        assert runner.request(("ping", None)) == [0, 1]
        pids = runner.pids
        start = time.monotonic()
        with pytest.raises(ShardedRunError, match="timed out"):
            runner.request(("sleep", 60.0))
        assert time.monotonic() - start < 15
        assert all(_gone(pid) for pid in pids)
        assert runner.request(("ping", None)) == [0, 1] and runner.starts == 2
    finally:
        runner.close()


def test_sharded_runner_reports_an_error_on_one_rank_and_close_leaves_no_worker():
    runner = ShardedRunner()
    try:
        runner.request(("ping", None))
        with pytest.raises(ShardedRunError, match=r"(?s)rank 1 .*asked to fail on rank 1"):
            runner.request(("raise-on", 1))
        assert runner.request(("ping", None)) == [0, 1] and runner.starts == 2
        pids = runner.pids
    finally:
        runner.close()
    assert all(_gone(pid) for pid in pids) and runner.pids == []


# ---- the distributed cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_labels_on_one_shard_cases_put_every_label_on_the_last_shard(world):
    """The one-shard cases really put every label on the last shard (so the others own no target)."""
    one_shard = [case for case in CASES if case.labels == "last-shard"]
    assert one_shard
    for case in one_shard:
        _, _, y, _ = global_inputs(case, world)
        start, end = shard_range(case.num_classes, world, world - 1)
        assert ((y >= start) & (y < end)).all() and start > 0
