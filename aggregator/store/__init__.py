"""The persistence store (DESIGN.md "Persistence"): projects, aggregators, agents, rounds,
models and metrics in SQLite or PostgreSQL; model bytes in a content-addressed blob directory;
the best model by a metric; retention of local models; crash recovery of an aggregator."""

from __future__ import annotations

from aggregator.store.blobs import BlobStore, sha256_of
from aggregator.store.database import database_url
from aggregator.store.errors import (
    BlobError,
    CorruptBlobError,
    MissingBlobError,
    ModelNotFoundError,
    SchemaVersionError,
    StoreError,
)
from aggregator.store.journal import RoundJournal
from aggregator.store.reader import RoundInfo, StoreReader
from aggregator.store.schema import SCHEMA_VERSION
from aggregator.store.store import Store
from aggregator.store.summary import summarize
from aggregator.store.types import (
    AggregatorRef,
    Contributor,
    MetricPoint,
    MetricRule,
    MetricSummary,
    ModelInfo,
    RecoveredLocal,
    RecoveredState,
    Retention,
    SealedRound,
    lower_is_better,
    parse_retention,
)

__all__ = [
    "SCHEMA_VERSION",
    "AggregatorRef",
    "BlobError",
    "BlobStore",
    "Contributor",
    "CorruptBlobError",
    "MetricPoint",
    "MetricRule",
    "MetricSummary",
    "MissingBlobError",
    "ModelInfo",
    "ModelNotFoundError",
    "RecoveredLocal",
    "RecoveredState",
    "Retention",
    "RoundInfo",
    "RoundJournal",
    "SchemaVersionError",
    "SealedRound",
    "Store",
    "StoreError",
    "StoreReader",
    "database_url",
    "lower_is_better",
    "parse_retention",
    "sha256_of",
    "summarize",
]
