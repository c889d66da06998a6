"""The main job: train a small network with each loss on real handwritten digits and show the geometry.

``python -m torch_port demo`` trains a small multilayer perceptron on the 1,797 8x8 digit images that
ship with scikit-learn (no download) to a 2-D (or 3-D) embedding, once per loss, and writes into
``--out``: one figure per loss (held-out features coloured by class, and their directions on the
unit circle), a grid of all of them, and a table (Markdown and CSV) of held-out accuracy, mean
intra-class angle, minimum angle between class centres and training time.

Everything about the training (network, optimiser, data) lives here, apart from the losses, which
are the package's own heads; the per-loss settings used for the 2-D/3-D demo are in
:data:`DEMO_SETTINGS`, in one place, because the papers' face-recognition defaults (s = 64 with
m = 0.5 for ArcFace, for instance) ask for more angular room than 10 classes in a plane offer.

Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm): ``pip install 'softmax-variants[demo]'``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softmax_common.checks import check_positive_int
from torch_port import AMSoftmax, ArcFace, CenterLoss, CosFace, LSoftmax, MarginSchedule, NormFace, SphereFace
from torch_port.functional import cross_entropy

# --------------------------------------------------------------------------------------------------
# The settings of each loss in the demo, all in one place. Keys are the names --loss accepts.
#
# Why not the papers' defaults: those are tuned for face recognition (thousands of classes in 512
# dimensions). Here 10 classes share a circle, 36 degrees each, so a margin must be well below the
# angular room a class has, and the scale only needs to allow a confident softmax over 10 classes:
# CosFace's bound (refimpl.cosface_min_scale(10, 0.99) = 6.1) asks for s >= 6.1 to reach p = 0.99.
# Within that, the values were picked by a small sweep on seeds 1 and 2: with m = 0.3, ArcFace and
# AM-Softmax sometimes trained two classes onto nearly the same direction.
# --------------------------------------------------------------------------------------------------
DEMO_SETTINGS: dict[str, dict] = {
    "softmax": {},
    "normface": {"s": 10.0},
    "cosface": {"s": 16.0, "m": 0.2},
    "am-softmax": {"s": 10.0, "m": 0.2},
    "arcface": {"s": 16.0, "m": 0.2},
    # SphereFace's released schedule: lambda = max(5, 1000 / (1 + 0.12 t)) reaches its floor of 5
    # after about 1,650 steps (75 epochs of the digits at 22 steps each).
    "sphereface": {"m": 4, "schedule": {"base": 1000.0, "gamma": 0.12, "power": 1.0, "minimum": 5.0}},
    # L-Softmax's released MNIST schedule decays over tens of thousands of steps (gamma 2.5e-5). Six
    # times that gamma brings beta = 1000 (1 + gamma t)^-35 to 1 after about 1,450 steps (66 epochs)
    # and to 0.05 by the end of the default 100 epochs.
    "lsoftmax": {"m": 4, "schedule": {"base": 1000.0, "gamma": 1.5e-4, "power": 35.0, "minimum": 0.0}},
    "center": {"alpha": 0.5, "loss_weight": 0.05},
}

LOSS_TITLES: dict[str, str] = {
    "softmax": "Softmax",
    "normface": "NormFace",
    "cosface": "CosFace",
    "am-softmax": "AM-Softmax",
    "arcface": "ArcFace",
    "sphereface": "SphereFace",
    "lsoftmax": "L-Softmax",
    "center": "Softmax + Center",
}

LOSSES: tuple[str, ...] = tuple(DEMO_SETTINGS)

# Training of every loss: the same network, optimiser, batches and number of steps, so the rows of
# the table differ only in the loss.
DEFAULT_EPOCHS = 100
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.1
HIDDEN_SIZES = (256, 128)
HELD_OUT_FRACTION = 0.25
# One intra-op thread: results are bitwise repeatable only for a fixed thread count (1 and 2 threads
# gave different low bits, and so slightly different tables), and for a network this small a second
# thread was measured to be no faster.
NUM_THREADS = 1

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("settings", "settings"),
    ("accuracy", "held-out accuracy (%)"),
    ("intra_class_angle_deg", "mean intra-class angle (deg)"),
    ("min_center_angle_deg", "min angle between class centres (deg)"),
    ("train_time_s", "training time (s)"),
)

_EXTRA_HINT = "the demo needs the 'demo' extra: pip install 'softmax-variants[demo]' (scikit-learn, matplotlib, tqdm)"


def _require(module: str):
    """Import an optional dependency of the demo, or say plainly which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is missing; {_EXTRA_HINT}") from error


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoData:
    """Images flattened to rows in [0, 1] (float32) with integer labels, split into train and held-out."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def to(self, device: torch.device) -> DemoData:
        return DemoData(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
        )


def _stratified_split(images: np.ndarray, labels: np.ndarray, seed: int, name: str) -> DemoData:
    model_selection = _require("sklearn.model_selection")
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        images, labels, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=seed
    )
    return _as_demo_data(name, train_x, train_y, test_x, test_y)


def _as_demo_data(name, train_x, train_y, test_x, test_y) -> DemoData:
    labels = np.concatenate([train_y, test_y])
    return DemoData(
        name=name,
        train_x=torch.as_tensor(np.asarray(train_x, dtype=np.float32)),
        train_y=torch.as_tensor(np.asarray(train_y, dtype=np.int64)),
        test_x=torch.as_tensor(np.asarray(test_x, dtype=np.float32)),
        test_y=torch.as_tensor(np.asarray(test_y, dtype=np.int64)),
        num_classes=int(labels.max()) + 1,
    )


def load_digits(seed: int) -> DemoData:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), stratified split by ``seed``."""
    datasets = _require("sklearn.datasets")
    images, labels = datasets.load_digits(return_X_y=True)
    # pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); scale to [0, 1]
    return _stratified_split(images / 16.0, labels, seed, "scikit-learn digits (8x8)")


