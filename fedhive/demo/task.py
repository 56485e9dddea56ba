"""The demo's learning task: a small CNN on scikit-learn's 8×8 digits, split across agents.

Everything here is deterministic given the seeds, so the federated and the centralized runs
see the same data and the same initial weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

SEED = 0


class DigitsCNN(nn.Module):
    """Two convolutions and a classifier for 1×8×8 images (BatchNorm: integer buffers too)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # type: ignore[no-any-return]


def make_model() -> DigitsCNN:
    """The base model (seeded, so every run starts from the same weights)."""
    torch.manual_seed(SEED)
    return DigitsCNN()


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray[Any, Any]
    y_train: np.ndarray[Any, Any]
    x_test: np.ndarray[Any, Any]
    y_test: np.ndarray[Any, Any]


def load_digits_split(test_fraction: float = 0.25) -> Split:
    """scikit-learn's digits (shipped with the package), scaled to [0, 1], stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=SEED, stratify=y
    )
    return Split(x_tr, y_tr, x_te, y_te)


def shard(
    split: Split, index: int, count: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Agent ``index`` of ``count``: an IID shard of unequal size (so weighting matters)."""
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(split.y_train))
    # Unequal shares 1 : 1.5 : 2 : ... so sample-weighted and equal-weight means differ.
    shares = np.array([1.0 + 0.5 * i for i in range(count)])
    bounds = np.concatenate([[0], np.cumsum(shares / shares.sum() * len(order))]).astype(int)
    bounds[-1] = len(order)
    mine = order[bounds[index] : bounds[index + 1]]
    return split.x_train[mine], split.y_train[mine]


def train(
    model: nn.Module,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    *,
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 32,
    seed: int = SEED,
) -> float:
    """Plain SGD with momentum; returns the average training loss of the last epoch."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    avg = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(yt), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        avg = total / max(seen, 1)
    return avg


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]
) -> tuple[float, float]:
    """(accuracy, average loss) on ``x``, ``y``."""
    model.eval()
    logits = model(torch.from_numpy(x))
    loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    acc = float((logits.argmax(1).numpy() == y).mean())
    return acc, loss


def centralized_accuracy(epochs: int) -> float:
    """Train the same model on all training data for ``epochs`` epochs; test accuracy."""
    split = load_digits_split()
    model = make_model()
    train(model, split.x_train, split.y_train, epochs=epochs)
    return evaluate(model, split.x_test, split.y_test)[0]
