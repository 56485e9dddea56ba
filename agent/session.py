"""The agent's asynchronous core: presence, heartbeats, receiving models, submitting models.

:class:`AgentSession` is what :class:`agent.client.BasicClient` drives from its background
event loop; it knows nothing about frameworks (it sees named NumPy arrays).

Presence: a retained ``online`` status on connect (and after every reconnect), ``offline`` on a
goodbye, and a last will saying ``lost``; a heartbeat every ``heartbeat_interval`` seconds, also
while the user trains. The aggregator answers every online status with a notice: admitted, or
rejected (``max_agents`` reached). The aggregator's retained status tells the session when it
is stopped (INACTIVE) or finished (``max_rounds``).

Assignment: the config names the agent's aggregator, or says ``auto``. Then the session follows
every aggregator's retained status, picks the live one with the fewest active agents (ties go
to a hash of the agent's and aggregator's names, so agents starting together spread out) and
announces itself there. When its aggregator has been gone (its last will: INACTIVE, not paused
by an admin) for longer than ``rehome_timeout`` seconds it re-homes to another live aggregator:
it announces itself there, follows that aggregator's model, and sends an upload that was still
waiting for its acknowledgement again. An aggregator that does not admit it (``max_agents``)
makes it try another one. Under an sg-aggregator all aggregators serve the same SG model of the
same round, so the agent goes on with the round it was in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np

from common.chunking import Manifest, make_manifest
from common.codec import Array, Buffer, Tensors, decode
from common.config import AgentConfig
from common.errors import (
    AgentRejectedError,
    FedhiveError,
    FedhiveTimeoutError,
    MessageError,
    NotConnectedError,
    TrainingFinishedError,
    TransportError,
)
from common.exchange import (
    ModelReceiver,
    ReceivedModel,
    prepare_model_message,
    publish_chunks,
    publish_model,
)
from common.messages import (
    AckMessage,
    AgentState,
    AgentStatusMessage,
    AggregatorState,
    AggStatusMessage,
    HeartbeatMessage,
    ModelKind,
    ModelMessage,
    ModelRequest,
    NoticeKind,
    NoticeMessage,
    ResendRequest,
    TransferInfo,
    decode_message,
    encode_message,
)
from common.packing import pack_update
from common.rejections import RejectionLog
from common.tasks import finish, off_loop, settle_gc
from common.topics import TopicKind, Topics
from common.transport import Incoming, LastWill, MqttTransport, Session, Transport

log = logging.getLogger("fedhive.agent")


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """A model received from the aggregator: its round and its tensors (views into payload)."""

    round: int
    tensors: dict[str, Array]
    message: ModelMessage


@dataclass(slots=True)
class _Upload:
    round: int
    payload: Buffer
    message: ModelMessage
    manifest: Manifest | None
    aggregator: str


@dataclass(slots=True)
class _AggregatorView:
    """What an auto-assigned agent knows of one aggregator."""

    #: Its last retained status (None: the status was cleared).
    status: AggStatusMessage | None
    #: When it last went from serving to gone, or back (monotonic seconds).
    since: float

    @property
    def gone(self) -> bool:
        """Its process is gone: its will (or goodbye) says INACTIVE, and no admin paused it."""
        status = self.status
        return status is None or (status.state is AggregatorState.INACTIVE and not status.paused)

    @property
    def live(self) -> bool:
        """It takes agents now."""
        status = self.status
        return status is not None and status.state in (
            AggregatorState.ACTIVE,
            AggregatorState.WAITING_BASE,
        )


#: Seconds an auto-assigned agent collects retained statuses before it picks an aggregator.
HOMING_SETTLE = 0.5


class AgentSession:
    """One agent's connection to its aggregator through the broker."""

    def __init__(self, *, config: AgentConfig, transport: Transport | None = None) -> None:
        self.config = config
        self.name = config.agent_name
        self.topics = Topics(config.project)
        self._auto = config.auto_aggregator
        self._aggregator: str | None = None if self._auto else config.aggregator
        self._views: dict[str, _AggregatorView] = {}
        self._first_status: float | None = None  # when the first aggregator status came
        self._refused: set[str] = set()  # aggregators that did not admit this agent
        self._homing_wakeup = asyncio.Event()
        self._transport = transport
        self._receiver = ModelReceiver(
            max_bytes=config.max_model_bytes, on_missing=self._request_missing
        )
        self._latest: GlobalModel | None = None
        # Notified on a new model, an admission notice and an aggregator status: every wait
        # re-checks its condition then (no polling).
        self._changed = asyncio.Condition()
        self._acks: dict[int, asyncio.Future[AckMessage]] = {}
        self._upload: _Upload | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ignored = RejectionLog(log)
        self._resend_on_status = False  # reconnected with an upload not acknowledged
        #: What the agent is doing, sent with every heartbeat ("idle", "training"...).
        self.state = "idle"
        self.aggregator_status: AggStatusMessage | None = None
        #: The aggregator's answer to this agent's online status (None: none yet).
        self.admission: NoticeMessage | None = None
        self._closed = False

    @property
    def latest(self) -> GlobalModel | None:
        return self._latest

    @property
    def aggregator(self) -> str | None:
        """The aggregator this agent is with (None: an auto-assigned agent that has not
        picked one yet)."""
        return self._aggregator

    def _status(self, state: AgentState) -> bytes:
        # An auto-assigned agent's will names no aggregator (it may move): the aggregator it
        # is with at the time takes it.
        return encode_message(
            AgentStatusMessage(
                project=self.config.project,
                sender=self.name,
                state=state,
                aggregator=None if self._auto and state is AgentState.LOST else self._aggregator,
            )
        )

    async def __aenter__(self) -> Self:
        if self._transport is None:
            self._transport = MqttTransport(
                settings=self.config.broker(),
                client_id=f"{self.config.project}.agent.{self.name}",
                will=LastWill(self.topics.agent_status(self.name), self._status(AgentState.LOST)),
                on_connect=self._reconnected,
                # What the aggregator sends while the connection is down (acks, the next
                # model) waits at the broker; a new process starts clean.
                session=Session.TRANSPORT,
            )
        t, aggr = self.topics, self._aggregator
        await self._transport.__aenter__()
        try:
            inbox = [t.agent_inbox(self.name), Topics.chunks(t.agent_inbox(self.name))]
            if aggr is None:  # auto: follow every aggregator's status, pick one from them
                await self._transport.subscribe(*inbox, t.all_agg_status())
            else:
                await self._transport.subscribe(
                    t.agg_model(aggr), Topics.chunks(t.agg_model(aggr)), *inbox, t.agg_status(aggr)
                )
                await self._announce_online()
        except BaseException:
            await self._transport.__aexit__(None, None, None)
            raise
        settle_gc()
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"{self.name}-consume"),
            asyncio.create_task(self._heartbeat(), name=f"{self.name}-heartbeat"),
            asyncio.create_task(self._receiver.watch(), name=f"{self.name}-chunk-watch"),
        ]
        if self._auto:
            self._tasks.append(asyncio.create_task(self._homing(), name=f"{self.name}-homing"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        transport = self._require()
        with contextlib.suppress(FedhiveError):
            await transport.publish(
                self.topics.agent_status(self.name), self._status(AgentState.OFFLINE), retain=True
            )
        for task in self._tasks:
            task.cancel()
        for fut in self._acks.values():
            fut.cancel()
        await transport.__aexit__(exc_type, exc, tb)
        self._closed = True
        async with self._changed:
            self._changed.notify_all()  # waits re-check and see the session closed
        # The transport is closed, so the consumer's message iterator has ended.
        await finish(self._tasks)

    def _require(self) -> Transport:
        if self._transport is None:
            raise NotConnectedError("agent session is not open: use it inside 'async with'")
        return self._transport

    async def _reconnected(self) -> None:
        """After a reconnect: online again; an upload whose acknowledgement has not come is
        sent again once the aggregator shows it is there (its next status: the broker may have
        lost the upload, or taken it while the aggregator was not subscribed). A copy the
        aggregator has already is answered DUPLICATE, never counted twice."""
        await self._announce_online()
        if self._unacknowledged() is not None:
            self._resend_on_status = True

    def _unacknowledged(self) -> _Upload | None:
        upload = self._upload
        if upload is None:
            return None
        pending = self._acks.get(upload.round)
        return upload if pending is not None and not pending.done() else None

    async def _send_again(self) -> None:
        upload = self._unacknowledged()
        if upload is None:
            return
        if upload.manifest is not None:
            # A new transfer id: the aggregator refuses a transfer it received as a replay.
            upload.manifest = make_manifest(
                upload.payload, upload.manifest.chunk_size, digest=upload.manifest.blake3
            )
            upload.message = upload.message.model_copy(
                update={"transfer": TransferInfo.of(upload.manifest)}
            )
        log.info("%s: sending the model of round %d again (reconnected)", self.name, upload.round)
        await self._publish_upload(upload, upload.aggregator)

    async def _announce_online(self) -> None:
        if self._aggregator is None:
            return  # auto: not with any aggregator yet
        await self._require().publish(
            self.topics.agent_status(self.name), self._status(AgentState.ONLINE), retain=True
        )

    async def _heartbeat(self) -> None:
        transport = self._require()
        while True:
            if transport.connected:
                beat = HeartbeatMessage(
                    project=self.config.project,
                    sender=self.name,
                    state=self.state,
                    round=self._latest.round if self._latest else None,
                )
                with contextlib.suppress(FedhiveError):
                    await transport.publish(
                        self.topics.agent_heartbeat(self.name), encode_message(beat), qos=0
                    )
            await asyncio.sleep(self.config.heartbeat_interval)  # the heartbeat period

    # ------------------------------------------------------------ receiving
    async def _consume(self) -> None:
        async for incoming in self._require().messages():
            try:
                await self._handle(incoming)
            except FedhiveError as exc:
                self._ignored.reject(
                    type(exc).__name__,
                    incoming.topic,
                    "%s: ignored message on %s: %s",
                    self.name,
                    incoming.topic,
                    exc,
                )
            except Exception as exc:  # a bug must not leave the agent deaf
                self._ignored.internal(
                    incoming.topic, "%s: internal error on %s", self.name, incoming.topic, exc=exc
                )

    async def _handle(self, incoming: Incoming) -> None:
        parsed = self.topics.parse(incoming.topic)
        if parsed.chunk:
            received = self._receiver.chunk(incoming.payload)
            await self._receiver.admit()  # chunks a broker dropped are asked for at once
            if received is not None:
                await self._on_model(received)
            return
        if not incoming.payload:
            if self._auto and parsed.kind is TopicKind.AGG_STATUS and parsed.aggregator:
                self._track(parsed.aggregator, None)  # its retained status was cleared
            return
        message = decode_message(incoming.payload)
        if parsed.aggregator is not None and message.sender != parsed.aggregator:
            raise MessageError(
                f"sender {message.sender!r} does not match the topic's aggregator "
                f"{parsed.aggregator!r}"
            )
        if self._auto and isinstance(message, AggStatusMessage):
            self._track(message.sender, message)
        if parsed.aggregator not in (None, self._aggregator):
            if self._auto:
                return  # another aggregator's status (tracked above) or a former one's model
            raise MessageError(f"message from unexpected aggregator {parsed.aggregator!r}")
        match parsed.kind, message:
            case (
                (TopicKind.AGG_MODEL | TopicKind.AGENT_INBOX),
                ModelMessage(kind=ModelKind.GLOBAL),
            ):
                if self._latest is not None and message.round <= self._latest.round:
                    self._receiver.ignore(message)
                    return
                received = self._receiver.announce(incoming.topic, message)
                if received is not None:
                    await self._on_model(received)
                elif incoming.retain:
                    # Only the retained manifest reached us: its chunks went out before we
                    # subscribed, so ask for them now instead of waiting for a timeout.
                    await self._receiver.request_now(incoming.topic)
            case TopicKind.AGENT_INBOX, AckMessage():
                fut = self._acks.get(message.round)
                if fut is not None and not fut.done():
                    fut.set_result(message)
            case TopicKind.AGENT_INBOX, ResendRequest():
                await self._resend(message)
            case TopicKind.AGENT_INBOX, NoticeMessage():
                await self._on_notice(message)
            case TopicKind.AGG_STATUS, AggStatusMessage():
                await self._on_aggregator_status(message)
            case _:
                raise MessageError(f"unexpected {message.type!r} message")

    async def _on_model(self, received: ReceivedModel) -> None:
        message = received.message
        if self._latest is not None and message.round <= self._latest.round:
            return
        tensors, _meta = decode(received.payload)
        self._latest = GlobalModel(message.round, tensors, message)
        log.info("%s: model of round %d received", self.name, message.round)
        async with self._changed:
            self._changed.notify_all()

    async def _on_notice(self, notice: NoticeMessage) -> None:
        if notice.sender != self._aggregator:
            raise MessageError(f"notice from aggregator {notice.sender!r}, not ours")
        if self._auto and notice.kind is NoticeKind.REJECTED:
            self._refused.add(notice.sender)
            other = self._pick(exclude=self._refused)
            if other is not None:
                log.warning(
                    "%s: not admitted by aggregator %s (%s): trying %s",
                    self.name,
                    notice.sender,
                    notice.reason,
                    other,
                )
                await self._home(other)
                return
        elif notice.kind is NoticeKind.ADMITTED:
            self._refused.discard(notice.sender)
        before = self.admission.kind if self.admission is not None else None
        self.admission = notice
        if notice.kind is not before:
            if notice.kind is NoticeKind.REJECTED:
                log.error(
                    "%s: rejected by aggregator %s: %s", self.name, notice.sender, notice.reason
                )
            else:
                log.info("%s: admitted by aggregator %s", self.name, notice.sender)
        async with self._changed:
            self._changed.notify_all()

    async def _on_aggregator_status(self, status: AggStatusMessage) -> None:
        before = self.aggregator_status.state if self.aggregator_status is not None else None
        self.aggregator_status = status
        gone = status.state is AggregatorState.INACTIVE and not status.paused
        if self._resend_on_status and not gone:
            self._resend_on_status = False
            try:
                await self._send_again()
            except FedhiveError as exc:  # the next status tries again
                self._resend_on_status = True
                log.warning("%s: cannot send the model again: %s", self.name, exc)
        if status.state is not before:
            if status.state is AggregatorState.INACTIVE:
                log.warning(
                    "%s: aggregator %s is not operational (%s): waiting",
                    self.name,
                    status.sender,
                    status.blocker or "INACTIVE",
                )
            elif status.state is AggregatorState.FINISHED:
                log.info("%s: aggregator %s finished training", self.name, status.sender)
            elif before is AggregatorState.INACTIVE:
                log.info("%s: aggregator %s is %s again", self.name, status.sender, status.state)
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------ auto assignment
    def _track(self, name: str, status: AggStatusMessage | None) -> None:
        """Take an aggregator's status (None: cleared) into the views the choice works on."""
        now = time.monotonic()
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = _AggregatorView(status, now)
        else:
            was_gone = view.gone
            view.status = status
            if view.gone != was_gone:
                view.since = now
        if status is not None and self._first_status is None:
            self._first_status = now
        self._homing_wakeup.set()

    def _pick(self, *, exclude: set[str] | frozenset[str] = frozenset()) -> str | None:
        """The live aggregator with the fewest active agents (a hash of both names breaks
        ties, so agents that start together spread out); None if there is none."""
        candidates = [
            (view.status.active, _affinity(self.name, name), name)
            for name, view in self._views.items()
            if view.live and view.status is not None and name not in exclude
        ]
        return min(candidates)[2] if candidates else None

    async def _homing(self) -> None:
        """Forever: pick an aggregator once statuses came in; re-home when it is gone."""
        period = min(1.0, self.config.rehome_timeout / 4)
        while True:
            try:
                await self._check_home()
            except FedhiveError as exc:  # the next period tries again
                log.warning("%s: cannot move to another aggregator: %s", self.name, exc)
            self._homing_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._homing_wakeup.wait(), period)

    async def _check_home(self) -> None:
        now = time.monotonic()
        current = self._aggregator
        if current is None:
            if self._first_status is None or now - self._first_status < HOMING_SETTLE:
                return  # the retained statuses of the other aggregators are still coming
            choice = self._pick(exclude=self._refused)
            if choice is not None:
                await self._home(choice)
            return
        view = self._views.get(current)
        if view is None or not view.gone or now - view.since <= self.config.rehome_timeout:
            return
        choice = self._pick(exclude={current} | self._refused)
        if choice is None:
            return
        log.warning(
            "%s: aggregator %s gone for %.1f s: re-homing to %s",
            self.name,
            current,
            now - view.since,
            choice,
        )
        await self._home(choice)

    async def _home(self, name: str) -> None:
        """Move to aggregator ``name``: announce this agent there, follow its model, and send
        it an upload that its former aggregator never acknowledged."""
        transport = self._require()
        former, self._aggregator = self._aggregator, name
        self.admission = None
        view = self._views.get(name)
        self.aggregator_status = view.status if view is not None else None
        if former is None:
            log.info("%s: picked aggregator %s", self.name, name)
        # Announced before asking it for anything: it answers only the agents it knows.
        await self._announce_online()
        model = self.topics.agg_model(name)
        await transport.subscribe(model, Topics.chunks(model))
        upload = self._upload
        if upload is not None and upload.aggregator != name:
            pending = self._acks.get(upload.round)
            if pending is not None and not pending.done():
                log.info("%s: sending the model of round %d to %s", self.name, upload.round, name)
                await self._publish_upload(upload, name)
        async with self._changed:
            self._changed.notify_all()

    @property
    def rejected(self) -> str | None:
        """Why the aggregator did not admit this agent (None if it did or has not answered)."""
        notice = self.admission
        if notice is None or notice.kind is not NoticeKind.REJECTED:
            return None
        return notice.reason or "rejected by the aggregator: max_agents reached"

    @property
    def aggregator_active(self) -> bool:
        status = self.aggregator_status
        return status is not None and status.state is AggregatorState.ACTIVE

    async def _request_missing(self, topic: str, message: ModelMessage, missing: list[int]) -> None:
        request = ModelRequest(
            project=self.config.project,
            sender=self.name,
            transfer_id=message.transfer.transfer_id if message.transfer else None,
            chunks=missing,
        )
        await self._require().publish(self.topics.agent_request(self.name), encode_message(request))

    async def request_model(self) -> None:
        """Ask the aggregator for its current model (sent to this agent's inbox)."""
        request = ModelRequest(project=self.config.project, sender=self.name)
        await self._require().publish(self.topics.agent_request(self.name), encode_message(request))

    async def wait_model(
        self, *, after: int | None, timeout: float | None, until_active: bool = False
    ) -> GlobalModel:
        """The first model whose round is greater than ``after`` (any model if None), once the
        aggregator admitted this agent (and, with ``until_active``, once it is ACTIVE).

        Waits on a condition (no polling), also while the aggregator is INACTIVE. Raises
        AgentRejectedError if the aggregator did not admit this agent, TrainingFinishedError
        if it finished its rounds and has no model after ``after``, FedhiveTimeoutError after
        ``timeout`` seconds, NotConnectedError if the session closes meanwhile.
        """
        self._require()

        def ready() -> bool:
            if self.rejected is not None:
                raise AgentRejectedError(self.rejected)
            latest = self._latest
            fresh = latest is not None and (after is None or latest.round > after)
            if fresh and self.admission is not None:
                return not until_active or self.aggregator_active
            status = self.aggregator_status
            if (
                status is not None
                and status.state is AggregatorState.FINISHED
                and after is not None
                and status.model_round is not None
                and after >= status.model_round
            ):
                raise TrainingFinishedError(
                    f"training is finished: aggregator {status.sender!r} completed "
                    f"{status.model_round} rounds"
                )
            if self._closed:
                raise NotConnectedError("agent session closed while waiting for a model")
            return False

        async with self._changed:
            try:
                async with asyncio.timeout(timeout):  # no task per wait, unlike wait_for
                    await self._changed.wait_for(ready)
            except TimeoutError:
                raise FedhiveTimeoutError(
                    f"no model after round {after} from aggregator "
                    f"{self._aggregator or self.config.aggregator!r} within {timeout} s"
                    + ("" if self.admission is not None else " (it has not admitted this agent)")
                ) from None
        assert self._latest is not None
        return self._latest

    # ------------------------------------------------------------ submitting
    async def submit(
        self,
        tensors: Tensors,
        *,
        round: int,
        num_samples: float,
        metrics: dict[str, float],
        framework: str,
        ack_timeout: float | None,
    ) -> AckMessage | None:
        """Send a locally trained model for ``round``; return the aggregator's ack (None if
        ``ack_timeout`` is None or no ack came in time). AgentRejectedError, without sending,
        if the aggregator did not admit this agent."""
        self._require()
        if self.rejected is not None:
            raise AgentRejectedError(self.rejected)
        aggregator = self._aggregator
        if aggregator is None:
            raise NotConnectedError("no aggregator picked yet: wait for a model first")
        # Packing (a copy, maybe a cast or deflating) and hashing read the whole model: off the
        # event loop when it is large, so heartbeats keep going meanwhile.
        nbytes = sum(np.asarray(t).nbytes for t in tensors.values())
        payload = await off_loop(
            nbytes,
            pack_update,
            tensors,
            self._compression(aggregator),
            inline_max=self.config.chunk_size,  # sent inline: as bytes, not copied into them
        )
        message, manifest = await off_loop(
            nbytes,
            prepare_model_message,
            payload,
            chunk_size=self.config.chunk_size,
            project=self.config.project,
            sender=self.name,
            kind=ModelKind.LOCAL,
            round=round,
            num_samples=num_samples,
            metrics=metrics,
            framework=framework,
        )
        upload = self._upload = _Upload(round, payload, message, manifest, aggregator)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AckMessage] = loop.create_future()
        self._acks[round] = fut
        try:
            try:
                await self._publish_upload(upload, aggregator)
            except TransportError as exc:
                if ack_timeout is None or self._require().connected:
                    raise
                # The connection dropped while sending: it is sent again once reconnected.
                log.warning("%s: upload of round %d interrupted: %s", self.name, round, exc)
            if ack_timeout is None:
                return None
            try:
                async with asyncio.timeout(ack_timeout):
                    return await fut
            except TimeoutError:
                log.warning(
                    "%s: no acknowledgement for round %d within %s s", self.name, round, ack_timeout
                )
                return None
        finally:
            self._acks.pop(round, None)

    async def _publish_upload(self, upload: _Upload, aggregator: str) -> None:
        """Send an upload to ``aggregator``: the envelope, and the chunks unless the aggregator
        takes uploads in turn (it asks for them when this one's turn comes)."""
        upload.aggregator = aggregator
        pull = upload.manifest is not None and self._pulls(aggregator, upload.manifest.total_bytes)
        if bool(upload.message.pull) != pull:
            upload.message = upload.message.model_copy(update={"pull": pull or None})
        await publish_model(
            self._require(),
            self.topics.agg_local(aggregator, self.name),
            upload.message,
            upload.payload,
            None if pull else upload.manifest,
        )

    def _status_of(self, aggregator: str) -> AggStatusMessage | None:
        if aggregator == self._aggregator and self.aggregator_status is not None:
            return self.aggregator_status
        view = self._views.get(aggregator)
        return None if view is None else view.status

    def _pulls(self, aggregator: str, size: int) -> bool:
        """Whether ``aggregator`` asks for the chunks of an upload of ``size`` bytes when its
        turn comes, rather than taking them with the announcement (its status)."""
        status = self._status_of(aggregator)
        if status is None or not status.pull_uploads:
            return False
        return status.push_limit is None or size > status.push_limit

    def _compression(self, aggregator: str) -> str | None:
        """How ``aggregator`` wants updates packed (its status; None: plain frames)."""
        status = self._status_of(aggregator)
        return None if status is None else status.compression

    async def _resend(self, request: ResendRequest) -> None:
        upload = self._upload
        if upload is None or upload.message.transfer is None:
            return
        if upload.message.transfer.transfer_id != request.transfer_id:
            return
        manifest = upload.message.transfer.manifest(max_bytes=self.config.max_model_bytes)
        log.info("%s: re-sending %d chunks", self.name, len(request.chunks))
        await publish_chunks(
            self._require(),
            Topics.chunks(self.topics.agg_local(upload.aggregator, self.name)),
            upload.payload,
            manifest,
            indices=[i for i in request.chunks if 0 <= i < manifest.count],
        )


def _affinity(agent: str, aggregator: str) -> bytes:
    """A stable pseudo-random order of aggregators per agent (rendezvous hashing)."""
    return hashlib.sha256(f"{agent}/{aggregator}".encode()).digest()
