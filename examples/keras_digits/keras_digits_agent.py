"""A Keras federation on the digits data with IntegratedClient.

    python keras_digits_agent.py --index 0 --agents 3 --rounds 10

or as a daemon: ``fedhive agent run --config config_agent.json --entry
keras_digits_agent:setup -p index=0 -p agents=3``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from keras_digits_model import Data, load_digits_shard, make_model, test, train, validate

from agent.integrated import IntegratedClient

HERE = Path(__file__).resolve().parent


def stop_after(rounds: int) -> Any:
    """A termination function: stop once this agent took part in ``rounds`` rounds."""

    def judge_termination(
        training_count: int, sg_arrival_count: int, client: IntegratedClient
    ) -> bool:
        if client.federated_training_round >= rounds:
            client.stop_model_exchange_routine()
            return False
        return True

    return judge_termination


def configure(
    client: IntegratedClient,
    train_data: Data,
    test_data: Data,
    *,
    epochs: int = 1,
    rounds: int | None = None,
) -> None:
    """Hand the example's functions and model to ``client``."""
    client.set_training_function(train, train_data, epochs=epochs)
    client.set_cross_validation_function(validate, test_data)
    client.set_testing_function(test, test_data)
    if rounds is not None:
        client.set_termination_function(stop_after(rounds), client=client)
    client.set_bm_obj(make_model())


def setup(client: IntegratedClient, **params: str) -> None:
    """The daemon's entry point; parameters index, agents, epochs, rounds (-p KEY=VALUE)."""
    train_data, test_data = load_digits_shard(
        int(params.get("index", "0")), int(params.get("agents", "1"))
    )
    rounds = params.get("rounds")
    configure(
        client,
        train_data,
        test_data,
        epochs=int(params.get("epochs", "1")),
        rounds=int(rounds) if rounds else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(HERE / "config_agent.json"))
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    train_data, test_data = load_digits_shard(args.index, args.agents)
    client = IntegratedClient(config_file=args.config, agent_name=f"keras{args.index}")
    configure(client, train_data, test_data, epochs=args.epochs, rounds=args.rounds)
    client.start()
    print(f"done: {client.training_count} rounds, last metrics {client.last_metrics}")


if __name__ == "__main__":
    main()
