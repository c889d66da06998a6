"""Do subnormal floats slow the losses down? Time one forward + backward on ordinary and on peaked inputs.

A softmax over many classes holds exp(logit_ij - M_i) for every class; where logit_ij - M_i lies
between about -103.97 and -87.34, that number is a subnormal float32 (below 2^-126, the smallest
normal float32; below -103.97 it is exactly 0). Products and exponentials on subnormal operands
take a slow microcode path on many x86 CPUs, so a loss whose softmax is full of them can run many
times slower with the same shapes. ``torch.set_flush_denormal(True)`` makes the CPU treat them as 0
(flush-to-zero and denormals-are-zero), which removes that cost: timing each step with it off and on
shows whether subnormals are the cause.

Inputs (B, D, C of ``--shape``):

- ordinary: x and W of N(0, 1/D) entries (|x|, |W_j| about 1), random labels: an untrained head.
  The stock contestants get (s x/|x|, W/|W|), as in bench_margin_ce.py (logits s cos theta).
- peaked (trained-like): each x_i at 0.1 rad from its class's weight W_{y_i}, W as above. For the
  losses whose logits grow with |x| (the stock one, SphereFace, L-Softmax) |x_i| is set so that the
  target logit is ``--gap`` (default 95: then the other classes' logit - M spreads around -95, in
  the subnormal band); ArcFace's logits do not depend on |x| (target logit 64 cos(0.6) = 52.8).
- unscaled (stock only): x and W of N(0, 1) entries, logits of standard deviation sqrt(D), what
  issue 14 first measured the stock function on.

Contestants: torch.nn.functional.linear_cross_entropy (torch >= 2.13), options=None and 32 rows per
block; and this project's plain and chunked paths of SphereFace (m = 4), L-Softmax (m = 4) and
ArcFace (s = 64, m = 0.5). Each (contestant, flush off/on) pair is one step in a round-robin
(bench_margin_ce.time_round_robin: shuffled order, one warm-up round, the median).

``torch.set_flush_denormal`` sets the flag of the calling thread only: with more than one thread,
the intra-op worker threads keep their subnormals. Hence ``--threads 1`` by default.

Usage:
    python benchmarks/subnormal_trap.py                                   # B, D, C = 256, 512, 1e4
    python benchmarks/subnormal_trap.py --threads 2 --only stock sphereface --gaps 60 95 130
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

try:
    from benchmarks import bench_margin_ce as bench  # imported (the tests)
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import bench_margin_ce as bench

from torch_port.chunked import chunk_size_for
from torch_port.functional import (
    arcface_logits,
    arcface_loss,
    lsoftmax_logits,
    lsoftmax_loss,
    sphereface_logits,
    sphereface_loss,
)

ANGLE = 0.1  # radians between a peaked feature and its class's weight
TINY = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal float32

LOSSES = {
    # name: (loss(x, W, y, chunk_size), logits(x, W, y)), margins at the papers' defaults
    "sphereface": (
        lambda x, W, y, k: sphereface_loss(x, W, y, m=4, chunk_size=k),
        lambda x, W, y: sphereface_logits(x, W, y, m=4),
    ),
    "lsoftmax": (
        lambda x, W, y, k: lsoftmax_loss(x, W, y, m=4, chunk_size=k),
        lambda x, W, y: lsoftmax_logits(x, W, y, m=4),
    ),
    "arcface": (
        lambda x, W, y, k: arcface_loss(x, W, y, s=bench.SCALE, m=bench.ARC_MARGIN, chunk_size=k),
        lambda x, W, y: arcface_logits(x, W, y, s=bench.SCALE, m=bench.ARC_MARGIN),
    ),
}


def stock_logits(x, W, y):
    return x @ W.T


def make_inputs(batch, dim, num_classes, kind: str, loss: str, gap: float, seed: int = 0):
    """x (B, D), W (C, D), y (B,) float32 on the CPU; see the module docstring for ``kind``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    if kind == "unscaled":
        return torch.randn(batch, dim, generator=gen), torch.randn(num_classes, dim, generator=gen), y
    W = torch.randn(num_classes, dim, generator=gen) / math.sqrt(dim)
    if kind == "ordinary":
        x = torch.randn(batch, dim, generator=gen) / math.sqrt(dim)
        return (*bench.stock_inputs(x, W), y) if loss == "stock" else (x, W, y)
    if kind != "peaked":
        raise ValueError(f"kind must be 'ordinary', 'peaked' or 'unscaled', got {kind!r}")
    if loss == "stock":
        W = F.normalize(W)
    w_hat = F.normalize(W[y])
    noise = torch.randn(batch, dim, generator=gen)
    noise = F.normalize(noise - (noise * w_hat).sum(1, keepdim=True) * w_hat)
    x = math.cos(ANGLE) * w_hat + math.sin(ANGLE) * noise  # unit rows at ANGLE from W[y]
    if loss != "arcface":  # logits proportional to |x|: scale each row to a target logit of ``gap``
        target = logits_of(loss)(x, W, y).gather(1, y[:, None])
        x = x * (gap / target)
    return x, W, y


def logits_of(loss: str):
    return stock_logits if loss == "stock" else LOSSES[loss][1]


