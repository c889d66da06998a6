"""Speed and memory of the checkpointed chunked path (torch_port/chunked_generic.py) against the plain path.

Sub-center ArcFace (k sub-centres per class) and CurricularFace (hard negatives modulated from the
target side) are computed on the chunked path by ordinary autograd over class chunks under
activation checkpointing, not by the hand-written loops of ArcFace & co. This script measures what
that costs: one forward + backward (dx and dW) per step, float32, on the CPU, for each loss on the
plain path (the (B, C) logits at once) and on the chunked path (``chunk_size_for(B, C)`` classes per
chunk), with ArcFace's hand-written chunked path beside them for scale. Time: the median of
``--repeats`` round-robin rounds (bench_margin_ce.time_round_robin). Memory: the peak RSS of one
step beyond the RSS before it, in units of B * C * 4 bytes (one float32 (B, C) tensor), measured in
this process after the timing (set MALLOC_MMAP_THRESHOLD_=65536, as bench_margin_ce's children do,
so that freed blocks go back to the OS and the peak follows the live tensors).

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python benchmarks/bench_generic_chunked.py
    python benchmarks/bench_generic_chunked.py --quick            # a small shape, for the tests

Results: benchmarks/RESULTS.md, "The checkpointed chunked path".
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

try:
    from benchmarks import bench_margin_ce as bench  # imported (the tests)
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import bench_margin_ce as bench

from torch_port.chunked import chunk_size_for
from torch_port.functional import arcface_loss, curricularface_loss, subcenter_arcface_loss

LOSSES = {
    "ArcFace": lambda x, W, y, chunk: arcface_loss(x, W, y, chunk_size=chunk),
    "Sub-center ArcFace (k=3)": lambda x, W, y, chunk: subcenter_arcface_loss(x, W, y, k=3, chunk_size=chunk),
    "CurricularFace (t=0.3)": lambda x, W, y, chunk: curricularface_loss(x, W, y, t=0.3, chunk_size=chunk),
}
ROWS_PER_CLASS = {"Sub-center ArcFace (k=3)": 3}


def steps(batch: int, dim: int, num_classes: int) -> dict:
    chunk = chunk_size_for(batch, num_classes)
    out = {}
    for name, loss in LOSSES.items():
        rows = num_classes * ROWS_PER_CLASS.get(name, 1)
        x, W, y = bench.make_inputs(batch, dim, rows, torch.device("cpu"), torch.float32)
        y = y % num_classes
        x.requires_grad_(), W.requires_grad_()
        for path, size in (("plain", None), (f"chunked (k={chunk})", chunk)):

            def step(loss=loss, x=x, W=W, y=y, size=size):
                value = loss(x, W, y, size)
                torch.autograd.grad(value, (x, W))

            out[(name, path)] = step
    return out


def run(batch: int, dim: int, num_classes: int, repeats: int) -> list[dict]:
    table = steps(batch, dim, num_classes)
    times = bench.time_round_robin({f"{a} | {b}": s for (a, b), s in table.items()}, torch.device("cpu"), repeats)
    rows = []
    for (name, path), step in table.items():
        peak = bench.peak_rss_of(step)
        rows.append(
            {
                "loss": name,
                "path": path,
                "B": batch,
                "D": dim,
                "C": num_classes,
                "ms": 1e3 * times[f"{name} | {path}"],
                "memory / (B*C*4)": peak / (batch * num_classes * 4),
            }
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[256, 128, 10000], metavar=("B", "D", "C"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="B, D, C = 32, 16, 600, 2 repeats")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    batch, dim, num_classes = (32, 16, 600) if args.quick else args.shape
    rows = run(batch, dim, num_classes, 2 if args.quick else args.repeats)
    print(f"B={batch} D={dim} C={num_classes}, threads={torch.get_num_threads()}")
    print(f"{'loss':<26} {'path':<18} {'ms':>9} {'mem/(B*C*4)':>12}")
    for row in rows:
        print(f"{row['loss']:<26} {row['path']:<18} {row['ms']:>9.1f} {row['memory / (B*C*4)']:>12.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
