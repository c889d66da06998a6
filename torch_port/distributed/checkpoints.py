"""Checkpoints of the class-sharded head: one file per rank, each carrying its place, and re-sharding.

A shard's ``state_dict()`` holds its rows of the weight and, as ``_extra_state``, where they belong
(:func:`shard_metadata`): the number of classes, the dimension, the world size, the rank and the
class range. Loading checks that place before anything is copied (:func:`check_shard_metadata`);
to change the world size, :func:`merge_shard_weights` rebuilds the full (C, D) weight from the
files of all ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# The version tag of a shard's checkpoint metadata (ShardedMarginHead.get_extra_state).
CHECKPOINT_FORMAT = "softmax-variants/sharded-margin-head/1"


def shard_metadata(
    num_classes: int, dim: int, world_size: int, rank: int, class_start: int, class_end: int, subcenters: int = 1
) -> dict:
    """The place of a shard, as saved beside its weight (``subcenters``: weight rows per class)."""
    return {
        "subcenters": subcenters,
        "format": CHECKPOINT_FORMAT,
        "num_classes": num_classes,
        "dim": dim,
        "world_size": world_size,
        "rank": rank,
        "class_start": class_start,
        "class_end": class_end,
    }


def check_shard_metadata(state, mine: Mapping) -> None:
    """Raise a ValueError unless ``state`` is shard metadata for the same classes as ``mine``."""
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a ShardedMarginHead checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    keys = ("num_classes", "dim", "class_start", "class_end")
    if any(state.get(k) != mine[k] for k in keys) or state.get("subcenters", 1) != mine.get("subcenters", 1):
        raise ValueError(
            f"the checkpoint holds classes [{state.get('class_start')}, {state.get('class_end')}) of "
            f"num_classes={state.get('num_classes')}, dim={state.get('dim')} (rank {state.get('rank')} of "
            f"{state.get('world_size')}); this head holds [{mine['class_start']}, {mine['class_end']}) of "
            f"num_classes={mine['num_classes']}, dim={mine['dim']} (rank {mine['rank']} of {mine['world_size']}). "
            f"Load it on that rank of a group of that size, or re-shard with merge_shard_weights + load_full_weight"
        )


def merge_shard_weights(state_dicts: Sequence[Mapping], prefix: str = "") -> torch.Tensor:
    """The full (num_classes k, dim) weight from the state dicts of all shards of a ShardedMarginHead
    (k = 1, or the sub-centres per class).

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
        # k rows per class (sub-centres: the same k in every shard; metadata of older heads has none: 1)
        rows = (meta["class_end"] - meta["class_start"]) * meta.get("subcenters", 1)
        if tuple(weight.shape) != (rows, dim):
            raise ValueError(
                f"the shard of classes [{meta['class_start']}, {meta['class_end']}) has shape {tuple(weight.shape)}"
            )
        position = meta["class_end"]
    if position != num_classes:
        raise ValueError(
            f"the shards must cover [0, {num_classes}) exactly once; classes from {position} on are missing"
        )
    return torch.cat([weight for _, weight in shards])


__all__ = ["CHECKPOINT_FORMAT", "check_shard_metadata", "merge_shard_weights", "shard_metadata"]
