"""Launches R worker processes of tests/distributed_worker.py for the class-sharded tests.

Each launch is one gloo group on 127.0.0.1 at a free port; the workers save their results to a
directory and exit. The harness kills them all at a deadline, so a hang fails the tests instead of
blocking CI, and reports the tail of every rank's log when a worker fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Seconds for a whole launch (4 processes start in ~5 s on 2 cores and run in ~10 s).
LAUNCH_DEADLINE = 240


def worker_environment() -> dict[str, str]:
    """One thread per process (R processes share the cores), gloo on the loopback device, and the
    repository on the path (the workers import tests.* and torch_port)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, earlier: Path | None = None) -> list[dict]:
    """Run ``world`` worker processes; return each rank's results. Kills them all at the deadline."""
    port = _free_port()
    logs = [open(out / f"log{rank}.txt", "w") for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        command = [sys.executable, "-m", "tests.distributed_worker", str(rank), str(world), str(port), str(out)]
        command += [] if earlier is None else [str(earlier)]
        procs.append(subprocess.Popen(command, cwd=REPO, env=worker_environment(), stdout=log, stderr=log))
    deadline = time.monotonic() + LAUNCH_DEADLINE
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- rank {r} ---\n{(out / f'log{r}.txt').read_text()[-3000:]}" for r in range(world))
    assert all(proc.returncode == 0 for proc in procs), f"workers failed or hung (killed at the deadline):\n{tails}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
