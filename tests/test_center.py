"""Family properties of the center loss and its update rule (Wen et al., ECCV 2016), and the
``CenterLoss`` module. derivations/08-center-loss.md explains the math.

Expected values come from routes independent of both implementations: explicit Python loops over
the batch and the classes, closed-form gradients, and the geometric reading of the rule (a damped
step towards the class mean of the batch).

About "alpha = 0 changes nothing": the public functions accept alpha in (0, 1] only (bad input is
refused with a clear error), so alpha = 0 is a ValueError that leaves the centers untouched. The property itself
is checked through the rule's linearity in alpha: update(alpha) - c = alpha * (update(1) - c) for
every alpha, so the move vanishes linearly as alpha -> 0.
"""

from __future__ import annotations

import autograd
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests.records.center import BOUND, features_labels_centers, step_sizes
from tests.tolerances import Tol, assert_close
from torch_port import CenterLoss

EPS = float(np.finfo(np.float64).eps)
IMPLS = ["refimpl", "torch_port"]


def call(impl: str, name: str, x, y, centers, **kwargs) -> np.ndarray:
    if impl == "refimpl":
        return np.asarray(getattr(refimpl, name)(x, y, centers, **kwargs), dtype=np.float64)
    out = getattr(tpf, name)(torch.tensor(x), torch.from_numpy(y), torch.tensor(centers), **kwargs)
    return out.detach().double().numpy()


def grads(impl: str, x, y, centers, reduction: str, cotangent: np.ndarray):
    """d sum(center_loss * cotangent) / d(x, centers)."""
    if impl == "refimpl":

        def objective(a, c):
            return autograd.numpy.sum(refimpl.center_loss(a, y, c, reduction=reduction) * cotangent)

        return autograd.grad(objective, 0)(x, centers), autograd.grad(objective, 1)(x, centers)
    xt = torch.tensor(x, requires_grad=True)
    ct = torch.tensor(centers, requires_grad=True)
    out = tpf.center_loss(xt, torch.from_numpy(y), ct, reduction=reduction)
    gx, gc = torch.autograd.grad((out * torch.from_numpy(np.asarray(cotangent))).sum(), (xt, ct))
    return gx.numpy(), gc.numpy()


def update_by_loops(x, y, centers, alpha):
    """Wen et al.'s eq. (4), one class and one sample at a time, in plain Python floats."""
    new = [list(map(float, c)) for c in centers]
    for j, c in enumerate(centers):
        members = [i for i in range(len(y)) if y[i] == j]
        for d in range(len(c)):
            step = sum(float(c[d]) - float(x[i][d]) for i in members) / (1 + len(members))
            new[j][d] = float(c[d]) - alpha * step
    return np.array(new)


# ---------------------------------------------------------------------------------------------
# center_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=features_labels_centers())
def test_center_loss_value_and_gradients(impl, sample):
    """loss_i = |x_i - c_{y_i}|^2 / 2; under "mean", d/dx_i = (x_i - c_{y_i}) / B and
    d/dc_j = -sum_{i: y_i = j} (x_i - c_j) / B."""
    x, y, centers = sample
    batch = len(y)
    by_loop = np.array([0.5 * sum((a - b) ** 2 for a, b in zip(x[i], centers[y[i]])) for i in range(batch)])
    tol = Tol(rtol=1e-13, atol=1e-14)
    assert_close(call(impl, "center_loss", x, y, centers, reduction="none"), by_loop, tol, "none")
    assert_close(call(impl, "center_loss", x, y, centers), by_loop.mean(), tol, "mean")
    assert_close(call(impl, "center_loss", x, y, centers, reduction="sum"), by_loop.sum(), tol, "sum")

    diff = x - centers[y]
    onehot = np.eye(len(centers))[y]  # (B, C)
    for reduction, weight in (("mean", np.full(batch, 1.0 / batch)), ("sum", np.ones(batch))):
        gx, gc = grads(impl, x, y, centers, reduction, np.array(1.0))
        assert_close(gx, diff * weight[:, None], Tol(1e-13, 1e-14), f"d/dx ({reduction})")
        assert_close(gc, -onehot.T @ (diff * weight[:, None]), Tol(1e-12, 1e-14), f"d/dcenters ({reduction})")
    cotangent = np.linspace(0.5, 1.5, batch)
    gx, _ = grads(impl, x, y, centers, "none", cotangent)
    assert_close(gx, diff * cotangent[:, None], Tol(1e-13, 1e-14), "d/dx (none)")