# IDX (the MNIST file format): 0, 0, a type code, the number of dimensions, then each dimension as a
# big-endian uint32, then the values in C order, big-endian.
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (as the MNIST files are distributed, gzipped or not) into a NumPy array.

    Raises ValueError naming the file when the header is not IDX or the data do not match the
    header's shape.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # the gzip magic number: read through it, whatever the file is called
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (it must start with 0x00 0x00, a type code, a rank)")
    dtype, rank = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * rank
    if rank == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header promises {rank} dimensions but the file is too short")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header gives shape {shape} ({expected} bytes of data), file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_pair(directory: Path, prefix: str) -> tuple[Path, Path] | None:
    """The images and labels IDX files of one split ("train" or "t10k"), under MNIST's usual names."""

    def find(kind: str, rank: int) -> Path | None:
        hits = sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and p.name.startswith(prefix) and kind in p.name and f"idx{rank}" in p.name
        )
        return hits[0] if hits else None

    images, labels = find("images", 3), find("labels", 1)
    return (images, labels) if images and labels else None


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels to match the images, got {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"{labels_path}: labels must be >= 0, got {labels.min()}")
    scale = 255.0 if images.dtype == np.uint8 else max(float(np.abs(images).max()), 1.0)
    return images.reshape(images.shape[0], -1).astype(np.float32) / scale, labels.astype(np.int64)


