"""Class-sharded margin cross-entropy on torch.distributed: model parallelism over the classes.

When C class weights outgrow one device, rank r of a process group of R ranks keeps only the rows
``[start_r, end_r)`` of W (the layout of ``torch.tensor_split``: shard sizes differ by at most one),
as Partial FC does. The loss is that of the *global* batch, the same number on every rank, and its
gradients are those of the single-process loss on the concatenated batch: each rank's ``W`` shard
gets its rows of dL/dW and each rank's ``x`` its rows of dL/dx. Every rank must call ``backward``
(as with any collective, a rank that skips it leaves the others waiting until the group's timeout).

The subpackage, one concern per module:

- ``collectives.py``: all-gather, all-reduce and log-sum-exp across ranks, each with its gradient;
- ``agreement.py``: the class layout (:func:`shard_range`) and the metadata exchange that makes every
  rank raise the same clear error before anything is computed (whatever a rank's checks raised, or
  ranks making different calls at the same time);
- ``loss.py``: :func:`sharded_margin_cross_entropy` (each rank computes the engine's primitive
  ``lse_and_target`` on its shard; the pieces are combined across ranks) and :func:`sharded_logits`;
- ``head.py``: :class:`ShardedMarginHead`, the nn.Module;
- ``checkpoints.py``: per-rank checkpoints and :func:`merge_shard_weights` for re-sharding.

Timeouts: every collective runs on the process group given (default: the world), so it is bounded
by the group's timeout; set one when creating the group, e.g.
``init_process_group("gloo", timeout=datetime.timedelta(seconds=60))`` (the defaults, 30 min for
gloo and 10 min for nccl, are long for a job whose rank has died). Backends: the tests run gloo on
CPU; nothing here is CPU-specific, but nccl has not been run in this project (with nccl call
``torch.cuda.set_device(local_rank)`` first: the metadata exchange uses the current device).

Guide: docs/sharded.md; example: examples/train_sharded.py.
"""

from torch_port.distributed.agreement import shard_range
from torch_port.distributed.checkpoints import CHECKPOINT_FORMAT, merge_shard_weights
from torch_port.distributed.head import ShardedMarginHead
from torch_port.distributed.loss import sharded_logits, sharded_margin_cross_entropy

__all__ = [
    "CHECKPOINT_FORMAT",
    "ShardedMarginHead",
    "merge_shard_weights",
    "shard_range",
    "sharded_logits",
    "sharded_margin_cross_entropy",
]
