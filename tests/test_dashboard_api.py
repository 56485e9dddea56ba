"""The dashboard's HTTP surface: login, sessions, CSRF, bearer tokens, the JSON API's shapes,
the OpenAPI document, downloads in every format, and control requests against a real
aggregator. The app runs under uvicorn in a background thread; requests go through httpx."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from support import broker_settings, running_aggregator

from aggregator.store import Store
from broker.process import MosquittoBroker
from broker.security import init_project, load_credentials
from common.codec import Array, decode, encode
from common.config import AggregatorConfig, BrokerSettings
from common.messages import (
    AgentInfo,
    AggregatorInfo,
    AggregatorLiveness,
    AggregatorState,
    AggStatusMessage,
    PresenceState,
    SgStatusMessage,
    encode_message,
)
from common.topics import Topics
from common.transport import Incoming, InMemoryBus, InMemoryTransport
from fedhive.dashboard.app import create_app
from fedhive.dashboard.cli import dashboard_command
from fedhive.dashboard.server import serving_in_thread
from fedhive.dashboard.settings import DashboardSettings

TOKEN = "a-test-token-of-some-length"
CSRF_INPUT = re.compile(r'name="csrf" value="([^"]+)"')


# ------------------------------------------------------------------ a recorded federation
@dataclass(frozen=True)
class Contribution:
    agent: str
    num_samples: float


def tiny_model(value: float) -> dict[str, Array]:
    return {
        "w": np.full((2, 3), value, dtype=np.float32),
        "b": np.arange(3, dtype=np.float32) + value,
        "steps": np.array(int(value), dtype=np.int64),
    }


@dataclass
class Recorded:
    """What :func:`populate_store` wrote: the models by (kind, round, agent)."""

    project: str
    aggregator: str
    rounds: int
    agents: tuple[str, ...]
    base: dict[str, Array] = field(default_factory=dict)
    globals: dict[int, dict[str, Array]] = field(default_factory=dict)
    locals: dict[tuple[int, str], dict[str, Array]] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Array]:
        """The best model by accuracy: the last round's global (measured on it, highest)."""
        return self.globals[self.rounds]


def populate_store(
    data_dir: Path,
    project: str,
    *,
    aggregator: str = "a1",
    rounds: int = 3,
    agents: tuple[str, ...] = ("agent0", "agent1"),
) -> Recorded:
    """A store as an aggregator leaves it after ``rounds`` rounds: base, local models with the
    agents' accuracy and loss, and each round's global model with an accuracy measured on it
    (the best model is the last round's global)."""
    recorded = Recorded(project, aggregator, rounds, agents, base=tiny_model(0))
    with Store(data_dir=data_dir) as store:
        ref = store.ensure_aggregator(project, aggregator)
        store.record_base(ref, encode(recorded.base), framework="numpy")
        started = time.time()
        for rnd in range(1, rounds + 1):
            for i, agent in enumerate(agents):
                model = tiny_model(rnd * 10 + i)
                recorded.locals[(rnd, agent)] = model
                store.record_local(
                    ref,
                    round=rnd,
                    agent=agent,
                    num_samples=10 + i,
                    metrics={"accuracy": 0.5 + 0.1 * rnd + 0.02 * i, "loss_training": 1.0 / rnd},
                    payload=encode(model),
                )
            recorded.globals[rnd] = tiny_model(rnd * 10 + 0.5)
            store.complete_round(
                ref,
                round=rnd,
                payload=encode(recorded.globals[rnd]),
                contributors=[Contribution(a, 10 + i) for i, a in enumerate(agents)],
                method="fedavg",
                threshold=1.0,
                started=started + rnd,
                completed=started + rnd + 0.25,
                bytes_in=1000 * rnd,
                bytes_out=500,
                metrics={"accuracy": 0.55 + 0.1 * rnd},
            )
    return recorded


def npz_arrays(data: bytes) -> dict[str, Array]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def assert_same(got: dict[str, Array], want: dict[str, Array]) -> None:
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array)
        assert got[name].dtype == array.dtype, name


