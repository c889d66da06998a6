"""The speed/memory benchmark (benchmarks/bench_margin_ce.py) times what it says it times.

A benchmark is only as good as the claim that its contestants do the same work. Checked here, on
the benchmark's own inputs and its own step builders:

- every loss implementation it times (naive, pytorch-metric-learning's ArcFace and CosFace, this
  project's plain and chunked paths) returns the gradients of the loss it is named after, against
  the float64 NumPy reference differentiated by HIPS autograd (an independent route);
- the same with bfloat16 inputs, the dtype of the CUDA mode (which CI cannot run): every step
  runs, and this project's paths stay within bfloat16 rounding of the truth;
- the matmul floor does exactly three matrix products, and "chunked products only" does exactly
  the products the chunked path does (both counted by a dispatch-mode probe);
- the memory measurement (a child process per implementation, peak RSS) sees the plain path's
  (B, C) tensors and finds the chunked path under the memory target, 10% of B*C*4;
- the script runs end to end: the grid, --alone, --json, --plot and --from-json.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import autograd
import numpy as np
import pytest
import torch

import refimpl
from benchmarks import bench_margin_ce as bench
from tests.dispatch_probe import OpProbe
from tests.tolerances import Tol, assert_close

BATCH, DIM, CLASSES, CHUNK = 6, 10, 300, 64  # 5 chunks, the last one partial
REFERENCE = {
    "naive": ("arcface_loss", dict(s=bench.SCALE, m=bench.ARC_MARGIN)),
    "pml ArcFaceLoss": ("arcface_loss", dict(s=bench.SCALE, m=bench.ARC_MARGIN)),
    "pml CosFaceLoss": ("cosface_loss", dict(s=bench.SCALE, m=bench.COS_MARGIN)),
    "plain": ("arcface_loss", dict(s=bench.SCALE, m=bench.ARC_MARGIN)),
    "chunked": ("arcface_loss", dict(s=bench.SCALE, m=bench.ARC_MARGIN)),
}


def _loss_steps(x, W, y):
    """The benchmark's steps for the implementations that compute a loss, by short name."""
    steps = {}
    for name, build in bench.implementations(BATCH, CLASSES, CHUNK, "cpu").items():
        short = name.split(" (")[0]
        if short in REFERENCE:
            steps[short] = build(x, W, y)
    return steps


def _gradients(step):
    """Runs the step's forward and backward (without freeing), returns (dx, dW) with dW as (C, D)."""
    step.run()
    features, weights = (leaf.grad.double().numpy() for leaf in step.leaves)
    if weights.shape == (DIM, CLASSES):  # pytorch-metric-learning keeps W as (D, C)
        weights = weights.T
    return features, weights


def _reference_gradients(name, x, W, y):
    loss_name, kwargs = REFERENCE[name]

    def loss(a, b):
        return getattr(refimpl, loss_name)(a, b, y, reduction="mean", **kwargs)

    return autograd.grad(loss, 0)(x, W), autograd.grad(loss, 1)(x, W)


def test_the_comparison_includes_every_implementation():
    """The installed test environment has pytorch-metric-learning (the test extra), so the benchmark
    times its ArcFace and CosFace losses against this project's paths, rather than silently
    dropping the comparison."""
    names = {name.split(" (")[0] for name in bench.implementations(BATCH, CLASSES, CHUNK, "cpu")}
    assert names == {"matmul floor", "chunked products only", *REFERENCE}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_each_step_computes_its_loss(name):
    x, W, y = bench.make_inputs(BATCH, DIM, CLASSES, torch.device("cpu"), torch.float32, seed=1)
    step = _loss_steps(x, W, y)[name]
    dx, dW = _gradients(step)
    ref_dx, ref_dW = _reference_gradients(name, x.double().numpy(), W.double().numpy(), y.numpy())
    assert_close(dx, ref_dx, Tol(rtol=1e-4, atol=1e-5), f"{name} dx")
    assert_close(dW, ref_dW, Tol(rtol=1e-4, atol=1e-5), f"{name} dW")
    step.free()
    assert all(leaf.grad is None for leaf in step.leaves)  # the timed step drops its outputs


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_each_step_runs_on_bfloat16_inputs(name):
    """The CUDA mode feeds bfloat16 x and W. This project's paths compute in float32 and round the
    gradients once, so they are within a few bfloat16 ulps of the truth on the rounded inputs; the
    others compute in bfloat16 (logits s cos with s = 64 carry errors of ~0.25), so for them the
    check is that the step runs and its gradients are finite and of the right size."""
    x, W, y = bench.make_inputs(BATCH, DIM, CLASSES, torch.device("cpu"), torch.bfloat16, seed=2)
    dx, dW = _gradients(_loss_steps(x, W, y)[name])
    ref_dx, ref_dW = _reference_gradients(name, x.double().numpy(), W.double().numpy(), y.numpy())
    assert np.isfinite(dx).all() and np.isfinite(dW).all()
    if name in ("plain", "chunked"):
        assert_close(dx, ref_dx, Tol(rtol=2e-2, atol=2e-3), f"{name} dx")
        assert_close(dW, ref_dW, Tol(rtol=2e-2, atol=2e-3), f"{name} dW")
    else:
        for got, want in ((dx, ref_dx), (dW, ref_dW)):
            assert np.abs(got - want).max() <= 0.5 * np.abs(want).max()


