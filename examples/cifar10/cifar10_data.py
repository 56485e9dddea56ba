"""CIFAR-10 from its python batch files, with the seed's non-IID skew per agent.

Get the data once (163 MB) and unpack it next to this file::

    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz -C data      # → data/cifar-10-batches-py/data_batch_1 ...

The skew follows the seed: the ten classes fall into three subsets; an agent keeps
``sel_count`` (a fraction) of every class of its own subset and ``def_count`` of every other
class, so each agent sees mostly its own kind of images.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: The seed's three class subsets: agent i favours CLASS_SUBSETS[i % 3].
CLASS_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("airplane", "automobile", "ship", "truck"),
    ("bird", "cat", "deer"),
    ("dog", "frog", "horse"),
)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
#: The seed's normalisation (per-channel mean and std of the training images).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Cifar10:
    """Images as uint8 N×32×32×3 (height, width, RGB) and labels as int64 N."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array


class _BatchUnpickler(pickle.Unpickler):
    """The batch files are pickles: allow only what they hold (dicts, lists, NumPy arrays),
    so a doctored file cannot run code."""

    _ALLOWED = frozenset(
        {
            # How Python 3 writes bytes at pickle protocol 2 (harmless: str -> bytes).
            ("_codecs", "encode"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[Array, Array]:
    """One batch file: images (N×32×32×3 uint8) and labels (N int64)."""
    batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def batches_dir(data_dir: Path) -> Path:
    """``data_dir`` itself or its ``cifar-10-batches-py`` folder, whichever holds the files."""
    for candidate in (data_dir, data_dir / "cifar-10-batches-py"):
        if (candidate / TEST_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {data_dir}: download cifar-10-python.tar.gz and unpack it "
        "there (see examples/cifar10/README.md)"
    )


def load_cifar10(data_dir: str | Path) -> Cifar10:
    """Read ``data_batch_1..5`` and ``test_batch`` from ``data_dir``."""
    folder = batches_dir(Path(data_dir))
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = read_batch(folder / TEST_FILE)
    return Cifar10(
        np.concatenate([x for x, _ in parts]),
        np.concatenate([y for _, y in parts]),
        x_test,
        y_test,
    )


def skewed_indices(
    labels: Array, selected: tuple[str, ...], *, sel_count: float, def_count: float
) -> Array:
    """The seed's non-IID subset: the first ``sel_count`` fraction of every selected class's
    samples and the first ``def_count`` fraction of every other class's, in file order."""
    unknown = set(selected) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown CIFAR-10 classes {sorted(unknown)}; known: {CLASSES}")
    keep: list[Array] = []
    for index, name in enumerate(CLASSES):
        members = np.flatnonzero(labels == index)
        fraction = sel_count if name in selected else def_count
        keep.append(members[: int(fraction * len(members))])
    return np.sort(np.concatenate(keep))


def to_tensors(images: Array, labels: Array) -> TensorDataset:
    """Normalised float32 N×3×32×32 images and int64 labels."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return TensorDataset((x - mean) / std, torch.from_numpy(labels))


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The seed's training augmentation on a batch: a random 32×32 crop of the image padded by
    4 pixels, and a horizontal flip with probability 1/2."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    crops = torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def agent_loaders(
    data: Cifar10,
    selected: tuple[str, ...],
    *,
    sel_count: float = 1.0,
    def_count: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The agent's skewed training loader and the (whole) test loader."""
    keep = skewed_indices(data.y_train, selected, sel_count=sel_count, def_count=def_count)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        to_tensors(data.x_train[keep], data.y_train[keep]),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
    )
    test = DataLoader(to_tensors(data.x_test, data.y_test), batch_size=100, shuffle=False)
    return train, test
