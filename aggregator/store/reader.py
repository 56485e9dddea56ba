"""Reading the store: models, the best model, rounds and metrics (``fedhive models`` and
``fedhive metrics`` need nothing more; :class:`~aggregator.store.store.Store` adds the writes).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from sqlalchemy import func, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, aliased, sessionmaker

from aggregator.store.blobs import BlobStore
from aggregator.store.database import (
    database_url,
    db_errors,
    make_engine,
    open_schema,
    sqlite_file,
)
from aggregator.store.errors import ModelNotFoundError, StoreError
from aggregator.store.schema import (
    AgentRow,
    AggregatorRow,
    BestModelRow,
    ContributionRow,
    MetricRow,
    ModelRow,
    ProjectRow,
    RoundRow,
)
from aggregator.store.summary import summarize
from aggregator.store.types import (
    AggregatorRef,
    MetricPoint,
    MetricRule,
    MetricSummary,
    ModelInfo,
)
from common.messages import ModelKind

BLOB_DIR = "blobs"
#: Kinds of the models contributors send (an sg-aggregator's contributors send regional ones).
INPUT_KINDS = (ModelKind.LOCAL, ModelKind.REGIONAL)

ModelQuery = ModelKind | Literal["best"]


@dataclass(frozen=True, slots=True)
class RoundInfo:
    """A completed round as recorded."""

    round: int
    method: str
    threshold: float
    started: float
    completed: float
    duration: float
    bytes_in: int
    bytes_out: int
    contributors: tuple[tuple[str, float], ...]
    model_sha256: str


class StoreReader:
    """Read access to the store (opened read-only with ``create=False``).

    Args:
        data_dir: the data directory: the blobs (``blobs/ab/abcdef...``) and, without ``url``,
            the SQLite database ``fedhive.sqlite3``.
        url: a SQLAlchemy database URL (``postgresql://user@host/db``); None for SQLite.
        best_metric: the metric the best model is ranked by; ``higher_is_better`` defaults to
            False for ``loss`` and ``loss_*`` keys, True otherwise.
        create: create the data directory and schema when missing (False: StoreError).
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        url: str | None = None,
        best_metric: str = "accuracy",
        higher_is_better: bool | None = None,
        create: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.rule = MetricRule.for_metric(best_metric, higher_is_better)
        self._clock = clock
        db_url = database_url(url, self.data_dir)
        #: The database URL; ``url`` is the same with the password hidden, for messages.
        self.database_url: URL = db_url
        self.url = db_url.render_as_string(hide_password=True)
        db_file = sqlite_file(db_url)
        if db_file is not None and not db_file.exists():
            if not create:
                raise StoreError(f"no fedhive store at {db_file}: nothing was recorded there")
            db_file.parent.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(root=self.data_dir / BLOB_DIR)
        self._engine = make_engine(db_url)
        try:
            self.schema_version = open_schema(
                self._engine, where=self.url, create=create, clock=clock
            )
        except BaseException:
            self._engine.dispose()
            raise
        self._read = sessionmaker(self._engine, expire_on_commit=False)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[Session]:
        with db_errors(what, self.url), self._read.begin() as session:
            yield session

    @staticmethod
    def _base_row(s: Session, agg_id: int) -> ModelRow | None:
        return s.scalar(
            select(ModelRow)
            .where(ModelRow.aggregator_id == agg_id, ModelRow.kind == ModelKind.BASE.value)
            .order_by(ModelRow.id.desc())
        )

    @staticmethod
    def _last_round(s: Session, agg_id: int) -> int:
        return (
            s.scalar(
                select(func.coalesce(func.max(RoundRow.number), 0)).where(
                    RoundRow.aggregator_id == agg_id
                )
            )
            or 0
        )

    # ------------------------------------------------------------ queries
    def aggregators(self, project: str | None = None) -> list[AggregatorRef]:
        with self._reading("list aggregators") as s:
            query = (
                select(AggregatorRow, ProjectRow.name)
                .join(ProjectRow, AggregatorRow.project_id == ProjectRow.id)
                .order_by(ProjectRow.name, AggregatorRow.name)
            )
            if project is not None:
                query = query.where(ProjectRow.name == project)
            return [AggregatorRef(a.id, p, a.name, a.role) for a, p in s.execute(query)]

    def resolve_aggregator(
        self, *, project: str | None = None, aggregator: str | None = None, role: str | None = None
    ) -> AggregatorRef:
        """The one aggregator the arguments name (unnamed parts may be left out when only one
        fits); ModelNotFoundError if none, StoreError listing them if several."""
        refs = [
            r
            for r in self.aggregators(project)
            if (aggregator is None or r.name == aggregator)
            and (role is None or aggregator is not None or r.role == role)
        ]
        where = f" in project {project!r}" if project is not None else ""
        if not refs:
            what = f"aggregator {aggregator!r}" if aggregator else f"{role or 'any'} aggregator"
            raise ModelNotFoundError(f"no {what}{where} in the store ({self.url})")
        if len(refs) > 1:
            names = ", ".join(f"{r.project}/{r.name}" for r in refs)
            raise StoreError(
                f"several aggregators{where} ({names}): name one (--project / --aggregator)"
            )
        return refs[0]

    def rounds(self, agg: AggregatorRef) -> list[RoundInfo]:
        """The completed rounds of ``agg``, in order."""
        with self._reading(f"list the rounds of {agg.name!r}") as s:
            rows = s.execute(
                select(RoundRow, ModelRow.sha256)
                .join(ModelRow, RoundRow.model_id == ModelRow.id)
                .where(RoundRow.aggregator_id == agg.id)
                .order_by(RoundRow.number)
            ).all()
            contributors: dict[int, list[tuple[str, float]]] = {}
            for round_id, name, weight in s.execute(
                select(ContributionRow.round_id, AgentRow.name, ContributionRow.num_samples)
                .join(AgentRow, ContributionRow.agent_id == AgentRow.id)
                .where(ContributionRow.round_id.in_([r.id for r, _ in rows]))
                .order_by(ContributionRow.id)
            ):
                contributors.setdefault(round_id, []).append((name, weight))
        return [
            RoundInfo(
                round=r.number,
                method=r.method,
                threshold=r.threshold,
                started=r.started,
                completed=r.completed,
                duration=r.duration,
                bytes_in=r.bytes_in,
                bytes_out=r.bytes_out,
                contributors=tuple(contributors.get(r.id, [])),
                model_sha256=sha,
            )
            for r, sha in rows
        ]

    def list_models(
        self,
        *,
        project: str | None = None,
        aggregator: str | None = None,
        kind: ModelKind | None = None,
        round: int | None = None,
        agent: str | None = None,
    ) -> list[ModelInfo]:
        """Every stored model matching the filters (pruned ones too, marked), oldest first."""
        with self._reading("list models") as s:
            query = self._model_query()
            if project is not None:
                query = query.where(ProjectRow.name == project)
            if aggregator is not None:
                query = query.where(AggregatorRow.name == aggregator)
            if kind is not None:
                query = query.where(ModelRow.kind == ModelKind(kind).value)
            if round is not None:
                query = query.where(ModelRow.round == round)
            if agent is not None:
                query = query.where(_AGENT.name == agent)
            return [self._info_of(*row) for row in s.execute(query.order_by(ModelRow.id))]

    def best_model(
        self,
        *,
        project: str | None = None,
        aggregator: str | None = None,
        metric: str | None = None,
        higher_is_better: bool | None = None,
    ) -> ModelInfo:
        """The model with the best recorded value of ``metric`` (default: the store's), among
        models of completed rounds that the value was measured on.

        ModelNotFoundError if no model has the metric.
        """
        ref = self.resolve_aggregator(project=project, aggregator=aggregator, role="aggregator")
        rule = self.rule
        if metric is not None or higher_is_better is not None:
            rule = MetricRule.for_metric(metric or rule.metric, higher_is_better)
        with self._reading("find the best model") as s:
            found: tuple[int, float] | None = None
            if rule == self.rule:
                tracked = s.scalar(
                    select(BestModelRow).where(
                        BestModelRow.aggregator_id == ref.id, BestModelRow.metric == rule.metric
                    )
                )
                if tracked is not None:
                    found = (tracked.model_id, tracked.value)
            if found is None:
                order = MetricRow.value.desc() if rule.higher_is_better else MetricRow.value.asc()
                hit = s.execute(
                    select(MetricRow.model_id, MetricRow.value)
                    .where(
                        MetricRow.aggregator_id == ref.id,
                        MetricRow.key == rule.metric,
                        MetricRow.model_id.is_not(None),
                        MetricRow.round <= self._last_round(s, ref.id),
                    )
                    .order_by(order, MetricRow.round, MetricRow.model_id)
                    .limit(1)
                ).first()
                if hit is not None and hit[0] is not None:
                    found = (hit[0], hit[1])
            if found is None:
                raise ModelNotFoundError(
                    f"no model of aggregator {ref.name!r} has a recorded {rule.metric!r} "
                    "in a completed round"
                )
            row = s.execute(self._model_query().where(ModelRow.id == found[0])).one()
            info = self._info_of(*row)
        return replace(info, metric=rule.metric, value=found[1])

    def get_model(
        self,
        kind: ModelQuery,
        *,
        project: str | None = None,
        aggregator: str | None = None,
        round: int | None = None,
        agent: str | None = None,
        metric: str | None = None,
    ) -> tuple[ModelInfo, bytes]:
        """One model and its verified bytes. Without ``round``, the latest; ``best`` ranks by
        ``metric``. ModelNotFoundError if none matches or its bytes were pruned; StoreError if
        several match; CorruptBlobError if its bytes fail their hash."""
        if kind == "best":
            info = self.best_model(project=project, aggregator=aggregator, metric=metric)
        else:
            info = self._find_model(ModelKind(kind), project, aggregator, round, agent)
        return info, self.read_payload(info)

    def _find_model(
        self,
        kind: ModelKind,
        project: str | None,
        aggregator: str | None,
        round: int | None,
        agent: str | None,
    ) -> ModelInfo:
        role = "sg" if kind is ModelKind.SG else "aggregator"
        try:
            ref = self.resolve_aggregator(project=project, aggregator=aggregator, role=role)
        except ModelNotFoundError:
            # An aggregator's own store has no sg-aggregator, but the SG models it adopted.
            holders = (
                {(m.project, m.aggregator) for m in self.list_models(project=project, kind=kind)}
                if kind is ModelKind.SG and aggregator is None
                else set()
            )
            if len(holders) != 1:
                raise
            [(project, aggregator)] = holders
            ref = self.resolve_aggregator(project=project, aggregator=aggregator)
        models = self.list_models(
            project=ref.project, aggregator=ref.name, kind=kind, round=round, agent=agent
        )
        of_round = f" of round {round}" if round is not None else ""
        from_agent = f" from agent {agent!r}" if agent is not None else ""
        if not models:
            raise ModelNotFoundError(
                f"no {kind.value} model{of_round}{from_agent} for aggregator {ref.name!r}"
            )
        latest = max(m.round for m in models)
        models = [m for m in models if m.round == latest]
        if len({m.agent for m in models}) > 1:
            agents = ", ".join(sorted(str(m.agent) for m in models))
            raise StoreError(
                f"several {kind.value} models of round {latest} ({agents}): name one (--agent)"
            )
        info = models[-1]
        if info.pruned:
            raise ModelNotFoundError(
                f"the {kind.value} model of round {info.round}{from_agent} "
                f"({info.sha256[:12]}) was pruned by the retention setting: only its record "
                "is kept"
            )
        return info

    def read_payload(self, info: ModelInfo) -> bytes:
        """The verified bytes of a stored model (CorruptBlobError on a hash mismatch)."""
        if info.pruned:
            raise ModelNotFoundError(
                f"the {info.kind.value} model of round {info.round} was pruned by retention"
            )
        return self.blobs.get(info.sha256)

    def metric_points(
        self,
        *,
        project: str | None = None,
        aggregator: str | None = None,
        metric: str | None = None,
    ) -> list[MetricPoint]:
        """Every recorded value of completed rounds (of ``metric``, else all), by round."""
        ref = self.resolve_aggregator(project=project, aggregator=aggregator, role="aggregator")
        with self._reading("read metrics") as s:
            query = (
                select(MetricRow, AgentRow.name, ModelRow.num_samples)
                .outerjoin(AgentRow, MetricRow.agent_id == AgentRow.id)
                .outerjoin(ModelRow, MetricRow.model_id == ModelRow.id)
                .where(
                    MetricRow.aggregator_id == ref.id,
                    MetricRow.round <= self._last_round(s, ref.id),
                )
                .order_by(MetricRow.round, MetricRow.key, MetricRow.source, AgentRow.name)
            )
            if metric is not None:
                query = query.where(MetricRow.key == metric)
            return [
                MetricPoint(
                    round=m.round,
                    key=m.key,
                    source=m.source,
                    agent=name,
                    value=m.value,
                    weight=weight if m.source == "agent" else None,
                )
                for m, name, weight in s.execute(query)
            ]

    def metrics(
        self,
        *,
        project: str | None = None,
        aggregator: str | None = None,
        metric: str | None = None,
    ) -> list[MetricSummary]:
        """Per completed round and metric: mean/min/max and the global figure."""
        return summarize(self.metric_points(project=project, aggregator=aggregator, metric=metric))

    # ------------------------------------------------------------ row -> record
    @staticmethod
    def _model_query() -> Any:
        return (
            select(ModelRow, AggregatorRow.name, ProjectRow.name, _AGENT.name)
            .join(AggregatorRow, ModelRow.aggregator_id == AggregatorRow.id)
            .join(ProjectRow, AggregatorRow.project_id == ProjectRow.id)
            .outerjoin(_AGENT, ModelRow.agent_id == _AGENT.id)
        )

    def _info(self, s: Session, row: ModelRow) -> ModelInfo:
        return self._info_of(*s.execute(self._model_query().where(ModelRow.id == row.id)).one())

    @staticmethod
    def _info_of(row: ModelRow, aggregator: str, project: str, agent: str | None) -> ModelInfo:
        return ModelInfo(
            id=row.id,
            project=project,
            aggregator=aggregator,
            kind=ModelKind(row.kind),
            round=row.round,
            agent=agent,
            num_samples=row.num_samples,
            sha256=row.sha256,
            size=row.size,
            framework=row.framework,
            created=row.created,
            pruned=row.pruned,
        )


_AGENT = aliased(AgentRow, name="contributor")