# ---------------------------------------------------------------------------------------------
# center_update
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=features_labels_centers(), alpha=step_sizes())
def test_update_moves_each_center_by_exactly_the_papers_amount(impl, sample, alpha):
    x, y, centers = sample
    new = call(impl, "center_update", x, y, centers, alpha=alpha)
    assert_close(new, update_by_loops(x, y, centers, alpha), Tol(rtol=1e-13, atol=1e-14), "eq. (4)")
    absent = np.setdiff1d(np.arange(len(centers)), y)
    assert np.array_equal(new[absent], centers[absent])  # bit for bit: n_j = 0 gives a zero step


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=features_labels_centers(), alpha=step_sizes())
def test_update_is_a_damped_step_towards_the_batch_mean(impl, sample, alpha):
    """c_j' = c_j + alpha n_j / (1 + n_j) (mean_j - c_j): on the segment from c_j to the class mean,
    so the distance to the mean shrinks by the factor 1 - alpha n_j / (1 + n_j)."""
    x, y, centers = sample
    new = call(impl, "center_update", x, y, centers, alpha=alpha)
    scale = 16 * EPS * (BOUND + 1)
    for j in np.unique(y):
        members = x[y == j]
        n, mean = len(members), members.mean(axis=0)
        fraction = alpha * n / (1 + n)
        assert_close(new[j], centers[j] + fraction * (mean - centers[j]), Tol(1e-12, scale), f"class {j}")
        before, after = np.linalg.norm(centers[j] - mean), np.linalg.norm(new[j] - mean)
        assert after <= (1 - fraction) * before + scale


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=features_labels_centers(), alpha=step_sizes())
def test_update_is_linear_in_alpha_so_alpha_to_zero_changes_nothing(impl, sample, alpha):
    x, y, centers = sample
    full_step = call(impl, "center_update", x, y, centers, alpha=1.0) - centers
    moved = call(impl, "center_update", x, y, centers, alpha=alpha) - centers
    # Each entry is rounded twice (the step, then c - alpha * step): a few ulps of |c| + |step|.
    slack = 8 * EPS * (np.abs(centers) + np.abs(full_step))
    assert np.all(np.abs(moved - alpha * full_step) <= slack)
    tiny = call(impl, "center_update", x, y, centers, alpha=1e-300)
    # The move is 1e-300 times the full step (rounded away entirely wherever |c| is not tiny itself).
    assert np.all(np.abs(tiny - centers) <= 2e-300 * np.abs(full_step) + EPS * np.abs(centers))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5, float("nan")], ids=str)
def test_alpha_outside_the_unit_interval_is_rejected_and_changes_nothing(impl, alpha):
    x, y, centers = np.ones((3, 2)), np.array([0, 1, 1]), np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"\balpha\b"):
        call(impl, "center_update", x, y, centers, alpha=alpha)
    assert np.array_equal(centers, np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------
# the CenterLoss module
# ---------------------------------------------------------------------------------------------


def _module_batch(dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(6, 2, generator=generator, dtype=torch.float64)).to(dtype)
    return x, torch.tensor([0, 2, 2, 0, 2, 3])  # class 1 absent


def test_module_loss_uses_the_centers_before_the_step_and_then_moves_them():
    module = CenterLoss(4, 2, alpha=0.3, loss_weight=0.5, dtype=torch.float64)
    x, y = _module_batch(torch.float64)
    module.centers.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.0, 0.0], [-3.0, 0.5]], dtype=torch.float64))
    for _ in range(3):
        before = module.centers.clone()
        xg = x.clone().requires_grad_(True)
        loss = module(xg, y)
        expected = 0.5 * refimpl.center_loss(x.numpy(), y.numpy(), before.numpy())
        assert loss.item() == pytest.approx(expected, rel=1e-14)
        expected_centers = update_by_loops(x.numpy(), y.numpy(), before.numpy(), 0.3)
        assert_close(module.centers.numpy(), expected_centers, Tol(1e-13, 1e-14), "centers after the step")
        assert torch.equal(module.centers[1], before[1])  # class 1 was not in the batch
        # The in-place step does not invalidate the graph, and the gradient is the pre-step one.
        (g,) = torch.autograd.grad(loss, xg)
        assert_close(g.numpy(), 0.5 * (x - before[y]).numpy() / len(y), Tol(1e-13, 1e-15), "d loss / dx")


