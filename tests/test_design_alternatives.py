"""benchmarks/design_alternatives.py times what it says it times; benchmarks/profile_small_c.py runs.

Its two other designs of the chunked ArcFace step compute the ArcFace loss and its gradients: checked
against the NumPy reference differentiated by HIPS autograd (an independent route), for block sizes
that leave a short last block, a block of one and a block larger than the batch or the classes.
Its own check (run before it times anything) rejects a design that computes another margin, and
the script runs end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import autograd
import numpy as np
import pytest
import torch

import refimpl
from benchmarks import design_alternatives as designs

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("design", sorted(designs.DESIGNS))
@pytest.mark.parametrize("size", [1, 4, 7, 50])
def test_each_design_gives_the_reference_loss_and_gradients(design, size):
    x, W, y = designs.bench.make_inputs(9, 5, 20, torch.device("cpu"), torch.float64, seed=4)
    x, W = x.requires_grad_(), W.requires_grad_()

    def reference(a, b):
        return refimpl.arcface_loss(a, b, y.numpy(), s=designs.SCALE, m=designs.MARGIN)

    loss = designs.DESIGNS[design](x, W, y, size)
    want_x, want_W = autograd.grad(reference, (0, 1))(x.detach().numpy(), W.detach().numpy())
    np.testing.assert_allclose(float(loss.detach()), reference(x.detach().numpy(), W.detach().numpy()), rtol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), want_x, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(W.grad.numpy(), want_W, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("design", sorted(designs.DESIGNS))
def test_the_check_rejects_a_design_with_another_margin(design):
    designs.verify(design, 4)
    with pytest.raises(AssertionError, match=design):
        designs.verify(design, 4, margin=designs.MARGIN - 0.1)


def test_the_script_runs_end_to_end(tmp_path):
    out = tmp_path / "times.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "design_alternatives.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    times = json.loads(out.read_text())["ms"]
    assert "checked" in done.stdout
    assert {name.split(" (")[0] for name in times} >= {"chunked", "row-blocked", "class-chunked lean"}
    assert all(value > 0 for value in times.values())


def test_the_profile_script_runs_and_counts_the_chunked_steps_operations():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_small_c.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert "chunked        self CPU per step: products" in done.stdout
    counted = [line for line in done.stdout.splitlines() if line.endswith("aten operations per step")]
    assert len(counted) == 1 and int(counted[0].split()[1]) > 0
