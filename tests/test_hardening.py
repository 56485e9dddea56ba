"""Input hardening and bounded receiving (issue 8): rejection accounting and its log limits,
the model receiver's size, replay and transfer limits, the spec's size bounds, and the MQTT
transport's bounded receive buffer and persistent sessions (the last ones over a real broker)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import numpy as np
import pytest
from support import broker_settings

from aggregator.service import WILL_GRACE, AggregatorService
from broker.process import MosquittoBroker
from common.chunking import iter_chunk_frames, make_manifest
from common.codec import ModelSpec, encode
from common.config import AggregatorConfig
from common.errors import FrameError, MessageError
from common.exchange import ModelReceiver
from common.messages import (
    AgentState,
    AgentStatusMessage,
    ModelKind,
    ModelMessage,
    PresenceState,
    TransferInfo,
    encode_message,
)
from common.rejections import RejectionLog
from common.topics import Topics
from common.transport import (
    EXPRESS_RESERVE_BYTES,
    RECEIVE_BUFFER_BYTES,
    InMemoryBus,
    InMemoryTransport,
    MqttTransport,
    Session,
)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _log() -> tuple[RejectionLog, _Clock, logging.Logger]:
    clock = _Clock()
    logger = logging.getLogger("fedhive.test.rejections")
    return RejectionLog(logger, burst=2, max_lines=5, period=60, clock=clock), clock, logger


def test_every_rejection_is_counted_once_by_kind(caplog: pytest.LogCaptureFixture) -> None:
    rejections, _, _ = _log()

    for i in range(10):
        rejections.reject("MessageError", f"agent{i % 2}", "bad %d", i)
    rejections.reject("FrameError", "agent0", "bad frame")
    rejections.reject("TransportError", "agent0", "no answer", count=False)

    assert rejections.counts == {"MessageError": 10, "FrameError": 1}
    assert rejections.total == 11


def test_lines_are_limited_per_source_and_in_all_then_summarised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    rejections, clock, _ = _log()
    caplog.set_level(logging.WARNING, logger="fedhive.test.rejections")

    # Execute: 1000 rejections from 20 sources within one period, then the period ends.
    for i in range(1000):
        rejections.reject("MessageError", f"agent{i % 20}", "bad message %d", i)
    within = len(caplog.records)
    clock.now = 61
    rejections.flush()

    # Assert: 5 lines (2 per source at most), then one summary line for all the rest.
    assert within == 5
    assert [r.getMessage() for r in caplog.records[:2]] == ["bad message 0", "bad message 1"]
    summary = caplog.records[-1].getMessage()
    assert len(caplog.records) == 6
    assert "suppressed 995 similar rejections from 20 sources" in summary
    assert "MessageError: 995" in summary


def test_a_few_suppressed_sources_are_summarised_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rejections, clock, _ = _log()
    caplog.set_level(logging.WARNING, logger="fedhive.test.rejections")
    for _ in range(4):
        rejections.reject("FrameError", "agent7", "bad chunk")
    clock.now = 60
    rejections.reject("FrameError", "agent7", "bad chunk")  # a new period starts with it

    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bad chunk",
        "bad chunk",
        "suppressed 2 similar rejections (FrameError) from agent7 in 60 s",
        "bad chunk",
    ]


def test_an_internal_error_keeps_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    rejections, _, _ = _log()
    caplog.set_level(logging.WARNING, logger="fedhive.test.rejections")

    for _ in range(3):
        try:
            raise KeyError("bug")
        except KeyError as exc:
            rejections.internal("agent1", "internal error on %s", "topic", exc=exc)

    assert rejections.counts == {"InternalError": 3}
    assert [r.exc_info is not None for r in caplog.records] == [True, False, False]
    assert "KeyError" in caplog.records[1].getMessage()


# ----------------------------------------------------------------------------- the receiver
def _tensors() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(12, dtype=np.float32).reshape(4, 3),
        "b": np.zeros(3, np.float32),
        "steps": np.array(0, np.int64),
    }


def _announced(payload: bytes, chunk_size: int = 64, **fields: object) -> ModelMessage:
    manifest = make_manifest(payload, chunk_size)
    return ModelMessage(
        project="p",
        sender="agent1",
        kind=ModelKind.LOCAL,
        round=1,
        transfer=TransferInfo.of(manifest),
        **fields,  # type: ignore[arg-type]
    )


def _frames(payload: bytes, message: ModelMessage) -> list[bytes]:
    assert message.transfer is not None
    manifest = message.transfer.manifest(max_bytes=1 << 20)
    return list(iter_chunk_frames(payload, manifest))


def test_the_spec_bounds_every_frame_of_its_model() -> None:
    tensors = {**_tensors(), "big": np.zeros(1000, np.float64)}
    lo, hi = ModelSpec.from_tensors(tensors).encoded_size_range()

    sizes = [
        len(encode({name: tensors[name] for name in order}, meta))
        for order in itertools.permutations(tensors)
        for meta in (None, {"name": "x" * 1000})
    ]

    assert all(lo <= size <= hi for size in sizes), (lo, hi, sizes)
    assert lo >= 8000  # the tensor bytes themselves
    assert hi - lo < 70_000  # header, alignment and the meta allowance only


def test_sizes_that_cannot_be_the_model_are_refused_before_allocating() -> None:
    receiver = ModelReceiver(max_bytes=1 << 30)
    spec = ModelSpec.from_tensors(_tensors()).encoded_size_range()
    big = _announced(bytes(spec[1] + 1))
    small = _announced(bytes(spec[0] - 1))

    with pytest.raises(MessageError, match="exceed the"):
        receiver.announce("t/agent1", big, size_range=spec)
    with pytest.raises(MessageError, match="short of the"):
        receiver.announce("t/agent1", small, size_range=spec)
    assert receiver.pending_for("t/agent1") is None
    # Their chunks are expected: dropped quietly, not rejected one by one.
    assert receiver.chunk(_frames(bytes(spec[1] + 1), big)[0]) is None


def test_chunks_of_unknown_transfers_are_rejected_when_asked() -> None:
    strict = ModelReceiver(max_bytes=1 << 20, reject_unknown_chunks=True)
    payload = encode(_tensors())
    message = _announced(payload)

    with pytest.raises(FrameError, match="unknown transfer"):
        strict.chunk(_frames(payload, message)[0])
    strict.ignore(message)  # a transfer of no interest: its chunks are no bad messages
    assert strict.chunk(_frames(payload, message)[0]) is None


def test_a_transfer_is_received_once_late_chunks_are_quiet_and_a_replay_is_refused() -> None:
    receiver = ModelReceiver(max_bytes=1 << 20, reject_unknown_chunks=True)
    payload = encode(_tensors())
    message = _announced(payload)
    frames = _frames(payload, message)

    assert receiver.announce("t/agent1", message, refuse_replay=True) is None
    results = [receiver.chunk(frame) for frame in frames]
    late = receiver.chunk(frames[0])

    assert results[-1] is not None
    assert bytes(results[-1].payload) == payload
    assert late is None
    with pytest.raises(MessageError, match="a replay"):
        receiver.announce("t/agent1", message, refuse_replay=True)


def test_a_chunk_must_come_on_the_topic_its_transfer_was_announced_on() -> None:
    receiver = ModelReceiver(max_bytes=1 << 20, reject_unknown_chunks=True)
    payload = encode(_tensors())
    message = _announced(payload)
    receiver.announce("t/agent1", message)

    with pytest.raises(FrameError, match="not on t/agent2"):
        receiver.chunk(_frames(payload, message)[0], announced_on="t/agent2")
    assert receiver.chunk(_frames(payload, message)[0], announced_on="t/agent1") is None


def test_open_transfers_are_capped() -> None:
    receiver = ModelReceiver(max_bytes=1 << 20, max_transfers=3)
    payload = encode(_tensors())
    for i in range(3):
        receiver.announce(f"t/agent{i}", _announced(payload))

    with pytest.raises(MessageError, match="3 transfers are open"):
        receiver.announce("t/agent9", _announced(payload))
    # A newer announcement on a topic replaces its transfer: no more room needed.
    assert receiver.announce("t/agent0", _announced(payload)) is None


# ----------------------------------------------------------------------------- the transport
@pytest.mark.broker
async def test_a_slow_consumer_holds_back_acks_and_loses_nothing(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare: a consumer that takes nothing while far more than its buffer is published.
    settings = broker_settings(mosquitto)
    topic = f"fedhive/v1/{project_name}/flood"
    payload = bytes(200_000)
    count = (RECEIVE_BUFFER_BYTES // len(payload)) + 200
    async with (
        MqttTransport(settings=settings, client_id=f"{project_name}.slow") as slow,
        MqttTransport(settings=settings) as publisher,
    ):
        await slow.subscribe(f"{topic}/#")
        for i in range(count):  # one at a time: the broker's in-flight window is exact then
            await publisher.publish(f"{topic}/{i}", payload)
        await publisher.publish(f"{topic}/marker", b"")  # the broker took them all
        held = slow.buffered  # what waits in the consumer's process

        # Execute: the consumer takes everything.
        messages = slow.messages()
        received = [await asyncio.wait_for(anext(messages), 10) for _ in range(count + 1)]

    # Assert: the buffer stayed near its limit (the rest waited at the broker), and every
    # message arrived, in order.
    # (the message that crosses the limit, then what the broker may send unacknowledged)
    limit = RECEIVE_BUFFER_BYTES + (1 + settings.receive_maximum) * len(payload)
    assert held <= limit, (held, limit)
    assert [m.topic for m in received] == [f"{topic}/{i}" for i in range(count)] + [
        f"{topic}/marker"
    ]


@pytest.mark.broker
async def test_a_full_buffer_still_takes_heartbeats_but_drops_large_qos0_messages(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare: a consumer whose buffer a model's chunks have filled (QoS 1, acks held back).
    settings = broker_settings(mosquitto)
    topic = f"fedhive/v1/{project_name}/flood"
    chunk = bytes(200_000)
    count = (RECEIVE_BUFFER_BYTES // len(chunk)) + 50
    async with (
        MqttTransport(settings=settings, client_id=f"{project_name}.full") as full,
        MqttTransport(settings=settings) as publisher,
    ):
        await full.subscribe(f"{topic}/#", qos=1)
        for i in range(count):
            await publisher.publish(f"{topic}/m{i}/chunk", chunk)
        assert full.buffered >= RECEIVE_BUFFER_BYTES

        # Execute: heartbeats (small, QoS 0), then large QoS 0 messages, arrive meanwhile.
        for i in range(20):
            await publisher.publish(f"{topic}/beat/heartbeat", b"beat%d" % i, qos=0)
        big = bytes(EXPRESS_RESERVE_BYTES + 1)
        for _ in range(5):
            await publisher.publish(f"{topic}/big", big, qos=0)
        deadline = time.monotonic() + 10
        while full.dropped < 5:  # the large ones came after the heartbeats, in order
            assert time.monotonic() < deadline, f"{full.dropped} large messages dropped"
            await asyncio.sleep(0.01)
        messages = full.messages()
        received = [await asyncio.wait_for(anext(messages), 10) for _ in range(count + 20)]

    # Assert: every heartbeat was kept (and taken first), only the large ones were dropped,
    # and every chunk arrived.
    assert full.dropped == 5
    assert [m.payload for m in received[:20]] == [b"beat%d" % i for i in range(20)]
    assert [m.topic for m in received[20:]] == [f"{topic}/m{i}/chunk" for i in range(count)]


@pytest.mark.broker
async def test_a_transport_session_ends_when_closed(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare: a client with a session of its own subscribes, then says goodbye.
    settings = broker_settings(mosquitto)
    topic = f"fedhive/v1/{project_name}/inbox"
    client_id = f"{project_name}.agent.a"
    async with MqttTransport(
        settings=settings, client_id=client_id, session=Session.TRANSPORT
    ) as t:
        await t.subscribe(topic)
    # Execute: a message is published while it is gone, then it comes back.
    async with MqttTransport(settings=settings) as publisher:
        await publisher.publish(topic, b"meanwhile")
    async with MqttTransport(
        settings=settings, client_id=client_id, session=Session.TRANSPORT
    ) as again:
        await again.subscribe(topic)
        await again.publish(topic, b"now")
        got = await asyncio.wait_for(anext(again.messages()), 10)

    # Assert: nothing was kept for a client that said goodbye.
    assert not again.session_present
    assert got.payload == b"now"


@pytest.mark.broker
async def test_a_durable_session_keeps_what_was_sent_while_away(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    settings = broker_settings(mosquitto)
    topic = f"fedhive/v1/{project_name}/local"
    client_id = f"{project_name}.aggregator.a"
    async with MqttTransport(settings=settings, client_id=client_id, session=Session.DURABLE) as t:
        await t.subscribe(topic)
    async with MqttTransport(settings=settings) as publisher:
        await publisher.publish(topic, b"meanwhile")
    async with MqttTransport(
        settings=settings, client_id=client_id, session=Session.DURABLE
    ) as again:
        got = await asyncio.wait_for(anext(again.messages()), 10)

    assert again.session_present
    assert got.payload == b"meanwhile"


# ----------------------------------------------------------------------------- agents' wills
async def test_a_will_takes_effect_after_its_grace_unless_the_agent_returns() -> None:
    # Prepare: an aggregator (no agent timeout: wills decide) and two agents online.
    bus = InMemoryBus()
    topics = Topics("mem")
    config = AggregatorConfig(name="a1", project="mem", monitor_interval=0.05)
    service = AggregatorService(config=config, transport=InMemoryTransport(bus=bus))
    ready = asyncio.Event()
    serving = asyncio.create_task(service.run(ready=ready))
    await asyncio.wait_for(ready.wait(), 5)

    def status(agent: str, state: AgentState) -> bytes:
        message = AgentStatusMessage(project="mem", sender=agent, state=state, aggregator="a1")
        return encode_message(message)

    async def until(predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)  # polling the engine

    try:
        async with InMemoryTransport(bus=bus) as agents:
            for name in ("gone", "back"):
                await agents.publish(topics.agent_status(name), status(name, AgentState.ONLINE))
            await until(lambda: service.engine.active == 2, 5)

            # Execute: both connections drop (their wills); one agent reconnects at once.
            lost = time.monotonic()
            for name in ("gone", "back"):
                await agents.publish(topics.agent_status(name), status(name, AgentState.LOST))
            await agents.publish(topics.agent_status("back"), status("back", AgentState.ONLINE))
            await until(lambda: service.engine.presence("gone") is PresenceState.OFFLINE, 5)
            waited = time.monotonic() - lost
    finally:
        service.stop()
        await asyncio.wait_for(serving, 10)

    # Assert: the will of the agent that stayed away counted after the grace; the other never.
    assert waited >= WILL_GRACE
    assert service.engine.presence("back") is PresenceState.ACTIVE
    assert service.engine.active == 1
