"""benchmarks/bench_generic_chunked.py times what it says it times.

Its steps compute, for each loss and path, the loss it is named after (against the reference,
differentiated by HIPS autograd: an independent route), the chunked steps really take the chunked
path (a chunk size below C, so more than one chunk), and the script runs end to end with --json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import autograd
import numpy as np
import torch

import refimpl
from benchmarks import bench_generic_chunked as bench

REPO = Path(__file__).resolve().parents[1]
REFERENCES = {
    "ArcFace": lambda x, W, y: refimpl.arcface_loss(x, W, y),
    "Sub-center ArcFace (k=3)": lambda x, W, y: refimpl.subcenter_arcface_loss(x, W, y, k=3),
    "CurricularFace (t=0.3)": lambda x, W, y: refimpl.curricularface_loss(x, W, y, t=0.3),
}


def test_every_step_computes_its_loss_and_the_chunked_ones_chunk(monkeypatch):
    monkeypatch.setattr(bench, "chunk_size_for", lambda batch, classes: 7)  # 3+ chunks of 20 classes
    seen = {}
    for name, loss in bench.LOSSES.items():
        rows = 20 * bench.ROWS_PER_CLASS.get(name, 1)
        x, W, y = bench.bench.make_inputs(6, 5, rows, torch.device("cpu"), torch.float64, seed=3)
        y = y % 20
        x.requires_grad_(), W.requires_grad_()
        expected = REFERENCES[name](x.detach().numpy(), W.detach().numpy(), y.numpy())
        grads = autograd.grad(lambda a, b, name=name, y=y: REFERENCES[name](a, b, y.numpy()), (0, 1))(
            x.detach().numpy(), W.detach().numpy()
        )
        for size in (None, 7):
            value = loss(x, W, y, size)
            got = torch.autograd.grad(value, (x, W))
            assert abs(float(value.detach()) - float(expected)) <= 1e-9 * max(1.0, abs(float(expected)))
            for g, r in zip(got, grads):
                np.testing.assert_allclose(g.numpy(), r, rtol=1e-8, atol=1e-10)
        seen[name] = True
    assert set(seen) == set(bench.LOSSES)
    table = bench.steps(6, 5, 20)
    assert {path for _, path in table} == {"plain", "chunked (k=7)"}


def test_the_script_runs_end_to_end(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_generic_chunked.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * len(bench.LOSSES) and "Sub-center" in done.stdout
    assert all(row["ms"] > 0 and row["memory / (B*C*4)"] >= 0 for row in rows)
