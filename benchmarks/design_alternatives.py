"""Two other designs of the chunked ArcFace step, timed against this project's chunked path and torch's.

Issue 14 asked for the chunked path to stay ahead of torch's batch-chunked ``linear_cross_entropy``
(32 rows per block) at every shape of the CPU grid; at B = 256, D = 128, C = 1e4 it is not
(benchmarks/RESULTS.md, "torch's own linear_cross_entropy"). This script answers whether another
design, written with the same eager PyTorch operations, would be: it implements two, checks that
they compute the ArcFace loss and its gradients (against the library's plain path, in float64,
before anything is timed), and times one forward + backward of each (dx and dW, float32) beside the
library's chunked path, the stock chunked function and the chunked path's bare products:

  row-blocked (b rows)   torch's design with a margin: the batch b rows at a time, each block's
                         (b, C) logits computed once over all classes, its softmax exact, and its
                         gradients made right there (dx of the block, its share of dW): 3 products
                         in all instead of 4. Possible only where the upstream gradient is known in
                         the forward pass, i.e. a mean or sum reduction; this one assumes the mean.
                         Holds one (b, C) block, and dW from the forward pass to the backward.
  class-chunked lean (k) this project's design (classes k at a time, the normaliser in forward, the
                         products recomputed in backward: 4 products) with fewer passes over each
                         (B, k) block: the chunk's rows scaled by s / |W_j| on the (k, D) side
                         before the product, exp instead of exp2 (faster on this Xeon,
                         benchmarks/time_exp.py), the norms' chain rule on the (k, D) side (the row
                         dots W_j . (G^T u)_j), no learnable scale, no half precision.

Both keep the library's numerics policy where it costs time: the pair (max, sum) of the online
normaliser, and numerators below tiny / eps flushed to 0 before the exponential (never subnormal).
Both are ArcFace only (fixed scale, unit features and weights), the case the issue measured; the
target logits s cos(theta + m) and their gradients come from the library itself
(``torch_port.margin_logits_from_cosines`` through autograd, a few (B, D) operations), so the
three compute the same thing.

    OMP_NUM_THREADS=1 python benchmarks/design_alternatives.py                 # B, D, C = 256, 128, 1e4
    OMP_NUM_THREADS=1 python benchmarks/design_alternatives.py --shape 256 512 10000
    python benchmarks/design_alternatives.py --quick                           # small, for the tests

Results: benchmarks/RESULTS.md, "The grid on a quiet machine, and other designs at small C".
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

try:
    from benchmarks import bench_margin_ce as bench  # imported (the tests)
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import bench_margin_ce as bench

from torch_port import margin_logits_from_cosines
from torch_port.chunk_loops import exp2_floor
from torch_port.chunked import chunk_size_for
from torch_port.functional import arcface_loss
from torch_port.normalized import arcface_config

SCALE, MARGIN = bench.SCALE, bench.ARC_MARGIN
EPS = 1e-12  # the norms' floor, as F.normalize and the library's unit_rows


def flush_floor(dtype: torch.dtype) -> float:
    """The library's flush threshold (chunk_loops.exp2_floor) in natural-log units."""
    return exp2_floor(dtype) * math.log(2.0)


def feature_side(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, margin: float):
    """With autograd, from the leaves x and W[y] (a copy of the B target rows): the unit features u
    (B, D) and the target logits t = s psi(cos theta_y) (B,)."""
    w_target = W.detach()[y].requires_grad_()
    u = F.normalize(x, eps=EPS)
    cos_y = (u * F.normalize(w_target, eps=EPS)).sum(dim=1, keepdim=True)
    config = arcface_config(SCALE, margin, False)
    t = margin_logits_from_cosines(cos_y, torch.zeros_like(y), config)[:, 0]
    return u, t, w_target


def finish(x, W, y, side, grad_u, grad_t, grad_W):
    """The feature side's backward: dx, and the target rows' share of dW added into the loop's."""
    u, t, w_target = side
    grad_x, grad_target = torch.autograd.grad((u, t), (x, w_target), (grad_u, grad_t))
    x.grad, W.grad = grad_x, grad_W.index_add_(0, y, grad_target)


