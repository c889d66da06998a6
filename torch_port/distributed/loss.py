r"""The class-sharded loss: each rank's share of the engine's primitive, combined across ranks.

One training step on every rank (:func:`sharded_margin_cross_entropy`, or
:class:`~torch_port.distributed.head.ShardedMarginHead`):

1. each rank checks its own arguments (any exception is caught), then the ranks exchange their
   metadata (which call, shapes, dtypes, configuration, options; or the failure) and agree, or all
   raise the same error at once (agreement.py);
2. the features and labels of all ranks are all-gathered: every rank sees the global batch
   (B = sum of the local batches) in rank order;
3. each rank calls the engine's primitive :func:`torch_port.engine.lse_and_target` (plain or
   chunked) on its own classes, with the labels of other shards given as -1: per row, the
   log-sum-exp a_ri over the shard and, where the row's class is the shard's, its target logit t_i;
4. the a_ri are combined across ranks (all-reduce of the max, then of the sum of exponentials) into
   the softmax normaliser, and the target logits are all-reduced (a sum: only the owner of a
   class contributes a nonzero value), so each target logit is computed once, by that rank (the
   other ranks' rows with label -1 are masked to 0 inside the same (B,) operations, which keeps
   every shape independent of the labels: no host synchronisation to select the owned rows);
5. backward: each rank's logits receive the softmax probabilities under the global normaliser, so
   its shard of W gets exactly its rows of the single-process gradient; the gradient of the
   gathered features is summed across ranks and each rank keeps its own rows.

Reads back to the host per step (forward and backward; on a GPU each is a synchronisation),
counted by tests/test_distributed_faults.py: one, the all-gathered batch sizes and metadata digests
(agreement.py), which the padded all-gather of the rows needs; plus one per pass of the chunked path
(grouping the labels by chunk), one for Partial FC's sampling when ``sample_rate < 1`` (the number
of positives decides k of top-k), and, in eager code on the CPU only, the label range check (on a
GPU and under torch.compile it is a device-side assertion: torch_port.set_value_checks).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from softmax_common.checks import check_ignore_index, check_interval, check_positive, check_reduction
from torch_port.distributed.agreement import check_local, common_metadata, exchange_metadata, shard_range
from torch_port.distributed.collectives import (
    all_gather_rows,
    all_reduce_grad,
    gather_rows,
    log_sum_exp_over_ranks,
    rank_and_world,
    sum_over_ranks,
)
from torch_port.engine import ABSENT, MarginConfig, lse_and_target, penalty_of, plain_logits, unit_rows, upcast
from torch_port.plain_path import modulates_negatives, target_side
from torch_port.row_params import map_row_tensors, resolve_labels
from torch_port.tensor_checks import check_chunk_size, compute_dtype, reduce_loss


def sample_classes(y_all, start, end, sample_rate, generator, device) -> torch.Tensor:
    """Partial FC's negative-class sampling on one shard: local indices of the classes kept (sorted).

    Every class that is the label of some sample in the global batch is kept; the rest of the
    ``round(sample_rate * shard size)`` places (at least one class) go to negatives drawn uniformly
    without replacement.
    """
    size = end - start
    owned = (y_all >= start) & (y_all < end)
    # Mark the positives through an index that sends other shards' labels to a spare slot, rather
    # than selecting the owned labels (a data-dependent shape: a host synchronisation on GPU).
    marks = torch.zeros(size + 1, dtype=torch.bool, device=device)
    marks[torch.where(owned, y_all - start, size)] = True
    positives = marks[:size]
    keep = min(size, max(int(positives.sum()), max(1, round(sample_rate * size))))
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(size, generator=generator, device=gen_device).to(device)
    # Positives score above every uniform draw, so top-k always takes them first.
    scores = torch.where(positives, torch.full_like(scores, 2.0), scores)
    return torch.topk(scores, keep).indices.sort().values


def sharded_loss(
    x,
    W,
    y,
    config,
    *,
    num_classes,
    reduction,
    sample_rate,
    feature_grad_scale,
    chunk_size,
    generator,
    group,
    owner=None,
    ignore_index=ABSENT,
    statistics=None,
):
    """The loss and, when sampling, the global indices of the classes this rank kept (else None).
    ``owner``: the module that owns W, for the error of x of another width (see ``check_local``).
    ``statistics``: a head's batch statistics (torch_port/adaptive_heads.py), updated from the global
    batch before the margins are computed; its ``margin_config()`` then replaces ``config``."""
    rank, world = rank_and_world(group)
    local_error, metadata = None, {}
    try:
        reduction = check_reduction(reduction)
        sample_rate = check_interval(sample_rate, "sample_rate", 0.0, 1.0, low_open=True)
        feature_grad_scale = check_positive(feature_grad_scale, "feature_grad_scale")
        chunk_size = check_chunk_size(chunk_size)
        ignore_index = check_ignore_index(ignore_index)
        start, end, y = check_local(x, W, y, config, num_classes, rank, world, owner=owner, ignore_index=ignore_index)
        dtype = compute_dtype(("x", x), ("W", W))
        metadata = {
            **common_metadata(x, W, num_classes, config),
            "reduction": reduction,
            "sample_rate": sample_rate,
            "feature_grad_scale": feature_grad_scale,
            "chunk_size": chunk_size,
            "ignore_index": ignore_index,
            # Backward runs collectives: every rank must take part in it, or none.
            "autograd (grad mode, x.requires_grad, W.requires_grad)": (
                torch.is_grad_enabled(),
                x.requires_grad,
                W.requires_grad,
            ),
        }
    except Exception as err:  # whatever it is, every rank must hear of it (agreement.exchange_metadata)
        local_error = err
    everyone = exchange_metadata("loss", local_error, metadata, rank, world, group)
    sizes = [meta["batch"] for meta in everyone]

    with torch.autocast(device_type=x.device.type, enabled=False):
        # upcast: a gradient past float16's range reaches a float16 x saturated, not inf (geometry.upcast)
        x_all = gather_rows(upcast(x, dtype), sizes, group, feature_grad_scale)
        y_all = all_gather_rows(y, sizes, group)
        # Per-sample margins travel with their rows; ignored rows (ignore_index < 0) are owned by no rank.
        config = dataclasses.replace(
            config, target=map_row_tensors(config.target, lambda t: all_gather_rows(t, sizes, group))
        )
        config = resolve_labels(config, y_all)  # per-class margins: by the global labels, before the shard's
        owned = (y_all >= start) & (y_all < end)
        labels = torch.where(owned, y_all - start, ABSENT)
        kept, W_used = None, W
        if sample_rate < 1.0:
            kept = sample_classes(y_all, start, end, sample_rate, generator, W.device)
            column_of = torch.full((end - start,), ABSENT, dtype=torch.long, device=W.device)
            column_of[kept] = torch.arange(kept.numel(), device=W.device)
            k = config.subcenters  # a kept class keeps its k rows
            W_used = W[kept] if k == 1 else W.view(-1, k, W.shape[1])[kept].reshape(-1, W.shape[1])
            labels = torch.where(owned, column_of[labels.clamp_min(0)], ABSENT)
        thresholds = None
        if statistics is not None or modulates_negatives(config):
            config, thresholds = _global_target_side(x_all, W_used, y_all, labels, owned, config, statistics, group)
        scale = config.scale
        if isinstance(scale, torch.Tensor) and scale.requires_grad:
            # Every rank holds a copy of a learned scale and sees only its classes' share of ds.
            scale = all_reduce_grad(scale, group, average=False)
        local_config = dataclasses.replace(config, scale=scale)
        lse, target = lse_and_target(
            x_all, W_used, labels, local_config, chunk_size, validate=False, thresholds=thresholds
        )
        log_normaliser = log_sum_exp_over_ranks(lse, group)
        if config.penalty is not None:  # each row's penalty (MagFace), from the rank that holds its class
            target = target - torch.where(owned, penalty_of(x_all, config), 0.0)
        target = sum_over_ranks(target, group)
        per_sample = all_reduce_grad(log_normaliser - target, group, average=True)
        counted = None if ignore_index is None else y_all != ignore_index
        if counted is not None:
            per_sample = torch.where(counted, per_sample, 0.0)
        kept_global = None if kept is None else kept + start
        return reduce_loss(per_sample, reduction, counted), kept_global


def _global_target_side(x_all, W_used, y_all, labels, owned, config, statistics, group):
    """What every shard needs from the target side, computed by the rank holding each row's class and
    summed over the ranks (one all-reduce of a (2, B) tensor, no gradient): cos theta_y, for a head's
    statistics (CurricularFace's t, taken over the global batch), and the thresholds of a
    configuration that modulates non-target logits (+inf for rows no rank holds: ignored ones).
    Returns the configuration to use (the statistics' own, once updated) and the thresholds."""
    cos_y, thresholds = target_side(x_all, W_used, labels, config)
    both = torch.stack([cos_y, torch.where(owned, thresholds, 0.0)])
    dist.all_reduce(both, group=group)
    valid = y_all >= 0  # a class index: held by exactly one rank (ignored rows are negative)
    if statistics is not None:
        with torch.no_grad():
            _, norms = unit_rows(x_all.detach())
            statistics.update(norms[:, 0], both[0], valid)
        config = statistics.margin_config()
    return config, torch.where(valid, both[1], math.inf)


def sharded_margin_cross_entropy(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    config: MarginConfig,
    *,
    num_classes: int,
    reduction: str = "mean",
    sample_rate: float = 1.0,
    feature_grad_scale: float = 1.0,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    group=None,
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""Margin cross-entropy of the global batch with the class weights sharded over the ranks.

    Called on every rank of ``group`` with that rank's batch and shard. With B = sum of the ranks'
    batches and logits as in :mod:`torch_port.engine`,

    .. math::

        \ell_i = \log \sum_{r=0}^{R-1} \exp a_{ri} - t_i,\qquad
        a_{ri} = \log\Big(\sum_{j \in \text{shard } r,\ j \ne y_i} e^{S_{ij}\cos\theta_{ij}}
                 + [y_i \in \text{shard } r]\, e^{t_i}\Big),\qquad
        t_i = S_{iy_i}\,\psi(\cos\theta_{iy_i}, \theta_{iy_i}),

    which is the single-process margin cross-entropy of the concatenated batch: the loss of the
    global batch, the same value on every rank, reduced over all B samples. Each rank computes the
    engine's primitive (:func:`torch_port.engine.lse_and_target`) on its shard, the labels of
    other shards given as -1, so a_ri is that rank's log-sum-exp and t_i comes from the one rank
    that holds class y_i (computed once). Every rank must call
    ``backward`` on the same function of it; then rank r's ``W`` gets its rows of dL/dW and its
    ``x`` its rows of dL/dx (times ``feature_grad_scale``). A learnable scale (a 0-d tensor in
    ``config``) gets the whole dL/ds on every rank; tensors captured inside ``config.target`` get
    only the part of the samples whose label this rank holds (sum them across ranks yourself).

    Negative-class sampling (``sample_rate < 1``, Partial FC): each rank keeps every class that is
    a label in the global batch plus random other classes of its shard, ``round(sample_rate *
    shard size)`` classes in all (at least one), and the softmax runs over the kept classes only.
    This is an approximation of the loss (the normaliser misses the dropped negatives, so the loss
    is lower than the exact one); dropped rows get a zero gradient. ``sample_rate=1`` is the
    exact path.

    Args:
        x: this rank's features (B_r, D), float; batch sizes may differ between ranks, and B_r may
            be 0 on some ranks (not on all): such a rank takes part, its x gets a (0, D) gradient.
        W: this rank's shard of the class weights, ``((end - start) k, D)`` (k = config.subcenters) with
            ``(start, end) = shard_range(num_classes, world_size, rank)``.
        y: this rank's integer labels (B_r,) in [0, num_classes) (global class indices), or
            ``ignore_index``. Per-sample margins in ``config`` (a (B_r,) tensor) are this rank's rows.
        config: the loss as an engine configuration (same on every rank).
        num_classes: C, the total number of classes, >= the world size.
        reduction: "mean" (over the global batch), "sum", or "none" (the (B,) losses of the global
            batch, rank 0's samples first).
        sample_rate: the share of each shard used, in (0, 1]; 1 is exact.
        feature_grad_scale: multiplies the gradient that reaches ``x``, > 0. Pass the world size
            when the network producing ``x`` is wrapped in ``DistributedDataParallel``, which
            averages its gradients over the ranks: each rank's ``x`` already receives the whole
            gradient of the global loss, so the average would be R times too small.
        chunk_size: None for the plain path; an int walks the shard in chunks of that many classes
            (the memory-efficient path of ``torch_port/chunked.py``).
        generator: the random generator of the negative sampling (default: torch's global one).
        group: the process group (default: the world); its timeout bounds every collective here.
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient;
            "mean" averages over the other rows of the global batch (0 when all are ignored).

    Returns:
        The loss, in float32 (float64 for float64 inputs), equal on every rank.

    Raises:
        ValueError, TypeError: on every rank, with the same message naming the argument and the
            rank, when any rank's arguments are invalid or the ranks disagree (the call made,
            feature dimension, dtypes, num_classes, configuration, reduction, ...), or when no rank
            holds a sample; raised before any features are exchanged.
        RuntimeError: on every rank, when a rank's checks raised anything else (the message names
            that rank and the original exception, to which the failing rank's error is chained).

    References:
        An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCV 2021
        Workshops (class-sharded softmax, negative-class sampling).
    """
    loss, _ = sharded_loss(
        x,
        W,
        y,
        config,
        num_classes=num_classes,
        reduction=reduction,
        sample_rate=sample_rate,
        feature_grad_scale=feature_grad_scale,
        chunk_size=chunk_size,
        generator=generator,
        group=group,
        ignore_index=ignore_index,
    )
    return loss


def sharded_logits(
    x: torch.Tensor, W: torch.Tensor, config: MarginConfig, *, num_classes: int, group=None, owner: str | None = None
):
    r"""Margin-free logits (B_r, C) of this rank's samples over all classes, for inference.

    .. math:: z_{ij} = S_{ij} \cos\theta_{ij}, \qquad j = 0, \dots, C - 1

    Each rank computes the logits of the global batch over its classes; an all-to-all sends every
    rank the columns of its own rows, so a rank holds B_r x C numbers, never B x C. Computed without
    autograd (an inference path): the result does not require grad.

    Args:
        x: this rank's features (B_r, D); B_r may be 0 on some ranks (their result is (0, C)).
        W: this rank's shard of the class weights (see :func:`sharded_margin_cross_entropy`).
        config: the engine configuration; its target transform is ignored (no margin).
        num_classes: C. group: the process group (default: the world).
        owner: the name of the module that owns W, if any (``ShardedMarginHead`` passes its own): then
            x of another width than W is refused as x's error, naming that module's dim.

    Returns:
        (B_r, C) logits in the compute dtype, columns in global class order.

    Raises:
        As :func:`sharded_margin_cross_entropy`, on every rank, before any features are exchanged;
        a rank asking for the logits while another asks for the loss is a ValueError on every rank.
    """
    rank, world = rank_and_world(group)
    local_error, metadata = None, {}
    try:
        check_local(x, W, None, config, num_classes, rank, world, owner=owner)
        dtype = compute_dtype(("x", x), ("W", W))
        metadata = common_metadata(x, W, num_classes, config)
    except Exception as err:  # whatever it is, every rank must hear of it (agreement.exchange_metadata)
        local_error = err
    everyone = exchange_metadata("logits", local_error, metadata, rank, world, group)
    sizes = [meta["batch"] for meta in everyone]
    widths = [stop - begin for begin, stop in (shard_range(num_classes, world, r) for r in range(world))]
    with torch.no_grad():
        x_all = all_gather_rows(x.to(dtype), sizes, group)
        mine = plain_logits(x_all, W, dataclasses.replace(config, target=None))
        # all_to_all needs one column count: pad every shard's columns to the widest shard's.
        send = mine.new_zeros((mine.shape[0], max(widths)))
        send[:, : mine.shape[1]] = mine
        received = send.new_empty((world * sizes[rank], max(widths)))
        dist.all_to_all_single(received, send, [sizes[rank]] * world, list(sizes), group=group)
        blocks = received.view(world, sizes[rank], max(widths))
        return torch.cat([blocks[r, :, : widths[r]] for r in range(world)], dim=1)


__all__ = ["sample_classes", "sharded_logits", "sharded_loss", "sharded_margin_cross_entropy"]
