"""Round overhead of a real federation: platform cost only, no training.

A Mosquitto broker, one aggregator process (``fedhive aggregator start``) and N agent processes;
each agent adds a tiny delta to the model it receives instead of training, so a round's time is
serialization, transport, aggregation and distribution. Prints one JSON line::

    python bench/round_overhead.py --agents 10 --params 1000000 --rounds 20 --warmup 3

Round r's time is measured by a monitor as the gap between the arrival of global model r-1's
announcement and global model r's. The first ``--warmup`` rounds (processes starting up, caches
filling) are run but left out of the figures. Bytes are the broker's socket reads and writes
(/proc/PID/io rchar/wchar) over the whole run; ``wire_ratio`` divides them by what the model
transfers alone must move (1.0: no re-sends, no double encodes). Peak RSS is VmHWM of the
aggregator, of the broker and of the largest agent; CPU seconds (utime + stime) are those of
the measured rounds.

The aggregator runs without its store by default (``--store`` turns it on): the store writes and
fsyncs every accepted model, which measures the disk, not the platform.
``--compression`` packs the agents' updates (``AggregatorConfig.compression``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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
from common.codec import encode_frame  # noqa: E402
from common.config import AgentConfig, AggregatorConfig, BrokerSettings  # noqa: E402
from common.messages import AggStatusMessage, ModelMessage, decode_message  # noqa: E402
from common.packing import COMPRESSIONS, pack_update  # noqa: E402
from common.topics import Topics  # noqa: E402
from common.transport import MqttTransport  # noqa: E402

PROJECT, AGGREGATOR = "bench", "aggr1"
DELTA = np.float32(1e-3)
_TICK = os.sysconf("SC_CLK_TCK")


def _base(params: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"weights": rng.standard_normal(params, dtype=np.float32)}


async def _agent(config: AgentConfig, rounds: int) -> None:
    async with AgentSession(config=config) as session:
        after: int | None = None
        for _ in range(rounds):
            model = await session.wait_model(after=after, timeout=600)
            after = model.round
            local = {k: v + DELTA for k, v in model.tensors.items()}  # "training"
            await session.submit(
                local,
                round=model.round + 1,
                num_samples=1.0,
                metrics={},
                framework="numpy",
                ack_timeout=None,
            )
        await session.wait_model(after=after, timeout=600)


def _proc_stat(pid: int, field: str, file: str) -> int:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _io(pid: int) -> tuple[int, int]:
    return _proc_stat(pid, "rchar:", "io"), _proc_stat(pid, "wchar:", "io")


def _peak_rss_mib(pid: int) -> float:
    return _proc_stat(pid, "VmHWM:", "status") / 1024


def _cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class _Pids:
    def __init__(self, broker: int, aggregator: int, agents: list[int]) -> None:
        self.broker, self.aggregator, self.agents = broker, aggregator, agents

    def cpu(self) -> tuple[float, float, float]:
        return (
            _cpu_s(self.broker),
            _cpu_s(self.aggregator),
            sum(_cpu_s(p) for p in self.agents),
        )


async def _monitor(
    settings: BrokerSettings,
    *,
    total: int,
    warmup: int,
    agents: int,
    base: dict[str, np.ndarray],
    pids: _Pids,
) -> dict[str, object]:
    topics = Topics(PROJECT)
    arrivals: dict[int, float] = {}
    io_start = (0, 0)
    cpu_marks: dict[int, tuple[float, float, float]] = {}
    async with MqttTransport(settings=settings, client_id=f"{PROJECT}.monitor") as t:
        await t.subscribe(topics.agg_model(AGGREGATOR), topics.agg_status(AGGREGATOR))
        messages = t.messages()
        uploaded = False
        while len(arrivals) <= total:
            incoming = await asyncio.wait_for(anext(messages), 900)
            if not incoming.payload:
                continue
            message = decode_message(incoming.payload)
            if isinstance(message, AggStatusMessage) and not uploaded and message.active >= agents:
                uploaded = True
                io_start = _io(pids.broker)
                admin = AdminAgent(
                    aggregator_ip_address=settings.host,
                    reg_port=settings.port,
                    project=PROJECT,
                    timeout=300,
                    base_model=BaseModel("bench", base, BaseModelConvFormat.numpy_format),
                )
                await asyncio.to_thread(admin.initialize)
            elif (
                isinstance(message, ModelMessage)
                and uploaded
                and not incoming.retain
                and message.round not in arrivals
            ):
                arrivals[message.round] = time.perf_counter()
                if message.round in (warmup, total):
                    cpu_marks[message.round] = pids.cpu()
    measured = range(warmup + 1, total + 1)
    times = [arrivals[r] - arrivals[r - 1] for r in measured]
    wall = arrivals[total] - arrivals[warmup]
    cpu = [b - a for a, b in zip(cpu_marks[warmup], cpu_marks[total], strict=True)]
    return {
        "median_round_s": round(statistics.median(times), 4),
        "max_round_s": round(max(times), 4),
        "round_s": [round(x, 4) for x in times],
        "io_start": io_start,
        "cpu_s_per_round": {
            "broker": round(cpu[0] / len(times), 3),
            "aggregator": round(cpu[1] / len(times), 3),
            "agents": round(cpu[2] / len(times), 3),
        },
        "cpu_cores_busy": round(sum(cpu) / wall, 2),
    }


def _expected_bytes(agents: int, total: int, model: int, update: int, chunk_size: int) -> int:
    """Bytes the model transfers alone move through the broker, counted at both of its
    sockets: the base (admin in, aggregator out), model 0 (1 in, N out; N + 1 with the monitor
    when the model comes inline, not as chunks it does not subscribe to), then each round N
    updates (in and out) and the new model (1 in, N or N + 1 out)."""
    fan_out = (1 + agents + (model <= chunk_size)) * model
    return 2 * model + fan_out + total * (2 * agents * update + fan_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=3, help="rounds run first, not measured")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--compression", choices=COMPRESSIONS, default=None)
    parser.add_argument("--store", action="store_true", help="run the aggregator with its store")
    parser.add_argument(
        "--receive-budget", type=int, default=None, help="AggregatorConfig.receive_budget (bytes)"
    )
    parser.add_argument(
        "--role", choices=["bench", "agent"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    total = args.warmup + args.rounds

    if args.role == "agent":
        config = AgentConfig(
            agent_name=f"agent{args.index}",
            aggr_ip="127.0.0.1",
            reg_port=args.port,
            project=PROJECT,
            aggregator=AGGREGATOR,
            chunk_size=args.chunk_size,
            heartbeat_interval=5.0,
        )
        asyncio.run(_agent(config, total))
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = _base(args.params)
    model_bytes = memoryview(encode_frame(base)).nbytes
    update_bytes = memoryview(pack_update(base, args.compression)).nbytes
    with tempfile.TemporaryDirectory(prefix="fedhive-bench-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(data_dir=work / "broker")
        broker.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            settings = BrokerSettings(
                host=broker.host, port=broker.port, chunk_size=args.chunk_size
            )
            agg = AggregatorConfig(
                name=AGGREGATOR,
                project=PROJECT,
                broker=settings,
                data_dir=work / "agg",
                log_level="WARNING",
                store=args.store,
                compression=args.compression,
                **({} if args.receive_budget is None else {"receive_budget": args.receive_budget}),
            )
            (work / "agg.json").write_text(agg.model_dump_json())
            procs.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "fedhive", "--log-level", "WARNING"),
                        *("aggregator", "start", "--config", str(work / "agg.json")),
                    ],
                    env=env,
                )
            )
            for i in range(args.agents):
                procs.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, __file__, "--role", "agent", "--index", str(i)),
                            *("--port", str(broker.port), "--rounds", str(args.rounds)),
                            *("--warmup", str(args.warmup), "--chunk-size", str(args.chunk_size)),
                        ],
                        env=env,
                    )
                )
            started = time.perf_counter()
            pids = _Pids(broker.pid or 0, procs[0].pid, [p.pid for p in procs[1:]])
            figures = asyncio.run(
                _monitor(
                    settings,
                    total=total,
                    warmup=args.warmup,
                    agents=args.agents,
                    base=base,
                    pids=pids,
                )
            )
            for proc in procs[1:]:
                proc.wait(timeout=300)  # each has the last model: every transfer is done
            # The agents are the only children waited for so far: the largest of them.
            agent_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            io_start = figures.pop("io_start")
            io_end = _io(pids.broker)
            bytes_in, bytes_out = io_end[0] - io_start[0], io_end[1] - io_start[1]  # type: ignore[index]
            moved = bytes_in + bytes_out
            expected = _expected_bytes(
                args.agents, total, model_bytes, update_bytes, args.chunk_size
            )
            result = {
                "agents": args.agents,
                "params": args.params,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "compression": args.compression,
                "store": args.store,
                **figures,
                "broker_bytes_in": bytes_in,
                "broker_bytes_out": bytes_out,
                "model_bytes": model_bytes,
                "update_bytes": update_bytes,
                "wire_ratio": round(moved / expected, 3),
                "aggregator_peak_rss_mib": round(_peak_rss_mib(procs[0].pid), 1),
                "broker_peak_rss_mib": round(_peak_rss_mib(broker.pid or 0), 1),
                "agent_peak_rss_mib": round(agent_rss, 1),
                "wall_s": round(time.perf_counter() - started, 2),
            }
            print(json.dumps(result), flush=True)
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


if __name__ == "__main__":
    main()
