"""The demo's figures: per loss, the held-out features and their directions on the unit circle (or sphere).

Each loss is a pair of panels under one caption (the loss, its settings and its held-out accuracy):
the features themselves, and their directions (each feature divided by its norm) with a spoke from
the origin to each class's mean direction. Every panel has axis labels; a legend at the bottom
gives the class colours and what a spoke is. :func:`loss_figure` and :func:`grid_figure` build the
figures (for inspection), :func:`save_loss_figure` and :func:`save_grid` write and close them.

The open set has one figure, :func:`roc_figure` (written by :func:`save_roc_figure`): one panel, one
ROC curve per loss, FAR on a log axis.

matplotlib is imported when the first figure is drawn, not with this module.
"""

from __future__ import annotations

import importlib
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from torch_port.demo.extras import require
from torch_port.demo.metrics import unit_vectors
from torch_port.demo.training import LossResult
from torch_port.demo.verification import FAR_GRID, FAR_TARGET

TICK_SIZE = 8  # points: tick labels stay legible in the grid as the guide shows it
LABEL_SIZE = 9
FEATURE_AXES = ("feature 1", "feature 2", "feature 3")
DIRECTION_AXES = (r"$x_1/\|x\|$", r"$x_2/\|x\|$", r"$x_3/\|x\|$")
FEATURES_TITLE = "held-out features\n(the network's output)"
SPOKE_LABEL = "spoke: a class's mean direction"
SPOKE_COLOR = "0.3"
PAIR_WIDTH = 8.5  # inches per loss in the grid
# inches: the legend's one row is about 7.6 in wide at LABEL_SIZE, and constrained layout gives up
# (the captions then overlap the panels) unless the figure is wider than that with some room
MIN_WIDTH = 9.5


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # files only: no display needed, and no window pops up
    return importlib.import_module("matplotlib.pyplot")


def _colors(labels: np.ndarray) -> np.ndarray:
    """tab10 colours by class (RGBA rows); classes beyond 10 reuse them."""
    return _pyplot().get_cmap("tab10")(np.asarray(labels) % 10)


def pair_caption(result: LossResult) -> str:
    """The caption over a loss's two panels: the loss, its settings and its held-out accuracy."""
    settings = "" if result.settings == "-" else f" ({result.settings})"
    return f"{result.title}{settings}: held-out accuracy {result.accuracy:.1f}%"


def _direction_title(result: LossResult, dim: int) -> str:
    surface = "sphere" if dim == 3 else "circle"
    return (
        f"directions on the unit {surface}\nintra-class {result.intra_class_angle_deg:.1f}°, "
        f"closest centres {result.min_center_angle_deg:.1f}° apart"
    )


def _label_axes(ax, names: Sequence[str]) -> None:
    ax.set_xlabel(names[0], fontsize=LABEL_SIZE, labelpad=1)
    ax.set_ylabel(names[1], fontsize=LABEL_SIZE, labelpad=1)
    if len(names) > 2:
        ax.set_zlabel(names[2], fontsize=LABEL_SIZE, labelpad=1)
    ax.tick_params(labelsize=TICK_SIZE, pad=1)


def _draw_2d(ax_features, ax_directions, result: LossResult) -> None:
    """The features in the plane, and their directions on the unit circle with each class's mean."""
    ticker = importlib.import_module("matplotlib.ticker")
    colors = _colors(result.labels)
    x = result.features
    ax_features.scatter(x[:, 0], x[:, 1], c=colors, s=5, alpha=0.7, linewidths=0)
    extent = float(np.abs(x).max()) * 1.05 or 1.0
    ax_features.set_xlim(-extent, extent)
    ax_features.set_ylim(-extent, extent)
    ax_features.set_aspect("equal")
    ax_features.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax_features.axvline(0, color="0.85", lw=0.5, zorder=0)
    for axis in (ax_features.xaxis, ax_features.yaxis):
        axis.set_major_locator(ticker.MaxNLocator(nbins=4, symmetric=True))
    ax_features.set_title(FEATURES_TITLE, fontsize=LABEL_SIZE + 1)
    _label_axes(ax_features, FEATURE_AXES[:2])

    units = unit_vectors(x)
    circle = np.linspace(0, 2 * np.pi, 361)
    ax_directions.plot(np.cos(circle), np.sin(circle), color="0.8", lw=0.8, zorder=0)
    ax_directions.scatter(units[:, 0], units[:, 1], c=colors, s=6, alpha=0.5, linewidths=0)
    for k, center in zip(result_classes(result), result.centers):
        ax_directions.plot([0, center[0]], [0, center[1]], color=_colors(np.array([k]))[0], lw=1.0)
        ax_directions.text(1.2 * center[0], 1.2 * center[1], str(k), ha="center", va="center", fontsize=LABEL_SIZE)
    ax_directions.set_xlim(-1.35, 1.35)
    ax_directions.set_ylim(-1.35, 1.35)
    ax_directions.set_xticks([-1, 0, 1])
    ax_directions.set_yticks([-1, 0, 1])
    ax_directions.set_aspect("equal")
    ax_directions.set_title(_direction_title(result, 2), fontsize=LABEL_SIZE + 1)
    _label_axes(ax_directions, DIRECTION_AXES[:2])


