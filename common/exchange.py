"""Moving model payloads over a transport: inline when small, else manifest + pipelined chunks.

:func:`publish_model` sends; :class:`ModelReceiver` collects (inline or chunked), asks for what
is missing after ``chunk_timeout`` without progress, and hands over complete, hash-verified
payloads. Both agents and aggregators use these; nothing here knows about rounds.

Flow control: a receiver with a ``budget`` holds at most that many bytes of open transfers (one
transfer larger than the budget is taken alone). Transfers announced beyond it wait their turn,
in order. A budgeted transfer that completed still counts until its consumer is done with it
(:meth:`ModelReceiver.release`): models that wait to be used are held memory too. A sender
that announced ``pull`` sends its chunks only when asked, so nothing is sent twice; chunks
pushed for a waiting transfer are dropped and asked for again when its turn comes.
(An aggregator lets agents push uploads up to their share of its budget, ``push_limit`` in its
status: those fit together, and skip the round trip of being asked.)

Pulled chunks are asked for a ``window`` of bytes at a time (across all transfers, oldest
first), topped up as they arrive: the broker never holds more than that for the receiver, so
whatever else is sent to it (a heartbeat, a status) is not queued behind a whole model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from common.chunking import (
    Manifest,
    Reassembler,
    iter_chunk_segments,
    make_manifest,
    parse_chunk_frame,
)
from common.codec import Buffer
from common.errors import FedhiveError, FrameError, MessageError
from common.messages import ModelMessage, TransferInfo, encode_model_message
from common.topics import Topics
from common.transport import Transport

log = logging.getLogger("fedhive.exchange")


def prepare_model_message(
    payload: Buffer, *, chunk_size: int, digest: str | None = None, **fields: object
) -> tuple[ModelMessage, Manifest | None]:
    """The envelope for ``payload``: inline if it fits one chunk, else with a manifest
    (``digest``: the payload's BLAKE3 digest if known, see :func:`make_manifest`). Hashing a large
    payload takes a while: call it through ``common.tasks.off_loop``."""
    # nbytes, not len(): a memoryview of another format counts items, not bytes.
    if memoryview(payload).nbytes <= chunk_size:
        return ModelMessage.model_validate({**fields, "data": bytes(payload)}), None
    manifest = make_manifest(payload, chunk_size, digest=digest)
    message = ModelMessage.model_validate({**fields, "transfer": TransferInfo.of(manifest)})
    return message, manifest


async def publish_chunks(
    transport: Transport,
    topic: str,
    payload: Buffer,
    manifest: Manifest,
    *,
    indices: Iterable[int] | None = None,
    max_inflight: int = 16,
) -> int:
    """Publish chunk frames on ``topic`` with up to ``max_inflight`` QoS 1 publishes
    outstanding (DESIGN.md: more overflows the broker's per-client queues). Returns bytes sent.

    The first error (TransportError, FrameError for a bad index...) is raised as itself, not
    wrapped in an ExceptionGroup, so callers can catch FedhiveError."""
    frames = iter_chunk_segments(payload, manifest, indices)
    sent = 0

    async def worker() -> None:
        nonlocal sent
        for frame in frames:  # shared iterator: each frame is taken by exactly one worker
            await transport.publish(topic, frame, qos=1)
            sent += len(frame)

    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(max(1, min(max_inflight, manifest.count))):
                tg.create_task(worker(), name=f"chunk-worker-{i}")
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    return sent


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a (possibly nested) exception group."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


async def publish_model(
    transport: Transport,
    topic: str,
    message: ModelMessage,
    payload: Buffer,
    manifest: Manifest | None,
    *,
    retain: bool = False,
    max_inflight: int = 16,
) -> int:
    """Publish the envelope on ``topic`` and, for a chunked payload, its chunks on
    ``topic/chunk``. Only the envelope is ever retained. Returns bytes sent.

    The chunks follow the envelope at once (MQTT keeps a connection's publishes in order), not
    a round trip later: their confirmations stand for the envelope's, whose refusal the
    transport logs."""
    envelope = encode_model_message(message)
    await transport.publish(topic, envelope, qos=1, retain=retain, confirm=manifest is None)
    sent = len(envelope)
    if manifest is not None:
        sent += await publish_chunks(
            transport, Topics.chunks(topic), payload, manifest, max_inflight=max_inflight
        )
    return sent


@dataclass(slots=True)
class ReceivedModel:
    """A complete model payload and the envelope that announced it."""

    topic: str
    message: ModelMessage
    #: The payload: bytes when it came inline, else the buffer it was reassembled in (writable).
    payload: Buffer
    #: Bytes of the receiver's budget it holds until released (0: none).
    held: int = 0


@dataclass(slots=True)
class _Pending:
    topic: str
    message: ModelMessage
    reassembler: Reassembler
    last_progress: float
    requests: int = 0
    #: Pulled: its chunks come when asked for; ``asked`` is the first chunk not asked for yet.
    pull: bool = False
    asked: int = 0
    #: Bytes asked for and not received yet.
    due: int = 0
    #: Counted against the budget: once complete, until released.
    budgeted: bool = False


@dataclass(slots=True)
class _Waiting:
    """A transfer announced beyond the budget: opened when its turn comes."""

    topic: str
    message: ModelMessage
    manifest: Manifest


#: Called with (topic, envelope, missing chunk indices) when a transfer stalls.
MissingHandler = Callable[[str, ModelMessage, list[int]], Awaitable[None]]


#: Bytes of pulled chunks asked for at a time (a receiver's ``window``): enough to keep the
#: pipe full, little enough that nothing waits long behind them at the broker. A heartbeat
#: sent to an aggregator while a pulled 200 MB upload streams in waits behind up to this much
#: (bench/heartbeat_latency.py, 2 cores, 4 interleaved pairs): the worst wait was 89–131 ms
#: with a 64 MiB window, 29–59 ms with 16 MiB; 10 agents × 10M parameters ran the same
#: (median round 0.90–0.92 s with 16 MiB, 0.91–0.93 s with 64 MiB, interleaved).
DEFAULT_WINDOW = 16 << 20

#: Transfer ids a receiver remembers after they ended (completed, superseded, ignored, refused,
#: dropped), so late or repeated chunks of theirs are told apart from chunks of nothing.
RECENT_TRANSFERS = 4096


@dataclass
class ModelReceiver:
    """Collects model payloads; one open transfer per announcing topic.

    Memory stays bounded: every announced size is checked against ``max_bytes`` (and the bound
    a caller passes for the model it expects) before anything is allocated, and at most
    ``max_transfers`` transfers are open at once (further announcements are refused).

    With ``reject_unknown_chunks`` a chunk frame that belongs to no transfer this receiver
    ever heard of raises FrameError (an aggregator counts every bad message); without it such
    chunks are ignored. Chunks of a transfer that ended (or was ignored) are always ignored:
    they are late or repeated, not bad.

    ``budget``: bytes of open transfers at once (None: no limit); see the module docstring.
    Transfers that wait are opened by :meth:`admit`, which asks their senders for the chunks
    through ``on_missing``; call it after :meth:`announce` and after a transfer completed.
    """

    max_bytes: int
    chunk_timeout: float = 5.0
    max_requests: int = 5
    on_missing: MissingHandler | None = None
    max_transfers: int = 4096
    reject_unknown_chunks: bool = False
    budget: int | None = None
    window: int = DEFAULT_WINDOW
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _by_topic: dict[str, str] = field(default_factory=dict)
    _ended: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _waiting: OrderedDict[str, _Waiting] = field(default_factory=OrderedDict)
    _open_bytes: int = 0
    _held: int = 0  # bytes of completed budgeted transfers not released yet
    _due: int = 0  # bytes asked for and not received yet, over all pulled transfers
    #: Pushed transfers whose last chunk came with others missing: a broker queue overflowed
    #: (chunks of a topic arrive in order), so they are asked for at once, not after a stall.
    _gaps: set[str] = field(default_factory=set)

    @property
    def open_bytes(self) -> int:
        """Bytes of the transfers open now and of completed ones not released yet (what the
        budget bounds)."""
        return self._open_bytes + self._held

    def release(self, received: ReceivedModel) -> None:
        """The consumer is done with ``received`` (folded or refused): its bytes leave the
        budget. Call :meth:`admit` afterwards."""
        self._held -= received.held
        received.held = 0

    @property
    def waiting(self) -> int:
        """Transfers announced and waiting for their turn."""
        return len(self._waiting)

    def announce(
        self,
        topic: str,
        message: ModelMessage,
        *,
        size_range: tuple[int, int] | None = None,
        refuse_replay: bool = False,
        budgeted: bool = False,
    ) -> ReceivedModel | None:
        """Take an envelope: inline payloads are complete at once; chunked ones open a
        transfer (superseding the topic's previous one).

        ``size_range`` (smallest, largest): the sizes a payload of the expected model can have
        (:meth:`common.codec.ModelSpec.encoded_size_range`); anything else is refused before
        allocating. ``refuse_replay``: announcing a transfer that already ended is an error
        (a submission is sent once; a re-sent one gets a new transfer id). ``budgeted``: the
        transfer waits its turn when the open ones fill the budget (else it opens at once, and
        only counts against the budget); call :meth:`admit` afterwards.

        Raises MessageError for a size that cannot be, a replay, or too many open transfers."""
        lo, hi = size_range if size_range is not None else (0, self.max_bytes)
        hi = min(hi, self.max_bytes)
        if message.data is not None:
            size = len(message.data)
            if size > hi or size < lo:
                raise MessageError(f"model of {size} bytes {_misfit(size, lo, hi, 's')}")
            self._drop_topic(topic)  # a newer model on this topic: the older transfer is moot
            return ReceivedModel(topic, message, message.data)
        assert message.transfer is not None  # guaranteed by ModelMessage's validator
        tid = message.transfer.transfer_id
        if tid in self._pending or tid in self._waiting:
            return None  # the same announcement again (e.g. retained copy on resubscribe)
        if tid in self._ended:
            if refuse_replay:
                raise MessageError(f"transfer {tid} was received already: a replay")
            return None
        total = message.transfer.total_bytes
        if total > hi or total < lo:
            self._end(tid)  # its chunks are expected: drop them quietly
            raise MessageError(f"transfer {tid}: {total} bytes {_misfit(total, lo, hi, '')}")
        manifest = message.transfer.manifest(max_bytes=hi)
        self._drop_topic(topic)
        announced = len(self._pending) + len(self._waiting)
        if announced >= self.max_transfers:
            self._end(tid)
            raise MessageError(
                f"transfer {tid} refused: {announced} transfers are open already "
                f"(the limit is {self.max_transfers})"
            )
        self._by_topic[topic] = tid
        if budgeted and (self._waiting or not self._fits(manifest.total_bytes)):
            self._waiting[tid] = _Waiting(topic, message, manifest)
        else:
            self._open(
                tid, topic, message, manifest, request=bool(message.pull), budgeted=budgeted
            )
        return None

    def _fits(self, size: int) -> bool:
        if self.budget is None:
            return True
        taken = self._open_bytes + self._held
        return taken == 0 or taken + size <= self.budget

    def _open(
        self,
        tid: str,
        topic: str,
        message: ModelMessage,
        manifest: Manifest,
        *,
        request: bool,
        budgeted: bool,
    ) -> None:
        self._pending[tid] = _Pending(
            topic,
            message,
            Reassembler(manifest),
            time.monotonic(),
            pull=request,
            budgeted=budgeted,
        )
        self._open_bytes += manifest.total_bytes

    async def admit(self) -> None:
        """Open the waiting transfers the budget has room for (in the order they were
        announced) and ask the senders of pulled ones for their next chunks (``on_missing``),
        up to the window. Call it after :meth:`announce` and whenever chunks arrived."""
        while self._waiting:
            tid, waiting = next(iter(self._waiting.items()))
            if not self._fits(waiting.manifest.total_bytes):
                break
            del self._waiting[tid]
            # Pushed before its turn or pulled: either way its chunks are asked for now.
            self._open(
                tid, waiting.topic, waiting.message, waiting.manifest, request=True, budgeted=True
            )
        while self._gaps and self.on_missing is not None:
            tid = self._gaps.pop()
            p = self._pending.get(tid)
            if p is None or not p.reassembler.missing():
                continue
            p.requests += 1
            p.last_progress = time.monotonic()
            try:
                await self.on_missing(p.topic, p.message, p.reassembler.missing())
            except FedhiveError as exc:  # the watch asks again after chunk_timeout
                log.warning("cannot ask for the missing chunks of %s: %s", tid, exc)
        if self.on_missing is None or self._due > self.window // 2:
            return  # plenty on the way: top up in batches, not chunk by chunk
        for tid, p in list(self._pending.items()):
            if self._due >= self.window:
                break
            m = p.reassembler.manifest
            if not p.pull or p.asked >= m.count:
                continue
            start = p.asked
            while p.asked < m.count and self._due < self.window:
                length = m.chunk_span(p.asked)[1]
                p.asked += 1
                p.due += length
                self._due += length
            p.last_progress = time.monotonic()
            try:
                await self.on_missing(p.topic, p.message, list(range(start, p.asked)))
            except FedhiveError as exc:  # the watch asks again after chunk_timeout
                log.warning("cannot ask for the chunks of %s: %s", tid, exc)

    def ignore(self, message: ModelMessage) -> None:
        """Take no interest in an announced transfer: its chunks are dropped quietly."""
        tid = None if message.transfer is None else message.transfer.transfer_id
        if tid is not None and tid not in self._pending and tid not in self._waiting:
            self._end(tid)

    def chunk(self, frame: Buffer, *, announced_on: str | None = None) -> ReceivedModel | None:
        """Take one chunk frame; returns the model when its last chunk arrived and its hash
        verified. FrameError for corrupt frames or hashes (and, with
        ``reject_unknown_chunks``, for chunks of a transfer nobody announced).

        ``announced_on``: the topic the chunk's transfer must have been announced on (a chunk
        on an agent's topic belongs to that agent's upload, not to another's)."""
        parsed = parse_chunk_frame(frame)
        pending = self._pending.get(parsed.transfer_id)
        if pending is None:
            waiting = self._waiting.get(parsed.transfer_id)
            if waiting is not None:
                if announced_on is not None and waiting.topic != announced_on:
                    raise FrameError(
                        f"chunk {parsed.index} of transfer {parsed.transfer_id} announced on "
                        f"{waiting.topic}, not on {announced_on}"
                    )
                return None  # pushed before its turn: asked for again when it comes
            if self.reject_unknown_chunks and parsed.transfer_id not in self._ended:
                raise FrameError(f"chunk {parsed.index} of unknown transfer {parsed.transfer_id}")
            return None
        if announced_on is not None and pending.topic != announced_on:
            raise FrameError(
                f"chunk {parsed.index} of transfer {parsed.transfer_id} announced on "
                f"{pending.topic}, not on {announced_on}"
            )
        before = pending.reassembler.received
        done = pending.reassembler.add(parsed)
        if pending.pull and pending.reassembler.received > before and parsed.index < pending.asked:
            length = parsed.data.nbytes
            pending.due -= length
            self._due -= length
        if pending.reassembler.received > before:
            # Progress (a duplicate is none): the stall clock and the request budget restart,
            # so a long transfer is not dropped for holes that earlier requests filled.
            pending.last_progress = time.monotonic()
            pending.requests = 0
        if not done:
            if not pending.pull and parsed.index == parsed.count - 1:
                self._gaps.add(parsed.transfer_id)
            return None
        self._forget(parsed.transfer_id)
        payload = pending.reassembler.result()  # FrameError on a hash mismatch
        held = pending.reassembler.total_bytes if pending.budgeted else 0
        self._held += held
        return ReceivedModel(pending.topic, pending.message, payload, held)

    def pending_for(self, topic: str) -> ModelMessage | None:
        tid = self._by_topic.get(topic)
        if tid is None:
            return None
        pending = self._pending.get(tid)
        return pending.message if pending is not None else self._waiting[tid].message

    def _drop_topic(self, topic: str) -> None:
        old = self._by_topic.get(topic)
        if old is not None:
            self._forget(old)

    def _forget(self, transfer_id: str) -> None:
        pending = self._pending.pop(transfer_id, None)
        topic: str | None = None
        if pending is not None:
            self._open_bytes -= pending.reassembler.total_bytes
            self._due -= pending.due
            topic = pending.topic
        else:
            waiting = self._waiting.pop(transfer_id, None)
            topic = waiting.topic if waiting is not None else None
        if topic is not None and self._by_topic.get(topic) == transfer_id:
            del self._by_topic[topic]
        self._end(transfer_id)

    def _end(self, transfer_id: str) -> None:
        self._ended[transfer_id] = None
        self._ended.move_to_end(transfer_id)
        while len(self._ended) > RECENT_TRANSFERS:
            self._ended.popitem(last=False)

    async def request_now(self, topic: str) -> None:
        """Ask at once for every missing chunk of the transfer announced on ``topic``
        (a late joiner that got only the retained manifest)."""
        tid = self._by_topic.get(topic)
        if tid is not None and tid in self._pending and self.on_missing is not None:
            p = self._pending[tid]
            p.requests += 1
            p.last_progress = time.monotonic()
            await self.on_missing(p.topic, p.message, _overdue_chunks(p))

    async def watch(self) -> None:
        """Forever: re-request the missing chunks of stalled transfers; give up after
        ``max_requests`` tries (the transfer is dropped and logged)."""
        while True:
            await asyncio.sleep(self.chunk_timeout / 4)  # a polling period, not a wait for an event
            now = time.monotonic()
            for tid, p in list(self._pending.items()):
                if self._pending.get(tid) is not p:
                    continue  # completed or superseded while an earlier request was sent
                if now - p.last_progress < self.chunk_timeout:
                    continue
                if p.requests >= self.max_requests or self.on_missing is None:
                    log.warning(
                        "transfer %s on %s incomplete after %d requests: dropped "
                        "(%d chunks missing)",
                        tid,
                        p.topic,
                        p.requests,
                        len(p.reassembler.missing()),
                    )
                    self._forget(tid)
                    await self.admit()  # its budget goes to the next in line
                    continue
                missing = _overdue_chunks(p)
                if not missing:
                    continue  # a pulled transfer waiting for its turn in the window
                p.requests += 1
                p.last_progress = now
                try:
                    await self.on_missing(p.topic, p.message, missing)
                except FedhiveError as exc:  # the next period tries again
                    log.warning("cannot re-request chunks of %s: %s", tid, exc)


def _overdue_chunks(p: _Pending) -> list[int]:
    """The chunks of a transfer that should be here by now: all missing ones of a pushed
    transfer, the missing ones asked for of a pulled one."""
    missing = p.reassembler.missing()
    return [i for i in missing if i < p.asked] if p.pull else missing


def _misfit(size: int, lo: int, hi: int, s: str) -> str:
    """Why a payload of ``size`` bytes does not fit ``lo..hi`` (``s``: the verb's ending)."""
    if size > hi:
        return f"exceed{s} the {hi}-byte limit"
    return f"fall{s} short of the {lo} bytes the expected model needs"


__all__ = [
    "RECENT_TRANSFERS",
    "FrameError",
    "MissingHandler",
    "ModelReceiver",
    "ReceivedModel",
    "prepare_model_message",
    "publish_chunks",
    "publish_model",
]