def norm_chain_(V: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """In place: dW_j from V_j = sum_i G_ij u_i for logits c_j (u_i . W_j), c_j = s / |W_j|:
    dW_j = c_j V_j - s (W_j . V_j) W_j / |W_j|^3 (the derivative of 1 / |W_j| along W_j)."""
    dots = torch.linalg.vecdot(rows, V)
    V.mul_((SCALE / norms)[:, None])
    return V.addcmul_(rows, (dots * (-SCALE) / norms**3)[:, None])


def row_blocked_step(x, W, y, rows: int, margin: float = MARGIN) -> torch.Tensor:
    """One step of the row-blocked design (mean reduction): returns the loss, leaves x.grad, W.grad."""
    batch, num_classes = x.shape[0], W.shape[0]
    side = feature_side(x, W, y, margin)
    u, t = side[:2]
    floor = flush_floor(u.dtype)
    with torch.no_grad():
        units, targets, weights = u.detach(), t.detach(), W.detach()
        norms = torch.linalg.vector_norm(weights, dim=1).clamp_min_(EPS)
        column = SCALE / norms
        block_buffer = units.new_empty(min(rows, batch) * num_classes)
        V = torch.zeros_like(weights)  # sum_i r_i E_ij u_i, then dW (norm_chain_)
        grad_u, lse, others_over_total = torch.empty_like(units), units.new_empty(batch), units.new_empty(batch)
        for first in range(0, batch, rows):
            block = slice(first, min(first + rows, batch))
            n = block.stop - first
            logits = torch.mm(units[block], weights.T, out=block_buffer[: n * num_classes].view(n, -1))
            logits.mul_(column)
            logits[torch.arange(n), y[block]] = -math.inf  # the target enters through t
            peak = torch.maximum(logits.amax(dim=1), targets[block])
            numerators = torch.threshold_(logits.sub_(peak[:, None]), floor, -math.inf).exp_()
            others = numerators.sum(dim=1)
            total = others + torch.exp(targets[block] - peak)
            lse[block] = peak + torch.log(total)
            others_over_total[block] = others / total
            row_factor = (1.0 / batch) / total  # dL/dlse_i = 1/B: the mean, known in the forward pass
            V.addmm_(numerators.T, units[block] * row_factor[:, None])
            torch.mm(numerators.mul_(column), weights, out=grad_u[block]).mul_(row_factor[:, None])
        grad_W = norm_chain_(V, weights, norms)
    loss = (lse - targets).mean()
    finish(x, W, y, side, grad_u, -others_over_total / batch, grad_W)  # dL/dt_i = (p_iy - 1) / B
    return loss


def lean_chunked_step(x, W, y, chunk: int, margin: float = MARGIN) -> torch.Tensor:
    """One step of the lean class-chunked design: forward normaliser, then a backward recomputing
    each chunk's products; returns the loss, leaves x.grad and W.grad."""
    batch, num_classes, dim = x.shape[0], W.shape[0], x.shape[1]
    side = feature_side(x, W, y, margin)
    u, t = side[:2]
    floor = flush_floor(u.dtype)
    bounds = [(start, min(start + chunk, num_classes)) for start in range(0, num_classes, chunk)]
    with torch.no_grad():
        units, targets, weights = u.detach(), t.detach(), W.detach()
        norms = torch.linalg.vector_norm(weights, dim=1).clamp_min_(EPS)
        column = SCALE / norms
        scaled_buffer, block_buffer = units.new_empty(chunk, dim), units.new_empty(batch * chunk)
        chunk_of = torch.div(y, chunk, rounding_mode="floor")
        hits = [(chunk_of == index).nonzero().squeeze(1) for index in range(len(bounds))]
        maxima, sums = units.new_empty(len(bounds), batch), units.new_empty(len(bounds), batch)

        def chunk_logits(index):
            start, stop = bounds[index]
            scaled = torch.mul(weights[start:stop], column[start:stop, None], out=scaled_buffer[: stop - start])
            logits = torch.mm(units, scaled.T, out=block_buffer[: batch * (stop - start)].view(batch, -1))
            return scaled, logits, (hits[index], y[hits[index]] - start)

        for index in range(len(bounds)):  # forward: the normaliser
            _, logits, at_targets = chunk_logits(index)
            logits[at_targets] = -math.inf
            peak = torch.maximum(logits.amax(dim=1), targets, out=maxima[index])
            numerators = torch.threshold_(logits.sub_(peak[:, None]), floor, -math.inf).exp_()
            torch.sum(numerators, dim=1, out=sums[index])
        peak = maxima.amax(dim=0)
        others = sums.mul_(maxima.sub_(peak).exp_()).sum(dim=0)
        total = others + torch.exp(targets - peak)
        lse = peak + torch.log(total)

        row_factor = (1.0 / batch) / total  # the upstream gradient of the mean, here only in backward
        weighted, grad_u, grad_W = units * row_factor[:, None], torch.zeros_like(units), torch.empty_like(weights)
        for index in range(len(bounds)):  # backward: recompute, then G^T u and G W
            start, stop = bounds[index]
            scaled, logits, at_targets = chunk_logits(index)
            numerators = torch.threshold_(logits.sub_(peak[:, None]), floor, -math.inf).exp_()
            numerators[at_targets] = 0.0
            V = torch.mm(numerators.T, weighted, out=grad_W[start:stop])
            grad_u.addmm_(numerators, scaled)
            norm_chain_(V, weights[start:stop], norms[start:stop])
        grad_u.mul_(row_factor[:, None])
    loss = (lse - targets).mean()
    finish(x, W, y, side, grad_u, -(others / total) / batch, grad_W)
    return loss


DESIGNS = {"row-blocked": row_blocked_step, "class-chunked lean": lean_chunked_step}


def verify(design: str, size: int, batch=13, dim=6, num_classes=23, margin=MARGIN, seed=0) -> None:
    """Raises AssertionError unless ``design`` (with ``size`` rows or classes per block) gives the
    loss and gradients of the library's plain ArcFace (s = 64, m = 0.5), in float64, to 1e-9
    relative. The default shape leaves a short last block for any size below it."""
    x, W, y = bench.make_inputs(batch, dim, num_classes, torch.device("cpu"), torch.float64, seed)
    x, W = x.requires_grad_(), W.requires_grad_()
    truth = arcface_loss(x, W, y, s=SCALE, m=MARGIN)
    want = torch.autograd.grad(truth, (x, W))
    got_x, got_W = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    loss = DESIGNS[design](got_x, got_W, y, size, margin)
    for name, value, expected in (("loss", loss, truth), ("dx", got_x.grad, want[0]), ("dW", got_W.grad, want[1])):
        error = float((value.detach() - expected.detach()).abs().max() / expected.detach().abs().max())
        assert error <= 1e-9, f"{design} ({size}): {name} differs from the plain path by {error:.2e} relative"


def design_step(design: str, size: int, x, W, y) -> bench.Step:
    """A timed step of one of DESIGNS (its gradients dropped after each, as bench_margin_ce's steps)."""
    x, W = x.detach().requires_grad_(), W.detach().requires_grad_()
    return bench.Step(lambda: DESIGNS[design](x, W, y, size), (x, W))


def contestants(batch, dim, num_classes, rows_options, chunk):
    x, W, y = bench.make_inputs(batch, dim, num_classes, torch.device("cpu"), torch.float32)
    out = {
        f"chunked (library, k={chunk})": bench.loss_step(bench.project_arcface(chunk), x, W, y),
        f"chunked products only (k={chunk})": bench.chunked_products_step(chunk)(x, W, y),
        f"class-chunked lean (k={chunk})": design_step("class-chunked lean", chunk, x, W, y),
    }
    for rows in rows_options:
        out[f"row-blocked ({rows} rows)"] = design_step("row-blocked", rows, x, W, y)
    if bench.stock_linear_ce is not None and bench.StockOptions is not None:
        out[f"stock chunked ({bench.STOCK_ROWS} rows)"] = bench.stock_step("rows")(x, W, y)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[256, 128, 10000], metavar=("B", "D", "C"))
    parser.add_argument("--rows", nargs="+", type=int, default=[32, 128], help="rows per block (row-blocked)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="B, D, C = 32, 16, 600, 2 repeats")
    parser.add_argument("--json", help="write the times here")
    args = parser.parse_args(argv)
    batch, dim, num_classes = (32, 16, 600) if args.quick else args.shape
    rows_options = [8] if args.quick else args.rows
    chunk = chunk_size_for(batch, num_classes)
    for design, size in [("class-chunked lean", 7), ("class-chunked lean", chunk)] + [
        ("row-blocked", rows) for rows in (5, *rows_options)
    ]:
        verify(design, size)
    print("checked: both designs give the plain path's ArcFace loss, dx and dW (float64, 1e-9 relative)")
    steps = contestants(batch, dim, num_classes, rows_options, chunk)
    times = bench.time_round_robin(steps, torch.device("cpu"), 2 if args.quick else args.repeats)
    library = times[f"chunked (library, k={chunk})"]
    print(f"B={batch} D={dim} C={num_classes}, float32, {torch.get_num_threads()} thread(s), median of rounds")
    print(f"{'implementation':<36} {'ms':>8} {'/ library':>10}")
    for name, seconds in times.items():
        print(f"{name:<36} {1e3 * seconds:>8.2f} {seconds / library:>10.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"shape": [batch, dim, num_classes], "ms": {k: 1e3 * v for k, v in times.items()}}, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
