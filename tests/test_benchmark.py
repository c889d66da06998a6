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
- the stock contestants (torch.nn.functional.linear_cross_entropy: the reference path and the
  chunked one) return the gradients of plain softmax cross-entropy of x_s W_s^T (autograd of the
  NumPy reference); the benchmark's own check of their losses (``verify_stock``, run before each
  shape is timed) accepts them and rejects a contestant that computes something else;
- the script runs end to end: the grid, --alone, --json, --plot and --from-json, and the stock
  contestants with --quick, the opt-in "stock chunked auto" included;
- benchmarks/subnormal_trap.py: its peaked inputs put the softmax in the subnormal band and its
  ordinary ones do not, and it runs end to end.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import autograd
import numpy as np
import pytest
import torch

import refimpl
from benchmarks import bench_margin_ce as bench
from benchmarks import subnormal_trap as trap
from tests.dispatch_probe import OpProbe
from tests.tolerances import Tol, assert_close

BATCH, DIM, CLASSES, CHUNK = 6, 10, 300, 64  # 5 chunks, the last one partial
ROOT = Path(__file__).resolve().parents[1]
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


STOCK = {"stock linear CE", "stock chunked", "stock chunked auto"}


def test_the_comparison_includes_every_implementation():
    """The installed test environment has pytorch-metric-learning (the test extra) and torch 2.13,
    so the benchmark times pml's ArcFace and CosFace losses and torch's linear_cross_entropy against
    this project's paths, rather than silently dropping the comparison."""
    names = {name.split(" (")[0] for name in bench.implementations(BATCH, CLASSES, CHUNK, "cpu")}
    assert names == {"matmul floor", "chunked products only", *REFERENCE, *STOCK}


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
    assert {row["impl"].split(" (")[0] for row in rows} == {
        "matmul floor",
        "chunked products only",
        *REFERENCE,
        *(STOCK - bench.OPT_IN),  # "stock chunked auto" runs only when --only names it
    }
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
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=bench.child_pythonpath()),
    )
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("B=8 D=16 C=600") and "naive" in line and "k=128" in line and "k=256" in line


# ---- the stock contestants: torch.nn.functional.linear_cross_entropy -------------------------------

needs_stock = pytest.mark.skipif(bench.stock_linear_ce is None, reason="torch < 2.13 has no linear_cross_entropy")
STOCK_BLOCK_ROWS = 4  # BATCH = 6: two blocks of the chunked contestant, the last one partial


def _stock_steps(x, W, y):
    impls = bench.implementations(BATCH, CLASSES, CHUNK, "cpu")
    return {name.split(" (")[0]: build(x, W, y) for name, build in impls.items() if name.startswith("stock")}


def _plain_ce_gradients(x_s, W_s, y):
    """Gradients of plain softmax cross-entropy of x_s W_s^T, float64 NumPy reference + autograd."""

    def loss(a, b):
        return refimpl.cross_entropy(a @ b.T, y, reduction="mean")

    a, b = x_s.double().numpy(), W_s.double().numpy()
    return autograd.grad(loss, 0)(a, b), autograd.grad(loss, 1)(a, b)


@needs_stock
@pytest.mark.parametrize("name", sorted(STOCK))
def test_each_stock_step_computes_plain_linear_cross_entropy(name, monkeypatch):
    """The stock step differentiates plain CE of its own inputs (x_s, W_s) = (s x/|x|, W/|W|): the
    leaves it reports are those inputs, and their gradients are the reference's."""
    monkeypatch.setattr(bench, "STOCK_ROWS", STOCK_BLOCK_ROWS)
    x, W, y = bench.make_inputs(BATCH, DIM, CLASSES, torch.device("cpu"), torch.float32, seed=3)
    step = _stock_steps(x, W, y)[name]
    x_s, W_s = (leaf.detach() for leaf in step.leaves)
    x64, W64 = x.double().numpy(), W.double().numpy()
    unit_x = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    assert_close(x_s.double().numpy(), bench.SCALE * unit_x, Tol(rtol=1e-6, atol=1e-6), "x_s")
    unit_W = W64 / np.linalg.norm(W64, axis=1, keepdims=True)
    assert_close(W_s.double().numpy(), unit_W, Tol(rtol=1e-6, atol=1e-7), "W_s")
    step.run()
    ref_dx, ref_dW = _plain_ce_gradients(x_s, W_s, y.numpy())
    assert_close(step.leaves[0].grad.double().numpy(), ref_dx, Tol(rtol=1e-4, atol=1e-6), f"{name} dx")
    assert_close(step.leaves[1].grad.double().numpy(), ref_dW, Tol(rtol=1e-4, atol=1e-6), f"{name} dW")
    step.free()
    assert all(leaf.grad is None for leaf in step.leaves)


