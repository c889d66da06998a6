"""Class-sharded margin cross-entropy on torch.distributed: model parallelism over the classes.

When C class weights outgrow one device, rank r of a process group of R ranks keeps only the rows
``[start_r, end_r)`` of W (the layout of ``torch.tensor_split``: shard sizes differ by at most one),
as Partial FC does. One training step of :class:`ShardedMarginHead` (or
:func:`sharded_margin_cross_entropy`) on every rank:

1. the ranks exchange a little metadata (batch sizes, shapes, dtypes, the loss configuration) and
   every rank raises the same clear error if they disagree, before anything else is sent;
2. the features and labels of all ranks are all-gathered: every rank sees the global batch
   (B = sum of the local batches) in rank order;
3. each rank computes, with the engine of ``torch_port/engine.py`` (plain or chunked), the
   log-sum-exp of the global batch's logits over its own classes, the target logit
   S_iy psi(cos theta_iy, theta_iy) taking the place of the plain one where the label falls in the
   shard;
4. the per-rank log-sum-exps are combined across ranks (all-reduce of the max, then of the sum of
   exponentials) into the softmax normaliser, and the target logit is contributed by the rank that
   owns it (all-reduce of a sum, the others contributing 0);
5. backward: each rank's logits receive the softmax probabilities under the global normaliser, so
   its shard of W gets exactly its rows of the single-process gradient; the gradient of the
   gathered features is summed across ranks and each rank keeps its own rows.

The loss is that of the *global* batch and is the same number on every rank: "mean" averages over
all ranks' samples, "sum" adds them, "none" returns the (B,) per-sample losses in rank order. Every
rank must call ``backward`` on it (as with any collective, a rank that skips it leaves the others
waiting until the process group's timeout). The gradients are then those of the single-process
loss on the concatenated batch: each rank's ``W`` shard gets its rows of dL/dW and each rank's ``x``
its rows of dL/dx (tests/test_distributed.py checks both against the engine, in float64 to 1e-10).

Step 3 reuses the engine unchanged: on each rank, a row whose label lives elsewhere gets a
margin-free stand-in target (the shard's first kept class), so the engine's per-sample
cross-entropy plus that stand-in logit is exactly the row's log-sum-exp over the shard, whichever
path (plain or chunked) the engine takes.

Timeouts: every collective here runs on the process group given (default: the world), so it is
bounded by the group's timeout. Set one when creating the group, e.g.
``init_process_group("gloo", timeout=datetime.timedelta(seconds=60))``: the defaults (30 min for
gloo, 10 min for nccl) are long for a job whose rank has died.

Backends: gloo on CPU is what the tests run. Nothing here is CPU-specific (tensors stay on their
device, only torch.distributed collectives are used), but nccl has not been run in this project;
with nccl call ``torch.cuda.set_device(local_rank)`` first, since the metadata exchange
(``all_gather_object``) uses the current device.

See README.md, section "Class-sharded training", and examples/train_sharded.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from softmax_common.checks import check_interval, check_positive, check_positive_int, check_reduction
from torch_port.engine import MarginConfig, _Geometry, _target_logits, check_inputs, margin_cross_entropy, plain_logits
from torch_port.heads import MarginHead
from torch_port.tensor_checks import check_chunk_size, check_labels, check_same_device, compute_dtype, reduce_loss

# The version tag of a shard's checkpoint metadata (ShardedMarginHead.get_extra_state).
CHECKPOINT_FORMAT = "softmax-variants/sharded-margin-head/1"

# Angles at which a margin's target transform psi is evaluated to compare configurations across
# ranks: a callable cannot be compared by identity between processes, its values can.
_PROBE_ANGLES = (0.0, 0.3, 1.2, 2.0, 2.9, math.pi)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The classes ``[start, end)`` that ``rank`` holds when C classes are split over R ranks.

    The first ``C % R`` ranks hold ``C // R + 1`` classes, the others ``C // R``: the layout of
    ``torch.tensor_split(torch.arange(C), R)``, so shard sizes differ by at most one.

    Args:
        num_classes: C, an integer >= world_size (every rank holds at least one class).
        world_size: R >= 1.
        rank: an integer in [0, R).

    Returns:
        ``(start, end)`` with ``end - start`` in ``{C // R, C // R + 1}``.
    """
    world_size = check_positive_int(world_size, "world_size")
    num_classes = check_positive_int(num_classes, "num_classes")
    rank = check_positive_int(rank, "rank", minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes must be >= the world size {world_size} (every rank holds at least one class), "
            f"got {num_classes}"
        )
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _rank_and_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(backend, "
            "timeout=...) on every rank first (or use the single-process heads)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


# --- collectives with their gradients ----------------------------------------------------------


def _all_gather_rows(local: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (no autograd).

    Ranks may hold different numbers of rows; gloo's all_gather needs equal shapes, so each rank
    sends its rows padded to the largest count and the padding is dropped on arrival.
    """
    width = max(sizes)
    send = local.contiguous()
    if local.shape[0] != width:
        send = local.new_zeros((width, *local.shape[1:]))
        send[: local.shape[0]] = local
    parts = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(parts, send, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather of rows; backward: the sum over ranks of the gradient, this rank's rows kept.

    Each rank's loss graph sees every sample but only its own classes, so the gradient it computes
    for the gathered features is partial; the true gradient of a rank's rows is the sum over ranks.
    The backward all-reduces the (B, D) gradient and slices (a reduce-scatter would move R times
    less, but all-reduce runs on every backend and B x D is small next to the class weights).
    ``grad_scale`` multiplies the result (see ``feature_grad_scale``).
    """

    @staticmethod
    def forward(ctx, local, sizes, group, grad_scale):
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        ctx.offset = sum(sizes[: dist.get_rank(group)])
        ctx.count = local.shape[0]
        return _all_gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        mine = total[ctx.offset : ctx.offset + ctx.count]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None, None


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce sum. Backward: identity, because every rank goes on to compute the same
    loss from the sum, so the gradient each rank receives is already the whole gradient."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LogSumExpOverRanks(torch.autograd.Function):
    """log sum_r exp(a_r) for per-rank values a_r (elementwise), as the rows' softmax normaliser.

    Shifted by the global max (all-reduce MAX) before the exponentials are summed (all-reduce SUM),
    so no rank overflows at s = 64. Backward: d/da_r = exp(a_r - result), the share of rank r's
    classes in the softmax, computed locally from the saved result.
    """

    @staticmethod
    def forward(ctx, local, group):
        peak = local.contiguous().clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        mass = torch.exp(local - peak)
        dist.all_reduce(mass, op=dist.ReduceOp.SUM, group=group)
        result = peak + torch.log(mass)
        ctx.save_for_backward(local, result)
        return result

    @staticmethod
    def backward(ctx, grad):
        local, result = ctx.saved_tensors
        return grad * torch.exp(local - result), None


class _AllReduceGrad(torch.autograd.Function):
    """Forward: identity. Backward: the incoming gradient summed (or averaged) over the ranks.

    average=True, on the replicated loss (every rank holds the same values): averaging the gradient
    that comes back makes the rest of the backward see one gradient on every rank, so the result is
    the gradient of the mean of what the ranks back-propagate: the exact gradient of the loss when
    they all back-propagate the same function of it, as a training loop does.

    average=False, on a tensor every rank holds a copy of (a learnable scale) but whose gradient
    each rank only sees the part of its own classes of: the sum is the whole gradient.
    """

    @staticmethod
    def forward(ctx, value, group, average: bool):
        ctx.group, ctx.average = group, average
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.average:
            total = total / dist.get_world_size(ctx.group)
        return total, None, None


# --- agreement across ranks ----------------------------------------------------------------------


def _config_fingerprint(config: MarginConfig, device: torch.device) -> tuple:
    """What must be equal on every rank about a configuration, as plain (picklable) values."""
    scale = config.scale
    if isinstance(scale, torch.Tensor):
        # A learned scale's value is not compared: its replicas follow the same all-reduced gradient,
        # but an exact comparison would turn a last-bit difference between ranks into a failed step.
        scale = ("tensor", tuple(scale.shape), scale.requires_grad)
    target = None
    if config.target is not None:
        theta = torch.tensor(_PROBE_ANGLES, dtype=torch.float64, device=device)
        try:
            with torch.no_grad():
                values = config.target(torch.cos(theta), theta)
            # repr round-trips floats exactly and compares nan equal to nan.
            target = tuple(repr(float(v)) for v in values.double().flatten().tolist())
        except Exception:
            target = getattr(config.target, "__qualname__", type(config.target).__qualname__)
    return (("scale", scale), ("feature_norm", config.feature_norm), ("weight_norm", config.weight_norm), target)


def _exchange_metadata(local_error: Exception | None, metadata: dict, rank: int, world: int, group) -> list[dict]:
    """All-gather every rank's metadata and raise the same error on every rank if any rank rejected
    its inputs or the ranks disagree; returns the list of metadata, in rank order."""
    if local_error is not None:
        metadata = {"error": f"{type(local_error).__name__}: {local_error}"}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, metadata, group=group)
    failed = [(r, meta["error"]) for r, meta in enumerate(everyone) if "error" in meta]
    if failed:
        if local_error is not None:
            raise local_error
        first_rank, message = failed[0]
        raise ValueError(f"rank {first_rank} rejected its inputs, so no rank computes the loss: {message}")
    for key in metadata:
        if key == "batch":  # the one field allowed to differ: ranks may hold different batch sizes
            continue
        values = [meta[key] for meta in everyone]
        if any(value != values[0] for value in values[1:]):
            per_rank = "; ".join(f"rank {r}: {value}" for r, value in enumerate(values))
            raise ValueError(f"{key} must be the same on every rank, got {per_rank}")
    return everyone


def _check_local(x, W, y, config, num_classes, rank, world) -> tuple[int, int, torch.Tensor | None]:
    """The single-rank checks: shapes, dtypes, the shard's size, labels in [0, C)."""
    if not isinstance(config, MarginConfig):
        raise TypeError(f"config must be a torch_port.engine.MarginConfig, got {type(config).__name__}")
    num_classes = check_positive_int(num_classes, "num_classes")
    start, end = shard_range(num_classes, world, rank)
    check_inputs(x, W)
    if W.shape[0] != end - start:
        raise ValueError(
            f"W must have shape ({end - start}, {x.shape[1]}): rank {rank} of {world} holds classes "
            f"[{start}, {end}) of num_classes={num_classes}, got {tuple(W.shape)}"
        )
    if y is not None:
        y = check_labels(y, x.shape[0], num_classes)
        check_same_device(("x", x), ("y", y))
    return start, end, y


def _common_metadata(x, W, num_classes, config) -> dict:
    return {
        "batch": int(x.shape[0]),
        "the feature dimension D": int(x.shape[1]),
        "x.dtype": str(x.dtype),
        "W.dtype": str(W.dtype),
        "num_classes": int(num_classes),
        "the device type": x.device.type,
        "the margin configuration (scale, norms, psi at probe angles)": _config_fingerprint(config, x.device),
    }


# --- the loss ------------------------------------------------------------------------------------


def _sample_classes(y_all, start, end, sample_rate, generator, device) -> torch.Tensor:
    """Partial FC's negative-class sampling on one shard: local indices of the classes kept (sorted).

    Every class that is the label of some sample in the global batch is kept; the rest of the
    ``round(sample_rate * shard size)`` places (at least one class) go to negatives drawn uniformly
    without replacement.
    """
    size = end - start
    positives = torch.zeros(size, dtype=torch.bool, device=device)
    owned = (y_all >= start) & (y_all < end)
    positives[y_all[owned] - start] = True
    keep = min(size, max(int(positives.sum()), max(1, round(sample_rate * size))))
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(size, generator=generator, device=gen_device).to(device)
    # Positives score above every uniform draw, so top-k always takes them first.
    scores = torch.where(positives, torch.full_like(scores, 2.0), scores)
    return torch.topk(scores, keep).indices.sort().values


def _margin_on_rows(config: MarginConfig, rows: torch.Tensor, group) -> MarginConfig:
    """The configuration whose target transform applies psi only to ``rows`` (the samples whose
    label this rank holds) and leaves the other rows' stand-in column margin-free.

    psi is evaluated on the owned rows alone, so a psi with an infinite slope somewhere (at
    cos = +-1, say) is never differentiated at a stand-in column's arbitrary angle.
    """
    scale = config.scale
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        scale = _AllReduceGrad.apply(scale, group, False)
    psi = config.target
    if psi is None:
        return dataclasses.replace(config, scale=scale)

    def target(cos_y: torch.Tensor, theta_y: torch.Tensor) -> torch.Tensor:
        return cos_y.index_put((rows,), psi(cos_y[rows], theta_y[rows]))

    return dataclasses.replace(config, scale=scale, target=target)


def _sharded_loss(
    x, W, y, config, *, num_classes, reduction, sample_rate, feature_grad_scale, chunk_size, generator, group
):
    """The loss and, when sampling, the global indices of the classes this rank kept."""
    rank, world = _rank_and_world(group)
    local_error, metadata = None, {}
    try:
        reduction = check_reduction(reduction)
        sample_rate = check_interval(sample_rate, "sample_rate", 0.0, 1.0, low_open=True)
        feature_grad_scale = check_positive(feature_grad_scale, "feature_grad_scale")
        chunk_size = check_chunk_size(chunk_size)
        start, end, y = _check_local(x, W, y, config, num_classes, rank, world)
        metadata = {
            **_common_metadata(x, W, num_classes, config),
            "reduction": reduction,
            "sample_rate": sample_rate,
            "feature_grad_scale": feature_grad_scale,
            "chunk_size": chunk_size,
            # Backward runs collectives: every rank must take part in it, or none.
            "autograd (grad mode, x.requires_grad, W.requires_grad)": (
                torch.is_grad_enabled(),
                x.requires_grad,
                W.requires_grad,
            ),
        }
    except (TypeError, ValueError) as err:
        local_error = err
    everyone = _exchange_metadata(local_error, metadata, rank, world, group)
    sizes = [meta["batch"] for meta in everyone]

    dtype = compute_dtype(("x", x), ("W", W))
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_all = _GatherRows.apply(x.to(dtype), sizes, group, feature_grad_scale)
        y_all = _all_gather_rows(y, sizes, group)
        owned = (y_all >= start) & (y_all < end)
        rows = owned.nonzero()[:, 0]
        kept = None
        if sample_rate < 1.0:
            kept = _sample_classes(y_all, start, end, sample_rate, generator, W.device)
            column_of = torch.full((end - start,), -1, dtype=torch.long, device=W.device)
            column_of[kept] = torch.arange(kept.numel(), device=W.device)
            W_used, columns = W[kept], column_of[y_all[rows] - start]
        else:
            W_used, columns = W, y_all[rows] - start
        # Rows whose label lives on another rank use column 0 as a margin-free stand-in target, so
        # that the engine's per-sample cross-entropy plus the stand-in logit is the log-sum-exp of
        # the row over this rank's classes, for the plain and the chunked path alike.
        labels = torch.zeros_like(y_all).index_put((rows,), columns)
        local_config = _margin_on_rows(config, rows, group)
        cross_entropy = margin_cross_entropy(x_all, W_used, labels, local_config, "none", chunk_size=chunk_size)
        stand_in = _target_logits(
            _Geometry(x_all, W_used[labels]), torch.arange(labels.numel(), device=labels.device), local_config
        )
        log_normaliser = _LogSumExpOverRanks.apply(cross_entropy + stand_in, group)
        target = _SumOverRanks.apply(torch.where(owned, stand_in, torch.zeros_like(stand_in)), group)
        per_sample = _AllReduceGrad.apply(log_normaliser - target, group, True)
        kept_global = None if kept is None else kept + start
        return reduce_loss(per_sample, reduction), kept_global


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
    global batch, the same value on every rank, reduced over all B samples. Every rank must call
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
        x: this rank's features (B_r, D), float; batch sizes may differ between ranks.
        W: this rank's shard of the class weights, ``(end - start, D)`` with
            ``(start, end) = shard_range(num_classes, world_size, rank)``.
        y: this rank's integer labels (B_r,) in [0, num_classes) (global class indices).
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

    Returns:
        The loss, in float32 (float64 for float64 inputs), equal on every rank.

    Raises:
        ValueError, TypeError: on every rank, naming the argument and the rank, when any rank's
            arguments are invalid or the ranks disagree (feature dimension, dtypes, num_classes,
            configuration, reduction, ...); raised before any features are exchanged.

    References:
        An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCV 2021
        Workshops (class-sharded softmax, negative-class sampling).
    """
    loss, _ = _sharded_loss(
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
    )
    return loss


def sharded_logits(x: torch.Tensor, W: torch.Tensor, config: MarginConfig, *, num_classes: int, group=None):
    r"""Margin-free logits (B_r, C) of this rank's samples over all classes, for inference.

    .. math:: z_{ij} = S_{ij} \cos\theta_{ij}, \qquad j = 0, \dots, C - 1

    Each rank computes the logits of the global batch over its classes; an all-to-all sends every
    rank the columns of its own rows, so a rank holds B_r x C numbers, never B x C. Computed without
    autograd (an inference path): the result does not require grad.

    Args:
        x: this rank's features (B_r, D).
        W: this rank's shard of the class weights (see :func:`sharded_margin_cross_entropy`).
        config: the engine configuration; its target transform is ignored (no margin).
        num_classes: C. group: the process group (default: the world).

    Returns:
        (B_r, C) logits in the compute dtype, columns in global class order.
    """
    rank, world = _rank_and_world(group)
    local_error, metadata = None, {}
    try:
        _check_local(x, W, None, config, num_classes, rank, world)
        metadata = _common_metadata(x, W, num_classes, config)
    except (TypeError, ValueError) as err:
        local_error = err
    everyone = _exchange_metadata(local_error, metadata, rank, world, group)
    sizes = [meta["batch"] for meta in everyone]
    widths = [stop - begin for begin, stop in (shard_range(num_classes, world, r) for r in range(world))]
    with torch.no_grad():
        dtype = compute_dtype(("x", x), ("W", W))
        x_all = _all_gather_rows(x.to(dtype), sizes, group)
        mine = plain_logits(x_all, W, dataclasses.replace(config, target=None))
        # all_to_all needs one column count: pad every shard's columns to the widest shard's.
        send = mine.new_zeros((mine.shape[0], max(widths)))
        send[:, : mine.shape[1]] = mine
        received = send.new_empty((world * sizes[rank], max(widths)))
        dist.all_to_all_single(received, send, [sizes[rank]] * world, list(sizes), group=group)
        blocks = received.view(world, sizes[rank], max(widths))
        return torch.cat([blocks[r, :, : widths[r]] for r in range(world)], dim=1)


# --- the head ------------------------------------------------------------------------------------


class ShardedMarginHead(nn.Module):
    """A margin head whose class weights are split over the ranks of a process group.

    Used like the single-process heads on every rank: ``loss = head(x, y)`` with the rank's own
    batch, then ``loss.backward()`` and the optimizer step; ``head.logits(x)`` gives the margin-free
    (B_r, C) logits for inference. The loss is that of the global batch (the same on every rank);
    see :func:`sharded_margin_cross_entropy` for what it computes and what gradients it gives.

    The head owns ``weight`` of shape ``(class_end - class_start, dim)``: the rows
    ``[class_start, class_end) = shard_range(num_classes, world_size, rank)`` of the full (C, D)
    weight. Initialisation is that of :class:`torch_port.heads.MarginHead`, N(0, 0.01^2), drawn
    from each rank's own random state.

    Checkpoints: ``state_dict()`` holds the shard and its place (``_extra_state``: num_classes,
    dim, world_size, rank, class_start, class_end). Save one file per rank and load it back on the
    same rank of a group of the same size; ``load_state_dict`` refuses another rank's shard before
    changing anything. To change the world size (or go to a single-process head), merge the files
    with :func:`merge_shard_weights` and give the full weight to :meth:`load_full_weight` of each
    new head (or copy it into a single-process head's ``weight``).

    Args:
        num_classes: C >= the world size. dim: D >= 1.
        config: the loss, a :class:`torch_port.engine.MarginConfig` (e.g.
            ``arcface_config(64.0, 0.5, False)`` from :mod:`torch_port.normalized`); the same on
            every rank. A learned scale is a config whose ``scale`` is an ``nn.Parameter``: the head
            registers it as ``self.scale`` (so the optimizer and ``state_dict`` see it) and each
            rank's copy receives the whole gradient.
        reduction, sample_rate, feature_grad_scale, chunk_size, generator, group: as
            :func:`sharded_margin_cross_entropy`.
        device, dtype: where and in which dtype to create ``weight``.

    References:
        An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCV 2021
        Workshops.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        config: MarginConfig,
        *,
        reduction: str = "mean",
        sample_rate: float = 1.0,
        feature_grad_scale: float = 1.0,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MarginConfig):
            raise TypeError(f"config must be a torch_port.engine.MarginConfig, got {type(config).__name__}")
        self.rank, self.world_size = _rank_and_world(group)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.dim = check_positive_int(dim, "dim")
        self.class_start, self.class_end = shard_range(self.num_classes, self.world_size, self.rank)
        self.config = config
        self.reduction = check_reduction(reduction)
        self.sample_rate = check_interval(sample_rate, "sample_rate", 0.0, 1.0, low_open=True)
        self.feature_grad_scale = check_positive(feature_grad_scale, "feature_grad_scale")
        self.chunk_size = check_chunk_size(chunk_size)
        self.generator = generator
        self.group = group
        if isinstance(config.scale, nn.Parameter):
            # A learned scale: registered here so that parameters(), the optimizer and state_dict()
            # see it. Every rank holds a copy; its gradient is summed over the ranks (the whole ds).
            self.scale = config.scale
        # Global indices of the classes the last sampled forward kept on this rank (None: all).
        self.last_kept_classes: torch.Tensor | None = None
        rows = self.class_end - self.class_start
        self.weight = nn.Parameter(torch.empty(rows, self.dim, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def from_head(cls, head: MarginHead, *, group=None, **options) -> ShardedMarginHead:
        """The sharded twin of a single-process head: its configuration, reduction, chunk size,
        device and dtype, and this rank's rows of its weight. ``options`` go to the constructor
        (sample_rate, feature_grad_scale, generator). Annealed heads (L-Softmax, SphereFace) give
        the configuration of their current step, which then stays fixed; a head whose scale is
        learned (``NormFace(learn_scale=True)``) is refused, see ``config`` above instead."""
        if not isinstance(head, MarginHead):
            raise TypeError(f"head must be a torch_port.heads.MarginHead, got {type(head).__name__}")
        config = head.margin_config()
        if isinstance(config.scale, torch.Tensor) and config.scale.requires_grad:
            raise ValueError(
                f"from_head copies fixed configurations; {type(head).__name__}'s scale is learned. Build "
                "ShardedMarginHead(num_classes, dim, config) with config.scale an nn.Parameter instead "
                "(e.g. normface_config(nn.Parameter(torch.tensor(16.0))))"
            )
        sharded = cls(
            head.num_classes,
            head.dim,
            config,
            reduction=head.reduction,
            chunk_size=head.chunk_size,
            group=group,
            device=head.weight.device,
            dtype=head.weight.dtype,
            **options,
        )
        sharded.load_full_weight(head.weight)
        return sharded

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, kept = _sharded_loss(
            x,
            self.weight,
            y,
            self.config,
            num_classes=self.num_classes,
            reduction=self.reduction,
            sample_rate=self.sample_rate if self.training else 1.0,
            feature_grad_scale=self.feature_grad_scale,
            chunk_size=self.chunk_size,
            generator=self.generator,
            group=self.group,
        )
        self.last_kept_classes = kept
        return loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Margin-free logits (B_r, C) of this rank's samples, all classes (a collective)."""
        return sharded_logits(x, self.weight, self.config, num_classes=self.num_classes, group=self.group)

    # --- checkpoints ---

    def get_extra_state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "num_classes": self.num_classes,
            "dim": self.dim,
            "world_size": self.world_size,
            "rank": self.rank,
            "class_start": self.class_start,
            "class_end": self.class_end,
        }

    def set_extra_state(self, state) -> None:
        self._check_shard_metadata(state)  # already checked before any copy; cheap to repeat

    def _check_shard_metadata(self, state) -> None:
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a ShardedMarginHead checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        mine = self.get_extra_state()
        keys = ("num_classes", "dim", "class_start", "class_end")
        if any(state.get(k) != mine[k] for k in keys):
            raise ValueError(
                f"the checkpoint holds classes [{state.get('class_start')}, {state.get('class_end')}) of "
                f"num_classes={state.get('num_classes')}, dim={state.get('dim')} (rank {state.get('rank')} of "
                f"{state.get('world_size')}); this head holds [{self.class_start}, {self.class_end}) of "
                f"num_classes={self.num_classes}, dim={self.dim} (rank {self.rank} of {self.world_size}). Load it "
                f"on that rank of a group of that size, or re-shard with merge_shard_weights + load_full_weight"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checked before the weight is copied, so a refused checkpoint changes nothing.
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_shard_metadata(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows of a full (num_classes, dim) weight into the shard."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != (self.num_classes, self.dim):
            raise ValueError(
                f"weight must have shape ({self.num_classes}, {self.dim}) (the full weight), got {tuple(weight.shape)}"
            )
        self.weight.copy_(weight[self.class_start : self.class_end])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, classes=[{self.class_start}, {self.class_end}), "
            f"rank={self.rank}/{self.world_size}, reduction={self.reduction!r}, sample_rate={self.sample_rate}"
        )


def merge_shard_weights(state_dicts: Sequence[Mapping], prefix: str = "") -> torch.Tensor:
    """The full (num_classes, dim) weight from the state dicts of all shards of a ShardedMarginHead.

    Args:
        state_dicts: one ``state_dict()`` per rank (any order), e.g. loaded from the files each rank
            saved; together they must cover the classes [0, num_classes) exactly once.
        prefix: the head's key prefix when it was saved as part of a larger model (e.g. "head.").

    Returns:
        The rows in class order, as one tensor (dtype and device of the shards).
    """
    shards = []
    for index, state in enumerate(state_dicts):
        meta = state.get(prefix + "_extra_state") if isinstance(state, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("format") != CHECKPOINT_FORMAT:
            key = prefix + "_extra_state"
            raise ValueError(f"state_dicts[{index}] has no ShardedMarginHead metadata under {key!r}")
        shards.append((meta, state[prefix + "weight"]))
    if not shards:
        raise ValueError("state_dicts must hold at least one shard, got none")
    shards.sort(key=lambda item: item[0]["class_start"])
    num_classes, dim = shards[0][0]["num_classes"], shards[0][0]["dim"]
    position = 0
    for meta, weight in shards:
        if meta["num_classes"] != num_classes or meta["dim"] != dim:
            raise ValueError(
                f"the shards disagree: num_classes {meta['num_classes']} vs {num_classes}, dim {meta['dim']} vs {dim}"
            )
        if meta["class_start"] != position:
            raise ValueError(
                f"the shards must cover [0, {num_classes}) exactly once; classes from {position} on are "
                f"{'missing' if meta['class_start'] > position else 'held twice'}"
            )
        if tuple(weight.shape) != (meta["class_end"] - meta["class_start"], dim):
            raise ValueError(
                f"the shard of classes [{meta['class_start']}, {meta['class_end']}) has shape {tuple(weight.shape)}"
            )
        position = meta["class_end"]
    if position != num_classes:
        raise ValueError(
            f"the shards must cover [0, {num_classes}) exactly once; classes from {position} on are missing"
        )
    return torch.cat([weight for _, weight in shards])


__all__ = [
    "CHECKPOINT_FORMAT",
    "ShardedMarginHead",
    "merge_shard_weights",
    "shard_range",
    "sharded_logits",
    "sharded_margin_cross_entropy",
]
