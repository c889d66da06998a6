"""The memory-efficient path of the engine's primitive: classes walked in chunks, no (B, C) tensor kept.

Face recognition trains with 1e5 to 1e7 classes, where the (B, C) logits, their softmax and their
gradient dominate memory. This path computes what the plain path of
:func:`torch_port.engine.lse_and_target` computes, per row the log-sum-exp over the classes and the
target logit, with their gradients for x, W and a learnable scale, to rounding, but touches the
classes ``chunk_size`` at a time:

- forward: for each chunk, the (B, k) logits c_j (u_i . W_j) with the targets' columns masked out,
  reduced to a per-chunk maximum and sum of exponentials, merged at the end into the softmax
  normaliser (M_i, sum_j exp(logit_ij - M_i)); the target logit t_i = S_iy psi(cos, theta) comes
  from the B rows W[y] alone, so lse_i = M_i + log(exp(t_i - M_i) + sum). A row whose label is -1
  (its target lives on another shard) has no target term and a target of 0.
- backward: each chunk's logits are recomputed from x and W (one more matrix product instead of
  keeping B x C numbers; the last chunk's products are kept from forward, so with C <= chunk_size
  nothing is recomputed), turned into G_ij = g_i p_ij and pushed into du (G W) and dW (G^T u)
  before the next chunk; the chain rule through the per-class normalisation 1/max(|W_j|, eps) is
  applied by hand, so no (C, D) tensor is created besides dW itself.
- the feature side (normalising x, the target logit with its margin) is a few (B, D) operations:
  it goes through ordinary autograd, rebuilt in backward rather than kept, so that every target
  transform psi of :class:`~torch_port.geometry.MarginConfig` works unchanged.

The matrix products are the cost: with n = ceil(C / k) chunks the path does 4n - 1 products of
(B, D) by (D, k) size where the plain path does 3n (the recomputation is what buys memory
independent of C). Everything else is a handful of passes over each (B, k) block, the
exponentials as exp2 (see normaliser). Between forward and backward only x, W, y, (B,)/(C,)
vectors and the last chunk's two (B, k) blocks are kept. A backward that builds a graph
(create_graph=True, for a second derivative) recomputes the step on the plain path instead: exact,
at the plain path's memory (_differentiable_backward). On
a GPU the chunk loop never waits for the host; grouping the labels by chunk costs one
synchronisation per pass. Measurements: benchmarks/RESULTS.md. Derivation:
derivations/09-chunked-margin-ce.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from torch_port.chunk_budget import CHUNK_BUDGET_BYTES, MIN_CHUNK, chunk_size_for
from torch_port.chunk_loops import Chunks, backward_chunks, normaliser, slopes_over_norms
from torch_port.chunked_generic import checkpointed_lse_and_target, needs_generic_path
from torch_port.geometry import (
    MarginConfig,
    norm_factors,
    row_norms,
    target_logits,
    unit_rows,
    upcast,
)
from torch_port.plain_path import plain_lse_and_target
from torch_port.row_params import rows_of_config
from torch_port.tensor_checks import compute_dtype

# The bytes one (rows, D) float32 block of the feature side may take, by device (see _row_blocks).
FEATURE_BLOCK_BYTES = {"cpu": 2**17, "cuda": 2**26}


def chunked_lse_and_target(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    config: MarginConfig,
    chunk_size: int,
    thresholds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The engine's primitive, per row (B,): the log-sum-exp over W's classes and the target logit,
    walking the classes in chunks of ``chunk_size``.

    .. math::

        \mathrm{lse}_i = M_i + \log\Big([y_i \ne -1]\, e^{t_i - M_i}
            + \sum_{j \ne y_i} e^{S_{ij} \cos\theta_{ij} - M_i}\Big),
        \qquad t_i = S_{iy_i}\,\psi(\cos\theta_{iy_i}, \theta_{iy_i}),
        \qquad M_i = \max\big(t_i, \max_{j \ne y_i} S_{ij} \cos\theta_{ij}\big)

    The same values and gradients as the plain path (to rounding), with memory O(B k + B D + C)
    besides the gradients themselves, for every configuration of the engine (fixed or learnable scale,
    feature and weight norms, any target transform). Called by
    :func:`torch_port.engine.lse_and_target` (``chunk_size=int``), which validates the arguments and
    disables autocast first.

    Args:
        x: features (B, D), already checked by the engine.
        W: class weights (C, D), one row per class; float16/bfloat16 rows are upcast chunk by chunk.
        y: int64 labels (B,) in [-1, C); -1: the row's target is not among these classes (no target
            term in its log-sum-exp, target 0).
        config: the loss as an engine configuration.
        chunk_size: classes per chunk, an int >= 1 (any value; larger than C means one chunk).
        thresholds: the per-row thresholds of absent rows for a configuration that modulates
            non-target logits (torch_port/plain_path.py); such configurations, and sub-centres,
            take the checkpointed path of torch_port/chunked_generic.py.

    Returns:
        ``(lse, target)``, both (B,) in the compute dtype (float32, or float64 for float64 inputs).

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", ICLR 2025
        (the chunked log-sum-exp with recomputation in the backward pass);
        Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018.
    """
    if needs_generic_path(config):
        return checkpointed_lse_and_target(x, W, y, config, int(chunk_size), thresholds)
    scale = 1.0 if config.scale is None else config.scale
    return _ChunkedLseAndTarget.apply(x, W, scale, y, config, int(chunk_size))