def _draw_3d(ax_features, ax_directions, result: LossResult) -> None:
    """The features in space, and their directions on the unit sphere with each class's mean."""
    colors = _colors(result.labels)
    x = result.features
    ax_features.scatter(x[:, 0], x[:, 1], x[:, 2], c=colors, s=4, alpha=0.7, linewidths=0)
    extent = float(np.abs(x).max()) * 1.05 or 1.0
    for set_limits in (ax_features.set_xlim, ax_features.set_ylim, ax_features.set_zlim):
        set_limits(-extent, extent)
    ax_features.set_box_aspect((1, 1, 1))
    ax_features.set_title(FEATURES_TITLE, fontsize=LABEL_SIZE + 1)
    _label_axes(ax_features, FEATURE_AXES)

    units = unit_vectors(x)
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
    ax_directions.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", linewidth=0.4)
    ax_directions.scatter(units[:, 0], units[:, 1], units[:, 2], c=colors, s=4, alpha=0.6, linewidths=0)
    for k, center in zip(result_classes(result), result.centers):
        ax_directions.plot(*np.stack([np.zeros(3), center], axis=1), color=_colors(np.array([k]))[0], lw=1.0)
        ax_directions.text(*(1.2 * center), str(k), fontsize=LABEL_SIZE)
    ax_directions.set_box_aspect((1, 1, 1))
    for set_ticks in (ax_directions.set_xticks, ax_directions.set_yticks, ax_directions.set_zticks):
        set_ticks([-1, 0, 1])
    ax_directions.set_title(_direction_title(result, 3), fontsize=LABEL_SIZE + 1)
    _label_axes(ax_directions, DIRECTION_AXES)


def result_classes(result: LossResult) -> np.ndarray:
    """The classes present among the held-out labels, in the order of ``result.centers``."""
    return np.unique(result.labels)


def _draw_pair(holder, result: LossResult, dim: int) -> None:
    """A loss's two panels (features, directions) in ``holder`` (a figure or subfigure), captioned."""
    kwargs = {"projection": "3d"} if dim == 3 else {}
    axes = (holder.add_subplot(1, 2, 1, **kwargs), holder.add_subplot(1, 2, 2, **kwargs))
    (_draw_3d if dim == 3 else _draw_2d)(*axes, result)
    holder.suptitle(pair_caption(result), fontsize=LABEL_SIZE + 2, fontweight="bold")


