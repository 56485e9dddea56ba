"""Opening the store's database: the URL (SQLite in the data directory unless a URL is
given; ``postgresql://`` means psycopg 3), the engine (SQLite tuned for durability and one
writer among readers) and the versioned schema, created on first start."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from aggregator.store.errors import SchemaVersionError, StoreError
from aggregator.store.schema import SCHEMA_VERSION, Base, SchemaInfoRow

log = logging.getLogger("fedhive.store")

SQLITE_FILE = "fedhive.sqlite3"


def database_url(url: str | None, data_dir: Path) -> URL:
    """The SQLAlchemy URL: ``url`` (``postgresql://`` means psycopg 3), else the SQLite file
    in ``data_dir``."""
    if url is None:
        return make_url(f"sqlite:///{data_dir.resolve() / SQLITE_FILE}")
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for other databases and in-memory SQLite)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


@contextlib.contextmanager
def db_errors(what: str, where: str) -> Iterator[None]:
    """Database errors become StoreError naming the operation and the (redacted) URL."""
    try:
        yield
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StoreError(f"cannot {what} ({where}): {detail}") from exc


def open_schema(engine: Engine, *, where: str, create: bool, clock: Callable[[], float]) -> int:
    """Check (or, with ``create``, create) the schema; returns its version.

    Raises:
        SchemaVersionError: the database has another schema version.
        StoreError: no schema and not ``create``, or the database cannot be reached.
    """
    try:
        return _open_schema_once(engine, where, create, clock)
    except StoreError as exc:
        if not create or not isinstance(exc.__cause__, SQLAlchemyError):
            raise
        # Another process may have created the schema between the check and the create.
        return _open_schema_once(engine, where, create, clock)


def _open_schema_once(engine: Engine, where: str, create: bool, clock: Callable[[], float]) -> int:
    with db_errors("open the store", where), engine.begin() as conn:
        if inspect(conn).has_table(SchemaInfoRow.__tablename__):
            version = conn.scalar(select(SchemaInfoRow.version))
            if version is not None:
                return _check_version(version, where)
        if not create:
            raise StoreError(f"no fedhive schema in {where}: nothing recorded yet")
        Base.metadata.create_all(conn)
        conn.execute(insert(SchemaInfoRow).values(id=1, version=SCHEMA_VERSION, created=clock()))
    log.info("store: created schema version %d in %s", SCHEMA_VERSION, where)
    return SCHEMA_VERSION


def _check_version(version: int, where: str) -> int:
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the store at {where} has schema version {version}, newer than this "
            f"fedhive's {SCHEMA_VERSION}: upgrade fedhive to use it"
        )
    if version < SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the store at {where} has schema version {version} and this fedhive needs "
            f"{SCHEMA_VERSION}; no migration from {version} exists"
        )
    return version


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (not pysqlite) say where transactions begin, so DDL is transactional.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) never block the writer
            cursor.execute("PRAGMA synchronous=FULL")  # committed means on disk: before the ack
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        # Writers take the lock up front: a deferred transaction upgraded to a write can fail
        # at once with "database is locked" when another process wrote in between.
        write = conn.get_execution_options().get("fedhive_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
