"""Model exchange over the in-memory bus: inline vs chunked, reassembly, re-requests,
supersession, size limits, hashes, retained replay and the in-flight bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Self

import pytest

from common.chunking import Manifest, iter_chunk_frames, make_manifest
from common.errors import FrameError, MessageError, TransportError
from common.exchange import (
    ModelReceiver,
    ReceivedModel,
    prepare_model_message,
    publish_chunks,
    publish_model,
)
from common.messages import ModelKind, ModelMessage, TransferInfo, decode_message
from common.topics import Topics
from common.transport import Incoming, InMemoryBus, InMemoryTransport, Transport

TOPIC = Topics("proj").agg_model("g1")
CHUNKS = Topics.chunks(TOPIC)
MARKER = Topics("proj").sg_status()  # published last: everything before it has arrived
CHUNK_SIZE = 64
WAIT = 2.0  # seconds a test waits for an event before it fails


def payload_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def envelope(payload: bytes, *, round: int = 1) -> tuple[ModelMessage, Manifest | None]:
    return prepare_model_message(
        payload,
        chunk_size=CHUNK_SIZE,
        project="proj",
        sender="g1",
        kind=ModelKind.GLOBAL,
        round=round,
    )


def frames_of(payload: bytes, manifest: Manifest) -> list[bytes]:
    return list(iter_chunk_frames(payload, manifest))


@contextlib.asynccontextmanager
async def watching(receiver: ModelReceiver) -> AsyncIterator[None]:
    task = asyncio.create_task(receiver.watch(), name="test-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def published(subscriber: InMemoryTransport, publisher: Transport) -> list[Incoming]:
    """Every message the subscriber got before the marker the publisher sends now."""
    await publisher.publish(MARKER, b"end")
    got: list[Incoming] = []
    async with asyncio.timeout(WAIT):
        async for msg in subscriber.messages():
            if msg.topic == MARKER:
                return got
            got.append(msg)
    raise AssertionError("the subscriber closed before the marker arrived")


# ------------------------------------------------------------------ publishing on the bus
async def test_small_payload_goes_inline_as_one_message() -> None:
    # Prepare
    bus = InMemoryBus()
    payload = payload_of(CHUNK_SIZE)
    message, manifest = envelope(payload)
    async with InMemoryTransport(bus=bus) as pub, InMemoryTransport(bus=bus) as sub:
        await sub.subscribe(TOPIC, CHUNKS, MARKER)

        # Execute
        await publish_model(pub, TOPIC, message, payload, manifest)
        got = await published(sub, pub)

    # Assert
    assert manifest is None
    assert [m.topic for m in got] == [TOPIC]
    decoded = decode_message(got[0].payload)
    assert isinstance(decoded, ModelMessage)
    assert decoded.transfer is None
    assert decoded.data == payload


async def test_large_payload_goes_as_manifest_and_chunks_and_reassembles() -> None:
    # Prepare
    bus = InMemoryBus()
    payload = payload_of(10 * CHUNK_SIZE + 7)
    message, manifest = envelope(payload)
    receiver = ModelReceiver(max_bytes=1 << 20)
    async with InMemoryTransport(bus=bus) as pub, InMemoryTransport(bus=bus) as sub:
        await sub.subscribe(TOPIC, CHUNKS, MARKER)

        # Execute
        await publish_model(pub, TOPIC, message, payload, manifest, max_inflight=4)
        got = await published(sub, pub)
    decoded = decode_message(got[0].payload)
    assert isinstance(decoded, ModelMessage)
    first = receiver.announce(got[0].topic, decoded)
    results = [receiver.chunk(m.payload) for m in got[1:]]

    # Assert
    assert manifest is not None
    assert manifest.count == 11
    assert [m.topic for m in got] == [TOPIC] + [CHUNKS] * 11
    assert decoded.data is None
    assert decoded.transfer == TransferInfo.of(manifest)
    assert first is None
    assert results[:-1] == [None] * 10
    done = results[-1]
    assert isinstance(done, ReceivedModel)
    assert (done.topic, done.message, bytes(done.payload)) == (TOPIC, decoded, payload)
    assert receiver.pending_for(TOPIC) is None


async def test_only_the_envelope_is_retained() -> None:
    # Prepare
    bus = InMemoryBus()
    payload = payload_of(3 * CHUNK_SIZE)
    message, manifest = envelope(payload)

    # Execute
    async with InMemoryTransport(bus=bus) as pub:
        await publish_model(pub, TOPIC, message, payload, manifest, retain=True)

    # Assert
    assert list(bus.retained) == [TOPIC]


async def test_retained_messages_are_replayed_to_a_late_subscriber() -> None:
    # Prepare
    bus = InMemoryBus()
    payload = payload_of(3 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    async with InMemoryTransport(bus=bus) as pub:
        await publish_model(pub, TOPIC, message, payload, manifest, retain=True)
        await pub.publish(Topics("proj").agg_status("g1"), b"not retained")

        # Execute
        async with InMemoryTransport(bus=bus) as late:
            await late.subscribe(Topics("proj").root + "/#")
            got = await published(late, pub)

    # Assert
    assert [m.topic for m in got] == [TOPIC]
    assert decode_message(got[0].payload) == message


# ------------------------------------------------------------------ receiving
def test_chunks_out_of_order_reassemble() -> None:
    # Prepare
    payload = payload_of(9 * CHUNK_SIZE + 1)
    message, manifest = envelope(payload)
    assert manifest is not None
    frames = frames_of(payload, manifest)
    random.Random(1).shuffle(frames)
    receiver = ModelReceiver(max_bytes=1 << 20)
    receiver.announce(TOPIC, message)

    # Execute
    results = [receiver.chunk(f) for f in frames]

    # Assert
    assert results[:-1] == [None] * (len(frames) - 1)
    done = results[-1]
    assert done is not None
    assert bytes(done.payload) == payload


def test_duplicate_chunks_are_harmless() -> None:
    # Prepare
    payload = payload_of(3 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    frames = frames_of(payload, manifest)
    receiver = ModelReceiver(max_bytes=1 << 20)
    receiver.announce(TOPIC, message)

    # Execute
    results = [receiver.chunk(f) for f in (frames[0], frames[0], frames[1], frames[2])]

    # Assert
    assert results[:3] == [None, None, None]
    assert results[3] is not None
    assert bytes(results[3].payload) == payload


def test_chunks_of_unknown_transfers_are_ignored() -> None:
    # Prepare
    payload = payload_of(2 * CHUNK_SIZE + 1)
    _, manifest = envelope(payload)
    assert manifest is not None
    receiver = ModelReceiver(max_bytes=1 << 20)

    # Execute
    results = [receiver.chunk(f) for f in frames_of(payload, manifest)]

    # Assert
    assert results == [None, None, None]


def test_inline_model_is_complete_at_once() -> None:
    # Prepare
    payload = payload_of(10)
    message, _ = envelope(payload)
    receiver = ModelReceiver(max_bytes=100)

    # Execute
    done = receiver.announce(TOPIC, message)

    # Assert
    assert done == ReceivedModel(TOPIC, message, payload)


def test_new_announcement_supersedes_the_old_transfer() -> None:
    # Prepare
    old_payload, new_payload = payload_of(3 * CHUNK_SIZE, 1), payload_of(3 * CHUNK_SIZE, 2)
    old, old_manifest = envelope(old_payload, round=1)
    new, new_manifest = envelope(new_payload, round=2)
    assert old_manifest is not None
    assert new_manifest is not None
    receiver = ModelReceiver(max_bytes=1 << 20)
    receiver.announce(TOPIC, old)
    receiver.chunk(frames_of(old_payload, old_manifest)[0])

    # Execute
    receiver.announce(TOPIC, new)
    stale = [receiver.chunk(f) for f in frames_of(old_payload, old_manifest)]
    pending_after_stale = receiver.pending_for(TOPIC)
    fresh = [receiver.chunk(f) for f in frames_of(new_payload, new_manifest)]

    # Assert
    assert stale == [None, None, None]
    assert pending_after_stale == new
    done = fresh[-1]
    assert done is not None
    assert done.message == new
    assert bytes(done.payload) == new_payload


def test_inline_announcement_supersedes_a_chunked_transfer() -> None:
    # Prepare
    big = payload_of(3 * CHUNK_SIZE)
    chunked, manifest = envelope(big, round=1)
    assert manifest is not None
    inline, _ = envelope(payload_of(5), round=2)
    receiver = ModelReceiver(max_bytes=1 << 20)
    receiver.announce(TOPIC, chunked)

    # Execute
    done = receiver.announce(TOPIC, inline)
    late = [receiver.chunk(f) for f in frames_of(big, manifest)]

    # Assert
    assert done is not None
    assert done.message == inline
    assert receiver.pending_for(TOPIC) is None
    assert late == [None, None, None]


def test_same_announcement_again_keeps_the_transfer() -> None:
    # Prepare
    payload = payload_of(3 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    frames = frames_of(payload, manifest)
    receiver = ModelReceiver(max_bytes=1 << 20)
    receiver.announce(TOPIC, message)
    receiver.chunk(frames[0])

    # Execute
    again = receiver.announce(TOPIC, message)  # e.g. the retained copy after a resubscribe
    done = [receiver.chunk(f) for f in frames[1:]][-1]

    # Assert
    assert again is None
    assert done is not None
    assert bytes(done.payload) == payload


def test_oversize_announcement_is_refused_before_allocating() -> None:
    # Prepare: 1 TB announced; allocating it would fail the test with MemoryError
    total = 10**12
    info = TransferInfo(
        transfer_id="ab" * 16,
        total_bytes=total,
        chunk_size=1 << 20,
        count=-(-total // (1 << 20)),
        blake3="cd" * 32,
    )
    message = ModelMessage(
        project="proj", sender="g1", kind=ModelKind.GLOBAL, round=1, transfer=info
    )
    receiver = ModelReceiver(max_bytes=1 << 20)

    # Execute / Assert
    with pytest.raises(MessageError, match=r"1000000000000 bytes exceed the 1048576-byte limit"):
        receiver.announce(TOPIC, message)
    assert receiver.pending_for(TOPIC) is None


def test_oversize_inline_model_is_refused() -> None:
    # Prepare
    message, _ = envelope(payload_of(50))
    receiver = ModelReceiver(max_bytes=49)

    # Execute / Assert
    with pytest.raises(MessageError, match="model of 50 bytes exceeds the 49-byte limit"):
        receiver.announce(TOPIC, message)


def test_corrupted_chunk_fails_the_hash() -> None:
    # Prepare
    payload = payload_of(3 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    frames = frames_of(payload, manifest)
    corrupt = bytearray(frames[1])
    corrupt[-1] ^= 0xFF  # a data byte: header and length still check out
    receiver = ModelReceiver(max_bytes=1 << 20)
    receiver.announce(TOPIC, message)
    receiver.chunk(frames[0])
    receiver.chunk(bytes(corrupt))

    # Execute / Assert
    with pytest.raises(FrameError, match="blake3 mismatch"):
        receiver.chunk(frames[2])
    assert receiver.pending_for(TOPIC) is None


def test_truncated_chunk_frame_is_a_frame_error() -> None:
    # Prepare
    payload = payload_of(3 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    receiver = ModelReceiver(max_bytes=1 << 20)
    receiver.announce(TOPIC, message)

    # Execute / Assert
    with pytest.raises(FrameError, match="declares 64 data bytes but carries 63"):
        receiver.chunk(frames_of(payload, manifest)[0][:-1])
    assert receiver.pending_for(TOPIC) == message


# ------------------------------------------------------------------ missing chunks
class MissingRecorder:
    """An ``on_missing`` callback that records its calls and signals each one."""

    def __init__(self, react: Callable[[list[int]], Awaitable[None]] | None = None) -> None:
        self.calls: list[tuple[str, ModelMessage, list[int]]] = []
        self.called = asyncio.Event()
        self._react = react

    async def __call__(self, topic: str, message: ModelMessage, missing: list[int]) -> None:
        self.calls.append((topic, message, missing))
        self.called.set()
        if self._react is not None:
            await self._react(missing)


class DropListener(logging.Handler):
    """Sets an event when the receiver logs that it dropped a transfer."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.dropped = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "dropped" in record.getMessage():
            self.dropped.set()


