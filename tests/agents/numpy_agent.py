"""A tiny agent process for integration tests: a NumPy dict model, trained by adding a delta.

    python tests/agents/numpy_agent.py --port P --project X --aggregator a1 --name agent0 \
        --rounds 2 --train-seconds 0.2 [--gate DIR] [--delta 1.0] [--samples 10]

``--aggregator auto`` lets it pick its aggregator (and re-home after ``--rehome-timeout``).

It waits for the aggregated model, "trains" for ``--train-seconds`` (heartbeats go on in the
background meanwhile), adds ``--delta`` to every float tensor, sends it, and repeats for
``--rounds`` rounds; then it waits for the last aggregated model and exits 0. With ``--gate
DIR`` it sends its model for round r only once the file ``DIR/r`` exists, so a test decides when.
It prints one line per step on stdout (flushed) for the test's log.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from agent.client import BasicClient
from common.errors import TrainingFinishedError


def tiny_model(rows: int = 2, cols: int = 3) -> dict[str, np.ndarray]:
    return {"w": np.zeros((rows, cols), dtype=np.float32), "b": np.zeros(cols, dtype=np.float32)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--aggregator", default="a1")
    parser.add_argument("--name", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train-seconds", type=float, default=0.0)
    parser.add_argument("--gate", type=Path, default=None)
    parser.add_argument("--delta", type=float, default=1.0)
    parser.add_argument("--samples", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--rehome-timeout", type=float, default=15.0)
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    parser.add_argument("--shape", type=int, nargs=2, default=(2, 3), metavar=("ROWS", "COLS"))
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(f"{time.time():.3f} {args.name}: {text}", flush=True)

    client = BasicClient(
        aggregator_ip_address=args.host,
        reg_port=args.port,
        agent_name=args.name,
        project=args.project,
        aggregator=args.aggregator,
        heartbeat_interval=args.heartbeat,
        rehome_timeout=args.rehome_timeout,
        ack_timeout=args.ack_timeout,
        model_timeout=120,
    )
    try:
        client.set_bm_obj(tiny_model(*args.shape))
        model = client.wait_for_sg_model()
        say(f"got model of round {client.current_round} from {client.aggregator}")
        for _ in range(args.rounds):
            target = (client.current_round or 0) + 1
            say(f"training for round {target}")
            time.sleep(args.train_seconds)  # "training": the heartbeat keeps running meanwhile
            while args.gate is not None and not (args.gate / str(target)).exists():
                time.sleep(0.05)  # held back by the test until it opens the gate
            trained = {k: np.asarray(v + args.delta, dtype=v.dtype) for k, v in model.items()}
            ack = client.send_trained_model(trained, num_samples=args.samples)
            say(
                f"sent round {target} to {client.aggregator}: "
                f"{ack.status.value if ack else 'no ack'}"
            )
            model = client.wait_for_sg_model()
            say(f"got model of round {client.current_round}")
    except TrainingFinishedError as exc:
        say(f"finished: {exc}")
    finally:
        client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
