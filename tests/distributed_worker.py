"""One rank of the class-sharded tests: ``python -m tests.distributed_worker RANK WORLD PORT OUT [EARLIER]``.

Spawned by tests/distributed_harness.py, R of them at once. They rendezvous on 127.0.0.1 at PORT
with a GROUP_TIMEOUT process-group timeout, run every case of tests/distributed_cases.py on the same
global inputs (each rank takes its rows of x and y and its shard of W), the mismatch scenarios,
the checkpoint round trip (re-sharding from EARLIER, the 2-rank launch's files, when given) and the
timeout scenario, and save what they computed to OUT/rank<r>.pt for tests/test_distributed.py.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed_cases import (
    CASES,
    DTYPES,
    GROUP_TIMEOUT,
    SHORT_TIMEOUT,
    Case,
    cotangent,
    global_inputs,
    grad_scale_of,
    make_config,
    make_single_head,
)
from tests.registry import BY_NAME
from torch_port import NormFace
from torch_port.distributed import ShardedMarginHead, merge_shard_weights, shard_range, sharded_margin_cross_entropy
from torch_port.engine import MarginConfig


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
    cosface = make_config("cosface")
    cosface_with = BY_NAME["cosface_loss"].config
    head = ShardedMarginHead(num_classes, dim, cosface, dtype=torch.float64)
    wide = torch.randn(batch, dim + 1, dtype=torch.float64, generator=gen)

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
        "margin": lambda: call(config=cosface_with({"s": 64.0, "m": 0.30 if odd else 0.35})),
        "scale": lambda: call(config=cosface_with({"s": 32.0 if odd else 64.0, "m": 0.35})),
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
        "head given x of another width": lambda: head(wide if odd else x, y),
        "head logits of x of another width": lambda: head.logits(wide if odd else x),
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


if __name__ == "__main__":
    _rank, _world, _port, _out, *_rest = sys.argv[1:]
    worker(int(_rank), int(_world), int(_port), Path(_out), Path(_rest[0]) if _rest else None)
