"""Where a chunked ArcFace step and torch's 32-row chunked linear_cross_entropy spend their time.

For one shape (default B = 256, D = 128, C = 1e4, float32, the inputs of bench_margin_ce), prints:

- for each of the two steps (forward + backward, dx and dW), torch.profiler's self CPU time per step
  split into the matrix products (aten::mm, addmm, addmm_) and everything else;
- the number of aten operations one chunked step dispatches (a TorchDispatchMode counting calls;
  the stock step is one custom operator at that level, so it is not counted);
- the time of the chunked step with the same number of chunks and negligible arithmetic
  (B = 8, D = 8, the same C and chunk size): its Python and dispatch cost alone.

    OMP_NUM_THREADS=1 python benchmarks/profile_small_c.py
    python benchmarks/profile_small_c.py --quick        # small, for the tests

Results: benchmarks/RESULTS.md, "The grid on a quiet machine, and other designs at small C".
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

try:
    from benchmarks import bench_margin_ce as bench  # imported (the tests)
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import bench_margin_ce as bench

from torch_port.chunked import chunk_size_for

PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_"}


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def chunked_step(batch, dim, num_classes, chunk) -> bench.Step:
    x, W, y = bench.make_inputs(batch, dim, num_classes, torch.device("cpu"), torch.float32)
    return bench.loss_step(bench.project_arcface(chunk), x, W, y)


def split_self_time(step, steps: int) -> tuple[float, float]:
    """(products, the rest): milliseconds of self CPU time per step, by torch.profiler."""
    step()
    with profile() as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS)
    total = sum(e.self_cpu_time_total for e in events)
    return products / 1e3 / steps, (total - products) / 1e3 / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[256, 128, 10000], metavar=("B", "D", "C"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="B, D, C = 32, 16, 600, 2 steps")
    args = parser.parse_args(argv)
    batch, dim, num_classes = (32, 16, 600) if args.quick else args.shape
    steps = 2 if args.quick else args.steps
    chunk = chunk_size_for(batch, num_classes)
    x, W, y = bench.make_inputs(batch, dim, num_classes, torch.device("cpu"), torch.float32)
    contestants = {"chunked": chunked_step(batch, dim, num_classes, chunk)}
    if bench.stock_linear_ce is not None and bench.StockOptions is not None:
        contestants["stock chunked"] = bench.stock_step("rows")(x, W, y)
    print(f"B={batch} D={dim} C={num_classes}, k={chunk}, {torch.get_num_threads()} thread(s)")
    for name, step in contestants.items():
        products, rest = split_self_time(step, steps)
        print(f"{name:<14} self CPU per step: products {products:.2f} ms, everything else {rest:.2f} ms")
    with CountOps() as counter:
        contestants["chunked"]()
    print(f"chunked: {counter.calls} aten operations per step")
    small = bench.time_round_robin({"small": chunked_step(8, 8, num_classes, chunk)}, torch.device("cpu"), 21)
    chunks = len(range(0, num_classes, chunk))
    print(f"chunked at B=8, D=8 (the same {chunks} chunks): {1e3 * small['small']:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
