"""CIFAR-10 VGG16 with BasicClient: your own training loop, a model exchange every 2 epochs.

    python basic_client_agent.py --agent_name agent1 --subset 0 --epochs 200

As in the seed: every ``send_every`` epochs the agent sends its model (not before the first)
and continues from the aggregate; after the last epoch it sends once more and takes the final
aggregate. The optimizer and its momentum live on across rounds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cifar10_data import CLASS_SUBSETS, CLASSES, agent_loaders, load_cifar10
from cifar10_task import evaluate, make_optimizer, train_epoch
from torch.utils.data import DataLoader
from vgg import VGG16

from agent.client import BasicClient

HERE = Path(__file__).resolve().parent


def sample_count(loader: DataLoader[Any]) -> int:
    return len(loader.dataset)  # type: ignore[arg-type]


def run(
    client: BasicClient,
    trainloader: DataLoader[Any],
    testloader: DataLoader[Any],
    *,
    epochs: int,
    send_every: int = 2,
    lr: float = 0.01,
    device: str = "cpu",
    augmentation: bool = True,
) -> dict[str, float]:
    """The seed's loop; returns the last metrics sent."""
    model = VGG16().to(device)
    optimizer = make_optimizer(model, lr=lr)
    client.set_bm_obj(VGG16())
    samples = sample_count(trainloader)
    metrics: dict[str, float] = {}

    def exchange() -> None:
        # The aggregate replaces the weights in place, so the optimizer keeps tracking them.
        model.load_state_dict(client.wait_for_sg_model().state_dict())

    for epoch in range(epochs):
        if epoch % send_every == 0:
            if epoch != 0:  # nothing trained yet before the first epoch
                client.send_trained_model(model, metrics, num_samples=samples)
            exchange()
        loss = train_epoch(model, trainloader, optimizer, device=device, augmentation=augmentation)
        accuracy, loss_valid = evaluate(model, testloader, device=device)
        metrics = {"accuracy": accuracy, "loss_training": loss, "loss_valid": loss_valid}
        logging.info("epoch %d: %s", epoch + 1, metrics)
    client.send_trained_model(model, metrics, num_samples=samples)
    exchange()
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedhive CIFAR-10 agent (BasicClient)")
    parser.add_argument("--config", default=str(HERE / "config_agent.json"))
    parser.add_argument("--agent_name", default="default_agent")
    parser.add_argument("--data", default=str(HERE / "data"), help="CIFAR-10 python batches")
    parser.add_argument("--subset", type=int, default=0, help="favoured class subset: 0, 1, 2")
    parser.add_argument("--classes", default=None, help="or the favoured classes, a,b,c")
    parser.add_argument("--sel_count", type=float, default=1.0)
    parser.add_argument("--def_count", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--send_every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    selected = (
        tuple(args.classes.split(","))
        if args.classes
        else CLASS_SUBSETS[args.subset % len(CLASS_SUBSETS)]
    )
    logging.info("favoured classes: %s (of %s)", ", ".join(selected), ", ".join(CLASSES))
    trainloader, testloader = agent_loaders(
        load_cifar10(args.data), selected, sel_count=args.sel_count, def_count=args.def_count
    )
    client = BasicClient(config_file=args.config, agent_name=args.agent_name)
    try:
        run(
            client,
            trainloader,
            testloader,
            epochs=args.epochs,
            send_every=args.send_every,
            lr=args.lr,
            device="cuda" if args.cuda else "cpu",
        )
    finally:
        client.disconnect()


if __name__ == "__main__":
    main()
