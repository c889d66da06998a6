"""What a registry record is made of: samples (one call's arguments), error samples, the record.

A ``Sample`` names every argument, so the same sample calls ``refimpl.f(**args)`` and
``torch_port.functional.f(**args)``: the two packages share argument names by contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Sample:
    """One call: float arrays (the differentiable inputs), integer arrays, scalar hyperparameters."""

    tensors: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # Input dtypes the stability suite does not run this sample in, each with the reason (e.g. a
    # gradient that exceeds the dtype's range by the mathematics of the loss, not by a bug).
    skip_dtypes: dict[str, str] = field(default_factory=dict)

    def numpy_args(self, **extra) -> dict[str, Any]:
        return {**{k: np.array(v) for k, v in self.tensors.items()}, **self.labels, **self.kwargs, **extra}

    def torch_tensors(self, dtype: str = "float64", requires_grad: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in self.tensors.items():
            t = torch.tensor(value, dtype=TORCH_DTYPES[dtype])
            out[name] = t.requires_grad_(requires_grad)
        return out

    def torch_args(self, tensors: dict[str, torch.Tensor], **extra) -> dict[str, Any]:
        labels = {k: torch.as_tensor(v) for k, v in self.labels.items()}
        return {**tensors, **labels, **torch_kwargs(self.kwargs), **extra}

    def rounded_to(self, dtype: str) -> Sample:
        """The same sample with float inputs rounded to ``dtype`` (and back to float64)."""
        rounded = {k: torch.tensor(v, dtype=TORCH_DTYPES[dtype]).double().numpy() for k, v in self.tensors.items()}
        return Sample(rounded, self.labels, self.kwargs, self.note, skip_dtypes=self.skip_dtypes)

    def __repr__(self) -> str:  # a failure prints a snippet that rebuilds the sample
        def arr(a):
            return f"np.array({np.asarray(a).tolist()!r})"

        parts = [f"{k}={arr(v)}" for k, v in {**self.tensors, **self.labels}.items()]
        parts += [f"{k}={arr(v) if isinstance(v, np.ndarray) else repr(v)}" for k, v in self.kwargs.items()]
        return f"Sample({', '.join(parts)})" + (f"  # {self.note}" if self.note else "")


def torch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters for the port: a float NumPy array (a per-sample margin, one entry per row of
    the batch; the reference takes it as it is) becomes a float64 tensor, anything else stays."""
    return {
        k: torch.tensor(v, dtype=torch.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
        for k, v in kwargs.items()
    }


def config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A sample's hyperparameters as a configuration builder takes them: ``ignore_index`` is the
    engine's call's, not the configuration's (dropped); per-sample margins become tensors."""
    return {k: v for k, v in torch_kwargs(kwargs).items() if k != "ignore_index"}


def has_row_arrays(kwargs: dict[str, Any]) -> bool:
    """True when some hyperparameter is a per-sample (B,) array (a head cannot take it)."""
    return any(isinstance(v, np.ndarray) for v in kwargs.values())


@dataclass(frozen=True)
class ErrorSample:
    """A bad call: the exception type and a regex its message must match (the argument's name)."""

    sample: Sample
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class LossRecord:
    """Everything the tests need to know about one function.

    name: the function's name in both ``refimpl`` and ``torch_port.functional``.
    reference, port: the two implementations.
    samples: a Hypothesis strategy of valid ``Sample``s (inputs and hyperparameters drawn together).
    edge_cases: extreme and degenerate samples on which values and gradients must stay finite.
    error_inputs: bad calls, each with the error expected.
    reductions: the reductions the function takes; () for functions without ``reduction``.
    tolerances: overrides of tests/tolerances.py, keyed by (kind, dtype).
    skips: suite name -> the reason that suite does not apply.

    For the margin losses, which the engine computes on more than one path:

    paths: the routes of tests/paths.py the shared suites run this function on ("plain" is the
        port called as it is; the chunked and sharded paths need ``config``).
    config: a sample's hyperparameters (``Sample.kwargs``) -> the engine's ``MarginConfig`` of the
        same loss, from the port's ``*_config`` builders (the sharded path and engine tests use it).
    head: ``head(kwargs, num_classes, dim, **options)`` -> the nn.Module head of the same loss with
        those hyperparameters (options: reduction, chunk_size, dtype, and head-specific ones).
    defaults: hyperparameters for tests that need one fixed configuration of the loss (the papers'
        values, as the API contract in docs/design.md lists them).
    base_samples: the samples without margin_grad, ignored rows and per-sample margins (None: the
        record draws none of them); see :meth:`keyword_free_samples`.
    """

    name: str
    reference: Callable[..., Any]
    port: Callable[..., Any]
    samples: st.SearchStrategy[Sample]
    edge_cases: Callable[[], list[Sample]]
    error_inputs: Callable[[], list[ErrorSample]]
    reductions: tuple[str, ...] = ("mean", "sum", "none")
    tolerances: dict[tuple[str, str], Any] = field(default_factory=dict)
    skips: dict[str, str] = field(default_factory=dict)
    paths: tuple[str, ...] = ("plain",)
    config: Callable[[dict[str, Any]], Any] | None = None
    head: Callable[..., Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    base_samples: st.SearchStrategy[Sample] | None = None

    def keyword_free_samples(self) -> st.SearchStrategy[Sample]:
        """Samples without the keywords every margin loss takes (``margin_grad``, ignored rows,
        per-sample margins): for tests of other properties that build their own batch from a
        sample's hyperparameters or take central differences. ``samples`` when there are none."""
        return self.samples if self.base_samples is None else self.base_samples

    @property
    def rows_per_class(self) -> int:
        """W's rows per class at the defaults (sub-centres: k); tests that build W as (C, D) need 1."""
        return self.defaults.get("k", 1)

    def __repr__(self) -> str:
        return self.name
