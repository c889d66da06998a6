"""A long-lived 2-rank gloo group that computes the sharded path of a registry record on request.

The shared suites run the sharded path for thousands of samples; starting processes for each would
cost seconds per sample. Instead :class:`ShardedRunner` starts R worker processes once (this file,
run as ``python -m tests.sharded_runner``), which form a gloo process group and then serve calls:
the test process sends the same :class:`ShardedCall` (a record's name, a sample's global inputs,
dtype, reduction, autocast dtype, cotangent) to every worker over a pipe; rank r takes its rows of
x and y (and of per-sample margins) and its shard ``shard_range(C, R, r)`` of W (k rows per class
for sub-centres), calls ``sharded_margin_cross_entropy`` with the record's ``config`` of the
sample's hyperparameters and its ``ignore_index``, back-propagates ``sum(loss * cotangent)``, and
sends back its loss and gradients. The runner checks the loss is the same on every rank and
reassembles dL/dx (rank order) and dL/dW (shard order) for the test to compare with the reference.

What keeps it from hanging or leaking:

- the test process itself never joins a process group (``torch.distributed.is_initialized()``
  stays False there for the other test modules);
- the group's timeout (GROUP_TIMEOUT_S) bounds every collective in the workers, and the runner
  waits at most CALL_TIMEOUT_S for an answer (START_TIMEOUT_S for the start); past that it kills
  the workers and raises, and the next call starts a fresh group;
- any failed call also restarts the group (a rank that raised may have left the other inside a
  collective);
- fault scenarios (``("scenario", name)``, tests/distributed_faults.py) run on a fresh group with
  a timeout of a few seconds, so a rank left waiting by a regression fails within seconds;
- ``close()`` (the fixture's teardown in tests/conftest.py) stops the workers and kills any that
  do not exit; a worker whose pipe closes (the test process died) exits by itself.

Each worker runs ``torch.set_num_threads(1)``: R processes share the machine's cores.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing.connection as mpc
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
# Seconds. A collective that waits longer than GROUP_TIMEOUT_S raises in the worker; the runner's
# own limit is longer, so such an error is reported rather than cut off.
GROUP_TIMEOUT_S = 30
CALL_TIMEOUT_S = 60
START_TIMEOUT_S = 120  # imports of torch and the registry on a loaded 2-core machine
STOP_GRACE_S = 10


@dataclass(frozen=True)
class ShardedCall:
    """One evaluation of a record's loss on the sharded path, with global (unsplit) inputs.

    record: the registry name; each worker builds ``record.config(kwargs)`` itself (so a call
    carries plain data only, and the configuration is built as the tests build it). cotangent:
    the weights w of the backward objective sum(loss * w), shaped like the loss; None computes no
    gradients. autocast: None, or the dtype the forward runs under ``torch.autocast("cpu", ...)``
    on every rank (backward outside it).
    """

    record: str
    x: np.ndarray
    W: np.ndarray
    y: np.ndarray
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float64"
    reduction: str = "mean"
    autocast: str | None = None
    cotangent: np.ndarray | None = None


@dataclass
class ShardedResult:
    """The loss (as every rank returned it; its torch dtype) and the gradients of x and W
    reassembled from the ranks, as float64 NumPy arrays (exact: the values were float64, float32 or
    a half dtype)."""

    loss: np.ndarray
    loss_dtype: str
    grads: dict[str, np.ndarray]


class ShardedRunError(AssertionError):
    """A call failed on some rank (the message has every rank's traceback) or timed out."""


class ShardedRunner:
    """R worker processes in one gloo group, started on the first call and kept until close()."""

    def __init__(self, world: int = WORLD, call_timeout: float = CALL_TIMEOUT_S) -> None:
        self.world = world
        self.call_timeout = call_timeout
        self._procs: list[subprocess.Popen] = []
        self._conns: list[mpc.Connection] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._pending: ShardedCall | None = None
        self.starts = 0  # how many groups were started (a restart after a failure adds one)

    # --- the test process's side ---

    def run(self, call: ShardedCall) -> ShardedResult:
        self.submit(call)
        return self.result()

    def submit(self, call: ShardedCall) -> None:
        """Start ``call`` on every rank and return at once; :meth:`result` waits for it. The test
        process can compute the reference meanwhile (on a machine with a core to spare for it, the
        two overlap). One call at a time: a call left uncollected is collected and dropped."""
        if self._pending is not None:  # the test that submitted it failed before collecting it
            with contextlib.suppress(ShardedRunError):
                self.result()
        self.send(("call", call))
        self._pending = call

    def result(self) -> ShardedResult:
        call, self._pending = self._pending, None
        assert call is not None, "no call was submitted"
        per_rank = self.receive()
        loss = per_rank[0]["loss"]
        for rank, got in enumerate(per_rank[1:], start=1):
            # The loss is the global batch's, all-reduced: the same number on every rank.
            if not np.array_equal(got["loss"], loss, equal_nan=True):
                raise ShardedRunError(f"rank {rank}'s loss {got['loss']} differs from rank 0's {loss}")
        grads = {}
        if call.cotangent is not None:
            # rank r holds rows [offset_r, offset_r + B_r) of x and rows shard_range(C, R, r) of W
            for name in ("x", "W"):
                grads[name] = np.concatenate([got["grads"][name] for got in per_rank])
        return ShardedResult(loss, per_rank[0]["loss_dtype"], grads)

    def request(self, message: tuple) -> list[Any]:
        """Send ``message`` to every rank and return their answers in rank order."""
        self.send(message)
        return self.receive()

    def send(self, message: tuple) -> None:
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send(message)

    def receive(self) -> list[Any]:
        deadline = time.monotonic() + self.call_timeout
        answers = [self._receive(rank, deadline) for rank in range(self.world)]
        failed = [(rank, answer) for rank, answer in enumerate(answers) if answer[0] != "ok"]
        if failed:
            # A rank that raised may have left the other one waiting in a collective: start afresh.
            self._stop()
            raise ShardedRunError("\n".join(f"--- rank {rank} ---\n{answer[1]}" for rank, answer in failed))
        return [answer[1] for answer in answers]

    def close(self) -> None:
        self._stop()

    def _start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="sharded-runner-")
        tmp = Path(self._tmp.name)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
        }
        for rank in range(self.world):
            mine, theirs = mpc.Pipe()
            command = [sys.executable, "-m", "tests.sharded_runner", str(theirs.fileno()), str(rank)]
            command += [str(self.world), str(tmp / "store")]
            with open(tmp / f"log{rank}.txt", "w") as log:
                proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, pass_fds=(theirs.fileno(),))
            theirs.close()  # the worker holds its end; closing ours lets us see EOF if it dies
            self._procs.append(proc)
            self._conns.append(mine)
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank in range(self.world):
            answer = self._receive(rank, deadline)
            if answer[0] != "ok":
                self._stop()
                raise ShardedRunError(f"rank {rank} did not start:\n{answer[1]}")

    def _receive(self, rank: int, deadline: float) -> tuple:
        conn = self._conns[rank]
        try:
            if conn.poll(max(0.0, deadline - time.monotonic())):
                return conn.recv()
            reason = "timed out"
        except (EOFError, OSError):
            reason = "exited"
        logs = self._logs()
        self._stop(kill=True)  # a worker that does not answer is stuck: no polite stop
        raise ShardedRunError(f"rank {rank} of the sharded runner {reason}; the workers were killed.\n{logs}")

    def _logs(self) -> str:
        if self._tmp is None:
            return ""
        parts = []
        for rank in range(self.world):
            log = Path(self._tmp.name) / f"log{rank}.txt"
            text = log.read_text()[-3000:] if log.exists() else ""
            parts.append(f"--- rank {rank} log ---\n{text}")
        return "\n".join(parts)

    def _stop(self, kill: bool = False) -> None:
        """Ask the workers to leave (they destroy the group and exit); kill any still running after
        STOP_GRACE_S, or at once with ``kill``."""
        if not kill:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.send(None)
        deadline = time.monotonic() + (0.0 if kill else STOP_GRACE_S)
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._pending = [], [], None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]


