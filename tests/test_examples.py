"""examples/train_sharded.py under torchrun: each worker joins torchrun's group (issue 14).

The script started directly (it spawns its own processes) is tested in tests/test_distributed.py.
Started by torchrun, it must not spawn again: before, each torchrun worker called mp.spawn itself and
the job hung for two minutes in TCPStore timeouts. Here torchrun (``python -m torch.distributed.run``,
the same entry point as the ``torchrun`` command) starts 2 gloo processes on 127.0.0.1 with a static
rendezvous, and a short run must finish and lower the loss.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.distributed_harness import LAUNCH_DEADLINE, REPO, worker_environment


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def epoch_losses(stdout: str) -> list[float]:
    return [float(line.split("loss")[1].split()[0]) for line in stdout.splitlines() if line.startswith("epoch")]


def test_the_training_example_runs_under_torchrun():
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(REPO / "examples" / "train_sharded.py"),
        "--epochs",
        "3",
    ]
    done = subprocess.run(
        command, cwd=REPO, env=worker_environment(), capture_output=True, text=True, timeout=LAUNCH_DEADLINE
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = epoch_losses(done.stdout)
    assert len(losses) == 3, done.stdout  # rank 0 alone prints: one group of 2, not two groups
    assert losses[-1] < 0.7 * losses[0], done.stdout