def chunked_margin_cross_entropy(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig, chunk_size: int
) -> torch.Tensor:
    """Per-sample margin cross-entropy (B,), lse - t of :func:`chunked_lse_and_target` (labels in [0, C))."""
    lse, target = chunked_lse_and_target(x, W, y, config, chunk_size)
    return lse - target


def _feature_side(x, w_target, present, config: MarginConfig, scale):
    """The (B,)-sized and (B, D)-sized part of the primitive, ordinary autograd: the target logits
    t_i = S_iy psi(cos, theta) from the rows W[y] alone (0 where ``present`` is False), and the
    features entering the products, u_i = x_i / max(|x_i|, eps), times |x_i| when the config keeps
    the feature norm."""
    dtype = compute_dtype(("x", x), ("W", w_target))
    x_hat, x_norm = unit_rows(upcast(x, dtype))
    w_hat, w_norm = unit_rows(upcast(w_target, dtype))
    target = target_logits(x_hat, x_norm, w_hat, w_norm, dataclasses.replace(config, scale=scale), present)
    return target, _products_side(x_hat, x_norm, config)


def _products_side(x_hat, x_norm, config: MarginConfig):
    return x_hat * x_norm if config.feature_norm else x_hat


def _row_blocks(x: torch.Tensor) -> list[slice]:
    """The feature side runs a block of rows of the batch at a time: its handful of (B, D)
    temporaries (the rows W[y], unit vectors, their sum and difference, the graph rebuilt in
    backward) then hold at most FEATURE_BLOCK_BYTES each (128 KiB on CPU: 64 rows at D = 512, 256
    at D = 128), which lowers the path's peak memory at large D (benchmarks/RESULTS.md). Each
    block costs a few small operations, hence bytes rather than a fixed row count. On a GPU the
    budget is 64 MiB (one block for most batches: kernel launches, not bytes, are what a GPU runs
    short of)."""
    budget = FEATURE_BLOCK_BYTES["cpu" if x.device.type == "cpu" else "cuda"]
    batch, rows = x.shape[0], max(1, budget // (4 * x.shape[1]))
    return [slice(first, min(first + rows, batch)) for first in range(0, batch, rows)]


def _targets_and_features(x, W, y, present, config: MarginConfig, scale, dtype):
    """Forward, no graph: the target logits t (B,) and the features u (B, D), row block by row block."""
    target, u = x.new_empty(x.shape[0], dtype=dtype), x.new_empty(x.shape, dtype=dtype)
    rows_of = y.clamp_min(0)  # a row without a target reads class 0 and masks it out (target_logits)
    for rows in _row_blocks(x):
        block = rows_of_config(config, rows)  # per-sample margins: this block's
        target[rows], u[rows] = _feature_side(x[rows], W[rows_of[rows]], present[rows], block, scale)
    return target, u


class _ChunkedLseAndTarget(torch.autograd.Function):
    """(lse_i, t_i), forward and backward chunk by chunk; see chunked_lse_and_target."""

    @staticmethod
    def forward(ctx, x, W, scale, y, config: MarginConfig, chunk_size: int):
        scale_value = scale.detach() if isinstance(scale, torch.Tensor) else scale
        dtype = compute_dtype(("x", x), ("W", W))
        present = y >= 0
        target, u = _targets_and_features(x, W, y, present, config, scale_value, dtype)
        factors = norm_factors(row_norms(W, u.dtype), config.weight_norm)
        chunks = Chunks(W.shape[0], y, chunk_size)
        keep_last = any(ctx.needs_input_grad[:3])
        competing = torch.where(present, target, -math.inf)  # an absent target takes no part
        peak, others, kept = normaliser(W, u, competing, scale_value * factors[0], chunks, keep_last)
        total = others + torch.exp(competing - peak)
        lse = peak + torch.log(total)

        ctx.config, ctx.chunks = config, chunks
        ctx.float_scale = None if isinstance(scale, torch.Tensor) else scale
        # The last chunk's two (B, k) blocks, the first with its products, used once by the first
        # backward; an attribute, not saved tensors, because that backward writes into them.
        ctx.kept = kept
        # Besides those two blocks only inputs and (B,)/(C,) vectors are kept: the (B, D) feature
        # side is recomputed in backward.
        saved_scale = (scale,) if isinstance(scale, torch.Tensor) else ()
        ctx.save_for_backward(x, W, y, *factors, peak, total, others, *saved_scale)
        return lse, target

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        if torch.is_grad_enabled():  # create_graph=True: a derivative of this gradient will be taken
            return _differentiable_backward(ctx, grad_lse, grad_target)
        with torch.no_grad():
            return _chunked_backward(ctx, grad_lse, grad_target)


def _differentiable_backward(ctx, grad_lse, grad_target):
    """The backward as a graph, for double backward (a gradient penalty, create_graph=True).

    The chunk-by-chunk backward is written by hand and has no graph of its own, so a second
    derivative taken through it would silently miss every term that depends on x, W or s through
    the gradient. Instead, the primitive is recomputed on the plain path (ordinary autograd) and
    differentiated with create_graph: exact to any order, at the plain path's O(B C) memory for
    this step. The chunked path saves memory in ordinary training, not under a gradient penalty.
    """
    x, W, y = ctx.saved_tensors[:3]
    saved_scale = ctx.saved_tensors[-1:] if ctx.float_scale is None else ()  # a tensor scale is saved last
    ctx.kept = None
    config = dataclasses.replace(ctx.config, scale=saved_scale[0]) if saved_scale else ctx.config
    wanted = [(t, need) for t, need in zip((x, W, *saved_scale), ctx.needs_input_grad[:3])]
    inputs = [t for t, need in wanted if need]
    with torch.autocast(device_type=W.device.type, enabled=False):
        lse, target = plain_lse_and_target(x, W, y, config)
        found = iter(torch.autograd.grad((lse, target), inputs, (grad_lse, grad_target), create_graph=True))
    grads = [next(found) if need else None for _, need in wanted]
    return (*grads, *[None] * (6 - len(grads)))


def _chunked_backward(ctx, grad_lse, grad_target):
    x, W, y, *saved = ctx.saved_tensors
    factors, (peak, total, others), saved_scale = saved[:4], saved[4:7], saved[7:]
    kept, ctx.kept = ctx.kept, None  # a second backward (retain_graph=True) recomputes that chunk
    scale = saved_scale[0] if saved_scale else ctx.float_scale
    scale_value = scale.detach() if saved_scale else scale
    need_x, need_W, need_scale = ctx.needs_input_grad[:3]
    config = ctx.config
    present = y >= 0
    rows_of = y.clamp_min(0)
    with torch.autocast(device_type=W.device.type, enabled=False):
        g = grad_lse.to(peak.dtype)
        row_factor = g / total
        u = _products_side(*unit_rows(x.detach().to(peak.dtype)), config)
        needs = (need_x, need_W, need_scale, config.feature_norm or config.weight_norm)
        # du accumulates in the storage dx will be returned in, when the dtypes agree: block by
        # block below, a block's rows of du are read (as the cotangent) before dx overwrites them.
        grad_u = torch.zeros_like(u) if need_x else None
        # The target logit's cotangent: its own, plus the log-sum-exp's through p_iy. Written with
        # p_iy = 1 - others / total, so that for the cross-entropy (grad_target = -grad_lse) the
        # first term is exactly 0 and g (p_iy - 1) = -g others / total has no cancellation when
        # p_iy ~ 1.
        target_cotangent = (grad_target.to(peak.dtype) + g) - g * others / total
        # It goes back through the small graph of the feature side, rebuilt row block by row
        # block: first to the rows W[y] and the scale (their share of dW joins the chunk loop's,
        # below), after the loop to x together with du.
        target_grad, scale_parts = None, []
        if need_W or need_scale:
            target_grad = u.new_empty(u.shape) if need_W else None
            scale_leaf = scale.detach().requires_grad_(need_scale) if saved_scale else scale
            for rows in _row_blocks(x):
                with torch.enable_grad():
                    w_target = W.detach()[rows_of[rows]].to(peak.dtype).requires_grad_(need_W)
                    block = rows_of_config(config, rows)
                    target, _ = _feature_side(x[rows].detach(), w_target, present[rows], block, scale_leaf)
                leaves = [leaf for leaf, need in ((w_target, need_W), (scale_leaf, need_scale)) if need]
                found = iter(torch.autograd.grad(target, leaves, target_cotangent[rows]))
                if need_W:
                    target_grad[rows] = next(found)
                if need_scale:
                    scale_parts.append(next(found))
        if need_W:
            factors = slopes_over_norms(factors, row_factor, u, scale_value)
        grad_W, grad_scale = backward_chunks(
            W, u, ctx.chunks, factors, peak, row_factor, scale_value, needs, kept, grad_u, target_grad
        )
        del u, kept, target_grad  # freed before the graph below rebuilds it
        for part in scale_parts:
            grad_scale = grad_scale + part
        grad_x = None
        if need_x:
            grad_u.mul_(row_factor[:, None])
            grad_x = grad_u if grad_u.dtype == x.dtype else torch.empty_like(x)
            for rows in _row_blocks(x):
                with torch.enable_grad():
                    x_leaf = x[rows].detach().requires_grad_()
                    w_target, block = W.detach()[rows_of[rows]], rows_of_config(config, rows)
                    target, u = _feature_side(x_leaf, w_target, present[rows], block, scale_value)
                (grad_x[rows],) = torch.autograd.grad(
                    (target, u), (x_leaf,), (target_cotangent[rows], grad_u[rows])
                )
        grad_scale = grad_scale.to(scale.dtype) if need_scale else None
    return grad_x, grad_W, grad_scale, None, None, None


__all__ = [
    "CHUNK_BUDGET_BYTES",
    "MIN_CHUNK",
    "chunk_size_for",
    "chunked_lse_and_target",
    "chunked_margin_cross_entropy",
]