def softmax_census(logits: torch.Tensor) -> tuple[float, float]:
    """Fractions of the entries exp(logit_ij - M_i) of a float32 softmax's numerators that are
    subnormal (0 < e < 2^-126) and that are exactly 0."""
    with torch.no_grad():
        numerators = torch.exp(logits.float() - logits.float().amax(dim=1, keepdim=True))
        subnormal = ((numerators > 0) & (numerators < TINY)).double().mean().item()
        zero = (numerators == 0).double().mean().item()
    return subnormal, zero


def _step(loss_fn, x, W, y) -> bench.Step:
    """Forward + backward of loss_fn(x, W, y) for fresh leaves x and W (see bench_margin_ce.Step)."""
    x, W = x.detach().requires_grad_(), W.detach().requires_grad_()
    return bench.Step(lambda: loss_fn(x, W, y).backward(), (x, W))


def contestants(loss: str, batch: int, num_classes: int) -> dict:
    """name -> builder(x, W, y) of a bench_margin_ce.Step."""
    if loss == "stock":
        rows = bench.stock_options("rows")
        return {
            "stock linear CE": lambda x, W, y: _step(lambda a, b, c: bench.stock_linear_ce(a, b, c), x, W, y),
            f"stock chunked ({bench.STOCK_ROWS} rows)": lambda x, W, y: _step(
                lambda a, b, c: bench.stock_linear_ce(a, b, c, options=rows), x, W, y
            ),
        }
    k = chunk_size_for(batch, num_classes, "cpu")
    loss_fn = LOSSES[loss][0]
    return {
        "plain": lambda x, W, y: _step(lambda a, b, c: loss_fn(a, b, c, None), x, W, y),
        f"chunked (k={k})": lambda x, W, y: _step(lambda a, b, c: loss_fn(a, b, c, k), x, W, y),
    }


def flushed(step, flag: bool):
    """The step, run with the calling thread's flush-to-zero flag set to ``flag`` (then cleared)."""

    def run():
        torch.set_flush_denormal(flag)
        try:
            step()
        finally:
            torch.set_flush_denormal(False)

    return run


CASES = [
    ("stock", "ordinary"),
    ("stock", "unscaled"),
    ("stock", "peaked"),
    ("sphereface", "ordinary"),
    ("sphereface", "peaked"),
    ("lsoftmax", "ordinary"),
    ("lsoftmax", "peaked"),
    ("arcface", "ordinary"),
    ("arcface", "peaked"),
]


def run(shape, gaps, repeats, only=None) -> list[dict]:
    batch, dim, num_classes = shape
    rows = []
    for loss, kind in CASES:
        if only and loss not in only:
            continue
        for gap in gaps if kind == "peaked" and loss != "arcface" else [math.nan]:
            x, W, y = make_inputs(batch, dim, num_classes, kind, loss, gap)
            logits = logits_of(loss)(x, W, y)
            subnormal, zero = softmax_census(logits)
            target = logits.gather(1, y[:, None]).median().item()
            del logits
            steps = {}
            for name, build in contestants(loss, batch, num_classes).items():
                step = build(x, W, y)
                steps[(name, False)], steps[(name, True)] = flushed(step, False), flushed(step, True)
            times = bench.time_round_robin(steps, torch.device("cpu"), repeats)
            for name in dict.fromkeys(name for name, _ in steps):
                off, on = times[(name, False)], times[(name, True)]
                row = dict(
                    loss=loss, inputs=kind, gap=gap, impl=name, target_logit=target, subnormal=subnormal,
                    zero=zero, off=off, on=on,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{loss:10s} {kind:8s} gap {gap:5.0f}  {name:24s} subnormal {100 * subnormal:5.1f}%  "
                    f"flush off {1e3 * off:8.1f} ms  on {1e3 * on:8.1f} ms  off/on {off / on:5.2f}",
                    flush=True,
                )
    ordinary = {(r["loss"], r["impl"]): r["off"] for r in rows if r["inputs"] == "ordinary"}
    for r in rows:
        r["vs_ordinary"] = r["off"] / ordinary.get((r["loss"], r["impl"]), math.nan)
    return rows


def markdown_table(rows) -> str:
    lines = [
        "| loss | inputs | target logit (median) | contestant | subnormal | zero | flush off (ms) | flush on (ms) "
        "| off / on | off / ordinary's off |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['inputs']} | {r['target_logit']:.1f} | {r['impl']} | {100 * r['subnormal']:.1f}% | "
            f"{100 * r['zero']:.1f}% | {1e3 * r['off']:.1f} | {1e3 * r['on']:.1f} | {r['off'] / r['on']:.2f} | "
            f"{r['vs_ordinary']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[256, 512, 10_000], metavar=("B", "D", "C"))
    parser.add_argument("--gaps", nargs="+", type=float, default=[95.0], help="target logits of peaked inputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (flush is per thread)")
    parser.add_argument("--only", nargs="+", choices=["stock", *LOSSES], help="these losses only")
    args = parser.parse_args(argv)
    if bench.stock_linear_ce is None and (not args.only or "stock" in args.only):
        print("torch has no linear_cross_entropy (torch < 2.13): the stock cases are skipped")
        args.only = [name for name in (args.only or LOSSES) if name != "stock"]
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = run(tuple(args.shape), args.gaps, args.repeats, args.only)
    load = os.getloadavg()
    print(
        f"{bench.machine_description(torch.device('cpu'))}; B, D, C = {tuple(args.shape)}; "
        f"{time.time() - started:.0f} s; load average {load[0]:.2f}"
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
