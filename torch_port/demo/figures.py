"""The demo's figures: per loss, the held-out features and their directions on the unit circle (or sphere).

matplotlib is imported when the first figure is drawn, not with this module.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from torch_port.demo.extras import require
from torch_port.demo.metrics import unit_vectors
from torch_port.demo.training import LossResult


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # files only: no display needed, and no window pops up
    return importlib.import_module("matplotlib.pyplot")


def _colors(labels: np.ndarray) -> np.ndarray:
    """tab10 colours by class (RGBA rows); classes beyond 10 reuse them."""
    return _pyplot().get_cmap("tab10")(np.asarray(labels) % 10)


def _direction_title(result: LossResult) -> str:
    return (
        f"directions: acc {result.accuracy:.1f}%\nintra {result.intra_class_angle_deg:.1f}°, "
        f"min gap {result.min_center_angle_deg:.1f}°"
    )


def _draw_2d(ax_features, ax_directions, result: LossResult) -> None:
    """The features in the plane, and their directions on the unit circle with each class's mean."""
    colors = _colors(result.labels)
    x = result.features
    ax_features.scatter(x[:, 0], x[:, 1], c=colors, s=5, alpha=0.7, linewidths=0)
    extent = float(np.abs(x).max()) * 1.05 or 1.0
    ax_features.set_xlim(-extent, extent)
    ax_features.set_ylim(-extent, extent)
    ax_features.set_aspect("equal")
    ax_features.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax_features.axvline(0, color="0.85", lw=0.5, zorder=0)
    ax_features.set_title(f"{result.title}  ({result.settings})\nfeatures", fontsize=9)

    units = unit_vectors(x)
    circle = np.linspace(0, 2 * np.pi, 361)
    ax_directions.plot(np.cos(circle), np.sin(circle), color="0.8", lw=0.8, zorder=0)
    ax_directions.scatter(units[:, 0], units[:, 1], c=colors, s=6, alpha=0.5, linewidths=0)
    for k, center in zip(np.unique(result.labels), result.centers):
        ax_directions.plot([0, center[0]], [0, center[1]], color=_colors(np.array([k]))[0], lw=0.8)
        ax_directions.text(1.18 * center[0], 1.18 * center[1], str(k), ha="center", va="center", fontsize=7)
    ax_directions.set_xlim(-1.35, 1.35)
    ax_directions.set_ylim(-1.35, 1.35)
    ax_directions.set_aspect("equal")
    ax_directions.set_title(_direction_title(result), fontsize=9)
    for ax in (ax_features, ax_directions):
        ax.tick_params(labelsize=6)


def _draw_3d(ax_features, ax_directions, result: LossResult) -> None:
    """The features in space, and their directions on the unit sphere with each class's label."""
    colors = _colors(result.labels)
    x = result.features
    ax_features.scatter(x[:, 0], x[:, 1], x[:, 2], c=colors, s=4, alpha=0.7, linewidths=0)
    extent = float(np.abs(x).max()) * 1.05 or 1.0
    for set_limits in (ax_features.set_xlim, ax_features.set_ylim, ax_features.set_zlim):
        set_limits(-extent, extent)
    ax_features.set_box_aspect((1, 1, 1))
    ax_features.set_title(f"{result.title}  ({result.settings})\nfeatures", fontsize=9)

    units = unit_vectors(x)
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
    ax_directions.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", linewidth=0.4)
    ax_directions.scatter(units[:, 0], units[:, 1], units[:, 2], c=colors, s=4, alpha=0.6, linewidths=0)
    for k, center in zip(np.unique(result.labels), result.centers):
        ax_directions.text(*(1.2 * center), str(k), fontsize=7)
    ax_directions.set_box_aspect((1, 1, 1))
    # the sphere has radius 1 by construction: its tick labels would only add clutter
    ax_directions.set_xticklabels([])
    ax_directions.set_yticklabels([])
    ax_directions.set_zticklabels([])
    ax_directions.set_title(_direction_title(result), fontsize=9)
    for ax in (ax_features, ax_directions):
        ax.tick_params(labelsize=6)


def _panel_pair(fig, rows: int, cols: int, index: int, dim: int):
    """The two axes (features, directions) of the ``index``-th loss in a rows x cols grid."""
    kwargs = {"projection": "3d"} if dim == 3 else {}
    return (
        fig.add_subplot(rows, cols, 2 * index + 1, **kwargs),
        fig.add_subplot(rows, cols, 2 * index + 2, **kwargs),
    )


def _legend(fig, num_classes: int) -> None:
    """One row of class colours along the bottom of the figure."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=cmap(k % 10), label=str(k)) for k in range(num_classes)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=num_classes, fontsize=8, frameon=False, title="class")


def save_loss_figure(result: LossResult, path: Path, dim: int) -> None:
    """One loss: its held-out features, and their directions on the unit circle (or sphere)."""
    plt = _pyplot()
    fig = plt.figure(figsize=(8, 4.3))
    axes = _panel_pair(fig, 1, 2, 0, dim)
    (_draw_3d if dim == 3 else _draw_2d)(*axes, result)
    _legend(fig, int(result.labels.max()) + 1)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def save_grid(results: Sequence[LossResult], path: Path, dim: int, caption: str) -> None:
    """All losses in one image: two losses (four panels) per row."""
    plt = _pyplot()
    per_row = min(2, len(results))
    rows = math.ceil(len(results) / per_row)
    fig = plt.figure(figsize=(4 * 2 * per_row, 4.1 * rows + 0.8))
    for index, result in enumerate(results):
        axes = _panel_pair(fig, rows, 2 * per_row, index, dim)
        (_draw_3d if dim == 3 else _draw_2d)(*axes, result)
    fig.suptitle(caption, fontsize=11)
    _legend(fig, max(int(r.labels.max()) for r in results) + 1)
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