def _legend(fig, num_classes: int) -> None:
    """Below the panels: the class colours, and what a spoke is."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=cmap(k % 10), label=str(k)) for k in range(num_classes)
    ]
    handles.append(plt.Line2D([], [], color=SPOKE_COLOR, lw=1.5, label=SPOKE_LABEL))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=len(handles),
        fontsize=LABEL_SIZE,
        frameon=False,
        title="class (colour of its features and of its spoke)",
        title_fontsize=LABEL_SIZE,
        columnspacing=1.2,
        handletextpad=0.3,
    )


def loss_figure(result: LossResult, dim: int):
    """One loss: its held-out features, and their directions on the unit circle (or sphere)."""
    fig = _pyplot().figure(figsize=(MIN_WIDTH, 4.9), layout="constrained")
    _draw_pair(fig, result, dim)
    _legend(fig, int(result.labels.max()) + 1)
    return fig


def grid_figure(results: Sequence[LossResult], dim: int, caption: str):
    """All losses in one figure: two losses (four panels) per row, each pair under its own caption."""
    per_row = min(2, len(results))
    rows = math.ceil(len(results) / per_row)
    width = max(PAIR_WIDTH * per_row, MIN_WIDTH)
    fig = _pyplot().figure(figsize=(width, 4.6 * rows + 1.0), layout="constrained")
    holders = np.asarray(fig.subfigures(rows, per_row, wspace=0.03, hspace=0.03)).reshape(-1)
    for holder, result in zip(holders, results):
        _draw_pair(holder, result, dim)
    # wrapped to the figure's width (about 9 characters an inch at this size): a wider title would
    # make constrained layout give up, as a wider legend would
    fig.suptitle(textwrap.fill(caption, width=int(9 * width)), fontsize=LABEL_SIZE + 3)
    _legend(fig, max(int(r.labels.max()) for r in results) + 1)
    return fig


def save_loss_figure(result: LossResult, path: Path, dim: int) -> None:
    """Write :func:`loss_figure` to ``path`` (PNG) and close it."""
    fig = loss_figure(result, dim)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def save_grid(results: Sequence[LossResult], path: Path, dim: int, caption: str) -> None:
    """Write :func:`grid_figure` to ``path`` (PNG) and close it."""
    fig = grid_figure(results, dim, caption)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)


ROC_FAR_LABEL = "false accept rate (FAR): share of impostor pairs accepted"
ROC_TAR_LABEL = "true accept rate (TAR): share of genuine pairs accepted"


def roc_curve_of(result: LossResult) -> np.ndarray:
    """The TAR at each FAR of :data:`FAR_GRID`: the loss's one rotation, or the mean over its rotations
    at each FAR (vertical averaging: each rotation is its own network, so their scores do not pool)."""
    return np.mean([rotation.verification.roc_tar for rotation in result.open_set], axis=0)


def roc_legend_label(result: LossResult) -> str:
    """The loss and its AUC, as the legend gives them (the mean over the rotations drawn)."""
    auc = np.mean([rotation.verification.auc for rotation in result.open_set])
    return f"{result.title} (AUC {100 * auc:.1f}%)"


def roc_figure(results: Sequence[LossResult], caption: str):
    """The open set's ROC curves: one panel, a curve per loss (those with an open set), FAR on a log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(MIN_WIDTH * 0.75, 7.0), layout="constrained")
    drawn = [result for result in results if result.open_set]
    cmap = plt.get_cmap("tab10")
    for index, result in enumerate(drawn):
        # ten colours, then the same ten dashed: the demo may grow past ten losses
        ax.plot(
            FAR_GRID, roc_curve_of(result), color=cmap(index % 10), linestyle=("-", "--", ":")[index // 10 % 3],
            lw=1.4, label=roc_legend_label(result),
        )  # fmt: skip
    ax.plot(FAR_GRID, FAR_GRID, color="0.6", lw=0.8, linestyle=":", label="chance (TAR = FAR)")
    ax.axvline(FAR_TARGET, color="0.75", lw=0.8, zorder=0)
    ax.text(FAR_TARGET, 0.99, f" FAR = {FAR_TARGET:g}", fontsize=TICK_SIZE, color="0.4", va="top")
    ax.set_xscale("log")
    ax.set_xlim(FAR_GRID[0], 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel(ROC_FAR_LABEL, fontsize=LABEL_SIZE)
    ax.set_ylabel(ROC_TAR_LABEL, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, which="major", color="0.92", lw=0.6)
    # below the panel, not on it: the curves may pass through any corner
    fig.legend(loc="outside lower center", ncol=3, fontsize=LABEL_SIZE, frameon=False, columnspacing=1.2)
    ax.set_title(textwrap.fill(caption, width=80), fontsize=LABEL_SIZE + 1)
    return fig


def save_roc_figure(results: Sequence[LossResult], path: Path, caption: str) -> None:
    """Write :func:`roc_figure` to ``path`` (PNG) and close it."""
    fig = roc_figure(results, caption)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
