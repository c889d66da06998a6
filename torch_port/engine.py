r"""The one engine behind every margin loss of the port, and its one primitive.

Every margin loss is a :class:`~torch_port.geometry.MarginConfig` (torch_port/geometry.py). The
engine's primitive, :func:`lse_and_target`, returns two numbers per row i of a batch, over the
classes of the W it is given:

    lse_i    = log( [y_i present] e^{t_i} + sum_{j != y_i} e^{S_ij cos theta_ij} )
    target_i = t_i = S_iy psi(cos theta_iy, theta_iy)      (0 where y_i = ABSENT = -1)

A label of -1 says the row's target class is not among these classes (another shard holds it):
the row's log-sum-exp then runs over all of them, margin-free, and its target is 0. The
cross-entropy of a row whose target is present is lse_i - t_i (:func:`margin_cross_entropy`). Three
paths compute or combine the primitive:

- plain (``chunk_size=None``): the (B, C) logits at once, here;
- chunked (``chunk_size=int``): the classes in chunks, never a (B, C) tensor (torch_port/chunked.py);
- sharded: each rank calls the primitive on its shard, with the labels of other shards as -1, then
  the ranks combine the log-sum-exps and sum the targets (torch_port/distributed/loss.py), so each
  target logit is computed once, by the rank that holds its class.

How later margins fit the primitive (design notes, not implemented here): a margin that changes
non-target logits from a per-row quantity of the target (CurricularFace's hard negatives compare
cos theta_ij with cos(theta_iy + m), without gradient through the comparison) gets that quantity
from the target side; on the sharded path the rank holding the target computes it and one more
all-reduce of a (B,) tensor hands it to every shard before its log-sum-exp. Several weight rows per
class (sub-centres) pool their cosines (a max over a class's k rows) before the logits; the chunked
and sharded paths then cut W at whole classes, and the target side reads the k rows of W[y].

Numerics (docs/design.md): computed in float32 at least (float64 stays float64), autocast disabled
inside, so bfloat16/float16 training never overflows at s = 64. The plain path's log-sum-exp keeps
the row maximum out of the exponentials' gradient (softmax = e^{z - M} / sum, never e^{z - lse}), so
the probabilities carry no rounding of a number of size s. In float32 the value lse - t rounds to
about ulp(s), the size of the error the float32 logits already carry (s times a cosine's rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from softmax_common.checks import check_ignore_index, check_reduction, check_subcenters
from torch_port.chunked import chunked_lse_and_target
from torch_port.geometry import (
    NORM_EPS,
    Geometry,
    MarginConfig,
    TargetFn,
    target_cos_and_angle,
    unit_rows,
    upcast,
)
from torch_port.plain_path import margin_free_logits, plain_lse_and_target
from torch_port.row_params import check_row_tensors, resolve_labels
from torch_port.tensor_checks import (
    check_chunk_size,
    check_features_table_labels,
    check_labels,
    compute_dtype,
    reduce_loss,
)

# The label that says "this row's target class is not among the classes given" (lse_and_target).
ABSENT = -1


class LseAndTarget(NamedTuple):
    """Per row: the log-sum-exp over the classes given, and the target logit (0 where absent)."""

    lse: torch.Tensor
    target: torch.Tensor


def check_inputs(x, W, y=None, *, absent: bool = False, subcenters: int = 1, ignore_index: int | None = None):
    """Validate features (B, D), weights (C k, D) and optional labels (B,); returns labels as int64.

    absent: also accept the label -1 (the target is not among W's classes). subcenters: k, W's rows
    per class (W must have a multiple of k rows). ignore_index: a negative label also accepted, for
    rows to skip (kept in the labels returned).
    """
    check_features_table_labels(x, W, None, "W")
    check_subcenters(subcenters, W.shape[0])
    if y is None:
        return None
    low = ABSENT if absent else 0
    return check_labels(y, x.shape[0], W.shape[0] // subcenters, low=low, same_device_as=("x", x), ignore=ignore_index)


def check_config_rows(config: MarginConfig, x: torch.Tensor) -> None:
    """Per-row tensors of the configuration (per-sample margins) must match x's batch and device."""
    check_row_tensors(config, x.shape[0], x)


def ignored_rows(y: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(labels for the primitive, kept): rows labelled ``ignore_index`` become ABSENT (-1: no target
    term), and ``kept`` marks the others (None when nothing can be ignored)."""
    if ignore_index is None:
        return y, None
    kept = y != ignore_index
    return torch.where(kept, y, ABSENT), kept


def penalty_of(x: torch.Tensor, config: MarginConfig) -> torch.Tensor:
    """The configuration's per-sample penalty (B,) from the features' norms (MagFace's regulariser),
    in the compute dtype with autocast disabled."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        _, norms = unit_rows(upcast(x, compute_dtype(("x", x))))
        return config.penalty(norms[:, 0])


def plain_logits(x: torch.Tensor, W: torch.Tensor, config: MarginConfig) -> torch.Tensor:
    """Margin-free logits S_ij * cos theta_ij (B, C): what a head gives at inference."""
    check_inputs(x, W, subcenters=config.subcenters)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return Geometry(x, W).logits(config)


def margin_logits(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig, ignore_index: int | None = ABSENT
) -> torch.Tensor:
    """The (B, C) logits with the target's margin applied, as fed to cross-entropy; rows labelled
    ``ignore_index`` get the margin-free logits."""
    y = check_inputs(x, W, y, subcenters=config.subcenters, ignore_index=check_ignore_index(ignore_index))
    check_config_rows(config, x)
    labels, kept = ignored_rows(y, ignore_index)
    config = resolve_labels(config, labels)  # per-class margins, looked up by label
    with torch.autocast(device_type=x.device.type, enabled=False):
        geo = Geometry(x, W)
        rows = labels.clamp_min(0)
        logits = margin_free_logits(geo, rows, config, labels >= 0)
        target = geo.target_logits(rows, config, kept)
        if kept is not None:
            target = torch.where(kept, target, logits.gather(1, rows[:, None])[:, 0])
        # scatter, not in-place assignment: the replaced entry's gradient goes to the target path only.
        return logits.scatter(1, rows[:, None], target[:, None])


def lse_and_target(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    config: MarginConfig,
    chunk_size: int | None = None,
    *,
    validate: bool = True,
    thresholds: torch.Tensor | None = None,
) -> LseAndTarget:
    r"""The engine's primitive: per row, the log-sum-exp over W's classes and the target logit.

    .. math::

        \mathrm{lse}_i = \log\Big([y_i \ne -1]\, e^{t_i} + \sum_{j \ne y_i} e^{S_{ij}\cos\theta_{ij}}\Big),
        \qquad t_i = S_{iy_i}\,\psi(\cos\theta_{iy_i}, \theta_{iy_i}) \ (0 \text{ where } y_i = -1)

    The cross-entropy of a row whose target is present is ``lse - target``. Differentiable in x, W
    and a learnable scale (a 0-d tensor ``config.scale``), in both outputs; a row with y_i = -1 gets
    no gradient through its target.

    Args:
        x: features (B, D). W: class weights (C, D), one row per class.
        y: integer labels (B,) in [-1, C); -1 (``ABSENT``): the row's target is not among these classes.
        config: the loss.
        chunk_size: None builds the (B, C) logits at once; an int walks the classes that many at a
            time and never keeps a (B, C) tensor (torch_port/chunked.py; a second derivative,
            create_graph=True, is exact but recomputes through the plain path's memory).
        validate: check shapes, dtypes, devices and the label range first (reads two numbers back
            from the device). A caller that has checked them already passes False.
        thresholds: for a configuration that modulates non-target logits (CurricularFace), the
            per-row thresholds (B,) of rows whose target is absent (the sharded path has them from
            the rank holding the target); None: +inf there (torch_port/plain_path.py).

    Returns:
        ``LseAndTarget(lse, target)``, both (B,) in the compute dtype (float32 for float32 and half
        inputs, float64 for float64).
    """
    if validate:
        chunk_size = check_chunk_size(chunk_size)
        y = check_inputs(x, W, y, absent=True, subcenters=config.subcenters)
        check_config_rows(config, x)
    config = resolve_labels(config, y)  # per-class margins, looked up by label (-1 reads class 0's, unused)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if chunk_size is not None:
            return LseAndTarget(*chunked_lse_and_target(x, W, y, config, chunk_size, thresholds))
        return LseAndTarget(*plain_lse_and_target(x, W, y, config, thresholds))


def margin_cross_entropy(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    config: MarginConfig,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    """Cross-entropy of the margin logits, lse - t per row (:func:`lse_and_target`), reduced over the batch.

    chunk_size: None computes the (B, C) logits at once; an int walks the classes in chunks of that
    many and never keeps a (B, C) tensor (the memory-efficient path, torch_port/chunked.py; equal
    to the plain path to rounding; its second derivatives recompute through the plain path).
    ignore_index: rows with this label (default -1, insightface's and Partial FC's mark; None: none)
    give a loss of 0 and no gradient; "mean" averages over the other rows, and is 0 (with zero
    gradients) when every row is ignored.
    """
    reduction = check_reduction(reduction)
    chunk_size = check_chunk_size(chunk_size)
    ignore_index = check_ignore_index(ignore_index)
    y = check_inputs(x, W, y, subcenters=config.subcenters, ignore_index=ignore_index)
    check_config_rows(config, x)
    labels, kept = ignored_rows(y, ignore_index)
    lse, target = lse_and_target(x, W, labels, config, chunk_size, validate=False)
    per_sample = lse - target
    if config.penalty is not None:
        per_sample = per_sample + penalty_of(x, config)
    if kept is not None:
        per_sample = torch.where(kept, per_sample, 0.0)
    return reduce_loss(per_sample, reduction, kept)


__all__ = [
    "ABSENT",
    "NORM_EPS",
    "LseAndTarget",
    "MarginConfig",
    "TargetFn",
    "check_config_rows",
    "check_inputs",
    "ignored_rows",
    "lse_and_target",
    "margin_cross_entropy",
    "margin_logits",
    "penalty_of",
    "plain_logits",
    "target_cos_and_angle",
    "unit_rows",
    "upcast",
]
