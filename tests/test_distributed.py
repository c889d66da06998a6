"""The class-sharded margin cross-entropy on 2 and 4 gloo processes, against the single-process engine.

One launch per world size: this file, run as a script (``python -m tests.test_distributed worker
...``), is each of the R worker processes. They rendezvous on 127.0.0.1 at a free port with a
60 s process-group timeout, run every case below on the same global inputs (each rank takes its
rows of x and y and its shard of W), and save what they computed; the tests then compare it with
``torch_port.engine.margin_cross_entropy`` on the concatenated batch, computed here in the test
process. The harness kills the workers after a deadline, so a hang fails instead of blocking CI.

"Equal to the single-process result" means: the loss on every rank equals the single-process loss
of the global batch (same reduction); rank r's W shard gradient equals rows [start_r, end_r) of the
single-process dW; rank r's x gradient equals its rows of the single-process dx (times
feature_grad_scale); a learnable scale gets the single-process ds on every rank. Tolerances:
float64 1e-10, float32 1e-5 (relative, with the same absolute slack scaled by the largest value);
bfloat16 inputs compute in float32 (loss to 1e-5), their gradients are compared to bfloat16's 2^-7.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.tolerances import Tol, assert_close
from torch_port import ArcFace, CosFace, NormFace, SphereFace
from torch_port.angular import lsoftmax_config
from torch_port.angular_heads import MarginSchedule
from torch_port.distributed import (
    ShardedMarginHead,
    merge_shard_weights,
    shard_range,
    sharded_margin_cross_entropy,
)
from torch_port.engine import MarginConfig, margin_cross_entropy, plain_logits
from torch_port.normalized import arcface_config, combined_margin_config, cosface_config, normface_config

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"float64": Tol(rtol=1e-10, atol=1e-10), "float32": Tol(rtol=1e-5, atol=1e-5)}
TOLERANCE["bfloat16"] = TOLERANCE["float32"]  # computed in float32
# The gradient reaching a bfloat16 input is rounded to bfloat16: two roundings of nearly equal
# values can differ by one unit in the last place, 2^-7 relative.
GRAD_TOLERANCE = {**TOLERANCE, "bfloat16": Tol(rtol=2**-7, atol=2**-7)}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
LOSS_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}
# Seconds: the process group's timeout in the workers, the short group of the timeout test, and the
# harness's deadline for a whole launch (4 processes start in ~5 s on 2 cores and run in ~10 s).
GROUP_TIMEOUT = 60
SHORT_TIMEOUT = 2
LAUNCH_DEADLINE = 240


# --- the losses under test, as engine configurations ----------------------------------------------


def make_config(name: str) -> MarginConfig:
    """A fresh configuration (a learnable scale is a new leaf on every call)."""
    if name == "normface":
        return normface_config(16.0)
    if name == "cosface":
        return cosface_config(64.0, 0.35)
    if name == "arcface":
        return arcface_config(64.0, 0.5, False)
    if name == "arcface-easy":
        return arcface_config(32.0, 0.4, True)
    if name == "combined":
        return combined_margin_config(64.0, 1.2, 0.3, 0.1)
    if name == "learnable-scale":
        return normface_config(nn.Parameter(torch.tensor(20.0, dtype=torch.float64)))
    if name == "lsoftmax":  # |x| |W_j| in every logit: the feature_norm and weight_norm paths
        return lsoftmax_config(3, 0.5)
    raise KeyError(name)


def make_single_head(name: str, num_classes: int, dim: int, dtype: torch.dtype):
    """The single-process head a from-head case converts (and the reference runs)."""
    if name == "sphereface":  # |x| in every logit, through a head
        return SphereFace(num_classes, dim, schedule=MarginSchedule.constant(0.0), dtype=dtype)
    return {"normface": NormFace, "cosface": CosFace, "arcface": ArcFace}[name](num_classes, dim, dtype=dtype)


# --- the cases: one global problem each ----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    num_classes: int
    dim: int = 6
    batch: tuple[int, ...] = (3, 5, 2, 4)  # per rank, the first R entries; deliberately uneven
    dtype: str = "float64"
    reduction: str = "mean"
    labels: str = "random"  # "random" | "last-shard" (every label on the last rank's shard)
    chunk_size: int | None = None
    # "function" (sharded_margin_cross_entropy), "head" (ShardedMarginHead(config)), or "from-head"
    # (ShardedMarginHead.from_head of the single-process head named by ``config``)
    via: str = "function"
    sample_rate: float = 1.0
    grad_scale_is_world_size: bool = False  # feature_grad_scale = R (as with a DDP backbone)
    # Rank r back-propagates (r + 1) * loss: the gradient is that of the mean, (R + 1) / 2 * loss.
    rank_weighted_objective: bool = False
    seed: int = 0


def _random_cases() -> list[Case]:
    """A few problems drawn from fixed seeds: sizes, configuration, dtype, reduction, chunking."""
    cases = []
    for seed in (11, 12, 13, 14, 15):
        rng = random.Random(seed)
        cases.append(
            Case(
                f"random-seed-{seed}",
                rng.choice(["normface", "cosface", "arcface", "arcface-easy", "combined", "lsoftmax"]),
                num_classes=rng.randint(4, 40),
                dim=rng.randint(2, 12),
                batch=tuple(rng.randint(1, 6) for _ in range(4)),
                dtype=rng.choice(["float64", "float32"]),
                reduction=rng.choice(["mean", "sum", "none"]),
                chunk_size=rng.choice([None, 3]),
                seed=seed,
            )
        )
    return cases


CASES = [
    Case("normface-uneven-shards", "normface", num_classes=11),
    Case("cosface-labels-on-one-shard", "cosface", num_classes=10, labels="last-shard", reduction="sum"),
    Case("arcface-per-sample", "arcface", num_classes=9, reduction="none"),
    Case("lsoftmax-feature-and-weight-norms", "lsoftmax", num_classes=7, dim=4),
    Case("learnable-scale", "learnable-scale", num_classes=6, via="head"),
    Case("combined-margin", "combined", num_classes=12, reduction="sum"),
    Case("arcface-chunked", "arcface", num_classes=13, chunk_size=2),
    Case("float32-arcface", "arcface", num_classes=13, dtype="float32"),
    Case("bfloat16-arcface-chunked", "arcface", num_classes=11, dtype="bfloat16", chunk_size=3),
    Case(
        "float32-cosface-chunked-one-shard",
        "cosface",
        num_classes=9,
        dtype="float32",
        labels="last-shard",
        chunk_size=2,
    ),
    Case("head-sample-rate-1-is-exact", "arcface", num_classes=10, via="head", sample_rate=1.0),
    Case("from-head-normface", "normface", num_classes=8, via="from-head"),
    Case("from-head-cosface-float32", "cosface", num_classes=9, via="from-head", dtype="float32"),
    Case("from-head-arcface", "arcface", num_classes=7, via="from-head", labels="last-shard"),
    Case("from-head-sphereface", "sphereface", num_classes=8, via="from-head"),
    Case("feature-grad-scale", "cosface", num_classes=8, grad_scale_is_world_size=True),
    Case("different-objectives-per-rank", "arcface", num_classes=9, rank_weighted_objective=True),
    Case("sampled-negatives", "cosface", num_classes=40, via="head", sample_rate=0.3, batch=(2, 3, 1, 2)),
    *_random_cases(),
]


def global_inputs(case: Case, world: int):
    """The global problem (float64): x (B, D), W (C, D), y (B,), and the per-rank batch sizes."""
    sizes = list(case.batch[:world])
    gen = torch.Generator().manual_seed(1000 + case.seed)
    batch = sum(sizes)
    # W first: it does not depend on the world size, so a checkpoint from 2 ranks serves 4.
    W = torch.randn(case.num_classes, case.dim, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, case.dim, generator=gen, dtype=torch.float64) * 3.0
    if case.labels == "last-shard":
        start, end = shard_range(case.num_classes, world, world - 1)
        y = torch.randint(start, end, (batch,), generator=gen)
    else:
        y = torch.randint(0, case.num_classes, (batch,), generator=gen)
    # One feature opposite its class (theta = pi): ArcFace's fallback branch, the cone point; and
    # the last one zero (cos = 0 with every class by the engine's convention).
    x[0] = -2.0 * W[y[0]]
    x[-1] = 0.0 if batch > 1 else x[-1]
    return x, W, y, sizes


def cotangent(shape) -> torch.Tensor:
    """Fixed weights for reduction="none", the same on every rank and in the reference."""
    return torch.linspace(0.5, 1.5, max(1, math.prod(shape)), dtype=torch.float64).reshape(shape)


def grad_scale_of(case: Case, world: int) -> float:
    return float(world) if case.grad_scale_is_world_size else 1.0


# --- the worker (runs in each spawned process) ---------------------------------------------------


def _run_case(case: Case, rank: int, world: int) -> dict:
    x, W, y, sizes = global_inputs(case, world)
    dtype = DTYPES[case.dtype]
    start, end = shard_range(case.num_classes, world, rank)
    offset, count = sum(sizes[:rank]), sizes[rank]
    x_local = x[offset : offset + count].to(dtype).requires_grad_(True)
    y_local = y[offset : offset + count]
    options = dict(sample_rate=case.sample_rate, feature_grad_scale=grad_scale_of(case, world))
    config = None if case.via == "from-head" else make_config(case.config)
    head = None
    if case.via == "function":
        W_local = W[start:end].to(dtype).requires_grad_(True)
        loss = sharded_margin_cross_entropy(
            x_local,
            W_local,
            y_local,
            config,
            num_classes=case.num_classes,
            reduction=case.reduction,
            chunk_size=case.chunk_size,
            **options,
        )
    else:
        if case.via == "head":
            gen = torch.Generator().manual_seed(7 + rank)
            head = ShardedMarginHead(
                case.num_classes,
                case.dim,
                config,
                reduction=case.reduction,
                chunk_size=case.chunk_size,
                generator=gen,
                dtype=dtype,
                **options,
            )
            head.load_full_weight(W.to(dtype))
        else:
            single = make_single_head(case.config, case.num_classes, case.dim, dtype)
            with torch.no_grad():
                single.weight.copy_(W.to(dtype))
            head = ShardedMarginHead.from_head(single, **options)
        W_local = head.weight
        loss = head(x_local, y_local)
    objective = (loss * cotangent(loss.shape).to(loss.dtype)).sum() if case.reduction == "none" else loss
    if case.rank_weighted_objective:
        objective = objective * (rank + 1)
    objective.backward()
    scale = getattr(head, "scale", None)  # registered by the head when the config's scale is learned
    return {
        "loss": loss.detach(),
        "loss_dtype": str(loss.dtype),
        "x_grad": x_local.grad,
        "w_grad": W_local.grad,
        "scale_grad": None if scale is None else scale.grad,
        "kept": None if head is None else head.last_kept_classes,
        "start": start,
        "end": end,
    }


def _outcome(fn) -> dict:
    """Run fn; record the exception's type and message (or None), for the mismatch tests."""
    try:
        fn()
    except Exception as err:  # recorded and asserted on in the test process
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None, "message": ""}


