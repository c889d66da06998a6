"""The demo's data: scikit-learn's digits (the default), or MNIST IDX files the user already has.

Nothing is downloaded. Either way the result is a :class:`DemoData`: flattened images in [0, 1]
and integer labels, split into a training and a held-out set.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torch_port.demo.extras import require
from torch_port.demo.settings import HELD_OUT_FRACTION


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
        """The same data with every tensor on ``device``."""
        return DemoData(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
        )


def _stratified_split(images: np.ndarray, labels: np.ndarray, seed: int, name: str) -> DemoData:
    """Hold out HELD_OUT_FRACTION of the images, each class in proportion, chosen by ``seed``."""
    model_selection = require("sklearn.model_selection")
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        images, labels, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=seed
    )
    return _as_demo_data(name, train_x, train_y, test_x, test_y)


def _as_demo_data(name, train_x, train_y, test_x, test_y) -> DemoData:
    """NumPy arrays as a DemoData (float32 images, int64 labels); classes are 0 .. the largest label."""
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
    datasets = require("sklearn.datasets")
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
    """One split's images as float32 rows in [0, 1] and its labels as int64, after checking they match."""
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
