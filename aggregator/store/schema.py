"""The store's tables (SQLAlchemy 2 typed ORM), the same on SQLite and PostgreSQL.

Times are epoch seconds (double precision), as the round engine keeps them. Model bytes are not
in the database: ``models.sha256`` names a blob in the blob directory. A model row outlives its
bytes when retention prunes them (``pruned``), so rounds, contributors and metrics stay complete.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Bump on every change to the tables below (and add a migration).
SCHEMA_VERSION = 1

NAME_LENGTH = 64  # project, aggregator and agent names are topic levels of at most 64 chars
METRIC_KEY_LENGTH = 128  # as common.messages bounds metric names


class Base(DeclarativeBase):
    # Epoch seconds and metric values need double precision on every backend.
    type_annotation_map: ClassVar[dict[Any, Any]] = {float: Double(), int: Integer()}


class SchemaInfoRow(Base):
    """One row: the schema version the tables were created with."""

    __tablename__ = "fedhive_schema"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int]
    created: Mapped[float]


class ProjectRow(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    created: Mapped[float]


class AggregatorRow(Base):
    """An aggregator, or (role ``sg``) the semi-global aggregator of a project."""

    __tablename__ = "aggregators"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    role: Mapped[str] = mapped_column(String(16))
    created: Mapped[float]


class AgentRow(Base):
    """A contributor: an agent (or, for an sg-aggregator, an aggregator sending regional
    models), by name within its project."""

    __tablename__ = "agents"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    first_seen: Mapped[float]
    last_seen: Mapped[float]


class ModelRow(Base):
    """One model: base, local, regional, sg or global; its bytes are the blob ``sha256``."""

    __tablename__ = "models"
    __table_args__ = (
        Index("ix_models_lookup", "aggregator_id", "kind", "round"),
        Index("ix_models_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    aggregator_id: Mapped[int] = mapped_column(ForeignKey("aggregators.id"))
    kind: Mapped[str] = mapped_column(String(16))
    round: Mapped[int]
    #: The contributor that sent it (local and incoming regional models); None otherwise.
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    num_samples: Mapped[float]
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    framework: Mapped[str] = mapped_column(String(32))
    created: Mapped[float]
    #: Retention removed its bytes (the blob goes once no unpruned model refers to it).
    pruned: Mapped[bool] = mapped_column(Boolean, default=False)


class RoundRow(Base):
    """A completed round of one aggregator and the model it produced."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("aggregator_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    aggregator_id: Mapped[int] = mapped_column(ForeignKey("aggregators.id"))
    number: Mapped[int]
    method: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float]
    started: Mapped[float]
    completed: Mapped[float]
    duration: Mapped[float]
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))


class ContributionRow(Base):
    """One contributor of a completed round, with the sample count it was weighted by."""

    __tablename__ = "contributions"
    __table_args__ = (UniqueConstraint("round_id", "agent_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    num_samples: Mapped[float]


class MetricRow(Base):
    """One number for one round: an agent's (``source`` agent, measured on its local model),
    the aggregator's own (``aggregator``: duration, bytes in/out) or one measured on a round's
    result model (``model``)."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_round", "aggregator_id", "round"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    aggregator_id: Mapped[int] = mapped_column(ForeignKey("aggregators.id"))
    round: Mapped[int]
    source: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    #: The model the value was measured on, if any (what the best-model rule ranks).
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    key: Mapped[str] = mapped_column(String(METRIC_KEY_LENGTH))
    value: Mapped[float]


class BestModelRow(Base):
    """The best model of an aggregator by one metric, as of its last completed round."""

    __tablename__ = "best_models"
    __table_args__ = (UniqueConstraint("aggregator_id", "metric"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    aggregator_id: Mapped[int] = mapped_column(ForeignKey("aggregators.id"))
    metric: Mapped[str] = mapped_column(String(METRIC_KEY_LENGTH))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    value: Mapped[float]
    round: Mapped[int]
