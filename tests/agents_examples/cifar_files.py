"""Generated CIFAR-10 python batch files: the real format (pickled dicts of bytes keys with a
uint8 N×3072 ``data`` array and a ``labels`` list), tiny and random."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_batch(path: Path, images: np.ndarray, labels: list[int], name: str) -> None:
    # N×32×32×3 (height, width, RGB) → rows of 1024 red, 1024 green, 1024 blue values.
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))  # as the originals (Python 2 cPickle)


def write_fake_cifar10(root: Path, *, per_batch: int = 20, test: int = 20, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch}``; every class appears in
    every file (labels cycle 0..9). Returns the batches folder."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        write_batch(folder / name, images, [i % 10 for i in range(count)], name)
    return folder