def _count_products(build, x, W, y):
    step = build(x, W, y)
    with OpProbe() as probe:
        step()
    return probe.products


def test_the_floor_and_the_products_only_line_count_what_they_claim():
    x, W, y = bench.make_inputs(BATCH, DIM, CLASSES, torch.device("cpu"), torch.float32)
    impls = {name.split(" (")[0]: build for name, build in bench.implementations(BATCH, CLASSES, CHUNK, "cpu").items()}
    chunks = math.ceil(CLASSES / CHUNK)
    assert _count_products(impls["matmul floor"], x, W, y) == 3
    assert _count_products(impls["chunked"], x, W, y) == 4 * chunks - 1
    assert _count_products(impls["chunked products only"], x, W, y) == 4 * chunks - 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory measurement reads /proc")
def test_memory_measurement_sees_the_batch_by_class_tensors():
    """B*C*4 = 102 MB here: the plain path holds several (B, C) tensors at its peak (logits, their
    softmax, the gradient), the chunked path two (B, k) blocks (2 MiB); the child processes must
    see the difference. (At C = 1e4 the blocks alone are 20% of B*C*4: see benchmarks/RESULTS.md.)"""
    batch, dim, classes = 256, 64, 100_000
    unit, grads = batch * classes * 4, (batch + classes) * dim * 4
    plain = (bench.measure_memory_cpu("plain", batch, dim, classes, None) - grads) / unit
    chunked = (bench.measure_memory_cpu("chunked", batch, dim, classes, None) - grads) / unit
    assert plain >= 2.0, plain
    assert chunked < 0.10, chunked


def test_the_script_runs_end_to_end(tmp_path, capsys):
    out_json, out_png, again_png = tmp_path / "run.json", tmp_path / "run.png", tmp_path / "again.png"
    bench.main(["--quick", "--repeats", "1", "--alone", "--no-memory", "--json", str(out_json), "--plot", str(out_png)])
    rows = json.loads(out_json.read_text())["rows"]
    assert {row["impl"].split(" (")[0] for row in rows} == {"matmul floor", "chunked products only", *REFERENCE}
    for row in rows:
        assert row["seconds"] > 0 and math.isfinite(row["time_ratio"])
        assert math.isfinite(row["alone_ratio"]), row  # every --alone child came back
    assert next(row for row in rows if row["impl"] == "matmul floor")["time_ratio"] == 1.0
    assert out_png.stat().st_size > 0
    bench.main(["--from-json", str(out_json), str(out_json), "--plot", str(again_png)])
    assert again_png.stat().st_size > 0
    assert "| matmul floor" in capsys.readouterr().out


def test_the_chunk_size_sweep_runs():
    """benchmarks/sweep_chunk_size.py (how the CPU chunk size was chosen) runs and prints a ratio per k."""
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/sweep_chunk_size.py",
            "--shape",
            "8",
            "16",
            "600",
            "--k",
            "128",
            "256",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("B=8 D=16 C=600") and "naive" in line and "k=128" in line and "k=256" in line