# ------------------------------------------------------------------ the app under test
@contextmanager
def dashboard(
    settings: DashboardSettings, *, bus: InMemoryBus | None = None
) -> Iterator[httpx.Client]:
    """The dashboard served from a thread (on ``bus`` instead of a broker when given); a
    client without a session."""
    factory = None if bus is None else (lambda: InMemoryTransport(bus=bus))
    app = create_app(settings, transport_factory=factory)
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def offline_settings(tmp_path: Path, **values: Any) -> DashboardSettings:
    base: dict[str, Any] = {
        "project": "p1",
        "token": TOKEN,
        "data_dir": tmp_path / "store",
        "request_timeout": 0.5,
    }
    return DashboardSettings.create(**{**base, **values})


def log_in(client: httpx.Client, password: str = TOKEN) -> str:
    """Log in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    csrf = CSRF_INPUT.search(page.text)
    assert csrf is not None
    answer = client.post(
        "/login", data={"password": password, "csrf": csrf.group(1), "next": "/models"}
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/models"
    token = CSRF_INPUT.search(client.get("/").text)
    assert token is not None
    return token.group(1)


def retain(bus: InMemoryBus, topic: str, payload: bytes) -> None:
    bus.deliver(Incoming(topic, payload, retain=True))


def agg_status(
    project: str, name: str, *, agents: int = 2, round: int = 4, timeout: float = 30.0
) -> AggStatusMessage:
    return AggStatusMessage(
        project=project,
        sender=name,
        state=AggregatorState.ACTIVE,
        round=round,
        method="fedavg",
        threshold=0.5,
        agent_timeout=timeout,
        max_agents=0,
        max_rounds=0,
        active=agents,
        needed=1,
        collected=0,
        agents=[
            AgentInfo(name=f"agent{i}", state=PresenceState.ACTIVE, last_heartbeat=0.5)
            for i in range(agents)
        ],
    )


# ------------------------------------------------------------------ authentication
def test_unauthenticated_pages_redirect_and_api_and_downloads_answer_401(tmp_path: Path) -> None:
    # Prepare
    populate_store(tmp_path / "store", "p1")
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        # Execute
        pages = {
            path: client.get(path)
            for path in ("/", "/aggregation?aggregator=a1", "/settings", "/performance",
                         "/models", "/api-docs")
        }  # fmt: skip
        api = {
            path: client.get(path)
            for path in ("/api/overview", "/api/aggregators/a1", "/api/models", "/api/metrics",
                         "/api/models/best", "/api/openapi.json", "/api/events",
                         "/api/models/download?kind=best&format=npz")
        }  # fmt: skip
        post_api = client.post("/api/aggregators/a1/control", json={"command": "stop"})
        post_page = client.post("/control", data={"aggregator": "a1", "command": "stop"})
        wrong = client.get("/api/overview", headers={"Authorization": "Bearer nope"})

    # Assert
    for path, answer in pages.items():
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next=/"), path
    assert pages["/aggregation?aggregator=a1"].headers["location"] == (
        "/login?next=/aggregation%3Faggregator%3Da1"
    )
    for path, answer in api.items():
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith("Bearer"), path
        assert "attachment" not in answer.headers.get("content-disposition", "")
    assert post_api.status_code == 401
    assert post_page.status_code == 303
    assert post_page.headers["location"].startswith("/login")
    assert wrong.status_code == 401


def test_login_needs_the_password_and_the_form_token(tmp_path: Path) -> None:
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        # Execute: a wrong password, a post without the form's token, then the right one.
        page = client.get("/login")
        csrf_match = CSRF_INPUT.search(page.text)
        assert csrf_match is not None
        csrf = csrf_match.group(1)
        wrong = client.post("/login", data={"password": "guess", "csrf": csrf})
        forged = client.post("/login", data={"password": TOKEN})
        before = client.get("/")
        ok = client.post("/login", data={"password": TOKEN, "csrf": csrf, "next": "//evil.example"})
        after = client.get("/")

    # Assert
    assert wrong.status_code == 401
    assert "Wrong password" in wrong.text
    assert forged.status_code == 403
    assert before.status_code == 303
    assert ok.status_code == 303
    assert ok.headers["location"] == "/"  # never another site
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert after.status_code == 200
    assert "Overview" in after.text


def test_every_post_needs_the_session_csrf_token(tmp_path: Path) -> None:
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        csrf = log_in(client)
        # Execute
        no_token = client.post("/control", data={"aggregator": "a1", "command": "stop"})
        bad_token = client.post(
            "/control", data={"aggregator": "a1", "command": "stop", "csrf": "x" * 43}
        )
        logout_forged = client.post("/logout")
        api_no_header = client.post("/api/aggregators/a1/control", json={"command": "stop"})
        api_header = client.post(
            "/api/aggregators/a1/control",
            json={"command": "stop"},
            headers={"X-CSRF-Token": csrf},
        )
        still_in = client.get("/")
        logout = client.post("/logout", data={"csrf": csrf})
        out = client.get("/")

    # Assert
    assert no_token.status_code == 403
    assert bad_token.status_code == 403
    assert logout_forged.status_code == 403
    assert api_no_header.status_code == 403
    # With the header the request goes out: nobody answers on this bus, in time.
    assert api_header.status_code == 504
    assert "no aggregator 'a1' answered" in api_header.json()["detail"]
    assert still_in.status_code == 200
    assert logout.status_code == 303
    assert out.status_code == 303


def test_bearer_token_opens_the_api_without_a_session(tmp_path: Path) -> None:
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        # Execute
        overview = client.get("/api/overview", headers=auth)
        control = client.post("/api/aggregators/a1/control", json={"command": "stop"}, headers=auth)
        bad_value = client.post(
            "/api/aggregators/a1/control",
            json={"command": "set_threshold", "value": "high"},
            headers=auth,
        )
        page = client.get("/", headers=auth)

    # Assert
    assert overview.status_code == 200
    assert overview.json()["connected"] is True
    assert control.status_code == 504  # no CSRF needed with a token; nobody answers
    assert bad_value.status_code == 400
    assert "set_threshold takes a number" in bad_value.json()["detail"]
    assert page.status_code == 303  # pages want a session


def test_settings_need_a_password_and_read_the_admin_password(tmp_path: Path) -> None:
    # Prepare
    credentials = init_project(
        tmp_path / "broker", project="proj", admins=("admin", "dashboard"), aggregators=("a1",)
    )

    # Execute
    settings = DashboardSettings.from_credentials(tmp_path / "broker", port=1999)
    runner = CliRunner()
    refused = runner.invoke(dashboard_command, [], env={"FEDHIVE_DASHBOARD_TOKEN": ""})

    # Assert
    assert settings.project == "proj"
    assert settings.admin_user == "dashboard"  # its own account: the CLI may run beside it
    assert settings.broker.username == "dashboard"
    assert settings.broker.password == credentials.account("dashboard").password
    assert settings.passwords() == [load_credentials(tmp_path / "broker").account("admin").password]
    assert refused.exit_code == 1
    assert "the dashboard needs a password" in refused.output


# ------------------------------------------------------------------ the API's shapes
def test_overview_and_status_api_show_what_the_broker_retains(tmp_path: Path) -> None:
    # Prepare: retained statuses on the bus before the dashboard subscribes.
    bus = InMemoryBus()
    topics = Topics("p1")
    retain(bus, topics.agg_status("a1"), encode_message(agg_status("p1", "a1", agents=3)))
    never = agg_status("p1", "a2", round=2, timeout=float("inf"))
    retain(bus, topics.agg_status("a2"), encode_message(never))
    retain(bus, topics.agg_status("a3"), encode_message(agg_status("p1", "other", round=9)))
    sg = SgStatusMessage(
        project="p1",
        sender="sg",
        state=AggregatorState.ACTIVE,
        round=5,
        method="fedavg",
        threshold=1.0,
        aggregator_timeout=30.0,
        alive=2,
        counted=2,
        needed=2,
        collected=1,
        regional_from=["a1"],
        aggregators=[AggregatorInfo(name="a1", state=AggregatorLiveness.ALIVE, round=4)],
    )
    retain(bus, topics.sg_status(), encode_message(sg))
    with dashboard(offline_settings(tmp_path), bus=bus) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        # Execute
        overview = client.get("/api/overview", headers=auth).json()
        one = client.get("/api/aggregators/a1", headers=auth)
        missing = client.get("/api/aggregators/zz", headers=auth)
        sg_answer = client.get("/api/sg", headers=auth)
        log_in(client)
        page = client.get("/")
        with client.stream("GET", "/api/events?agents=none", headers=auth) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            assert next(lines) == "event: snapshot"
            event = json.loads(next(lines).removeprefix("data: "))

    # Assert: a status under another aggregator's topic is ignored.
    assert [s["sender"] for s in overview["aggregators"]] == ["a1", "a2"]
    assert overview["aggregators"][1]["agent_timeout"] is None  # JSON has no infinity: never
    assert overview["sg"]["round"] == 5
    assert overview["project"] == "p1"
    assert one.status_code == 200
    status = AggStatusMessage.model_validate(one.json())
    assert status.round == 4
    assert [a.name for a in status.agents] == ["agent0", "agent1", "agent2"]
    assert missing.status_code == 404
    assert SgStatusMessage.model_validate(sg_answer.json()).regional_from == ["a1"]
    assert '<section class="panel" id="sg-panel">' in page.text  # shown, not hidden
    assert "1 of 2 needed (a1)" in page.text
    assert page.text.count('<tr data-aggregator="') == 2
    assert [s["sender"] for s in event["aggregators"]] == ["a1", "a2"]
    assert all(s["agents"] == [] for s in event["aggregators"])  # agents=none
    assert event["server_time"] > 0


def test_models_metrics_and_best_model_api(tmp_path: Path) -> None:
    # Prepare
    recorded = populate_store(tmp_path / "store", "p1", rounds=3)
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        # Execute
        models = client.get("/api/models", headers=auth).json()
        local = client.get("/api/models", params={"kind": "local", "round": 2}, headers=auth).json()
        best = client.get("/api/models/best", headers=auth).json()
        metrics = client.get("/api/metrics", params={"aggregator": "a1"}, headers=auth).json()
        bad_kind = client.get("/api/models", params={"kind": "nope"}, headers=auth)
        no_such = client.get("/api/metrics", params={"aggregator": "zz"}, headers=auth)

    # Assert
    # base + 3 × (2 local + 1 global), newest first
    assert len(models) == 1 + 3 * 3
    assert (models[0]["kind"], models[0]["round"]) == ("global", 3)
    assert models[-1]["kind"] == "base"
    assert {m["agent"] for m in local} == set(recorded.agents)
    assert (best["kind"], best["round"], best["metric"]) == ("global", 3, "accuracy")
    assert best["value"] == pytest.approx(0.85)
    assert metrics["aggregator"] == "a1"
    assert metrics["best"]["round"] == 3
    accuracy = [s for s in metrics["summaries"] if s["key"] == "accuracy"]
    assert [s["round"] for s in accuracy] == [1, 2, 3]
    assert accuracy[0]["global"] == pytest.approx(0.65)  # measured on the model
    assert accuracy[0]["values"] == {"agent0": pytest.approx(0.6), "agent1": pytest.approx(0.62)}
    assert {p["source"] for p in metrics["points"]} == {"agent", "aggregator", "model"}
    assert bad_kind.status_code == 400
    assert no_such.status_code == 404


@pytest.mark.parametrize("fmt", ["npz", "keras", "msgpack", "pytorch"])
def test_downloads_in_every_format_load_back(tmp_path: Path, fmt: str) -> None:
    # Prepare
    recorded = populate_store(tmp_path / "store", "p1", rounds=2)
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        csrf = log_in(client)
        assert csrf
        # Execute: with the session, as the Models page's links do.
        best = client.get("/api/models/download", params={"kind": "best", "format": fmt})
        local = client.get(
            "/api/models/download",
            params={"kind": "local", "round": 1, "agent": "agent1", "format": fmt},
        )
        base = client.get("/api/models/download", params={"kind": "base", "format": fmt})
        pruned_or_missing = client.get("/api/models/download", params={"kind": "sg", "format": fmt})

    # Assert
    for answer in (best, local, base):
        assert answer.status_code == 200, answer.text
        assert "attachment" in answer.headers["content-disposition"]
    assert 'filename="best-p1-a1-global-r2' in best.headers["content-disposition"]
    assert best.headers["x-fedhive-round"] == "2"
    assert pruned_or_missing.status_code == 404
    loaded = {name: load(answer.content, fmt) for name, answer in
              (("best", best), ("local", local), ("base", base))}  # fmt: skip
    assert_same(loaded["best"], recorded.best)
    assert_same(loaded["local"], recorded.locals[(1, "agent1")])
    assert_same(loaded["base"], recorded.base)


def load(data: bytes, fmt: str) -> dict[str, Array]:
    """A downloaded file read back as the CLI's formats are read."""
    if fmt == "msgpack":
        tensors, _ = decode(data)
        return {k: np.array(v) for k, v in tensors.items()}
    if fmt == "pytorch":
        import torch

        state = torch.load(io.BytesIO(data), weights_only=True)
        return {k: v.numpy() for k, v in state.items()}
    return npz_arrays(data)


