"""The class-sharded ArcFace step at face-recognition scale, on gloo processes of this machine.

    python benchmarks/sharded_scale.py                    # C = 1e6, D = 512, B = 256 over 4 ranks, chunked
    python benchmarks/sharded_scale.py --quick            # C = 4000, D = 32, B = 32 over 2 ranks: does it run?
    python benchmarks/sharded_scale.py --world 2 --classes 200000 --json out.json
    python benchmarks/sharded_scale.py --device cuda --world 1   # NCCL, one rank per GPU (gpu_check.sh)

Each rank holds its shard of W (C_r = C / R rows, float32), its B / R samples, and runs
``sharded_margin_cross_entropy`` (ArcFace, s = 64, m = 0.5, ``chunk_size``) forward and backward.
Reported per rank:

- step time: the median over ``--steps`` steps (each after a barrier, so the ranks start together);
- peak memory beyond the gradients: peak RSS of one step minus RSS before it (glibc's mmap threshold
  fixed at 64 KiB and the kernel's peak mark reset first, as benchmarks/bench_margin_ce.py does),
  minus the gradients the step returns (dW: C_r * D, dx: B_r * D floats), as a share of B * C_r * 4
  bytes, the (B, C_r) float32 logits the chunked path never builds (B the global batch);
- bytes handed to collectives per step (payloads: what a rank puts into all_gather, all_reduce and
  all_gather_object), against what the method needs: the features gathered (B * D floats received,
  B_r * D sent) and their gradient all-reduced (B * D), a handful of (B,) vectors, and the metadata.
  None of it depends on C.

Then the same step on one process (``margin_cross_entropy`` with the whole W, same chunk size, all
of the machine's threads), for comparison. The ranks share the machine's cores: R processes with
cores / R threads each, so the sharded step is not expected to be faster here; what the numbers show
is that each rank's memory and traffic are those of its shard.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from benchmarks import bench_margin_ce as bench  # imported (the tests)
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import bench_margin_ce as bench
from torch_port.distributed import shard_range, sharded_margin_cross_entropy  # noqa: E402
from torch_port.engine import margin_cross_entropy  # noqa: E402
from torch_port.normalized import arcface_config  # noqa: E402


class TrafficCounter:
    """Sums the payload bytes this process hands to torch.distributed's collectives while active."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._saved = {}

    def __enter__(self):
        counter = self

        def wrap(name, size_of):
            original = self._saved[name] = getattr(dist, name)

            def counted(*args, **kwargs):
                counter.bytes += size_of(*args, **kwargs)
                counter.calls += 1
                return original(*args, **kwargs)

            setattr(dist, name, counted)

        def tensor_bytes(t):
            return t.numel() * t.element_size()

        wrap("all_gather", lambda parts, tensor, *a, **k: tensor_bytes(tensor))
        wrap("all_reduce", lambda tensor, *a, **k: tensor_bytes(tensor))
        wrap("all_gather_object", lambda out, obj, *a, **k: len(repr(obj)))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def make_rank_inputs(args, rank: int, world: int, device):
    start, end = shard_range(args.classes, world, rank)
    batch = len(torch.tensor_split(torch.arange(args.batch), world)[rank])
    gen = torch.Generator().manual_seed(1000 + rank)
    W = torch.randn(end - start, args.dim, generator=gen)
    x = torch.randn(batch, args.dim, generator=gen)
    y = torch.randint(0, args.classes, (batch,), generator=torch.Generator().manual_seed(rank))
    return x.to(device), W.to(device), y.to(device)


