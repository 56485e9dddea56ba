"""The aggregator process: the round engine wired to the broker.

It listens for the base model, agents' presence, local models and model requests; validates
every message before use (one clear log line and an ack with the reason for each rejection);
aggregates when the threshold is met; publishes the new model (retained manifest, chunks not
retained) and its status: at once when its state or a setting changed, else (a new round, a
model collected) at most once per ``monitor_interval``, since every agent receives every status.

A heartbeat monitor re-counts the active agents every ``monitor_interval`` seconds (an agent
silent for ``agent_timeout`` seconds is TIMEOUT), logs every change, and completes the round
when the drop makes it ready. Admins steer it on ``agg/{aggr}/control`` (complete the round,
set threshold, timeout, method or max agents, stop, restart); each request gets a reply with
the status after it on the request's MQTT 5 response topic, with its correlation data.

With ``sg_aggregator`` set, the aggregator is one region of a larger federation: it follows
``sg/model`` instead of ``base`` (SG model 0 is the base model), and when a round is ready it
publishes the round's regional result on ``agg/{aggr}/regional`` (the unrounded float64 weighted
mean, its total sample count and its contributors) instead of advancing on its own. When the
sg-aggregator's model of that round arrives it republishes it on its ``model`` topic and opens
the next round, so every aggregator's round r trains from SG model r-1. An SG model for a later
round than its own is adopted at once (a late or lagging aggregator catches up; what it had
collected for a round the SG layer closed without it is dropped). A retained SG manifest whose
chunks went out before it subscribed is completed by asking on ``sg/request``; the sg-aggregator
answers in ``agg/{aggr}/inbox``, where it also asks for regional chunks that never arrived.

Persistence (DESIGN.md "Persistence"): with a store, every accepted local model is recorded
before it is acknowledged, and every round (regional result, SG model adopted) before its model
is published. A restarted aggregator (even after kill -9) resumes from the store: the same
model and round, the models already accepted in the open round counted again (an agent sending
one of them again gets DUPLICATE), and a resumed round waits ``resume_grace`` seconds for its
agents' statuses before the threshold may complete it. A store that fails stops the service:
nothing is acknowledged or published that the store does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from aggregator import outbox
from aggregator.engine import RoundEngine, RoundResult, RoundResults
from aggregator.regional import SgLink
from aggregator.store import RecoveredState, RoundJournal, StoreError
from aggregator.strategies import create_strategy
from common.codec import Array, Buffer, ModelSpec, check_finite, decode, encode_frame
from common.config import AggregatorConfig
from common.errors import (
    ConfigError,
    FedhiveError,
    MessageError,
    StrategyError,
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
    MAX_LISTED_CONTRIBUTORS,
    MAX_STATUS_AGENTS,
    AckMessage,
    AckStatus,
    AgentInfo,
    AgentState,
    AgentStatusMessage,
    AggregatorState,
    AggStatusMessage,
    Contributor,
    ControlCommand,
    ControlReply,
    ControlRequest,
    HeartbeatMessage,
    ModelKind,
    ModelMessage,
    ModelRequest,
    NoticeKind,
    NoticeMessage,
    PresenceState,
    Refusal,
    ResendRequest,
    SgStatusMessage,
    decode_message,
    encode_message,
)
from common.packing import unpack_update
from common.rejections import RejectionLog
from common.tasks import finish, off_loop, settle_gc
from common.topics import TopicKind, Topics
from common.transport import Incoming, LastWill, MqttTransport, Session, Transport

log = logging.getLogger("fedhive.aggregator")


class _RefusedError(Exception):
    """A control command that cannot be carried out; the reason goes back to the admin."""


class AggregatorService:
    """One aggregator. ``async with`` it, or call :meth:`run` until :meth:`stop`.

    Args:
        config: its settings (the store: ``data_dir``, ``db_url``, ``keep_local``,
            ``best_metric``).
        transport: the connection to use (default: its own MQTT connection to the broker).
        persist: record rounds in the store and resume from it; by default when it connects
            to the broker itself, not over a transport it is handed (a test's in-memory bus).
    """

    def __init__(
        self,
        *,
        config: AggregatorConfig,
        transport: Transport | None = None,
        persist: bool | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.project)
        self.engine = RoundEngine(
            strategy=create_strategy(config.method, config.method_params),
            threshold=config.threshold,
            agent_timeout=config.agent_timeout,
            max_agents=config.max_agents,
        )
        self._transport = transport
        self._receiver = ModelReceiver(
            max_bytes=config.max_model_bytes,
            chunk_timeout=config.chunk_timeout,
            on_missing=self._request_missing,
            reject_unknown_chunks=True,
            budget=config.receive_budget,
        )
        self._rejects = RejectionLog(log)
        #: Rejected messages by kind (the typed error's class name, ``StaleSubmission``,
        #: ``DuplicateSubmission``, ``RefusedSubmission``, ``RefusedCommand`` or
        #: ``InternalError``): every bad message counted exactly once.
        self.rejections = self._rejects.counts
        self._local_sizes: tuple[ModelSpec, tuple[int, int]] | None = None
        #: Wills not applied yet (see _on_presence), by agent: when received, the message.
        self._deferred_lost: dict[str, tuple[float, AgentStatusMessage]] = {}
        self._settling: set[str] = set()
        self._payload: Buffer | None = None  # the current model, encoded
        self._message: ModelMessage | None = None
        self._base_sha: str | None = None
        self._stopped_by: str | None = None  # the admin who stopped it (INACTIVE)
        self._closing = False
        self._presence: dict[str, PresenceState] = {}  # as last logged
        self._status_dirty = False
        self._status_sent = 0.0
        self._status_state: AggregatorState | None = None  # the state the last status showed
        self._stopping = asyncio.Event()
        self._model_tasks: set[asyncio.Task[None]] = set()  # large models being handled
        # Acks wait while more messages do, then go out together (aggregator/outbox.py).
        self._acks = outbox.AckOutbox(
            lambda acks: self._require().publish_all(acks), delay=outbox.ACK_DELAY
        )
        self._persist = (transport is None and config.store) if persist is None else persist
        self._journal: RoundJournal | None = None
        self._failure: StoreError | None = None  # the store failed: the service stops
        self._resumed: RecoveredState | None = None  # to publish once connected
        self._hold_until: float | None = None  # a resumed round may not complete before
        # Each engine change and the store write that goes with it happen in one piece: no
        # round completes between accepting a model and recording it.
        self._round_lock = asyncio.Lock()
        # What an engine change announces (a new model, a regional result) goes out under this
        # lock, taken before the round lock is let go: announcements keep the order of the
        # changes, and uploads of the new round are taken while the broker confirms them.
        self._announce_lock = asyncio.Lock()
        #: Completed rounds, the last RESULTS_KEPT (under an sg-aggregator: the regional results,
        #: in float64); only the newest keeps its model.
        self.results = RoundResults()
        self.round_completed = asyncio.Condition()
        self._sg = config.sg_aggregator
        self._link = (
            None
            if config.sg_aggregator is None
            else SgLink(config=config, transport=self._require, receiver=self._receiver)
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> AggregatorState:
        if self._closing or self._stopped_by is not None:
            return AggregatorState.INACTIVE
        if not self.engine.has_model:
            return AggregatorState.WAITING_BASE
        if self._finished():
            return AggregatorState.FINISHED
        return AggregatorState.ACTIVE

    def _finished(self) -> bool:
        limit = self.config.max_rounds
        return limit > 0 and self.engine.model_round >= limit

    def _require(self) -> Transport:
        assert self._transport is not None
        return self._transport

    def _make_transport(self) -> Transport:
        status = AggStatusMessage(
            project=self.config.project,
            sender=self.name,
            state=AggregatorState.INACTIVE,
            round=self.engine.round,
            method=self.engine.strategy.name,
            threshold=self.config.threshold,
            agent_timeout=self.config.agent_timeout,
            max_agents=self.config.max_agents,
            max_rounds=self.config.max_rounds,
            active=0,
            needed=0,
            collected=0,
            blocker="aggregator process is gone",
            sg_aggregator=self._sg,
        )
        return MqttTransport(
            settings=self.config.broker,
            client_id=f"{self.config.project}.aggregator.{self.name}",
            will=LastWill(self.topics.agg_status(self.name), encode_message(status)),
            on_connect=self._on_reconnect,
            # Local models sent while it reconnects (or restarts) wait at the broker for it.
            session=Session.DURABLE,
        )

    async def _on_reconnect(self) -> None:
        """After a reconnect: the status again, and the current model's envelope again
        (retained), in case the broker restarted without its retained messages (a late
        joiner then asks for the chunks; agents that have the model ignore it)."""
        await self._publish_status()
        if self._transport is not None and self._message is not None:
            await self._transport.publish(
                self.topics.agg_model(self.name), encode_message(self._message), retain=True
            )

    def stop(self) -> None:
        """End :meth:`run` (the process stops; an admin's ``stop`` only pauses aggregation)."""
        self._stopping.set()

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """Serve until :meth:`stop` is called; with a store, resume from it first.

        Raises:
            StoreError: the store cannot be opened, or failed while serving (the service
                stopped; a restart resumes from what the store holds).
        """
        try:
            if self._persist:
                await self._open_store()
            await self._serve(ready=ready)
        finally:
            if self._journal is not None:
                await self._journal.close()
        if self._failure is not None:
            raise StoreError(
                f"aggregator {self.name!r} stopped: {self._failure}; restart it to resume from "
                "the store"
            ) from self._failure

    async def _serve(self, *, ready: asyncio.Event | None) -> None:
        transport = self._transport or self._make_transport()
        self._transport = transport
        t = self.topics
        if self._sg is None:
            models = [t.base(), Topics.chunks(t.base())]
        else:  # the SG model replaces the base model (SG model 0 is the base)
            inbox = t.agg_inbox(self.name)
            models = [t.sg_model(), Topics.chunks(t.sg_model()), inbox, Topics.chunks(inbox)]
            models.append(t.sg_status())
        async with transport:
            await transport.subscribe(
                *models,
                f"{t.root}/agents/+/status",
                f"{t.root}/agents/+/heartbeat",
                f"{t.root}/agents/+/request",
                t.all_local(self.name),
                t.agg_control(self.name),
            )
            await self._publish_status()
            await self._publish_resumed()
            log.info(
                "aggregator %s serving project %s on %s:%d (method %s, threshold %.2f, "
                "agent timeout %s s, max agents %s%s)",
                self.name,
                self.config.project,
                self.config.broker.host,
                self.config.broker.port,
                self.engine.strategy.name,
                self.engine.threshold,
                self.engine.agent_timeout or "no",
                self.engine.max_agents or "no limit",
                "" if self._sg is None else f", regional results to sg-aggregator {self._sg}",
            )
            settle_gc()
            if ready is not None:
                ready.set()
            tasks = [
                asyncio.create_task(self._consume(transport), name="consume"),
                asyncio.create_task(self._receiver.watch(), name="chunk-watch"),
                asyncio.create_task(self._monitor(), name="heartbeat-monitor"),
            ]
            stopping = asyncio.create_task(self._stopping.wait(), name="stopping")
            try:
                # A crashed consumer ends the service instead of leaving it deaf.
                await asyncio.wait([stopping, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
                self._closing = True
                await self._acks.drain(timeout=self.config.broker.connect_timeout)
                with contextlib.suppress(FedhiveError):
                    await self._publish_status()
            finally:
                stopping.cancel()
                tasks += self._acks.cancel()
                for task in [*tasks, *self._model_tasks]:
                    task.cancel()
        # The transport is closed, so every message iterator has ended.
        await finish([*tasks, *self._model_tasks, stopping])

    async def _consume(self, transport: Transport) -> None:
        async for incoming in transport.messages():
            await self._safely(incoming.topic, self._handle(incoming))
            self._flush_acks_if_idle()

    async def _safely(self, topic: str, work: Coroutine[Any, Any, None]) -> None:
        """Run the handling of a message on ``topic``: what goes wrong is counted and logged,
        the aggregator keeps serving."""
        try:
            await work
        except TransportError as exc:  # not the message's fault: not a rejection
            self._rejects.reject(
                "TransportError",
                self._source(topic),
                "cannot answer a message on %s: %s",
                topic,
                exc,
                count=False,
            )
        except FedhiveError as exc:
            kind, source = type(exc).__name__, self._source(topic)
            self._rejects.reject(kind, source, "rejected message on %s: %s", topic, exc)
        except Exception as exc:  # a bug: logged and counted, the aggregator keeps serving
            self._rejects.internal(
                self._source(topic), "internal error on a message on %s", topic, exc=exc
            )

    def _take_model(self, received: ReceivedModel) -> None:
        """Handle a chunked model beside the consumer: validating, folding and (for the
        round's last model) aggregating and publishing take a while, and heartbeats and other
        uploads keep being taken meanwhile (the round lock keeps rounds consistent). An upload
        counts against the receive budget until it is folded or refused, so uploads waiting
        for the round lock do not pile up beyond it."""
        task = asyncio.create_task(self._handle_model(received), name="model")
        self._model_tasks.add(task)
        task.add_done_callback(self._model_tasks.discard)

    async def _handle_model(self, received: ReceivedModel) -> None:
        try:
            await self._safely(received.topic, self._on_model(received))
        finally:
            if received.held:
                self._receiver.release(received)
                await self._safely(received.topic, self._receiver.admit())
            self._flush_acks_if_idle()

    def _flush_acks_if_idle(self) -> None:
        """Send the acks held once no received message waits to be handled (the consumer
        after each message, a chunked model's task when it is done)."""
        if not self._require().backlog:
            self._acks.flush()

    def _source(self, topic: str) -> str:
        """Who a message came from, by its topic (what the broker authenticated)."""
        try:
            parsed = self.topics.parse(topic)
        except FedhiveError:
            return "an unknown topic"
        return parsed.agent or parsed.aggregator or parsed.kind.value

    async def _monitor(self) -> None:
        """The heartbeat monitor: agents fall into TIMEOUT by the clock, not by a message."""
        while True:
            await asyncio.sleep(self.config.monitor_interval)  # a polling period
            try:
                await self._settle_deferred_lost()
                if self._review_presence() or self._hold_over():
                    await self._maybe_complete()
                due = time.monotonic() - self._status_sent >= self.config.status_interval
                if self._status_dirty or due:
                    await self._publish_status()
                self._rejects.flush()  # summaries of suppressed rejection lines
            except FedhiveError as exc:  # the next period tries again
                log.warning("heartbeat monitor: %s", exc)

    # ------------------------------------------------------------ dispatch
    async def _handle(self, incoming: Incoming) -> None:
        parsed = self.topics.parse(incoming.topic)
        if parsed.chunk:
            # An agent's chunks belong to the upload it announced itself.
            own = incoming.topic.rsplit("/", 1)[0] if parsed.kind is TopicKind.AGG_LOCAL else None
            received = self._receiver.chunk(incoming.payload, announced_on=own)
            # Ask for more chunks as these arrive; a finished upload's budget goes to the next.
            await self._receiver.admit()
            if received is not None:
                self._take_model(received)
            return
        if not incoming.payload and parsed.kind in _CLEARABLE_KINDS:
            return  # a cleared retained message (elsewhere an empty payload is a bad one)
        if parsed.kind is TopicKind.AGG_CONTROL:
            await self._on_control(incoming)
            return
        message = decode_message(incoming.payload)
        if parsed.agent is not None and message.sender != parsed.agent:
            raise MessageError(
                f"sender {message.sender!r} does not match the topic's agent {parsed.agent!r}"
            )
        if message.project != self.config.project:
            raise MessageError(f"message for project {message.project!r}")
        if parsed.kind in _SG_KINDS and message.sender != self._sg:
            raise MessageError(f"message from {message.sender!r}, not sg-aggregator {self._sg!r}")
        match parsed.kind, message:
            case TopicKind.BASE, ModelMessage(kind=ModelKind.BASE):
                received = self._receiver.announce(incoming.topic, message)
                if received is not None:
                    await self._on_model(received)
            case TopicKind.AGG_LOCAL, ModelMessage(kind=ModelKind.LOCAL):
                await self._announce_local(incoming.topic, message)
            case TopicKind.AGENT_STATUS, AgentStatusMessage():
                await self._on_presence(message)
            case TopicKind.AGENT_HEARTBEAT, HeartbeatMessage():
                await self._on_heartbeat(message)
            case TopicKind.AGENT_REQUEST, ModelRequest():
                await self._on_model_request(message)
            case ((TopicKind.SG_MODEL | TopicKind.AGG_INBOX), ModelMessage(kind=ModelKind.SG)):
                if not self._sg_is_newer(message):
                    self._receiver.ignore(message)  # its chunks are no bad messages
                    return
                received = self._receiver.announce(incoming.topic, message)
                if received is not None:
                    await self._on_model(received)
                elif incoming.retain:
                    # Only the retained manifest reached us: ask for its chunks at once.
                    await self._receiver.request_now(incoming.topic)
            case TopicKind.SG_STATUS, SgStatusMessage() if self._link is not None:
                await self._link.on_status(
                    message, model_round=self.engine.model_round, base_sha=self._base_sha
                )
            case TopicKind.AGG_INBOX, ResendRequest() if self._link is not None:
                await self._link.resend_chunks(message)
            case TopicKind.AGG_INBOX, AckMessage() if self._link is not None:
                self._link.on_ack(message)
            case _:
                raise MessageError(f"unexpected {message.type!r} message")

    # ------------------------------------------------------------ presence
    async def _on_presence(self, message: AgentStatusMessage) -> None:
        name = message.sender
        if message.state is AgentState.LOST and name not in self._settling:
            # A will takes effect after a short grace, and only if this aggregator's own
            # connection held meanwhile: Mosquitto sends every client's will when it stops, so
            # wills that come around a reconnect tell of the broker's restart, not of the
            # agent; the agent's return (its online status or a heartbeat) cancels them.
            self._deferred_lost.setdefault(name, (time.monotonic(), message))
            return
        self._deferred_lost.pop(name, None)  # its own word since settles it
        if message.aggregator not in (None, self.name):
            # The agent belongs to another aggregator: if it was ours, it moved (re-homed).
            if self.engine.presence(name) not in (None, PresenceState.OFFLINE):
                log.info("agent %s moved to aggregator %s", name, message.aggregator)
                self.engine.agent_status(name, AgentState.OFFLINE)
                if self._review_presence(name) and await self._maybe_complete(wait=False) is None:
                    await self._status_changed()
            return
        if (
            message.aggregator is None
            and message.state is not AgentState.ONLINE
            and self.engine.presence(name) in (None, PresenceState.OFFLINE)
        ):
            # A will that names no aggregator (an agent that picks its own): only the
            # aggregator it is with takes it.
            return
        record = self.engine.agent_status(name, message.state)
        if message.state is AgentState.ONLINE:
            # Every online status is answered: the agent waits for its admission.
            await self._notify_admission(record.name, record.rejected)
        elif self.engine.presence(record.name) is PresenceState.ACTIVE:  # lost, in its grace
            log.info(
                "agent %s lost its connection: it counts until %g s without a heartbeat",
                record.name,
                self.engine.agent_timeout,
            )
        if self._review_presence(record.name) and await self._maybe_complete(wait=False) is None:
            await self._status_changed()

    def _will_is_due(self, since: float, now: float) -> bool:
        """Whether a will received at ``since`` may take effect now."""
        t = self._transport
        if t is None or not t.connected or now - since < WILL_GRACE:
            return False
        back = t.reconnected_at
        # Received shortly before or after this aggregator lost and regained the broker: its
        # agent gets the reconnect grace to come back.
        return back is None or since - back >= RECONNECT_GRACE or now - back >= RECONNECT_GRACE

    async def _settle_deferred_lost(self) -> None:
        """Apply the wills whose agents did not come back in time."""
        now = time.monotonic()
        for name, (since, message) in list(self._deferred_lost.items()):
            if self._deferred_lost.get(name) != (since, message) or not self._will_is_due(
                since, now
            ):
                continue
            del self._deferred_lost[name]
            self._settling.add(name)
            try:
                await self._on_presence(message)
            finally:
                self._settling.discard(name)

    async def _on_heartbeat(self, message: HeartbeatMessage) -> None:
        self._deferred_lost.pop(message.sender, None)  # alive after all
        before = self.engine.presence(message.sender)
        record = self.engine.heartbeat(message.sender)
        if record is None or self.engine.presence(record.name) is before:
            return
        if before is PresenceState.TIMEOUT:  # back from TIMEOUT: admitted again if there is room
            await self._notify_admission(record.name, record.rejected)
        if self._review_presence(record.name) and await self._maybe_complete(wait=False) is None:
            await self._status_changed()

    def _review_presence(self, *names: str) -> bool:
        """Log every agent (of ``names``, else all) whose presence changed since the last
        review; True if any did (the status is then due, and the round may be ready)."""
        if names:
            now = {n: p for n in names if (p := self.engine.presence(n)) is not None}
        else:
            now = self.engine.presences()
        changed = False
        for name, state in now.items():
            was = self._presence.get(name)
            if state is was:
                continue
            changed = True
            record = self.engine.agents[name]
            silent = ""
            if state is PresenceState.TIMEOUT and record.last_seen is not None:
                silent = f" (no heartbeat for {self.engine.now() - record.last_seen:.1f} s)"
            log.info(
                "agent %s: %s -> %s%s; %d active, %d needed",
                name,
                was.value if was is not None else "new",
                state.value,
                silent,
                self.engine.active,
                self.engine.needed,
            )
        if names:
            self._presence.update(now)
        else:
            self._presence = now
        if changed:
            self._status_dirty = True
        return changed

    async def _notify_admission(self, agent: str, rejected: bool) -> None:
        reason = None
        if rejected:
            reason = (
                f"aggregator {self.name!r} is full: max_agents {self.engine.max_agents} reached; "
                f"agent {agent!r} is not admitted"
            )
            log.warning("agent %s rejected: max_agents %d reached", agent, self.engine.max_agents)
        notice = NoticeMessage(
            project=self.config.project,
            sender=self.name,
            kind=NoticeKind.REJECTED if rejected else NoticeKind.ADMITTED,
            reason=reason,
        )
        assert self._transport is not None
        await self._transport.publish(self.topics.agent_inbox(agent), encode_message(notice))

    # ------------------------------------------------------------ models
    async def _on_model(self, received: ReceivedModel) -> None:
        message = received.message
        if message.kind is ModelKind.BASE:
            await self._on_base(received)
            return
        if message.kind is ModelKind.SG:
            await self._on_sg_model(received)
            return
        await self._on_local(received)

    async def _on_base(self, received: ReceivedModel) -> None:
        size = memoryview(received.payload).nbytes
        sha = await off_loop(size, _sha256_of, received)
        if sha == self._base_sha:
            return
        tensors, _meta = decode(received.payload)
        # InvalidModelError: a federation cannot start from NaN
        await off_loop(size, check_finite, tensors)
        framework = received.message.framework or "numpy"
        spec = ModelSpec.from_tensors(tensors, framework)
        async with self._round_lock:
            if not await self._record_model(received, framework):
                return
            self._base_sha = sha
            self.engine.set_model(tensors, round=0, spec=spec)
            await self._announce_lock.acquire()
        log.info(
            "base model from %s: %d tensors, %d bytes; round 1 open",
            received.message.sender,
            len(spec.tensors),
            spec.nbytes,
        )
        await self._announce(
            functools.partial(
                self._publish_model, received.payload, digest=_transfer_digest(received)
            )
        )

    # ------------------------------------------------------------ SG layer
    def _sg_is_newer(self, message: ModelMessage) -> bool:
        """Whether an SG model moves this aggregator on: a later round of the same federation,
        or any round of a new one (another base model)."""
        if self._base_sha is None and self.engine.has_model:
            # Resumed from a store that never saw SG model 0 (this aggregator joined after
            # round 0): the federation's base model is the one the SG layer names.
            self._base_sha = message.base_sha
        if message.base_sha is not None and message.base_sha != self._base_sha:
            return True
        return message.round > self.engine.model_round

    async def _on_sg_model(self, received: ReceivedModel) -> None:
        """Serve the SG model of round r to this aggregator's agents and open round r+1."""
        m = received.message
        if not self._sg_is_newer(m):
            return
        tensors, _meta = decode(received.payload)
        e = self.engine
        new_base = m.base_sha is not None and m.base_sha != self._base_sha
        if new_base or e.spec is None:
            spec = ModelSpec.from_tensors(tensors, m.framework or "numpy")
        else:
            spec = e.spec
            spec.check(tensors)  # ModelMismatchError: logged by the consumer, nothing changes
        await off_loop(memoryview(received.payload).nbytes, check_finite, tensors)
        if e.has_model and not new_base and not e.sealed and e.collected and m.round >= e.round:
            log.warning(
                "round %d was closed by the SG layer without this aggregator's regional result: "
                "%d local model(s) dropped",
                e.round,
                e.collected,
            )
        async with self._round_lock:
            if not await self._record_model(received, m.framework or "numpy"):
                return
            if new_base:
                self._base_sha = m.base_sha
            e.set_model(tensors, round=m.round, spec=spec)
            await self._announce_lock.acquire()
        if self._link is not None:
            self._link.settled(m.round)
        log.info(
            "SG model of round %d from %s (%d contributors); round %d open",
            m.round,
            m.sender,
            len(m.contributors),
            e.round,
        )
        await self._announce(
            functools.partial(
                self._publish_global,
                received.payload,
                contributors=list(m.contributors),
                method=m.method,
                digest=_transfer_digest(received),
            )
        )

    def _refusal(self, agent: str) -> tuple[Refusal, str] | None:
        """Why ``agent``'s submissions are refused outright now, if they are."""
        if self._stopped_by is not None:
            return Refusal.INACTIVE, (
                f"aggregator {self.name!r} is not operational (INACTIVE: stopped by admin "
                f"{self._stopped_by!r}); it takes models again after a restart"
            )
        if self._finished():
            return Refusal.FINISHED, (
                f"training is finished: aggregator {self.name!r} completed its "
                f"{self.config.max_rounds} rounds"
            )
        if not self.engine.admitted(agent):
            return Refusal.MAX_AGENTS, (
                f"agent {agent!r} is not admitted: aggregator {self.name!r} has reached "
                f"max_agents {self.engine.max_agents}"
            )
        return None

    async def _on_local(self, received: ReceivedModel) -> None:
        m = received.message
        if self._failure is not None:
            return  # the store failed and the service is stopping: nothing more is taken
        refusal = self._refusal(m.sender)
        if refusal is not None:
            self.engine.counters.count(AckStatus.REJECTED)
            self._ack(m.sender, m.round, AckStatus.REJECTED, refusal[1], m, refusal[0])
            return
        size = memoryview(received.payload).nbytes
        try:
            tensors = await off_loop(size, self._unpack_local, received.payload)
        except FedhiveError as exc:
            self._ack(
                m.sender,
                m.round,
                AckStatus.REJECTED,
                f"cannot decode the model: {exc}",
                m,
                kind=type(exc).__name__,
            )
            return
        async with self._round_lock:
            # Validation and folding read the whole model: off the loop when it is large, so
            # heartbeats are still taken meanwhile (the round lock keeps rounds apart).
            outcome = await off_loop(
                size,
                self.engine.submit,
                m.sender,
                round=m.round,
                num_samples=m.num_samples,
                tensors=tensors,
                metrics=m.metrics,
            )
            if outcome.status is AckStatus.ACCEPTED and not await self._record_local(received):
                return  # never acknowledged: the store failed and the service stops
        self._ack(m.sender, m.round, outcome.status, outcome.reason, m, kind=outcome.error)
        if outcome.status is AckStatus.ACCEPTED:
            log.info(
                "round %d: model from %s accepted (%d/%d)",
                m.round,
                m.sender,
                self.engine.collected,
                self.engine.needed,
            )
            if await self._maybe_complete(wait=False) is None:
                await self._status_changed()

    def _unpack_local(self, payload: Buffer) -> dict[str, Array]:
        """A local model's tensors: decoded, and unpacked if the agent packed it for the wire
        (decompressed within the spec's size, cast back to the spec's dtypes)."""
        limit = self._local_size_range()
        tensors, _meta = unpack_update(
            payload, max_bytes=self.config.max_model_bytes if limit is None else limit[1]
        )
        return tensors

    async def _announce_local(self, topic: str, message: ModelMessage) -> None:
        """A local model's envelope. Refused at once, with an ack saying why, when its size
        cannot be that of the model (nothing is allocated for it), when it replays a transfer,
        or when too many transfers are open; else received (inline), opened (chunked) or
        queued until the receive budget has room (its chunks are asked for then)."""
        size_range = self._local_size_range()
        if size_range is not None and self.config.compression is not None:
            size_range = (0, size_range[1] + size_range[1] // 512 + 64)  # packed: smaller
        try:
            received = self._receiver.announce(
                topic, message, size_range=size_range, refuse_replay=True, budgeted=True
            )
        except MessageError as exc:
            self.engine.counters.count(AckStatus.REJECTED)
            self._ack(
                message.sender,
                message.round,
                AckStatus.REJECTED,
                str(exc),
                message,
                kind=type(exc).__name__,
            )
            return
        if received is not None:
            await self._on_model(received)
        await self._receiver.admit()

    def _local_size_range(self) -> tuple[int, int] | None:
        """The sizes an encoded local model of the current spec can have (None: no spec)."""
        spec = self.engine.spec
        if spec is None:
            return None
        if self._local_sizes is None or self._local_sizes[0] is not spec:
            self._local_sizes = (spec, spec.encoded_size_range())
        return self._local_sizes[1]

    def _ack(
        self,
        agent: str,
        round: int,
        status: AckStatus,
        reason: str | None,
        m: ModelMessage,
        refusal: Refusal | None = None,
        *,
        kind: str | None = None,
    ) -> None:
        """Answer a submission; anything but an acceptance is counted as a rejection of
        ``kind`` (by default what its status or refusal says) and logged, rate-limited."""
        if status is not AckStatus.ACCEPTED:
            if kind is None:
                kind = "RefusedSubmission" if refusal is not None else _OUTCOME_KINDS[status]
            self._rejects.reject(
                kind, agent, "round %d: model from %s %s: %s", round, agent, status.value, reason
            )
        ack = AckMessage(
            project=self.config.project,
            sender=self.name,
            round=round,
            status=status,
            reason=reason,
            transfer_id=m.transfer.transfer_id if m.transfer else None,
            refusal=refusal,
        )
        # Held until no other message waits (see AckOutbox), never waiting for the broker's
        # PUBACK: the next upload is taken at once.
        self._acks.put(self.topics.agent_inbox(agent), encode_message(ack))

    async def _maybe_complete(
        self, *, force: bool = False, wait: bool = True
    ) -> RoundResult | None:
        """Aggregate the open round if it is ready (or ``force``: with what was collected);
        StrategyError when a forced round cannot be aggregated. A round resumed from the
        store completes on the threshold only once ``resume_grace`` is over.

        ``wait=False`` (the consumer of messages): the new model is published beside it, so
        the next round's uploads are taken while the broker confirms the model."""
        if not force and self._holding():
            return None
        async with self._round_lock:
            completed = await self._aggregate(force=force)
            if completed is None:
                return None
            await self._announce_lock.acquire()
        result, announcing = completed
        if wait:
            await self._announce(announcing)
        else:
            task = asyncio.create_task(
                self._announce_beside(result.round, announcing), name="announce"
            )
            self._model_tasks.add(task)
            task.add_done_callback(self._model_tasks.discard)
        return result

    async def _announce_beside(self, round: int, announcing: Callable[[], Awaitable[None]]) -> None:
        """:meth:`_announce` in a task of its own: what goes wrong is logged."""
        try:
            await self._announce(announcing)
        except FedhiveError as exc:  # e.g. the broker went away: agents ask for the model
            log.warning("round %d: cannot publish its outcome: %s", round, exc)
        except Exception as exc:  # a bug: logged and counted, the aggregator keeps serving
            self._rejects.internal(
                "announce", "round %d: cannot publish its outcome", round, exc=exc
            )

    async def _announce(self, announcing: Callable[[], Awaitable[None]]) -> None:
        """Publish what an engine change announces; the caller took ``_announce_lock`` while it
        held the round lock (see ``__init__``)."""
        try:
            await announcing()
        finally:
            self._announce_lock.release()

    async def _aggregate(
        self, *, force: bool
    ) -> tuple[RoundResult, Callable[[], Awaitable[None]]] | None:
        """Complete the open round: the result, recorded, and what announces it (for the
        caller to run once the round lock is let go)."""
        if self.state is not AggregatorState.ACTIVE:
            return None
        if not force and not self.engine.ready():
            reason = self.engine.blocker()
            if reason:
                log.warning("round %d cannot aggregate yet: %s", self.engine.round, reason)
            return None
        t0 = time.perf_counter()
        if self._link is not None:
            result = self.engine.seal(force=force)
            regional = SgLink.encode_result(result)
            if not await self._record_round(result, regional, ModelKind.REGIONAL):
                return None
            log.info(
                "round %d: regional result with %s from %d models in %.3f s%s; sent to %s",
                result.round,
                result.method,
                len(result.contributors),
                time.perf_counter() - t0,
                " (forced)" if force else "",
                self._sg,
            )
            self.results.append(result)
            return result, functools.partial(self._send_regional, result, regional)
        spec = self.engine.spec
        size = 0 if spec is None else spec.nbytes
        result = await off_loop(size, self.engine.complete, force=force)
        # FedAvg wrote the mean into its frame: nothing is copied here.
        payload = await off_loop(size, encode_frame, result.model)
        if not await self._record_round(result, payload, ModelKind.GLOBAL):
            return None
        log.info(
            "round %d aggregated with %s from %d models in %.3f s%s",
            result.round,
            result.method,
            len(result.contributors),
            time.perf_counter() - t0,
            " (forced)" if force else "",
        )
        if self._finished():
            log.info("training finished: %d rounds aggregated", self.config.max_rounds)
        self.results.append(result)  # recorded before anyone can see the new model
        contributors = [
            Contributor(agent=c.agent, num_samples=c.num_samples) for c in result.contributors
        ]
        return result, functools.partial(
            self._publish_global, payload, contributors=contributors, method=result.method
        )

    async def _send_regional(self, result: RoundResult, payload: bytes) -> None:
        assert self._link is not None
        assert self.engine.spec is not None
        await self._link.send(
            result, framework=self.engine.spec.framework, base_sha=self._base_sha, payload=payload
        )
        await self._publish_status()

    async def _publish_global(
        self,
        payload: Buffer,
        *,
        contributors: list[Contributor],
        method: str | None,
        digest: str | None = None,
    ) -> None:
        """Publish a new model of a round (aggregated here or by the SG layer) and tell those
        who wait for one."""
        await self._publish_model(payload, contributors=contributors, method=method, digest=digest)
        async with self.round_completed:
            self.round_completed.notify_all()

    # ------------------------------------------------------------ store
    async def _open_store(self) -> None:
        """Open the store and take up where it says this aggregator stood."""
        c = self.config
        self._journal = await RoundJournal.open(
            data_dir=c.data_dir,
            url=c.db_url,
            keep_local=c.keep_local,
            best_metric=c.best_metric,
            project=c.project,
            name=self.name,
        )
        state = await self._journal.resume()
        if state is not None:
            self._resume(state)

    def _resume(self, state: RecoveredState) -> None:
        """Install the recovered model and count the open round's recorded models again (the
        engine starts the round's clock now: its original start time is not kept)."""
        e = self.engine
        tensors, _meta = decode(state.model_payload)
        spec = ModelSpec.from_tensors(tensors, state.framework)
        e.set_model(tensors, round=state.model_round, spec=spec)
        self._base_sha = state.base_sha256
        for local in state.locals:
            outcome = e.submit(
                local.agent,
                round=state.open_round,
                num_samples=local.num_samples,
                tensors=decode(local.payload)[0],
                metrics=local.metrics,
            )
            if outcome.status is not AckStatus.ACCEPTED:
                log.warning(
                    "round %d: recorded model from %s not counted again: %s",
                    state.open_round,
                    local.agent,
                    outcome.reason,
                )
        sealed = state.sealed
        if sealed is not None and self._link is not None:
            e.mark_sealed()  # its regional result is sent again if the sg-aggregator lacks it
            self._link.restore(
                round=sealed.round,
                payload=sealed.payload,
                contributors=sealed.contributors,
                method=sealed.method,
                framework=state.framework,
                base_sha=self._base_sha,
            )
        self._resumed = state
        log.info(
            "resumed from the store: model of round %d, round %d %s",
            state.model_round,
            e.round,
            "sealed (regional result sent)"
            if e.sealed
            else f"open with {e.collected} model(s) collected",
        )

    async def _publish_resumed(self) -> None:
        """Serve the resumed model again (retained), so agents that reconnect get it; a round
        resumed with models in it waits for its agents' statuses (retained: they arrive at
        once) for ``resume_grace`` seconds before the threshold may complete it."""
        state, self._resumed = self._resumed, None
        if state is None:
            return
        if self.engine.collected:
            self._hold_until = time.monotonic() + self.config.resume_grace
        contributors = [Contributor(agent=a, num_samples=n) for a, n in state.contributors]
        await self._publish_model(
            state.model_payload, contributors=contributors, method=state.method
        )

    def _holding(self) -> bool:
        return self._hold_until is not None and time.monotonic() < self._hold_until

    def _hold_over(self) -> bool:
        """True once: when the wait of a resumed round has just ended."""
        if self._hold_until is None or self._holding():
            return False
        self._hold_until = None
        return True

    async def _record_model(self, received: ReceivedModel, framework: str) -> bool:
        """Record the base model, or an SG model about to be adopted. False: not recorded (a
        new federation, or the store is down): it is not taken and the current model stays."""
        if self._journal is None:
            return True
        m = received.message
        try:
            if m.kind is ModelKind.BASE or m.round == 0:
                await self._journal.base(received.payload, framework=framework)
            else:
                await self._journal.adopt(
                    round=m.round,
                    payload=received.payload,
                    framework=framework,
                    base_sha256=m.base_sha,
                    num_samples=m.num_samples,
                )
        except StoreError as exc:
            log.error(
                "%s model of round %d from %s not taken: %s",
                m.kind.value,
                m.round,
                m.sender,
                exc,
            )
            return False
        return True

    async def _record_local(self, received: ReceivedModel) -> bool:
        """Record an accepted local model before it is acknowledged; False if the store
        failed (the service then stops)."""
        if self._journal is None:
            return True
        m = received.message
        try:
            await self._journal.local(
                round=m.round,
                agent=m.sender,
                num_samples=m.num_samples,
                metrics=m.metrics,
                payload=received.payload,
            )
        except StoreError as exc:
            self._store_failed(f"cannot record {m.sender}'s model of round {m.round}", exc)
            return False
        return True

    async def _record_round(self, result: RoundResult, payload: Buffer, kind: ModelKind) -> bool:
        """Record a completed round before its model is published; False if the store failed
        (the service then stops)."""
        if self._journal is None:
            return True
        try:
            await self._journal.complete(
                round=result.round,
                payload=payload,
                contributors=result.contributors,
                method=result.method,
                threshold=self.engine.threshold,
                started=result.started,
                completed=result.completed,
                kind=kind,
            )
        except StoreError as exc:
            self._store_failed(f"cannot record round {result.round}", exc)
            return False
        return True

    def _store_failed(self, what: str, exc: StoreError) -> None:
        """Stop rather than acknowledge or publish what the store does not hold; a restart
        resumes from what it does."""
        log.error("%s: %s; the aggregator stops", what, exc)
        if self._failure is None:
            self._failure = StoreError(f"{what}: {exc}")
        self._closing = True  # INACTIVE at once: no round completes from here on
        self._stopping.set()

    async def _publish_model(
        self,
        payload: Buffer,
        *,
        contributors: list[Contributor] | None = None,
        method: str | None = None,
        digest: str | None = None,
    ) -> None:
        """Publish the current model for this aggregator's agents (retained manifest), once:
        the broker fans it out. ``digest``: its BLAKE3 digest, if known already."""
        assert self._transport is not None
        assert self.engine.spec is not None
        contributors = contributors or []
        listed = contributors[:MAX_LISTED_CONTRIBUTORS]
        message, manifest = await off_loop(
            memoryview(payload).nbytes,
            prepare_model_message,
            payload,
            digest=digest,
            chunk_size=self.config.broker.chunk_size,
            project=self.config.project,
            sender=self.name,
            kind=ModelKind.GLOBAL,
            round=self.engine.model_round,
            num_samples=sum(c.num_samples for c in contributors),
            framework=self.engine.spec.framework,
            contributors=listed,
            contributors_omitted=len(contributors) - len(listed),
            method=method,
        )
        self._payload, self._message = payload, message
        await publish_model(
            self._transport,
            self.topics.agg_model(self.name),
            message,
            payload,
            manifest,
            retain=True,
            max_inflight=self.config.broker.max_inflight,
        )
        # A new round alone waits for the status tick when the last status is younger: every
        # agent receives every status, and one per round cost 50 agents ~12% of their CPU
        # with rounds of 0.1 s. A new state (FINISHED) goes out at once.
        await self._status_changed()

    async def _on_model_request(self, request: ModelRequest) -> None:
        """A late joiner (or a receiver with holes) asks for the current model's chunks."""
        if self._message is None or self._payload is None:
            return
        if self.engine.presence(request.sender) in (None, PresenceState.OFFLINE):
            # Not one of ours (it announces itself before asking): with several aggregators
            # only its own answers, so it never gets two different transfers.
            return
        assert self._transport is not None
        inbox = self.topics.agent_inbox(request.sender)
        transfer = self._message.transfer
        if transfer is None or request.transfer_id != transfer.transfer_id:
            # Not the current transfer (or inline): send the whole current model to the agent.
            await publish_model(
                self._transport,
                inbox,
                self._message,
                self._payload,
                self._message.transfer.manifest(max_bytes=self.config.max_model_bytes)
                if self._message.transfer
                else None,
                max_inflight=self.config.broker.max_inflight,
            )
            return
        manifest = transfer.manifest(max_bytes=self.config.max_model_bytes)
        wanted = request.chunks if request.chunks is not None else range(manifest.count)
        indices = [i for i in wanted if 0 <= i < manifest.count]
        await publish_chunks(
            self._transport,
            Topics.chunks(inbox),
            self._payload,
            manifest,
            indices=indices,
            max_inflight=self.config.broker.max_inflight,
        )

    async def _request_missing(self, topic: str, message: ModelMessage, missing: list[int]) -> None:
        """Ask an agent (or the admin, for the base model) to re-send the chunks of its upload
        that never arrived (or the sg-aggregator to send the missing chunks of its model)."""
        assert self._transport is not None
        if message.kind is ModelKind.SG:
            if self._link is not None:
                await self._link.request_chunks(message, missing)
            return
        if message.kind not in (ModelKind.LOCAL, ModelKind.BASE) or message.transfer is None:
            return  # (an admin serves its base upload's chunks while it waits: agent/admin.py)
        request = ResendRequest(
            project=self.config.project,
            sender=self.name,
            transfer_id=message.transfer.transfer_id,
            chunks=missing,
        )
        if len(missing) == message.transfer.count:  # its turn: the agent sends when asked
            log.debug("asking %s for its upload (%d chunks)", message.sender, len(missing))
        else:
            log.info("asking %s for %d missing chunks", message.sender, len(missing))
        # Not waiting for the PUBACK: the next announcement is taken at once (a lost request
        # is asked again when the transfer stalls).
        await self._transport.publish(
            self.topics.agent_inbox(message.sender), encode_message(request), confirm=False
        )

    # ------------------------------------------------------------ control
    async def _on_control(self, incoming: Incoming) -> None:
        """An admin's request: carry it out (or say why not) and reply with the status."""
        reply_to = self._reply_topic(incoming.response_topic)
        command: ControlCommand | None = None
        try:
            request = decode_message(incoming.payload)
            if not isinstance(request, ControlRequest):
                raise MessageError(f"unexpected {request.type!r} message on the control topic")
            if request.project != self.config.project:
                raise MessageError(f"request for project {request.project!r}")
            command = request.command
            if request.sender not in self.config.admins:
                raise _RefusedError(
                    f"{request.sender!r} is not an admin of aggregator {self.name!r}: "
                    "only admins may control it"
                )
            detail = await self._apply(request)
        except (MessageError, _RefusedError) as exc:
            what = command.value if command is not None else "control request"
            kind = "RefusedCommand" if isinstance(exc, _RefusedError) else type(exc).__name__
            self._rejects.reject(kind, "control", "%s refused: %s", what, exc)
            await self._reply(reply_to, incoming.correlation, command, ok=False, reason=str(exc))
            return
        except FedhiveError:
            raise  # e.g. the transport: logged by the consumer
        except Exception as exc:  # an admin's request must never end the aggregator
            self._rejects.internal("control", "control %s failed", command, exc=exc)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            await self._reply(reply_to, incoming.correlation, command, ok=False, reason=reason)
            return
        log.info("%s by %s: %s", request.command.value, request.sender, detail)
        # New counts take effect at once: a lower threshold may make the round ready.
        self._review_presence()
        result = await self._maybe_complete()
        if result is not None:
            detail += f"; round {result.round} aggregated"
        await self._publish_status()
        await self._reply(reply_to, incoming.correlation, command, ok=True, detail=detail)

    def _reply_topic(self, requested: str | None) -> str:
        # Replies go to the admin's reply topic only: the response topic is the requester's
        # word, and the aggregator must not be made to publish on, say, a model topic.
        default = self.topics.agg_reply(self.name)
        if requested is None or requested == default:
            return default
        if requested.startswith(default + "/") and not ({"+", "#"} & set(requested)):
            return requested
        log.warning("control response topic %r is not under %s: replying there", requested, default)
        return default

    async def _reply(
        self,
        topic: str,
        correlation: bytes | None,
        command: ControlCommand | None,
        *,
        ok: bool,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        reply = ControlReply(
            project=self.config.project,
            sender=self.name,
            command=command,
            ok=ok,
            reason=reason[:4096] if reason else None,
            detail=detail[:4096] if detail else None,
            status=self.status(),
        )
        assert self._transport is not None
        await self._transport.publish(topic, encode_message(reply), correlation=correlation)

    async def _apply(self, request: ControlRequest) -> str:
        """Carry out one command; the returned text says what was done. _RefusedError if not."""
        e = self.engine
        value = request.value
        match request.command:
            case ControlCommand.COMPLETE_ROUND:
                return await self._complete_round()
            case ControlCommand.SET_THRESHOLD:
                assert isinstance(value, int | float)
                old = e.threshold
                with _refuse_on(ConfigError):
                    e.threshold = value
                return f"threshold {old:g} -> {e.threshold:g}: {e.active} active, {e.needed} needed"
            case ControlCommand.SET_TIMEOUT:
                assert isinstance(value, int | float)
                old = e.agent_timeout
                with _refuse_on(ConfigError):
                    e.agent_timeout = value
                return (
                    f"agent timeout {old:g} s -> {e.agent_timeout:g} s"
                    f"{' (disabled)' if e.agent_timeout == 0 else ''}: {e.active} active"
                )
            case ControlCommand.SET_METHOD:
                assert isinstance(value, str)
                with _refuse_on(ConfigError):
                    strategy = create_strategy(value, request.params)
                e.set_strategy(strategy)
                if not e.has_model:
                    return f"method {strategy.name} from round 1"
                return (
                    f"method {strategy.name} from round {e.round + 1} "
                    f"(round {e.round} keeps {e.strategy.name})"
                )
            case ControlCommand.SET_MAX_AGENTS:
                assert isinstance(value, int)
                old_max = e.max_agents
                with _refuse_on(ConfigError):
                    e.max_agents = value
                for name in e.admit_waiting():
                    await self._notify_admission(name, rejected=False)
                return f"max agents {old_max or 'no limit'} -> {e.max_agents or 'no limit'}"
            case ControlCommand.STOP:
                if self._stopped_by is not None:
                    return f"already stopped (by {self._stopped_by!r})"
                self._stopped_by = request.sender
                return (
                    f"stopped (INACTIVE) in round {e.round} with {e.collected} model(s) "
                    "collected; uploads are refused until restart"
                )
            case ControlCommand.RESTART:
                if self._stopped_by is None:
                    return f"already running ({self.state.value})"
                self._stopped_by = None
                round = e.round
                result = await self._maybe_complete()
                done = "" if result is None else f"; round {result.round} aggregated"
                return f"restarted ({self.state.value}) in round {round}{done}"
        raise _RefusedError(f"unknown command {request.command!r}")  # pragma: no cover

    async def _complete_round(self) -> str:
        e = self.engine
        if self.state is not AggregatorState.ACTIVE:
            raise _RefusedError(
                f"aggregator {self.name!r} is {self.state.value}: no round to complete"
            )
        if e.collected == 0:
            raise _RefusedError(f"round {e.round} has no model yet: nothing to aggregate")
        with _refuse_on(StrategyError):
            result = await self._maybe_complete(force=True)
        if result is None:  # the store failed to record it
            raise _RefusedError(f"round {e.round} could not be recorded: the aggregator stops")
        if self._sg is not None:
            return (
                f"round {result.round}: regional result with {result.method} from "
                f"{len(result.contributors)} model(s) sent to sg-aggregator {self._sg}"
            )
        return (
            f"round {result.round} aggregated with {result.method} from "
            f"{len(result.contributors)} model(s); round {e.round} open"
        )

    # ------------------------------------------------------------ status
    def status(self) -> AggStatusMessage:
        e = self.engine
        state = self.state
        if self._closing:
            blocker: str | None = "aggregator process stopped"
        elif self._stopped_by is not None:
            blocker = f"stopped by admin {self._stopped_by!r}"
        elif state is AggregatorState.FINISHED:
            blocker = f"finished: {self.config.max_rounds} rounds aggregated"
        elif e.sealed:
            blocker = (
                f"regional result of round {e.round} sent to sg-aggregator {self._sg}: "
                "waiting for the SG model"
            )
        elif self._sg is not None and not e.has_model:
            blocker = f"waiting for SG model 0 (the base model) from {self._sg}"
        elif self._holding():
            blocker = (
                f"round {e.round} resumed from the store with {e.collected} model(s): its "
                f"agents have up to {self.config.resume_grace:g} s to report"
            )
        else:
            blocker = e.blocker()
        agents, omitted = self._agent_table()
        return AggStatusMessage(
            project=self.config.project,
            sender=self.name,
            state=state,
            round=e.round,
            model_round=e.model_round if e.has_model else None,
            method=e.strategy.name,
            next_method=e.next_strategy.name if e.next_strategy is not None else None,
            threshold=e.threshold,
            agent_timeout=e.agent_timeout,
            max_agents=e.max_agents,
            max_rounds=self.config.max_rounds,
            active=e.active,
            needed=e.needed,
            collected=e.collected,
            blocker=blocker,
            base_sha=self._base_sha,
            agents=agents,
            agents_omitted=omitted,
            paused=self._stopped_by is not None and not self._closing,
            sg_aggregator=self._sg,
            regional_round=e.round if e.sealed else None,
            pull_uploads=True,
            push_limit=self.config.receive_budget // max(1, e.active),
            compression=self.config.compression,
        )

    def _agent_table(self) -> tuple[list[AgentInfo], int]:
        """The agents for the status, at most MAX_STATUS_AGENTS: connected ones first, then
        the most recently seen; listed by name."""
        now = self.engine.now()
        presences = self.engine.presences()
        records = sorted(
            self.engine.agents.values(),
            key=lambda a: (presences[a.name] is PresenceState.OFFLINE, -(a.last_seen or 0.0)),
        )
        shown = records[:MAX_STATUS_AGENTS]
        rows = [
            AgentInfo(
                name=a.name,
                state=presences[a.name],
                last_heartbeat=_age(now, a.last_seen),
                last_round=a.last_round,
            )
            for a in sorted(shown, key=lambda a: a.name)
        ]
        return rows, len(records) - len(shown)

    async def _status_changed(self) -> None:
        """Publish the status now, or at the monitor's next tick if it went out less than a
        tick ago with the same state: with many agents or fast rounds, status updates stay a
        few per second, not one per event."""
        if (
            self.state is not self._status_state
            or time.monotonic() - self._status_sent >= self.config.monitor_interval
        ):
            await self._publish_status()
        else:
            self._status_dirty = True

    async def _publish_status(self) -> None:
        if self._transport is None or not self._transport.connected:
            return
        self._status_dirty = False
        self._status_sent = time.monotonic()
        # The table first: a reader that subscribes to both gets it before the status.
        status, table = self.status().split()
        self._status_state = status.state
        await self._transport.publish(
            self.topics.agg_agents(self.name), encode_message(table), retain=True, confirm=False
        )
        await self._transport.publish(
            self.topics.agg_status(self.name), encode_message(status), retain=True, confirm=False
        )


#: Seconds an agent's will waits before it takes effect (its return cancels it).
WILL_GRACE = 1.0
#: ... and when this aggregator lost the broker around it (the broker restarted, sending every
#: client's will), seconds after the reconnect: the agents reconnect too, with backoff.
RECONNECT_GRACE = 15.0

#: Topics only the sg-aggregator publishes on (for an aggregator under one).
_SG_KINDS = frozenset({TopicKind.SG_MODEL, TopicKind.SG_STATUS, TopicKind.AGG_INBOX})
#: Retained topics, where an empty payload clears the retained message (not a bad message).
_CLEARABLE_KINDS = frozenset(
    {TopicKind.BASE, TopicKind.AGENT_STATUS, TopicKind.SG_MODEL, TopicKind.SG_STATUS}
)
#: What a submission acknowledged as other than accepted is counted as.
_OUTCOME_KINDS = {
    AckStatus.STALE: "StaleSubmission",
    AckStatus.DUPLICATE: "DuplicateSubmission",
    AckStatus.REJECTED: "RejectedSubmission",
}


@contextlib.contextmanager
def _refuse_on(*errors: type[Exception]) -> Iterator[None]:
    """Turn the given errors into a refusal with their message."""
    try:
        yield
    except errors as exc:
        raise _RefusedError(str(exc)) from exc


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 2)


def _sha256_of(received: ReceivedModel) -> str:
    """The payload's sha256: the base model's identity (AdminAgent and the SG layer name the
    federation by it)."""
    return hashlib.sha256(received.payload).hexdigest()


def _transfer_digest(received: ReceivedModel) -> str | None:
    """The verified manifest's BLAKE3 digest of a chunked payload (publishing it again needs
    no second pass); None for an inline one."""
    transfer = received.message.transfer
    return None if transfer is None else transfer.blake3