def test_openapi_documents_the_api_and_nothing_comes_from_a_cdn(tmp_path: Path) -> None:
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        log_in(client)
        # Execute
        spec = client.get("/api/openapi.json").json()
        docs = client.get("/docs")
        pages = {p: client.get(p) for p in ("/", "/aggregation", "/settings", "/performance",
                                             "/models", "/api-docs")}  # fmt: skip
        assets = [client.get(p) for p in ("/static/dashboard.css", "/static/dashboard.js")]

    # Assert
    assert spec["info"]["title"] == "fedhive dashboard"
    for path in ("/api/overview", "/api/aggregators/{name}", "/api/aggregators/{name}/control",
                 "/api/models", "/api/models/best", "/api/models/download", "/api/metrics",
                 "/api/events", "/api/sg"):  # fmt: skip
        assert path in spec["paths"], path
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert docs.status_code == 404  # FastAPI's viewer would load its scripts from a CDN
    for path, page in pages.items():
        assert page.status_code == 200, path
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for url in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert not re.match(r"^(https?:)?//", url), (path, url)
    assert "/api/overview" in pages["/api-docs"].text
    assert all(a.status_code == 200 for a in assets)


def test_pages_show_the_store_and_say_when_nothing_was_recorded(tmp_path: Path) -> None:
    with dashboard(offline_settings(tmp_path), bus=InMemoryBus()) as client:
        log_in(client)
        empty = client.get("/performance")
        populate_store(tmp_path / "store", "p1", rounds=3)
        performance = client.get("/performance")
        models = client.get("/models", params={"kind": "local", "agent": "agent0"})

    assert "nothing recorded yet: no fedhive store" in empty.text
    assert performance.status_code == 200
    assert 'data-metric="accuracy"' in performance.text
    assert '<g class="best">' in performance.text  # the best model is marked on its chart
    assert 'id="best-round">3<' in performance.text
    assert models.text.count("kind=local") == 3 * 4  # 3 rounds × 4 formats


