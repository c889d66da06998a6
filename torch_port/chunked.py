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
exponentials as exp2 (see _normaliser). Between forward and backward only x, W, y, (B,)/(C,)
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

from torch_port import geometry
from torch_port.chunk_budget import CHUNK_BUDGET_BYTES, MIN_CHUNK, chunk_size_for
from torch_port.geometry import (
    MarginConfig,
    norm_factors,
    plain_lse_and_target,
    row_norms,
    target_logits,
    unit_rows,
    upcast,
)
from torch_port.tensor_checks import compute_dtype

LOG2E = 1.0 / math.log(2.0)
# The bytes one (rows, D) float32 block of the feature side may take, by device (see _row_blocks).
FEATURE_BLOCK_BYTES = {"cpu": 2**17, "cuda": 2**26}


def chunked_lse_and_target(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig, chunk_size: int
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

    Returns:
        ``(lse, target)``, both (B,) in the compute dtype (float32, or float64 for float64 inputs).

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", ICLR 2025
        (the chunked log-sum-exp with recomputation in the backward pass);
        Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018.
    """
    scale = 1.0 if config.scale is None else config.scale
    return _ChunkedLseAndTarget.apply(x, W, scale, y, config, int(chunk_size))


def chunked_margin_cross_entropy(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig, chunk_size: int
) -> torch.Tensor:
    """Per-sample margin cross-entropy (B,), lse - t of :func:`chunked_lse_and_target` (labels in [0, C))."""
    lse, target = chunked_lse_and_target(x, W, y, config, chunk_size)
    return lse - target


def _slopes_over_norms(factors, row_factor, u, scale):
    """The factors with the divisor folded into the slope, (h, None, h'(n) / n, None), where that is
    safe: the chain term then scales the (k, D) rows by a (k,) vector instead of dividing them. Safe
    where no intermediate leaves the float range: |dL/dc_j| <= R |W_j| with R = sum_i |r_i| |u_i|, so
    the slopes stay below R |s| max |h'(n)|, and h'(n) / n = -1/n^3 stays normal for |W_j| up to
    tiny^(-1/4). Checked on a CPU only (geometry.host_reads_are_free); elsewhere the unit rows."""
    h, first, second, divisors = factors
    slope = second if first is None else first * second
    per_norm, limit, info = slope / divisors, torch.finfo(h.dtype).max / 16, torch.finfo(h.dtype)
    if not geometry.host_reads_are_free(h):
        return factors
    reach = float((row_factor.abs() * torch.linalg.vector_norm(u, dim=1)).sum()) * abs(float(scale))
    safe = reach * float(slope.abs().max()) < limit and abs(float(scale)) * float(per_norm.abs().max()) < limit
    return (h, None, per_norm, None) if safe and float(divisors.max()) <= info.tiny**-0.25 else factors


class _Chunks:
    """The class chunks [start, stop) in order, and where the targets fall in them.

    The targets are grouped by chunk once, before the loops (sorting B labels; one host
    synchronisation on a GPU, for the group sizes), so that a chunk touches its targets with one
    indexed write, or not at all; rows whose label is -1 go to a group past the last chunk and are
    never touched. ``buffer`` hands out flat buffers of B * chunk_size numbers; a chunk's (B, k)
    block is a view of the first B * k entries (contiguous), so the loops allocate no (B, k) tensor
    per chunk.
    """

    def __init__(self, num_classes: int, y: torch.Tensor, chunk_size: int):
        self.num_classes, self.chunk_size = num_classes, chunk_size
        self.bounds = [(start, min(start + chunk_size, num_classes)) for start in range(0, num_classes, chunk_size)]
        count = len(self.bounds)
        chunk_of = torch.where(y >= 0, torch.div(y, chunk_size, rounding_mode="floor"), count)
        order = torch.argsort(chunk_of)
        rows, columns = order, (y - chunk_of * chunk_size)[order]
        counts = torch.bincount(chunk_of, minlength=count + 1).tolist()[:count]
        self.targets, first = [], 0
        for count in counts:
            self.targets.append((rows[first : first + count], columns[first : first + count]) if count else None)
            first += count

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_empty(like.shape[0] * min(self.chunk_size, self.num_classes))

    def blocks(self, buffer: torch.Tensor, batch: int) -> list[torch.Tensor]:
        """Each chunk's (B, k) view of a buffer, made once: every full chunk shares one view (the
        loops run a few thousand chunks, and each view made there is a few microseconds)."""
        full = buffer[: batch * (self.bounds[0][1] - self.bounds[0][0])].view(batch, -1)
        width = self.bounds[-1][1] - self.bounds[-1][0]
        last = full if width == full.shape[1] else buffer[: batch * width].view(batch, width)
        return [full] * (len(self.bounds) - 1) + [last]


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
        target[rows], u[rows] = _feature_side(x[rows], W[rows_of[rows]], present[rows], config, scale)
    return target, u


def _normaliser(W, u, target, column, chunks: _Chunks, keep_last: bool):
    """The softmax normaliser over the non-target classes, one product per chunk; ``column`` holds
    the factors c_j = s h(|W_j|), so that logit_ij = c_j (u_i . W_j); ``target`` is t_i where the
    row's target is present and -inf where it is not (so that it takes no part in the maxima).

    Each chunk c contributes its own maximum m_ic = max(t_i, max_{j in c, j != y_i} logit_ij) and
    sum_{j in c, j != y_i} exp(logit_ij - m_ic); they are merged once at the end (Milakov &
    Gimelshein's online normaliser, with the rescaling done for all chunks at once instead of after
    each one: fewer small operations per chunk). Returns M_i = max(t_i, every logit of row i) and
    sum_{j != y_i} exp(logit_ij - M_i). Keeping the pair (M, sum) rather than one log-sum-exp number
    matters in float32: logit - M is exact for the large logits, where a rounded log Z of size ~s
    would cost |log Z| * eps in every probability, and in the backward pass.

    The exponentials are exp2((logit - m) log2(e)): on the CPU the benchmarks were tuned on, torch's
    exp went through MKL's vector library and exp2 was several times faster; on other CPUs the order
    can reverse (benchmarks/RESULTS.md, "exp or exp2"). The factor log2(e) multiplies the difference
    logit - m, not the logit: its rounding is then relative to the difference (small for the
    probabilities that matter), where scaling the logits themselves would cost eps |logit| in every
    exponent (0.06 at logits of 1e6 in float32).

    With ``keep_last`` the two buffers of the last chunk are also returned, the first holding its
    products u W_c^T: the backward pass need not compute them again (for C <= chunk_size: no
    recomputation at all), and goes on using both buffers instead of allocating its own.
    """
    batch, last = u.shape[0], len(chunks.bounds) - 1
    raw_buffer = chunks.buffer(u)
    raw_blocks = chunks.blocks(raw_buffer, batch)
    weight_t = W.T  # half-precision rows are upcast one chunk at a time, below
    maxima = u.new_empty(last + 1, batch, 1)
    sums = u.new_empty(last + 1, batch)
    target_column, minus_inf = target[:, None], u.new_full((), -math.inf)
    kept = None
    for index, ((start, stop), targets) in enumerate(zip(chunks.bounds, chunks.targets)):
        rows_t = weight_t[:, start:stop]
        raw = torch.mm(u, rows_t if rows_t.dtype == u.dtype else rows_t.to(u.dtype), out=raw_blocks[index])
        if keep_last and index == last:
            kept = (raw_buffer, chunks.buffer(u))
            logits = torch.mul(raw, column[start:stop], out=chunks.blocks(kept[1], batch)[last])
        else:
            logits = raw.mul_(column[start:stop])
        if targets is not None:
            logits.index_put_(targets, minus_inf)
        peak = maxima[index]
        torch.maximum(torch.amax(logits, dim=1, keepdim=True, out=peak), target_column, out=peak)
        torch.sum(logits.sub_(peak).mul_(LOG2E).exp2_(), dim=1, out=sums[index])
    maxima = maxima.squeeze_(2)
    peak = maxima.amax(dim=0)
    return peak, sums.mul_(maxima.sub_(peak).exp_()).sum(dim=0), kept


def _backward_chunks(W, u, chunks: _Chunks, factors, peak, row_factor, scale, needs, kept, grad_u, target_grad):
    """Over the chunks: du (before the row factor) added into ``grad_u``; returns dW and dL/ds
    (without the target logits' share of ds, which the caller adds).

    G_ij = g_i p_ij = (g_i / total_i) exp(logit_ij - M_i), logit_ij = c_j (u_i . W_j). The row factor
    r_i = g_i / total_i is folded into u for G^T u (a (B, D) scaling) and into du by the caller, so
    the (B, k) blocks here hold E_ij = exp(logit_ij - M_i) alone, all <= 1. Two blocks per chunk: the
    products u W_c^T stay beside E, because the chain rule through the per-class factor c_j needs
    dL/dc_j = sum_i G_ij (u_i . W_j), one pass over the pair and a matrix-vector product; that is
    cheaper than the row dots W_j . (G^T u)_j on the (k, D) side, twice the size at D = 2B.
    The forward's last chunk goes first: with ``kept`` (the forward's two buffers, the first holding
    that chunk's products) it is not recomputed. ``grad_u`` is a zeroed (B, D) buffer the products
    G W accumulate into (None when du is not needed); the caller may hand in the storage of the x
    gradient itself, one (B, D) temporary fewer. ``target_grad`` (B, D), in the compute dtype, is
    each row's gradient of its target logit with respect to W[y_i]; it is added into the chunk's
    rows of dW before they are stored, so a float16/bfloat16 dW is rounded once, as on the plain path
    (storing the chunk's part and adding the targets' part afterwards in the half dtype would round
    twice, the two parts nearly cancelling where the target's probability is high).
    """
    need_u, need_W, need_scale, unbounded = needs
    h, first, second, divisors = factors
    batch, dtype = u.shape[0], u.dtype
    u_weighted = u * row_factor[:, None] if need_W else None
    neg_peak = peak.neg()[:, None]
    columns = h * scale  # the same roundings as the forward's factors
    second_scaled = second * scale if need_W else None
    grad_W = torch.empty_like(W) if need_W else None
    units = u.new_empty(min(chunks.chunk_size, chunks.num_classes), W.shape[1]) if divisors is not None else None
    grad_scale = torch.zeros((), dtype=dtype, device=W.device)
    zero = u.new_zeros(())
    raw_buffer, exp_buffer = (chunks.buffer(u), chunks.buffer(u)) if kept is None else kept
    raw_blocks, exp_blocks = chunks.blocks(raw_buffer, batch), chunks.blocks(exp_buffer, batch)
    # The last chunk first, whether its products were kept or not: the same order of summation
    # (the same bits) in a first backward and in a repeated one (retain_graph=True).
    last = len(chunks.bounds) - 1
    for index in [last, *range(last)]:
        start, stop = chunks.bounds[index]
        rows = W[start:stop]
        rows = rows if rows.dtype == dtype else rows.to(dtype)
        column = columns[start:stop]
        raw = raw_blocks[index]
        if kept is None or index != last:
            torch.mm(u, rows.T, out=raw)
        # exp(logit - M) as in forward (see _normaliser), -M + raw * c_j in one pass; where the CPU fuses
        # it, it can pass 0 by half an ulp of the logit. Logits that grow with the norms (SphereFace,
        # L-Softmax) are clamped there: e^(ulp/2) is inf past 2e9 in float32 (s cos theta is small).
        probs = torch.addcmul(neg_peak, raw, column, out=exp_blocks[index])
        (probs.clamp_max_(0.0) if unbounded else probs).mul_(LOG2E).exp2_()
        if chunks.targets[index] is not None:
            probs.index_put_(chunks.targets[index], zero)  # the targets' gradient flows through t instead
        if need_W or need_scale:
            # dL/dc_j = sum_i r_i E_ij (u_i . W_j)
            grad_column = torch.mv(raw.mul_(probs).T, row_factor)
            if need_scale:
                grad_scale += torch.dot(grad_column, h[start:stop])
        probs.mul_(column)  # c_j E_ij: both products below want it
        if need_W:
            # dW_j = c_j (G^T u)_j + (dL/dc_j) (dc_j/d|W_j|) W_j/|W_j|: the normalisation's chain rule,
            # dc_j/d|W_j| = s h'(|W_j|) applied in factors that stay in range (geometry.norm_factors).
            into = grad_W[start:stop] if grad_W.dtype == dtype else None
            direct = torch.mm(probs.T, u_weighted, out=into)
            if first is not None:
                grad_column.mul_(first[start:stop])
            slope = grad_column.mul_(second_scaled[start:stop]).unsqueeze_(1)
            unit = rows if divisors is None else torch.div(rows, divisors[start:stop, None], out=units[: stop - start])
            direct.addcmul_(unit, slope)
            if chunks.targets[index] is not None:
                target_rows, target_columns = chunks.targets[index]
                direct.index_add_(0, target_columns, target_grad[target_rows])
            if into is None:  # a half-precision W: rounded once, with saturation (geometry.upcast)
                grad_W[start:stop] = geometry.saturating_cast(direct, grad_W.dtype)
        if need_u:
            grad_u.addmm_(probs, rows)
    return grad_W, grad_scale


class _ChunkedLseAndTarget(torch.autograd.Function):
    """(lse_i, t_i), forward and backward chunk by chunk; see chunked_lse_and_target."""

    @staticmethod
    def forward(ctx, x, W, scale, y, config: MarginConfig, chunk_size: int):
        scale_value = scale.detach() if isinstance(scale, torch.Tensor) else scale
        dtype = compute_dtype(("x", x), ("W", W))
        present = y >= 0
        target, u = _targets_and_features(x, W, y, present, config, scale_value, dtype)
        factors = norm_factors(row_norms(W, u.dtype), config.weight_norm)
        chunks = _Chunks(W.shape[0], y, chunk_size)
        keep_last = any(ctx.needs_input_grad[:3])
        competing = torch.where(present, target, -math.inf)  # an absent target takes no part
        peak, others, kept = _normaliser(W, u, competing, scale_value * factors[0], chunks, keep_last)
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
                    target, _ = _feature_side(x[rows].detach(), w_target, present[rows], config, scale_leaf)
                leaves = [leaf for leaf, need in ((w_target, need_W), (scale_leaf, need_scale)) if need]
                found = iter(torch.autograd.grad(target, leaves, target_cotangent[rows]))
                if need_W:
                    target_grad[rows] = next(found)
                if need_scale:
                    scale_parts.append(next(found))
        if need_W:
            factors = _slopes_over_norms(factors, row_factor, u, scale_value)
        grad_W, grad_scale = _backward_chunks(
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
                    target, u = _feature_side(x_leaf, W.detach()[rows_of[rows]], present[rows], config, scale_value)
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
