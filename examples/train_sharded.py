"""Train an embedding network with a class-sharded CosFace head on 2 gloo processes (CPU only).

    python examples/train_sharded.py                       # 2 processes, 12 epochs (docs/sharded.md: a run)
    python examples/train_sharded.py --world-size 3 --save /tmp/sharded   # also save a checkpoint
    torchrun --nproc_per_node=2 examples/train_sharded.py  # the same, processes started by torchrun

The problem is synthetic face-recognition-like data: ``--classes`` identities (201 by default, so
the shards are uneven: 101 + 100 classes), each a random centre in R^32 seen through noise. Every
rank runs the same script. Started by ``torchrun`` (``LOCAL_RANK``, ``RANK`` and ``WORLD_SIZE`` in the
environment) each process joins the group torchrun describes (``init_method="env://"``, gloo) and
``--world-size`` is ignored; started directly, the script starts ``--world-size`` processes itself with
``torch.multiprocessing.spawn`` on a free local port:

- the backbone (a small MLP to 16-d embeddings) is replicated and wrapped in
  ``DistributedDataParallel``, as in any data-parallel job;
- the head is a :class:`torch_port.distributed.ShardedMarginHead`: each rank holds only its rows of
  the (C, 16) class weights, and ``head(embeddings, labels)`` returns the loss of the global batch;
- ``feature_grad_scale=world_size`` because DDP averages the backbone's gradients over the ranks,
  while the sharded head already gives each rank the whole gradient of its embeddings.

Each global batch of 64 samples is split over the ranks (unevenly when 64 is not divisible by the
world size; the head accepts that). Rank 0 prints the loss and the held-out accuracy, computed
from ``head.logits`` (each rank gets the (B_r, C) logits of its own samples).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torch_port.distributed import ShardedMarginHead, merge_shard_weights
from torch_port.normalized import cosface_config

IN_DIM, EMBED_DIM, GLOBAL_BATCH = 32, 16, 64


def make_data(num_classes: int, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` noisy samples of each of ``num_classes`` random centres (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, IN_DIM, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + 0.9 * torch.randn(labels.numel(), IN_DIM, generator=gen)
    return features, labels


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every process it starts."""
    return all(name in os.environ for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"))


def spawned(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    """One of the processes this script started itself (mp.spawn): a local TCP rendezvous."""
    join_group(f"tcp://127.0.0.1:{port}", rank, world_size)
    train(rank, world_size, args)


def join_group(init_method: str, rank: int, world_size: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # a dead rank fails the job in a minute, not 30
    )


def train(rank: int, world_size: int, args: argparse.Namespace) -> None:
    torch.manual_seed(rank)  # each rank draws its own shard's initial rows
    features, labels = make_data(args.classes, per_class=10)
    # 8 training and 2 held-out samples of every class.
    held_out = torch.arange(labels.numel()) % 10 >= 8
    train_x, train_y, test_x, test_y = features[~held_out], labels[~held_out], features[held_out], labels[held_out]

    torch.manual_seed(0)  # the backbone starts identical on every rank (DDP also broadcasts it)
    backbone = DistributedDataParallel(nn.Sequential(nn.Linear(IN_DIM, 64), nn.ReLU(), nn.Linear(64, EMBED_DIM)))
    head = ShardedMarginHead(args.classes, EMBED_DIM, cosface_config(s=30.0, m=0.2), feature_grad_scale=world_size)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=args.lr, momentum=0.9)

    for epoch in range(args.epochs):
        # The same permutation on every rank; each global batch is split over the ranks.
        order = torch.randperm(train_y.numel(), generator=torch.Generator().manual_seed(epoch))
        total, batches = 0.0, 0
        for batch in order.split(GLOBAL_BATCH):
            mine = torch.tensor_split(batch, world_size)[rank]
            loss = head(backbone(train_x[mine]), train_y[mine])  # the global batch's loss, on every rank
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        accuracy = evaluate(backbone, head, test_x, test_y, rank, world_size)
        if rank == 0:
            print(f"epoch {epoch + 1:2d}  loss {total / batches:.4f}  held-out accuracy {accuracy:.3f}", flush=True)

    if args.save is not None:
        save(args.save, backbone, head, rank)
    dist.destroy_process_group()
    # torch 2.13's CPU build sometimes aborts ("terminate called without an active exception") while
    # the interpreter shuts down after gloo was used, even after destroy_process_group(); it happens
    # with plain DDP and no code of this project too. Everything is done: leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@torch.no_grad()
def evaluate(backbone, head, test_x, test_y, rank: int, world_size: int) -> float:
    mine = torch.tensor_split(torch.arange(test_y.numel()), world_size)[rank]
    logits = head.logits(backbone(test_x[mine]))  # (B_r, C): this rank's samples, every class
    correct = torch.tensor([(logits.argmax(dim=1) == test_y[mine]).sum().item()], dtype=torch.float64)
    dist.all_reduce(correct)
    return float(correct) / test_y.numel()


def save(directory: Path, backbone, head, rank: int) -> None:
    """One file per rank for the head's shard (with its place in the class range), one backbone."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), directory / f"head.rank{rank}.pt")
    if rank == 0:
        torch.save(backbone.module.state_dict(), directory / "backbone.pt")
    dist.barrier()
    if rank == 0:
        # Re-sharding check: the shards merge into the full (C, D) weight, in class order.
        shards = [torch.load(path, weights_only=True) for path in sorted(directory.glob("head.rank*.pt"))]
        full = merge_shard_weights(shards)
        print(f"saved {len(shards)} shards to {directory}; merged weight {tuple(full.shape)}", flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--world-size", type=int, default=2, help="number of gloo processes (default 2; under torchrun, torchrun's)"
    )
    parser.add_argument("--classes", type=int, default=201, help="number of identities (default 201)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--save", type=Path, default=None, help="directory for a checkpoint of the shards")
    args = parser.parse_args()
    if launched_by_torchrun():
        # torchrun started this process and set MASTER_ADDR/MASTER_PORT: join its group (spawning
        # here would start world_size more processes per torchrun worker, which never meet).
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        join_group("env://", rank, world_size)
        train(rank, world_size, args)
    else:
        mp.spawn(spawned, args=(args.world_size, _free_port(), args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
