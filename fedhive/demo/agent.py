"""One demo agent process: ``python -m fedhive.demo.agent --config FILE --index I --agents N``."""

from __future__ import annotations

import argparse
import logging

from agent.client import BasicClient
from fedhive.demo.task import evaluate, load_digits_split, make_model, shard, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--aggregator", default=None, help="overrides the config's aggregator")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    split = load_digits_split()
    x, y = shard(split, args.index, args.agents)
    client = BasicClient(
        config_file=args.config, agent_name=f"agent{args.index}", aggregator=args.aggregator
    )
    try:
        client.set_bm_obj(make_model())
        model = client.wait_for_sg_model()
        for r in range(args.rounds):
            loss = train(model, x, y, epochs=args.epochs, seed=1000 * args.index + r)
            acc, _ = evaluate(model, x, y)
            client.send_trained_model(
                model, {"accuracy": acc, "loss_training": loss}, num_samples=len(y)
            )
            model = client.wait_for_sg_model()
    finally:
        client.disconnect()


if __name__ == "__main__":
    main()
