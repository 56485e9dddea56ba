"""The seed's CIFAR-10 training, split into IntegratedClient's functions.

``train(model, data, **kwargs) -> (model, average_training_loss)`` and
``validate(model, data, **kwargs)`` / ``test(...)`` ``-> (accuracy_percent, average_loss)``.
The BasicClient variant calls :func:`train_epoch` and :func:`evaluate` from its own loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from cifar10_data import CLASSES, augment
from torch import nn
from torch.utils.data import DataLoader

log = logging.getLogger("cifar10")


def make_optimizer(
    model: nn.Module, *, lr: float = 0.01, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """The seed's optimizer: SGD with momentum and weight decay 5e-4."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)


def train_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    *,
    device: str = "cpu",
    augmentation: bool = True,
) -> float:
    """One epoch over ``loader``; returns the average batch loss."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, batches = 0.0, 0
    for inputs, targets in loader:
        if augmentation:
            inputs = augment(inputs)
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += float(loss.item())
        batches += 1
    return total / max(batches, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader[Any], *, device: str = "cpu"
) -> tuple[float, float]:
    """Accuracy in percent and average loss over ``loader``."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs)
        loss += float(criterion(outputs, targets).item())
        correct += int((outputs.argmax(1) == targets).sum().item())
        seen += int(targets.numel())
    return 100.0 * correct / max(seen, 1), loss / max(seen, 1)


def train(model: nn.Module, data: DataLoader[Any], **kwargs: Any) -> tuple[nn.Module, float]:
    """IntegratedClient's training function: ``epochs`` epochs (default 2) of the seed's SGD."""
    device = str(kwargs.get("device", "cpu"))
    epochs = int(kwargs.get("epochs", 2))
    model = model.to(device)
    optimizer = make_optimizer(
        model, lr=float(kwargs.get("lr", 0.01)), momentum=float(kwargs.get("momentum", 0.9))
    )
    losses = [
        train_epoch(model, data, optimizer, device=device, augmentation=kwargs.get("augment", True))
        for _ in range(epochs)
    ]
    return model.to("cpu"), sum(losses) / len(losses)


def validate(model: nn.Module, data: DataLoader[Any], **kwargs: Any) -> tuple[float, float]:
    """IntegratedClient's (cross-)validation function."""
    accuracy, loss = evaluate(model, data, device=str(kwargs.get("device", "cpu")))
    log.info("validation accuracy %.2f%%, loss %.4f", accuracy, loss)
    return accuracy, loss


def test(model: nn.Module, data: DataLoader[Any], **kwargs: Any) -> tuple[float, float]:
    """IntegratedClient's test function, with the seed's per-class accuracy in the log."""
    device = str(kwargs.get("device", "cpu"))
    accuracy, loss = evaluate(model, data, device=device)
    hits = torch.zeros(len(CLASSES))
    seen = torch.zeros(len(CLASSES))
    model.eval()
    with torch.no_grad():
        for inputs, targets in data:
            predicted = model(inputs.to(device)).argmax(1).cpu()
            seen += torch.bincount(targets, minlength=len(CLASSES))
            hits += torch.bincount(targets[predicted == targets], minlength=len(CLASSES))
    per_class = ", ".join(
        f"{name} {100.0 * float(h) / float(s):.0f}%"
        for name, h, s in zip(CLASSES, hits, seen, strict=True)
        if s > 0
    )
    log.info("test accuracy %.2f%% (%s)", accuracy, per_class)
    return accuracy, loss
