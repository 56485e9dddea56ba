"""The transport interface, its MQTT 5 implementation (aiomqtt) and an in-memory fake.

A transport is an async context manager that owns one connection. The MQTT transport keeps
reconnecting with jittered exponential backoff, re-subscribes after every reconnect and
translates every library error into :class:`~common.errors.TransportError`.

Sessions (:class:`Session`): model traffic is QoS 1, and a component that opts in gets an MQTT 5
persistent session (``clean_start`` false, a session expiry interval), so the broker queues what
is published for it while it reconnects and delivers it afterwards.

Receiving is bounded: the transport acknowledges a QoS 1 message at once while what waits for
the consumer stays under ``receive_buffer`` bytes (and :data:`QUEUE_LIMIT` messages); past
that it acknowledges each message only when the consumer takes it, so the broker (which keeps
at most ``receive_maximum`` messages unacknowledged per client) holds the rest in its own
bounded queue. QoS 0 messages past the limit are dropped, as QoS 0 allows, except small ones
on the express lane (heartbeats): up to :data:`EXPRESS_RESERVE` of at most
:data:`EXPRESS_RESERVE_BYTES` each may wait beyond the limit, so a model filling the buffer does
not silence an agent's heartbeats.

Messages other than chunk frames (topics ending in ``/chunk``) take an express lane: they
overtake queued chunk frames (MQTT orders messages per topic only), so a heartbeat, a status or
an upload's announcement is taken promptly however many chunks of a model wait. A transfer's
announcement can only move ahead of its chunks, never behind them.

(Measured on Mosquitto 2.0.11: each acknowledgement held back and then sent lets the broker send
up to ``receive_maximum`` more messages, so the receive maximum does not bound what a consumer
that keeps taking messages is sent; senders that send only when asked do: see
``common.exchange``'s receive budget.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any, Self, cast

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.client import topic_matches_sub
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from common.codec import Segments
from common.config import BrokerSettings
from common.errors import FedhiveError, FedhiveTimeoutError, NotConnectedError, TransportError
from common.mqtt_io import LeanPahoClient
from common.topics import CHUNK_SUFFIX

log = logging.getLogger("fedhive.transport")

#: Incoming messages waiting for the consumer beyond which QoS 1 messages are acknowledged only
#: when taken (the broker holds back the rest) and QoS 0 messages are dropped.
QUEUE_LIMIT = 10_000
#: The same limit in payload bytes (BrokerSettings.receive_buffer's default): what a flood can
#: make a component hold in memory, plus at most ``receive_maximum`` unacknowledged messages of
#: at most ``max_packet_size`` each.
RECEIVE_BUFFER_BYTES: int = BrokerSettings.model_fields["receive_buffer"].default

#: Small QoS 0 messages on the express lane (heartbeats) that may wait beyond the buffer limit,
#: and the largest such message: what they can add is bounded by the product (16 MiB).
EXPRESS_RESERVE = 256
EXPRESS_RESERVE_BYTES = 64 << 10

#: Run after every (re)connect, e.g. to republish a retained online status.
OnConnect = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    #: bytes, or for a large message the bytearray it was received into (nobody else holds it)
    payload: bytes | bytearray
    retain: bool = False
    correlation: bytes | None = None
    response_topic: str | None = None


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class _Queued:
    """A received message and what to do when the consumer takes it."""

    incoming: Incoming
    #: Sends the PUBACK the transport held back (None: acknowledged already, or QoS 0).
    ack: Callable[[], None] | None = None
    #: Tells the transport the message left its buffer.
    taken: Callable[[int], None] | None = None


_CHUNK_TOPIC_END = "/" + CHUNK_SUFFIX

#: Seconds a consumer may take queued messages without the event loop running in between.
YIELD_AFTER = 0.005

#: Put into the queue to wake a waiting consumer for a message on the express lane.
_WAKE = _Queued(Incoming("", b""))


class _QueueIterator:
    """Iterates a queue until its ``None`` sentinel. Unlike an async generator it survives
    cancellation of a pending ``__anext__`` (``asyncio.wait_for(anext(it), t)`` is safe).

    Messages on the ``express`` lane (everything but chunk frames) are taken before the
    queue's: MQTT orders messages per topic only, and a heartbeat must not wait behind a model's
    worth of chunks."""

    def __init__(
        self, queue: asyncio.Queue[_Queued | None], express: deque[_Queued] | None = None
    ) -> None:
        self._queue = queue
        self._express = express
        self._done = False
        self._ran_since = time.monotonic()  # when the consumer last let the loop run

    async def _breathe(self) -> None:
        """Let the event loop run (socket reads) if the consumer kept it for a while: taking
        from a non-empty queue never suspends, so a consumer working through a backlog of
        chunks would otherwise leave a heartbeat unread in the socket until the backlog ends."""
        if time.monotonic() - self._ran_since >= YIELD_AFTER:
            await asyncio.sleep(0)
            self._ran_since = time.monotonic()

    def __aiter__(self) -> _QueueIterator:
        return self

    async def __anext__(self) -> Incoming:
        if self._done:
            raise StopAsyncIteration
        await self._breathe()
        while True:
            if self._express:
                item: _Queued | None = self._express.popleft()
                break
            if self._queue.empty():
                self._ran_since = time.monotonic()  # get() suspends: the loop runs
            item = await self._queue.get()
            if item is not _WAKE:
                break
        if item is None:
            self._done = True
            # Other iterators of the same transport end too.
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        if item.taken is not None:
            item.taken(len(item.incoming.payload))
        if item.ack is not None:
            item.ack()
        return item.incoming


class TransportState(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Session(Enum):
    """What the broker keeps of a client's session while it is disconnected."""

    #: Nothing: every connect starts clean, and what was published meanwhile is lost to it.
    CLEAN = "clean"
    #: The session lives as long as the transport: its first connect starts clean (a new
    #: process has nothing to resume), reconnects resume it, and closing ends it. Agents.
    TRANSPORT = "transport"
    #: The session outlives the process: every connect resumes it and closing keeps it (for
    #: ``session_expiry`` seconds), so what was sent to a restarting component waits. Aggregators.
    DURABLE = "durable"


