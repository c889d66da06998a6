"""CurricularFace, AdaFace, MagFace: the properties of the losses and of the stateful heads (issue 16).

The shared suites run the records of tests/records/adaptive.py on every path; here: reductions to
the older losses and closed forms, the gradients the contract specifies (hard negatives, detached
margins, AdaFace's norm without gradient, MagFace's norm with it, checked by finite differences),
MagFace's lambda_g bound, and the heads' statistics (when they move, by how much, saved and loaded,
and under a 2-rank gloo group: DDP-like global/local statistics, and the class-sharded head).
Expected values come from closed forms written here, refimpl, or finite differences.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import refimpl
import torch_port.functional as F
from softmax_common.closed_forms import magface_min_lambda_g
from tests.adaptive_scenarios import HEADS, C, D, global_batch, make_head, rank_batch, rows_of
from tests.test_edges_half_and_poles import zero_row_problem
from tests.tolerances import Tol, assert_close
from torch_port import AdaFace, CurricularFace, MagFace

CLOSE = Tol(rtol=1e-12, atol=1e-12)
E = torch.eye(3, dtype=torch.float64)


def at(theta: float, norm: float = 1.0, towards: int = 1) -> torch.Tensor:
    """A feature at angle theta from class 0 (e_1), turned towards class ``towards``."""
    return (norm * (math.cos(theta) * E[0] + math.sin(theta) * E[towards]))[None, :]


def cosines(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).T


# --- CurricularFace ---------------------------------------------------------------------------------


def test_curricularface_without_hard_negatives_is_arcface_with_its_fallback():
    """t = 0 and no non-target cosine above cos(theta_y + m): ArcFace, the strict-< fallback included
    (theta_y + m = pi exactly takes the fallback)."""
    m = 0.5
    # one class (no negatives at all): every angle, the fallback's side included
    thetas = [0.2, 1.0, math.pi - m - 0.1, math.pi - m + 0.1, 3.0]
    x = torch.cat([at(theta, norm=2.0, towards=2) for theta in thetas])
    y = torch.zeros(len(thetas), dtype=torch.int64)
    got = F.curricularface_logits(x, E[:1], y, t=0.0, s=10.0, m=m)[:, 0]
    target = [math.cos(t + m) if t + m < math.pi else math.cos(t) - m * math.sin(m) for t in thetas]
    assert_close(got.numpy(), 10.0 * np.array(target), CLOSE, "target")
    # several classes, every non-target cosine below the threshold (theta_y + m < pi/2)
    x, y = torch.cat([at(0.2, towards=2), at(0.7, towards=2)]), torch.tensor([0, 0])
    W = torch.stack([E[0], E[1], -E[0] - 0.1 * E[2]])
    cos = cosines(x, W)
    assert bool((cos[:, 1:] < torch.cos(torch.tensor([0.2, 0.7], dtype=torch.float64) + m)[:, None]).all())
    for t in (0.0, 0.8):  # t does not matter without hard negatives
        z = F.curricularface_logits(x, W, y, t=t, s=10.0, m=m)
        assert_close(z[:, 1:].numpy(), 10.0 * cos[:, 1:].numpy(), CLOSE, "non-targets")
        loss = F.curricularface_loss(x, W, y, t=t, s=10.0, m=m).item()
        assert loss == pytest.approx(F.arcface_loss(x, W, y, s=10.0, m=m).item(), rel=1e-12)
    # theta_y + m = pi exactly (theta_y = pi, m = 0): both branches give -1, finite
    z = F.curricularface_logits(-E[:1], E[:1], torch.tensor([0]), t=0.0, s=1.0, m=0.0)
    assert z[0, 0].item() == pytest.approx(-1.0, abs=1e-15)


@pytest.mark.parametrize("t", [-0.5, 0.0, 0.3, 0.9])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_a_hard_negative_is_s_cos_times_t_plus_cos_with_that_gradient(t, chunk_size):
    s, m = 10.0, 0.5
    W = torch.stack([E[0], math.cos(0.3) * E[0] + math.sin(0.3) * E[1], E[2]])  # class 1 0.3 from class 0
    x = at(0.2, norm=3.0).requires_grad_()  # theta_y = 0.2, class 1 at 0.1: hard; class 2 at pi/2: not
    z = F.curricularface_logits(x, W, torch.tensor([0]), t=t, s=s, m=m)
    c = cosines(x, W)[0]
    assert c[1].item() > math.cos(0.2 + m) > c[2].item()
    assert z[0, 1].item() == pytest.approx(s * c[1].item() * (t + c[1].item()), rel=1e-12)
    assert z[0, 2].item() == pytest.approx(s * c[2].item(), abs=1e-12)
    (got,) = torch.autograd.grad(z[0, 1], x)
    (dc,) = torch.autograd.grad(c[1], x, retain_graph=True)
    assert_close(got.numpy(), (s * (t + 2 * c[1]) * dc).detach().numpy(), CLOSE, "d hard negative / dx")
    # and the loss on the chunked path agrees with the reference there
    loss = F.curricularface_loss(x, W, torch.tensor([0]), t=t, s=s, m=m, chunk_size=chunk_size)
    expected = refimpl.curricularface_loss(x.detach().numpy(), W.numpy(), np.array([0]), t=t, s=s, m=m)
    assert loss.item() == pytest.approx(float(expected), rel=1e-12)


def test_detached_changes_only_the_target_gradient():
    s, m, t = 10.0, 0.5, 0.4
    W = torch.stack([E[0], math.cos(0.3) * E[0] + math.sin(0.3) * E[1], E[2]])
    x0 = at(0.2, norm=2.0)
    grads = {}
    for mode in ("exact", "detached"):
        x = x0.clone().requires_grad_()
        z = F.curricularface_logits(x, W, torch.tensor([0]), t=t, s=s, m=m, margin_grad=mode)
        grads[mode] = [torch.autograd.grad(z[0, j], x, retain_graph=True)[0] for j in range(3)]
        grads[mode + "-value"] = z.detach()
    assert torch.equal(grads["exact-value"], grads["detached-value"])
    for j in (1, 2):  # the hard negative and the plain non-target keep their gradient
        assert_close(grads["detached"][j].numpy(), grads["exact"][j].numpy(), CLOSE, f"column {j}")
    x = x0.clone().requires_grad_()
    (dcos,) = torch.autograd.grad(s * cosines(x, W)[0, 0], x)
    assert_close(grads["detached"][0].numpy(), dcos.numpy(), CLOSE, "detached target: d s cos theta_y")
    assert not torch.allclose(grads["exact"][0], dcos)


# --- AdaFace ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_adaface_g_zero_is_cosface_and_its_saturations_are_the_closed_forms(chunk_size):
    theta, m, s = 0.6, 0.4, 8.0
    W = E
    y = torch.tensor([0])
    mean = at(theta, norm=20.0)  # |x| = norm_mean: g = 0
    got = F.adaface_loss(mean, W, y, s=s, m=m, chunk_size=chunk_size)
    assert got.item() == pytest.approx(F.cosface_loss(mean, W, y, s=s, m=m).item(), rel=1e-12)
    for norm, g in ((1.0, -1.0), (80.0, 1.0)):  # h = 10: |h (n - 20) / 100| >= 1
        z = F.adaface_logits(at(theta, norm=norm), W, y, s=1.0, m=m, h=10.0)[0, 0].item()
        assert z == pytest.approx(math.cos(theta - m * g) - (m + m * g), rel=1e-12)


def test_adaface_norm_carries_no_gradient():
    """The derivative along the feature (its norm) is zero; tangential ones match finite differences,
    with g in its interior (h (n - mu)/(sigma + eps) = 0.5: the shared suites' samples saturate g)."""
    W = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [-0.5, 0.5, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    x = torch.tensor([[10.0, 5.0, 1.0], [3.0, -20.0, 8.0], [1.0, 2.0, 25.0]], dtype=torch.float64)
    kwargs = dict(norm_mean=18.0, norm_std=10.0, s=16.0, m=0.4, h=0.333)
    gs = 0.333 * (x.norm(dim=1) - 18.0) / (10.0 + 1e-3)
    assert bool((gs.abs() < 1).all())  # interior
    for chunk in (None, 1):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(F.adaface_loss(leaf, W, y, **kwargs, chunk_size=chunk), leaf)
        radial = (grad * x).sum(dim=1)
        assert_close(radial.numpy(), np.zeros(3), Tol(0.0, 1e-12), "radial derivative")
        expected = refimpl.adaface_loss(x.numpy(), W.numpy(), y.numpy(), **kwargs)
        assert F.adaface_loss(x, W, y, **kwargs, chunk_size=chunk).item() == pytest.approx(float(expected), rel=1e-12)
        # a rotation about the feature's own norm: central differences see no change of g
        rng = np.random.default_rng(0)
        for i in range(3):
            v = torch.tensor(rng.normal(size=3))
            v = v - (v @ x[i]) / (x[i] @ x[i]) * x[i]
            v = v / v.norm()

            def rotated(angle, i=i, v=v):
                moved = x.clone()
                moved[i] = math.cos(angle) * x[i] + math.sin(angle) * x[i].norm() * v
                return F.adaface_loss(moved, W, y, **kwargs).item()

            h = 1e-6
            slope = (rotated(h) - rotated(-h)) / (2 * h)
            assert slope == pytest.approx(float(grad[i] @ v * x[i].norm()), rel=1e-6, abs=1e-8)


# --- MagFace ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
def test_magface_norm_gradient_is_margin_and_regulariser(margin_grad):
    """d loss / d r along the feature, against central differences (exact), or against the
    regulariser's alone (detached: the margin, m(a) included, carries no gradient)."""
    W, y = E, torch.tensor([0])
    for theta, norm in ((0.3, 40.0), (1.0, 25.0), (0.6, 5.0), (0.6, 150.0)):
        direction = at(theta)

        def loss(r, direction=direction):
            return F.magface_loss(r * direction, W, y, margin_grad=margin_grad)

        r = torch.tensor(norm, dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(loss(r), r)
        if margin_grad == "exact":
            h = 1e-5
            plus, minus = (torch.tensor(norm + d, dtype=torch.float64) for d in (h, -h))
            numeric = (loss(plus) - loss(minus)).item() / (2 * h)
            assert slope.item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)
        else:
            inside = 10.0 <= norm <= 110.0
            expected = 35.0 * (1 / 110.0**2 - 1 / norm**2) if inside else 0.0
            assert slope.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        if not 10.0 <= norm <= 110.0:  # the clamp: no gradient along the norm outside [l_a, u_a]
            assert slope.item() == pytest.approx(0.0, abs=1e-12)


def test_magface_pushes_easy_samples_to_larger_norms():
    """The paper's claim, on a constructed case inside its premise theta + m(a) <= pi/2
    (derivations/11): the norm minimising the per-sample loss decreases as the angle grows, and an
    easy sample's loss falls as its norm grows (gradient descent lengthens it)."""
    grid = torch.linspace(10.0, 110.0, 401, dtype=torch.float64)
    y = torch.zeros(len(grid), dtype=torch.int64)

    def best(theta):
        losses = F.magface_loss(grid[:, None] * at(theta), E, y, reduction="none")
        return grid[torch.argmin(losses)].item()

    thetas = (0.3, 0.5, 0.8, 1.0)
    optimal = [best(theta) for theta in thetas]
    assert all(a > b for a, b in itertools.pairwise(optimal)), optimal
    for theta, a in zip(thetas, optimal):  # every case inside the premise theta + m(a) <= pi/2
        assert theta + 0.45 + 0.35 * (a - 10.0) / 100.0 <= math.pi / 2
    r = torch.tensor(60.0, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(F.magface_loss(r * at(0.2), E, torch.tensor([0])), r)
    assert slope.item() < 0


def test_magface_min_lambda_g_and_the_heads_warning():
    s, l_a, u_a, l_m, u_m = 64.0, 10.0, 110.0, 0.45, 0.8
    k = (u_m - l_m) / (u_a - l_a)
    by_hand = s * k * u_a**2 * l_a**2 / (u_a**2 - l_a**2)
    assert magface_min_lambda_g(s, l_a, u_a, l_m, u_m) == pytest.approx(by_hand, rel=1e-14)
    assert F.magface_min_lambda_g(32.0, 5.0, 50.0, 0.3, 0.6) == pytest.approx(
        32.0 * (0.3 / 45.0) * 2500.0 * 25.0 / 2475.0, rel=1e-14
    )
    with pytest.warns(UserWarning, match=r"lambda_g=20.0 is below magface_min_lambda_g"):
        MagFace(5, 3, lambda_g=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MagFace(5, 3)  # the default 35 is above 22.59
        MagFace(5, 3, lambda_g=by_hand + 1e-9)


# --- the stateful heads -----------------------------------------------------------------------------


def _problem(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D, dtype=torch.float64, generator=g) * torch.linspace(1.0, 50.0, batch)[:, None].double()
    y = torch.randint(0, C, (batch,), generator=g)
    return x, y


def expected_t(head, x, y, t_before):
    kept = y >= 0
    W = head.weight.detach()
    cos = cosines(x, W)[torch.arange(len(y)), y.clamp_min(0)]
    return 0.01 * cos[kept].mean().item() + 0.99 * t_before if kept.any() else t_before


def expected_norm_statistics(x, y, mean_before, std_before):
    n = x.norm(dim=1)[y >= 0].clamp(1e-3, 100.0).numpy()
    if len(n) < 2:
        return mean_before, std_before
    return 0.01 * n.mean() + 0.99 * mean_before, 0.01 * np.std(n, ddof=1) + 0.99 * std_before


def test_the_statistics_are_buffers_that_round_trip():
    buffers = {"CurricularFace": ["statistics.t"], "AdaFace": ["statistics.norm_mean", "statistics.norm_std"]}
    for name, keys in buffers.items():
        head = make_head(name)
        x, y = _problem()
        head(x, y)
        state = head.state_dict()
        assert all(key in state for key in keys) and all(k not in dict(head.named_parameters()) for k in keys)
        fresh = make_head(name)
        assert not all(torch.equal(fresh.state_dict()[k], state[k]) for k in keys)
        fresh.load_state_dict(state)
        assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in keys)
        fresh.eval(), head.eval()
        assert torch.equal(fresh(x, y), head(x, y))


@pytest.mark.parametrize("name", ["CurricularFace", "AdaFace"])
def test_statistics_move_only_in_a_training_forward_with_grad_after_the_checks(name):
    head = make_head(name)
    x, y = _problem()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    head.eval()
    head(x, y)
    head.train()
    with torch.no_grad():
        head(x, y)
    bad = y.clone()
    bad[2] = C  # out of range: refused, nothing moved
    with pytest.raises(ValueError, match=r"\by\b"):
        head(x, bad)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    head(x, y)
    assert any(not torch.equal(v, before[k]) for k, v in head.state_dict().items())


def test_curricularface_t_update_and_the_loss_at_the_updated_t():
    head = make_head("CurricularFace")
    x, y = _problem()
    y[1] = -1
    t = 0.0
    for step in range(2):
        t = expected_t(head, x, y, t)
        loss = head(x, y)
        assert head.statistics.t.item() == pytest.approx(t, rel=1e-12, abs=1e-15)
        expected = refimpl.curricularface_loss(x.numpy(), head.weight.detach().numpy(), y.numpy(), t=t, s=16.0, m=0.5)
        assert loss.item() == pytest.approx(float(expected), rel=1e-12), step


def test_adaface_statistics_update_and_the_loss_at_the_updated_statistics():
    head = make_head("AdaFace")
    x, y = _problem(batch=7)
    x[0] = 0.0  # clipped to 1e-3
    x[1] *= 10.0  # beyond 100: clipped
    y[2] = -1
    mean, std = 20.0, 100.0
    for step in range(2):
        mean, std = expected_norm_statistics(x, y, mean, std)
        loss = head(x, y)
        assert head.statistics.norm_mean.item() == pytest.approx(mean, rel=1e-12)
        assert head.statistics.norm_std.item() == pytest.approx(std, rel=1e-12)
        W = head.weight.detach().numpy()
        expected = refimpl.adaface_loss(x.numpy(), W, y.numpy(), norm_mean=mean, norm_std=std, s=16.0)
        assert loss.item() == pytest.approx(float(expected), rel=1e-12), step


@pytest.mark.parametrize("name", ["CurricularFace", "AdaFace"])
def test_a_batch_of_one_or_all_ignored_leaves_the_statistics_finite(name):
    head = make_head(name)
    x, y = _problem(batch=3)
    head(x, y)
    before = {k: v.clone() for k, v in head.state_dict().items() if "statistics" in k}
    cases = [(x, torch.full((3,), -1))]
    if name == "AdaFace":
        cases.append((x[:1], y[:1]))  # one row: no unbiased std (the official code's nan)
    for xs, ys in cases:
        loss = head(xs, ys)
        assert torch.isfinite(loss)
        after = {k: v for k, v in head.state_dict().items() if "statistics" in k}
        assert all(torch.equal(after[k], before[k]) for k in before), (name, len(ys))
    if name == "CurricularFace":  # one kept row does move t: its mean is that row's cosine
        t = expected_t(head, x[:1], y[:1], head.statistics.t.item())
        head(x[:1], y[:1])
        assert head.statistics.t.item() == pytest.approx(t, rel=1e-12)


# --- under a 2-rank gloo group (the sharded runner's workers) ---------------------------------------


def test_global_statistics_are_the_concatenated_batchs_local_each_ranks(sharded_runner):
    per_rank = sharded_runner.request(("scenario", "adaptive_statistics_modes"))
    batches = [rank_batch(rank) for rank in range(2)]
    x_all, y_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    head = make_head("CurricularFace")  # the same weight as the ranks' (same seed)
    for rank, got in enumerate(per_rank):
        x, y = batches[rank]
        t_local, t_global = expected_t(head, x, y, 0.0), expected_t(head, x_all, y_all, 0.0)
        assert got["CurricularFace-local"]["statistics.t"] == pytest.approx(t_local, rel=1e-12)
        assert got["CurricularFace-global"]["statistics.t"] == pytest.approx(t_global, rel=1e-12)
        for mode, (xs, ys) in (("local", (x, y)), ("global", (x_all, y_all))):
            mean, std = expected_norm_statistics(xs, ys, 20.0, 100.0)
            assert got[f"AdaFace-{mode}"]["statistics.norm_mean"] == pytest.approx(mean, rel=1e-12), mode
            assert got[f"AdaFace-{mode}"]["statistics.norm_std"] == pytest.approx(std, rel=1e-12), mode
    assert per_rank[0]["CurricularFace-local"]["statistics.t"] != per_rank[1]["CurricularFace-local"]["statistics.t"]


def test_sharded_from_head_is_the_single_process_head_over_two_steps(sharded_runner):
    per_rank = sharded_runner.request(("scenario", "adaptive_sharded_from_head"))
    x, y = global_batch()
    for name in HEADS:
        single = make_head(name)  # no process group here: the statistics of this (global) batch
        for step in range(2):
            leaf = x.clone().requires_grad_()
            loss = single(leaf, y)
            (grad,) = torch.autograd.grad(loss, leaf)
            for rank, got in enumerate(per_rank):
                what = f"{name} step {step} rank {rank}"
                assert got[name]["losses"][step] == pytest.approx(loss.item(), rel=1e-10), what
                rows = rows_of(rank, 2, len(y))
                assert_close(got[name]["grads"][step], grad[rows].numpy(), Tol(1e-9, 1e-12), what)
        for rank, got in enumerate(per_rank):
            for key, value in got[name]["statistics"].items():
                assert value == pytest.approx(single.state_dict()[key].item(), rel=1e-12), (name, key, rank)


def test_the_heads_are_their_classes():
    assert (HEADS["CurricularFace"], HEADS["AdaFace"], HEADS["MagFace"]) == (CurricularFace, AdaFace, MagFace)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_curricularface_chunked_half_weights_get_the_float32_gradient_rounded_once(dtype):
    """Half-precision x and W with zero rows (tests/test_edges_half_and_poles.py's problem, which
    holds every margin loss to this): the gradient of W on the chunked path is the float32 gradient
    rounded to the input's dtype with saturation, finite, as on the plain path."""
    x, W, y = zero_row_problem()
    for chunk in (None, 3):
        grads = []
        for kind in (dtype, torch.float32):
            leaf = torch.tensor(W, dtype=kind, requires_grad=True)
            F.curricularface_loss(torch.tensor(x, dtype=kind), leaf, torch.tensor(y), chunk_size=chunk).backward()
            grads.append(leaf.grad)
        got, want = grads
        limit = torch.finfo(dtype).max
        expected = want.clamp(-limit, limit).to(dtype).float()
        assert torch.isfinite(got).all(), f"chunk_size={chunk}: {got}"
        eps = torch.finfo(dtype).eps
        assert_close(got.float().numpy(), expected.numpy(), Tol(rtol=eps, atol=0.0), f"chunk_size={chunk}")
