r"""The chunked path for configurations the hand-written chunk loops do not cover: sub-centres and
modulated non-target logits (CurricularFace).

The loops of torch_port/chunk_loops.py are written for logits that are a per-class factor times a
product, c_j (u_i . W_j): one weight row per class and no transform of the non-target logits. A
configuration with k > 1 weight rows per class (Sub-center ArcFace: a class's cosine is the largest
of its k rows', ``MarginConfig.subcenters``), or whose non-target cosines are modulated from a per-
row threshold of the target side (CurricularFace, torch_port/plain_path.py), is computed here, with
the same memory bound and the same values to rounding, by ordinary autograd over class chunks, each
chunk under activation checkpointing (``torch.utils.checkpoint``, non-reentrant): the forward keeps
per chunk two (B,) vectors, its maximum m_c and its sum of exponentials S_c, and the backward
recomputes the chunk's (B, k c) cosines to differentiate them. Chunks are cut at whole classes (k
rows each).

.. math::

    M_i = \max(t_i, \max_c m_{ic}), \qquad
    \mathrm{lse}_i = M_i + \log\Big([y_i \ne -1]\, e^{t_i - M_i} + \sum_c S_{ic}\, e^{m_{ic} - M_i}\Big)

with m_ic and S_ic over the chunk's non-target classes (m_ic = 0 and S_ic = 0 for a chunk that holds
only the row's target), the maxima held out of the graph as on the plain path. Exact to any order
(every operation is autograd's), at the cost of autograd's bookkeeping per chunk:
benchmarks/RESULTS.md measures it against the plain path.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from torch_port.geometry import (
    MarginConfig,
    cosines,
    logit_scale,
    pooled_cosines,
    target_logits,
    unit_rows,
    upcast,
)
from torch_port.plain_path import modulates_negatives, target_thresholds
from torch_port.tensor_checks import compute_dtype


def needs_generic_path(config: MarginConfig) -> bool:
    """Whether the configuration goes through this module rather than the hand-written chunk loops:
    sub-centres, or non-target logits modulated from the target side (CurricularFace)."""
    return config.subcenters > 1 or modulates_negatives(config)


def target_rows_of(x_hat: torch.Tensor, W: torch.Tensor, y: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """Each row's target weight row (B,), no gradient: y k + the arg-max of the cosines with class
    y's k rows (only B k rows of W are read; ``y`` any class index where the target is absent)."""
    with torch.no_grad():
        candidates = y[:, None] * k + torch.arange(k, device=y.device)
        own, _ = unit_rows(W.detach()[candidates.flatten()].to(dtype))
        best = torch.linalg.vecdot(own.view(-1, k, own.shape[1]), x_hat.detach()[:, None, :]).argmax(dim=1)
    return y * k + best


def _chunk_normaliser(x_hat, block, local, scale, config: MarginConfig, dtype, thresholds):
    """(m_c, S_c) of one chunk of classes: the maximum of the row's non-target logits there (0 if
    none) and the sum of their exponentials after subtracting it; ``local`` the target's column in
    the chunk, -1 where the target is elsewhere; ``thresholds`` (B,) for a modulating configuration."""
    w_hat, _ = unit_rows(upcast(block, dtype))
    cos = cosines(x_hat, w_hat)
    if config.subcenters > 1:
        cos = pooled_cosines(cos, config.subcenters)
    if thresholds is not None:
        cos = config.target.hard_negatives(cos, thresholds)
    logits = cos * scale
    column = local.clamp_min(0)[:, None]
    masked = torch.where(local >= 0, -math.inf, logits.gather(1, column)[:, 0])
    logits = logits.scatter(1, column, masked[:, None])
    peak = logits.detach().amax(dim=1)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    return peak, torch.exp(logits - peak[:, None]).sum(dim=1)


def checkpointed_lse_and_target(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    config: MarginConfig,
    chunk_size: int,
    thresholds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's primitive (lse, target), (B,) each, over W's classes ``chunk_size`` classes at a
    time under activation checkpointing; arguments checked and autocast disabled by the engine."""
    if config.feature_norm or config.weight_norm:
        raise ValueError("the chunked path of sub-centres supports normalized logits only (no feature or weight norm)")
    dtype = compute_dtype(("x", x), ("W", W))
    k = config.subcenters
    # A float16/bfloat16 W is upcast once, whole: its gradient, from the target rows and from every
    # chunk, then adds up in the compute dtype and is rounded to W's dtype once, with saturation, as
    # on the plain path (rounded per piece it would round twice, and overflow float16 where a zero
    # row's large pieces meet). The price: a compute-dtype copy of W, on this path and for half W only.
    W = upcast(W, dtype)
    x_hat, x_norm = unit_rows(upcast(x, dtype))
    present = y >= 0
    labels = y.clamp_min(0)
    w_hat_y, w_norm_y = unit_rows(upcast(W[target_rows_of(x_hat, W, labels, k, dtype)], dtype))
    target = target_logits(x_hat, x_norm, w_hat_y, w_norm_y, config, present)
    if modulates_negatives(config):
        own = target_thresholds(x_hat, x_norm, w_hat_y, w_norm_y, config, present)
        thresholds = own if thresholds is None else torch.where(present, own, thresholds.to(own.dtype))
    else:
        thresholds = None
    scale = logit_scale(config, None, None)
    peaks, sums = [], []
    for index, block in enumerate(W.split(chunk_size * k)):
        start, stop = index * chunk_size, index * chunk_size + block.shape[0] // k
        local = torch.where(present & (y >= start) & (y < stop), y - start, -1)
        arguments = (x_hat, block, local, scale, config, dtype, thresholds)
        peak, total = checkpoint(_chunk_normaliser, *arguments, use_reentrant=False)
        peaks.append(peak)
        sums.append(total)
    peaks, sums = torch.stack(peaks), torch.stack(sums)
    competing = torch.where(present, target.detach(), -math.inf)
    top = torch.maximum(peaks.amax(dim=0), competing)
    total = (sums * torch.exp(peaks - top)).sum(dim=0) + torch.where(present, torch.exp(target - top), 0.0)
    return top + torch.log(total), target


__all__ = ["checkpointed_lse_and_target", "needs_generic_path", "target_rows_of"]
