"""ControlClient: an admin's connection to one aggregator's control plane.

It sends :class:`~common.messages.ControlRequest` s on ``agg/{aggr}/control`` with an MQTT 5
response topic (under ``agg/{aggr}/control/reply``) and correlation data, and matches each
:class:`~common.messages.ControlReply` to its request by that correlation id. It also follows
the aggregator's retained status (the Aggregation Management view)::

    async with ControlClient(settings=broker, project="p", aggregator="aggr1") as control:
        status = await control.status(timeout=5)
        reply = await control.request(ControlCommand.SET_THRESHOLD, 0.5, timeout=5)

Every wait has a timeout (FedhiveTimeoutError: "no aggregator 'X' answered within N s") and
ends early with TransportError when the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from enum import Enum
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
    decode_message,
    encode_message,
)
from common.tasks import finish
from common.topics import Topics
from common.transport import Incoming, MqttTransport, Transport

log = logging.getLogger("fedhive.control")

DEFAULT_ADMIN = "admin"


class ControlClientState(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class ControlClient:
    """Sends control commands to one aggregator and follows its status.

    Args:
        settings: how to reach the broker (the admin's credentials).
        project: the project the aggregator serves.
        aggregator: the aggregator's name.
        sender: the name requests are sent under (the aggregator checks it against its
            ``admins``); defaults to the broker user name, else ``admin``.
        transport: a transport to use instead of an MQTT connection (tests).
    """

    def __init__(
        self,
        *,
        settings: BrokerSettings,
        project: str,
        aggregator: str,
        sender: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.topics = Topics(project)
        self.aggregator = aggregator
        self.sender = sender or settings.username or DEFAULT_ADMIN
        self._settings = settings
        self._id = uuid.uuid4().hex[:12]
        self._transport = transport or MqttTransport(
            settings=settings, client_id=f"{project}.admin.{self.sender}.{self._id}"
        )
        # Only this client's replies come here; the aggregator answers under agg_reply only.
        self.reply_topic = f"{self.topics.agg_reply(aggregator)}/{self._id}"
        self._state = ControlClientState.NEW
        self._pending: dict[bytes, asyncio.Future[ControlReply]] = {}
        self._status: AggStatusMessage | None = None
        self._table: AggAgentsMessage | None = None
        self._version = 0
        self._updated = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None

    @property
    def state(self) -> ControlClientState:
        return self._state

    @property
    def latest_status(self) -> AggStatusMessage | None:
        """The aggregator's status as last received (None before the first)."""
        return self._status

    async def __aenter__(self) -> Self:
        if self._state is not ControlClientState.NEW:
            raise NotConnectedError(f"control client already {self._state.value}; create a new one")
        await self._transport.__aenter__()
        self._state = ControlClientState.OPEN
        try:
            # The agent table before the status: the first status arrives with it.
            await self._transport.subscribe(
                self.reply_topic,
                self.topics.agg_agents(self.aggregator),
                self.topics.agg_status(self.aggregator),
            )
        except BaseException:
            await self._close()
            raise
        self._consumer = asyncio.create_task(self._consume(), name=f"control-{self._id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._state is ControlClientState.CLOSED:
            return
        self._state = ControlClientState.CLOSED
        await self._transport.__aexit__(None, None, None)
        # The transport is closed, so the consumer's message iterator has ended.
        if self._consumer is not None:
            await finish([self._consumer])
        self._fail_pending()

    def _require_open(self) -> Transport:
        if self._state is not ControlClientState.OPEN:
            raise NotConnectedError("control client is not open: use it inside 'async with'")
        return self._transport

    # ------------------------------------------------------------ receiving
    async def _consume(self) -> None:
        try:
            async for incoming in self._transport.messages():
                try:
                    self._handle(incoming)
                except FedhiveError as exc:
                    log.warning("ignored message on %s: %s", incoming.topic, exc)
        finally:
            self._fail_pending()

    def _handle(self, incoming: Incoming) -> None:
        if not incoming.payload:
            return  # a cleared retained status
        message = decode_message(incoming.payload)
        if message.sender != self.aggregator or message.project != self.topics.project:
            raise MessageError(f"message from {message.sender!r} of project {message.project!r}")
        if isinstance(message, AggStatusMessage):
            self._status = message.with_agents(self._table)
            self._changed()
        elif isinstance(message, AggAgentsMessage):
            if self._table is not None and self._table.ts > message.ts:
                return  # older than the table we have
            self._table = message
            merged = None if self._status is None else self._status.with_agents(message)
            if merged is not self._status:  # it came after its status
                self._status = merged
                self._changed()
        elif isinstance(message, ControlReply):
            fut = self._pending.get(incoming.correlation or b"")
            if fut is not None and not fut.done():
                fut.set_result(message)
        else:
            raise MessageError(f"unexpected {message.type!r} message")

    def _changed(self) -> None:
        self._version += 1
        updated, self._updated = self._updated, asyncio.Event()
        updated.set()

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportError("control connection closed before the reply"))
        self._updated.set()  # status waits re-check and see the client closed

    # ------------------------------------------------------------ commands
    async def request(
        self,
        command: ControlCommand | str,
        value: float | int | str | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        timeout: float,
    ) -> ControlReply:
        """Send one command and return the aggregator's reply (``ok`` false: refused, with
        the reason). FedhiveTimeoutError if no reply came within ``timeout`` seconds."""
        transport = self._require_open()
        try:
            message = ControlRequest(
                project=self.topics.project,
                sender=self.sender,
                command=ControlCommand(command),
                value=value,
                params=dict(params or {}),
            )
        except (ValueError, ValidationError) as exc:
            raise MessageError(f"invalid {command} request: {_first_error(exc)}") from exc
        correlation = uuid.uuid4().bytes
        fut: asyncio.Future[ControlReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = fut
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await transport.publish(
                    self.topics.agg_control(self.aggregator),
                    encode_message(message),
                    correlation=correlation,
                    response_topic=self.reply_topic,
                )
                return await fut
        except TimeoutError:
            if deadline.expired():
                raise FedhiveTimeoutError(self._no_answer(timeout)) from None
            raise  # the transport's own (not connected to the broker in time)
        finally:
            self._pending.pop(correlation, None)

    async def status(self, *, timeout: float) -> AggStatusMessage:
        """The aggregator's current (retained) status; FedhiveTimeoutError if none came within
        ``timeout`` seconds (no aggregator of that name ever ran on this broker)."""
        async for status in self.statuses(timeout=timeout):
            return status
        raise TransportError("control connection closed before a status arrived")

    async def statuses(self, *, timeout: float | None = None) -> AsyncIterator[AggStatusMessage]:
        """The current status, then every update until the connection closes; ``timeout``
        bounds each wait (None: wait as long as it takes, for ``--watch``)."""
        self._require_open()
        seen = 0
        while True:
            if self._version > seen and self._status is not None:
                seen = self._version
                yield self._status
                continue
            if self._state is not ControlClientState.OPEN or self._consumer_done():
                return
            updated = self._updated
            try:
                async with asyncio.timeout(timeout):
                    await updated.wait()
            except TimeoutError:
                raise FedhiveTimeoutError(
                    f"no status from aggregator {self.aggregator!r} of project "
                    f"{self.topics.project!r} within {timeout} s: is it running against "
                    f"{self._settings.host}:{self._settings.port}?"
                ) from None

    def _consumer_done(self) -> bool:
        return self._consumer is not None and self._consumer.done()

    def _no_answer(self, timeout: float) -> str:
        return (
            f"no aggregator {self.aggregator!r} answered within {timeout:g} s (project "
            f"{self.topics.project!r}, broker {self._settings.host}:{self._settings.port})"
        )


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return str(first["msg"]).removeprefix("Value error, ")
    return str(exc)


__all__ = ["DEFAULT_ADMIN", "ControlClient", "ControlClientState"]
