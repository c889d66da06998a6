"""Why the chunked path exponentiates with exp2: torch.exp against torch.exp2 on one (B, k) block.

    python benchmarks/time_exp.py            # B = 256, k = 512 and 1024, float32, 300 calls each

Prints the median time per call of ``torch.exp(src, out=dst)`` and of ``torch.exp2(src, out=dst)``
(the chunked path computes exp(z) as exp2(z log2(e)), torch_port/chunk_loops.py, normaliser), each
timed in rounds that alternate the two so that both see the same machine state.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def per_call(fn, src, dst, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(src, out=dst)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k in args.chunks:
        src = torch.randn(args.batch, k) - 3.0  # logit - M: at most 0 in the path; the sign does not matter here
        dst = torch.empty_like(src)
        times = {"exp": [], "exp2": []}
        for _ in range(args.rounds):
            for name, fn in (("exp", torch.exp), ("exp2", torch.exp2)):
                times[name].append(per_call(fn, src, dst, args.calls))
        exp, exp2 = (statistics.median(times[name]) * 1e6 for name in ("exp", "exp2"))
        print(f"B={args.batch} k={k}: exp {exp:.1f} us, exp2 {exp2:.1f} us per call, exp / exp2 = {exp / exp2:.2f}")


if __name__ == "__main__":
    main()