# --- the worker's side (each spawned rank) ----------------------------------------------------------


def _compute(call: ShardedCall, rank: int, world: int) -> dict:
    import torch

    from tests.registry import BY_NAME
    from tests.samples import TORCH_DTYPES
    from torch_port.distributed import shard_range, sharded_margin_cross_entropy

    dtype = TORCH_DTYPES[call.dtype]
    k = call.kwargs.get("k", 1)  # sub-centres: k rows of W per class, shards cut at whole classes
    num_classes = call.W.shape[0] // k
    start, end = shard_range(num_classes, world, rank)
    rows = np.array_split(np.arange(call.x.shape[0]), world)[rank]
    x = torch.tensor(call.x[rows], dtype=dtype).requires_grad_(call.cotangent is not None)
    W = torch.tensor(call.W[start * k : end * k], dtype=dtype).requires_grad_(call.cotangent is not None)
    y = torch.as_tensor(call.y[rows])
    # Per-sample margins travel with their rows of x (a (B,) array becomes this rank's (B_r,) rows).
    kwargs = {name: v[rows] if isinstance(v, np.ndarray) else v for name, v in call.kwargs.items()}
    config = BY_NAME[call.record].config(kwargs)
    ignore_index = call.kwargs.get("ignore_index", -1)
    autocast = (
        contextlib.nullcontext() if call.autocast is None else torch.autocast("cpu", dtype=TORCH_DTYPES[call.autocast])
    )
    with autocast:
        loss = sharded_margin_cross_entropy(
            x, W, y, config, num_classes=num_classes, reduction=call.reduction, ignore_index=ignore_index
        )
    out = {"loss": loss.detach().double().numpy(), "loss_dtype": str(loss.dtype).removeprefix("torch.")}
    if call.cotangent is not None:
        weights = torch.tensor(call.cotangent, dtype=loss.dtype)
        gx, gW = torch.autograd.grad((loss * weights).sum(), (x, W))
        out["grads"] = {"x": gx.double().numpy(), "W": gW.double().numpy()}
    return out


