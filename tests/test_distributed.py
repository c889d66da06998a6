"""The class-sharded margin cross-entropy on 2 and 4 gloo processes, against the single-process engine.

One launch per world size (tests/distributed_harness.py starts R processes of
tests/distributed_worker.py): the workers run every case of tests/distributed_cases.py on the same
global inputs (each rank takes its rows of x and y and its shard of W) and save what they computed;
the tests here compare it with ``torch_port.engine.margin_cross_entropy`` on the concatenated batch,
computed in the test process. The losses are the registry's records (their engine configurations and
heads), plus a learnable-scale variant of NormFace's configuration.

"Equal to the single-process result" means: the loss on every rank equals the single-process loss
of the global batch (same reduction); rank r's W shard gradient equals rows [start_r, end_r) of the
single-process dW; rank r's x gradient equals its rows of the single-process dx (times
feature_grad_scale); a learnable scale gets the single-process ds on every rank. Tolerances
(tests/tolerances.py, PATH_AGREEMENT): float64 1e-10, float32 1e-5 (relative, with the same absolute
slack scaled by the largest value); bfloat16 inputs compute in float32 (loss to 1e-5), their
gradients are rounded to bfloat16 (``for_rounded_gradient``: 2^-7).

The shared suites (tests/test_shared_suites.py) run every margin record's samples, edge cases, half
precision and autocast on the 2-rank sharded path as well; this module covers what those do not:
uneven shards and batches, labels on one shard, chunking and sampling inside the shards, heads and
from_head, feature_grad_scale, mismatch errors, timeouts, checkpoints, 4 ranks, inference logits.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed_cases import (
    CASES,
    DTYPES,
    SCALE_CASES,
    SHORT_TIMEOUT,
    Case,
    cotangent,
    global_inputs,
    grad_scale_of,
    make_config,
    make_single_head,
)
from tests.distributed_harness import LAUNCH_DEADLINE, REPO, launch, worker_environment
from tests.tolerances import PATH_AGREEMENT, assert_close, for_rounded_gradient
from torch_port.chunked import FEATURE_BLOCK_BYTES
from torch_port.distributed import (
    ShardedMarginHead,
    merge_shard_weights,
    shard_range,
    sharded_margin_cross_entropy,
)
from torch_port.engine import MarginConfig, margin_cross_entropy, plain_logits

LOSS_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}


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
    tol = PATH_AGREEMENT[case.dtype]
    grad_tol = for_rounded_gradient(tol, case.dtype)
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


@pytest.mark.parametrize("case", SCALE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("world", [2, 4])
def test_scale_cases_cross_row_blocks_and_chunks(case, world):
    """The scale cases are where the issue-17 crash lived only if every rank's chunked path walks
    several feature row blocks (the global batch, gathered) and several chunks of its shard."""
    batch = sum(case.batch[:world])
    rows_per_block = FEATURE_BLOCK_BYTES["cpu"] // (4 * case.dim)
    assert batch >= 256 if world == 2 else batch > 256
    assert math.ceil(batch / rows_per_block) >= 4
    for rank in range(world):
        start, end = shard_range(case.num_classes, world, rank)
        assert math.ceil((end - start) / case.chunk_size) >= 2
    assert len({end - start for start, end in (shard_range(case.num_classes, world, r) for r in range(world))}) == 2


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
        # A head owns W: x of another width is x's error, naming the head's dim (issue 14, item 3).
        "head given x of another width": rf"rank {world - 1} rejected .*: x must have 5 columns, the dim of this "
        r"ShardedMarginHead \(its weight shard has shape \(\d+, 5\)\), got 6",
        "head logits of x of another width": r"computes the logits: x must have 5 columns, the dim of this "
        r"ShardedMarginHead",
    }
    for scenario, pattern in expected_words.items():
        for rank, got in enumerate(results):
            outcome = got["mismatches"][scenario]
            assert outcome["error"] in ("ValueError", "TypeError"), f"{scenario}, rank {rank}: {outcome}"
            assert re.search(pattern, outcome["message"]), f"{scenario}, rank {rank}: {outcome['message']}"
    # Every rank raises the same error, which names the rank that refused its labels and why.
    refused = {got["mismatches"]["labels out of range on one rank"]["message"] for got in results}
    assert len(refused) == 1, refused
    assert refused.pop().startswith(f"rank {world - 1} rejected its inputs, so no rank computes the loss: y must")
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
        assert_close(
            got["checkpoint"]["logits"].numpy(), rows.numpy(), PATH_AGREEMENT["float64"], f"rank {rank} logits"
        )


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
        assert_close(got["checkpoint"]["loss"].numpy(), expected.numpy(), PATH_AGREEMENT["float64"], f"rank {rank}")


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
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_sharded.py"), "--epochs", "4"],
        cwd=REPO,
        env=worker_environment(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_DEADLINE,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [float(line.split("loss")[1].split()[0]) for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(losses) == 4, done.stdout
    assert losses[-1] < 0.7 * losses[0], done.stdout