def load_mnist_idx(path: str | os.PathLike, seed: int) -> DemoData:
    """MNIST-style IDX files from a directory the user already has (nothing is downloaded).

    The directory must hold ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (the usual
    names; ``.gz`` and ``train-images.idx3-ubyte`` spellings work too). When the ``t10k-`` pair is
    there it is the held-out set (MNIST's own split); otherwise a stratified quarter of the training
    files is held out, as for the digits.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"data must be a directory holding MNIST IDX files, got {str(path)!r}")
    train = _find_idx_pair(directory, "train")
    if train is None:
        raise ValueError(
            f"data: no train-images-idx3-ubyte / train-labels-idx1-ubyte pair (optionally .gz) in {directory}"
        )
    train_x, train_y = _read_split(*train)
    test = _find_idx_pair(directory, "t10k")
    if test is None:
        return _stratified_split(train_x, train_y, seed, f"IDX files in {directory}")
    test_x, test_y = _read_split(*test)
    if test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"data: t10k images have {test_x.shape[1]} pixels, train images {train_x.shape[1]}")
    return _as_demo_data(f"IDX files in {directory}", train_x, train_y, test_x, test_y)


# --------------------------------------------------------------------------------------------------
# The network and the heads
# --------------------------------------------------------------------------------------------------


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


class SoftmaxHead(nn.Module):
    """The baseline: a bias-free linear layer and cross-entropy, so logit_j = |W_j| |x| cos theta_j
    like the margin heads' (only without a margin or a normalisation)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.linear(x), y)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SoftmaxCenterHead(SoftmaxHead):
    """Softmax plus the center loss of Wen et al. (2016); the CenterLoss module moves its own centers."""

    def __init__(self, num_classes: int, dim: int, alpha: float, loss_weight: float) -> None:
        super().__init__(num_classes, dim)
        self.center = CenterLoss(num_classes, dim, alpha=alpha, loss_weight=loss_weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(x, y) + self.center(x, y)


def _margin_head(head_class: type[nn.Module]) -> Callable[..., nn.Module]:
    """A builder that turns a settings dict into the head (a schedule dict into a MarginSchedule)."""

    def build(num_classes: int, dim: int, **settings) -> nn.Module:
        if "schedule" in settings:
            settings = {**settings, "schedule": MarginSchedule(**settings["schedule"])}
        return head_class(num_classes, dim, **settings)

    return build


HEAD_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "softmax": SoftmaxHead,
    "normface": _margin_head(NormFace),
    "cosface": _margin_head(CosFace),
    "am-softmax": _margin_head(AMSoftmax),
    "arcface": _margin_head(ArcFace),
    "sphereface": _margin_head(SphereFace),
    "lsoftmax": _margin_head(LSoftmax),
    "center": SoftmaxCenterHead,
}


def build_head(loss: str, num_classes: int, dim: int) -> nn.Module:
    """The head of one loss with its demo settings (:data:`DEMO_SETTINGS`)."""
    return HEAD_BUILDERS[loss](num_classes, dim, **DEMO_SETTINGS[loss])


_SCHEDULE_NAMES = {"sphereface": "lambda", "lsoftmax": "beta"}


