"""Speed and memory of an ArcFace-style margin cross-entropy with very many classes.

Compares, on the same x (B, D), W (C, D) and labels y, one forward + backward (gradients for x and W):

  matmul floor    the three bare products of the same shapes, x W^T, G W, G^T x (no loss at all)
  naive           normalize, matmul, margin on the target column, F.cross_entropy
  pml ArcFace     pytorch-metric-learning's ArcFaceLoss and CosFaceLoss with the same weights
  pml CosFace     (only when pytorch-metric-learning is installed; skipped otherwise)
  plain           this project's engine, chunk_size=None (the (B, C) logits at once)
  chunked         this project's engine, chunk_size=k (torch_port/chunked.py)
  chunked products only   the matrix products the chunked path does (x W_c^T in forward; x W_c^T
                  again but for the last chunk, G_c^T x, G_c W_c in backward) and nothing else
  stock linear CE torch.nn.functional.linear_cross_entropy (torch >= 2.13), options=None: the
                  unfused reference, F.linear then F.cross_entropy
  stock chunked   the same with LinearCrossEntropyOptions(batch_chunk_size=32): the batch in blocks
                  of 32 rows, each (32, C) block of logits computed once, the gradients computed
                  in the forward pass
  stock chunked auto   (only when named in --only) LinearCrossEntropyOptions(): torch's own choice
                  of rows per block, 1 to 8 at the CPU grid's shapes

The stock contestants compute plain linear cross-entropy, no normalisation and no margin: a floor
for what a margin loss can cost. They get x_s = s x/|x| and W_s = W/|W| (made once, outside the
timed step), so that their logits x_s W_s^T = s cos(theta) are exactly the margin-free logits of the
margin losses, with the same spread. Unscaled random inputs would make very different logits (std
sqrt(D) for x and W of unit-variance entries) whose softmax is full of subnormal floats, which
made the stock step 18x-24x slower on an Intel Xeon (benchmarks/RESULTS.md, "Subnormal floats").
Before timing a shape, ``verify_stock`` checks that each stock contestant's loss on those inputs
is this project's plain softmax cross-entropy of them (and NormFace's of x and W).

Time: one process, the implementations run round-robin (one run of each per round, so a slow
moment of the machine hits all of them), median of ``--repeats`` rounds after one warm-up round;
reported in ms and as a ratio to the matmul floor.

Alone (``--alone``, CPU): each implementation also runs round-robin with the floor only, in a
fresh child interpreter, and that ratio is reported beside the first. In the shared round-robin
the big implementations allocate and free gigabytes between the others' steps, and on the VM this
was measured on, that alone moved the chunked path's ratio by up to 15%; the pair is what a
training loop with only that loss in its process sees.

Memory: on CPU each (implementation, shape) runs in a fresh child interpreter: it builds the
inputs, runs one warm-up step, frees its gradients and returns freed heap to the OS (malloc_trim),
resets the kernel's peak-RSS mark (/proc/self/clear_refs), then runs one measured step; glibc's
mmap threshold is fixed at 64 KiB there (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave RSS
and the peak counts live tensors rather than heap fragmentation (see MEMORY_CHILD_ENV).
extra = peak RSS - RSS before that step. On CUDA: torch.cuda.max_memory_allocated() - allocated
before the step, in this process. Reported as extra / (B*C*4 bytes), in two forms: "all" counts
everything; "work" subtracts the gradients the step must return (dx: B*D, dW: C*D, in the inputs'
dtype), which every implementation holds at the end and which the caller owns.

Usage:
    python benchmarks/bench_margin_ce.py                       # the grid of this machine (CPU, or CUDA)
    python benchmarks/bench_margin_ce.py --quick               # one small shape: does it run?
    python benchmarks/bench_margin_ce.py --plot out.png --json out.json
    python benchmarks/bench_margin_ce.py --alone                # and each one against the floor alone
    python benchmarks/bench_margin_ce.py --from-json out.json --plot out.png   # redraw only
    python benchmarks/bench_margin_ce.py --from-json a.json b.json --plot out.png   # several runs
    python benchmarks/bench_margin_ce.py --shape 256 512 100000 --only chunked --chunk-size 2048 --no-memory
    python benchmarks/bench_margin_ce.py --shape 256 512 100000 --only chunked "stock chunked auto" --no-memory

CPU grid: B = 256, D in {128, 512}, C in {1e4, 3e4, 1e5}, float32. CUDA grid: bf16 inputs,
D = 512, B in {1024, 4096}, C in {1e5, 3e5, 1e6}; TF32 matmuls are allowed on CUDA for every
implementation (the port computes half inputs in float32, so without TF32 it would run fp32
products against bf16 ones; ``--no-tf32`` turns this off).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_port
from torch_port.chunked import chunk_size_for
from torch_port.functional import arcface_loss, cross_entropy, normface_loss

SCALE, ARC_MARGIN, COS_MARGIN = 64.0, 0.5, 0.35
CPU_GRID = [(256, d, c) for d in (128, 512) for c in (10_000, 30_000, 100_000)]
CUDA_GRID = [(b, 512, c) for b in (1024, 4096) for c in (100_000, 300_000, 1_000_000)]
QUICK_GRID = [(64, 64, 5_000)]

try:
    from pytorch_metric_learning import losses as pml_losses
except ImportError:
    pml_losses = None

# torch.nn.functional.linear_cross_entropy and its options came with torch 2.13; older torch: skipped.
stock_linear_ce = getattr(F, "linear_cross_entropy", None)
StockOptions = getattr(torch.nn, "LinearCrossEntropyOptions", None)
STOCK_ROWS = 32  # rows per block of the stock chunked contestant (the setting issue 14 measured)
OPT_IN = {"stock chunked auto"}  # slow (1-8 rows per block here): timed only when named in --only


# ---- the implementations: each builds, from (x, W, y), a step doing forward + backward -----------------


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


class Step:
    """One forward + backward, then the gradients it produced are dropped again.

    Dropping them is part of the step (and of its time), as it is for the floor, whose outputs are
    freed when its function returns: every implementation allocates and releases the memory of its
    step inside the timed region, and none holds hundreds of MB of gradients while the others run
    (on this VM that changed what the next allocation costs by up to 30%).
    """

    def __init__(self, run: Callable[[], None], leaves=()):
        self.run, self.leaves = run, leaves

    def free(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def __call__(self) -> None:
        self.run()
        self.free()


def loss_step(loss_fn: Callable, x, W, y) -> Step:
    x, W = _leaf(x), _leaf(W)
    return Step(lambda: loss_fn(x, W, y).backward(), (x, W))


def floor_step(x, W, y) -> Step:
    """The bare products of a linear layer's forward and backward: x W^T, G W, G^T x (G = the logits)."""

    def run():
        logits = x @ W.T
        logits @ W, logits.T @ x

    return Step(run)