# ------------------------------------------------------------------ against a real aggregator
@pytest.mark.broker
def test_control_api_goes_through_the_aggregator(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare
    config = AggregatorConfig(
        name="a1",
        project=project_name,
        broker=broker_settings(mosquitto),
        data_dir=tmp_path / "agg",
        monitor_interval=0.2,
    )
    settings = DashboardSettings.create(
        project=project_name,
        broker=BrokerSettings(host=mosquitto.host, port=mosquitto.port, username="admin"),
        token=TOKEN,
        data_dir=tmp_path / "store",
        request_timeout=10,
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_aggregator(config), dashboard(settings) as client:
        # Execute
        ok = client.post(
            "/api/aggregators/a1/control",
            json={"command": "set_threshold", "value": 0.5},
            headers=auth,
        )
        refused = client.post(
            "/api/aggregators/a1/control",
            json={"command": "set_threshold", "value": 1.5},
            headers=auth,
        )
        status = client.get("/api/aggregators/a1", headers=auth)

    # Assert
    assert ok.status_code == 200, ok.text
    reply = ok.json()["reply"]
    assert reply["ok"] is True
    assert "threshold 1 -> 0.5" in reply["detail"]
    assert reply["status"]["threshold"] == 0.5
    assert refused.status_code == 409
    assert refused.json()["reply"]["ok"] is False
    # The reply's status is the dashboard's latest at once.
    assert status.json()["threshold"] == 0.5
