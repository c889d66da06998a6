"""The routes by which the port computes a margin loss, for the shared suites.

plain              the port as called by users: ``torch_port.functional.<name>(...)``, chunk_size=None
chunked-k1         the memory-efficient path one class at a time (``chunk_size=1``)
chunked-k3         three classes per chunk (the last one partial wherever 3 does not divide C)
chunked-k-over-C   one chunk wider than C (``chunk_size = C + 1``)
sharded-2          ``sharded_margin_cross_entropy`` with the record's engine configuration, the
                   classes split over 2 gloo ranks (tests/sharded_runner.py) and each rank holding
                   its rows of x and y

A record lists its paths in ``LossRecord.paths``; the margin losses list ``MARGIN_PATHS``, so a new
margin loss record is run on every path by adding it to the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Path:
    """name: the id in test names. chunk: C -> chunk_size (None: no chunking). world: the number of
    ranks the classes are split over (1: one process)."""

    name: str
    chunk: Callable[[int], int] | None = None
    world: int = 1

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def chunk_size(self, num_classes: int) -> int | None:
        return None if self.chunk is None else self.chunk(num_classes)

    def __repr__(self) -> str:
        return self.name


PLAIN = Path("plain")
PATHS = {
    path.name: path
    for path in (
        PLAIN,
        Path("chunked-k1", chunk=lambda C: 1),
        Path("chunked-k3", chunk=lambda C: 3),
        Path("chunked-k-over-C", chunk=lambda C: C + 1),
        Path("sharded-2", world=2),
    )
}
MARGIN_PATHS: tuple[str, ...] = tuple(PATHS)
