"""Helpers for integration tests: run an aggregator in a background loop, record what crosses
the broker, compute the expected aggregate independently."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import LoopThread
from aggregator.service import AggregatorService
from broker.process import MosquittoBroker
from common.codec import Array, decode, encode
from common.config import AggregatorConfig, BrokerSettings
from common.errors import FedhiveError
from common.exchange import ModelReceiver
from common.messages import (
    AckStatus,
    AgentState,
    AgentStatusMessage,
    ModelKind,
    ModelMessage,
    decode_message,
    encode_message,
)
from common.topics import Topics
from common.transport import InMemoryBus, InMemoryTransport, MqttTransport

ROOT = Path(__file__).resolve().parents[1]


def broker_settings(broker: MosquittoBroker, **extra: Any) -> BrokerSettings:
    return BrokerSettings(host=broker.host, port=broker.port, **extra)


@contextmanager
def running_aggregator(config: AggregatorConfig) -> Iterator[AggregatorService]:
    """An AggregatorService serving in a background event loop until the block ends."""
    loop = LoopThread(f"aggregator-{config.name}")
    service = AggregatorService(config=config)
    ready = threading.Event()

    async def serve() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(service.run(ready=started))
        await started.wait()
        ready.set()
        await task

    future = asyncio.run_coroutine_threadsafe(serve(), loop.loop)
    try:
        if not ready.wait(15):
            raise RuntimeError(f"aggregator did not start: {future}")
        yield service
    finally:
        loop.loop.call_soon_threadsafe(service.stop)
        future.result(15)
        loop.close()


@dataclass
class Recorder:
    """Subscribes to a project's model traffic and keeps every decoded local and global model."""

    settings: BrokerSettings
    project: str
    aggregator: str
    locals: dict[int, dict[str, tuple[float, dict[str, Array]]]] = field(default_factory=dict)
    globals: dict[int, tuple[ModelMessage, dict[str, Array]]] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for_global(
        self, round: int, timeout: float = 60.0
    ) -> tuple[ModelMessage, dict[str, Array]]:
        with self._cond:
            if not self._cond.wait_for(lambda: round in self.globals, timeout):
                raise TimeoutError(f"no global model for round {round} within {timeout} s")
            return self.globals[round]

    async def run(self, started: asyncio.Event) -> None:
        topics = Topics(self.project)
        receiver = ModelReceiver(max_bytes=1 << 31)
        async with MqttTransport(settings=self.settings, client_id=f"{self.project}.recorder") as t:
            model_topic = topics.agg_model(self.aggregator)
            await t.subscribe(
                topics.all_local(self.aggregator), model_topic, Topics.chunks(model_topic)
            )
            started.set()
            async for incoming in t.messages():
                parsed = topics.parse(incoming.topic)
                try:  # hostile tests publish garbage on these topics: record only what decodes
                    if parsed.chunk:
                        received = receiver.chunk(incoming.payload)
                    else:
                        message = decode_message(incoming.payload)
                        assert isinstance(message, ModelMessage)
                        received = receiver.announce(incoming.topic, message)
                    if received is None:
                        continue
                    tensors, _ = decode(bytearray(received.payload))
                except FedhiveError:
                    continue
                m = received.message
                with self._cond:
                    if m.kind is ModelKind.LOCAL:
                        self.locals.setdefault(m.round, {})[m.sender] = (m.num_samples, tensors)
                    else:
                        self.globals[m.round] = (m, tensors)
                    self._cond.notify_all()


@contextmanager
def recording(settings: BrokerSettings, project: str, aggregator: str) -> Iterator[Recorder]:
    recorder = Recorder(settings, project, aggregator)
    loop = LoopThread("recorder")

    async def start() -> asyncio.Task[None]:
        started = asyncio.Event()
        task = asyncio.create_task(recorder.run(started))
        await asyncio.wait_for(started.wait(), 10)
        return task

    task = loop.run(start(), timeout=15)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        yield recorder
    finally:
        loop.run(stop(), timeout=15)
        loop.close()


def weighted_mean(models: Mapping[str, tuple[float, Mapping[str, Array]]]) -> dict[str, Array]:
    """Sample-weighted mean computed independently of fedhive's FedAvg (float64, then the
    documented integer rule: round half-to-even)."""
    weights = np.array([w for w, _ in models.values()], dtype=np.float64)
    names = next(iter(models.values()))[1].keys()
    out: dict[str, Array] = {}
    for name in names:
        stack = np.stack([np.asarray(t[name], dtype=np.float64) for _, t in models.values()])
        mean = np.tensordot(weights / weights.sum(), stack, axes=1)
        dtype = next(iter(models.values()))[1][name].dtype
        out[name] = np.rint(mean).astype(dtype) if dtype.kind in "iub" else mean
    return out


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=python_env()
        )


# ------------------------------------------------------------------ in memory (no broker)
@dataclass
class Peer:
    """Agents (and an admin) on an in-memory bus: what they publish, what comes back."""

    transport: InMemoryTransport
    topics: Topics
    got: list[tuple[str, Any]] = field(default_factory=list)

    async def collect(self) -> None:
        async for incoming in self.transport.messages():
            if incoming.payload:
                self.got.append((incoming.topic, decode_message(incoming.payload)))

    def on(self, topic: str) -> list[Any]:
        return [m for t, m in self.got if t == topic]

    def acks(self, agent: str) -> list[AckStatus]:
        return [m.status for m in self.on(self.topics.agent_inbox(agent)) if hasattr(m, "status")]

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        for _ in range(250):
            if predicate():
                return
            await asyncio.sleep(0.02)  # a polling period
        raise AssertionError(f"timed out waiting for {what}: {self.got}")

    async def online(self, *agents: str) -> None:
        for agent in agents:
            status = AgentStatusMessage(
                project=self.topics.project, sender=agent, state=AgentState.ONLINE, aggregator="a1"
            )
            await self.transport.publish(
                self.topics.agent_status(agent), encode_message(status), retain=True
            )

    async def base(self, tensors: dict[str, Array]) -> None:
        message = ModelMessage(
            project=self.topics.project, sender="admin", kind=ModelKind.BASE, round=0,
            data=encode(tensors),
        )  # fmt: skip
        await self.transport.publish(self.topics.base(), encode_message(message), retain=True)

    async def local(self, agent: str, round: int, tensors: dict[str, Array], n: float) -> None:
        message = ModelMessage(
            project=self.topics.project, sender=agent, kind=ModelKind.LOCAL, round=round,
            num_samples=n, metrics={"accuracy": n / 100}, data=encode(tensors),
        )  # fmt: skip
        await self.transport.publish(self.topics.agg_local("a1", agent), encode_message(message))


@contextlib.asynccontextmanager
async def peer_on(bus: InMemoryBus, project: str) -> AsyncIterator[Peer]:
    topics = Topics(project)
    async with InMemoryTransport(bus=bus) as transport:
        await transport.subscribe(f"{topics.root}/agents/+/inbox", topics.agg_model("a1"))
        peer = Peer(transport, topics)
        collector = asyncio.create_task(peer.collect())
        try:
            yield peer
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)


@contextlib.asynccontextmanager
async def serving(
    config: AggregatorConfig,
    bus: InMemoryBus,
    *,
    transport: InMemoryTransport | None = None,
    persist: bool = True,
) -> AsyncIterator[AggregatorService]:
    """An aggregator serving on ``bus`` (through ``transport`` if given) until the block ends."""
    service = AggregatorService(
        config=config, transport=transport or InMemoryTransport(bus=bus), persist=persist
    )
    ready = asyncio.Event()
    task = asyncio.create_task(service.run(ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 10)