def describe_settings(loss: str) -> str:
    """The settings as one short line for the table, e.g. ``s=16, m=0.2``."""
    parts = []
    for name, value in DEMO_SETTINGS[loss].items():
        if name == "schedule":
            weight = _SCHEDULE_NAMES.get(loss, "w")
            parts.append(
                f"{weight}=max({value['minimum']:g}, {value['base']:g}(1+{value['gamma']:g}t)^-{value['power']:g})"
            )
        else:
            parts.append(f"{name}={value:g}")
    return ", ".join(parts) or "-"


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def angle_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Angle between the rows of ``a`` and ``b``, in degrees.

    .. math:: \angle(a, b) = 2 \operatorname{atan2}(\|\hat a - \hat b\|, \|\hat a + \hat b\|),
        \qquad \hat v = v / \max(\|v\|, 10^{-12})

    The half-angle form stays accurate for nearly parallel vectors, where arccos of the dot product
    loses half the digits (and returns exactly 0 below about 1e-8 rad).

    Args:
        a, b: arrays of shape (..., D) that broadcast against each other.

    Returns:
        The angles in [0, 180], shape (...), float64.
    """
    a, b = _unit(np.asarray(a, dtype=np.float64)), _unit(np.asarray(b, dtype=np.float64))
    return np.degrees(2.0 * np.arctan2(np.linalg.norm(a - b, axis=-1), np.linalg.norm(a + b, axis=-1)))


@dataclass(frozen=True)
class Geometry:
    """Class directions of a set of features: ``centers[k]`` is the unit mean direction of class
    ``classes[k]`` (the mean of the unit features, normalised)."""

    classes: np.ndarray
    centers: np.ndarray
    intra_class_angle_deg: float
    min_center_angle_deg: float


def class_geometry(features: np.ndarray, labels: np.ndarray) -> Geometry:
    r"""Mean intra-class angle and minimum angle between class centres, in degrees.

    .. math::
        \mu_k = \mathrm{normalize}\Big(\sum_{i: y_i = k} \hat x_i\Big), \qquad
        \text{intra} = \frac{1}{N} \sum_i \angle(x_i, \mu_{y_i}), \qquad
        \text{gap} = \min_{k \ne l} \angle(\mu_k, \mu_l)

    Only directions count: each feature is normalised before the class mean is taken, so a long
    feature (softmax grows them) does not outweigh a short one.

    Args:
        features: (N, D) held-out features. labels: (N,) their integer classes.

    Returns:
        :class:`Geometry` with the classes present, their unit mean directions, the mean
        intra-class angle, and the minimum angle between centres (nan with fewer than two classes).
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    units = _unit(features)
    classes = np.unique(labels)
    centers = _unit(np.stack([units[labels == k].mean(axis=0) for k in classes]))
    center_of = centers[np.searchsorted(classes, labels)]
    intra = float(angle_degrees(units, center_of).mean())
    i, j = np.triu_indices(len(classes), k=1)
    min_gap = float(angle_degrees(centers[i], centers[j]).min()) if len(i) else math.nan
    return Geometry(classes, centers, intra, min_gap)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class LossResult:
    """One trained loss: the table row, plus the held-out features and class centres for the figures."""

    loss: str
    title: str
    settings: str
    accuracy: float
    intra_class_angle_deg: float
    min_center_angle_deg: float
    train_time_s: float
    features: np.ndarray
    labels: np.ndarray
    centers: np.ndarray

    def row(self) -> dict[str, str]:
        return {
            "loss": self.title,
            "settings": self.settings,
            "accuracy": f"{self.accuracy:.1f}",
            "intra_class_angle_deg": f"{self.intra_class_angle_deg:.1f}",
            "min_center_angle_deg": f"{self.min_center_angle_deg:.1f}",
            "train_time_s": f"{self.train_time_s:.1f}",
        }


