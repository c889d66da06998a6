"""Fault scenarios of the class-sharded path, run on every rank of the 2-rank runner (tests/sharded_runner.py).

The test process sends ``("scenario", name)`` to every worker; each rank runs ``SCENARIOS[name]`` on a
fresh process group whose timeout is FAULT_TIMEOUT_S, and returns what happened: for each call, the
exception's type and message (or its result) and how long it took. tests/test_distributed_faults.py
asserts that every rank raised the same error at once. A regression that leaves a rank waiting in a
collective then costs FAULT_TIMEOUT_S (the collective's timeout error is what the test sees), not
the 30 minutes of gloo's default.

In every scenario the last rank is the one that deviates.
"""

from __future__ import annotations

import datetime
import io
import pickle
import time
from unittest import mock

import torch
import torch.distributed as dist

import torch_port.distributed.agreement as agreement
import torch_port.distributed.loss as sharded_loss_module
from tests.adaptive_scenarios import SCENARIOS as ADAPTIVE_SCENARIOS
from tests.dispatch_probe import HostReads
from tests.distributed_cases import LOSSES, VARIANTS, make_config
from torch_port.distributed import ShardedMarginHead, shard_range, sharded_logits, sharded_margin_cross_entropy
from torch_port.normalized import cosface_config
from torch_port.tensor_checks import set_value_checks

# Seconds: the timeout of each scenario's process group. A rank that raises promptly does so in
# milliseconds; one that waits for a peer that is never coming waits this long.
FAULT_TIMEOUT_S = 5
NUM_CLASSES, DIM = 10, 5


