"""The plain path of the engine's primitive, the (B, C) logits at once, and the non-target side of
margins that change more than the target's logit.

:func:`plain_lse_and_target` is what :func:`torch_port.engine.lse_and_target` computes with
``chunk_size=None``, and what the chunked path differentiates for second derivatives.

Margins that modulate the non-target logits (CurricularFace: a class whose cosine exceeds the
row's cos(theta_y + m) is a hard negative, its cosine becomes cos (t + cos)) declare it on their
target transform (``modulates_negatives = True``) with two methods: ``threshold(cos_y, theta_y)``,
the per-row quantity of the target side (taken without gradient), and ``hard_negatives(cos,
threshold)``, the (B, C) cosines modulated. A row whose target is absent (another shard holds it, or
the row is ignored) gets its threshold from the caller, or +inf: no hard negative. The sharded path
computes the thresholds on the rank holding each target and hands them to every shard
(torch_port/distributed/loss.py).
"""

from __future__ import annotations

import math

import torch

from torch_port.geometry import Geometry, MarginConfig, target_cos_and_angle, target_rows
from torch_port.tensor_checks import compute_dtype


def modulates_negatives(config: MarginConfig) -> bool:
    """Whether the configuration changes non-target logits (CurricularFace)."""
    return bool(getattr(config.target, "modulates_negatives", False))


def target_thresholds(x_hat, x_norm, w_hat_y, w_norm_y, config: MarginConfig, present) -> torch.Tensor:
    """Per row (B,), no gradient: the target side's threshold of a modulating configuration, +inf
    where the target is absent. Arguments as :func:`torch_port.geometry.target_logits`."""
    with torch.no_grad():
        unit = ((x_norm > 0) & (w_norm_y > 0))[:, 0]
        cos_y, theta_y = target_cos_and_angle(x_hat.detach(), w_hat_y.detach(), unit)
        return torch.where(present, config.target.threshold(cos_y, theta_y), math.inf)


def target_side(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig):
    """(cos theta_y, threshold) per row, (B,) each, no gradient, reading only the rows W[y] (k rows
    per class for sub-centres); 0 and +inf where y is -1 (absent). The threshold is +inf too when the
    configuration modulates nothing. What the sharded path's owner ranks compute for the others."""
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        dtype = compute_dtype(("x", x), ("W", W))
        present, rows = y >= 0, y.clamp_min(0)
        k = config.subcenters
        candidates = (rows[:, None] * k + torch.arange(k, device=y.device)).flatten()
        geo = Geometry(x.detach().to(dtype), W.detach()[candidates].to(dtype))
        local = target_rows(geo.x_hat, geo.w_hat, torch.arange(x.shape[0], device=y.device), k)
        w_hat, w_norm = geo.w_hat[local], geo.w_norm[local]
        unit = ((geo.x_norm > 0) & (w_norm > 0))[:, 0]
        cos_y, _ = target_cos_and_angle(geo.x_hat, w_hat, unit)
        cos_y = torch.where(present, cos_y, 0.0)
        if not modulates_negatives(config):
            return cos_y, torch.full_like(cos_y, math.inf)
        return cos_y, target_thresholds(geo.x_hat, geo.x_norm, w_hat, w_norm, config, present)


def plain_lse_and_target(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig, thresholds: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's primitive on the plain path: per row (B,), the log-sum-exp over the (B, C) logits
    with the target's margin applied, and the target logit (0 where y_i = -1); arguments already
    checked, autocast already disabled (see :func:`torch_port.engine.lse_and_target`). Ordinary
    autograd all the way, so it is differentiable any number of times. ``thresholds``: a
    modulating configuration's per-row thresholds where the caller has them (the sharded path);
    None computes them here.
    """
    geo = Geometry(x, W)
    present = y >= 0
    rows = y.clamp_min(0)  # absent rows read class 0's column and put it back unchanged
    logits = margin_free_logits(geo, rows, config, present, thresholds)
    target = geo.target_logits(rows, config, present)
    kept = logits.gather(1, rows[:, None])[:, 0]
    logits = logits.scatter(1, rows[:, None], torch.where(present, target, kept)[:, None])
    # log sum exp with the row maximum held out of the graph: the gradient is e^{z - M} / sum (M
    # cancels exactly), which keeps M's rounding out of every probability.
    peak = logits.detach().amax(dim=1, keepdim=True)
    lse = peak[:, 0] + torch.log(torch.exp(logits - peak).sum(dim=1))
    return lse, target


def margin_free_logits(geo: Geometry, rows, config: MarginConfig, present, thresholds=None) -> torch.Tensor:
    """The (B, C) logits before the target's entry is replaced: S cos theta_ij, or for a modulating
    configuration s times the modulated cosines (the thresholds computed from ``rows`` where
    ``present``, else taken from ``thresholds``, else +inf)."""
    if not modulates_negatives(config):
        return geo.logits(config)
    target_row = target_rows(geo.x_hat, geo.w_hat, rows, config.subcenters)
    own = target_thresholds(geo.x_hat, geo.x_norm, geo.w_hat[target_row], geo.w_norm[target_row], config, present)
    if thresholds is not None:
        own = torch.where(present, own, thresholds.to(own.dtype))
    cos = geo.logits(MarginConfig(subcenters=config.subcenters))
    return config.target.hard_negatives(cos, own) * (1.0 if config.scale is None else config.scale)


__all__ = [
    "margin_free_logits",
    "modulates_negatives",
    "plain_lse_and_target",
    "target_side",
    "target_thresholds",
]
