"""The collectives of the class-sharded path, each with the gradient the sharded loss needs.

Every function takes the process group (None: the world); its timeout bounds every call here.
The autograd Functions stay private to this module; the rest of the subpackage calls the
functions below them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def rank_and_world(group) -> tuple[int, int]:
    """This process's rank and the group's size; a clear error when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(backend, "
            "timeout=...) on every rank first (or use the single-process heads)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_rows(local: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (no autograd).

    Ranks may hold different numbers of rows (``sizes``, in rank order, known to every rank); gloo's
    all_gather needs equal shapes, so each rank sends its rows padded to the largest count and the
    padding is dropped on arrival.
    """
    width = max(sizes)
    send = local.contiguous()
    if local.shape[0] != width:
        send = local.new_zeros((width, *local.shape[1:]))
        send[: local.shape[0]] = local
    parts = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(parts, send, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, sizes)])


def _first_order_only() -> None:
    """Refuse a backward that builds a graph (create_graph=True, for a second derivative).

    The collectives' backwards call torch.distributed in place, which autograd does not record: a
    derivative of their result would silently miss every cross-rank term. Every rank runs the same
    backward and raises here before its first collective, so no rank is left waiting.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the sharded path is once-differentiable: a second derivative (create_graph=True, e.g. a "
            "gradient penalty) cannot go through its collectives; compute such a term on a single "
            "process (torch_port.functional, chunk_size=None or an int)"
        )


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, sizes, group, grad_scale):
        ctx.group, ctx.grad_scale = group, grad_scale
        ctx.offset = sum(sizes[: dist.get_rank(group)])
        ctx.count = local.shape[0]
        return all_gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        _first_order_only()
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        mine = total[ctx.offset : ctx.offset + ctx.count]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None, None


def gather_rows(local: torch.Tensor, sizes: Sequence[int], group, grad_scale: float = 1.0) -> torch.Tensor:
    """All-gather of rows (as :func:`all_gather_rows`); backward: the sum over ranks of the
    gradient, this rank's rows kept, times ``grad_scale``.

    Each rank's loss graph sees every sample but only its own classes, so the gradient it computes
    for the gathered features is partial; the true gradient of a rank's rows is the sum over ranks.
    The backward all-reduces the (B, D) gradient and slices (a reduce-scatter would move R times
    less, but all-reduce runs on every backend and B x D is small next to the class weights).
    """
    return _GatherRows.apply(local, sizes, group, grad_scale)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group):
        total = partial.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        _first_order_only()
        return grad, None


def sum_over_ranks(partial: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-reduce sum. Backward: identity, because every rank goes on to compute the same
    loss from the sum, so the gradient each rank receives is already the whole gradient."""
    return _SumOverRanks.apply(partial, group)


class _LogSumExpOverRanks(torch.autograd.Function):
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
        _first_order_only()
        local, result = ctx.saved_tensors
        return grad * torch.exp(local - result), None


def log_sum_exp_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """log sum_r exp(a_r) for per-rank values a_r (elementwise): the rows' softmax normaliser from
    each rank's log-sum-exp over its own classes.

    Shifted by the global max (all-reduce MAX) before the exponentials are summed (all-reduce SUM),
    so no rank overflows at s = 64. Backward: d/da_r = exp(a_r - result), the share of rank r's
    classes in the softmax, computed locally from the saved result.
    """
    return _LogSumExpOverRanks.apply(local, group)


class _AllReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, group, average: bool):
        ctx.group, ctx.average = group, average
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        _first_order_only()
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.average:
            total = total / dist.get_world_size(ctx.group)
        return total, None, None


def all_reduce_grad(value: torch.Tensor, group, average: bool) -> torch.Tensor:
    """Forward: identity. Backward: the incoming gradient summed (or averaged) over the ranks.

    average=True, on the replicated loss (every rank holds the same values): averaging the gradient
    that comes back makes the rest of the backward see one gradient on every rank, so the result is
    the gradient of the mean of what the ranks back-propagate: the exact gradient of the loss when
    they all back-propagate the same function of it, as a training loop does.

    average=False, on a tensor every rank holds a copy of (a learnable scale) but whose gradient
    each rank only sees the part of its own classes of: the sum is the whole gradient.
    """
    return _AllReduceGrad.apply(value, group, average)


__all__ = [
    "all_gather_rows",
    "all_reduce_grad",
    "gather_rows",
    "log_sum_exp_over_ranks",
    "rank_and_world",
    "sum_over_ranks",
]
