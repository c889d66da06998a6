"""The L-Softmax and SphereFace heads, and the annealing schedule they train with.

Both multiplicative margins are too hard to train from scratch (the target logit of a random
feature is near 1 - 2m), so the released code blends the margin target with the plain one,
(w cos + psi) / (1 + w), and lowers w over the iterations:

    w(iteration) = max(minimum, base * (1 + gamma * iteration) ** (-power)).

:class:`MarginSchedule` is that rule as an ``nn.Module`` whose only state, the iteration count, is a
buffer, so ``state_dict()`` round-trips a run. Derivations: ``derivations/06-lsoftmax.md``,
``derivations/07-sphereface.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from softmax_common.checks import check_margin_grad, check_margin_multiplier, check_nonnegative, check_positive_int
from torch_port.angular import lsoftmax_config, sphereface_config
from torch_port.checkpoint_checks import AtomicLoad
from torch_port.engine import MarginConfig, margin_cross_entropy
from torch_port.heads import MarginHead
from torch_port.keyword_only import keyword_hyperparameters
from torch_port.margins import with_margin_grad


class MarginSchedule(AtomicLoad, nn.Module):
    r"""The annealing weight of L-Softmax (beta) and SphereFace (lambda), as in the released layers.

    .. math:: w(t) = \max\big(w_{\min},\ \mathrm{base}\,(1 + \gamma t)^{-\mathrm{power}}\big)

    ``t`` is the number of training forwards done so far (the buffer ``iteration``). A head reads
    :meth:`value` for its forward and then calls :meth:`step`, so the first training forward uses
    w(0) = base. (Caffe's margin layers add 1 to their counter before reading it, so their n-th
    forward uses w(n); ours uses w(n - 1), one step of a schedule that runs for thousands.)
    ``iteration`` starts where a fine-tuning run should resume (the released layers' ``iteration``
    parameter). ``load_state_dict`` checks the iteration (an integer >= 0) before it copies it.

    Args:
        base: w at iteration 0, >= 0.
        gamma: the decay rate, >= 0.
        power: the decay exponent, >= 0.
        minimum: the floor w never goes below (``lambda_min``), >= 0.
        iteration: the starting iteration, an integer >= 0 (default 0).

    References:
        Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016, section 5;
        the released ``LargeMarginInnerProduct`` / ``MarginInnerProduct`` caffe layers and prototxts.
    """

    iteration: torch.Tensor

    @keyword_hyperparameters
    def __init__(self, *, base: float, gamma: float, power: float, minimum: float = 0.0, iteration: int = 0) -> None:
        super().__init__()
        self.base = check_nonnegative(base, "base")
        self.gamma = check_nonnegative(gamma, "gamma")
        self.power = check_nonnegative(power, "power")
        self.minimum = check_nonnegative(minimum, "minimum")
        start = check_positive_int(iteration, "iteration", minimum=0)
        self.register_buffer("iteration", torch.tensor(start, dtype=torch.int64))

    @classmethod
    def lsoftmax(cls) -> MarginSchedule:
        """L-Softmax's released MNIST configuration: base 1000, gamma 2.5e-5, power 35, lambda_min 0."""
        return cls(base=1000.0, gamma=2.5e-5, power=35.0, minimum=0.0)

    @classmethod
    def sphereface(cls) -> MarginSchedule:
        """SphereFace's released configuration: base 1000, gamma 0.12, power 1, lambda_min 5."""
        return cls(base=1000.0, gamma=0.12, power=1.0, minimum=5.0)

    @classmethod
    def constant(cls, value: float) -> MarginSchedule:
        """A schedule that stays at ``value`` (0.0: the full margin from the first step)."""
        return cls(base=value, gamma=0.0, power=0.0, minimum=0.0)

    def check_state_values(self, state_dict, prefix: str) -> None:
        """A checkpoint's ``iteration`` must be an integer >= 0 (checked before anything is loaded)."""
        key = prefix + "iteration"
        if key in state_dict:
            check_positive_int(state_dict[key].item(), f"the checkpoint's {key!r}", minimum=0)

    def value_at(self, iteration: int) -> float:
        """w at a given iteration (the current one is :meth:`value`)."""
        iteration = check_positive_int(iteration, "iteration", minimum=0)
        return max(self.minimum, self.base * (1.0 + self.gamma * iteration) ** (-self.power))

    def value(self) -> float:
        """w at the current iteration (reads the buffer: one device synchronisation if it is on a GPU)."""
        return self.value_at(int(self.iteration))

    def weight(self) -> torch.Tensor:
        """w at the current iteration as a 0-d tensor on the buffer's device, computed there (float64,
        float32 on MPS): no host read, so a compiled step keeps one graph and a CUDA step never waits."""
        dtype = torch.float32 if self.iteration.device.type == "mps" else torch.float64
        t = self.iteration.detach().to(dtype)
        return torch.clamp_min(self.base * (1.0 + self.gamma * t) ** (-self.power), self.minimum)

    @torch.no_grad()
    def step(self) -> None:
        """Advance the iteration by one."""
        self.iteration.add_(1)

    def extra_repr(self) -> str:
        return f"base={self.base}, gamma={self.gamma}, power={self.power}, minimum={self.minimum}"