def train_one(
    loss: str,
    data: DemoData,
    *,
    dim: int,
    epochs: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> LossResult:
    """Train the embedding network with one loss and measure the held-out geometry.

    Every loss starts from the same seed, so a loss's row does not depend on which others ran.
    """
    tqdm = _require("tqdm").tqdm
    # the only random draws are torch's (initialisation, batch order); the split takes random_state=seed,
    # and nothing reads NumPy's global generator, so no NumPy seed is needed
    torch.manual_seed(seed)
    net = EmbeddingNet(data.train_x.shape[1], dim).to(device)
    head = build_head(loss, data.num_classes, dim).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": net.parameters(), "weight_decay": WEIGHT_DECAY},
            {"params": head.parameters(), "weight_decay": 0.0},
        ],
        lr=LEARNING_RATE,
    )
    steps_per_epoch = math.ceil(data.train_x.shape[0] / BATCH_SIZE)
    # decay to zero over the run: the clusters settle instead of jittering at the last step's rate
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    order = torch.Generator().manual_seed(seed)  # batches drawn on the CPU: the same order on any device

    net.train()
    head.train()
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{LOSS_TITLES[loss]:>16}", unit="epoch", disable=not progress, leave=True)
    for epoch in bar:
        total = torch.zeros((), device=device)
        for batch in torch.randperm(data.train_x.shape[0], generator=order).split(BATCH_SIZE):
            batch = batch.to(device)
            value = head(net(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            total += value.detach() * batch.numel()
        mean_loss = float(total) / data.train_x.shape[0]
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"{LOSS_TITLES[loss]}: the training loss became {mean_loss} in epoch {epoch + 1}")
        bar.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)  # redraw at tqdm's own pace, not every epoch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    net.eval()
    head.eval()
    with torch.no_grad():
        features = net(data.test_x)
        predictions = head.logits(features).argmax(dim=1)
        accuracy = 100.0 * float((predictions == data.test_y).double().mean())
    features_np = features.double().cpu().numpy()
    labels_np = data.test_y.cpu().numpy()
    geometry = class_geometry(features_np, labels_np)
    return LossResult(
        loss=loss,
        title=LOSS_TITLES[loss],
        settings=describe_settings(loss),
        accuracy=accuracy,
        intra_class_angle_deg=geometry.intra_class_angle_deg,
        min_center_angle_deg=geometry.min_center_angle_deg,
        train_time_s=seconds,
        features=features_np,
        labels=labels_np,
        centers=geometry.centers,
    )


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _pyplot():
    matplotlib = _require("matplotlib")
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

    units = _unit(x)
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
    colors = _colors(result.labels)
    x = result.features
    ax_features.scatter(x[:, 0], x[:, 1], x[:, 2], c=colors, s=4, alpha=0.7, linewidths=0)
    extent = float(np.abs(x).max()) * 1.05 or 1.0
    for set_limits in (ax_features.set_xlim, ax_features.set_ylim, ax_features.set_zlim):
        set_limits(-extent, extent)
    ax_features.set_box_aspect((1, 1, 1))
    ax_features.set_title(f"{result.title}  ({result.settings})\nfeatures", fontsize=9)

    units = _unit(x)
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
    kwargs = {"projection": "3d"} if dim == 3 else {}
    return (
        fig.add_subplot(rows, cols, 2 * index + 1, **kwargs),
        fig.add_subplot(rows, cols, 2 * index + 2, **kwargs),
    )


def _legend(fig, num_classes: int) -> None:
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


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def training_note() -> str:
    """How every loss was trained, in one sentence, for the Markdown table."""
    layers = "-".join(str(n) for n in HIDDEN_SIZES)
    return (
        f"Each loss trains the same network (an MLP with hidden layers {layers} and ReLU, linear output) "
        f"from the same initialisation: AdamW, learning rate {LEARNING_RATE:g} on a one-cycle schedule, "
        f"weight decay {WEIGHT_DECAY:g} on the network (none on the head), batches of {BATCH_SIZE}, "
        f"{NUM_THREADS} CPU thread(s). Accuracy is the argmax of the margin-free logits; angles are those "
        "of the held-out features to their class's mean direction, and between class mean directions; "
        "t in a schedule counts training steps."
    )