def _serve(fd: int, rank: int, world: int, store: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # R processes share the machine's cores
    conn = mpc.Connection(fd)
    try:
        import tests.registry  # noqa: F401  (imported before the first call, which the runner times)

        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the test process is gone
        if message is None:
            break
        kind, payload = message
        try:
            if kind == "call":
                answer = ("ok", _compute(payload, rank, world))
            elif kind == "scenario":  # a fault scenario of tests/distributed_faults.py, by name
                from tests.distributed_faults import run_scenario

                answer = ("ok", run_scenario(payload, rank, world))
            elif kind == "head-case":  # a ShardedMarginHead case of tests/sharded_heads.py, by name
                from tests.sharded_heads import run_head_case

                answer = ("ok", run_head_case(payload, rank, world))
            elif kind == "sleep":  # for the runner's own timeout test (tests/test_helpers.py)
                time.sleep(payload)
                answer = ("ok", None)
            elif kind == "raise-on" and payload == rank:  # for the runner's own error test
                raise RuntimeError(f"asked to fail on rank {rank}")
            else:
                answer = ("ok", rank)
        except Exception:
            answer = ("error", traceback.format_exc())
        try:
            conn.send(answer)
        except OSError:
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    _fd, _rank, _world, _store = sys.argv[1:5]
    _serve(int(_fd), int(_rank), int(_world), _store)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: a group torn down by a timeout must not hold the process
