"""CIFAR-10 VGG16 with IntegratedClient: fedhive runs the loop around your functions.

    python integrated_client_agent.py --agent_name agent2 --subset 1 --round_to_exit 20

or as a daemon (forever, or until ``round_to_exit``)::

    fedhive agent run --config config_agent.json --entry integrated_client_agent:setup \\
        -p subset=1 -p data=./data -p round_to_exit=20
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cifar10_data import CLASS_SUBSETS, agent_loaders, load_cifar10
from cifar10_task import test, train, validate
from vgg import VGG16

from agent.integrated import IntegratedClient

HERE = Path(__file__).resolve().parent


def judge_termination(**kwargs: Any) -> bool:
    """The seed's termination function: stop once the client took part in ``round_to_exit``
    rounds. fedhive also passes ``training_count`` and ``sg_arrival_count``."""
    client: IntegratedClient = kwargs["client"]
    current_fl_round = client.federated_training_round
    logging.info(
        "federated round %d (trainings %d, SG models %d)",
        current_fl_round,
        kwargs["training_count"],
        kwargs["sg_arrival_count"],
    )
    if current_fl_round >= int(kwargs["round_to_exit"]):
        client.stop_model_exchange_routine()
        return False
    return True


def configure(
    client: IntegratedClient,
    trainloader: Any,
    testloader: Any,
    *,
    epochs: int = 2,
    lr: float = 0.01,
    device: str = "cpu",
    round_to_exit: int | None = None,
    augmentation: bool = True,
) -> None:
    """Hand the seed's functions to ``client``."""
    if round_to_exit is not None:
        client.set_termination_function(
            judge_termination, round_to_exit=round_to_exit, client=client
        )
    client.set_training_function(
        train, trainloader, lr=lr, epochs=epochs, device=device, augment=augmentation
    )
    client.set_cross_validation_function(validate, testloader, device=device)
    client.set_testing_function(test, testloader, device=device)
    client.set_bm_obj(VGG16())


def setup(client: IntegratedClient, **params: str) -> None:
    """The daemon's entry point (``--entry integrated_client_agent:setup``). Parameters
    (``-p KEY=VALUE``): data, subset, sel_count, def_count, epochs, lr, device, round_to_exit."""
    subset = int(params.get("subset", "0"))
    trainloader, testloader = agent_loaders(
        load_cifar10(params.get("data", str(HERE / "data"))),
        CLASS_SUBSETS[subset % len(CLASS_SUBSETS)],
        sel_count=float(params.get("sel_count", "1.0")),
        def_count=float(params.get("def_count", "0.1")),
    )
    exit_at = params.get("round_to_exit")
    configure(
        client,
        trainloader,
        testloader,
        epochs=int(params.get("epochs", "2")),
        lr=float(params.get("lr", "0.01")),
        device=params.get("device", "cpu"),
        round_to_exit=int(exit_at) if exit_at else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedhive CIFAR-10 agent (IntegratedClient)")
    parser.add_argument("--config", default=str(HERE / "config_agent.json"))
    parser.add_argument("--agent_name", default="default_agent")
    parser.add_argument("--data", default=str(HERE / "data"), help="CIFAR-10 python batches")
    parser.add_argument("--subset", type=int, default=0, help="favoured class subset: 0, 1, 2")
    parser.add_argument("--sel_count", type=float, default=1.0)
    parser.add_argument("--def_count", type=float, default=0.1)
    parser.add_argument("--lt_epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--round_to_exit", type=int, default=20)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    trainloader, testloader = agent_loaders(
        load_cifar10(args.data),
        CLASS_SUBSETS[args.subset % len(CLASS_SUBSETS)],
        sel_count=args.sel_count,
        def_count=args.def_count,
    )
    client = IntegratedClient(
        config_file=args.config, simulation_flag=True, agent_name=args.agent_name
    )
    configure(
        client,
        trainloader,
        testloader,
        epochs=args.lt_epochs,
        lr=args.lr,
        device="cuda:0" if args.cuda else "cpu",
        round_to_exit=args.round_to_exit,
    )
    client.start()
    if client.training_finalized:
        print("Training Completed!")


if __name__ == "__main__":
    main()