def _run_mismatches(rank: int, world: int) -> dict:
    """Each scenario: the last rank deviates; every rank must raise a clear error, change nothing,
    and leave the group usable (a normal call afterwards works)."""
    odd = rank == world - 1
    num_classes, dim, batch = 10, 5, 3
    gen = torch.Generator().manual_seed(5 + rank)
    start, end = shard_range(num_classes, world, rank)
    W = torch.randn(end - start, dim, dtype=torch.float64, generator=gen).requires_grad_(True)
    before = W.detach().clone()
    x = torch.randn(batch, dim, dtype=torch.float64, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    cosface = cosface_config(64.0, 0.35)

    def call(x=x, W=W, y=y, config=cosface, num_classes=num_classes, **kw):
        return sharded_margin_cross_entropy(x, W, y, config, num_classes=num_classes, **kw)

    def more_classes():
        s, e = shard_range(num_classes + 1, world, rank)
        call(W=torch.randn(e - s, dim, dtype=torch.float64), num_classes=num_classes + 1)

    scenarios = {
        "feature dimension": lambda: call(
            x=torch.randn(batch, dim + 1, dtype=torch.float64) if odd else x,
            W=torch.randn(end - start, dim + 1, dtype=torch.float64) if odd else W,
        ),
        "dtype": lambda: call(x=x.float() if odd else x, W=W.detach().float() if odd else W),
        "num_classes": lambda: more_classes() if odd else call(),
        "margin": lambda: call(config=cosface_config(64.0, 0.30 if odd else 0.35)),
        "scale": lambda: call(config=cosface_config(32.0 if odd else 64.0, 0.35)),
        "reduction": lambda: call(reduction="sum" if odd else "mean"),
        "labels out of range on one rank": lambda: call(y=y + num_classes if odd else y),
        "shard of the wrong size": lambda: call(W=W[:-1] if odd else W),
        "sample_rate out of range (everywhere)": lambda: call(sample_rate=0.0),
        "num_classes below the world size": lambda: ShardedMarginHead(world - 1, dim, cosface),
        "config of the wrong type": lambda: ShardedMarginHead(num_classes, dim, {"scale": 64.0}),
        "from_head of a learned scale": lambda: ShardedMarginHead.from_head(
            NormFace(num_classes, dim, learn_scale=True)
        ),
        "load_full_weight of a shard": lambda: ShardedMarginHead(num_classes, dim, cosface).load_full_weight(W),
    }
    results = {name: _outcome(fn) for name, fn in scenarios.items()}
    results["weight unchanged"] = bool(torch.equal(W.detach(), before)) and W.grad is None
    # The group is still in step after all of that: a normal call, and its backward, go through.
    loss = call()
    loss.backward()
    results["afterwards"] = float(loss)
    return results


def _run_checkpoint(rank: int, world: int, out: Path, earlier: Path | None) -> dict:
    """Save this rank's shard; with ``earlier`` (the 2-rank launch's files) re-shard from it."""
    case = Case("checkpoint", "arcface", num_classes=11)
    x, W, y, sizes = global_inputs(case, world)
    offset, count = sum(sizes[:rank]), sizes[rank]
    head = ShardedMarginHead(case.num_classes, case.dim, make_config(case.config), dtype=torch.float64)
    head.load_full_weight(W)
    torch.save(head.state_dict(), out / f"shard{rank}.pt")
    result = {"logits": head.logits(x[offset : offset + count]), "loss": None}
    # Another rank's shard is refused before anything is copied.
    other = ShardedMarginHead(case.num_classes, case.dim, make_config(case.config), dtype=torch.float64)
    before = other.weight.detach().clone()
    foreign = {k: v.clone() if isinstance(v, torch.Tensor) else dict(v) for k, v in head.state_dict().items()}
    foreign["_extra_state"]["class_start"] += 1
    result["foreign"] = _outcome(lambda: other.load_state_dict(foreign))
    result["foreign unchanged"] = bool(torch.equal(other.weight.detach(), before))
    if earlier is not None:
        files = sorted(earlier.glob("shard*.pt"))
        full = merge_shard_weights([torch.load(f, weights_only=True) for f in files])
        fresh = ShardedMarginHead(case.num_classes, case.dim, make_config(case.config), dtype=torch.float64)
        fresh.load_full_weight(full)
        result["loss"] = fresh(x[offset : offset + count], y[offset : offset + count]).detach()
        result["from_files"] = len(files)
    return result


def _run_timeout(rank: int, world: int) -> dict:
    """Rank 0 calls the loss on a group with a short timeout; the others never join. Rank 0 must
    get an error within seconds instead of waiting forever."""
    short = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT))
    if rank != 0:
        return {}
    start = time.monotonic()
    x, W, y = (
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(8 // world, 3, dtype=torch.float64),
        torch.tensor([0, 1]),
    )
    outcome = _outcome(
        lambda: sharded_margin_cross_entropy(x, W, y, MarginConfig(scale=8.0), num_classes=8, group=short)
    )
    outcome["seconds"] = time.monotonic() - start
    return outcome


def worker(rank: int, world: int, port: int, out: Path, earlier: Path | None) -> None:
    torch.set_num_threads(1)  # R processes share 2 cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT),
    )
    results: dict = {"cases": {case.name: _run_case(case, rank, world) for case in CASES}}
    results["mismatches"] = _run_mismatches(rank, world)
    results["checkpoint"] = _run_checkpoint(rank, world, out, earlier)
    dist.barrier()
    # Last: it leaves the short group broken on purpose.
    results["timeout"] = _run_timeout(rank, world)
    torch.save(results, out / f"rank{rank}.pt")
    sys.stdout.flush()
    os._exit(0)  # no teardown: the abandoned short group must not hold the process


