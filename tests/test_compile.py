"""torch.compile of the engine: the compiled step gives eager's values and gradients.

Under autocast, torch 2.13 traces a compiled backward under the autocast of the forward's caller
(``torch._functorch.config.backward_pass_autocast = "same_as_forward"``), while eager runs the
backward of each operation in the dtype its forward ran in. The engine computes in float32 with
autocast disabled, so before ``geometry.cosines`` the compiled backward put the (B, C) products in
bfloat16: gradients 2.6e-3 from eager's (issue 13, item 16). Here the compiled gradients must match
eager's to float32 rounding, under bfloat16 autocast, for configurations of every kind (a margin
with a fallback, weight and feature norms, a learnable scale).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dispatch_probe import HostReads
from tests.registry import BY_NAME, RECORDS
from torch_port import ArcFace, ElasticArcFace, ElasticCosFace
from torch_port import functional as F
from torch_port.engine import margin_cross_entropy
from torch_port.tensor_checks import set_value_checks

# Each compilation takes seconds on CI's two cores: one record of each kind of configuration.
AUTOCAST_RECORDS = ["arcface_loss", "lsoftmax_loss", "normface_loss"]


def step(x, W, y, config):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return margin_cross_entropy(x, W, y, config)


def loss_and_grads(fn, x, W, y, config):
    leaves = [x.clone().requires_grad_(), W.clone().requires_grad_()]
    if isinstance(config.scale, torch.Tensor):
        leaves.append(config.scale.clone().requires_grad_())
        config = dataclasses.replace(config, scale=leaves[-1])
    loss = fn(*leaves[:2], y, config)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("name", AUTOCAST_RECORDS)
def test_compiled_step_under_autocast_matches_eager(name):
    record = BY_NAME[name]
    config = record.config(record.defaults)
    if name == "normface_loss":
        config = dataclasses.replace(config, scale=torch.tensor(16.0))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=generator)
    W = torch.randn(100, 32, generator=generator)
    y = torch.randint(0, 100, (16,), generator=generator)
    torch._dynamo.reset()
    eager_loss, eager_grads = loss_and_grads(step, x, W, y, config)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(step), x, W, y, config)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for eager, compiled in zip(eager_grads, compiled_grads):
        assert compiled.dtype == eager.dtype == torch.float32
        # float32 rounding of a different operation order, relative to the gradient's size; the
        # bfloat16 products this guards against differ by 1e-3 relative.
        scale = float(eager.abs().max())
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * scale)


# --- fullgraph: no graph break, no host read (issue 14) -------------------------------------------

HEAD_RECORDS = [record for record in RECORDS if record.head is not None]
LOSS_RECORDS = [record for record in RECORDS if record.config is not None and record.name.endswith("_loss")]


def compiled_without_breaks(fn):
    """fn compiled with fullgraph=True (a graph break is an error) on the aot_eager backend, which
    traces forward and backward like inductor but skips code generation (seconds less per case)."""
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def problem(seed: int = 0, batch: int = 8, classes: int = 10, dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=generator)
    W = torch.randn(classes, dim, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, W, y


def eager_and_compiled(build):
    """(eager, head, compiled): two heads built from the same seed, the second compiled without
    graph breaks (compiled_without_breaks) after a reset of Dynamo's caches."""
    torch.manual_seed(0)
    eager = build()
    torch.manual_seed(0)
    head = build()
    torch._dynamo.reset()
    return eager, head, compiled_without_breaks(head)