def test_module_moves_centers_only_in_training_steps():
    module = CenterLoss(4, 2)
    x, y = _module_batch()
    module.eval()
    module(x, y)
    module.train()
    with torch.no_grad():
        module(x, y)
    with torch.inference_mode():
        module(x, y)
    assert torch.equal(module.centers, torch.zeros(4, 2))  # zeros: the documented initialisation
    module(x, y)
    assert not torch.equal(module.centers, torch.zeros(4, 2))


def test_learned_centers_are_a_parameter_moved_by_the_optimizer_not_by_the_rule():
    module = CenterLoss(4, 2, learn_centers=True)
    assert isinstance(module.centers, torch.nn.Parameter) and "centers" in dict(module.named_parameters())
    x, y = _module_batch()
    loss = module(x, y)
    assert torch.equal(module.centers.detach(), torch.zeros(4, 2))  # no rule update
    loss.backward()
    expected = -((x - 0) * torch.nn.functional.one_hot(y, 4).T[..., None]).sum(1) / len(y)
    assert torch.allclose(module.centers.grad, expected, rtol=1e-6, atol=1e-7)
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    assert torch.allclose(module.centers.detach(), -0.5 * expected)


def test_state_dict_round_trips_the_centers():
    module = CenterLoss(4, 2)
    x, y = _module_batch()
    module(x, y)
    assert list(module.state_dict()) == ["centers"]
    restored = CenterLoss(4, 2)
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored.centers, module.centers)
    assert torch.equal(restored(x, y), module(x, y))


def test_a_failed_call_leaves_the_centers_untouched():
    module = CenterLoss(4, 2)
    x, y = _module_batch()
    module(x, y)
    before = module.centers.clone()
    for bad_x, bad_y, error in [
        (x, torch.tensor([0, 2, 2, 0, 2, 4]), ValueError),  # a label outside [0, 4)
        (x, y[:4], ValueError),  # labels of the wrong length
        (x[:, :1], y, ValueError),  # features of the wrong dimension
        (x, y.float(), TypeError),  # float labels
        (x.double(), y, TypeError),  # float64 features for float32 centers
    ]:
        with pytest.raises(error):
            module(bad_x, bad_y)
    assert torch.equal(module.centers, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"loss_weight": -1.0}, ValueError, "loss_weight"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"dim": 2.5}, ValueError, "dim"),
        ({"learn_centers": "yes"}, TypeError, "learn_centers"),
        ({"reduction": "avg"}, ValueError, "reduction"),
    ],
    ids=str,
)
def test_module_rejects_bad_arguments(kwargs, error, name):
    args = {"num_classes": 4, "dim": 2, **kwargs}
    with pytest.raises(error, match=rf"\b{name}\b"):
        CenterLoss(**args)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_module_dtype_device_and_autocast_contract(dtype, device):
    """Half features: the loss in float32, the centers stay float32; autocast changes nothing."""
    x, y = _module_batch(dtype)
    x, y = x.to(device).requires_grad_(True), y.to(device)
    module = CenterLoss(4, 2, device=device)
    twin = CenterLoss(4, 2, device=device)
    out = module(x, y)
    assert out.dtype == torch.float32 and module.centers.dtype == torch.float32
    assert module.centers.device.type == device
    (g,) = torch.autograd.grad(out, x)
    assert g.dtype == dtype and torch.isfinite(g).all()
    autocast_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=autocast_dtype):
        under = twin(x.detach().float(), y)
    assert under.dtype == torch.float32
    assert torch.allclose(
        under, module.loss_weight * tpf.center_loss(x.detach().float(), y, torch.zeros(4, 2, device=device))
    )
    assert torch.equal(twin.centers, module.centers)  # half features are upcast exactly: the same step


@given(sample=features_labels_centers(), alpha=step_sizes(), steps=st.integers(1, 30))
@settings(max_examples=15)
def test_repeated_steps_on_one_batch_converge_to_the_class_means(sample, alpha, steps):
    """Iterating the rule on a fixed batch contracts each present center towards its class mean
    geometrically (the fixed point is the mean), at the rate 1 - alpha n/(1+n) per step."""
    x, y, centers = sample
    current = centers
    for _ in range(steps):
        current = call("torch_port", "center_update", x, y, current, alpha=alpha)
    for j in np.unique(y):
        n, mean = np.sum(y == j), x[y == j].mean(axis=0)
        rate = 1 - alpha * n / (1 + n)
        expected = np.linalg.norm(centers[j] - mean) * rate**steps
        assert np.linalg.norm(current[j] - mean) <= expected + 64 * steps * EPS * (BOUND + 1), j
