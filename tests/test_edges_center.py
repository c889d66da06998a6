"""Non-finite features and the center update (issue 13, item 12).

A row of x with a nan or an infinite entry is skipped by Wen et al.'s rule, in both packages: the
centers after the update are those of the batch without that row (expected values from the
one-sample-at-a-time loop of tests/test_center.py on the finite rows). ``CenterLoss`` inherits it, so
one bad batch cannot make its centers non-finite for good; its loss and gradient still carry the
inf or nan (what AMP's GradScaler checks). derivations/08-center-loss.md explains the decision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.records.center import features_labels_centers, step_sizes
from tests.test_center import IMPLS, call, update_by_loops
from tests.tolerances import Tol, assert_close
from torch_port import CenterLoss

POISONS = (math.nan, math.inf, -math.inf)


@st.composite
def poisoned(draw):
    """(x, y, centers, bad rows): some rows of x get a nan or +-inf in one or more entries."""
    x, y, centers = draw(features_labels_centers())
    batch, dim = x.shape
    bad = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
    x = x.copy()
    for i in np.flatnonzero(bad):
        columns = draw(st.lists(st.integers(0, dim - 1), min_size=1, max_size=dim, unique=True))
        for d in columns:
            x[i, d] = draw(st.sampled_from(POISONS))
    return x, y, centers, np.asarray(bad, dtype=bool)


@pytest.mark.parametrize("impl", IMPLS)
@given(sample=poisoned(), alpha=step_sizes())
def test_non_finite_rows_are_skipped_by_the_update(impl, sample, alpha):
    x, y, centers, bad = sample
    new = call(impl, "center_update", x, y, centers, alpha=alpha)
    keep = ~bad
    expected = update_by_loops(x[keep], y[keep], centers, alpha) if keep.any() else centers
    assert np.isfinite(new).all()
    assert_close(new, expected, Tol(rtol=1e-13, atol=1e-14), "the update without the non-finite rows")
    untouched = np.setdiff1d(np.arange(len(centers)), y[keep])
    assert np.array_equal(new[untouched], centers[untouched])  # classes with only bad rows: bit for bit


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_the_module_keeps_its_centers_finite_and_the_loss_reports_the_poison(poison, dtype):
    module = CenterLoss(3, 2, alpha=0.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 4.0]], dtype=dtype)
    y = torch.tensor([0, 0, 1, 2])
    module(x, y)
    before = module.centers.clone()
    bad = x.clone()
    bad[1, 1] = poison  # class 0 also has a finite row; class 2's only row is bad
    bad[3, 0] = poison
    features = bad.clone().requires_grad_(True)
    loss = module(features, y)
    loss.backward()
    assert not torch.isfinite(loss)  # reported, for the caller and AMP's GradScaler
    assert (~torch.isfinite(features.grad[[1, 3]])).any(dim=1).all() and torch.isfinite(features.grad[[0, 2]]).all()
    assert torch.isfinite(module.centers).all()
    # class 0 moved by its finite row alone, class 2 not at all; the independent loop on the finite rows:
    keep = [0, 2]
    expected = update_by_loops(
        x[keep].double().numpy(), y[keep].numpy(), before.double().numpy(), 0.5
    )  # the module computes in float32 for half and float32 features
    assert np.allclose(module.centers.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(module.centers[2], before[2])
    for _ in range(3):  # later clean batches: finite losses, as before
        assert torch.isfinite(module(x, y))


def test_under_autocast_an_overflowing_feature_does_not_poison_the_centers():
    """float16 features that overflowed to inf (what autocast can give a backbone) leave the centers finite."""
    module = CenterLoss(2, 2)
    x = torch.tensor([[1.0, 2.0], [7e4, 1.0], [0.5, -0.5]]).half()  # 7e4 rounds to inf in float16
    y = torch.tensor([0, 1, 1])
    assert not torch.isfinite(x).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(x, y)
    assert not torch.isfinite(loss) and torch.isfinite(module.centers).all()
    # class 1: its one finite row moves the zero center alpha * n / (1 + n) = 0.5 * 1 / 2 of the way
    assert torch.allclose(module.centers[1], 0.25 * torch.tensor([0.5, -0.5]))
