"""The dashboard's one connection to the broker: the live view and the control plane.

:class:`BrokerLink` follows every aggregator's retained status (``agg/+/status``) and the SG
status (``sg/status``) of one project and keeps the latest of each in memory, so the pages and
the event stream show what the broker says and nothing else (history comes from the store).
Control requests go out on the same connection (``agg/{aggr}/control`` with an MQTT 5 response
topic and correlation data, like :class:`~agent.control.ControlClient`): one connection, because
a secured broker makes the user name the client id, and a second admin connection would take
the first one's place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError

from common.config import BrokerSettings
from common.errors import (
    FedhiveError,
    FedhiveTimeoutError,
    MessageError,
    NotConnectedError,
    TransportError,
)
from common.messages import (
    AggAgentsMessage,
    AggStatusMessage,
    ControlCommand,
    ControlReply,
    ControlRequest,
    SgStatusMessage,
    decode_message,
    encode_message,
)
from common.tasks import finish
from common.topics import TopicKind, Topics
from common.transport import Incoming, MqttTransport, Transport

log = logging.getLogger("fedhive.dashboard")

#: Seconds between attempts while the broker cannot be reached at all.
RETRY_DELAY = 2.0
#: At most this many seconds a control request waits for the connection to be (re)made.
CONNECT_WAIT = 3.0


@dataclass(frozen=True, slots=True)
class LiveSnapshot:
    """What the broker said last: every aggregator's status and the SG status."""

    version: int
    connected: bool
    error: str | None
    aggregators: Mapping[str, AggStatusMessage]
    sg: SgStatusMessage | None
    #: When the snapshot was taken (the server's clock), to age the statuses by.
    now: float = field(default_factory=time.time)


@dataclass(slots=True)
class _Pending:
    aggregator: str
    future: asyncio.Future[ControlReply]


