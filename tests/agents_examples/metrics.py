"""Record what each agent sent with its local models: round, sample count and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from agent.client import LoopThread
from common.config import BrokerSettings
from common.errors import FedhiveError
from common.messages import ModelKind, ModelMessage, decode_message
from common.topics import Topics
from common.transport import MqttTransport


@dataclass(frozen=True)
class Sent:
    num_samples: float
    metrics: dict[str, float]


@dataclass
class SentMetrics:
    """``sent[(round, agent)]``: what the agent's local model for that round carried (the
    first copy: a resend after a lost acknowledgement carries the same)."""

    settings: BrokerSettings
    project: str
    aggregator: str
    sent: dict[tuple[int, str], Sent] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout: float = 60.0) -> dict[tuple[int, str], Sent]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.sent) >= count, timeout):
                raise TimeoutError(f"{len(self.sent)} of {count} local models within {timeout} s")
            return dict(self.sent)

    async def run(self, started: asyncio.Event) -> None:
        topics = Topics(self.project)
        client_id = f"{self.project}.metrics-recorder"
        async with MqttTransport(settings=self.settings, client_id=client_id) as t:
            await t.subscribe(topics.all_local(self.aggregator))
            started.set()
            async for incoming in t.messages():
                try:
                    if topics.parse(incoming.topic).chunk:
                        continue  # the metrics travel in the manifest (or the inline model)
                    message = decode_message(incoming.payload)
                except FedhiveError:
                    continue
                if isinstance(message, ModelMessage) and message.kind is ModelKind.LOCAL:
                    with self._cond:
                        self.sent.setdefault(
                            (message.round, message.sender),
                            Sent(message.num_samples, dict(message.metrics)),
                        )
                        self._cond.notify_all()


@contextmanager
def recording_metrics(
    settings: BrokerSettings, project: str, aggregator: str
) -> Iterator[SentMetrics]:
    recorder = SentMetrics(settings, project, aggregator)
    loop = LoopThread("metrics-recorder")

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
