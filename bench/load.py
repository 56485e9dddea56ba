"""Load: many lightweight agents, 1 s heartbeats, one aggregator, a few rounds (issue 8).

A Mosquitto broker, one aggregator process and P agent processes that each run N/P
:class:`~agent.session.AgentSession` objects on one event loop (heartbeat every second). Every
agent sends a small model each round (the model it received plus a constant: no training), so a
round's time is the platform's: heartbeats, presence, uploads, acks, aggregation, distribution.
The aggregator needs all N models per round (threshold 1). Prints one JSON line::

    python bench/load.py --agents 200 --processes 4 --rounds 5

with each round's time (from global model r-1 to global model r, seen by a monitor), median and
max, the contributors of every round, and the CPU seconds (utime + stime from /proc/PID/stat)
of the broker and of the aggregator from the base upload to the last round, also as % of one
core. Exits 1 unless every round completed with all N agents.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat  # noqa: E402
from agent.session import AgentSession  # noqa: E402
from broker.process import MosquittoBroker  # noqa: E402
from common.config import AgentConfig, AggregatorConfig, BrokerSettings  # noqa: E402
from common.messages import AckStatus, AggStatusMessage, ModelMessage, decode_message  # noqa: E402
from common.topics import Topics  # noqa: E402
from common.transport import MqttTransport  # noqa: E402

PROJECT, AGGREGATOR = "load", "aggr1"
_TICK = os.sysconf("SC_CLK_TCK")


def _base(params: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "weights": rng.standard_normal(params, dtype=np.float32),
        "bias": np.zeros(10, np.float32),
    }


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _TICK


# ---------------------------------------------------------------------------- agent processes
async def _agent(session: AgentSession, rounds: int) -> tuple[int, int]:
    accepted = refused = 0
    after: int | None = None
    for _ in range(rounds):
        model = await session.wait_model(after=after, timeout=600)
        after = model.round
        local = {k: v + np.float32(1e-3) for k, v in model.tensors.items()}
        ack = await session.submit(
            local,
            round=model.round + 1,
            num_samples=1.0,
            metrics={"loss": 1.0 / (model.round + 1)},
            framework="numpy",
            ack_timeout=600,
        )
        if ack is not None and ack.status is AckStatus.ACCEPTED:
            accepted += 1
        else:
            refused += 1
    await session.wait_model(after=after, timeout=600)
    return accepted, refused


async def _agents(first: int, count: int, port: int, rounds: int, heartbeat: float) -> None:
    configs = [
        AgentConfig(
            agent_name=f"load{first + i:04d}",
            aggr_ip="127.0.0.1",
            reg_port=port,
            project=PROJECT,
            aggregator=AGGREGATOR,
            heartbeat_interval=heartbeat,
        )
        for i in range(count)
    ]
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(AgentSession(config=c)) for c in configs]
        results = await asyncio.gather(*(_agent(s, rounds) for s in sessions))
    accepted = sum(a for a, _ in results)
    refused = sum(r for _, r in results)
    print(json.dumps({"agents": count, "accepted": accepted, "refused": refused}), flush=True)


# ---------------------------------------------------------------------------- the monitor
async def _monitor(
    settings: BrokerSettings,
    *,
    agents: int,
    rounds: int,
    base: dict[str, np.ndarray],
    broker_pid: int,
    aggregator_pid: int,
) -> dict[str, object]:
    topics = Topics(PROJECT)
    arrivals: dict[int, float] = {}
    contributors: dict[int, int] = {}
    cpu_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    async with MqttTransport(settings=settings, client_id=f"{PROJECT}.monitor") as t:
        await t.subscribe(topics.agg_model(AGGREGATOR), topics.agg_status(AGGREGATOR))
        messages = t.messages()
        uploaded = False
        while len(arrivals) <= rounds:
            incoming = await asyncio.wait_for(anext(messages), 900)
            if not incoming.payload:
                continue
            message = decode_message(incoming.payload)
            if isinstance(message, AggStatusMessage) and not uploaded and message.active >= agents:
                uploaded = True
                cpu_start = (
                    time.perf_counter(),
                    _cpu_seconds(broker_pid),
                    _cpu_seconds(aggregator_pid),
                )
                admin = AdminAgent(
                    aggregator_ip_address=settings.host,
                    reg_port=settings.port,
                    project=PROJECT,
                    timeout=120,
                    base_model=BaseModel("load", base, BaseModelConvFormat.numpy_format),
                )
                await asyncio.to_thread(admin.initialize)
            elif (
                isinstance(message, ModelMessage)
                and uploaded
                and not incoming.retain
                and message.round not in arrivals
            ):
                arrivals[message.round] = time.perf_counter()
                contributors[message.round] = (
                    len(message.contributors) + message.contributors_omitted
                )
    wall = time.perf_counter() - cpu_start[0]
    broker_cpu = _cpu_seconds(broker_pid) - cpu_start[1]
    aggregator_cpu = _cpu_seconds(aggregator_pid) - cpu_start[2]
    times = [arrivals[r] - arrivals[r - 1] for r in range(1, rounds + 1)]
    return {
        "round_s": [round(x, 3) for x in times],
        "median_round_s": round(statistics.median(times), 3),
        "max_round_s": round(max(times), 3),
        "contributors": [contributors[r] for r in range(1, rounds + 1)],
        "measured_s": round(wall, 2),
        "broker_cpu_s": round(broker_cpu, 2),
        "broker_cpu_pct": round(100 * broker_cpu / wall, 1),
        "aggregator_cpu_s": round(aggregator_cpu, 2),
        "aggregator_cpu_pct": round(100 * aggregator_cpu / wall, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument(
        "--role", choices=["bench", "agents"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "agents":
        asyncio.run(_agents(args.first, args.count, args.port, args.rounds, args.heartbeat))
        return 0

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedhive-load-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(data_dir=work / "broker")
        broker.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            settings = BrokerSettings(host=broker.host, port=broker.port)
            agg = AggregatorConfig(
                name=AGGREGATOR,
                project=PROJECT,
                broker=settings,
                data_dir=work / "agg",
                log_level="WARNING",
                max_rounds=args.rounds,
                # Heartbeats decide presence; generous, so a starved process is not dropped.
                agent_timeout=30,
            )
            (work / "agg.json").write_text(agg.model_dump_json())
            aggregator = subprocess.Popen(
                [
                    *(sys.executable, "-m", "fedhive", "--log-level", "WARNING"),
                    *("aggregator", "start", "--config", str(work / "agg.json")),
                ],
                env=env,
            )
            procs.append(aggregator)
            share, extra = divmod(args.agents, args.processes)
            first = 0
            workers = []
            for p in range(args.processes):
                count = share + (1 if p < extra else 0)
                worker = subprocess.Popen(
                    [
                        *(sys.executable, __file__, "--role", "agents", "--first", str(first)),
                        *("--count", str(count), "--port", str(broker.port)),
                        *("--rounds", str(args.rounds), "--heartbeat", str(args.heartbeat)),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                )
                procs.append(worker)
                workers.append(worker)
                first += count
            figures = asyncio.run(
                _monitor(
                    settings,
                    agents=args.agents,
                    rounds=args.rounds,
                    base=_base(args.params),
                    broker_pid=broker.pid or 0,
                    aggregator_pid=aggregator.pid,
                )
            )
            accepted = 0
            for worker in workers:
                out, _ = worker.communicate(timeout=300)
                lines = out.decode().strip().splitlines()
                accepted += json.loads(lines[-1])["accepted"] if lines else 0
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
    contributors = figures["contributors"]
    complete = contributors == [args.agents] * args.rounds and accepted == args.agents * args.rounds
    result = {
        "agents": args.agents,
        "processes": args.processes,
        "rounds": args.rounds,
        "heartbeat_s": args.heartbeat,
        "model_bytes": args.params * 4 + 40,
        **figures,
        "acks_accepted": accepted,
        "all_complete": complete,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(result), flush=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
