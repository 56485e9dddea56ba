"""The persistence store, the same suite on SQLite and on PostgreSQL.

PostgreSQL: each run creates a database ``fedhive_test_<uuid>`` through the maintenance
database (``FEDHIVE_TEST_PG_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``), each
test its own schema in it, and the run drops the database at the end. The PostgreSQL cases skip
only when no server answers at that address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.sql import Executable

from aggregator.store import (
    SCHEMA_VERSION,
    AggregatorRef,
    BlobStore,
    CorruptBlobError,
    MetricRule,
    MissingBlobError,
    ModelNotFoundError,
    SchemaVersionError,
    Store,
    StoreError,
    database_url,
    lower_is_better,
    parse_retention,
    sha256_of,
)
from aggregator.store.schema import SchemaInfoRow
from common.codec import decode, encode
from common.messages import ModelKind

OpenStore = Callable[..., Store]

PG_URL = os.environ.get("FEDHIVE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


# ============================================================================== fixtures
def _server_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test run (dropped at the end), as a URL."""
    admin = database_url(PG_URL, Path("."))
    host, port = admin.host or "127.0.0.1", admin.port or 5432
    if not _server_answers(host, port):
        pytest.skip(
            f"PostgreSQL store tests skipped: no server answers at {host}:{port} "
            "(start one or set FEDHIVE_TEST_PG_URL)"
        )
    name = f"fedhive_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield admin.set(database=name).render_as_string(hide_password=False)
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (SQLite in the data dir) or the URL of a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield None
        return
    base_url: str = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(database_url(base_url, Path(".")), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        engine.dispose()


@pytest.fixture
def open_store(tmp_path: Path, store_url: str | None) -> Iterator[OpenStore]:
    opened: list[Store] = []

    def make(**kwargs: object) -> Store:
        store = Store(data_dir=tmp_path / "data", url=store_url, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def sql(store: Store, statement: Executable) -> object:
    """Run one statement on the store's database from a connection of the test's own."""
    engine = create_engine(store.database_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(statement)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Contrib:
    agent: str
    num_samples: float


def frame(value: float, *, n: int = 4) -> bytes:
    return encode({"w": np.full(n, value, np.float32), "steps": np.array([int(value)], np.int64)})


def start(store: Store, project: str = "p", name: str = "aggr1") -> AggregatorRef:
    agg = store.ensure_aggregator(project, name)
    store.record_base(agg, frame(0.0), framework="pytorch")
    return agg


def play_round(
    store: Store,
    agg: AggregatorRef,
    round: int,
    accuracies: dict[str, float],
    *,
    losses: dict[str, float] | None = None,
) -> None:
    """Each agent sends a model (value = its accuracy) and the round completes."""
    for i, (agent, acc) in enumerate(accuracies.items()):
        metrics = {"accuracy": acc}
        if losses is not None:
            metrics["loss_valid"] = losses[agent]
        store.record_local(
            agg,
            round=round,
            agent=agent,
            num_samples=10.0 * (i + 1),
            metrics=metrics,
            payload=frame(100 * round + acc),
        )
    store.complete_round(
        agg,
        round=round,
        payload=frame(round + 0.5),
        contributors=[Contrib(a, 10.0 * (i + 1)) for i, a in enumerate(accuracies)],
        method="fedavg",
        threshold=1.0,
        started=1000.0 + round,
        completed=1000.5 + round,
        bytes_in=300,
        bytes_out=100,
    )


# ============================================================================== schema
def test_schema_is_created_on_first_start_and_versioned(open_store: OpenStore) -> None:
    # Execute: a store that does not exist yet cannot be opened read-only; then create it.
    with pytest.raises(StoreError, match="no fedhive s"):
        open_store(create=False)
    store = open_store()
    # Assert: the version is recorded; a second open (read-only) finds it.
    assert store.schema_version == SCHEMA_VERSION
    assert open_store(create=False).schema_version == SCHEMA_VERSION


def test_a_newer_schema_version_is_refused(open_store: OpenStore) -> None:
    # Prepare: a store whose version row says it was written by a later fedhive.
    store = open_store()
    sql(store, update(SchemaInfoRow).values(version=SCHEMA_VERSION + 1))
    # Execute / Assert
    with pytest.raises(SchemaVersionError, match=f"version {SCHEMA_VERSION + 1}, newer"):
        open_store()


def test_sqlite_store_lives_in_the_data_dir(tmp_path: Path) -> None:
    with Store(data_dir=tmp_path / "d") as store:
        agg = start(store)
        info = store.list_models(kind=ModelKind.BASE)[0]
    assert (tmp_path / "d" / "fedhive.sqlite3").is_file()
    assert (tmp_path / "d" / "blobs" / info.sha256[:2] / info.sha256).is_file()
    assert agg.role == "aggregator"


def test_an_unreachable_database_is_a_store_error(tmp_path: Path) -> None:
    port = _free_port()
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(data_dir=tmp_path, url=f"postgresql://nobody@127.0.0.1:{port}/none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ============================================================================== recovery
def test_record_and_recover_the_open_round(open_store: OpenStore) -> None:
    # Prepare: a base model and two of three local models of round 1, then a "crash".
    store = open_store()
    agg = start(store)
    assert store.open_round_state(agg) is not None
    for agent, value in (("a1", 1.0), ("a2", 2.0)):
        store.record_local(
            agg,
            round=1,
            agent=agent,
            num_samples=value * 10,
            metrics={"accuracy": value / 10},
            payload=frame(value),
        )
    store.close()

    # Execute: a new process opens the store.
    store = open_store()
    agg = store.ensure_aggregator("p", "aggr1")
    state = store.open_round_state(agg)

    # Assert: same round, same model, both accepted models with their bytes and metrics.
    assert state is not None
    assert (state.model_round, state.open_round, state.model_kind) == (0, 1, ModelKind.BASE)
    assert state.model_payload == frame(0.0)
    assert state.framework == "pytorch"
    assert [(r.agent, r.num_samples, dict(r.metrics)) for r in state.locals] == [
        ("a1", 10.0, {"accuracy": 0.1}),
        ("a2", 20.0, {"accuracy": 0.2}),
    ]
    assert [r.payload for r in state.locals] == [frame(1.0), frame(2.0)]

    # Execute: the third arrives; the round completes with all three.
    store.record_local(agg, round=1, agent="a3", num_samples=30, metrics={}, payload=frame(3.0))
    store.complete_round(
        agg,
        round=1,
        payload=frame(7.0),
        contributors=[Contrib("a1", 10), Contrib("a2", 20), Contrib("a3", 30)],
        method="fedavg",
        threshold=1.0,
        started=1.0,
        completed=3.0,
        bytes_in=3 * len(frame(1.0)),
        bytes_out=len(frame(7.0)),
    )
    state = open_store().open_round_state(agg)

    # Assert: round 2 is open from round 1's model, with nothing collected yet.
    assert state is not None
    assert (state.model_round, state.open_round, state.model_kind) == (1, 2, ModelKind.GLOBAL)
    assert state.model_payload == frame(7.0)
    assert state.locals == ()
    [round1] = store.rounds(agg)
    assert round1.contributors == (("a1", 10.0), ("a2", 20.0), ("a3", 30.0))
    assert (round1.duration, round1.bytes_out) == (2.0, len(frame(7.0)))


_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from aggregator.store import Store
from common.codec import encode

store = Store(data_dir=Path(sys.argv[1]), url=sys.argv[2] or None)
agg = store.ensure_aggregator("p", "aggr1")
store.record_base(agg, encode({"w": np.zeros(4, np.float32)}), framework="numpy")
for i, agent in enumerate(("a1", "a2")):
    payload = encode({"w": np.full(4, i + 1, np.float32)})
    store.record_local(
        agg, round=1, agent=agent, num_samples=i + 1, metrics={"accuracy": i / 2}, payload=payload
    )
print("acked", flush=True)
time.sleep(60)
"""


def test_accepted_models_survive_kill_9(tmp_path: Path, store_url: str | None) -> None:
    # Prepare: a process records the base and two local models, says so, then is killed -9.
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "data"), store_url or ""],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    ) as writer:
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline() == b"acked\n"
        finally:
            writer.send_signal(signal.SIGKILL)

    # Execute: another process opens the store.
    with Store(data_dir=tmp_path / "data", url=store_url) as store:
        state = store.open_round_state(store.ensure_aggregator("p", "aggr1"))

    # Assert: round 1 is open with both models.
    assert state is not None
    assert state.open_round == 1
    assert [(r.agent, r.num_samples, decode(r.payload)[0]["w"][0]) for r in state.locals] == [
        ("a1", 1.0, 1.0),
        ("a2", 2.0, 2.0),
    ]


def test_nothing_is_recorded_twice(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    play_round(store, agg, 1, {"a1": 0.5})
    # A completed round cannot complete again, nor take more local models.
    with pytest.raises(StoreError, match="already complete"):
        play_round(store, agg, 1, {"a2": 0.5})
    with pytest.raises(StoreError, match="not open"):
        store.record_local(agg, round=3, agent="a1", num_samples=1, metrics={}, payload=frame(1))
    # A duplicate local model replaces nothing.
    first = store.record_local(
        agg, round=2, agent="a1", num_samples=1, metrics={"accuracy": 0.1}, payload=frame(1)
    )
    again = store.record_local(
        agg, round=2, agent="a1", num_samples=5, metrics={"accuracy": 0.9}, payload=frame(2)
    )
    assert again == first
    state = store.open_round_state(agg)
    assert state is not None
    assert [(r.agent, r.payload, dict(r.metrics)) for r in state.locals] == [
        ("a1", frame(1), {"accuracy": 0.1})
    ]
    assert [r.round for r in store.rounds(agg)] == [1]


def test_a_contributor_without_a_recorded_model_is_refused(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    store.record_local(agg, round=1, agent="a1", num_samples=1, metrics={}, payload=frame(1))
    with pytest.raises(StoreError, match="'ghost' has no recorded model"):
        store.complete_round(
            agg,
            round=1,
            payload=frame(2),
            contributors=[Contrib("a1", 1), Contrib("ghost", 1)],
            method="fedavg",
            threshold=1.0,
            started=0.0,
            completed=1.0,
            bytes_in=0,
            bytes_out=0,
        )
    assert store.rounds(agg) == []
    assert store.list_models(kind=ModelKind.GLOBAL) == []


def test_a_failing_complete_round_writes_nothing(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a round ready to complete; the best-model update (inside the transaction,
    # after the round, model and metric rows were added) fails.
    store = open_store()
    agg = start(store)
    store.record_local(
        agg, round=1, agent="a1", num_samples=1, metrics={"accuracy": 0.5}, payload=frame(1)
    )

    def boom(*_args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "_update_best", boom)
    kwargs = {
        "round": 1,
        "payload": frame(9),
        "contributors": [Contrib("a1", 1)],
        "method": "fedavg",
        "threshold": 1.0,
        "started": 0.0,
        "completed": 1.0,
        "bytes_in": 10,
        "bytes_out": 10,
    }
    # Execute
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.complete_round(agg, **kwargs)  # type: ignore[arg-type]

    # Assert: no round, no global model, no aggregator metrics; round 1 is still open.
    assert store.rounds(agg) == []
    assert store.list_models(kind=ModelKind.GLOBAL) == []
    assert sql(store, text("SELECT count(*) FROM metrics")) == 1  # a1's accuracy only
    assert sql(store, text("SELECT count(*) FROM contributions")) == 0
    state = store.open_round_state(agg)
    assert state is not None
    assert state.open_round == 1
    assert len(state.locals) == 1
    # ...and the round completes once the fault is gone.
    monkeypatch.undo()
    store.complete_round(agg, **kwargs)  # type: ignore[arg-type]
    assert [r.round for r in store.rounds(agg)] == [1]


def test_a_new_base_model(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    store.record_local(agg, round=1, agent="a1", num_samples=1, metrics={}, payload=frame(5))
    # The same base again is a no-op; a different one before any round replaces it and drops
    # the local models trained from the old one.
    assert store.record_base(agg, frame(0.0), framework="pytorch").round == 0
    store.record_base(agg, frame(-1.0), framework="pytorch")
    state = store.open_round_state(agg)
    assert state is not None
    assert state.model_payload == frame(-1.0)
    assert state.locals == ()
    assert not store.blobs.exists(sha256_of(frame(5)))
    # Once a round completed, a different base is a new federation: refused.
    play_round(store, agg, 1, {"a1": 0.5})
    with pytest.raises(StoreError, match="new federation"):
        store.record_base(agg, frame(-2.0), framework="pytorch")


# ============================================================================== best model
def test_best_model_accuracy_higher_is_better(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    with pytest.raises(ModelNotFoundError, match="'accuracy'"):
        store.best_model()
    play_round(store, agg, 1, {"a1": 0.50, "a2": 0.70})
    play_round(store, agg, 2, {"a1": 0.90, "a2": 0.60})
    play_round(store, agg, 3, {"a1": 0.80, "a2": 0.90})  # a tie: the first to reach it stays
    # Open round 4 holds a better model, not yet counted.
    store.record_local(
        agg, round=4, agent="a1", num_samples=1, metrics={"accuracy": 0.99}, payload=frame(99)
    )

    best = store.best_model()

    assert (best.kind, best.round, best.agent) == (ModelKind.LOCAL, 2, "a1")
    assert (best.metric, best.value) == ("accuracy", 0.90)
    info, payload = store.get_model("best")
    assert info == best
    assert payload == frame(200.90)


def test_best_model_loss_lower_is_better(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    play_round(store, agg, 1, {"a1": 0.5, "a2": 0.7}, losses={"a1": 0.4, "a2": 0.9})
    play_round(store, agg, 2, {"a1": 0.6, "a2": 0.8}, losses={"a1": 0.3, "a2": 0.2})

    best = store.best_model(metric="loss_valid")

    assert (best.round, best.agent, best.value) == (2, "a2", 0.2)
    assert lower_is_better("loss_valid")
    assert lower_is_better("loss")
    assert not lower_is_better("accuracy")
    assert not lower_is_better("lossless")


def test_best_metric_is_configurable(open_store: OpenStore) -> None:
    # The aggregator tracks loss_valid; a reader asking for it gets the tracked best.
    store = open_store(best_metric="loss_valid")
    agg = start(store)
    play_round(store, agg, 1, {"a1": 0.9, "a2": 0.1}, losses={"a1": 0.8, "a2": 0.3})
    assert store.rule == MetricRule("loss_valid", higher_is_better=False)
    assert store.best_model().agent == "a2"
    assert open_store().best_model(metric="loss_valid").agent == "a2"
    # Direction can be forced: a metric whose name does not say.
    assert open_store(best_metric="error", higher_is_better=False).rule.higher_is_better is False
    assert store.best_model(metric="accuracy").agent == "a1"


def test_metrics_per_round(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    play_round(store, agg, 1, {"a1": 0.5, "a2": 0.8})
    play_round(store, agg, 2, {"a1": 0.6, "a2": 0.9})

    rows = {(r.round, r.key): r for r in store.metrics(metric="accuracy")}
    aggregator_rows = {(r.round, r.key): r for r in store.metrics() if r.source == "aggregator"}

    r2 = rows[2, "accuracy"]
    assert (r2.count, r2.min, r2.max) == (2, 0.6, 0.9)
    assert r2.mean == pytest.approx(0.75)
    assert r2.global_value == pytest.approx((0.6 * 10 + 0.9 * 20) / 30)  # sample-weighted
    assert dict(r2.values) == {"a1": 0.6, "a2": 0.9}
    assert set(aggregator_rows) == {
        (r, k) for r in (1, 2) for k in ("bytes_in", "bytes_out", "duration")
    }
    assert aggregator_rows[1, "duration"].mean == pytest.approx(0.5)


# ============================================================================== retention
@pytest.mark.parametrize(
    ("keep", "kept_rounds"),
    [("all", {1, 2, 3}), ("none", set()), (2, {2, 3}), ("1", {3})],
)
def test_retention(open_store: OpenStore, keep: str | int, kept_rounds: set[int]) -> None:
    # Prepare: round 2 holds the best model (kept whatever the retention), round 3 is latest.
    store = open_store(keep_local=keep)
    agg = start(store)
    play_round(store, agg, 1, {"a1": 0.1, "a2": 0.2})
    play_round(store, agg, 2, {"a1": 0.3, "a2": 0.9})
    play_round(store, agg, 3, {"a1": 0.4, "a2": 0.5})

    locals_ = store.list_models(kind=ModelKind.LOCAL)

    # Assert: every record stays; only the kept ones (and the best) keep their bytes.
    assert len(locals_) == 6
    kept = {(m.round, m.agent) for m in locals_ if not m.pruned}
    expected = {(r, a) for r in kept_rounds for a in ("a1", "a2")} | {(2, "a2")}
    assert kept == expected
    for m in locals_:
        assert store.blobs.exists(m.sha256) is (not m.pruned)
    assert store.best_model().round == 2
    pruned = [m for m in locals_ if m.pruned]
    if pruned:
        with pytest.raises(ModelNotFoundError, match="pruned"):
            store.get_model(ModelKind.LOCAL, round=pruned[0].round, agent=pruned[0].agent)
    # Globals are never pruned.
    assert [m.pruned for m in store.list_models(kind=ModelKind.GLOBAL)] == [False] * 3


def test_retention_never_deletes_a_blob_still_referenced(open_store: OpenStore) -> None:
    # Prepare: the global model of round 1 has the very bytes of a local model.
    store = open_store(keep_local="none")
    agg = start(store)
    store.record_local(agg, round=1, agent="a1", num_samples=1, metrics={}, payload=frame(5))
    store.complete_round(
        agg,
        round=1,
        payload=frame(5),
        contributors=[Contrib("a1", 1)],
        method="fedavg",
        threshold=1.0,
        started=0.0,
        completed=1.0,
        bytes_in=0,
        bytes_out=0,
    )
    [local] = store.list_models(kind=ModelKind.LOCAL)
    # Assert: the local is pruned but the shared blob still serves the global model.
    assert local.pruned
    assert store.get_model(ModelKind.GLOBAL)[1] == frame(5)


def test_parse_retention() -> None:
    assert [parse_retention(v) for v in ("all", "NONE", "3", 0, 7)] == ["all", "none", 3, 0, 7]
    for bad in ("some", "-1", -1, True, "1.5"):
        with pytest.raises(StoreError):
            parse_retention(bad)


# ============================================================================== blobs
def _corrupt(store: Store, sha: str) -> None:
    path = store.blobs.path(sha)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_blob_is_reported_never_served(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    play_round(store, agg, 1, {"a1": 0.5})
    info = store.list_models(kind=ModelKind.GLOBAL)[0]
    _corrupt(store, info.sha256)

    with pytest.raises(CorruptBlobError, match=f"corrupted blob {info.sha256}") as caught:
        store.get_model(ModelKind.GLOBAL)
    assert caught.value.sha256 == info.sha256
    assert "sha256 mismatch" in str(caught.value)
    with pytest.raises(CorruptBlobError):
        store.open_round_state(agg)  # recovery never resumes from bad bytes either


def test_a_missing_blob_is_reported(open_store: OpenStore) -> None:
    store = open_store()
    start(store)
    info = store.list_models(kind=ModelKind.BASE)[0]
    store.blobs.delete(info.sha256)
    with pytest.raises(MissingBlobError, match="missing"):
        store.get_model(ModelKind.BASE)


def test_blob_store_is_content_addressed(tmp_path: Path) -> None:
    blobs = BlobStore(root=tmp_path / "blobs")
    payload = frame(3.0)
    sha = blobs.put(payload)
    assert sha == sha256_of(payload)
    assert blobs.put(memoryview(payload)) == sha
    assert blobs.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert blobs.get(sha) == payload
    assert list(blobs) == [sha]
    assert not [p for p in blobs.path(sha).parent.iterdir() if p.name.endswith(".tmp")]
    decoded, _ = decode(blobs.get(sha))
    assert decoded["w"].tolist() == [3.0] * 4
    with pytest.raises(StoreError, match="not a sha256"):
        blobs.path("../../etc/passwd")


# ============================================================================== queries
def test_list_and_get_filters(open_store: OpenStore) -> None:
    store = open_store()
    agg = start(store)
    other = start(store, name="aggr2")
    play_round(store, agg, 1, {"a1": 0.5, "a2": 0.6})
    play_round(store, agg, 2, {"a1": 0.7})
    play_round(store, other, 1, {"b1": 0.1})

    # Filters
    assert [m.kind for m in store.list_models(aggregator="aggr1", round=1)] == [
        ModelKind.LOCAL,
        ModelKind.LOCAL,
        ModelKind.GLOBAL,
    ]
    assert [(m.round, m.agent) for m in store.list_models(kind=ModelKind.LOCAL, agent="a1")] == [
        (1, "a1"),
        (2, "a1"),
    ]
    assert len(store.list_models(kind=ModelKind.BASE)) == 2
    assert store.list_models(project="elsewhere") == []

    # get_model: the latest unless a round is named; several aggregators must be told apart.
    with pytest.raises(StoreError, match="several aggregators"):
        store.get_model(ModelKind.GLOBAL)
    info, payload = store.get_model(ModelKind.GLOBAL, aggregator="aggr1")
    assert (info.round, payload) == (2, frame(2.5))
    info, _ = store.get_model(ModelKind.GLOBAL, aggregator="aggr1", round=1)
    assert info.round == 1
    assert info.num_samples == 30.0
    info, payload = store.get_model(ModelKind.LOCAL, aggregator="aggr1", round=1, agent="a2")
    assert payload == frame(100.6)
    assert info.framework == "pytorch"
    with pytest.raises(StoreError, match=r"several local models of round 1 \(a1, a2\)"):
        store.get_model(ModelKind.LOCAL, aggregator="aggr1", round=1)
    with pytest.raises(ModelNotFoundError, match="no global model of round 9"):
        store.get_model(ModelKind.GLOBAL, aggregator="aggr1", round=9)
    with pytest.raises(ModelNotFoundError, match="no sg aggregator"):
        store.get_model(ModelKind.SG)
    assert store.best_model(aggregator="aggr2").agent == "b1"


def test_sg_aggregator_rounds(open_store: OpenStore) -> None:
    # An sg-aggregator's contributors are aggregators sending regional models.
    store = open_store()
    sg = store.ensure_aggregator("p", "sg", role="sg")
    store.record_base(sg, frame(0.0), framework="numpy")
    for name, weight in (("aggr1", 30.0), ("aggr2", 10.0)):
        store.record_local(
            sg,
            round=1,
            agent=name,
            num_samples=weight,
            metrics={"accuracy": 0.5},
            payload=frame(weight),
            kind=ModelKind.REGIONAL,
        )
    store.complete_round(
        sg,
        round=1,
        payload=frame(25.0),
        contributors=[Contrib("aggr1", 30.0), Contrib("aggr2", 10.0)],
        method="fedavg",
        threshold=1.0,
        started=0.0,
        completed=1.0,
        bytes_in=0,
        bytes_out=0,
        kind=ModelKind.SG,
    )
    info, payload = store.get_model(ModelKind.SG)
    assert (info.round, info.num_samples, payload) == (1, 40.0, frame(25.0))
    state = store.open_round_state(sg)
    assert state is not None
    assert (state.model_kind, state.open_round) == (ModelKind.SG, 2)
    with pytest.raises(StoreError, match="recorded as role 'sg'"):
        store.ensure_aggregator("p", "sg")


# ============================================================================== under an SG
def test_an_aggregator_under_an_sg_resumes_sealed_then_from_the_adopted_sg_model(
    open_store: OpenStore,
) -> None:
    # Prepare: SG model 0 (the base), two local models of round 1, the regional result.
    store = open_store()
    agg = start(store)
    for agent, value in (("a1", 1.0), ("a2", 3.0)):
        store.record_local(
            agg, round=1, agent=agent, num_samples=value, metrics={}, payload=frame(value)
        )
    store.complete_round(
        agg,
        round=1,
        payload=frame(2.5),
        contributors=[Contrib("a1", 1.0), Contrib("a2", 3.0)],
        method="fedavg",
        threshold=1.0,
        started=0.0,
        completed=1.0,
        bytes_in=0,
        bytes_out=0,
        kind=ModelKind.REGIONAL,
    )

    # Execute: a crash before the SG model of round 1 arrived...
    sealed = open_store().open_round_state(agg)
    # ...then it arrives, and round 2 takes models.
    store.record_adopted(agg, round=1, payload=frame(2.0), base_sha256=sha256_of(frame(0.0)))
    store.record_local(agg, round=2, agent="a1", num_samples=1, metrics={}, payload=frame(4))
    adopted = open_store().open_round_state(agg)

    # Assert: sealed, the regional result kept; then the SG model serves round 2.
    assert sealed is not None
    assert sealed.sealed is not None
    assert (sealed.model_round, sealed.model_kind, sealed.open_round) == (0, ModelKind.BASE, 1)
    assert sealed.locals == ()
    assert (sealed.sealed.round, sealed.sealed.payload, sealed.sealed.method) == (
        1,
        frame(2.5),
        "fedavg",
    )
    assert sealed.sealed.contributors == (("a1", 1.0), ("a2", 3.0))
    assert adopted is not None
    assert adopted.sealed is None
    assert (adopted.model_round, adopted.model_kind, adopted.model_payload) == (
        1,
        ModelKind.SG,
        frame(2.0),
    )
    assert [r.agent for r in adopted.locals] == ["a1"]
    assert adopted.base_sha256 == sha256_of(frame(0.0))
    # `models download --kind sg` finds the adopted model without an sg-aggregator in the store.
    info, payload = store.get_model(ModelKind.SG)
    assert (info.aggregator, info.round, payload) == ("aggr1", 1, frame(2.0))


def test_adopted_sg_models_skip_rounds_and_refuse_other_federations(
    open_store: OpenStore,
) -> None:
    store = open_store()
    agg = start(store)
    base = sha256_of(frame(0.0))
    store.record_local(agg, round=1, agent="a1", num_samples=1, metrics={}, payload=frame(1))
    # The SG layer closed rounds 1-3 without this aggregator: round 4 is open.
    store.record_adopted(agg, round=3, payload=frame(3.0), base_sha256=base)
    assert store.record_adopted(agg, round=3, payload=frame(3.0)).round == 3  # the same: no-op
    with pytest.raises(StoreError, match="not open: the open round is 4"):
        store.record_local(agg, round=1, agent="a2", num_samples=1, metrics={}, payload=frame(1))
    store.record_local(agg, round=4, agent="a1", num_samples=1, metrics={}, payload=frame(4))
    state = store.open_round_state(agg)
    assert state is not None
    assert (state.model_round, state.open_round, [r.agent for r in state.locals]) == (3, 4, ["a1"])
    with pytest.raises(StoreError, match="not newer"):
        store.record_adopted(agg, round=2, payload=frame(2.0), base_sha256=base)
    with pytest.raises(StoreError, match="another federation"):
        store.record_adopted(agg, round=5, payload=frame(5.0), base_sha256="ab" * 32)
    with pytest.raises(StoreError, match="new federation"):
        store.record_base(agg, frame(-1.0), framework="pytorch")
    with pytest.raises(StoreError, match="SG model 0 is the base model"):
        store.record_adopted(agg, round=0, payload=frame(0.0))


def test_a_late_aggregator_starts_its_record_from_an_adopted_sg_model(
    open_store: OpenStore,
) -> None:
    # An aggregator that joined at SG round 5 never saw the base model.
    store = open_store()
    agg = store.ensure_aggregator("p", "late")
    with pytest.raises(StoreError, match="needs a framework"):
        store.record_adopted(agg, round=5, payload=frame(5.0))
    store.record_adopted(agg, round=5, payload=frame(5.0), framework="numpy", base_sha256="ab" * 32)
    store.record_local(agg, round=6, agent="a1", num_samples=2, metrics={}, payload=frame(6))
    state = store.open_round_state(agg)
    assert state is not None
    assert (state.model_round, state.open_round, state.base_sha256) == (5, 6, None)
    assert state.framework == "numpy"
    store.complete_round(
        agg,
        round=6,
        payload=frame(6.0),
        contributors=[Contrib("a1", 2)],
        method="fedavg",
        threshold=1.0,
        started=0.0,
        completed=1.0,
        bytes_in=0,
        bytes_out=0,
        kind=ModelKind.REGIONAL,
    )
    assert [r.round for r in store.rounds(agg)] == [6]


def test_whatever_the_engine_accepts_is_recordable(open_store: OpenStore) -> None:
    # A zero sample count (the model weighs nothing) and an empty metric name pass the wire
    # format and the round engine: recording them must not fail (it would stop the aggregator).
    store = open_store()
    agg = start(store)
    info = store.record_local(
        agg, round=1, agent="a1", num_samples=0, metrics={"": 0.5}, payload=frame(1)
    )
    assert info.num_samples == 0.0
    with pytest.raises(StoreError, match="finite number >= 0"):
        store.record_local(agg, round=1, agent="a2", num_samples=-1, metrics={}, payload=frame(2))
