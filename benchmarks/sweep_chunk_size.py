"""Time of the chunked path at several chunk sizes, against the matmul floor and the naive loss.

For each shape, one process runs the floor, naive and the chunked path at every k round-robin
(bench_margin_ce.time_round_robin: shuffled order per round, one warm-up round, the median), and
prints time / floor for each. This is how the CPU default of torch_port.chunked.chunk_size_for was
chosen (benchmarks/RESULTS.md, "Chunk size").

Usage:
    python benchmarks/sweep_chunk_size.py --shape 256 512 100000 --k 384 512 768 1024 --repeats 9
    python benchmarks/sweep_chunk_size.py --shape 256 128 10000 --shape 256 128 30000 --k 128 256 512 1024
"""

from __future__ import annotations

import argparse

import bench_margin_ce as bench
import torch


def sweep(shape, chunk_sizes, repeats: int) -> dict[str, float]:
    batch, dim, num_classes = shape
    x, W, y = bench.make_inputs(batch, dim, num_classes, torch.device("cpu"), torch.float32)
    steps = {
        "floor": bench.floor_step(x, W, y),
        "naive": bench.loss_step(bench.naive_arcface, x, W, y),
    }
    for k in chunk_sizes:
        steps[f"k={k}"] = bench.loss_step(bench.project_arcface(k), x, W, y)
    times = bench.time_round_robin(steps, torch.device("cpu"), repeats)
    return {name: seconds / times["floor"] for name, seconds in times.items() if name != "floor"} | {
        "floor ms": 1e3 * times["floor"]
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=3, type=int, action="append", required=True, metavar=("B", "D", "C"))
    parser.add_argument("--k", nargs="+", type=int, required=True, help="chunk sizes")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    for shape in args.shape:
        ratios = sweep(shape, args.k, args.repeats)
        floor = ratios.pop("floor ms")
        cells = "  ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items())
        print(f"B={shape[0]} D={shape[1]} C={shape[2]}  floor {floor:.1f} ms  {cells}", flush=True)


if __name__ == "__main__":
    main()
