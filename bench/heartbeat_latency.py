"""How long an aggregator takes to handle a heartbeat while a large model streams through it.

A Mosquitto broker, an aggregator (in this process, on its own event loop thread), one trainer
agent process that sends back a large model (``--params`` float32, 200 MB by default) each
round, and a second agent that only sends a heartbeat every ``--period`` seconds (QoS 0, from
this process's own event loop). Threshold 0.5: the trainer's model completes each round, so the
heartbeats cover the base going out, the uploads coming in, the aggregation and the new models
going out. Prints one JSON line::

    python bench/heartbeat_latency.py --params 50000000 --rounds 3

A heartbeat's wait is the time from its sending to the aggregator's handler (one clock: the
same process). ``upload`` and ``publication`` are the heartbeats sent while the trainer's chunks
arrived at the aggregator and while the aggregator published the new model's chunks; ``all``
is every heartbeat from the base's upload to the trainer's exit. Most of a wait is queueing:
the broker sends a client's messages in order, so a heartbeat waits behind the chunks already
on their way on the aggregator's connection (for a pulled upload the receiver's window bounds
them; the admin's base, pushed, is not bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat  # noqa: E402
from agent.client import LoopThread  # noqa: E402
from aggregator.service import AggregatorService  # noqa: E402
from bench.round_overhead import _agent as trainer_agent  # noqa: E402
from broker.process import MosquittoBroker  # noqa: E402
from common.config import AgentConfig, AggregatorConfig, BrokerSettings  # noqa: E402
from common.messages import (  # noqa: E402
    AgentState,
    AgentStatusMessage,
    HeartbeatMessage,
    encode_message,
)
from common.topics import CHUNK_SUFFIX, Topics  # noqa: E402
from common.transport import MqttTransport  # noqa: E402

PROJECT, AGGREGATOR = "hbbench", "aggr1"
#: Chunk events further apart than this (seconds) belong to different streams.
GAP = 0.25
#: Shorter bursts (seconds) are stray re-sends, not a model streaming.
STREAM = 0.05


def _bursts(times: list[float]) -> list[tuple[float, float]]:
    """``times`` split where they pause for more than GAP: (first, last) of each burst that
    lasted at least STREAM."""
    bursts: list[tuple[float, float]] = []
    for t in sorted(times):
        if bursts and t - bursts[-1][1] <= GAP:
            bursts[-1] = (bursts[-1][0], t)
        else:
            bursts.append((t, t))
    return [b for b in bursts if b[1] - b[0] >= STREAM]


def _figures(waits: list[float]) -> dict[str, float | int]:
    if not waits:
        return {"heartbeats": 0}
    ms = sorted(w * 1000 for w in waits)
    return {
        "heartbeats": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1),
        "max_ms": round(ms[-1], 1),
    }


class _Recorder:
    """Times of heartbeats handled and chunk frames received and published by the aggregator
    (appended on its loop thread only, read once it is done: no lock needed)."""

    def __init__(self, service: AggregatorService) -> None:
        self.handled: list[tuple[float, float]] = []  # (sent, handled)
        self.received: list[float] = []
        self.published: list[float] = []
        handle, receive = service._on_heartbeat, service._receiver.chunk

        async def on_heartbeat(message: HeartbeatMessage) -> None:
            if message.sender == "beat":  # not the trainer's own
                self.handled.append((message.ts, time.time()))
            await handle(message)

        def on_chunk(payload: Any, **kwargs: Any) -> Any:
            self.received.append(time.time())
            return receive(payload, **kwargs)

        service._on_heartbeat = on_heartbeat  # type: ignore[method-assign]
        service._receiver.chunk = on_chunk  # type: ignore[method-assign,assignment]

    def watch_publish(self, service: AggregatorService) -> None:
        transport = service._transport
        assert transport is not None
        publish = transport.publish

        async def timed(topic: str, payload: Any, **kwargs: Any) -> None:
            await publish(topic, payload, **kwargs)
            if topic.endswith("/" + CHUNK_SUFFIX):
                self.published.append(time.time())

        transport.publish = timed  # type: ignore[method-assign]


async def _beat(settings: BrokerSettings, period: float, sent: list[float]) -> None:
    topics = Topics(PROJECT)
    async with MqttTransport(settings=settings) as beater:
        online = AgentStatusMessage(
            project=PROJECT, sender="beat", state=AgentState.ONLINE, aggregator=AGGREGATOR
        )
        await beater.publish(topics.agent_status("beat"), encode_message(online), retain=True)
        while True:
            message = HeartbeatMessage(project=PROJECT, sender="beat")
            sent.append(message.ts)
            await beater.publish(topics.agent_heartbeat("beat"), encode_message(message), qos=0)
            await asyncio.sleep(period)  # the heartbeats' period


async def _run(args: argparse.Namespace, broker: MosquittoBroker, work: Path) -> dict[str, Any]:
    settings = BrokerSettings(host=broker.host, port=broker.port)
    config = AggregatorConfig(
        name=AGGREGATOR,
        project=PROJECT,
        broker=settings,
        data_dir=work / "agg",
        store=False,
        threshold=0.5,
        log_level="WARNING",
    )
    loop = LoopThread("aggregator")
    service = AggregatorService(config=config)
    recorder = _Recorder(service)
    if args.window is not None:
        service._receiver.window = args.window
    ready = threading.Event()

    async def serve() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(service.run(ready=started))
        await started.wait()
        recorder.watch_publish(service)
        ready.set()
        await task

    serving = asyncio.run_coroutine_threadsafe(serve(), loop.loop)
    sent: list[float] = []
    beating: asyncio.Task[None] | None = None
    trainer: asyncio.subprocess.Process | None = None
    try:
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError(f"the aggregator did not start: {serving}")
        beating = asyncio.create_task(_beat(settings, args.period, sent))
        trainer = await asyncio.create_subprocess_exec(
            *(sys.executable, __file__, "--role", "trainer"),
            *("--port", str(broker.port), "--rounds", str(args.rounds)),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.monotonic() + 60
        while service.engine.active < 2:  # the trainer and the heartbeat sender are online
            if time.monotonic() > deadline:
                raise RuntimeError("the agents did not come online")
            await asyncio.sleep(0.05)
        started = time.time()
        # The admin uploads the base from its own process, as it would in a federation: in
        # this one, its encoding and sending would compete with the aggregator for the GIL.
        admin = await asyncio.create_subprocess_exec(
            *(sys.executable, __file__, "--role", "admin"),
            *("--port", str(broker.port), "--params", str(args.params)),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if await asyncio.wait_for(admin.wait(), 600) != 0:
            raise RuntimeError(f"the base upload failed ({admin.returncode})")
        code = await asyncio.wait_for(trainer.wait(), 900)
        ended = time.time()
        if code != 0:
            raise RuntimeError(f"the trainer exited with {code}")
        expected = len([s for s in sent if started <= s <= ended])
        deadline = time.monotonic() + 10
        while len([s for s, _ in recorder.handled if started <= s <= ended]) < expected:
            if time.monotonic() > deadline:
                break  # lost heartbeats: reported below
            await asyncio.sleep(0.02)
    finally:
        if beating is not None:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        if trainer is not None and trainer.returncode is None:
            trainer.kill()
            await trainer.wait()
        loop.loop.call_soon_threadsafe(service.stop)
        await asyncio.to_thread(serving.result, 30)
        loop.close()

    waits = [(s, h - s) for s, h in recorder.handled if started <= s <= ended]
    uploads = _bursts([t for t in recorder.received if t >= started])
    publications = _bursts([t for t in recorder.published if t >= started])

    def during(bursts: list[tuple[float, float]]) -> list[float]:
        return [w for s, w in waits if any(a <= s <= b for a, b in bursts)]

    return {
        "params": args.params,
        "model_mib": round(args.params * 4 / (1 << 20), 1),
        "rounds": args.rounds,
        "period_s": args.period,
        "window_bytes": service._receiver.window,
        "sent": expected,
        "lost": expected - len(waits),
        "rounds_completed": len(service.results),
        "all": _figures([w for _, w in waits]),
        "upload": {
            **_figures(during(uploads)),
            "streams": len(uploads),
            "stream_s": [round(b - a, 2) for a, b in uploads],
        },
        "publication": {
            **_figures(during(publications)),
            "streams": len(publications),
            "stream_s": [round(b - a, 2) for a, b in publications],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50_000_000, help="float32 parameters")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--period", type=float, default=0.02, help="seconds between heartbeats")
    parser.add_argument(
        "--window", type=int, default=None, help="the aggregator's receive window (bytes)"
    )
    parser.add_argument(
        "--role", choices=["bench", "trainer", "admin"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "trainer":
        config = AgentConfig(
            agent_name="trainer",
            aggr_ip="127.0.0.1",
            reg_port=args.port,
            project=PROJECT,
            aggregator=AGGREGATOR,
            heartbeat_interval=5.0,
        )
        asyncio.run(trainer_agent(config, args.rounds))  # adds a tiny delta
        return
    if args.role == "admin":
        AdminAgent(
            aggregator_ip_address="127.0.0.1",
            reg_port=args.port,
            project=PROJECT,
            timeout=600,
            base_model=BaseModel(
                "bench", {"w": np.zeros(args.params, np.float32)}, BaseModelConvFormat.numpy_format
            ),
        ).initialize()
        return

    with tempfile.TemporaryDirectory(prefix="fedhive-hb-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(data_dir=work / "broker")
        broker.start()
        try:
            result = asyncio.run(_run(args, broker, work))
        finally:
            broker.stop()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