def problem(rank: int, world: int, batch: int = 3, num_classes: int = NUM_CLASSES):
    """This rank's x (batch, D), W shard and y (float64), drawn from fixed seeds."""
    gen = torch.Generator().manual_seed(100 + rank)
    start, end = shard_range(num_classes, world, rank)
    W = torch.randn(end - start, DIM, dtype=torch.float64, generator=gen)  # first: the same for any batch
    x = torch.randn(batch, DIM, dtype=torch.float64, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, W, y


def timed(fn) -> dict:
    """Run fn; its result (detached) or its exception's type, message and cause, and the seconds taken."""
    start = time.monotonic()
    outcome = {"error": None, "message": "", "cause": None, "value": None}
    try:
        value = fn()
        outcome["value"] = value
    except Exception as err:  # recorded and asserted on in the test process
        outcome.update(error=type(err).__name__, message=str(err))
        outcome["cause"] = None if err.__cause__ is None else type(err.__cause__).__name__
    outcome["seconds"] = time.monotonic() - start
    return outcome


def _loss(x, W, y, **options):
    return sharded_margin_cross_entropy(x, W, y, cosface_config(8.0, 0.2), num_classes=NUM_CLASSES, **options)


def _fails_on(rank: int, error: Exception):
    """A stand-in for the local checks that raises ``error`` on ``rank`` (and checks as usual elsewhere)."""
    real = agreement.check_local

    def check_local(x, W, y, config, num_classes, this_rank, world, **options):
        if this_rank == rank:
            raise error
        return real(x, W, y, config, num_classes, this_rank, world, **options)

    return mock.patch.object(sharded_loss_module, "check_local", check_local)


def unexpected_exception_in_a_check(rank: int, world: int, group) -> dict:
    """The last rank's local check raises something other than ValueError/TypeError (as ``min`` of
    uint32 labels raised NotImplementedError): the loss, the head's loss and the logits."""
    x, W, y = problem(rank, world)
    head = ShardedMarginHead(NUM_CLASSES, DIM, cosface_config(8.0, 0.2), dtype=torch.float64, group=group)
    out = {}
    with _fails_on(world - 1, NotImplementedError("\"min_all\" not implemented for 'UInt32'")):
        out["loss"] = timed(lambda: _loss(x, W, y, group=group))
        out["head"] = timed(lambda: head(x, y))
        out["logits"] = timed(lambda: head.logits(x))
    with _fails_on(world - 1, IndexError("an index error")):
        out["index error"] = timed(lambda: _loss(x, W, y, group=group))
    out["afterwards"] = timed(lambda: _loss(x, W, y, group=group))  # the group is still in step
    return out


def uint32_labels_on_one_rank(rank: int, world: int, group) -> dict:
    """The issue's own example: uint32 labels on the last rank. Whatever the label checks make of
    them (converted, or refused), every rank must do the same at once."""
    x, W, y = problem(rank, world)
    labels = y.to(torch.uint32) if rank == world - 1 else y
    return {"loss": timed(lambda: _loss(x, W, labels, group=group))}


def mismatched_calls(rank: int, world: int, group) -> dict:
    """Rank 0 computes the head's loss while the last rank asks for its logits (and the reverse)."""
    x, W, y = problem(rank, world)
    head = ShardedMarginHead(NUM_CLASSES, DIM, cosface_config(8.0, 0.2), dtype=torch.float64, group=group)
    odd = rank == world - 1
    out = {
        "loss vs logits": timed(lambda: head.logits(x) if odd else head(x, y)),
        "logits vs loss": timed(lambda: head(x, y) if odd else head.logits(x)),
        "function vs function": timed(
            lambda: (
                sharded_logits(x, W, cosface_config(8.0, 0.2), num_classes=NUM_CLASSES, group=group)
                if odd
                else _loss(x, W, y, group=group)
            )
        ),
    }
    out["afterwards"] = timed(lambda: head(x, y))
    return out


def empty_batches(rank: int, world: int, group) -> dict:
    """The last rank holds no sample (x (0, D), y (0,)); then every rank holds none."""
    x, W, y = problem(rank, world, batch=0 if rank == world - 1 else 3)
    head = ShardedMarginHead(NUM_CLASSES, DIM, cosface_config(8.0, 0.2), dtype=torch.float64, group=group)
    head.load_full_weight(torch.cat([problem(r, world)[1] for r in range(world)]))
    xg = x.clone().requires_grad_(True)
    out = {
        "x": x,
        "y": y,
        "W": W,
        "loss": timed(lambda: _loss(x, W, y, reduction="none", group=group)),
        "head logits": timed(lambda: head.logits(x)),
        "logits": timed(lambda: sharded_logits(x, W, cosface_config(8.0, 0.2), num_classes=NUM_CLASSES, group=group)),
        "backward": timed(lambda: torch.autograd.grad(_loss(xg, W, y, group=group), xg)[0]),
    }
    none_x, none_y = x[:0], y[:0]
    out["all empty: loss"] = timed(lambda: _loss(none_x, W, none_y, group=group))
    out["all empty: logits"] = timed(lambda: head.logits(none_x))
    out["afterwards"] = timed(lambda: head(x, y))
    return out


def pickled_heads(rank: int, world: int, group) -> dict:
    """Every sharded head configuration (and a sampling head with its generator) survives pickle and
    torch.save/torch.load of the whole module: same loss, logits and state as the original.

    On the world group (a head on an explicit group holds the group, which does not pickle)."""
    x, _, y = problem(rank, world, batch=4)
    full = torch.randn(NUM_CLASSES, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    heads = {name: dict() for name in [*sorted(LOSSES), *VARIANTS]}
    heads["cosface, sampled"] = dict(sample_rate=0.5, generator=torch.Generator().manual_seed(9 + rank))
    out = {}
    for name, options in heads.items():
        config = make_config(name.split(",")[0])
        head = ShardedMarginHead(NUM_CLASSES, DIM, config, dtype=torch.float64, **options)
        head.load_full_weight(full)
        buffer = io.BytesIO()
        torch.save(head, buffer)
        buffer.seek(0)
        copies = {"pickle": pickle.loads(pickle.dumps(head)), "torch.save": torch.load(buffer, weights_only=False)}
        results = {}
        for which, module in {"original": head, **copies}.items():
            results[which] = {
                "loss": module(x, y).detach(),
                "kept": module.last_kept_classes,
                "logits": module.logits(x),
                "state": module.state_dict(),
                "config equal": module.config == config,
            }
        out[name] = results
    return out


def host_reads_per_step(rank: int, world: int, group) -> dict:
    """Not a fault: how many times one sharded training step (forward and backward) reads tensor data
    back to the host (tests/dispatch_probe.py's HostReads; on a GPU each is a synchronisation),
    inside torch.distributed's own calls included, for each way of calling the sharded path."""
    x, W, y = problem(rank, world, batch=4)
    config = cosface_config(s=16.0, m=0.35)
    head = ShardedMarginHead(NUM_CLASSES, DIM, config, group=group, dtype=torch.float64)
    sampling = ShardedMarginHead(
        NUM_CLASSES, DIM, config, group=group, dtype=torch.float64, sample_rate=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    calls = {
        "plain": lambda w: _loss(x, w, y, group=group),
        "chunked": lambda w: _loss(x, w, y, group=group, chunk_size=3),
        "head": lambda w: head(x, y),
        "head-sampled": lambda w: sampling(x, y),
    }
    counts = {}
    for mode in ("auto", "device"):
        previous = set_value_checks(mode)
        try:
            for name, call in calls.items():
                leaf = W.clone().requires_grad_()
                with HostReads() as probe:
                    call(leaf).backward()
                counts[f"{name} ({mode})"] = probe.count
        finally:
            set_value_checks(previous)
    return counts


SCENARIOS = {
    scenario.__name__: scenario
    for scenario in (
        unexpected_exception_in_a_check,
        uint32_labels_on_one_rank,
        mismatched_calls,
        empty_batches,
        host_reads_per_step,
    )
}
SCENARIOS["pickled_heads"] = pickled_heads
SCENARIOS |= ADAPTIVE_SCENARIOS  # the stateful heads' two-rank cases (tests/adaptive_scenarios.py)


def _numpy(value):
    """Tensors as NumPy arrays, through dicts, lists and tuples: the runner's pipe pickles the answer,
    and torch's pickling of tensors for multiprocessing would share memory instead of copying."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {key: _numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_numpy(item) for item in value)
    return value


def run_scenario(name: str, rank: int, world: int) -> dict:
    """Run one scenario on a fresh group with the short timeout (the world group for pickled_heads)."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=FAULT_TIMEOUT_S))
    return _numpy(SCENARIOS[name](rank, world, None if name == "pickled_heads" else group))
