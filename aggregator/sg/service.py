"""The sg-aggregator: combines the aggregators' regional results into the semi-global model.

It listens to ``base``, every aggregator's retained ``status`` and ``regional`` results, and
``sg/request``. SG model 0 is the base model: the sg-aggregator publishes it on ``sg/model``
(retained manifest, chunks not retained) and every aggregator under it takes it from there, so
all of them start from the same round. For round r it collects regional results of round r
(trained from SG model r-1); results for an older round are stale, for a newer one rejected.

A regional result carries the region's unrounded float64 aggregate, its total sample count and
its contributors. FedAvg weights each region by its total: Σ total_i × mean_i / Σ total_i is the
weighted mean over every agent's model, exactly (an equal-weight average of aggregators is
not). Robust methods (``coordinate_median``, ``geometric_median``, ``krum``...) run over the
regional models with the totals as weights. The SG model is cast back to the base model's
dtypes (integer tensors: :data:`~aggregator.strategies.INTEGER_RULE`).

A round completes when ``needed = max(1, ceil(threshold × counted))`` regional results are in,
where *counted* are the aggregators that serve agents and are alive, or lost for less than
``aggregator_timeout`` seconds (:mod:`aggregator.sg.liveness`). A killed aggregator's last will
makes it LOST; once the timeout runs out the round completes with the others.

With a store (the default when it connects to the broker itself), every accepted regional
result is recorded before it is acknowledged and every SG round before its model is published;
a restarted sg-aggregator (even after kill -9) resumes from the store: the same SG model and
round, the regional results it had accepted counted again (with the agents they stand for, kept
in their frames' meta), and a resumed round waits ``resume_grace`` seconds for the aggregators'
statuses before it may complete. Without one it resumes at the round of its own retained SG
model (with its tensors when the model travelled inline; a chunked one is not retained, so the
next round's reference is the base model: only server-optimizer methods look at it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

from aggregator.engine import RoundEngine, RoundResult, RoundResults, wide_spec, widen
from aggregator.sg.liveness import AggregatorTracker
from aggregator.store import RecoveredLocal, RecoveredState, RoundJournal, StoreError
from aggregator.strategies import create_strategy
from aggregator.strategies.base import round_back
from common.codec import Array, Buffer, ModelSpec, decode, dtype_from_name, encode
from common.config import SgAggregatorConfig
from common.errors import FedhiveError, MessageError
from common.exchange import (
    ModelReceiver,
    ReceivedModel,
    prepare_model_message,
    publish_chunks,
    publish_model,
)
from common.messages import (
    MAX_STATUS_AGENTS,
    AckMessage,
    AckStatus,
    AgentState,
    AggregatorLiveness,
    AggregatorState,
    AggStatusMessage,
    Contributor,
    ModelKind,
    ModelMessage,
    ModelRequest,
    PresenceState,
    ResendRequest,
    SgStatusMessage,
    decode_message,
    encode_message,
)
from common.tasks import finish
from common.topics import TopicKind, Topics
from common.transport import Incoming, LastWill, MqttTransport, Transport

log = logging.getLogger("fedhive.sg")


class SgAggregatorService:
    """The sg-aggregator of one project. Call :meth:`run` until :meth:`stop`.

    Args:
        config: its settings (the store: ``data_dir``, ``db_url``, ``keep_local``).
        transport: the connection to use (default: its own MQTT connection to the broker).
        persist: record rounds in the store and resume from it; by default when it connects
            to the broker itself, not over a transport it is handed (a test's in-memory bus).
    """

    def __init__(
        self,
        *,
        config: SgAggregatorConfig,
        transport: Transport | None = None,
        persist: bool | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.project)
        # The round engine's "agents" are the aggregators; the tracker decides which count.
        self.engine = RoundEngine(
            strategy=create_strategy(config.method, config.method_params),
            threshold=config.threshold,
        )
        self.tracker = AggregatorTracker(timeout=config.aggregator_timeout)
        self._transport = transport
        self._receiver = ModelReceiver(
            max_bytes=config.max_model_bytes,
            chunk_timeout=config.chunk_timeout,
            on_missing=self._request_missing,
        )
        self._base_spec: ModelSpec | None = None
        self._base_sha: str | None = None
        self._resume: ModelMessage | None = None  # our own retained SG model, seen at start
        self._payload: Buffer | None = None  # the current SG model, encoded
        self._message: ModelMessage | None = None
        self._contributors: dict[str, list[Contributor]] = {}  # of the open round, by region
        self._liveness: dict[str, AggregatorLiveness] = {}  # as last logged
        self._closing = False
        self._status_dirty = False
        self._status_sent = 0.0
        self._stopping = asyncio.Event()
        self._persist = transport is None if persist is None else persist
        self._journal: RoundJournal | None = None
        self._failure: StoreError | None = None  # the store failed: the service stops
        self._resumed: RecoveredState | None = None  # to publish once connected
        self._hold_until: float | None = None  # a resumed round may not complete before
        self._round_lock = asyncio.Lock()  # an engine change and its store write, in one piece
        #: Completed SG rounds, the last RESULTS_KEPT (models in float64, before the cast to the
        #: base dtypes); only the newest keeps its model.
        self.results = RoundResults()
        self.round_completed = asyncio.Condition()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> AggregatorState:
        if self._closing:
            return AggregatorState.INACTIVE
        if not self.engine.has_model:
            return AggregatorState.WAITING_BASE
        return AggregatorState.ACTIVE

    def stop(self) -> None:
        """End :meth:`run`."""
        self._stopping.set()

    def _make_transport(self) -> Transport:
        will = SgStatusMessage(
            project=self.config.project,
            sender=self.name,
            state=AggregatorState.INACTIVE,
            round=self.engine.round,
            method=self.engine.strategy.name,
            threshold=self.config.threshold,
            aggregator_timeout=self.config.aggregator_timeout,
            alive=0,
            counted=0,
            needed=0,
            collected=0,
            blocker="sg-aggregator process is gone",
        )
        return MqttTransport(
            settings=self.config.broker,
            client_id=f"{self.config.project}.sg.{self.name}",
            will=LastWill(self.topics.sg_status(), encode_message(will)),
            on_connect=self._publish_status,
        )

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
                f"sg-aggregator {self.name!r} stopped: {self._failure}; restart it to resume "
                "from the store"
            ) from self._failure

    async def _serve(self, *, ready: asyncio.Event | None) -> None:
        transport = self._transport or self._make_transport()
        self._transport = transport
        t = self.topics
        async with transport:
            # Our own retained SG model first (to resume from), then the base model.
            await transport.subscribe(
                t.sg_model(),
                t.base(),
                Topics.chunks(t.base()),
                t.all_agg_status(),
                t.all_regional(),
                Topics.chunks(t.all_regional()),
                t.sg_request(),
            )
            await self._publish_status()
            await self._publish_resumed()
            log.info(
                "sg-aggregator %s serving project %s on %s:%d (method %s, threshold %.2f, "
                "aggregator timeout %g s)",
                self.name,
                self.config.project,
                self.config.broker.host,
                self.config.broker.port,
                self.engine.strategy.name,
                self.engine.threshold,
                self.config.aggregator_timeout,
            )
            if ready is not None:
                ready.set()
            tasks = [
                asyncio.create_task(self._consume(transport), name="sg-consume"),
                asyncio.create_task(self._receiver.watch(), name="sg-chunk-watch"),
                asyncio.create_task(self._monitor(), name="sg-monitor"),
            ]
            stopping = asyncio.create_task(self._stopping.wait(), name="sg-stopping")
            try:
                await asyncio.wait([stopping, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
                self._closing = True
                with contextlib.suppress(FedhiveError):
                    await self._publish_status()
            finally:
                stopping.cancel()
                for task in tasks:
                    task.cancel()
        await finish([*tasks, stopping])

    async def _consume(self, transport: Transport) -> None:
        async for incoming in transport.messages():
            try:
                await self._handle(incoming)
            except FedhiveError as exc:
                log.warning("rejected message on %s: %s", incoming.topic, exc)

    async def _monitor(self) -> None:
        """Aggregators fall LOST → GONE by the clock, not by a message."""
        while True:
            await asyncio.sleep(self.config.monitor_interval)  # a polling period
            try:
                if self._review() or self._hold_over():
                    await self._maybe_complete()
                due = time.monotonic() - self._status_sent >= self.config.status_interval
                if self._status_dirty or due:
                    await self._publish_status()
            except FedhiveError as exc:  # the next period tries again
                log.warning("sg monitor: %s", exc)

    # ------------------------------------------------------------ dispatch
    async def _handle(self, incoming: Incoming) -> None:
        parsed = self.topics.parse(incoming.topic)
        if parsed.chunk:
            received = self._receiver.chunk(incoming.payload)
            if received is not None:
                await self._on_model(received)
            return
        if not incoming.payload:
            if parsed.kind is TopicKind.AGG_STATUS and parsed.aggregator is not None:
                self.tracker.forget(parsed.aggregator)  # its retained status was cleared
                self._review()
            return
        message = decode_message(incoming.payload)
        if message.project != self.config.project:
            raise MessageError(f"message for project {message.project!r}")
        if parsed.aggregator is not None and message.sender != parsed.aggregator:
            raise MessageError(
                f"sender {message.sender!r} does not match the topic's aggregator "
                f"{parsed.aggregator!r}"
            )
        match parsed.kind, message:
            case TopicKind.BASE, ModelMessage(kind=ModelKind.BASE):
                received = self._receiver.announce(incoming.topic, message)
                if received is not None:
                    await self._on_model(received)
            case TopicKind.AGG_STATUS, AggStatusMessage():
                self.tracker.update(message)
                if self._review(message.sender) and await self._maybe_complete() is None:
                    await self._status_changed()
            case TopicKind.AGG_REGIONAL, ModelMessage(kind=ModelKind.REGIONAL):
                received = self._receiver.announce(incoming.topic, message)
                if received is not None:
                    await self._on_model(received)
            case TopicKind.SG_REQUEST, ModelRequest():
                await self._on_request(message)
            case TopicKind.SG_MODEL, ModelMessage(kind=ModelKind.SG):
                if message.sender == self.name:
                    await self._on_own_model(message)
                else:
                    log.warning("another sg-aggregator %r publishes SG models", message.sender)
            case _:
                raise MessageError(f"unexpected {message.type!r} message")

    async def _on_model(self, received: ReceivedModel) -> None:
        if received.message.kind is ModelKind.BASE:
            await self._on_base(received)
        else:
            await self._on_regional(received)

    # ------------------------------------------------------------ liveness
    def _review(self, *names: str) -> bool:
        """Bring the engine's view of which aggregators count up to date with the tracker and
        log every change; True if any (the round may be ready, the status is due)."""
        states = self.tracker.states()
        changed = False
        for name in names or tuple(states):
            state = states.get(name)
            if state is None:
                continue
            counted = self.tracker.counted(name)
            if counted != (self.engine.presence(name) is PresenceState.ACTIVE):
                self.engine.agent_status(name, AgentState.ONLINE if counted else AgentState.OFFLINE)
                changed = True
            was = self._liveness.get(name)
            if state is not was:
                changed = True
                self._liveness[name] = state
                log.info(
                    "aggregator %s: %s -> %s; %d counted, %d needed",
                    name,
                    was.value if was is not None else "new",
                    state.value,
                    self.engine.active,
                    self.engine.needed,
                )
        for name in set(self._liveness) - set(states):  # forgotten
            del self._liveness[name]
            self.engine.agent_status(name, AgentState.OFFLINE)
            changed = True
        if changed:
            self._status_dirty = True
        return changed

    # ------------------------------------------------------------ models
    async def _on_base(self, received: ReceivedModel) -> None:
        sha = hashlib.sha256(received.payload).hexdigest()
        if sha == self._base_sha:
            return
        tensors, _meta = decode(received.payload)
        framework = received.message.framework or "numpy"
        spec = ModelSpec.from_tensors(tensors, framework)
        async with self._round_lock:
            if self._journal is not None:
                try:
                    await self._journal.base(received.payload, framework=framework)
                except StoreError as exc:  # a new federation (or the store is down)
                    log.error("base model from %s not taken: %s", received.message.sender, exc)
                    return
            self._base_spec, self._base_sha = spec, sha
            self._contributors = {}
            self.engine.set_model(widen(tensors), round=0, spec=wide_spec(spec))
        resume, self._resume = self._resume, None
        if resume is not None and resume.base_sha == sha and resume.round > 0:
            await self._resume_from(resume)
            await self._publish_status()
            return
        log.info(
            "base model from %s: %d tensors, %d bytes; SG model 0 published, round 1 open",
            received.message.sender,
            len(spec.tensors),
            spec.nbytes,
        )
        await self._publish_sg(bytes(received.payload), round=0, contributors=[], method=None)

    async def _on_own_model(self, message: ModelMessage) -> None:
        """Our own retained SG model (from before a restart): resume at its round, unless the
        store already did (it is then an echo, or no newer)."""
        if self._message is not None and message.round <= self.engine.model_round:
            return  # an echo of what we published
        if self._base_sha is None:
            self._resume = message  # taken up when the base model arrives
        elif message.base_sha == self._base_sha and message.round > self.engine.model_round:
            await self._resume_from(message)

    async def _resume_from(self, message: ModelMessage) -> None:
        """Resume at our own retained SG model: the store (if any) is behind it."""
        assert self._base_spec is not None
        assert self.engine.model is not None
        if self._journal is not None:
            if message.data is None:
                log.error(
                    "SG model %d on the broker is ahead of the store (round %d) and was chunked "
                    "(its bytes are gone): staying at round %d; aggregators past it must start "
                    "over",
                    message.round,
                    self.engine.model_round,
                    self.engine.round,
                )
                return
            try:
                await self._journal.adopt(
                    round=message.round,
                    payload=message.data,
                    framework=self._base_spec.framework,
                    base_sha256=self._base_sha,
                    num_samples=message.num_samples,
                )
            except StoreError as exc:
                log.error("SG model %d on the broker not taken: %s", message.round, exc)
                return
        tensors: dict[str, Array] = self.engine.model
        if message.data is not None:
            tensors = widen(decode(message.data)[0])
            self._payload, self._message = message.data, message
        else:
            log.warning(
                "SG model %d was chunked (chunks are not retained): round %d starts from the "
                "base model as its reference",
                message.round,
                message.round + 1,
            )
        self.engine.set_model(tensors, round=message.round, spec=wide_spec(self._base_spec))
        self._contributors = {}
        log.info("resumed at SG model %d: round %d open", message.round, self.engine.round)

    async def _on_regional(self, received: ReceivedModel) -> None:
        m = received.message
        if self._failure is not None:
            return  # the store failed and the service is stopping: nothing more is taken
        async with self._round_lock:
            status, reason = self._take_regional(m, received.payload)
            if status is AckStatus.ACCEPTED and not await self._record_regional(received):
                return  # never acknowledged: the store failed and the service stops
        await self._ack(m, status, reason)
        if status is not AckStatus.ACCEPTED:
            return
        self._contributors[m.sender] = list(m.contributors)
        record = self.tracker.get(m.sender)
        if record is not None:
            record.last_round = m.round
        log.info(
            "round %d: regional result from %s accepted (%d agents, %g samples; %d/%d)",
            m.round,
            m.sender,
            len(m.contributors),
            m.num_samples,
            self.engine.collected,
            self.engine.needed,
        )
        if await self._maybe_complete() is None:
            await self._status_changed()

    def _take_regional(
        self, m: ModelMessage, payload: bytes | bytearray | memoryview
    ) -> tuple[AckStatus, str | None]:
        """Validate and fold in one regional result: (outcome, reason)."""
        if m.base_sha is not None and self._base_sha is not None and m.base_sha != self._base_sha:
            self.engine.counters.count(AckStatus.REJECTED)
            return AckStatus.REJECTED, "trained from another base model"
        try:
            tensors, _meta = decode(payload)
        except FedhiveError as exc:
            self.engine.counters.count(AckStatus.REJECTED)
            return AckStatus.REJECTED, f"cannot decode the regional result: {exc}"
        outcome = self.engine.submit(
            m.sender, round=m.round, num_samples=m.num_samples, tensors=tensors, metrics=m.metrics
        )
        return outcome.status, outcome.reason

    async def _ack(self, m: ModelMessage, status: AckStatus, reason: str | None) -> None:
        if status is not AckStatus.ACCEPTED:
            log.warning(
                "round %d: regional result from %s %s: %s", m.round, m.sender, status.value, reason
            )
        ack = AckMessage(
            project=self.config.project,
            sender=self.name,
            round=m.round,
            status=status,
            reason=reason,
            transfer_id=m.transfer.transfer_id if m.transfer else None,
        )
        assert self._transport is not None
        await self._transport.publish(self.topics.agg_inbox(m.sender), encode_message(ack))

    async def _maybe_complete(self) -> RoundResult | None:
        """Complete the open SG round if it is ready (a resumed round only once
        ``resume_grace`` is over)."""
        if self._holding():
            return None
        async with self._round_lock:
            return await self._aggregate()

    async def _aggregate(self) -> RoundResult | None:
        if self._closing or not self.engine.has_model or not self.engine.ready():
            reason = self.engine.blocker()
            if reason:
                log.warning("SG round %d cannot aggregate yet: %s", self.engine.round, reason)
            return None
        t0 = time.perf_counter()
        result = self.engine.complete()
        model = self._cast_back(result.model)
        payload = encode(model)
        if not await self._record_round(result, payload):
            return None
        contributors = [
            c for region in sorted(self._contributors) for c in self._contributors[region]
        ]
        self._contributors = {}
        log.info(
            "SG round %d aggregated with %s from %d regional results (%d agents) in %.3f s",
            result.round,
            result.method,
            len(result.contributors),
            len(contributors),
            time.perf_counter() - t0,
        )
        self.results.append(result)
        await self._publish_sg(
            payload, round=result.round, contributors=contributors, method=result.method
        )
        async with self.round_completed:
            self.round_completed.notify_all()
        return result

    # ------------------------------------------------------------ store
    async def _open_store(self) -> None:
        """Open the store and take up where it says this sg-aggregator stood."""
        c = self.config
        self._journal = await RoundJournal.open(
            data_dir=c.data_dir,
            url=c.db_url,
            keep_local=c.keep_local,
            best_metric="accuracy",
            project=c.project,
            name=self.name,
            role="sg",
        )
        state = await self._journal.resume()
        if state is not None:
            self._resume_stored(state)

    def _resume_stored(self, state: RecoveredState) -> None:
        """Install the recovered SG model and count the open round's recorded regional
        results again (the round's clock starts now: its original start time is not kept)."""
        tensors, _meta = decode(state.model_payload)  # SG models are in the base dtypes
        spec = ModelSpec.from_tensors(tensors, state.framework)
        self._base_spec, self._base_sha = spec, state.base_sha256
        self.engine.set_model(widen(tensors), round=state.model_round, spec=wide_spec(spec))
        for regional in state.locals:
            tensors, meta = decode(regional.payload)
            outcome = self.engine.submit(
                regional.agent,
                round=state.open_round,
                num_samples=regional.num_samples,
                tensors=tensors,
                metrics=regional.metrics,
            )
            if outcome.status is not AckStatus.ACCEPTED:
                log.warning(
                    "round %d: recorded regional result from %s not counted again: %s",
                    state.open_round,
                    regional.agent,
                    outcome.reason,
                )
                continue
            self._contributors[regional.agent] = _contributors_of(regional, meta)
        self._resumed = state
        log.info(
            "resumed from the store: SG model %d, round %d open with %d regional result(s)",
            state.model_round,
            self.engine.round,
            self.engine.collected,
        )

    async def _publish_resumed(self) -> None:
        """Serve the resumed SG model again (retained); a round resumed with regional results
        in it waits ``resume_grace`` seconds for the aggregators' statuses (retained: they
        arrive at once) before it may complete."""
        state, self._resumed = self._resumed, None
        if state is None:
            return
        if self.engine.collected:
            self._hold_until = time.monotonic() + self.config.resume_grace
        await self._publish_sg(
            state.model_payload,
            round=state.model_round,
            contributors=[Contributor(agent=a, num_samples=n) for a, n in state.contributors],
            method=state.method,
        )

    def _holding(self) -> bool:
        return self._hold_until is not None and time.monotonic() < self._hold_until

    def _hold_over(self) -> bool:
        """True once: when the wait of a resumed round has just ended."""
        if self._hold_until is None or self._holding():
            return False
        self._hold_until = None
        return True

    async def _record_regional(self, received: ReceivedModel) -> bool:
        """Record an accepted regional result before it is acknowledged; False if the store
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
                kind=ModelKind.REGIONAL,
            )
        except StoreError as exc:
            self._store_failed(f"cannot record {m.sender}'s regional result of {m.round}", exc)
            return False
        return True

    async def _record_round(self, result: RoundResult, payload: bytes) -> bool:
        """Record a completed SG round before its model is published; False if the store
        failed (the service then stops)."""
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
                kind=ModelKind.SG,
            )
        except StoreError as exc:
            self._store_failed(f"cannot record SG round {result.round}", exc)
            return False
        return True

    def _store_failed(self, what: str, exc: StoreError) -> None:
        """Stop rather than acknowledge or publish what the store does not hold."""
        log.error("%s: %s; the sg-aggregator stops", what, exc)
        if self._failure is None:
            self._failure = StoreError(f"{what}: {exc}")
        self._closing = True  # no round completes from here on
        self._stopping.set()

    def _cast_back(self, model: dict[str, Array]) -> dict[str, Array]:
        """The float64 SG aggregate in the base model's dtypes (the integer rule included)."""
        assert self._base_spec is not None
        return {
            t.name: round_back(model[t.name], dtype_from_name(t.dtype))
            for t in self._base_spec.tensors
        }

    async def _publish_sg(
        self,
        payload: bytes,
        *,
        round: int,
        contributors: list[Contributor],
        method: str | None,
    ) -> None:
        assert self._transport is not None
        assert self._base_spec is not None
        message, manifest = prepare_model_message(
            payload,
            chunk_size=self.config.broker.chunk_size,
            project=self.config.project,
            sender=self.name,
            kind=ModelKind.SG,
            round=round,
            num_samples=sum(c.num_samples for c in contributors),
            framework=self._base_spec.framework,
            contributors=contributors,
            method=method,
            base_sha=self._base_sha,
        )
        self._payload, self._message = payload, message
        await publish_model(
            self._transport,
            self.topics.sg_model(),
            message,
            payload,
            manifest,
            retain=True,
            max_inflight=self.config.broker.max_inflight,
        )
        await self._publish_status()

    async def _on_request(self, request: ModelRequest) -> None:
        """An aggregator (late, or with holes) asks for the current SG model or its chunks."""
        if self._message is None or self._payload is None:
            return
        assert self._transport is not None
        inbox = self.topics.agg_inbox(request.sender)
        transfer = self._message.transfer
        if transfer is None or request.transfer_id != transfer.transfer_id:
            manifest = (
                transfer.manifest(max_bytes=self.config.max_model_bytes) if transfer else None
            )
            await publish_model(
                self._transport,
                inbox,
                self._message,
                self._payload,
                manifest,
                max_inflight=self.config.broker.max_inflight,
            )
            return
        manifest = transfer.manifest(max_bytes=self.config.max_model_bytes)
        wanted = request.chunks if request.chunks is not None else range(manifest.count)
        await publish_chunks(
            self._transport,
            Topics.chunks(inbox),
            self._payload,
            manifest,
            indices=[i for i in wanted if 0 <= i < manifest.count],
            max_inflight=self.config.broker.max_inflight,
        )

    async def _request_missing(self, topic: str, message: ModelMessage, missing: list[int]) -> None:
        """Ask an aggregator to re-send the chunks of its regional result that never came."""
        if message.kind is not ModelKind.REGIONAL or message.transfer is None:
            return
        assert self._transport is not None
        request = ResendRequest(
            project=self.config.project,
            sender=self.name,
            transfer_id=message.transfer.transfer_id,
            chunks=missing,
        )
        log.info("asking %s for %d missing chunks", message.sender, len(missing))
        await self._transport.publish(
            self.topics.agg_inbox(message.sender), encode_message(request)
        )

    # ------------------------------------------------------------ status
    def status(self) -> SgStatusMessage:
        e = self.engine
        blocker: str | None
        if self._closing:
            blocker = "sg-aggregator process stopped"
        elif not e.has_model:
            blocker = "waiting for the base model"
        elif self._holding():
            blocker = (
                f"round {e.round} resumed from the store with {e.collected} regional result(s): "
                f"aggregators have up to {self.config.resume_grace:g} s to report"
            )
        else:
            blocker = e.blocker()
            if blocker is None and e.collected < e.needed:
                waiting = sorted(
                    n
                    for n in self.tracker.names
                    if self.tracker.counted(n) and n not in e.contributors
                )
                blocker = (
                    f"waiting for regional results from {', '.join(waiting) or 'any aggregator'}"
                )
        rows, omitted = self.tracker.table(MAX_STATUS_AGENTS)
        return SgStatusMessage(
            project=self.config.project,
            sender=self.name,
            state=self.state,
            round=e.round,
            model_round=e.model_round if e.has_model else None,
            method=e.strategy.name,
            next_method=e.next_strategy.name if e.next_strategy is not None else None,
            threshold=e.threshold,
            aggregator_timeout=self.config.aggregator_timeout,
            alive=self.tracker.alive(),
            counted=e.active,
            needed=e.needed,
            collected=e.collected,
            regional_from=sorted(e.contributors)[:MAX_STATUS_AGENTS],
            blocker=blocker,
            base_sha=self._base_sha,
            aggregators=rows,
            aggregators_omitted=omitted,
        )

    async def _status_changed(self) -> None:
        if time.monotonic() - self._status_sent >= self.config.monitor_interval:
            await self._publish_status()
        else:
            self._status_dirty = True

    async def _publish_status(self) -> None:
        if self._transport is None or not self._transport.connected:
            return
        self._status_dirty = False
        self._status_sent = time.monotonic()
        await self._transport.publish(
            self.topics.sg_status(), encode_message(self.status()), retain=True
        )


def _contributors_of(regional: RecoveredLocal, meta: dict[str, Any]) -> list[Contributor]:
    """The agents a recorded regional result stands for, from its frame's meta (the region
    itself, with its total, when the frame does not say)."""
    listed = meta.get("contributors")
    try:
        if isinstance(listed, list) and listed:
            return [Contributor(agent=a, num_samples=n) for a, n in listed]
    except (TypeError, ValueError):  # not [name, count] pairs: pydantic says which
        pass
    log.warning(
        "regional result from %s lists no contributors: it stands for itself", regional.agent
    )
    return [Contributor(agent=regional.agent, num_samples=regional.num_samples)]
