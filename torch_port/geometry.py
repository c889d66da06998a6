r"""The margin geometry: what every margin loss of the port is made of.

A margin loss is a configuration (:class:`MarginConfig`): how each logit is scaled, and how the
target class's cosine is transformed (the margin). With theta_ij the angle between x_i and W_j,

    logit_ij = S_ij * cos(theta_ij)                 for j != y_i
    logit_iy = S_iy * psi(cos theta_iy, theta_iy)   for the target class (the target logit t_i)
    S_ij     = s * (|x_i| if feature_norm) * (|W_j| if weight_norm)

NormFace, CosFace/AM-Softmax, ArcFace and the combined margin use a fixed s and no norms;
SphereFace keeps |x_i|; L-Softmax keeps |x_i| |W_j|. This module owns the pieces every path of the
engine (plain, chunked, sharded) builds on: normalisation (:func:`unit_rows`), the scale S
(:func:`logit_scale`), the (B, C) logits of the plain path (:class:`Geometry`), the target
logits computed from the rows W[y] alone (:func:`target_logits`). The plain path's primitive is
in torch_port/plain_path.py. This module imports nothing else of the port.

Numerics: normalisation divides by max(|v|, NORM_EPS), so a zero row is a zero unit vector (cosine
0 with everything). Where sqrt(sum v^2) would overflow (past 1.8e19 in float32) or lose digits
(subnormal rows), norms are formed from rows divided by a power of two near their largest entry
(:func:`unit_rows`, :func:`row_norms`). Half-precision inputs enter through :func:`upcast`, whose gradient comes back in
the input's dtype rounded with saturation (a zero row's s/NORM_EPS does not fit float16). The
target angle is theta = arccos(clip(cos, -1, 1)), computed by the half-angle form
theta = 2 atan2(|x^ - w^|, |x^ + w^|) where both rows are unit: exact to rounding at the poles,
with a gradient that is finite everywhere (zero exactly at theta = 0 and pi, the cone points where
a margin loss has no derivative; derivations/05-arcface-combined.md). Callers compute in float32 at
least (float64 stays float64) with autocast disabled; see
:func:`torch_port.tensor_checks.compute_dtype`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_port.tensor_checks import checks_on_device, compute_dtype

# Normalisation divides by max(|v|, NORM_EPS), as torch.nn.functional.normalize does; the same
# constant as refimpl.geometry.NORM_EPS.
NORM_EPS = 1e-12

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MarginConfig:
    """One loss as a configuration of the engine.

    target: psi(cos_y, theta_y) -> the target's transformed cosine, elementwise on (B,) tensors
        (before scaling). ``None`` means no margin (psi = cos).
    scale: the fixed scale s (a float, or a 0-d tensor such as a learnable scale); None means 1.
    feature_norm: multiply logits by |x_i| (SphereFace, L-Softmax).
    weight_norm: multiply logits by |W_j| (L-Softmax).
    subcenters: k, the weight rows per class (Sub-center ArcFace): W has C k rows, rows j k .. j k +
        k - 1 are class j's, and cos theta_ij is the largest cosine of x_i with them (the target's
        angle is that of the arg-max row). 1: one row per class.

    penalty: a per-sample term added to each row's cross-entropy, a function of the features'
        norms |x_i| (B,) (MagFace's lambda_g g(a_i)); None: none. It is not a logit: the primitive
        does not see it, the losses add it (torch_port/engine.py, the sharded loss).

    Two optional protocols of ``target`` (see :func:`target_logits`): a transform with
    ``takes_norms = True`` is called as psi(cos_y, theta_y, |x|) with the features' norms (B,)
    (AdaFace, MagFace); a transform that is a dataclass with (B,)-shaped tensor fields holds one
    value per row (per-sample margins): every path restricts or gathers those fields with the rows
    (torch_port/row_params.py). A third, ``modulates_negatives = True`` (CurricularFace), changes the
    non-target logits too, from a per-row threshold of the target side: see torch_port/plain_path.py.
    """

    target: TargetFn | None = None
    scale: float | torch.Tensor | None = None
    feature_norm: bool = False
    weight_norm: bool = False
    subcenters: int = 1
    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None


def unit_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""rows / max(|row|, NORM_EPS) and the norms |row| as a column, for a 2-D tensor.

    |v|^2 overflows past sqrt of the largest float (1.8e19 in float32, 1.3e154 in float64) and
    loses digits to underflow below sqrt(tiny / eps) (3e-16, 1.5e-146). Where a norm falls outside
    that range (:func:`plain_norms_suffice`) the rows take the scaled route: with p_i the power of
    two at or below max_k |v_ik| (at least the dtype's smallest normal number; a constant to autograd),

    .. math:: \hat v_i = \frac{v_i / p_i}{\max(|v_i / p_i|,\ \varepsilon / p_i)}, \qquad
              |v_i| = p_i\,|v_i / p_i|

    the same function, whose squares are of entries in (-2, 2): right for every finite row (only
    |v| itself overflows, past the largest float) and for subnormal rows. A power of two divides
    exactly, so on rows in the range the route gives the bits of the plain one, values and
    gradients (an accelerator takes it for every row). The norm is homogeneous,
    so holding p constant does not change the derivative: (I - v^ v^T)/|v| above eps, I/eps below
    it, and torch's 0 for |v| at a zero row.
    """
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    if plain_norms_suffice(norms):
        return rows / norms.clamp_min(NORM_EPS), norms
    peak = row_peaks(rows)
    scaled = rows / peak
    size = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return scaled / torch.clamp(size, min=NORM_EPS / peak), size * peak


def plain_norms_suffice(norms: torch.Tensor) -> bool:
    """Whether norms computed as sqrt(sum v^2) are right to rounding: all in [sqrt(tiny / eps), inf).

    Checked on a CPU only, where it costs nothing and the scaled route costs several passes over
    the rows (10% of the chunked path at B = 256, C = 20000, D = 128). On an accelerator those
    passes are cheap and reading a flag back would stall the device, so the scaled route is always
    taken there. A zero row takes it too (its norm cannot be told from an underflowed one).
    """
    return host_reads_are_free(norms) and bool(_in_plain_range(norms).all())


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` back to the host costs nothing: eager code on a CPU tensor.
    On an accelerator a read waits for the device, inside torch.compile it would break the graph,
    so the norm checks above are skipped there; the rule is that of the value checks
    (:func:`torch_port.tensor_checks.set_value_checks`: "device" never reads, "host" always may)."""
    return not checks_on_device(t)


def _in_plain_range(norms: torch.Tensor) -> torch.Tensor:
    info = torch.finfo(norms.dtype)
    return (norms >= math.sqrt(info.tiny / info.eps)) & (norms < math.inf)


# The exponent bits of each float dtype: x & mask is the power of two at or below |x| (0 for subnormals).
_EXPONENT_BITS = {
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
}


def row_peaks(rows: torch.Tensor) -> torch.Tensor:
    """For each row (N, 1), the power of two at or below max_k |rows_ik|, at least the smallest
    normal number of rows' dtype (so a zero row gets it too, and NORM_EPS / peak stays finite); no
    gradient. (The exponent bits of the largest entry, the mantissa's cleared.)"""
    peak = rows.detach().abs().amax(dim=1, keepdim=True)
    integer, mask = _EXPONENT_BITS[rows.dtype]
    return (peak.view(integer) & mask).view(rows.dtype).clamp_min_(torch.finfo(rows.dtype).tiny)


def row_norms(rows: torch.Tensor, dtype: torch.dtype, block_rows: int | None = None) -> torch.Tensor:
    """|row| for each row of a 2-D tensor, (N,) in ``dtype``, without gradient: sqrt(sum v^2), and
    the scaled route of :func:`unit_rows` for the rows where that is not right (on a CPU; on an
    accelerator for every row), ``block_rows`` rows at a time (default: about 2^20 numbers), so no
    temporary as large as ``rows`` is made (the chunked path's W)."""
    with torch.no_grad():
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=dtype)
        if host_reads_are_free(norms):
            redo = torch.nonzero(~_in_plain_range(norms))[:, 0]
        else:
            redo = torch.arange(rows.shape[0], device=rows.device)
        block_rows = block_rows or max(1, 2**20 // max(1, rows.shape[1]))
        for first in range(0, redo.shape[0], block_rows):
            index = redo[first : first + block_rows]
            block = rows[index].to(dtype)
            peak = row_peaks(block)
            norms[index] = torch.linalg.vector_norm(block.div_(peak), dim=1).mul_(peak[:, 0])
    return norms


def norm_factors(norms: torch.Tensor, weight_norm: bool):
    """For paths that scale products u . W_j by a per-class factor instead of normalising W (the
    chunked path): (h, first, second, divisors) per class, with h(|W_j|) = 1/max(n, eps), or
    n/max(n, eps) when the config keeps the weight norm (the logit's factor is c_j = s h); the
    slope h'(n) = first * second (first None: 1), as factors that each stay in the float range for
    any finite norm (-1/n^2 = h (-h): n^2 overflows past 1.8e19 in float32); the divisors of the
    unit rows W_j / |W_j| (1 at W_j = 0). The chain term dL/dc_j s h'(|W_j|) W_j / |W_j| multiplies
    dL/dc_j (of the size of |W_j|) by first, by s second, then the unit row: every step stays in
    range where the result is. The derivative follows autograd's conventions on the plain path:
    max(n, eps) passes the gradient where n >= eps, and d|W_j|/dW_j is taken as 0 at W_j = 0."""
    clamped, divisors = norms.clamp_min(NORM_EPS), torch.where(norms > 0, norms, 1.0)
    if weight_norm:
        # h(n) = n / max(n, eps): 1 above eps, so only the tiny-norm side has a slope, 1/eps.
        below = (norms > 0) & (norms < NORM_EPS)
        return norms / clamped, None, below.to(norms.dtype).mul_(1.0 / NORM_EPS), divisors
    h = clamped.reciprocal_()  # h(n) = 1 / max(n, eps): slope -1/n^2 = h * (-h) above eps, flat below
    return h, h, h.neg().masked_fill_(norms < NORM_EPS, 0.0), divisors


def saturating_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``, magnitudes beyond the dtype's largest finite value rounded to it instead of
    to inf (nan stays nan). The identity when t already has that dtype."""
    if t.dtype == dtype:
        return t
    limit = torch.finfo(dtype).max
    return t.clamp(-limit, limit).to(dtype)


class _Upcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dtype):
        ctx.input_dtype = t.dtype
        return t.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return saturating_cast(grad, ctx.input_dtype), None


def upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in the compute dtype ``dtype``, as ``t.to(dtype)``, except that the gradient returned to a
    lower-precision t is rounded with saturation (:func:`saturating_cast`): a gradient beyond
    float16's 65504, such as a zero row's ~s/NORM_EPS, comes back as +-65504, not inf."""
    if t.dtype == dtype:
        return t
    return _Upcast.apply(t, dtype)


def target_cos_and_angle(
    x_hat: torch.Tensor, w_hat_y: torch.Tensor, unit: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos theta_y and theta_y (both (B,)) from unit features and their own unit class weights.

    theta = arccos(clip(cos, -1, 1)), the numerics policy, evaluated by the half-angle form
    2 atan2(|x^ - w^|, |x^ + w^|) where both vectors are unit (the same function there, exact at
    the poles), and by arccos itself on the rows that ``unit`` (bool (B,)) marks False: a row shorter
    than NORM_EPS normalises to x / eps, shorter than 1, and the half-angle form of two such vectors
    is the angle between x and W, not the arccos of their (tiny) cosine. There |cos| < 1, away from
    arccos's infinite slope, which the double where keeps out of the unit rows' gradient.
    ``unit`` None: every row is unit.
    """
    cos_y = (x_hat * w_hat_y).sum(dim=1)
    gap = torch.linalg.vector_norm(x_hat - w_hat_y, dim=1)
    span = torch.linalg.vector_norm(x_hat + w_hat_y, dim=1)
    theta_y = 2.0 * torch.atan2(gap, span)
    if unit is None:
        return cos_y, theta_y
    short_cos = torch.where(unit, 0.0, cos_y.clamp(-1.0, 1.0))
    return cos_y, torch.where(unit, theta_y, torch.acos(short_cos))


class _Cosines(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, w_hat):
        ctx.save_for_backward(x_hat, w_hat)
        return x_hat @ w_hat.T

    @staticmethod
    def backward(ctx, grad):
        x_hat, w_hat = ctx.saved_tensors
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return grad @ w_hat, grad.T @ x_hat


def cosines(x_hat: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """x_hat @ w_hat.T, (B, C), whose backward's two products also run with autocast disabled.

    The engine disables autocast around its forward, and eager autograd runs the backward of a
    product in the dtype of its inputs. torch.compile traces the backward under the autocast of the
    forward's caller instead (torch._functorch.config.backward_pass_autocast = "same_as_forward",
    the default in torch 2.13), which would put the two (B, C)-sized products of the backward in
    bfloat16/float16: gradients 1e-3 away from eager's. The products are the only operations of the
    plain path autocast lowers, so a product with its own backward is all it takes for a compiled
    step to match eager to float32 rounding. Differentiable twice (its backward is torch operations).
    """
    return _Cosines.apply(x_hat, w_hat)


class Geometry:
    """Normalised features and class weights with their norms, in the compute dtype (the plain
    path's view of a problem: everything the (B, C) logits are made of)."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor):
        dtype = compute_dtype(("x", x), ("W", W))
        self.x = upcast(x, dtype)
        self.W = upcast(W, dtype)
        self.x_hat, self.x_norm = unit_rows(self.x)
        self.w_hat, self.w_norm = unit_rows(self.W)

    def logits(self, config: MarginConfig) -> torch.Tensor:
        """The margin-free logits S_ij cos theta_ij, (B, C) (sub-centres pooled: C = rows / k)."""
        if config.subcenters > 1:
            return pooled_cosines(cosines(self.x_hat, self.w_hat), config.subcenters) * logit_scale(config, None, None)
        return cosines(self.x_hat, self.w_hat) * logit_scale(config, self.x_norm, self.w_norm.T)

    def target_logits(self, y: torch.Tensor, config: MarginConfig, present: torch.Tensor | None = None):
        """t_i for the labels y (B,) (any integer in [0, C) where ``present`` is False); see :func:`target_logits`."""
        rows = target_rows(self.x_hat, self.w_hat, y, config.subcenters)
        return target_logits(self.x_hat, self.x_norm, self.w_hat[rows], self.w_norm[rows], config, present)


def pooled_cosines(cos: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C k) cosines of sub-centres -> (B, C), each class's largest: its gradient goes to the
    arg-max row alone (``max``'s rule, not ``amax``'s even split of ties)."""
    return cos.view(cos.shape[0], -1, k).max(dim=2).values


def target_rows(x_hat: torch.Tensor, w_hat: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The row of W holding each sample's target (B,), no gradient: y itself for one row per class;
    with k sub-centres, y k + the arg-max of x_hat's cosines with class y's k unit rows (``w_hat``
    (C k, D), already unit, or any rows with the same directions: only the arg-max is used)."""
    if k == 1:
        return y
    with torch.no_grad():
        own = w_hat.view(-1, k, w_hat.shape[1])[y]  # (B, k, D)
        best = torch.linalg.vecdot(own, x_hat.detach()[:, None, :]).argmax(dim=1)
    return y * k + best


def logit_scale(config: MarginConfig, x_norm: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor | float:
    """S = s |x_i| |W_j| with each norm only where the config keeps it, as a factor broadcast from
    the norms given: (B, 1) features against (1, C) classes for the (B, C) logits, or (B, 1) against
    each row's own class (B, 1) for the target logits. A number when neither norm is kept."""
    factor: torch.Tensor | float = 1.0 if config.scale is None else config.scale
    if config.feature_norm:
        factor = factor * x_norm
    if config.weight_norm:
        factor = factor * w_norm
    return factor


def target_logits(
    x_hat: torch.Tensor,
    x_norm: torch.Tensor,
    w_hat_y: torch.Tensor,
    w_norm_y: torch.Tensor,
    config: MarginConfig,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The target logits t_i = S_iy psi(cos theta_iy, theta_iy), (B,), from each row's own class alone.

    .. math:: t_i = s\,\|x_i\|^{[\mathrm{feature\_norm}]}\,\|W_{y_i}\|^{[\mathrm{weight\_norm}]}\,
              \psi(\cos\theta_{iy_i}, \theta_{iy_i})

    Args:
        x_hat, x_norm: unit features (B, D) and their norms (B, 1) (from :func:`unit_rows`).
        w_hat_y, w_norm_y: each row's unit class weight W[y_i] / |W[y_i]| (B, D) and its norm (B, 1).
        config: the loss.
        present: optional bool mask (B,); where False the row's target class is not among the
            classes at hand (another shard holds it): t_i = 0 there, with zero gradient. psi is
            evaluated at theta = pi/2 on those rows instead of at an arbitrary angle (the
            double-where idiom), so a psi with an infinite slope somewhere never multiplies it by
            the zero cotangent of a masked row.

    Returns:
        (B,) target logits in the dtype of ``x_hat``.
    """
    unit = ((x_norm >= NORM_EPS) & (w_norm_y >= NORM_EPS))[:, 0]
    cos_y, theta_y = target_cos_and_angle(x_hat, w_hat_y, unit)
    if present is not None:
        cos_y = torch.where(present, cos_y, 0.0)
        theta_y = torch.where(present, theta_y, math.pi / 2)
    if config.target is None:
        psi = cos_y
    elif getattr(config.target, "takes_norms", False):
        psi = config.target(cos_y, theta_y, x_norm[:, 0])
    else:
        psi = config.target(cos_y, theta_y)
    factor = logit_scale(config, x_norm, w_norm_y)
    if isinstance(factor, torch.Tensor) and factor.dim() == 2:
        factor = factor[:, 0]
    logits = factor * psi
    if getattr(config.target, "detached_margin", False):  # margin_grad="detached" (torch_port/margins.py)
        logits = value_with_gradient_of(logits, factor * cos_y)
    return logits if present is None else torch.where(present, logits, 0.0)


class _ValueWithGradientOf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, surrogate):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def value_with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` to the bit, with the gradient of ``surrogate`` (same shape): the "detached" margin
    convention, value = S psi with the gradient of the un-margined S cos theta_y. (surrogate +
    (value - surrogate).detach() would round the value.) Differentiable twice: its backward is the
    identity on the cotangent."""
    return _ValueWithGradientOf.apply(value, surrogate)


__all__ = [
    "NORM_EPS",
    "Geometry",
    "MarginConfig",
    "TargetFn",
    "cosines",
    "host_reads_are_free",
    "logit_scale",
    "norm_factors",
    "plain_norms_suffice",
    "pooled_cosines",
    "row_norms",
    "row_peaks",
    "saturating_cast",
    "target_cos_and_angle",
    "target_logits",
    "target_rows",
    "unit_rows",
    "upcast",
    "value_with_gradient_of",
]
