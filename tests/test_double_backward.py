"""Second derivatives (create_graph=True, e.g. a gradient penalty) through the engine's paths.

The chunked path's backward is written by hand, chunk by chunk; a derivative of the gradient it
returns cannot go through that loop. Issue 13 found it was silently dropped (a W gradient off by up
to 32 on a CosFace gradient penalty). Now a backward that builds a graph recomputes the primitive on
the plain path and differentiates that (torch_port/chunked.py, ``_differentiable_backward``), so:

- for every margin loss of the registry, the gradient of ``loss + |dloss/dx|^2`` on the chunked
  path equals the plain path's (plain = ordinary autograd, differentiable to any order), with a
  fixed or a learnable scale, with labels of -1 (the primitive's absent targets);
- ``gradgradcheck`` (central differences of the first derivative, a route independent of both
  paths) passes on the chunked path;
- the sharded path, whose collectives autograd cannot see through, refuses a second derivative
  with a clear error (before any collective of the backward, so every rank raises: no hang).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.registry import RECORDS
from tests.tolerances import PATH_AGREEMENT, Tol, assert_close
from torch_port.engine import lse_and_target, margin_cross_entropy

MARGIN_RECORDS = [record for record in RECORDS if record.config is not None]
REPO = Path(__file__).resolve().parents[1]


def penalised_grads(x, W, y, config, chunk_size, learnable: bool):
    """d/d(x, W[, s]) of loss + |d loss / d x|^2, from fresh float64 leaves."""
    x = x.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    leaves = [x, W]
    if learnable:
        scale = torch.tensor(8.0 if config.scale is None else float(config.scale), dtype=x.dtype, requires_grad=True)
        config = dataclasses.replace(config, scale=scale)
        leaves.append(scale)
    loss = margin_cross_entropy(x, W, y, config, "mean", chunk_size=chunk_size)
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    return torch.autograd.grad(loss + (dx**2).sum(), leaves)


@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
@settings(max_examples=15)
@given(data=st.data(), learnable=st.booleans())
def test_gradient_penalty_through_the_chunked_path_equals_plain(record, data, learnable):
    sample = data.draw(record.keyword_free_samples(), label="sample")
    x = torch.tensor(sample.tensors["x"])
    W = torch.tensor(sample.tensors["W"])
    y = torch.as_tensor(sample.labels["y"])
    chunk = data.draw(st.integers(1, W.shape[0] + 1), label="chunk_size")
    config = record.config(sample.kwargs)
    plain = penalised_grads(x, W, y, config, None, learnable)
    chunked = penalised_grads(x, W, y, config, chunk, learnable)
    tol = Tol(PATH_AGREEMENT["float64"].rtol, PATH_AGREEMENT["float64"].rtol)
    for name, a, b in zip(("dx", "dW", "ds"), chunked, plain):
        assert torch.isfinite(a).all(), name
        assert_close(a.numpy(), b.numpy(), tol, f"{record} chunk={chunk} {name}")


def test_the_issue_case():
    """The report's reproduction: CosFace, s = 16, chunk_size = 2, a gradient penalty on dx."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    W = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    y = torch.tensor([0, 1, 2, 3])
    from torch_port import functional as F

    grads = []
    for chunk in (None, 2):
        x_leaf, W_leaf = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss = F.cosface_loss(x_leaf, W_leaf, y, s=16, chunk_size=chunk)
        (dx,) = torch.autograd.grad(loss, x_leaf, create_graph=True)
        (loss + (dx**2).sum()).backward()
        grads.append(W_leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_absent_labels_under_a_second_derivative():
    """The primitive's two outputs with -1 labels, both cotangents non-trivial, chunked == plain."""
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    W0 = torch.randn(7, 4, dtype=torch.float64, generator=generator)
    y = torch.tensor([0, -1, 6, 3, -1])
    config = next(r for r in MARGIN_RECORDS if r.name == "arcface_loss")
    config = config.config(config.defaults)
    results = []
    for chunk in (None, 3):
        x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
        lse, target = lse_and_target(x, W, y, config, chunk)
        objective = (lse * torch.linspace(0.5, 1.5, 5)).sum() - (target * torch.linspace(2.0, 1.0, 5)).sum()
        dx, dW = torch.autograd.grad(objective, (x, W), create_graph=True)
        results.append(torch.autograd.grad((dx**2).sum() + (dW**3).sum(), (x, W)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["cosface_loss", "arcface_loss", "sphereface_loss"])
def test_gradgradcheck_on_the_chunked_path(name):
    """Central differences of the chunked path's first derivative: independent of the plain path."""
    record = next(r for r in MARGIN_RECORDS if r.name == name)
    config = record.config(record.defaults)
    if config.scale is not None:  # s = 64 makes the softmax saturate: a smaller s exercises every term
        config = dataclasses.replace(config, scale=4.0)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    W = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.tensor([0, 4, 2])

    def loss(x, W):
        return margin_cross_entropy(x, W, y, config, "none", chunk_size=2)

    assert torch.autograd.gradgradcheck(loss, (x, W))


SHARDED_SCRIPT = textwrap.dedent(
    """
    import datetime, socket, sys
    import torch, torch.distributed as dist
    from torch_port.distributed import sharded_margin_cross_entropy
    from torch_port.normalized import cosface_config

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    loss = sharded_margin_cross_entropy(x, W, torch.tensor([0, 1, 2, 3]), cosface_config(s=16.0, m=0.35),
                                    num_classes=5)
    (first,) = torch.autograd.grad(loss, W, retain_graph=True)  # first order: fine
    try:
        torch.autograd.grad(loss, x, create_graph=True)
    except RuntimeError as error:
        print("refused:", error)
        sys.exit(0)
    finally:
        dist.destroy_process_group()
    sys.exit("a second derivative went through the collectives without an error")
    """
)


def test_sharded_path_refuses_a_second_derivative():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "once-differentiable" in result.stdout