def cuda_peak_of(step, device) -> int:
    """On CUDA: the allocator's peak during one step minus what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def rank_main(rank: int, world: int, port: int, args, out_dir: str) -> None:
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    x, W, y = make_rank_inputs(args, rank, world, device)
    config = arcface_config(64.0, 0.5, False)
    x.requires_grad_()
    W.requires_grad_()

    def step():
        loss = sharded_margin_cross_entropy(x, W, y, config, num_classes=args.classes, chunk_size=args.chunk_size)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        return loss

    step()  # warm-up
    x.grad = W.grad = None
    dist.barrier()
    peak = cuda_peak_of(step, device) if cuda else bench.peak_rss_of(step)
    gradients = (W.numel() + x.numel()) * 4
    x.grad = W.grad = None
    with TrafficCounter() as traffic:
        step()
    x.grad = W.grad = None
    times = []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        x.grad = W.grad = None
    result = {
        "rank": rank,
        "classes": W.shape[0],
        "batch": x.shape[0],
        "threads": threads,
        "step_s": statistics.median(times),
        "peak_bytes": peak,
        "work_bytes": peak - gradients,
        "work_share": (peak - gradients) / (args.batch * W.shape[0] * 4),
        "traffic_bytes": traffic.bytes,
        "collective_calls": traffic.calls,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # torch 2.13's CPU build may abort in gloo's teardown at exit (see examples/train_sharded.py)


def single_process(args) -> dict:
    """The same step in this process: the whole W, the same chunk size, every thread."""
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(args.classes, args.dim, generator=gen, requires_grad=True)
    x = torch.randn(args.batch, args.dim, generator=gen, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen)
    config = arcface_config(64.0, 0.5, False)

    def step():
        margin_cross_entropy(x, W, y, config, chunk_size=args.chunk_size).backward()

    step()
    x.grad = W.grad = None
    peak = bench.peak_rss_of(step)
    gradients = (W.numel() + x.numel()) * 4
    x.grad = W.grad = None
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        x.grad = W.grad = None
    work = peak - gradients
    return {
        "step_s": statistics.median(times),
        "threads": torch.get_num_threads(),
        "work_bytes": work,
        "work_share": work / (args.batch * args.classes * 4),
    }


def needed_bytes(batch: int, dim: int, world: int) -> int:
    """The payload the method needs per rank per step: its rows of x (B_r D, the all-gather's send;
    padded to the largest rank's), the (B, D) feature gradient all-reduced, and the (B,) vectors:
    the log-sum-exp's max and sum, the target logits, the loss's gradient (4 all-reduces)."""
    largest = -(-batch // world)
    return 4 * (largest * dim + batch * dim + 4 * batch)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="the global batch, split over the ranks")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="C = 4000, D = 32, B = 32, 2 ranks, 2 steps")
    parser.add_argument("--no-single", action="store_true", help="skip the single-process comparison")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL, rank r on GPU r %% count; no single run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.dim, args.batch, args.world, args.steps = 4_000, 32, 32, 2, 2
    if args.device == "cuda" and args.world > torch.cuda.device_count():
        found = torch.cuda.device_count()
        parser.error(f"--world {args.world} needs as many GPUs (NCCL runs one rank per GPU); found {found}")
    os.environ.update(bench.MEMORY_CHILD_ENV)  # inherited by the spawned ranks (and read by glibc at their start)
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"sharded-scale-{os.getpid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"C={args.classes} D={args.dim} B={args.batch} R={args.world} chunk_size={args.chunk_size}", flush=True)
    mp.spawn(rank_main, args=(args.world, free_port(), args, str(out_dir)), nprocs=args.world, join=True)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(args.world)]
    need = needed_bytes(args.batch, args.dim, args.world)
    print("| rank | classes | samples | threads | step (s) | work memory / (B*C_r*4) | sent per step (KiB) | "
          "needed (KiB) | calls |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in ranks:
        print(
            f"| {r['rank']} | {r['classes']} | {r['batch']} | {r['threads']} | {r['step_s']:.2f} | "
            f"{100 * r['work_share']:.1f}% | {r['traffic_bytes'] / 1024:.1f} | {need / 1024:.1f} | "
            f"{r['collective_calls']} |"
        )
    single = None
    if not args.no_single and args.device == "cpu":
        # MEMORY_CHILD_ENV (glibc's fixed mmap threshold) holds only if an interpreter starts with
        # it: rerun this file as a child for that.
        single = json.loads(
            _child_single(args) if os.environ.get("SHARDED_SCALE_CHILD") is None else json.dumps(single_process(args))
        )
        print(
            f"one process: step {single['step_s']:.2f} s ({single['threads']} threads), work memory "
            f"{100 * single['work_share']:.1f}% of B*C*4"
        )
    if args.json:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        payload = {"args": vars(args), "machine": machine, "ranks": ranks, "needed_bytes": need, "single": single}
        Path(args.json).write_text(json.dumps(payload, indent=1))


def _child_single(args) -> str:
    import subprocess

    command = [
        sys.executable,
        __file__,
        "--single-only",
        json.dumps({k: getattr(args, k) for k in ("classes", "dim", "batch", "chunk_size", "steps")}),
    ]
    env = dict(os.environ, **bench.MEMORY_CHILD_ENV, SHARDED_SCALE_CHILD="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--single-only":
        print(json.dumps(single_process(argparse.Namespace(**json.loads(sys.argv[2])))))
    else:
        main()
