"""The persistence store: projects, aggregators, agents, rounds, models and metrics in SQLite
(the default, a file in the data directory) or PostgreSQL (a URL), model bytes in a
content-addressed blob directory.

Every operation is one database transaction. Model bytes are written (and fsynced) before the
transaction that refers to them commits, so a committed row always has its blob; a crash in
between leaves at most an unreferenced blob. What the aggregator calls, and when:

* :meth:`Store.ensure_aggregator` once at start, then :meth:`Store.open_round_state` to resume;
* :meth:`Store.record_base` when a base model arrives;
* :meth:`Store.record_local` for each accepted local model, *before* acknowledging it;
* :meth:`Store.complete_round` after aggregating and before publishing the new model: the round,
  its model, the aggregator's metrics, the best-model update and retention pruning, atomically;
* under an sg-aggregator, :meth:`Store.record_adopted` for each SG model it adopts and serves.

The calls block (fsync, database round trips): an asyncio service runs them in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from aggregator.store.blobs import Buffer
from aggregator.store.database import db_errors
from aggregator.store.errors import StoreError
from aggregator.store.reader import INPUT_KINDS, StoreReader
from aggregator.store.schema import (
    METRIC_KEY_LENGTH,
    AgentRow,
    AggregatorRow,
    BestModelRow,
    ContributionRow,
    MetricRow,
    ModelRow,
    ProjectRow,
    RoundRow,
)
from aggregator.store.types import (
    AggregatorRef,
    Contributor,
    ModelInfo,
    RecoveredLocal,
    RecoveredState,
    Retention,
    SealedRound,
    check_metrics,
    parse_retention,
)
from common.messages import ModelKind

log = logging.getLogger("fedhive.store")

ROLES = ("aggregator", "sg")
#: Kinds a completed round produces.
RESULT_KINDS = (ModelKind.GLOBAL, ModelKind.REGIONAL, ModelKind.SG)
#: Kinds of the model an aggregator serves (and its agents train from): the base model, its own
#: global (sg-aggregator: SG) results, SG models adopted from its sg-aggregator. A regional
#: result is not one: the SG model of its round is.
CURRENT_KINDS = (ModelKind.BASE, ModelKind.GLOBAL, ModelKind.SG)


class Store(StoreReader):
    """The persistence store of one or more aggregators of one or more projects.

    Args:
        data_dir: the data directory: the blobs (``blobs/ab/abcdef...``) and, without ``url``,
            the SQLite database ``fedhive.sqlite3``.
        url: a SQLAlchemy database URL (``postgresql://user@host/db``); None for SQLite.
        keep_local: which contributed (local) models keep their bytes once their round
            completed: ``"all"``, ``"none"`` or K, those of the last K completed rounds. Records
            stay; the tracked best model and any blob another model still uses are kept.
        best_metric: the metric the best model is tracked by; ``higher_is_better`` defaults to
            False for ``loss`` and ``loss_*`` keys, True otherwise.
        create: create the data directory and schema when missing (False: StoreError).
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        url: str | None = None,
        keep_local: Retention = "all",
        best_metric: str = "accuracy",
        higher_is_better: bool | None = None,
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keep_local: Retention = parse_retention(keep_local)
        super().__init__(
            data_dir=data_dir,
            url=url,
            best_metric=best_metric,
            higher_is_better=higher_is_better,
            create=create,
            clock=clock,
        )
        # On SQLite, writers take the lock when they begin (see database.make_engine).
        writer = self._engine.execution_options(fedhive_write=True)
        self._write = sessionmaker(writer, expire_on_commit=False)

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[Session]:
        with db_errors(what, self.url), self._write.begin() as session:
            yield session

    # ------------------------------------------------------------ registration
    def ensure_project(self, name: str) -> int:
        """The id of project ``name``, created if new."""
        with self._writing(f"record project {name!r}") as s:
            return self._project(s, name).id

    def ensure_aggregator(
        self, project: str, name: str, *, role: str = "aggregator"
    ) -> AggregatorRef:
        """The aggregator ``name`` of ``project`` (role ``aggregator`` or ``sg``), created if
        new (with its project)."""
        if role not in ROLES:
            raise StoreError(f"aggregator role must be one of {', '.join(ROLES)}, got {role!r}")
        try:
            return self._ensure_aggregator(project, name, role)
        except StoreError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            # Another process created the project or aggregator at the same moment.
            return self._ensure_aggregator(project, name, role)

    def _ensure_aggregator(self, project: str, name: str, role: str) -> AggregatorRef:
        with self._writing(f"record aggregator {name!r}") as s:
            p = self._project(s, project)
            row = s.scalar(
                select(AggregatorRow).where(
                    AggregatorRow.project_id == p.id, AggregatorRow.name == name
                )
            )
            if row is None:
                row = AggregatorRow(project_id=p.id, name=name, role=role, created=self._clock())
                s.add(row)
                s.flush()
            elif row.role != role:
                raise StoreError(
                    f"aggregator {name!r} of project {project!r} is recorded as role "
                    f"{row.role!r}, not {role!r}"
                )
            return AggregatorRef(row.id, project, name, role)

    def _project(self, s: Session, name: str) -> ProjectRow:
        row = s.scalar(select(ProjectRow).where(ProjectRow.name == name))
        if row is None:
            row = ProjectRow(name=name, created=self._clock())
            s.add(row)
            s.flush()
        return row

    def _agent(self, s: Session, project_id: int, name: str, now: float) -> AgentRow:
        row = s.scalar(
            select(AgentRow).where(AgentRow.project_id == project_id, AgentRow.name == name)
        )
        if row is None:
            row = AgentRow(project_id=project_id, name=name, first_seen=now, last_seen=now)
            s.add(row)
            s.flush()
        else:
            row.last_seen = now
        return row

    @staticmethod
    def _aggregator_row(s: Session, ref: AggregatorRef) -> AggregatorRow:
        row = s.get(AggregatorRow, ref.id)
        if row is None or row.name != ref.name:
            raise StoreError(f"aggregator {ref.name!r} is not in this store")
        return row

    # ------------------------------------------------------------ writes
    def record_base(self, agg: AggregatorRef, payload: Buffer, *, framework: str) -> ModelInfo:
        """Record the base model (round 0) of ``agg``; the same bytes again are a no-op.

        A different base is taken while no round has completed (the open round's local models,
        trained from the old base, are dropped); after that it is a StoreError: a new base
        starts a new federation, which needs a new project or data directory.
        """
        size = memoryview(payload).nbytes
        sha = self.blobs.put(payload)
        dropped: set[str] = set()
        with self._writing(f"record the base model of {agg.name!r}") as s:
            self._aggregator_row(s, agg)
            base = self._base_row(s, agg.id)
            if base is not None and base.sha256 == sha:
                return self._info(s, base)
            done = self._open_round(s, agg.id) - 1
            if done > 0:
                source = f" from base model {base.sha256[:12]}" if base is not None else ""
                raise StoreError(
                    f"aggregator {agg.name!r} is past round {done}{source}; a different base "
                    f"model ({sha[:12]}) starts a new federation: use a new project or data "
                    "directory"
                )
            if base is not None:
                stale = list(s.scalars(select(ModelRow).where(ModelRow.aggregator_id == agg.id)))
                dropped = {m.sha256 for m in stale}
                ids = [m.id for m in stale]
                s.execute(delete(MetricRow).where(MetricRow.model_id.in_(ids)))
                s.execute(delete(ModelRow).where(ModelRow.id.in_(ids)))
                log.info(
                    "store: base model of %s replaced (%s -> %s); %d model(s) dropped",
                    agg.name,
                    base.sha256[:12],
                    sha[:12],
                    len(ids) - 1,
                )
            row = ModelRow(
                aggregator_id=agg.id,
                kind=ModelKind.BASE.value,
                round=0,
                agent_id=None,
                num_samples=0.0,
                sha256=sha,
                size=size,
                framework=framework,
                created=self._clock(),
            )
            s.add(row)
            s.flush()
            info = self._info(s, row)
        self._delete_unreferenced(dropped - {sha})
        return info

    def record_local(
        self,
        agg: AggregatorRef,
        *,
        round: int,
        agent: str,
        num_samples: float,
        metrics: Mapping[str, float],
        payload: Buffer,
        framework: str | None = None,
        kind: ModelKind = ModelKind.LOCAL,
    ) -> ModelInfo:
        """Record an accepted local model of the open round, durably: call it before the ack.

        The same agent again in the same round returns the first record (a duplicate replaces
        nothing). StoreError for a round other than the open one or without a base model.
        A sample count of 0 is recorded as the round engine takes it (the model weighs nothing).
        """
        if kind not in INPUT_KINDS:
            raise StoreError(f"a contributed model is local or regional, not {kind.value!r}")
        values = check_metrics(metrics, key_length=METRIC_KEY_LENGTH)
        weight = float(num_samples)
        if not (math.isfinite(weight) and weight >= 0):
            raise StoreError(f"num_samples must be a finite number >= 0, got {num_samples!r}")
        size = memoryview(payload).nbytes
        sha = self.blobs.put(payload)
        with self._writing(f"record {agent!r}'s model for round {round}") as s:
            a = self._aggregator_row(s, agg)
            base = self._require_start(s, agg)
            self._check_open(s, agg, round)
            now = self._clock()
            contributor = self._agent(s, a.project_id, agent, now)
            existing = s.scalar(
                select(ModelRow).where(
                    ModelRow.aggregator_id == agg.id,
                    ModelRow.round == round,
                    ModelRow.agent_id == contributor.id,
                    ModelRow.kind.in_([k.value for k in INPUT_KINDS]),
                )
            )
            if existing is not None:
                return self._info(s, existing)
            row = ModelRow(
                aggregator_id=agg.id,
                kind=kind.value,
                round=round,
                agent_id=contributor.id,
                num_samples=weight,
                sha256=sha,
                size=size,
                framework=framework or base.framework,
                created=now,
            )
            s.add(row)
            s.flush()
            s.add_all(
                MetricRow(
                    aggregator_id=agg.id,
                    round=round,
                    source="agent",
                    agent_id=contributor.id,
                    model_id=row.id,
                    key=key,
                    value=value,
                )
                for key, value in values.items()
            )
            return self._info(s, row)

    def complete_round(
        self,
        agg: AggregatorRef,
        *,
        round: int,
        payload: Buffer,
        contributors: Sequence[Contributor],
        method: str,
        threshold: float,
        started: float,
        completed: float,
        bytes_in: int,
        bytes_out: int,
        duration: float | None = None,
        kind: ModelKind = ModelKind.GLOBAL,
        metrics: Mapping[str, float] | None = None,
    ) -> ModelInfo:
        """Record a completed round atomically: the round and its contributors, its model, the
        aggregator's metrics (``duration``, ``bytes_in``, ``bytes_out``; ``metrics`` measured
        on the new model, if any), the best-model update and retention pruning.

        Call it after aggregating and before publishing. StoreError (and nothing written) if
        the round is not the open one, has no contributor, or a contributor's local model was
        never recorded.
        """
        if kind not in RESULT_KINDS:
            raise StoreError(f"a round produces a global, regional or sg model, not {kind.value!r}")
        if not contributors:
            raise StoreError(f"round {round} has no contributor")
        model_metrics = check_metrics(metrics or {}, key_length=METRIC_KEY_LENGTH)
        took = float(completed - started if duration is None else duration)
        size = memoryview(payload).nbytes
        sha = self.blobs.put(payload)
        with self._writing(f"record round {round} of {agg.name!r}") as s:
            a = self._aggregator_row(s, agg)
            base = self._require_start(s, agg)
            self._check_open(s, agg, round)
            inputs = self._contributions(s, a, round, contributors)
            model = ModelRow(
                aggregator_id=agg.id,
                kind=kind.value,
                round=round,
                agent_id=None,
                num_samples=sum(w for _, _, w in inputs),
                sha256=sha,
                size=size,
                framework=base.framework,
                created=self._clock(),
            )
            s.add(model)
            s.flush()
            row = RoundRow(
                aggregator_id=agg.id,
                number=round,
                method=method,
                threshold=float(threshold),
                started=float(started),
                completed=float(completed),
                duration=took,
                bytes_in=int(bytes_in),
                bytes_out=int(bytes_out),
                model_id=model.id,
            )
            s.add(row)
            s.flush()
            s.add_all(
                ContributionRow(round_id=row.id, agent_id=agent, model_id=model_id, num_samples=w)
                for agent, model_id, w in inputs
            )
            own = {"duration": took, "bytes_in": float(bytes_in), "bytes_out": float(bytes_out)}
            s.add_all(
                MetricRow(
                    aggregator_id=agg.id,
                    round=round,
                    source="aggregator",
                    agent_id=None,
                    model_id=None,
                    key=key,
                    value=value,
                )
                for key, value in own.items()
            )
            s.add_all(
                MetricRow(
                    aggregator_id=agg.id,
                    round=round,
                    source="model",
                    agent_id=None,
                    model_id=model.id,
                    key=key,
                    value=value,
                )
                for key, value in model_metrics.items()
            )
            s.flush()
            self._update_best(s, agg.id, round)
            pruned = self._prune(s, agg.id, round)
            info = self._info(s, model)
        self._delete_unreferenced(pruned)
        return info

    def record_adopted(
        self,
        agg: AggregatorRef,
        *,
        round: int,
        payload: Buffer,
        framework: str | None = None,
        base_sha256: str | None = None,
        num_samples: float = 0.0,
    ) -> ModelInfo:
        """Record the SG model of ``round`` that ``agg`` (an aggregator under an sg-aggregator)
        adopted and now serves: it becomes the current model and ``round + 1`` the open round.

        Rounds the SG layer closed without this aggregator stay as they were (local models
        recorded for them are never counted). Without a base model (an aggregator that joined
        after round 0) the adopted model starts its record. The same model again is a no-op.

        Raises:
            StoreError: ``round`` is not after the current model's, or the SG model belongs to
                another federation (``base_sha256`` is not the recorded base model's).
        """
        if round < 1:
            raise StoreError("SG model 0 is the base model: record it with record_base")
        size = memoryview(payload).nbytes
        sha = self.blobs.put(payload)
        with self._writing(f"record SG model {round} adopted by {agg.name!r}") as s:
            self._aggregator_row(s, agg)
            base = self._base_row(s, agg.id)
            if base is not None and base_sha256 is not None and base.sha256 != base_sha256:
                raise StoreError(
                    f"SG model {round} (base model {base_sha256[:12]}) is of another federation "
                    f"than aggregator {agg.name!r} (base model {base.sha256[:12]}): a new "
                    "federation needs a new project or data directory"
                )
            current = self._current_row(s, agg.id)
            if current is not None and round <= current.round:
                if round == current.round and current.sha256 == sha:
                    return self._info(s, current)
                raise StoreError(
                    f"SG model {round} is not newer than the model aggregator {agg.name!r} "
                    f"serves (round {current.round})"
                )
            last = self._last_round(s, agg.id)
            if round < last:
                raise StoreError(
                    f"SG model {round} is older than round {last}, which aggregator "
                    f"{agg.name!r} already completed"
                )
            start = base or current
            if start is None and framework is None:
                raise StoreError(f"the first model of aggregator {agg.name!r} needs a framework")
            row = ModelRow(
                aggregator_id=agg.id,
                kind=ModelKind.SG.value,
                round=round,
                agent_id=None,
                num_samples=float(num_samples),
                sha256=sha,
                size=size,
                framework=start.framework if start is not None else str(framework),
                created=self._clock(),
            )
            s.add(row)
            s.flush()
            return self._info(s, row)

    def _contributions(
        self, s: Session, a: AggregatorRow, round: int, contributors: Sequence[Contributor]
    ) -> list[tuple[int, int, float]]:
        """(agent id, local model id, weight) per contributor; StoreError if one was never
        recorded (its model would be lost by a crash)."""
        found: list[tuple[int, int, float]] = []
        seen: set[str] = set()
        for c in contributors:
            if c.agent in seen:
                raise StoreError(f"round {round}: contributor {c.agent!r} is listed twice")
            seen.add(c.agent)
            hit = s.execute(
                select(AgentRow.id, ModelRow.id)
                .join(ModelRow, ModelRow.agent_id == AgentRow.id)
                .where(
                    AgentRow.project_id == a.project_id,
                    AgentRow.name == c.agent,
                    ModelRow.aggregator_id == a.id,
                    ModelRow.round == round,
                    ModelRow.kind.in_([k.value for k in INPUT_KINDS]),
                )
            ).first()
            if hit is None:
                raise StoreError(
                    f"round {round}: contributor {c.agent!r} has no recorded model "
                    "(record_local must run before the model is acknowledged)"
                )
            found.append((hit[0], hit[1], float(c.num_samples)))
        return found

    def _update_best(self, s: Session, agg_id: int, round: int) -> None:
        """Move the tracked best model if a model of ``round`` beats it."""
        rule = self.rule
        best = s.scalar(
            select(BestModelRow).where(
                BestModelRow.aggregator_id == agg_id, BestModelRow.metric == rule.metric
            )
        )
        candidates = s.execute(
            select(MetricRow.model_id, MetricRow.value)
            .where(
                MetricRow.aggregator_id == agg_id,
                MetricRow.round == round,
                MetricRow.key == rule.metric,
                MetricRow.model_id.is_not(None),
            )
            .order_by(MetricRow.model_id)
        ).all()
        for model_id, value in candidates:
            assert model_id is not None
            if not rule.better(value, None if best is None else best.value):
                continue
            if best is None:
                best = BestModelRow(
                    aggregator_id=agg_id,
                    metric=rule.metric,
                    model_id=model_id,
                    value=value,
                    round=round,
                )
                s.add(best)
            else:
                best.model_id, best.value, best.round = model_id, value, round
        s.flush()

    def _prune(self, s: Session, agg_id: int, round: int) -> set[str]:
        """Mark contributed models past retention as pruned; returns their blobs' hashes.
        The tracked best models keep their bytes."""
        if self.keep_local == "all":
            return set()
        keep = 0 if self.keep_local == "none" else self.keep_local
        pinned = select(BestModelRow.model_id).where(BestModelRow.aggregator_id == agg_id)
        victims = s.execute(
            select(ModelRow.id, ModelRow.sha256).where(
                ModelRow.aggregator_id == agg_id,
                ModelRow.agent_id.is_not(None),
                ModelRow.round <= round - keep,
                ModelRow.pruned.is_(False),
                ModelRow.id.not_in(pinned),
            )
        ).all()
        if victims:
            s.execute(
                update(ModelRow).where(ModelRow.id.in_([v[0] for v in victims])).values(pruned=True)
            )
        return {v[1] for v in victims}

    def _delete_unreferenced(self, shas: set[str]) -> None:
        """Delete the blobs no unpruned model refers to (after the commit that pruned them)."""
        if not shas:
            return
        with self._reading("check blob references") as s:
            referenced = set(
                s.scalars(
                    select(ModelRow.sha256).where(
                        ModelRow.sha256.in_(shas), ModelRow.pruned.is_(False)
                    )
                )
            )
        for sha in shas - referenced:
            self.blobs.delete(sha)

    # ------------------------------------------------------------ round state
    def _require_start(self, s: Session, agg: AggregatorRef) -> ModelRow:
        """The base model, else (an aggregator that joined after round 0) its first model."""
        start = self._base_row(s, agg.id) or self._current_row(s, agg.id)
        if start is None:
            raise StoreError(f"aggregator {agg.name!r} has no base model recorded")
        return start

    @staticmethod
    def _current_row(s: Session, agg_id: int) -> ModelRow | None:
        """The model the aggregator serves: the latest of its base, global/SG results and
        adopted SG models."""
        return s.scalar(
            select(ModelRow)
            .where(
                ModelRow.aggregator_id == agg_id,
                ModelRow.agent_id.is_(None),
                ModelRow.kind.in_([k.value for k in CURRENT_KINDS]),
            )
            .order_by(ModelRow.round.desc(), ModelRow.id.desc())
            .limit(1)
        )

    def _open_round(self, s: Session, agg_id: int) -> int:
        """The round that takes models next: one past the last completed round and the
        current model (an adopted SG model may be ahead of the aggregator's own rounds)."""
        current = self._current_row(s, agg_id)
        return max(self._last_round(s, agg_id), current.round if current else 0) + 1

    def _check_open(self, s: Session, agg: AggregatorRef, round: int) -> None:
        last = self._last_round(s, agg.id)
        if round <= last:
            raise StoreError(
                f"round {round} of aggregator {agg.name!r} is already complete (last completed "
                f"round: {last}); a round is never recorded twice"
            )
        open_round = self._open_round(s, agg.id)
        if round != open_round:
            raise StoreError(
                f"round {round} of aggregator {agg.name!r} is not open: the open round is "
                f"{open_round}"
            )

    @staticmethod
    def _round_contributors(s: Session, round_id: int) -> tuple[tuple[str, float], ...]:
        return tuple(
            (name, weight)
            for name, weight in s.execute(
                select(AgentRow.name, ContributionRow.num_samples)
                .join(AgentRow, ContributionRow.agent_id == AgentRow.id)
                .where(ContributionRow.round_id == round_id)
                .order_by(ContributionRow.id)
            )
        )

    def open_round_state(self, agg: AggregatorRef) -> RecoveredState | None:
        """Where ``agg`` stood: its current model (the last round's, an adopted SG model, else
        the base) and the local models already accepted in the open round, or, under an
        sg-aggregator, the open round's regional result when it was produced before the SG
        model arrived; None when nothing was recorded.

        Raises:
            CorruptBlobError, MissingBlobError: a needed model's bytes cannot be trusted.
        """
        with self._reading(f"read the state of {agg.name!r}") as s:
            self._aggregator_row(s, agg)
            current = self._current_row(s, agg.id)
            if current is None:
                return None
            base = self._base_row(s, agg.id)
            model_round = current.round
            own = s.scalar(
                select(RoundRow).where(
                    RoundRow.aggregator_id == agg.id, RoundRow.model_id == current.id
                )
            )
            method = own.method if own is not None else None
            contributors = self._round_contributors(s, own.id) if own is not None else ()
            last = s.scalar(
                select(RoundRow)
                .where(RoundRow.aggregator_id == agg.id)
                .order_by(RoundRow.number.desc())
                .limit(1)
            )
            sealed: tuple[RoundRow, ModelRow, tuple[tuple[str, float], ...]] | None = None
            locals_: list[tuple[ModelRow, str]] = []
            if last is not None and last.number > model_round:
                # A regional result is recorded and its SG model was not (yet) adopted.
                if last.number != model_round + 1:
                    raise StoreError(
                        f"aggregator {agg.name!r}: round {last.number} completed without the "
                        f"SG model of round {last.number - 1} (the store serves {model_round})"
                    )
                regional = s.get(ModelRow, last.model_id)
                assert regional is not None
                sealed = (last, regional, self._round_contributors(s, last.id))
            else:
                locals_ = [
                    (m, name)
                    for m, name in s.execute(
                        select(ModelRow, AgentRow.name)
                        .join(AgentRow, ModelRow.agent_id == AgentRow.id)
                        .where(
                            ModelRow.aggregator_id == agg.id,
                            ModelRow.round == model_round + 1,
                            ModelRow.kind.in_([k.value for k in INPUT_KINDS]),
                        )
                        .order_by(ModelRow.id)
                    )
                ]
            metrics: dict[int, dict[str, float]] = {}
            if locals_:
                for model_id, key, value in s.execute(
                    select(MetricRow.model_id, MetricRow.key, MetricRow.value).where(
                        MetricRow.model_id.in_([m.id for m, _ in locals_])
                    )
                ):
                    assert model_id is not None
                    metrics.setdefault(model_id, {})[key] = value
        recovered = tuple(
            RecoveredLocal(
                agent=name,
                num_samples=m.num_samples,
                metrics=metrics.get(m.id, {}),
                payload=self.blobs.get(m.sha256),
                sha256=m.sha256,
            )
            for m, name in locals_
        )
        sealed_round = None
        if sealed is not None:
            row, regional, inputs = sealed
            sealed_round = SealedRound(
                round=row.number,
                payload=self.blobs.get(regional.sha256),
                sha256=regional.sha256,
                method=row.method,
                contributors=inputs,
            )
        return RecoveredState(
            model_round=model_round,
            model_kind=ModelKind(current.kind),
            model_payload=self.blobs.get(current.sha256),
            model_sha256=current.sha256,
            framework=(base or current).framework,
            base_sha256=base.sha256 if base is not None else None,
            open_round=model_round + 1,
            locals=recovered,
            method=method,
            contributors=contributors,
            sealed=sealed_round,
        )