@needs_stock
@pytest.mark.parametrize("name", sorted(STOCK))
def test_each_stock_step_runs_on_bfloat16_inputs(name, monkeypatch):
    """The CUDA mode's dtype: the step runs and its gradients are finite and near the truth (the
    reference path computes the logits in bfloat16: errors of ~0.25 at |logit| = 64)."""
    monkeypatch.setattr(bench, "STOCK_ROWS", STOCK_BLOCK_ROWS)
    x, W, y = bench.make_inputs(BATCH, DIM, CLASSES, torch.device("cpu"), torch.bfloat16, seed=4)
    step = _stock_steps(x, W, y)[name]
    step.run()
    grads = [leaf.grad.double().numpy() for leaf in step.leaves]
    for got, want in zip(grads, _plain_ce_gradients(*(leaf.detach() for leaf in step.leaves), y.numpy())):
        assert np.isfinite(got).all() and got.shape == want.shape
        assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


@needs_stock
@pytest.mark.parametrize("block_entries", [2**24, 2 * CLASSES + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_stock_accepts_the_stock_contestants(dtype, block_entries, monkeypatch):
    """verify_stock's truth is plain CE of x_s W_s^T, which is NormFace (s = SCALE) of x and W; checked
    here against the NumPy reference's normface_loss and cross_entropy, independently of torch; with
    one block of rows, and with blocks of two rows (the truth summed over three blocks)."""
    monkeypatch.setattr(bench, "STOCK_ROWS", STOCK_BLOCK_ROWS)
    monkeypatch.setattr(bench, "VERIFY_BLOCK_ENTRIES", block_entries)
    x, W, y = bench.make_inputs(BATCH, DIM, CLASSES, torch.device("cpu"), dtype, seed=5)
    losses = bench.verify_stock(x, W, y, ["stock linear CE", "stock chunked (4 rows)", "stock chunked auto"])
    x64, W64, labels = x.double().numpy(), W.double().numpy(), y.numpy()
    normface = refimpl.normface_loss(x64, W64, labels, s=bench.SCALE)
    x_s, W_s = (t.double().numpy() for t in bench.stock_inputs(x, W))
    plain = refimpl.cross_entropy(x_s @ W_s.T, labels)
    assert losses["truth"] == pytest.approx(plain, rel=1e-12)
    assert losses["truth"] == pytest.approx(normface, rel=1e-5 if dtype == torch.float32 else 5e-2)
    assert set(losses) == {"truth", "stock linear CE", "stock chunked (4 rows)", "stock chunked auto"}
    for name, value in losses.items():
        assert value == pytest.approx(plain, rel=1e-5 if dtype == torch.float32 else 5e-2), name


@needs_stock
@pytest.mark.parametrize("kind", ["reference", "rows", "auto"])
def test_verify_stock_rejects_a_contestant_that_computes_something_else(kind, monkeypatch):
    """A contestant that scales its logits by 1.01 (a forgotten or doubled factor) fails the check,
    with its name in the message; the other two stay accepted."""
    real = bench.stock_linear_ce
    wrong_options = bench.stock_options(kind)

    def contestant(x, W, y, options=None):
        broken = options == wrong_options if kind != "reference" else options is None
        return real(1.01 * x if broken else x, W, y, options=options)

    monkeypatch.setattr(bench, "stock_linear_ce", contestant)
    x, W, y = bench.make_inputs(BATCH, DIM, CLASSES, torch.device("cpu"), torch.float32, seed=6)
    names = {"reference": "stock linear CE", "rows": "stock chunked (32 rows)", "auto": "stock chunked auto"}
    with pytest.raises(AssertionError, match=re.escape(names[kind])):
        bench.verify_stock(x, W, y, list(names.values()))
    others = [name for key, name in names.items() if key != kind]
    assert set(bench.verify_stock(x, W, y, others)) == {"truth", *others}


@needs_stock
def test_the_stock_contestants_run_with_quick(tmp_path, capsys):
    """--quick with the stock contestants (the opt-in "stock chunked auto" named in --only): each is
    checked before it is timed (the line printed), timed, and its memory measured in a child."""
    out_json = tmp_path / "stock.json"
    only = ["--only", "stock linear CE", "stock chunked", "stock chunked auto"]
    bench.main(["--quick", "--repeats", "1", *only, "--json", str(out_json)])
    rows = json.loads(out_json.read_text())["rows"]
    assert [row["impl"] for row in rows] == [
        "matmul floor",
        "stock linear CE",
        f"stock chunked ({bench.STOCK_ROWS} rows)",
        "stock chunked auto",
    ]
    for row in rows:
        assert row["seconds"] > 0 and math.isfinite(row["time_ratio"]), row
        assert math.isfinite(row["mem_all"]) and row["extra_bytes"] > 0, row
    reference = next(row for row in rows if row["impl"] == "stock linear CE")
    chunked = next(row for row in rows if row["impl"].startswith("stock chunked ("))
    assert reference["mem_work"] > chunked["mem_work"]  # the reference path holds the (B, C) logits
    assert "stock losses = the project's CE of x_s W_s^T" in capsys.readouterr().out


# ---- benchmarks/subnormal_trap.py ------------------------------------------------------------------


def _subnormal_fraction(logits: torch.Tensor) -> float:
    """NumPy's count of subnormal float32 softmax numerators exp(logit - max), for the census."""
    z = logits.detach().float().numpy()
    e = np.exp(z - z.max(axis=1, keepdims=True), dtype=np.float32)
    return float(((e > 0) & (e < np.finfo(np.float32).tiny)).mean())


@pytest.mark.parametrize("loss", ["stock", "sphereface", "lsoftmax", "arcface"])
def test_the_trap_script_puts_peaked_inputs_in_the_subnormal_band(loss):
    """Peaked inputs put most softmax numerators of the losses whose logits grow with |x| in the
    subnormal band (target logit = the gap, 95); ordinary inputs put none there; ArcFace's logits
    are bounded by s = 64, so its peaked inputs (target 64 cos(0.6)) put none there either."""
    if loss == "stock" and bench.stock_linear_ce is None:
        pytest.skip("torch < 2.13")
    shape = (16, 64, 2000)
    peaked = trap.make_inputs(*shape, "peaked", loss, gap=95.0)
    logits = trap.logits_of(loss)(*peaked)
    targets = logits.gather(1, peaked[2][:, None]).squeeze(1)
    subnormal = trap.softmax_census(logits)[0]
    assert subnormal == pytest.approx(_subnormal_fraction(logits), abs=1e-12)
    if loss == "arcface":
        assert targets.numpy() == pytest.approx(bench.SCALE * math.cos(trap.ANGLE + bench.ARC_MARGIN), rel=1e-4)
        assert subnormal == 0.0
    else:
        assert targets.numpy() == pytest.approx(95.0, rel=1e-4)
        assert subnormal > 0.3, subnormal
    ordinary = trap.make_inputs(*shape, "ordinary", loss, gap=95.0)
    assert trap.softmax_census(trap.logits_of(loss)(*ordinary)) == (0.0, 0.0)


def test_the_trap_script_unscaled_stock_inputs_are_in_the_band():
    """The inputs issue 14 first gave the stock function, N(0, 1) x and W at D = 512: logits of
    standard deviation sqrt(512), a quarter of the softmax numerators subnormal."""
    logits = trap.stock_logits(*trap.make_inputs(16, 512, 2000, "unscaled", "stock", gap=95.0))
    assert 0.1 < trap.softmax_census(logits)[0] == pytest.approx(_subnormal_fraction(logits), abs=1e-12)


def test_the_trap_script_runs():
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/subnormal_trap.py",
            *("--shape", "8", "16", "300", "--repeats", "1", "--only", "stock", "sphereface"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=bench.child_pythonpath()),
    )
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cases = {(line.split(" | ")[0][2:], line.split(" | ")[1]) for line in table}
    expected = {("sphereface", "ordinary"), ("sphereface", "peaked")}
    if bench.stock_linear_ce is not None:
        expected |= {("stock", "ordinary"), ("stock", "unscaled"), ("stock", "peaked")}
    assert cases == expected
    assert len(table) == 2 * len(expected)  # two contestants per case
