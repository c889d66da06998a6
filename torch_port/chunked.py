"""The memory-efficient path of the margin engine: classes walked in chunks, no (B, C) tensor kept.

Face recognition trains with 1e5 to 1e7 classes, where the (B, C) logits, their softmax and their
gradient dominate memory. This path computes what the plain path of
:func:`torch_port.engine.margin_cross_entropy` computes, loss and gradients for x, W and a learnable
scale, to rounding, but touches the classes ``chunk_size`` at a time:

- forward: for each chunk, the (B, k) logits c_j (u_i . W_j) with the targets' columns masked out,
  folded into an online softmax normaliser (a running maximum M_i and a running sum of
  exp(logit - M_i)); the target logit t_i = S_iy psi(cos, theta) comes from the B rows W[y]
  alone, so the loss is (M_i - t_i) + log(exp(t_i - M_i) + sum), the form log_softmax has.
- backward: each chunk's logits are recomputed from x and W (one more matrix product instead of
  keeping B x C numbers), turned into G_ij = g_i p_ij and pushed into du (G W) and dW (G^T u)
  before the next chunk; the chain rule through the per-class normalisation 1/max(|W_j|, eps) is
  applied by hand, so no (C, D) tensor is created besides dW itself.
- the feature side (normalising x, the target logit with its margin) is a few (B, D) operations:
  it goes through ordinary autograd, rebuilt in backward rather than kept, so that every target
  transform psi of :class:`~torch_port.engine.MarginConfig` works unchanged.

Between forward and backward only x, W, y and (B,)/(C,) vectors are kept. The backward is
once-differentiable. On a GPU the chunk loop never waits for the host; grouping the labels by
chunk costs one synchronisation per pass. Measurements: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.autograd.function import once_differentiable

from refimpl._validate import check_positive, check_positive_int
from torch_port.engine import NORM_EPS, MarginConfig, _Geometry, _target_logits

# The memory one chunk's (B, k) block may take, by device. CPU: 1 MiB keeps the block in the
# per-core L2 cache while it is exponentiated and fed to the next product (k = 1024 at B = 256; on
# the project's 2-core CPU k from 512 to 2048 ran within 2% of each other, and larger chunks got
# slower, see benchmarks/RESULTS.md). GPU: 256 MiB, so that a step is a few dozen chunks of large
# products rather than thousands of small kernel launches (k = 16384 at B = 4096).
CHUNK_BUDGET_BYTES = {"cpu": 2**20, "cuda": 256 * 2**20}
MIN_CHUNK = 128


def chunk_size_for(batch_size: int, num_classes: int, device="cpu", budget_bytes: float | None = None) -> int:
    r"""A class-chunk size for the memory-efficient path: the (B, k) float32 block fits the budget.

    .. math:: k = \min\Big(C, \max\big(128, \lfloor \mathrm{budget} / (4 B) \rfloor\big)\Big)

    Besides that block, a chunk uses (k, D) numbers only when W is float16/bfloat16 (its rows are
    upcast one chunk at a time); everything else the path keeps is (B, D) or (C,) sized, plus the
    gradient dW itself.

    Args:
        batch_size: B >= 1.
        num_classes: C >= 1.
        device: where the loss runs ("cpu", "cuda", a torch.device); picks the default budget
            (1 MiB on CPU, 256 MiB on CUDA and other accelerators).
        budget_bytes: the bytes the (B, k) block may take, > 0; overrides the device's default.

    Returns:
        The chunk size k, an int in [1, C].
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    num_classes = check_positive_int(num_classes, "num_classes")
    if budget_bytes is None:
        kind = torch.device(device).type
        budget_bytes = CHUNK_BUDGET_BYTES["cpu" if kind == "cpu" else "cuda"]
    budget_bytes = check_positive(budget_bytes, "budget_bytes")
    return int(min(num_classes, max(MIN_CHUNK, budget_bytes // (4 * batch_size))))


def chunked_margin_cross_entropy(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig, chunk_size: int
) -> torch.Tensor:
    r"""Per-sample margin cross-entropy (B,), walking the classes in chunks of ``chunk_size``.

    .. math::

        \ell_i = (M_i - t_i) + \log\Big(e^{t_i - M_i} + \sum_{j \ne y_i} e^{S_{ij} \cos\theta_{ij} - M_i}\Big),
        \qquad t_i = S_{iy_i}\,\psi(\cos\theta_{iy_i}, \theta_{iy_i}),
        \qquad M_i = \max\big(t_i, \max_{j \ne y_i} S_{ij} \cos\theta_{ij}\big)

    The same value and gradients as the plain path (to rounding), with memory O(B k + B D + C)
    besides the gradients themselves, for every configuration of the engine (fixed or learnable scale,
    feature and weight norms, any target transform). Called by
    :func:`torch_port.engine.margin_cross_entropy` (``chunk_size=int``), which validates the
    arguments and disables autocast first.

    Args:
        x: features (B, D), already checked by the engine.
        W: class weights (C, D), one row per class; float16/bfloat16 rows are upcast chunk by chunk.
        y: int64 labels (B,) in [0, C).
        config: the loss as an engine configuration.
        chunk_size: classes per chunk, an int >= 1 (any value; larger than C means one chunk).

    Returns:
        The per-sample losses (B,) in the compute dtype (float32, or float64 for float64 inputs).

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", ICLR 2025
        (the chunked log-sum-exp with recomputation in the backward pass);
        Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018.
    """
    scale = 1.0 if config.scale is None else config.scale
    return _ChunkedMarginCE.apply(x, W, scale, y, config, int(chunk_size))


def _norm_factors(norms: torch.Tensor, weight_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h(|W_j|) and h'(|W_j|) / |W_j| for every class, with h(n) = 1/max(n, eps), or n/max(n, eps)
    when the config keeps the weight norm; the logit's column factor is c_j = s h(|W_j|).

    The logit of class j is c_j * (u_i . W_j): scaling the (B, k) products column by column is
    cheaper than normalising the (k, D) rows, and never materialises a normalised copy of W. The
    derivative follows autograd's conventions on the plain path exactly: max(n, eps) passes the
    gradient where n >= eps, and d|W_j|/dW_j = W_j/|W_j| is taken as 0 at W_j = 0.
    """
    clamped = norms.clamp_min(NORM_EPS)
    passes = norms >= NORM_EPS
    if weight_norm:
        # h(n) = n / max(n, eps): 1 above eps, so only the tiny-norm side has a slope.
        h = norms / clamped
        slope = torch.where(passes, torch.zeros_like(norms), torch.full_like(norms, 1.0 / NORM_EPS))
    else:
        h = 1.0 / clamped
        slope = torch.where(passes, -1.0 / (clamped * clamped), torch.zeros_like(norms))
    chain = torch.where(norms > 0, slope / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    return h, chain


def _row_dots(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """a_j . b_j for every row j of two (k, D) tensors, the products held in ``scratch`` (flat).

    torch.linalg.vecdot would allocate a (k, D) product (twice the (B, k) block at D = 2B); a
    batched 1 x D by D x 1 product allocates nothing but runs 4x slower on CPU. This reuses the
    chunk's block, free at this point, a piece of rows at a time.
    """
    width = a.shape[1]
    rows_per_piece = max(1, scratch.numel() // width)
    out = a.new_empty(a.shape[0])
    for first in range(0, a.shape[0], rows_per_piece):
        last = min(first + rows_per_piece, a.shape[0])
        piece = scratch[: (last - first) * width].view(last - first, width)
        torch.sum(torch.mul(a[first:last], b[first:last], out=piece), dim=1, out=out[first:last])
    return out


class _ChunkWalker:
    """The chunks of W in order: each chunk's rows (upcast if needed), its (B, k) products u W_c^T,
    and the (row, column) positions of the targets that fall in it.

    One flat buffer of B * chunk_size numbers is reused for every chunk's block (a view of its first
    B * k entries is contiguous), so the loop allocates no (B, k) tensor per chunk. The targets are
    grouped by chunk once, before the loop (sorting B labels; one host synchronisation on a GPU, for
    the group sizes), so that a chunk touches its targets with one indexed write, or not at all.
    """

    def __init__(self, W: torch.Tensor, u: torch.Tensor, y: torch.Tensor, chunk_size: int):
        self.W, self.u, self.chunk_size = W, u, chunk_size
        # At least one row of D numbers: the buffer doubles as _row_dots' scratch.
        size = max(u.shape[0] * min(chunk_size, W.shape[0]), u.shape[1])
        self.buffer = torch.empty(size, dtype=u.dtype, device=u.device)
        chunk_of = torch.div(y, chunk_size, rounding_mode="floor")
        order = torch.argsort(chunk_of)
        self.target_rows, self.target_columns = order, (y - chunk_of * chunk_size)[order]
        num_chunks = -(-W.shape[0] // chunk_size)
        self.counts = torch.bincount(chunk_of, minlength=num_chunks).tolist()

    def __iter__(self):
        num_classes, batch = self.W.shape[0], self.u.shape[0]
        first = 0
        for start, count in zip(range(0, num_classes, self.chunk_size), self.counts):
            stop = min(start + self.chunk_size, num_classes)
            # Half-precision weights are upcast one chunk at a time: never a float32 copy of all of W.
            rows = self.W[start:stop].to(self.u.dtype)
            products = self.buffer[: batch * (stop - start)].view(batch, stop - start)
            torch.mm(self.u, rows.T, out=products)  # u_i . W_j, before the column factor c_j
            targets = None
            if count:
                span = slice(first, first + count)
                targets = (self.target_rows[span], self.target_columns[span])
                first += count
            yield slice(start, stop), rows, products, targets


def _feature_side(x, w_target, config: MarginConfig, scale):
    """The (B,)-sized and (B, D)-sized part of the loss, ordinary autograd: the target logits
    t_i = S_iy psi(cos, theta) from the rows W[y] alone, and the features entering the products,
    u_i = x_i / max(|x_i|, eps), times |x_i| when the config keeps the feature norm."""
    rows = _Geometry(x, w_target)
    target = _target_logits(rows, torch.arange(x.shape[0], device=x.device), dataclasses.replace(config, scale=scale))
    return target, (rows.x_hat * rows.x_norm if config.feature_norm else rows.x_hat)


def _normaliser(W, u, y, target, h, scale, chunk_size: int):
    """Online softmax normaliser (Milakov & Gimelshein) over the non-target classes, chunk by chunk.

    Returns M_i, a running maximum of row i's logits (started at the target logit, so finite from
    the first chunk on), and sum_{j != y_i} exp(logit_ij - M_i), rescaled whenever M_i grows.
    Keeping the pair (M, sum) rather than one log-sum-exp number matters in float32: logit - M is
    exact for the large logits, where a rounded log Z of size ~s would cost |log Z| * eps in every
    probability, and in the backward pass.
    """
    peak = target.clone()
    others = torch.zeros_like(peak)
    for columns, _, logits, targets in _ChunkWalker(W, u, y, chunk_size):
        logits.mul_((scale * h[columns])[None, :])
        if targets is not None:
            logits[targets] = -math.inf
        new_peak = torch.maximum(peak, logits.amax(dim=1))
        chunk_sum = logits.sub_(new_peak[:, None]).exp_().sum(dim=1)
        others = others.mul_(torch.exp(peak - new_peak)).add_(chunk_sum)
        peak = new_peak
    return peak, others


def _backward_chunks(W, u, y, h, chain, peak, row_factor, scale, chunk_size, needs):
    """du (before the row factor), dW (without the targets' own share) and dL/ds over the chunks.

    G_ij = g_i p_ij = (g_i / total_i) exp(logit_ij - M_i): the row factor g_i / total_i is folded into
    u for G^T u (a (B, D) scaling) and into du by the caller, so the (B, k) blocks here are
    exp(logit_ij - M_i) alone, all <= 1.
    """
    need_u, need_W, need_scale = needs
    dtype = u.dtype
    u_weighted = u * row_factor[:, None]
    grad_u = torch.zeros_like(u) if need_u else None
    grad_W = torch.empty_like(W) if need_W else None
    grad_scale = torch.zeros((), dtype=dtype, device=W.device)
    walker = _ChunkWalker(W, u, y, chunk_size)
    for columns, rows, probs, targets in walker:
        column = scale * h[columns]
        # exp(c_j (u_i . W_j) - M_i), rounded step by step exactly as in forward (not fused into one
        # multiply-add): then sum_j p_ij matches the forward's total to the last bit, and the target's
        # gradient (from that total) cancels the others' as it does in log_softmax.
        probs.mul_(column[None, :]).sub_(peak[:, None]).exp_()
        if targets is not None:
            probs[targets] = 0.0  # the targets' gradient flows through t instead
        direct = None
        if need_W or need_scale:
            # (G^T u) of the chunk, written straight into dW's rows when the dtypes allow it.
            into = grad_W[columns] if need_W and grad_W.dtype == dtype else None
            direct = torch.mm(probs.T, u_weighted, out=into)
        if need_u:
            grad_u.addmm_(probs.mul_(column[None, :]), rows)
        if direct is not None:
            # dL/dc_j = sum_i G_ij (u_i . W_j) = W_j . (G^T u)_j, a row-dot in the block's buffer.
            grad_column = _row_dots(direct, rows, walker.buffer)
            if need_scale:
                grad_scale += torch.dot(grad_column, h[columns])
            if need_W:
                # dW_j = c_j (G^T u)_j + (dL/dc_j) (dc_j/d|W_j|) W_j/|W_j|: the normalisation's chain rule.
                direct.mul_(column[:, None]).addcmul_(rows, (grad_column * chain[columns]).mul_(scale)[:, None])
                if into is None:
                    grad_W[columns] = direct
    return grad_u, grad_W, grad_scale


class _ChunkedMarginCE(torch.autograd.Function):
    """loss_i = -log p_iy, forward and backward chunk by chunk; see chunked_margin_cross_entropy."""

    @staticmethod
    def forward(ctx, x, W, scale, y, config: MarginConfig, chunk_size: int):
        scale_value = scale.detach() if isinstance(scale, torch.Tensor) else scale
        target, u = _feature_side(x, W[y], config, scale_value)
        h, chain = _norm_factors(torch.linalg.vector_norm(W, dim=1, dtype=u.dtype), config.weight_norm)
        peak, others = _normaliser(W, u, y, target, h, scale_value, chunk_size)
        total = others + torch.exp(target - peak)
        # -log p_iy = (M_i - t_i) + log(sum_j exp(logit_ij - M_i)): the same form as log_softmax.
        loss = (peak - target) + torch.log(total)

        ctx.config, ctx.chunk_size = config, chunk_size
        ctx.float_scale = None if isinstance(scale, torch.Tensor) else scale
        # Only inputs and (B,)/(C,) vectors are kept: the (B, D) feature side is recomputed in backward.
        saved_scale = (scale,) if isinstance(scale, torch.Tensor) else ()
        ctx.save_for_backward(x, W, y, h, chain, peak, total, others, *saved_scale)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        x, W, y, h, chain, peak, total, others, *saved_scale = ctx.saved_tensors
        scale = saved_scale[0] if saved_scale else ctx.float_scale
        scale_value = scale.detach() if saved_scale else scale
        need_x, need_W, need_scale = ctx.needs_input_grad[:3]
        config = ctx.config
        with torch.autocast(device_type=W.device.type, enabled=False):
            g = grad_loss.to(peak.dtype)
            row_factor = g / total
            with torch.no_grad():
                _, u = _feature_side(x, W[y], config, scale_value)
            needs = (need_x, need_W, need_scale)
            grad_u, grad_W, grad_scale = _backward_chunks(
                W, u, y, h, chain, peak, row_factor, scale_value, ctx.chunk_size, needs
            )
            del u  # freed before the graph below rebuilds it
            # The small graph of the feature side, rebuilt: the target logit's gradient
            # g_i (p_iy - 1) = -g_i (sum over the other classes) / total (no cancellation when p_iy ~ 1),
            # and du, go back through it to x, the rows W[y] and the scale.
            with torch.enable_grad():
                x_leaf = x.detach().requires_grad_(need_x)
                w_target = W.detach()[y].requires_grad_(need_W)
                scale_leaf = scale.detach().requires_grad_(need_scale) if saved_scale else scale
                target, u = _feature_side(x_leaf, w_target, config, scale_leaf)
            outputs, cotangents = [target], [-g * others / total]
            if need_x:
                outputs.append(u)
                cotangents.append(grad_u.mul_(row_factor[:, None]))
            leaves = [leaf for leaf, need in ((x_leaf, need_x), (w_target, need_W), (scale_leaf, need_scale)) if need]
            found = iter(torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True))
            grad_x = next(found) if need_x else None
            grad_w_target = next(found) if need_W else None
            grad_scale_target = next(found) if need_scale else None
            if need_W and grad_w_target is not None:
                grad_W.index_add_(0, y, grad_w_target.to(grad_W.dtype))
            if need_scale:
                if grad_scale_target is not None:
                    grad_scale = grad_scale + grad_scale_target
                grad_scale = grad_scale.to(scale.dtype)
            else:
                grad_scale = None
        return grad_x, grad_W, grad_scale, None, None, None


__all__ = ["CHUNK_BUDGET_BYTES", "chunk_size_for", "chunked_margin_cross_entropy"]
