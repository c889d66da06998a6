"""How many classes a chunk of the memory-efficient path takes (torch_port/chunked.py).

Re-exported by :mod:`torch_port.chunked`, where users find it.
"""

from __future__ import annotations

import torch

from softmax_common.checks import check_positive, check_positive_int

# The memory one chunk's (B, k) block may take, by device; the path works on two such blocks (the
# products and their exponentials). CPU: 512 KiB (k = 512 at B = 256), so that the pair fits a
# core's L2 cache while a block is exponentiated and fed to the next product (the sweep that chose
# it: benchmarks/RESULTS.md, "Chunk size"). GPU: 256 MiB, so that a step is a few dozen chunks of
# large products rather than thousands of small kernel launches (k = 16384 at B = 4096).
CHUNK_BUDGET_BYTES = {"cpu": 2**19, "cuda": 256 * 2**20}
MIN_CHUNK = 128


def chunk_size_for(batch_size: int, num_classes: int, device="cpu", budget_bytes: float | None = None) -> int:
    r"""A class-chunk size for the memory-efficient path: the (B, k) float32 block fits the budget.

    .. math:: k = \min\Big(C, \max\big(128, \lfloor \mathrm{budget} / (4 B) \rfloor\big)\Big)

    The path works on two such blocks (a chunk's products and their exponentials; the last chunk's
    pair is kept from forward to backward). Besides them, a chunk uses (k, D) numbers only when W
    is float16/bfloat16 (its rows are upcast one chunk at a time); everything else the path keeps
    is (rows, D), (B, D) or (C,) sized, plus the gradient dW itself. The budget is fixed rather than
    a fraction of C: with few classes a smaller k makes more, smaller products for a saving the
    path's (B, D) temporaries outweigh (benchmarks/RESULTS.md, "Chunk size").

    Args:
        batch_size: B >= 1.
        num_classes: C >= 1.
        device: where the loss runs ("cpu", "cuda", a torch.device); picks the default budget
            (512 KiB on CPU, 256 MiB on CUDA and other accelerators).
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


__all__ = ["CHUNK_BUDGET_BYTES", "MIN_CHUNK", "chunk_size_for"]