def markdown_table(results: Sequence[LossResult]) -> str:
    """The results as a Markdown pipe table, one row per loss, columns as :data:`TABLE_COLUMNS`."""
    header = [title for _, title in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for result in results:
        row = result.row()
        lines.append("| " + " | ".join(row[key] for key, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(results: Sequence[LossResult], path: Path) -> None:
    """The same rows as :func:`markdown_table`, as CSV with the short column names as header."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _ in TABLE_COLUMNS])
        writer.writeheader()
        for result in results:
            writer.writerow(result.row())


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _check_losses(losses: Sequence[str] | str | None) -> list[str]:
    if losses is None:
        return list(LOSSES)
    if isinstance(losses, str):
        losses = [losses]
    chosen: list[str] = []
    for name in losses:
        if name == "all":
            chosen.extend(LOSSES)
        elif name in DEMO_SETTINGS:
            chosen.append(name)
        else:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)} (or 'all'), got {name!r}")
    if not chosen:
        raise ValueError("loss: choose at least one loss")
    return list(dict.fromkeys(chosen))  # drop repeats, keep the order given


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here")
    return device


@dataclass(frozen=True)
class DemoRun:
    results: list[LossResult]
    table_markdown: str
    files: dict[str, Path]


def run_demo(
    losses: Sequence[str] | str | None = None,
    *,
    epochs: int = DEFAULT_EPOCHS,
    dim: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out: str | os.PathLike = "demo-out",
    data: str | os.PathLike | None = None,
    progress: bool = True,
) -> DemoRun:
    """Train with each loss, write the figures and the table into ``out``, and return them.

    Args:
        losses: names from :data:`LOSSES` (or "all"); None trains every loss.
        epochs: passes over the training split (>= 1). dim: the embedding's dimension, 2 or 3.
        seed: seeds the split, the initialisation and the batch order (>= 0). device: a torch device.
        out: the output directory (created). data: a directory of MNIST IDX files, or None for the
        digits that ship with scikit-learn. progress: show a progress bar per loss.

    Deterministic on the CPU for a given seed: all but the training-time column repeat bitwise.
    Arguments are all checked before anything is loaded, trained or written.

    Returns:
        :class:`DemoRun`: the per-loss results, the Markdown table, and the paths written.
    """
    # every argument is checked before anything is loaded, trained or written
    chosen = _check_losses(losses)
    epochs = check_positive_int(epochs, "epochs")
    if isinstance(dim, bool) or dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3 (the figures draw a circle or a sphere), got {dim!r}")
    seed = check_positive_int(seed, "seed", minimum=0)
    device = _check_device(device)
    for module in ("sklearn", "matplotlib", "tqdm"):
        _require(module)
    out = Path(out)

    dataset = load_digits(seed) if data is None else load_mnist_idx(data, seed)
    dataset = dataset.to(device)
    out.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(NUM_THREADS)
    # warn_only: on CUDA a few kernels have no deterministic version; the CPU path has them all
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        results = [
            train_one(name, dataset, dim=dim, epochs=epochs, seed=seed, device=device, progress=progress)
            for name in chosen
        ]
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)

    files: dict[str, Path] = {}
    for result in results:
        files[result.loss] = out / f"{result.loss}.png"
        save_loss_figure(result, files[result.loss], dim)
    caption = (
        f"{dataset.name}: {dataset.train_x.shape[0]} training / {dataset.test_x.shape[0]} held-out images, "
        f"{dim}-D embedding, {epochs} epochs, seed {seed}; held-out features"
    )
    files["grid"] = out / "grid.png"
    save_grid(results, files["grid"], dim, caption)
    table = markdown_table(results)
    files["table.md"] = out / "table.md"
    files["table.md"].write_text(f"{caption}.\n\n{table}\n{training_note()}\n", encoding="utf-8")
    files["table.csv"] = out / "table.csv"
    write_csv(results, files["table.csv"])
    return DemoRun(results, table, files)


# --------------------------------------------------------------------------------------------------
# Command line (python -m torch_port demo; see torch_port/__main__.py)
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, added to the ``demo`` sub-command of torch_port/__main__.py."""
    parser.add_argument(
        "--loss",
        nargs="+",
        choices=[*LOSSES, "all"],
        default=["all"],
        metavar="LOSS",
        help=f"one or several of: {', '.join(LOSSES)}, all (default: all)",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2, help="embedding dimension (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds split, initialisation and batches (default 0)")
    parser.add_argument("--device", default="cpu", help="a torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a directory with MNIST IDX files (train-images-idx3-ubyte, ...) to use instead of the digits",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed options, print the table and the files written; returns 0."""
    started = time.perf_counter()
    run = run_demo(
        args.loss,
        epochs=args.epochs,
        dim=args.dim,
        seed=args.seed,
        device=args.device,
        out=args.out,
        data=args.data,
        progress=not args.no_progress,
    )
    print()
    print(run.table_markdown, end="")
    print()
    print(f"wrote {', '.join(str(p) for p in run.files.values())}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0