def chunked_products_step(chunk_size: int):
    """The matrix products of the chunked path, and nothing else: per chunk x W_c^T (forward), then
    x W_c^T again (except for the last chunk, whose products the path keeps), G_c^T x and G_c W_c
    (backward): 4n - 1 products for n chunks. The floor of that design."""

    def build(x, W, y):
        def run():
            num_classes, batch = W.shape[0], x.shape[0]
            starts = list(range(0, num_classes, chunk_size))
            block = torch.empty(batch * min(chunk_size, num_classes), dtype=x.dtype, device=x.device)
            for start in starts:
                rows = W[start : start + chunk_size]
                torch.mm(x, rows.T, out=block[: batch * rows.shape[0]].view(batch, -1))
            grad_W, grad_x = torch.empty_like(W), torch.zeros_like(x)
            for position, start in enumerate([starts[-1], *starts[:-1]]):
                rows = W[start : start + chunk_size]
                logits = block[: batch * rows.shape[0]].view(batch, -1)
                if position:  # the last chunk's products are still in the block
                    torch.mm(x, rows.T, out=logits)
                torch.mm(logits.T, x, out=grad_W[start : start + chunk_size])
                grad_x.addmm_(logits, rows)

        return Step(run)

    return build


def naive_arcface(x, W, y):
    cos = F.normalize(x) @ F.normalize(W).T
    cos_y = cos.gather(1, y[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
    logits = cos.scatter(1, y[:, None], torch.cos(torch.acos(cos_y) + ARC_MARGIN))
    return F.cross_entropy(SCALE * logits, y)


def project_arcface(chunk_size):
    def loss(x, W, y):
        return arcface_loss(x, W, y, s=SCALE, m=ARC_MARGIN, chunk_size=chunk_size)

    return loss


def pml_step(kind: str):
    def build(x, W, y):
        num_classes, dim = W.shape
        if kind == "arcface":
            module = pml_losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(ARC_MARGIN), scale=SCALE)
        else:
            module = pml_losses.CosFaceLoss(num_classes, dim, margin=COS_MARGIN, scale=SCALE)
        module = module.to(device=W.device)
        with torch.no_grad():  # the same weights (pml keeps them as (D, C))
            module.W.data = W.T.contiguous()
        features = _leaf(x)
        return Step(lambda: module(features, y).backward(), (features, module.W))

    return build


def stock_inputs(x: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s x/|x|, W/|W|) in the inputs' dtype, so that x_s W_s^T = s cos(theta): the margin losses'
    logits without the margin (normalised in float32 for half inputs, then rounded once)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x_s = SCALE * F.normalize(x.to(compute))
    return x_s.to(x.dtype), F.normalize(W.to(compute)).to(W.dtype)


def stock_options(kind: str):
    """None (the reference path), or the options of the stock chunked contestants."""
    if kind == "reference":
        return None
    return StockOptions(batch_chunk_size=STOCK_ROWS) if kind == "rows" else StockOptions()


def stock_step(kind: str):
    """torch's linear_cross_entropy on (x_s, W_s) of :func:`stock_inputs`; kind: "reference",
    "rows" (STOCK_ROWS rows per block) or "auto" (torch's own choice)."""

    def build(x, W, y):
        x_s, W_s = (_leaf(t) for t in stock_inputs(x, W))
        options = stock_options(kind)
        return Step(lambda: stock_linear_ce(x_s, W_s, y, options=options).backward(), (x_s, W_s))

    return build


def stock_auto_rows(batch: int, dim: int, num_classes: int, dtype, device) -> int | None:
    """The rows per block torch's default options pick for this shape, for the report only (read
    through the options' internal resolution, so None when that is not available)."""
    try:
        adjusted = StockOptions()._adjust(batch, dim, num_classes, dtype, torch.device(device))
        return int(adjusted.batch_chunk_size)
    except Exception:  # a private method of torch: any change there only loses the label
        return None


# Relative tolerance of a stock contestant's loss against the float64 truth, by input dtype: float32
# rounds each logit once (a few 1e-7 relative at |logit| <= 64); bfloat16 rounds x_s, W_s and, on the
# reference path, the logits themselves (up to 0.125 at |logit| = 64).
STOCK_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
VERIFY_BLOCK_ENTRIES = 2**24  # float64 logits per block of rows in verify_stock: 128 MiB


def verify_stock(x, W, y, names) -> dict[str, float]:
    """Checks that the stock contestants compute this project's plain softmax cross-entropy.

    The truth is the float64 cross-entropy of the logits x_s W_s^T of the stock contestants' own
    inputs (:func:`stock_inputs`), computed two ways that must agree to 1e-10: this project's
    ``torch_port.functional.cross_entropy`` and ``F.cross_entropy``; and it must be this project's
    NormFace loss (s = SCALE, plain path) of the original x and W to within the rounding of x_s and
    W_s. (All three a block of rows at a time: at most 128 MiB of float64 logits, whatever B and C.)
    Then each stock contestant in ``names`` (forward only, the options it is timed with) must be
    within STOCK_RTOL of it. Raises AssertionError naming the contestant otherwise; returns the
    losses (the truth as "truth"; NaN for a contestant that ran out of memory).
    """
    x_s, W_s = stock_inputs(x, W)
    rtol = STOCK_RTOL.get(x.dtype, 1e-4)
    with torch.no_grad():
        W64, W_s64 = W.double(), W_s.double()
        rows = max(1, VERIFY_BLOCK_ENTRIES // W.shape[0])
        truth = second = normface = 0.0
        for first in range(0, x.shape[0], rows):
            block, labels = slice(first, first + rows), y[first : first + rows]
            logits = x_s[block].double() @ W_s64.T
            truth += cross_entropy(logits, labels, reduction="sum").item()
            second += F.cross_entropy(logits, labels, reduction="sum").item()
            del logits
            normface += normface_loss(x[block].double(), W64, labels, s=SCALE, reduction="sum").item()
        del W64, W_s64
        truth, second, normface = (value / x.shape[0] for value in (truth, second, normface))
        assert abs(truth - second) <= 1e-10 * abs(truth), f"project CE {truth} != F.cross_entropy {second}"
        assert abs(truth - normface) <= rtol * abs(truth), f"CE of x_s W_s^T {truth} != NormFace {normface}"
        losses = {"truth": truth}
        kinds = {"stock linear CE": "reference", "stock chunked": "rows", "stock chunked auto": "auto"}
        for name in names:
            try:
                got = stock_linear_ce(x_s, W_s, y, options=stock_options(kinds[name.split(" (")[0]])).float().item()
            except torch.OutOfMemoryError:
                losses[name] = math.nan
                continue
            assert abs(got - truth) <= rtol * abs(truth) + 1e-6, f"{name}: loss {got}, truth {truth} (rtol {rtol})"
            losses[name] = got
    return losses


def implementations(batch: int, num_classes: int, chunk_size: int | None, device) -> dict[str, Callable]:
    chunk = chunk_size or chunk_size_for(batch, num_classes, device)
    impls = {
        "matmul floor": floor_step,
        "naive": lambda x, W, y: loss_step(naive_arcface, x, W, y),
    }
    if pml_losses is not None:
        impls["pml ArcFaceLoss"] = pml_step("arcface")
        impls["pml CosFaceLoss"] = pml_step("cosface")
    impls["plain"] = lambda x, W, y: loss_step(project_arcface(None), x, W, y)
    impls[f"chunked (k={chunk})"] = lambda x, W, y: loss_step(project_arcface(chunk), x, W, y)
    impls[f"chunked products only (k={chunk})"] = chunked_products_step(chunk)
    if stock_linear_ce is not None and StockOptions is not None:
        impls["stock linear CE"] = stock_step("reference")
        impls[f"stock chunked ({STOCK_ROWS} rows)"] = stock_step("rows")
        impls["stock chunked auto"] = stock_step("auto")
    return impls


def make_inputs(batch, dim, num_classes, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen).to(device=device, dtype=dtype)
    W = (0.01 * torch.randn(num_classes, dim, generator=gen)).to(device=device, dtype=dtype)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return x, W, y


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- time ---------------------------------------------------------------------------------------------


def time_round_robin(steps: dict[str, Callable], device, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per step; each round runs every implementation once, after one warm-up round.

    The order within a round is shuffled (seeded): what runs just before an implementation changes
    its time (a neighbour that freed 1 GB makes the next allocations fault in fresh pages), and a
    fixed order would hand that cost to the same implementation every round.
    """
    runs = {name: [] for name in steps}
    order = random.Random(seed)
    for round_index in range(repeats + 1):
        names = list(steps)
        order.shuffle(names)
        for name in names:
            step = steps[name]
            if runs[name] is None:
                continue  # ran out of memory before
            _sync(device)
            start = time.perf_counter()
            try:
                step()
                _sync(device)
            except torch.OutOfMemoryError:
                runs[name] = None
            if runs[name] is not None and round_index > 0:
                runs[name].append(time.perf_counter() - start)
    return {name: (statistics.median(r) if r else math.nan) for name, r in runs.items()}


# ---- memory -------------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_of(step) -> int:
    """Peak RSS of one call of step() minus RSS just before it, in bytes (Linux /proc: VmHWM reset
    to the current RSS first)."""
    gc.collect()
    release_freed_heap()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    before = status_kib("VmRSS")
    step()
    return (status_kib("VmHWM") - before) * 1024


def release_freed_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child_measure_memory(impl: str, batch: int, dim: int, num_classes: int, chunk_size: int | None) -> int:
    """Runs in a fresh interpreter: peak RSS of one step minus RSS just before it, in bytes."""
    x, W, y = make_inputs(batch, dim, num_classes, torch.device("cpu"), torch.float32)
    steps = implementations(batch, num_classes, chunk_size, "cpu")
    step = steps[next(name for name in steps if name.split(" (")[0] == impl)](x, W, y)
    step()  # warm-up: one-time allocations (thread pools, BLAS buffers) are not the loss's
    gc.collect()
    release_freed_heap()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = status_kib("VmRSS")
    step()
    return (status_kib("VmHWM") - before) * 1024


def child_measure_pair(impl: str, batch: int, dim: int, num_classes: int, chunk_size, repeats: int) -> dict:
    """Runs in a fresh interpreter: the implementation and the floor alone, round-robin."""
    x, W, y = make_inputs(batch, dim, num_classes, torch.device("cpu"), torch.float32)
    steps = implementations(batch, num_classes, chunk_size, "cpu")
    name = next(name for name in steps if name.split(" (")[0] == impl)
    pair = {"matmul floor": steps["matmul floor"](x, W, y), name: steps[name](x, W, y)}
    times = time_round_robin(pair, torch.device("cpu"), repeats)
    return {"floor": times["matmul floor"], "impl": times[name]}


def child_pythonpath() -> str:
    """PYTHONPATH for a child interpreter: the folder this process imported torch_port from first, so
    that the child measures the same code (a script's sys.path starts at benchmarks/, where an
    editable install or another checkout could otherwise supply a different torch_port)."""
    here = str(Path(torch_port.__file__).resolve().parents[1])
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])


def _run_child(flag: str, impl: str, batch, dim, num_classes, chunk_size, *extra, env=None) -> str | None:
    command = [sys.executable, __file__, flag, impl, str(batch), str(dim), str(num_classes), str(chunk_size or 0)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=child_pythonpath(), **(env or {}))
    done = subprocess.run([*command, *map(str, extra)], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(f"  {flag} child for {impl} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return done.stdout.strip().splitlines()[-1]


def measure_pair_cpu(impl: str, batch, dim, num_classes, chunk_size, repeats) -> float:
    """time / floor with nothing else in the process (a fresh child runs the two round-robin)."""
    out = _run_child("--child-pair", impl, batch, dim, num_classes, chunk_size, repeats)
    if out is None:
        return math.nan
    times = json.loads(out)
    return times["impl"] / times["floor"]


# glibc serves allocations above its mmap threshold with their own pages, which go back to the OS
# on free, and smaller ones from the heap, whose freed holes stay resident. By default the threshold
# follows the largest block freed so far (up to 32 MiB): after a warm-up step has freed its
# gradients, the measured step's (B, D) and (B, k) temporaries and even a (C, D) gradient of 20 MB
# land on the heap, and the peak RSS then counts fragmentation, not tensors (measured at B = 256,
# D = 512, C = 1e4: naive 177 MB with the moving threshold, 103 MB with a fixed one). A fixed
# 64 KiB threshold makes the peak RSS follow the live tensors of every implementation alike.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def measure_memory_cpu(impl: str, batch, dim, num_classes, chunk_size) -> float:
    out = _run_child("--child-memory", impl, batch, dim, num_classes, chunk_size, env=MEMORY_CHILD_ENV)
    return math.nan if out is None else float(out)


def measure_memory_cuda(step: Step, device) -> float:
    step()
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        step()
        _sync(device)
    except torch.OutOfMemoryError:
        return math.nan
    return float(torch.cuda.max_memory_allocated(device) - before)


# ---- the run ------------------------------------------------------------------------------------------


def run(grid, device, dtype, repeats, chunk_size, only=None, memory=True, alone=False) -> list[dict]:
    rows = []
    for batch, dim, num_classes in grid:
        x, W, y = make_inputs(batch, dim, num_classes, device, dtype)
        steps = {}
        for name, build in implementations(batch, num_classes, chunk_size, device).items():
            short = name.split(" (")[0]
            if only and name != "matmul floor" and short not in only:
                continue
            if short in OPT_IN and not (only and short in only):
                continue
            try:
                steps[name] = build(x, W, y)
            except torch.OutOfMemoryError:
                steps[name] = None
        runnable = {name: step for name, step in steps.items() if step is not None}
        stock = [name for name in runnable if name.startswith("stock ")]
        if stock:
            checked = verify_stock(x, W, y, stock)
            rows_auto = stock_auto_rows(batch, dim, num_classes, dtype, device)
            print(
                f"B={batch} D={dim} C={num_classes}: stock losses = the project's CE of x_s W_s^T "
                f"({checked['truth']:.6f}); stock chunked auto: {rows_auto} rows per block",
                flush=True,
            )
        times = time_round_robin(runnable, device, repeats)
        unit = batch * num_classes * 4
        grads = (batch * dim + num_classes * dim) * x.element_size()
        for name in steps:
            if not memory:
                extra = math.nan
            elif device.type == "cuda":
                extra = measure_memory_cuda(steps[name], device) if steps[name] else math.nan
            else:
                extra = measure_memory_cpu(name.split(" (")[0], batch, dim, num_classes, chunk_size)
            alone_ratio = math.nan
            if alone and device.type == "cpu" and name != "matmul floor":
                alone_ratio = measure_pair_cpu(name.split(" (")[0], batch, dim, num_classes, chunk_size, repeats)
            rows.append(
                dict(
                    B=batch,
                    D=dim,
                    C=num_classes,
                    impl=name,
                    seconds=times.get(name, math.nan),
                    extra_bytes=extra,
                    alone_ratio=1.0 if name == "matmul floor" and alone else alone_ratio,
                    unit_bytes=unit,
                    grad_bytes=grads,
                )
            )
        floor = times["matmul floor"]
        for row in rows[-len(steps) :]:
            row["time_ratio"] = row["seconds"] / floor
            row["mem_all"] = row["extra_bytes"] / unit
            row["mem_work"] = (row["extra_bytes"] - grads) / unit
            print(
                f"B={batch:5d} D={dim:4d} C={num_classes:8d}  {row['impl']:22s} {1e3 * row['seconds']:9.1f} ms "
                f"x{row['time_ratio']:5.2f} (alone x{row['alone_ratio']:5.2f})   mem all {row['mem_all']:6.2f}  "
                f"work {row['mem_work']:6.3f}",
                flush=True,
            )
        del x, W, y, steps, runnable
    return rows


def machine_description(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| B | D | C | implementation | time (ms) | time / floor | alone: time / floor "
        "| extra memory / (B*C*4): all | work |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def fmt(v, spec):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

        lines.append(
            f"| {r['B']} | {r['D']} | {r['C']:,} | {r['impl']} | {fmt(1e3 * r['seconds'], '.1f')} | "
            f"{fmt(r['time_ratio'], '.2f')} | {fmt(r.get('alone_ratio', math.nan), '.2f')} | "
            f"{fmt(r['mem_all'], '.2f')} | {fmt(r['mem_work'], '.3f')} |"
        )
    return "\n".join(lines)


def _finite(values):
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def plot(runs: list[list[dict]], path: str, title: str) -> None:
    """Time / floor and memory against C, one column per D; with several runs (``--from-json`` of
    several files) each point is the median over the runs and the bar spans their min and max."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for run_rows in runs for r in run_rows]
    dims = sorted({r["D"] for r in rows})
    impls = list(dict.fromkeys(r["impl"].split(" (")[0] for r in rows))
    fig, axes = plt.subplots(2, len(dims), figsize=(5.5 * len(dims), 8), squeeze=False)

    def line(ax, xs, groups, **style):
        mid = [statistics.median(g) if g else math.nan for g in groups]
        low = [m - min(g) if g else 0.0 for m, g in zip(mid, groups)]
        high = [max(g) - m if g else 0.0 for m, g in zip(mid, groups)]
        ax.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=3, **style)

    colors = {impl: f"C{index}" for index, impl in enumerate(impls)}  # the same in every panel
    for col, dim in enumerate(dims):
        if not _finite(r["mem_work"] for r in rows if r["D"] == dim):  # a --no-memory run
            axes[1][col].text(0.5, 0.5, "memory not measured", transform=axes[1][col].transAxes, ha="center")
            axes[1][col].set_ylim(1e-3, 1e2)
        for impl in impls:
            mine = [r for r in rows if r["D"] == dim and r["impl"].split(" (")[0] == impl]
            xs = sorted({r["C"] for r in mine})
            by_c = [[r for r in mine if r["C"] == c] for c in xs]
            style = dict(color=colors[impl], label=impl)
            line(axes[0][col], xs, [_finite(r["time_ratio"] for r in g) for g in by_c], **style)
            alone = [_finite(r.get("alone_ratio", math.nan) for r in g) for g in by_c]
            if impl == "chunked" and any(alone):
                alone_style = dict(color=colors[impl], linestyle="--", label="chunked, alone with the floor")
                line(axes[0][col], xs, alone, **alone_style)
            memory = [[max(v, 1e-3) for v in _finite(r["mem_work"] for r in g)] for g in by_c]
            line(axes[1][col], xs, memory, **style)
        axes[0][col].set(xscale="log", ylabel="time / matmul floor", title=f"D = {dim}", xlabel="classes C")
        axes[0][col].axhline(1.3, color="grey", linestyle=":", linewidth=1, label="target of the chunked path")
        axes[1][col].set(
            xscale="log", yscale="log", xlabel="classes C", ylabel="extra memory beyond gradients / (B*C*4)"
        )
        axes[1][col].axhline(0.1, color="grey", linestyle=":", linewidth=1, label="target of the chunked path")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median), after one warm-up")
    parser.add_argument("--chunk-size", type=int, default=0, help="0: chunk_size_for(B, C)")
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument(
        "--shape", nargs=3, type=int, action="append", metavar=("B", "D", "C"), help="instead of the grid"
    )
    parser.add_argument("--only", nargs="+", help="names of the implementations to run (the floor always runs)")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--no-tf32", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="draw the figure here (PNG)")
    parser.add_argument(
        "--from-json", nargs="+", help="read rows from previous --json files instead of running (several: runs)"
    )
    parser.add_argument(
        "--alone",
        action="store_true",
        help="CPU: also time each implementation against the floor in a fresh process with nothing else",
    )
    parser.add_argument("--child-memory", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--child-pair", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_pair:
        impl, batch, dim, classes, chunk, repeats = args.child_pair
        times = child_measure_pair(impl, int(batch), int(dim), int(classes), int(chunk) or None, int(repeats))
        print(json.dumps(times))
        return

    if args.child_memory:
        impl, batch, dim, classes, chunk = args.child_memory
        print(child_measure_memory(impl, int(batch), int(dim), int(classes), int(chunk) or None))
        return

    if args.from_json:
        runs, titles = [], []
        for path in args.from_json:
            with open(path) as f:
                saved = json.load(f)
            runs.append(saved["rows"])
            titles.append(saved["title"])
        title = titles[0] if len(titles) == 1 else f"{len(titles)} runs; first: {titles[0]}"
    else:
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
            grid, dtype = CUDA_GRID, torch.bfloat16
        else:
            grid, dtype = CPU_GRID, torch.float32
        if args.quick:
            grid = QUICK_GRID
        if args.shape:
            grid = [tuple(shape) for shape in args.shape]
        print(f"pytorch-metric-learning: {'installed' if pml_losses else 'not installed, skipped'}")
        started = time.time()
        rows = run(
            grid, device, dtype, args.repeats, args.chunk_size or None, args.only, not args.no_memory, args.alone
        )
        title = f"{machine_description(device)}; {dtype}; {time.time() - started:.0f} s"
        print(title)
        print(markdown_table(rows))
        runs = [rows]
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "title": title}, f, indent=1)
    if args.plot:
        plot(runs, args.plot, title)


if __name__ == "__main__":
    main()