def assert_training_steps_match(eager, compiled, x, y, steps: int = 2):
    """``steps`` training steps of each on copies of x: the same losses and x-gradients."""
    for _ in range(steps):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, got = eager(xe, y), compiled(xc, y)
        expected.backward()
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("record", HEAD_RECORDS, ids=str)
def test_every_head_compiles_with_fullgraph(record):
    """Two training steps of the head compiled with fullgraph=True give eager's losses, gradients and
    state (the annealing schedules advance inside the compiled step)."""
    x, _, y = problem()
    eager, head, compiled = eager_and_compiled(lambda: record.head(record.defaults, 10, 16))
    assert_training_steps_match(eager, compiled, x, y)
    for (name, a), (_, b) in zip(head.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), (_, b) in zip(head.named_buffers(), eager.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("record", LOSS_RECORDS, ids=str)
def test_every_functional_margin_loss_compiles_with_fullgraph(record):
    x, W, y = problem(1, classes=10 * record.rows_per_class)  # sub-centres: k rows per class
    kwargs = record.defaults
    y = y % 10

    def loss(x, W, y):
        return record.port(x=x, W=W, y=y, **kwargs)

    torch._dynamo.reset()
    results = []
    for fn in (loss, compiled_without_breaks(loss)):
        leaves = (x.clone().requires_grad_(), W.clone().requires_grad_())
        value = fn(*leaves, y)
        results.append((value.detach(), torch.autograd.grad(value, leaves)))
    (expected, expected_grads), (got, grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_labels_out_of_range_are_caught_inside_a_compiled_step():
    """The range check becomes a device-side assertion under torch.compile: still an error, with
    the argument named, rather than a graph break (or, for a label of -2, a silently absent target).
    A label of -1 (ignore_index) is skipped inside the graph as in eager code."""
    x, W, _ = problem(2)

    def loss(x, W, y):
        return F.arcface_loss(x, W, y)

    torch._dynamo.reset()
    compiled = compiled_without_breaks(loss)
    assert torch.isfinite(compiled(x, W, torch.zeros(8, dtype=torch.int64)))
    ignored = torch.arange(8) % 10
    ignored[[2, 5]] = -1
    torch.testing.assert_close(compiled(x, W, ignored), loss(x, W, ignored))
    for bad in (10, -2):
        y = torch.zeros(8, dtype=torch.int64)
        y[3] = bad
        with pytest.raises(RuntimeError, match=r"y must lie in \[0, 10\)"):
            compiled(x, W, y)


@pytest.mark.parametrize("mode", ["host", "device"])
def test_value_check_modes(mode):
    """"host" reads the range (ValueError with the values found); "device" asserts without a read
    (on the CPU the assertion fails at once, as a RuntimeError)."""
    x, W, _ = problem(3)
    y = torch.full((8,), 12)
    previous = set_value_checks(mode)
    try:
        error, message = (ValueError, r"got values in \[12, 12\]") if mode == "host" else (RuntimeError, "device-side")
        with pytest.raises(error, match=message):
            F.cosface_loss(x, W, y)
        with pytest.raises(error, match=message):
            F.cosface_loss(x, W, y, chunk_size=4)
    finally:
        set_value_checks(previous)
    with pytest.raises(ValueError, match="mode must be one of"):
        set_value_checks("never")


def test_device_checks_read_nothing_back():
    """With device-side checks (what torch.compile and accelerators get) the plain path's step reads
    nothing back to the host: no synchronisation on a GPU."""
    x, W, y = problem(4)
    W.requires_grad_()
    scale = torch.tensor(16.0, requires_grad=True)
    previous = set_value_checks("device")
    try:
        with HostReads() as probe:
            F.normface_loss(x, W, y, s=scale).backward()
            F.arcface_loss(x, W, y).backward()
    finally:
        set_value_checks(previous)
    assert probe.count == 0


@pytest.mark.parametrize("name", ["CurricularFace", "AdaFace", "MagFace"])
def test_the_stateful_heads_compile_with_fullgraph_and_move_their_statistics(name):
    """The registry builds these heads with their statistics held (momentum 0); here with the heads'
    own momentum: two compiled training steps move the statistics (torch.where, no host read) as
    eager does, with eager's losses and gradients."""
    import torch_port

    x, _, y = problem(5)
    x = x * torch.linspace(1.0, 40.0, 8)[:, None]
    y[2] = -1
    eager, head, compiled = eager_and_compiled(lambda: getattr(torch_port, name)(10, 16))
    start = {k: v.clone() for k, v in head.named_buffers()}
    assert_training_steps_match(eager, compiled, x, y)
    for (key, a), (_, b) in zip(head.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
        assert not torch.equal(a, start[key]), f"{key} did not move"


# --- the heads of issue 15: per-class margins, ElasticFace's draws --------------------------------


def test_a_per_class_arcface_head_compiles_with_fullgraph():
    """ArcFace with a (C,) buffer of per-class margins: the margins looked up by label inside the
    compiled step, eager's losses and gradients."""
    x, _, y = problem(5)
    margins = torch.linspace(0.1, 0.6, 10)
    eager, head, compiled = eager_and_compiled(lambda: ArcFace(10, 16, m=margins))
    assert_training_steps_match(eager, compiled, x, y)
    torch.testing.assert_close(head.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)


ELASTIC_HEADS = {"ElasticArcFace": ElasticArcFace, "ElasticCosFace": ElasticCosFace}


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
@pytest.mark.parametrize("name", sorted(ELASTIC_HEADS))
def test_elastic_heads_compile_with_fullgraph(name, plus):
    """A training step of ElasticArcFace / ElasticCosFace (the per-sample draw from torch's global
    generator inside) compiles with fullgraph=True and draws what eager draws from the same seed;
    the compiled eval step is eager's."""
    x, _, y = problem(6)
    eager, head, compiled = eager_and_compiled(lambda: ELASTIC_HEADS[name](10, 16, plus=plus))
    torch.manual_seed(7)
    loss = compiled(x.clone().requires_grad_(), y)
    torch.manual_seed(7)
    torch.testing.assert_close(loss, eager(x, y), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(head.weight.grad).all()
    head.eval()
    torch.testing.assert_close(compiled(x, y), head(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ELASTIC_HEADS))
def test_elastic_heads_with_a_generator_compile_with_one_graph_break(name):
    """With a generator of its own the draw runs outside the graph (Dynamo cannot trace a
    torch.Generator): the graph breaks at the draw and nowhere else (Dynamo counts the break once in
    each frame of the call, forward -> forward_config -> draw_margins), and the compiled step draws
    what eager draws from the same generator state."""
    x, _, y = problem(6)
    heads = []
    for _ in range(2):
        torch.manual_seed(0)
        heads.append(ELASTIC_HEADS[name](10, 16, generator=torch.Generator().manual_seed(3)))
    eager, head = heads
    torch._dynamo.reset()
    explained = torch._dynamo.explain(head)(x, y)
    reasons = [str(reason) for reason in explained.break_reasons]
    assert reasons and all("draw_margins" in reason and "disable" in reason for reason in reasons), reasons
    head.generator.manual_seed(3)
    compiled = torch.compile(head, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-5, atol=1e-5)