@pytest.fixture
def drops() -> Iterator[DropListener]:
    listener = DropListener()
    logger = logging.getLogger("fedhive.exchange")
    logger.addHandler(listener)
    try:
        yield listener
    finally:
        logger.removeHandler(listener)


async def test_missing_chunks_are_requested_after_the_timeout() -> None:
    # Prepare
    payload = payload_of(6 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    frames = frames_of(payload, manifest)
    recorder = MissingRecorder()
    receiver = ModelReceiver(max_bytes=1 << 20, chunk_timeout=0.05, on_missing=recorder)
    receiver.announce(TOPIC, message)
    for i in (0, 2, 4, 5):
        receiver.chunk(frames[i])

    # Execute
    async with watching(receiver):
        await asyncio.wait_for(recorder.called.wait(), WAIT)

    # Assert
    assert recorder.calls == [(TOPIC, message, [1, 3])]
    assert receiver.chunk(frames[1]) is None
    done = receiver.chunk(frames[3])
    assert done is not None
    assert bytes(done.payload) == payload


async def test_request_now_asks_for_everything_missing_at_once() -> None:
    # Prepare
    payload = payload_of(4 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    recorder = MissingRecorder()
    receiver = ModelReceiver(max_bytes=1 << 20, chunk_timeout=60, on_missing=recorder)
    receiver.announce(TOPIC, message)
    receiver.chunk(frames_of(payload, manifest)[2])

    # Execute
    await receiver.request_now(TOPIC)

    # Assert
    assert recorder.calls == [(TOPIC, message, [0, 1, 3])]


async def test_transfer_is_dropped_after_max_requests(drops: DropListener) -> None:
    # Prepare
    payload = payload_of(3 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    frames = frames_of(payload, manifest)
    recorder = MissingRecorder()
    receiver = ModelReceiver(
        max_bytes=1 << 20, chunk_timeout=0.05, max_requests=2, on_missing=recorder
    )
    receiver.announce(TOPIC, message)
    receiver.chunk(frames[0])

    # Execute
    async with watching(receiver):
        await asyncio.wait_for(drops.dropped.wait(), WAIT)

    # Assert
    assert [missing for _, _, missing in recorder.calls] == [[1, 2], [1, 2]]
    assert receiver.pending_for(TOPIC) is None
    assert [receiver.chunk(f) for f in frames[1:]] == [None, None]


async def test_without_a_callback_a_stalled_transfer_is_dropped(drops: DropListener) -> None:
    # Prepare
    payload = payload_of(3 * CHUNK_SIZE)
    message, _ = envelope(payload)
    receiver = ModelReceiver(max_bytes=1 << 20, chunk_timeout=0.05)
    receiver.announce(TOPIC, message)

    # Execute
    async with watching(receiver):
        await asyncio.wait_for(drops.dropped.wait(), WAIT)

    # Assert
    assert receiver.pending_for(TOPIC) is None


async def test_progress_between_requests_restarts_the_request_budget() -> None:
    # Prepare: every request brings back one missing chunk; one request without progress
    # would be allowed, so only the reset on progress lets the transfer finish.
    payload = payload_of(4 * CHUNK_SIZE)
    message, manifest = envelope(payload)
    assert manifest is not None
    frames = frames_of(payload, manifest)
    completed = asyncio.Event()
    results: list[ReceivedModel] = []
    receiver: ModelReceiver

    async def resend_one(missing: list[int]) -> None:
        done = receiver.chunk(frames[missing[0]])
        if done is not None:
            results.append(done)
            completed.set()

    recorder = MissingRecorder(resend_one)
    receiver = ModelReceiver(
        max_bytes=1 << 20, chunk_timeout=0.05, max_requests=1, on_missing=recorder
    )
    receiver.announce(TOPIC, message)
    receiver.chunk(frames[0])

    # Execute
    async with watching(receiver):
        await asyncio.wait_for(completed.wait(), WAIT)

    # Assert
    assert [missing for _, _, missing in recorder.calls] == [[1, 2, 3], [2, 3], [3]]
    assert bytes(results[0].payload) == payload


# ------------------------------------------------------------------ the in-flight bound
class CountingTransport(Transport):
    """Records publishes; each one stays outstanding for a few loop turns."""

    def __init__(self, *, fail_at: int | None = None) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.outstanding = 0
        self.peak = 0
        self._fail_at = fail_at

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
    ) -> None:
        self.outstanding += 1
        self.peak = max(self.peak, self.outstanding)
        try:
            if self._fail_at is not None and len(self.published) == self._fail_at:
                raise TransportError("broker went away")
            for _ in range(3):  # let the other workers run while this one waits for its ack
                await asyncio.sleep(0)
            self.published.append((topic, bytes(payload)))
        finally:
            self.outstanding -= 1

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        return None

    def messages(self) -> AsyncIterator[Incoming]:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        return True

    async def wait_connected(self, timeout: float) -> None:
        return None


@pytest.mark.parametrize("max_inflight", [1, 3, 16])
async def test_publish_chunks_bounds_outstanding_publishes(max_inflight: int) -> None:
    # Prepare
    payload = payload_of(40 * CHUNK_SIZE - 3)
    manifest = make_manifest(payload, CHUNK_SIZE)
    transport = CountingTransport()

    # Execute
    sent = await publish_chunks(transport, CHUNKS, payload, manifest, max_inflight=max_inflight)

    # Assert
    assert transport.peak == max_inflight
    assert sorted(f for _, f in transport.published) == sorted(frames_of(payload, manifest))
    assert {t for t, _ in transport.published} == {CHUNKS}
    assert sent == sum(len(f) for _, f in transport.published)


async def test_publish_chunks_sends_only_the_requested_indices() -> None:
    # Prepare
    payload = payload_of(10 * CHUNK_SIZE)
    manifest = make_manifest(payload, CHUNK_SIZE)
    transport = CountingTransport()
    frames = frames_of(payload, manifest)

    # Execute
    await publish_chunks(transport, CHUNKS, payload, manifest, indices=[7, 2])

    # Assert
    assert sorted(f for _, f in transport.published) == sorted([frames[7], frames[2]])


async def test_publish_error_surfaces_as_itself() -> None:
    # Prepare
    payload = payload_of(10 * CHUNK_SIZE)
    manifest = make_manifest(payload, CHUNK_SIZE)
    transport = CountingTransport(fail_at=3)

    # Execute / Assert
    with pytest.raises(TransportError, match="broker went away"):
        await publish_chunks(transport, CHUNKS, payload, manifest, max_inflight=2)


async def test_bad_resend_index_is_a_frame_error() -> None:
    # Prepare
    payload = payload_of(3 * CHUNK_SIZE)
    manifest = make_manifest(payload, CHUNK_SIZE)

    # Execute / Assert
    with pytest.raises(FrameError, match=r"chunk index 3 outside 0\.\.2"):
        await publish_chunks(CountingTransport(), CHUNKS, payload, manifest, indices=[0, 3])