class _AnnealedMarginHead(MarginHead):
    """A margin head whose margin weight follows a :class:`MarginSchedule`.

    Training forward (training mode and autograd enabled): the loss of the margin logits with
    w = schedule.weight() (computed on the device), then the schedule advances by one, after the
    loss is computed, so a call that fails (bad labels, shapes) leaves it where it was. Any other
    forward (eval mode, or under ``torch.no_grad()``/``torch.inference_mode()``) does not advance it;
    in eval mode the loss is the cross-entropy of the margin-free logits, what a validation loss
    should measure. With gradient accumulation over k micro-batches the schedule advances k times
    per optimizer step: divide gamma by k to keep the released pace.
    """

    def __init__(self, num_classes, dim, m, schedule, *, margin_grad, reduction, chunk_size, ignore_index, **where):
        m, margin_grad = check_margin_multiplier(m), check_margin_grad(margin_grad)
        if not isinstance(schedule, MarginSchedule):
            raise TypeError(f"schedule must be a MarginSchedule, got {type(schedule).__name__}")
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        super().__init__(num_classes, dim, **options, **where)
        self.m, self.margin_grad = m, margin_grad
        self.schedule = schedule

    def _config(self, m: int, weight: float | torch.Tensor) -> MarginConfig:
        raise NotImplementedError

    def margin_config(self) -> MarginConfig:
        return with_margin_grad(self._config(self.m, self.schedule.weight()), self.margin_grad)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.check_features(x)
            config = self.inference_config()
            return margin_cross_entropy(x, self.weight, y, config, self.reduction, self.chunk_size, self.ignore_index)
        loss = super().forward(x, y)
        if torch.is_grad_enabled():
            self.schedule.step()
        return loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"


class LSoftmax(_AnnealedMarginHead):
    r"""L-Softmax head: logits :math:`W_j^\top x = \|W_j\|\|x\|\cos\theta_j`, the target's with the margin
    :math:`\|W_y\|\|x\| (\beta\cos\theta_y + \psi(\theta_y)) / (1 + \beta)`, beta from ``schedule``.

    ``forward(x, y)`` -> loss; ``logits(x)`` -> the margin-free logits W x (no bias) for inference.
    A training forward (training mode, autograd enabled) uses beta = ``schedule.weight()`` and then
    advances the schedule by one; in eval mode the loss is that of the margin-free logits, and
    neither eval mode nor ``torch.no_grad()`` advances the schedule.

    Initialisation: |W_j| enters the logits, so it matters: ``weight`` ~ N(0, 2/D) elementwise
    (``kaiming_normal_``, fan-in), the "msra" filler of the released MNIST prototxt.

    Args:
        num_classes: C >= 1. dim: D >= 1.
        m: the angular multiplier, an integer in [1, 16] (default 4).
        schedule: the beta schedule; None (the default) creates :meth:`MarginSchedule.lsoftmax`, the
            released MNIST one, new for each head (a shared default would share its counter).
        margin_grad: "exact" (default) or "detached" (torch_port/margins.py).
        reduction, chunk_size, ignore_index, device, dtype: as :class:`torch_port.heads.MarginHead`.

    References:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        m: int = 4,
        schedule: MarginSchedule | None = None,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        schedule = MarginSchedule.lsoftmax() if schedule is None else schedule
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        options.update(device=device, dtype=dtype)
        super().__init__(num_classes, dim, m=m, schedule=schedule, margin_grad=margin_grad, **options)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")

    def _config(self, m: int, weight: float | torch.Tensor) -> MarginConfig:
        return lsoftmax_config(m, weight)


class SphereFace(_AnnealedMarginHead):
    r"""SphereFace (A-Softmax) head: logits :math:`\|x\|\cos\theta_j` (W normalised, no bias), the target's
    :math:`\|x\| (\lambda\cos\theta_y + \psi(\theta_y)) / (1 + \lambda)`, lambda from ``schedule``.

    ``forward(x, y)`` -> loss; ``logits(x)`` -> the margin-free logits |x| cos theta_j for inference.
    A training forward (training mode, autograd enabled) uses lambda = ``schedule.weight()`` and then
    advances the schedule by one; in eval mode the loss is that of the margin-free logits, and
    neither eval mode nor ``torch.no_grad()`` advances the schedule.

    Initialisation: that of :class:`torch_port.heads.MarginHead` (only directions of W matter).

    Args:
        num_classes: C >= 1. dim: D >= 1.
        m: the angular multiplier, an integer in [1, 16] (default 4).
        schedule: the lambda schedule; None (the default) creates :meth:`MarginSchedule.sphereface`,
            the released one, new for each head.
        margin_grad: "exact" (default) or "detached" (torch_port/margins.py).
        reduction, chunk_size, ignore_index, device, dtype: as :class:`torch_port.heads.MarginHead`.

    References:
        Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        m: int = 4,
        schedule: MarginSchedule | None = None,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        schedule = MarginSchedule.sphereface() if schedule is None else schedule
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        options.update(device=device, dtype=dtype)
        super().__init__(num_classes, dim, m=m, schedule=schedule, margin_grad=margin_grad, **options)

    def _config(self, m: int, weight: float | torch.Tensor) -> MarginConfig:
        return sphereface_config(m, weight)


__all__ = ["LSoftmax", "MarginSchedule", "SphereFace"]