# --- the harness ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, earlier: Path | None = None) -> list[dict]:
    """Run ``world`` worker processes; return each rank's results. Kills them all at the deadline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    port = _free_port()
    logs = [open(out / f"log{rank}.txt", "w") for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        command = [sys.executable, "-m", "tests.test_distributed", "worker", str(rank), str(world), str(port), str(out)]
        command += [] if earlier is None else [str(earlier)]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log))
    deadline = time.monotonic() + LAUNCH_DEADLINE
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- rank {r} ---\n{(out / f'log{r}.txt').read_text()[-3000:]}" for r in range(world))
    assert all(proc.returncode == 0 for proc in procs), f"workers failed or hung (killed at the deadline):\n{tails}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        yield launch(2, Path(tmp)), Path(tmp)


@pytest.fixture(scope="module")
def four_ranks(two_ranks):
    _, earlier = two_ranks
    with tempfile.TemporaryDirectory() as tmp:
        yield launch(4, Path(tmp), earlier), Path(tmp)


@pytest.fixture(params=[2, 4], ids=["2-ranks", "4-ranks"])
def launched(request):
    results, directory = request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[request.param])
    return request.param, results, directory


# --- the single-process reference ----------------------------------------------------------------


def _reference(case: Case, world: int, kept: torch.Tensor | None = None) -> dict:
    """Loss and gradients of the single-process engine (plain path) on the concatenated batch, or of
    the single-process head for from-head cases; with ``kept`` (sorted global class indices), the
    loss over those classes only."""
    x, W, y, _ = global_inputs(case, world)
    dtype = DTYPES[case.dtype]
    x = x.to(dtype).requires_grad_(True)
    config = None
    if case.via == "from-head":
        single = make_single_head(case.config, case.num_classes, case.dim, dtype)
        with torch.no_grad():
            single.weight.copy_(W.to(dtype))
        W = single.weight
        loss = single(x, y)
    else:
        W = W.to(dtype).requires_grad_(True)
        config = make_config(case.config)
        W_used, y_used = W, y
        if kept is not None:
            position = torch.full((case.num_classes,), -1, dtype=torch.long)
            position[kept] = torch.arange(kept.numel())
            W_used, y_used = W[kept], position[y]
            assert (y_used >= 0).all(), "a label's class was dropped by the sampling"
        loss = margin_cross_entropy(x, W_used, y_used, config, case.reduction)
    objective = (loss * cotangent(loss.shape).to(loss.dtype)).sum() if case.reduction == "none" else loss
    objective.backward()
    scale = None if config is None or not isinstance(config.scale, torch.Tensor) else config.scale
    return {"loss": loss.detach(), "x": x.grad, "W": W.grad, "scale": None if scale is None else scale.grad}


def _compare_case(case: Case, world: int, per_rank: list[dict]) -> None:
    kept = None
    if case.sample_rate < 1.0:
        kept = torch.cat([r["kept"] for r in per_rank])
    expected = _reference(case, world, kept)
    if case.rank_weighted_objective:
        expected = {k: v if k == "loss" or v is None else v * (world + 1) / 2 for k, v in expected.items()}
    tol, grad_tol = TOLERANCE[case.dtype], GRAD_TOLERANCE[case.dtype]
    _, _, _, sizes = global_inputs(case, world)
    scale = grad_scale_of(case, world)
    for rank, got in enumerate(per_rank):
        what = f"{case.name}, rank {rank} of {world}"
        assert got["loss_dtype"] == str(LOSS_DTYPES[case.dtype]), what
        assert_close(_np(got["loss"]), _np(expected["loss"]), tol, f"{what}: loss")
        offset = sum(sizes[:rank])
        rows = expected["x"][offset : offset + sizes[rank]].double() * scale
        assert_close(_np(got["x_grad"]), _np(rows), grad_tol, f"{what}: dL/dx")
        shard = expected["W"][got["start"] : got["end"]]
        assert_close(_np(got["w_grad"]), _np(shard), grad_tol, f"{what}: dL/dW")
        if expected["scale"] is not None:
            assert_close(_np(got["scale_grad"]), _np(expected["scale"]), grad_tol, f"{what}: dL/ds")


def _np(t: torch.Tensor):
    return t.detach().double().numpy()


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.sample_rate == 1.0], ids=lambda c: c.name)
def test_loss_and_gradients_equal_single_process(launched, case):
    world, results, _ = launched
    _compare_case(case, world, [r["cases"][case.name] for r in results])


@pytest.mark.parametrize("world", [2, 4])
def test_labels_on_one_shard_leave_other_shards_only_negatives(world):
    """The one-shard cases really put every label on the last shard (so the others own no target)."""
    for case in CASES:
        if case.labels == "last-shard":
            _, _, y, _ = global_inputs(case, world)
            start, end = shard_range(case.num_classes, world, world - 1)
            assert ((y >= start) & (y < end)).all() and start > 0


def test_sampled_negatives_are_the_exact_loss_over_the_kept_classes(launched):
    """Partial FC sampling: positives always kept, round(rate * shard) classes per shard (or all the
    positives if more), and the loss and gradients are those of the softmax over the kept classes;
    dropped rows get zero gradient."""
    world, results, _ = launched
    case = next(c for c in CASES if c.sample_rate < 1.0)
    per_rank = [r["cases"][case.name] for r in results]
    _compare_case(case, world, per_rank)
    _, _, y, _ = global_inputs(case, world)
    for rank, got in enumerate(per_rank):
        start, end = shard_range(case.num_classes, world, rank)
        kept = got["kept"]
        positives = {int(c) for c in y if start <= c < end}
        assert positives <= {int(c) for c in kept}
        assert len(kept) == max(len(positives), max(1, round(case.sample_rate * (end - start))))
        assert ((kept >= start) & (kept < end)).all() and (kept.diff() > 0).all()
        dropped = torch.ones(end - start, dtype=torch.bool)
        dropped[kept - start] = False
        assert (got["w_grad"][dropped] == 0).all()
    assert sum(len(r["kept"]) for r in per_rank) < case.num_classes, "the sampling kept every class"


def test_mismatched_inputs_raise_the_same_clear_error_on_every_rank(launched):
    world, results, _ = launched
    expected_words = {
        "feature dimension": "feature dimension D must be the same on every rank",
        "dtype": "x.dtype must be the same on every rank",
        "num_classes": "num_classes must be the same on every rank",
        "margin": "margin configuration",
        "scale": "margin configuration",
        "reduction": "reduction must be the same on every rank",
        "labels out of range on one rank": r"y must lie in \[0, 10\)",
        "shard of the wrong size": "W must have shape",
        "sample_rate out of range (everywhere)": r"sample_rate must lie in \(0.0, 1.0\]",
        "num_classes below the world size": "num_classes must be >= the world size",
        "config of the wrong type": "config must be a torch_port.engine.MarginConfig",
        "from_head of a learned scale": "from_head copies fixed configurations",
        "load_full_weight of a shard": r"weight must have shape \(10, 5\) \(the full weight\)",
    }
    for scenario, pattern in expected_words.items():
        for rank, got in enumerate(results):
            outcome = got["mismatches"][scenario]
            assert outcome["error"] in ("ValueError", "TypeError"), f"{scenario}, rank {rank}: {outcome}"
            assert re.search(pattern, outcome["message"]), f"{scenario}, rank {rank}: {outcome['message']}"
    # The rank with the bad labels names them; the others say which rank refused.
    bad = results[-1]["mismatches"]["labels out of range on one rank"]["message"]
    assert "rank" not in bad
    for got in results[:-1]:
        assert (
            f"rank {world - 1} rejected its inputs" in got["mismatches"]["labels out of range on one rank"]["message"]
        )
    for rank, got in enumerate(results):
        assert got["mismatches"]["weight unchanged"], f"rank {rank}: a failed call changed W or its grad"
        assert math.isfinite(got["mismatches"]["afterwards"])
        assert got["mismatches"]["afterwards"] == results[0]["mismatches"]["afterwards"]


def test_a_rank_that_never_joins_gives_a_timeout_error_not_a_hang(launched):
    _, results, _ = launched
    outcome = results[0]["timeout"]
    assert outcome["error"] == "RuntimeError", outcome
    assert outcome["seconds"] < 10 * SHORT_TIMEOUT, outcome


def test_inference_logits_are_the_single_process_rows(launched):
    world, results, _ = launched
    case = Case("checkpoint", "arcface", num_classes=11)
    x, W, _, sizes = global_inputs(case, world)
    expected = plain_logits(x, W, replace(make_config(case.config), target=None))
    for rank, got in enumerate(results):
        offset = sum(sizes[:rank])
        rows = expected[offset : offset + sizes[rank]]
        assert_close(got["checkpoint"]["logits"].numpy(), rows.numpy(), TOLERANCE["float64"], f"rank {rank} logits")


def test_checkpoint_shards_refuse_the_wrong_rank_and_merge_to_the_full_weight(launched):
    world, results, directory = launched
    for got in results:
        assert got["checkpoint"]["foreign"]["error"] == "ValueError"
        assert "re-shard with merge_shard_weights" in got["checkpoint"]["foreign"]["message"]
        assert got["checkpoint"]["foreign unchanged"]
    states = [torch.load(directory / f"shard{r}.pt", weights_only=True) for r in range(world)]
    _, W, _, _ = global_inputs(Case("checkpoint", "arcface", num_classes=11), world)
    assert torch.equal(merge_shard_weights(states[::-1]), W)  # any order
    with pytest.raises(ValueError, match="missing"):
        merge_shard_weights(states[:-1])
    with pytest.raises(ValueError, match="held twice"):
        merge_shard_weights([states[0], *states])
    with pytest.raises(ValueError, match="no ShardedMarginHead metadata"):
        merge_shard_weights([{"weight": W}])


def test_a_two_rank_checkpoint_reloads_on_four_ranks(four_ranks):
    """Re-sharding: the 4-rank launch merged the 2-rank launch's files and loaded the full weight;
    its loss is the single-process loss of that weight."""
    results, _ = four_ranks
    case = Case("checkpoint", "arcface", num_classes=11)
    expected = _reference(case, 4)["loss"]
    for rank, got in enumerate(results):
        assert got["checkpoint"]["from_files"] == 2
        assert_close(got["checkpoint"]["loss"].numpy(), expected.numpy(), TOLERANCE["float64"], f"rank {rank}")


# --- without a process group ---------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_range_is_tensor_split(world):
    for num_classes in range(world, 3 * world + 2):
        pieces = torch.tensor_split(torch.arange(num_classes), world)
        got = [shard_range(num_classes, world, rank) for rank in range(world)]
        assert got == [(int(p[0]), int(p[-1]) + 1) for p in pieces]


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be >= the world size 4"):
        shard_range(3, 4, 0)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\)"):
        shard_range(5, 2, 2)
    with pytest.raises(TypeError, match="world_size"):
        shard_range(5, 2.5j, 0)


def test_without_a_process_group_the_error_says_what_to_do():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        sharded_margin_cross_entropy(
            torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), MarginConfig(), num_classes=4
        )
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedMarginHead(4, 3, MarginConfig())


def test_the_training_example_runs_and_its_loss_goes_down():
    """examples/train_sharded.py trains with 2 gloo processes; a short run must lower the loss."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_sharded.py"), "--epochs", "4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_DEADLINE,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [float(line.split("loss")[1].split()[0]) for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(losses) == 4, done.stdout
    assert losses[-1] < 0.7 * losses[0], done.stdout


if __name__ == "__main__" and len(sys.argv) >= 6 and sys.argv[1] == "worker":
    _, _, rank_arg, world_arg, port_arg, out_arg, *rest = sys.argv
    worker(int(rank_arg), int(world_arg), int(port_arg), Path(out_arg), Path(rest[0]) if rest else None)