class Transport(ABC):
    """One connection to the message bus."""

    @abstractmethod
    async def __aenter__(self) -> Self: ...

    @abstractmethod
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    @abstractmethod
    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | Segments,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
        confirm: bool = True,
    ) -> None:
        """Publish; for QoS 1 returns once the broker acknowledged it. ``confirm=False``: returns
        once the message is queued for sending (still QoS 1: it is sent again after a
        reconnect), and a refusal by the broker is logged instead of raised. For messages
        whose sender goes on at once (acknowledgements, statuses): waiting for every PUBACK
        costs a round trip to a broker that may be busy fanning out a model."""

    async def publish_all(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish several QoS 1 messages as ``publish(topic, payload, confirm=False)`` does,
        in order. The MQTT transport writes them to the socket together: one write and one
        wake-up of the broker instead of one per message, for as many as its in-flight window
        (``max_inflight``) takes; the rest go out as the broker confirms earlier ones."""
        for topic, payload in messages:
            await self.publish(topic, payload, confirm=False)

    @property
    def backlog(self) -> int:
        """Messages received and not yet taken from :meth:`messages`."""
        return 0

    @abstractmethod
    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect."""

    @abstractmethod
    def messages(self) -> AsyncIterator[Incoming]:
        """Every message received, in order, until the transport closes."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    async def wait_connected(self, timeout: float) -> None:
        """Return once connected; FedhiveTimeoutError after ``timeout`` seconds."""

    @property
    def reconnected_at(self) -> float | None:
        """When (``time.monotonic()``) the connection was last re-established after a loss;
        None if it never was."""
        return None


class _AckCheckingClient(aiomqtt.Client):
    """aiomqtt's client, but a QoS 1 publish whose PUBACK carries a failure reason code (e.g.
    0x87 Not authorized from the broker's ACL) raises instead of passing silently.

    aiomqtt 2.x drops the PUBACK reason code; this overrides its ``publish`` with the same
    steps plus that check (it relies on aiomqtt 2.x internals: pinned to <3 in pyproject)."""

    def __init__(
        self,
        *args: Any,
        deliver: Callable[[_AckCheckingClient, mqtt.MQTTMessage], None],
        end_session: bool = False,
        **kwargs: Any,
    ) -> None:
        self._loop_thread = threading.get_ident()
        super().__init__(*args, **kwargs)
        LeanPahoClient.adopt(self._client)  # paho's state machine, fewer copies (mqtt_io.py)
        self._refused: dict[int, ReasonCode] = {}
        #: QoS 1 publishes nobody waits for (``confirm=False``), by mid: their topics.
        self._unconfirmed: dict[int, str] = {}
        self._deliver = deliver
        self._end_session = end_session
        #: The broker's CONNACK said it still had this client's session.
        self.session_present = False
        # Acknowledgements are the transport's: it holds them back while its buffer is full.
        self._client.manual_ack_set(True)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Straight into the transport's queue: aiomqtt's own queue would lose what it still
        # holds when the connection drops (the messages were acknowledged already).
        try:
            self._deliver(self, message)
        except Exception:  # a callback must never break paho's read loop
            log.exception("cannot take a message on %r", getattr(message, "topic", "?"))

    def ack(self, mid: int, qos: int) -> None:
        """Send the acknowledgement of a message this client received."""
        self._client.ack(mid, qos)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """aiomqtt's, but on the loop's own thread the writer is added at once: the lean client
        writes packets at once and may unregister the writer before a deferred add would run,
        which would leave it registered on an idle, writable socket (a busy loop)."""

        def callback() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # the connection broke: end it, as aiomqtt does
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        if threading.get_ident() == self._loop_thread:
            self._loop.add_writer(sock.fileno(), callback)
        else:  # paho connects from an executor thread
            self._loop.call_soon_threadsafe(self._loop.add_writer, sock.fileno(), callback)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._end_session and not self._disconnected.done():
            # MQTT 5 lets DISCONNECT shorten the session expiry: 0 ends the session now, so
            # the broker stops queueing for a client that said goodbye. aiomqtt's own
            # __aexit__ then finds the disconnection done or under way.
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
            rc = self._client.disconnect(properties=props)
            if rc == mqtt.MQTT_ERR_SUCCESS:
                # Neither cancels the future nor raises what it holds: aiomqtt reads it next.
                await asyncio.wait([self._disconnected], timeout=self.timeout)
        await super().__aexit__(exc_type, exc, tb)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        topic = self._unconfirmed.pop(mid, None)
        if reason_code.is_failure:
            if topic is None:
                self._refused[mid] = reason_code
            else:  # nobody waits for this one: say so here
                log.warning("the broker refused a publish to %s: %s", topic, reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish(  # type: ignore[override]
        self,
        topic: str,
        payload: bytes | bytearray | Segments,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        *,
        confirm: bool = True,
    ) -> None:
        info = self._client.publish(topic, payload, qos, retain, properties)  # type: ignore[arg-type]
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if not confirm:
            if qos > 0:
                self._unconfirmed[info.mid] = topic
            return
        if not info.is_published():
            # A bare future, not aiomqtt's Event.wait() coroutine: no task per publish.
            confirmation = _Confirmation(asyncio.get_running_loop().create_future())
            pending = cast(dict[int, Any], self._pending_publishes)
            with self._pending_call(info.mid, confirmation, pending):
                try:
                    async with asyncio.timeout(self.timeout):  # no task, unlike wait_for
                        await confirmation.future
                except TimeoutError:
                    raise aiomqtt.MqttError("Operation timed out") from None
        code = self._refused.pop(info.mid, None)
        if code is not None:
            raise aiomqtt.MqttCodeError(code, "the broker refused the publish")


class _Confirmation:
    """What aiomqtt's ``_on_publish`` sets (it calls ``.set()``) when the PUBACK comes."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


@contextlib.contextmanager
def _publish_errors(topic: str) -> Iterator[None]:
    """aiomqtt's and paho's publish errors as TransportError naming ``topic``."""
    try:
        yield
    except aiomqtt.MqttCodeError as exc:
        if isinstance(exc.rc, ReasonCode) and exc.rc.is_failure:
            raise TransportError(f"publish to {topic} refused by the broker: {exc}") from exc
        raise TransportError(f"publish to {topic} failed: {exc}") from exc
    except aiomqtt.MqttError as exc:
        raise TransportError(f"publish to {topic} failed: {exc}") from exc
    except ValueError as exc:  # paho: payload too large
        raise TransportError(f"publish to {topic} refused: {exc}") from exc


def _tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


class MqttTransport(Transport):
    """MQTT 5 over aiomqtt, with reconnects, re-subscription and a last will.

    ``session`` says what the broker keeps while the client is away (:class:`Session`); a
    persistent session needs a stable ``client_id`` (a random one would never be resumed).
    """

    def __init__(
        self,
        *,
        settings: BrokerSettings,
        client_id: str | None = None,
        will: LastWill | None = None,
        on_connect: OnConnect | None = None,
        session: Session = Session.CLEAN,
    ) -> None:
        self._settings = settings
        # A secured broker runs with use_username_as_clientid: the broker's id for this client
        # is its username, so use that (logs then name the same client the broker does).
        if settings.username and settings.password:
            client_id = settings.username
        if client_id is None and session is not Session.CLEAN:
            raise TransportError("a persistent session needs a stable client id")
        self._client_id = client_id or f"fedhive-{uuid.uuid4().hex[:12]}"
        self._will = will
        self._on_connect = on_connect
        self._session = session if settings.session_expiry > 0 else Session.CLEAN
        self._state = TransportState.NEW
        self._client: _AckCheckingClient | None = None
        self._connected = asyncio.Event()
        self._subscriptions: dict[str, int] = {}
        # Unbounded as a queue: receive_buffer and QUEUE_LIMIT bound it (see _deliver).
        self._queue: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._express: deque[_Queued] = deque()  # QoS 0 messages, taken first
        self._buffered = 0  # payload bytes in the queue
        self._dropped = 0  # QoS 0 messages dropped since the last log line
        self._dropped_total = 0
        self._runner: asyncio.Task[None] | None = None
        self._first_error: BaseException | None = None
        self._first_attempt_done = asyncio.Event()
        self._callback: asyncio.Task[None] | None = None
        self._connections = 0
        self._session_present = False
        self._reconnected_at: float | None = None

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connections(self) -> int:
        """How many times this transport connected (1 + reconnects)."""
        return self._connections

    @property
    def reconnected_at(self) -> float | None:
        return self._reconnected_at

    @property
    def buffered(self) -> int:
        """Payload bytes received and not yet taken by the consumer."""
        return self._buffered

    @property
    def dropped(self) -> int:
        """QoS 0 messages dropped because the receive buffer was full (since connecting)."""
        return self._dropped_total

    @property
    def session_present(self) -> bool:
        """Whether the broker resumed this client's session at the last connect (what was
        published for it while it was away is delivered)."""
        return self._session_present

    async def __aenter__(self) -> Self:
        if self._state is not TransportState.NEW:
            raise TransportError(f"transport already {self._state.value}; create a new one")
        self._state = TransportState.OPEN
        self._runner = asyncio.create_task(self._run(), name=f"mqtt-{self._client_id}")
        try:
            await asyncio.wait_for(self._first_attempt_done.wait(), self._settings.connect_timeout)
        except TimeoutError:
            await self._shutdown()
            raise TransportError(
                f"no answer from the broker at {self._settings.host}:{self._settings.port} "
                f"within {self._settings.connect_timeout} s"
            ) from None
        if not self.connected:
            await self._shutdown()
            raise TransportError(
                f"cannot connect to the broker at {self._settings.host}:{self._settings.port}: "
                f"{self._first_error}"
            ) from self._first_error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._state = TransportState.CLOSED
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        self._connected.clear()
        self._queue.put_nowait(None)

    def _make_client(self) -> _AckCheckingClient:
        s = self._settings
        will = None
        if self._will is not None:
            will = aiomqtt.Will(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # What the broker may send before this client acknowledges: bounds what a flood can
        # make it hold (acknowledgements are held back while its buffer is full).
        props.ReceiveMaximum = s.receive_maximum
        persistent = self._session is not Session.CLEAN
        if persistent:
            props.SessionExpiryInterval = s.session_expiry
        # A transport-long session starts clean: a new process has nothing to resume.
        resume = self._session is Session.DURABLE or (persistent and self._connections > 0)
        client = _AckCheckingClient(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=not resume,
            properties=props,
            keepalive=s.keepalive,
            timeout=s.connect_timeout,
            max_inflight_messages=s.max_inflight,
            tls_context=_tls_context(s),
            tls_insecure=s.tls.insecure if s.tls.enabled else None,
            deliver=self._deliver,
            end_session=self._session is Session.TRANSPORT,
        )
        # aiomqtt warns past 10 outstanding publishes; we pipeline max_inflight chunks on purpose.
        client.pending_calls_threshold = max(10, 4 * s.max_inflight)
        return client

    def _deliver(self, client: _AckCheckingClient, message: mqtt.MQTTMessage) -> None:
        """Queue one received message (paho's callback, on the event loop's thread)."""
        # Large payloads arrive as the bytearray the socket filled (no copy); small ones as bytes.
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        props = getattr(message, "properties", None)
        incoming = Incoming(
            topic=message.topic,
            payload=payload,
            retain=bool(message.retain),
            correlation=getattr(props, "CorrelationData", None),
            response_topic=getattr(props, "ResponseTopic", None),
        )
        waiting = self._queue.qsize() + len(self._express)
        room = self._buffered < self._settings.receive_buffer and waiting < QUEUE_LIMIT
        express = not incoming.topic.endswith(_CHUNK_TOPIC_END)  # (_QueueIterator)
        reserved = (
            express
            and len(payload) <= EXPRESS_RESERVE_BYTES
            and len(self._express) < EXPRESS_RESERVE
        )
        ack = None
        if message.qos == 0 and not room and not reserved:
            self._dropped += 1
            self._dropped_total += 1
            if self._dropped in (1, 1000) or self._dropped % 100_000 == 0:
                log.warning(
                    "%s: receive buffer full (%d bytes waiting): dropped %d QoS 0 message(s)",
                    self._client_id,
                    self._buffered,
                    self._dropped,
                )
            return
        if message.qos > 0:
            if room:
                client.ack(message.mid, message.qos)
            else:  # the broker holds back the rest until the consumer catches up
                ack = functools.partial(self._ack, client, message.mid, message.qos)
        if room:
            self._dropped = 0
        self._buffered += len(payload)
        if express:
            self._express.append(_Queued(incoming, ack, self._taken))
            if self._queue.empty():
                self._queue.put_nowait(_WAKE)
            return
        self._queue.put_nowait(_Queued(incoming, ack, self._taken))

    def _taken(self, nbytes: int) -> None:
        self._buffered -= nbytes

    def _ack(self, client: _AckCheckingClient, mid: int, qos: int) -> None:
        # Only on the connection it came from: after a reconnect the broker sends it again
        # (persistent session) or has forgotten it (clean session).
        if client is self._client:
            client.ack(mid, qos)

    async def _subscribe_all(self, client: _AckCheckingClient) -> None:
        # A resumed session still holds the subscriptions: renewing them must not replay the
        # retained messages (Retain Handling 1: only for a subscription that is new). The
        # first connect of a transport always gets them, resumed or not: a new process knows
        # nothing yet.
        resumed = client.session_present and self._connections > 0
        for topic, qos in list(self._subscriptions.items()):
            options = SubscribeOptions(qos=qos, retainHandling=1 if resumed else 0)
            await client.subscribe(topic, options=options)

    async def _run(self) -> None:
        attempt = 0
        while self._state is TransportState.OPEN:
            try:
                async with self._make_client() as client:
                    self._client = client
                    self._session_present = client.session_present
                    if self._connections:  # before any message of the new connection is taken
                        self._reconnected_at = time.monotonic()
                    await self._subscribe_all(client)
                    self._connections += 1
                    self._connected.set()
                    self._first_attempt_done.set()
                    if attempt and self._first_error is not None:
                        log.info(
                            "reconnected to the broker (%s)%s",
                            self._client_id,
                            "; session resumed" if client.session_present else "",
                        )
                        if self._on_connect is not None:
                            # The owner handled the first connect itself; after a reconnect
                            # it republishes (e.g. its online status) without blocking receipt.
                            self._callback = asyncio.create_task(
                                self._run_on_connect(self._on_connect), name="on-connect"
                            )
                    attempt = 0
                    # Messages go to the queue from paho's callback (_deliver); this only
                    # waits for the connection to end (aiomqtt's queue stays empty).
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                if self._first_error is None:
                    self._first_error = exc
                if self._connected.is_set():
                    log.warning("lost the broker connection (%s): %s", self._client_id, exc)
            except Exception as exc:  # a bug here must not leave the component deaf for good
                if self._first_error is None:
                    self._first_error = exc
                log.exception("broker connection (%s) failed", self._client_id)
            finally:
                self._connected.clear()
                self._client = None
            self._first_attempt_done.set()
            attempt += 1
            # Jittered exponential backoff: many agents must not reconnect in lockstep.
            delay = min(self._settings.reconnect_max_delay, 0.2 * 2 ** min(attempt, 10))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    @staticmethod
    async def _run_on_connect(callback: OnConnect) -> None:
        try:
            await callback()
        except FedhiveError as exc:
            log.warning("after reconnecting: %s", exc)
        except Exception:  # a bug in the owner's callback: logged, the connection goes on
            log.exception("after reconnecting")

    async def wait_connected(self, timeout: float) -> None:
        if self._state is not TransportState.OPEN:
            raise NotConnectedError("transport is not open: use it inside 'async with'")
        if self._connected.is_set():
            return
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise FedhiveTimeoutError(
                f"not connected to the broker at {self._settings.host}:{self._settings.port} "
                f"after {timeout} s"
            ) from None

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | Segments,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
        confirm: bool = True,
    ) -> None:
        self._check_size(topic, payload)
        client = await self._connected_client()
        props = None
        if correlation is not None or response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation is not None:
                props.CorrelationData = correlation
            if response_topic is not None:
                props.ResponseTopic = response_topic
        with _publish_errors(topic):
            await client.publish(
                topic, payload, qos=qos, retain=retain, properties=props, confirm=confirm
            )

    async def publish_all(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            self._check_size(topic, payload)
        client = await self._connected_client()
        lean = client._client
        with lean.held_writes() if isinstance(lean, LeanPahoClient) else contextlib.nullcontext():
            for topic, payload in messages:
                with _publish_errors(topic):
                    # Unconfirmed: queued without suspending, written when the hold ends.
                    await client.publish(topic, payload, qos=1, confirm=False)

    def _check_size(self, topic: str, payload: bytes | bytearray | Segments) -> None:
        # Fixed header, topic and properties need a few bytes beyond the payload.
        if len(payload) + len(topic) + 64 > self._settings.max_packet_size:
            raise TransportError(
                f"publish to {topic} refused: {len(payload)} bytes exceed the broker's "
                f"max_packet_size {self._settings.max_packet_size}; send it in chunks"
            )

    async def _connected_client(self) -> _AckCheckingClient:
        await self.wait_connected(self._settings.connect_timeout * 3)
        client = self._client
        if client is None:
            raise TransportError("connection lost before publishing")
        return client

    @property
    def backlog(self) -> int:
        return self._queue.qsize() + len(self._express)

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        for topic in topics:
            self._subscriptions[topic] = qos
        client = self._client
        if client is None:
            return  # subscribed on (re)connect
        try:
            for topic in topics:
                await client.subscribe(topic, qos=qos)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"subscribe failed: {exc}") from exc

    def messages(self) -> AsyncIterator[Incoming]:
        if self._state is TransportState.NEW:
            raise NotConnectedError("transport is not open: use it inside 'async with'")
        return _QueueIterator(self._queue, self._express)


@dataclass
class InMemoryBus:
    """A broker in a dict, for unit tests of round logic: retained messages and wildcards."""

    retained: dict[str, Incoming] = field(default_factory=dict)
    members: list[InMemoryTransport] = field(default_factory=list)

    def deliver(self, msg: Incoming) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        for member in self.members:
            member.offer(msg)


class InMemoryTransport(Transport):
    """A transport on an :class:`InMemoryBus` (no network); same contract as MqttTransport."""

    def __init__(self, *, bus: InMemoryBus, will: LastWill | None = None) -> None:
        self._bus = bus
        self._will = will
        self._subs: set[str] = set()
        self._queue: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._state = TransportState.NEW

    @property
    def connected(self) -> bool:
        return self._state is TransportState.OPEN

    async def wait_connected(self, timeout: float) -> None:
        if not self.connected:
            raise NotConnectedError("in-memory transport is not open")

    async def __aenter__(self) -> Self:
        self._state = TransportState.OPEN
        self._bus.members.append(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = TransportState.CLOSED
        self._bus.members.remove(self)
        self._queue.put_nowait(None)

    def crash(self) -> None:
        """Vanish without a goodbye: the bus publishes the last will."""
        self._state = TransportState.CLOSED
        self._bus.members.remove(self)
        self._queue.put_nowait(None)
        if self._will is not None:
            self._bus.deliver(Incoming(self._will.topic, self._will.payload, self._will.retain))

    def offer(self, msg: Incoming) -> None:
        if any(topic_matches_sub(sub, msg.topic) for sub in self._subs):
            copy = Incoming(msg.topic, msg.payload, False, msg.correlation, msg.response_topic)
            self._queue.put_nowait(_Queued(copy))

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | Segments,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
        confirm: bool = True,
    ) -> None:
        if not self.connected:
            raise NotConnectedError("in-memory transport is not open")
        self._bus.deliver(Incoming(topic, bytes(payload), retain, correlation, response_topic))

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        for topic in topics:
            self._subs.add(topic)
            for msg in list(self._bus.retained.values()):
                if topic_matches_sub(topic, msg.topic):
                    self._queue.put_nowait(_Queued(msg))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def messages(self) -> AsyncIterator[Incoming]:
        return _QueueIterator(self._queue)
