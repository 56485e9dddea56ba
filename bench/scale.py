"""Scale: 1000 lightweight agents against one aggregator, then 4 aggregators × 250 under an
sg-aggregator. Prints one JSON line per scenario and a summary line::

    python bench/scale.py --agents 1000 --processes 8 --rounds 5

Agents are :class:`~agent.session.AgentSession` objects, many per process on one event loop
(``bench/load.py``'s lightweight agents), each with its own broker connection and a heartbeat
every second; every agent sends the small model it received plus a constant each round. Round
r's time is the gap between the monitor receiving model r-1 and model r (the aggregator's
model, or with an sg-aggregator the SG model). CPU seconds (utime + stime) of the broker, the
aggregator(s) and the sg-aggregator cover the rounds, from the base upload to the last model.

Scenarios: ``single`` (one aggregator, every agent's model in every round) and ``sg`` (agents
split evenly over ``--regions`` aggregators started with ``--sg-aggregator``; the SG model of
each round combines every region). Exits 1 unless every round of every scenario run included
every agent.
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
from common.config import (  # noqa: E402
    AgentConfig,
    AggregatorConfig,
    BrokerSettings,
    SgAggregatorConfig,
)
from common.messages import (  # noqa: E402
    AckStatus,
    AggStatusMessage,
    ModelMessage,
    SgStatusMessage,
    decode_message,
)
from common.topics import Topics  # noqa: E402
from common.transport import MqttTransport  # noqa: E402

PROJECT, SG = "scale", "sg"
_TICK = os.sysconf("SC_CLK_TCK")


def _aggregators(regions: int) -> list[str]:
    return [f"aggr{i + 1}" for i in range(regions)]


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
async def _agent(session: AgentSession, rounds: int) -> int:
    accepted = 0
    after: int | None = None
    for _ in range(rounds):
        model = await session.wait_model(after=after, timeout=900)
        after = model.round
        local = {k: v + np.float32(1e-3) for k, v in model.tensors.items()}
        ack = await session.submit(
            local,
            round=model.round + 1,
            num_samples=1.0,
            metrics={"loss": 1.0 / (model.round + 1)},
            framework="numpy",
            ack_timeout=900,
        )
        accepted += ack is not None and ack.status is AckStatus.ACCEPTED
    await session.wait_model(after=after, timeout=900)
    return accepted


async def _agents(args: argparse.Namespace) -> None:
    names = _aggregators(args.regions)
    configs = [
        AgentConfig(
            agent_name=f"agent{i:04d}",
            aggr_ip="127.0.0.1",
            reg_port=args.port,
            project=PROJECT,
            aggregator=names[i % len(names)],
            heartbeat_interval=args.heartbeat,
        )
        for i in range(args.first, args.first + args.count)
    ]
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(AgentSession(config=c)) for c in configs]
        results = await asyncio.gather(*(_agent(s, args.rounds) for s in sessions))
    print(json.dumps({"agents": len(configs), "accepted": sum(results)}), flush=True)


# ---------------------------------------------------------------------------- the monitor
async def _monitor(
    settings: BrokerSettings,
    *,
    agents: int,
    rounds: int,
    regions: int,
    sg: bool,
    base: dict[str, np.ndarray],
    pids: dict[str, int],
) -> dict[str, object]:
    topics = Topics(PROJECT)
    names = _aggregators(regions)
    model_topic = topics.sg_model() if sg else topics.agg_model(names[0])
    arrivals: dict[int, float] = {}
    contributors: dict[int, int] = {}
    active: dict[str, int] = {}
    cpu_start: dict[str, float] = {}
    started = 0.0
    sg_up = False  # the sg-aggregator's status came: it is subscribed to the base model
    async with MqttTransport(settings=settings, client_id=f"{PROJECT}.monitor") as t:
        await t.subscribe(model_topic, topics.all_agg_status(), topics.sg_status())
        messages = t.messages()
        uploaded = False
        while len(arrivals) <= rounds:
            incoming = await asyncio.wait_for(anext(messages), 900)
            if not incoming.payload:
                continue
            message = decode_message(incoming.payload)
            if isinstance(message, AggStatusMessage):
                active[message.sender] = message.active
            sg_up = sg_up or isinstance(message, SgStatusMessage)
            ready = sum(active.get(n, 0) for n in names) >= agents and (sg_up or not sg)
            if not uploaded and ready:
                uploaded = True
                started = time.perf_counter()
                cpu_start = {k: _cpu_seconds(p) for k, p in pids.items()}
                admin = AdminAgent(
                    aggregator_ip_address=settings.host,
                    reg_port=settings.port,
                    project=PROJECT,
                    timeout=120,
                    base_model=BaseModel("scale", base, BaseModelConvFormat.numpy_format),
                )
                await asyncio.to_thread(admin.initialize)
            elif (
                isinstance(message, ModelMessage)
                and incoming.topic == model_topic
                and uploaded
                and not incoming.retain
                and message.round not in arrivals
            ):
                arrivals[message.round] = time.perf_counter()
                contributors[message.round] = (
                    len(message.contributors) + message.contributors_omitted
                )
    wall = time.perf_counter() - started
    cpu = {k: _cpu_seconds(p) - cpu_start[k] for k, p in pids.items()}
    times = [arrivals[r] - arrivals[r - 1] for r in range(1, rounds + 1)]
    figures: dict[str, object] = {
        "round_s": [round(x, 3) for x in times],
        "median_round_s": round(statistics.median(times), 3),
        "max_round_s": round(max(times), 3),
        "contributors": [contributors[r] for r in range(1, rounds + 1)],
        "measured_s": round(wall, 2),
    }
    for name, seconds in cpu.items():
        figures[f"{name}_cpu_s"] = round(seconds, 2)
        figures[f"{name}_cpu_pct"] = round(100 * seconds / wall, 1)
    return figures


def _run(args: argparse.Namespace, *, scenario: str) -> dict[str, object]:
    sg = scenario == "sg"
    regions = args.regions if sg else 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    fedhive = [sys.executable, "-m", "fedhive", "--log-level", "WARNING"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedhive-scale-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(data_dir=work / "broker")
        broker.start()
        procs: list[subprocess.Popen[bytes]] = []
        pids: dict[str, int] = {"broker": broker.pid or 0}
        try:
            settings = BrokerSettings(host=broker.host, port=broker.port)
            if sg:
                sg_config = SgAggregatorConfig(
                    name=SG, project=PROJECT, broker=settings, data_dir=work / SG,
                    log_level="WARNING", aggregator_timeout=60,
                )  # fmt: skip
                (work / "sg.json").write_text(sg_config.model_dump_json())
                procs.append(
                    subprocess.Popen(
                        [*fedhive, "sg-aggregator", "start", "--config", str(work / "sg.json")],
                        env=env,
                    )
                )
                pids["sg_aggregator"] = procs[-1].pid
            for i, name in enumerate(_aggregators(regions)):
                config = AggregatorConfig(
                    name=name,
                    project=PROJECT,
                    broker=settings,
                    data_dir=work / name,
                    log_level="WARNING",
                    store=args.store,
                    # Heartbeats decide presence; generous, so a starved process is not dropped.
                    agent_timeout=30,
                    sg_aggregator=SG if sg else None,
                    max_rounds=0 if sg else args.rounds,
                )
                (work / f"{name}.json").write_text(config.model_dump_json())
                procs.append(
                    subprocess.Popen(
                        [*fedhive, "aggregator", "start", "--config", str(work / f"{name}.json")],
                        env=env,
                    )
                )
                pids["aggregator" if not sg else f"aggregator{i + 1}"] = procs[-1].pid
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
                        *("--regions", str(regions)),
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
                    regions=regions,
                    sg=sg,
                    base=_base(args.params),
                    pids=pids,
                )
            )
            accepted = 0
            for worker in workers:
                out, _ = worker.communicate(timeout=600)
                lines = out.decode().strip().splitlines()
                accepted += json.loads(lines[-1])["accepted"] if lines else 0
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
    complete = (
        figures["contributors"] == [args.agents] * args.rounds
        and accepted == args.agents * args.rounds
    )
    return {
        "scenario": scenario,
        "agents": args.agents,
        "aggregators": regions,
        "processes": args.processes,
        "rounds": args.rounds,
        "heartbeat_s": args.heartbeat,
        "model_bytes": args.params * 4 + 40,
        **figures,
        "acks_accepted": accepted,
        "all_complete": complete,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=8, help="agent processes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--regions", type=int, default=4, help="aggregators in the sg scenario")
    parser.add_argument(
        "--scenario", choices=["single", "sg", "both"], default="both", help="what to run"
    )
    parser.add_argument("--store", action="store_true", help="run the aggregators with a store")
    parser.add_argument(
        "--role", choices=["bench", "agents"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "agents":
        asyncio.run(_agents(args))
        return 0
    scenarios = ["single", "sg"] if args.scenario == "both" else [args.scenario]
    results = [_run(args, scenario=s) for s in scenarios]
    for result in results:
        print(json.dumps(result), flush=True)
    ok = all(r["all_complete"] for r in results)
    print(json.dumps({"scenarios": scenarios, "all_complete": ok}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
