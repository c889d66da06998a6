"""The chunk loops of the memory-efficient path (torch_port/chunked.py): the classes ``chunk_size``
at a time, forward (the softmax normaliser, :func:`normaliser`) and backward (the products into dx
and dW, :func:`backward_chunks`), never a (B, C) tensor.

This module holds the (B, k)-block arithmetic alone; the autograd function, the feature side (the
target logits, through ordinary autograd) and the dispatch live in torch_port/chunked.py.
Derivation: derivations/09-chunked-margin-ce.md; measurements: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math

import torch

from torch_port import geometry

LOG2E = 1.0 / math.log(2.0)


def exp2_floor(dtype: torch.dtype) -> float:
    """log2(tiny / eps) of ``dtype`` (-103 in float32, -970 in float64; tiny the smallest normal
    number): a softmax numerator exp2(a) of the chunk loops whose argument a is at or below it is
    exactly 0 (:func:`flush_small_`) instead of being computed (subnormal, or near it).
    Subnormal operands or results send the exponentials, sums and products on a CPU's slow path
    (33x-73x a step, benchmarks/RESULTS.md, "Subnormal floats"). The floor sits 1/eps above tiny so
    that the numerators kept, times a factor of size eps or more (the products u . W_j, the factors
    c_j, the features in G^T u and G W), stay normal too. The cost is far below rounding: every row's
    sum holds its largest term exp(0) = 1 (so its ulp is >= eps), and each numerator dropped is
    below tiny / eps, under 2^-80 (2^-918) of that ulp; C < 2^24 of them stay
    under 2^-56 (2^-894) ulp. Each gradient entry g_i p_ij changes by less than |g_i| 2^-103
    (2^-970) absolute."""
    info = torch.finfo(dtype)
    return math.log2(info.tiny / info.eps)


def flush_small_(exponents: torch.Tensor) -> torch.Tensor:
    """In place: exponent arguments in exp2's units at or below log2(tiny / eps) of their dtype
    become -inf (NaN stays NaN), so that the numerators exp2 makes of them are exactly 0 instead of
    subnormal; returns them. Why and what it costs: exp2_floor."""
    return torch.threshold_(exponents, exp2_floor(exponents.dtype), -math.inf)


def slopes_over_norms(factors, row_factor, u, scale):
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


class Chunks:
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


def normaliser(W, u, target, column, chunks: Chunks, keep_last: bool):
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
    exponent (0.06 at logits of 1e6 in float32). Arguments at or below exp2_floor are set to -inf
    first (flush_small_): those numerators are exactly 0, never subnormal (a CPU's slow path).

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
        torch.sum(flush_small_(logits.sub_(peak).mul_(LOG2E)).exp2_(), dim=1, out=sums[index])
    maxima = maxima.squeeze_(2)
    peak = maxima.amax(dim=0)
    return peak, sums.mul_(maxima.sub_(peak).exp_()).sum(dim=0), kept


def backward_chunks(W, u, chunks: Chunks, factors, peak, row_factor, scale, needs, kept, grad_u, target_grad):
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
        # exp(logit - M) as in forward (see normaliser), -M + raw * c_j in one pass; where the CPU fuses
        # it, it can pass 0 by half an ulp of the logit. Logits that grow with the norms (SphereFace,
        # L-Softmax) are clamped there: e^(ulp/2) is inf past 2e9 in float32 (s cos theta is small).
        probs = torch.addcmul(neg_peak, raw, column, out=exp_blocks[index])
        flush_small_((probs.clamp_max_(0.0) if unbounded else probs).mul_(LOG2E)).exp2_()
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


__all__ = ["LOG2E", "Chunks", "backward_chunks", "exp2_floor", "flush_small_", "normaliser", "slopes_over_norms"]