class BrokerLink:
    """Follows a project's aggregator and SG statuses and sends control requests.

    Use it as an async context manager; it (re)connects in the background, so the dashboard
    starts (and says so) while the broker is down.

    Args:
        settings: how to reach the broker as the admin.
        project: the project followed.
        sender: the name control requests are sent under (an admin of the aggregators).
        transport_factory: makes the connection (tests pass an in-memory one).
    """

    def __init__(
        self,
        *,
        settings: BrokerSettings,
        project: str,
        sender: str,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.topics = Topics(project)
        self.sender = sender
        self._settings = settings
        self._id = uuid.uuid4().hex[:12]
        self._factory = transport_factory or (
            lambda: MqttTransport(
                settings=settings, client_id=f"{project}.dashboard.{sender}.{self._id}"
            )
        )
        #: The connection once subscribed (None while connecting or down).
        self._transport: Transport | None = None
        #: The connection from its opening to its closing.
        self._open: Transport | None = None
        self._statuses: dict[str, AggStatusMessage] = {}
        self._tables: dict[str, AggAgentsMessage] = {}  # published apart from the statuses
        self._sg: SgStatusMessage | None = None
        self._error: str | None = None
        self._version = 0
        self._changed = asyncio.Event()
        self._pending: dict[bytes, _Pending] = {}
        self._closing = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        if self._runner is not None:
            raise NotConnectedError("broker link already started; create a new one")
        self._runner = asyncio.create_task(self._run(), name=f"dashboard-link-{self._id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing.set()
        # Closing the transport ends its message iterator, and so the runner.
        await self._close_open()
        if self._runner is not None:
            await finish([self._runner])
        self._fail_pending("the dashboard is shutting down")
        self._notify()

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    @property
    def connected(self) -> bool:
        transport = self._transport
        return transport is not None and transport.connected

    @property
    def reply_subscription(self) -> str:
        """Replies to this link's requests, from any aggregator of the project."""
        return f"{self.topics.root}/agg/+/control/reply/{self._id}"

    async def _run(self) -> None:
        while not self._closing.is_set():
            transport = self._factory()
            try:
                await transport.__aenter__()
                self._open = transport
                await transport.subscribe(
                    self.topics.all_agg_agents(),  # first: a status arrives with its table
                    self.topics.all_agg_status(),
                    self.topics.sg_status(),
                    self.reply_subscription,
                )
                self._transport = transport
                self._error = None
                self._notify()
                log.info(
                    "dashboard following project %s on %s:%s",
                    self.topics.project,
                    self._settings.host,
                    self._settings.port,
                )
                async for incoming in transport.messages():
                    self._receive(incoming)
            except TransportError as exc:
                if self._error != str(exc):
                    log.warning("dashboard: %s", exc)
                self._error = str(exc)
            finally:
                self._transport = None
                self._fail_pending("the broker connection closed before the reply")
                self._notify()
                await self._close_open()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), RETRY_DELAY)

    async def _close_open(self) -> None:
        """Close the open transport, once (the runner and ``__aexit__`` may both try)."""
        transport, self._open = self._open, None
        if transport is not None:
            await transport.__aexit__(None, None, None)

    # ------------------------------------------------------------ receiving
    def _receive(self, incoming: Incoming) -> None:
        try:
            self._handle(incoming)
        except FedhiveError as exc:
            log.warning("dashboard ignored a message on %s: %s", incoming.topic, exc)

    def _handle(self, incoming: Incoming) -> None:
        if incoming.correlation is not None:
            if incoming.correlation in self._pending:
                self._on_reply(incoming)
            else:  # the answer to a request that already timed out
                log.debug("dashboard: a late reply on %s", incoming.topic)
            return
        parsed = self.topics.parse(incoming.topic)
        if parsed.kind is TopicKind.AGG_STATUS and parsed.aggregator is not None:
            name = parsed.aggregator
            if not incoming.payload:  # a cleared retained status: the aggregator is gone
                if self._statuses.pop(name, None) is not None:
                    self._notify()
                return
            message = decode_message(incoming.payload)
            if not isinstance(message, AggStatusMessage) or message.sender != name:
                raise MessageError(f"{message.type!r} from {message.sender!r} on a status topic")
            self._update(message)
        elif parsed.kind is TopicKind.AGG_AGENTS and parsed.aggregator is not None:
            if not incoming.payload:
                return
            message = decode_message(incoming.payload)
            name = parsed.aggregator
            if not isinstance(message, AggAgentsMessage) or message.sender != name:
                raise MessageError(f"{message.type!r} from {message.sender!r} on an agents topic")
            self._on_table(message)
        elif parsed.kind is TopicKind.SG_STATUS:
            if not incoming.payload:
                self._sg = None
                self._notify()
                return
            message = decode_message(incoming.payload)
            if not isinstance(message, SgStatusMessage):
                raise MessageError(f"{message.type!r} message on the sg status topic")
            self._sg = message
            self._notify()
        # Anything else (a late reply, another project's topic) is of no interest.

    def _update(self, status: AggStatusMessage) -> None:
        if status.project != self.topics.project:
            raise MessageError(f"status of project {status.project!r}")
        current = self._statuses.get(status.sender)
        if current is not None and current.ts > status.ts:
            return  # a reply's copy arrived after a newer status
        self._statuses[status.sender] = status.with_agents(self._tables.get(status.sender))
        self._notify()

    def _on_table(self, table: AggAgentsMessage) -> None:
        if table.project != self.topics.project:
            raise MessageError(f"agent table of project {table.project!r}")
        current = self._tables.get(table.sender)
        if current is not None and current.ts > table.ts:
            return
        self._tables[table.sender] = table
        status = self._statuses.get(table.sender)
        merged = None if status is None else status.with_agents(table)
        if merged is not None and merged is not status:  # it came after its status
            self._statuses[table.sender] = merged
            self._notify()

    def _on_reply(self, incoming: Incoming) -> None:
        pending = self._pending[incoming.correlation or b""]
        message = decode_message(incoming.payload)
        if not isinstance(message, ControlReply) or message.sender != pending.aggregator:
            raise MessageError(f"{message.type!r} from {message.sender!r} answering a request")
        if message.status is not None and message.status.sender == pending.aggregator:
            self._update(message.status)
        if not pending.future.done():
            pending.future.set_result(message)

    def _notify(self) -> None:
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _fail_pending(self, why: str) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(TransportError(why))

    # ------------------------------------------------------------ reading
    def snapshot(self) -> LiveSnapshot:
        """The latest statuses (a consistent copy)."""
        return LiveSnapshot(
            version=self._version,
            connected=self.connected,
            error=self._error,
            aggregators=dict(sorted(self._statuses.items())),
            sg=self._sg,
        )

    def status(self, aggregator: str) -> AggStatusMessage | None:
        return self._statuses.get(aggregator)

    async def wait_changed(self, seen: int, *, timeout: float) -> int:
        """The version once it is past ``seen``, or the same after ``timeout`` seconds."""
        if self._version > seen or self.closed:
            return self._version
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)
        return self._version

    # ------------------------------------------------------------ commands
    async def _wait_connected(self, timeout: float) -> Transport:
        """The connection, waiting up to ``timeout`` seconds while it is being (re)made (a
        request right after the dashboard starts must not fail because of the race)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = self._version
        while True:
            transport = self._transport
            if transport is not None and transport.connected:
                return transport
            left = deadline - loop.time()
            if left <= 0 or self.closed:
                raise TransportError(
                    f"not connected to the broker at {self._settings.host}:{self._settings.port}"
                    + (f": {self._error}" if self._error else "")
                )
            seen = await self.wait_changed(seen, timeout=left)

    async def request(
        self,
        aggregator: str,
        command: ControlCommand | str,
        value: float | int | str | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        timeout: float,
    ) -> ControlReply:
        """Send one command to ``aggregator`` and return its reply.

        Raises:
            MessageError: the request itself is malformed (a bad value for the command).
            FedhiveTimeoutError: no reply within ``timeout`` seconds.
            TransportError: not connected to the broker, or the connection closed.
        """
        transport = await self._wait_connected(min(timeout, CONNECT_WAIT))
        try:
            message = ControlRequest(
                project=self.topics.project,
                sender=self.sender,
                command=ControlCommand(command),
                value=value,
                params=dict(params or {}),
            )
            topic = self.topics.agg_control(aggregator)
        except (ValueError, ValidationError, MessageError) as exc:
            raise MessageError(f"invalid {command} request: {_first_error(exc)}") from exc
        correlation = uuid.uuid4().bytes
        future: asyncio.Future[ControlReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = _Pending(aggregator, future)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await transport.publish(
                    topic,
                    encode_message(message),
                    correlation=correlation,
                    response_topic=f"{self.topics.agg_reply(aggregator)}/{self._id}",
                )
                return await future
        except TimeoutError:
            if deadline.expired():
                raise FedhiveTimeoutError(
                    f"no aggregator {aggregator!r} answered within {timeout:g} s"
                ) from None
            raise
        finally:
            self._pending.pop(correlation, None)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
    return str(exc)


__all__ = ["RETRY_DELAY", "BrokerLink", "LiveSnapshot"]
