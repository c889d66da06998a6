"""The network every loss trains: flattened pixels to a low-dimensional feature."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from torch_port.demo.settings import HIDDEN_SIZES


class EmbeddingNet(nn.Module):
    """A small perceptron from flattened pixels to a ``dim``-dimensional feature.

    The last layer is linear with no activation, so features may point anywhere: what the loss
    makes of that freedom (radial spread for softmax, angular clusters for the margins) is the demo.
    """

    def __init__(self, in_features: int, dim: int, hidden: Sequence[int] = HIDDEN_SIZES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
