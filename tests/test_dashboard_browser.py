"""The dashboard in a real headless Chromium (Debian's ``chromium`` driven by Playwright) over a
real federation: Mosquitto, an in-process aggregator, in-process agents (BasicClient with NumPy
models) and a store.

The store is populated directly (``Store.record_base/record_local/complete_round``, see
``populate_store`` in test_dashboard_api.py): the aggregator service does not write the store
yet. Live statuses and control requests go through the broker and the running aggregator.

Each test writes a 1280×800 screenshot of the pages it visits to ``artifacts/screenshots/``.
Written as plain sync tests: Playwright's sync API must not run inside an event loop.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from support import ROOT, broker_settings, running_aggregator
from test_dashboard_api import TOKEN, Recorded, assert_same, npz_arrays, populate_store

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient, LoopThread
from broker.process import MosquittoBroker
from common.codec import Array
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
from common.transport import MqttTransport
from fedhive.dashboard.app import create_app
from fedhive.dashboard.server import serving_in_thread
from fedhive.dashboard.settings import DashboardSettings

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}
#: Playwright waits (ms) for what the broker and the aggregator do.
WAIT = 20_000

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="playwright is not installed: pip install playwright",
    ),
]


# ------------------------------------------------------------------ the federation
def base_model() -> dict[str, Array]:
    return {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


@dataclass
class Federation:
    broker: MosquittoBroker
    project: str
    url: str
    clients: dict[str, BasicClient]
    recorded: Recorded

    def train_round(self, *names: str, wait: bool = True) -> None:
        """The named agents (all by default) each send one trained model and, with ``wait``,
        wait for the next model (the round must complete)."""
        chosen = [c for name, c in self.clients.items() if not names or name in names]
        threads = [
            threading.Thread(target=self._train, args=(c, wait), daemon=True) for c in chosen
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "an agent did not get its ack or model in time"

    @staticmethod
    def _train(client: BasicClient, wait: bool) -> None:
        model = {k: np.asarray(v + 1, v.dtype) for k, v in base_model().items()}
        client.send_trained_model(model, {"accuracy": 0.9, "loss_training": 0.1}, num_samples=8)
        if wait:
            client.wait_for_sg_model(timeout=60)


@pytest.fixture
def federation(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> Iterator[Federation]:
    """Aggregator a1 (threshold 1.0) with two connected agents at round 1, a store recorded
    for three rounds, and the dashboard serving both."""
    config = AggregatorConfig(
        name="a1",
        project=project_name,
        broker=broker_settings(mosquitto),
        data_dir=tmp_path / "agg",
        threshold=1.0,
        monitor_interval=0.2,
        status_interval=1.0,
    )
    recorded = populate_store(tmp_path / "store", project_name, rounds=3)
    settings = DashboardSettings.create(
        project=project_name,
        broker=BrokerSettings(host=mosquitto.host, port=mosquitto.port, username="admin"),
        token=TOKEN,
        data_dir=tmp_path / "store",
        request_timeout=15,
    )
    clients: dict[str, BasicClient] = {}
    with running_aggregator(config), serving_in_thread(create_app(settings)) as url:
        try:
            AdminAgent(
                aggregator_ip_address=mosquitto.host,
                reg_port=mosquitto.port,
                project=project_name,
                aggregator="a1",
                timeout=30,
                base_model=BaseModel("tiny", base_model(), BaseModelConvFormat.numpy_format),
            ).initialize()
            for i in range(2):
                client = BasicClient(
                    aggregator_ip_address=mosquitto.host,
                    reg_port=mosquitto.port,
                    agent_name=f"agent{i}",
                    project=project_name,
                    aggregator="a1",
                    heartbeat_interval=0.5,
                    model_timeout=30,
                    ack_timeout=15,
                )
                clients[f"agent{i}"] = client
                client.set_bm_obj(base_model())
                client.wait_for_sg_model()
            yield Federation(mosquitto, project_name, url, clients, recorded)
        finally:
            for client in clients.values():
                client.disconnect()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, federation: Federation) -> Iterator[Page]:
    """A logged-in page at 1280×800."""
    context = browser.new_context(
        base_url=federation.url,
        viewport=VIEWPORT,
        accept_downloads=True,  # type: ignore[arg-type]
    )
    page = context.new_page()
    log_in(page)
    try:
        yield page
    finally:
        context.close()


def log_in(page: Page, password: str = TOKEN) -> None:
    from playwright.sync_api import expect

    page.goto("/login")
    page.fill("#password", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Overview", timeout=WAIT)


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# ------------------------------------------------------------------ acceptance 1 and 2
def test_log_in_and_every_page_at_1280x800(browser: Browser, federation: Federation) -> None:
    from playwright.sync_api import expect

    # Prepare: one round trained, so the agent table says when each agent last submitted.
    federation.train_round()
    context = browser.new_context(base_url=federation.url, viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    try:
        # Execute: log in through the form.
        page.goto("/aggregation?aggregator=a1")
        expect(page).to_have_url(f"{federation.url}/login?next=/aggregation%3Faggregator%3Da1")
        screenshot(page, "0-login")
        page.fill("#password", "not the password")
        page.click("button[type=submit]")
        expect(page.locator("#login-error")).to_have_text("Wrong password.")
        page.fill("#password", TOKEN)
        page.click("button[type=submit]")

        # Assert: back where it was going, then every page.
        expect(page.locator("h1")).to_have_text("Aggregation Management", timeout=WAIT)
        expect(page.locator("#round")).to_have_text("2", timeout=WAIT)
        expect(page.locator("#agent-rows tr")).to_have_count(2)
        expect(page.locator("#agent-rows")).to_contain_text("agent1")
        screenshot(page, "2-aggregation")

        page.goto("/")
        row = page.locator('#agg-rows tr[data-aggregator="a1"]')
        expect(row.locator('[data-field="round"]')).to_have_text("2", timeout=WAIT)
        expect(row).to_contain_text("ACTIVE")
        expect(page.locator("#conn-text")).to_have_text("broker connected", timeout=WAIT)
        screenshot(page, "1-overview")

        page.goto("/performance")
        expect(page.locator("h1")).to_have_text("Performance Tracking")
        expect(page.locator("section[data-metric] svg")).to_have_count(5)  # 2 agent + 3 own
        expect(page.locator("svg g.best")).to_have_count(1)  # the best model, marked
        expect(page.locator("#best-round")).to_have_text("3")
        screenshot(page, "3-performance")

        page.goto("/settings")
        expect(page.locator("#threshold")).to_have_text("1", timeout=WAIT)
        expect(page.locator("#method")).to_have_text("fedavg")
        screenshot(page, "4-settings")

        page.goto("/models")
        expect(page.locator("#models tbody tr")).to_have_count(1 + 3 * 3)
        screenshot(page, "5-models")

        page.goto("/api-docs")
        expect(page.locator("#operations")).to_contain_text("/api/models/download")
        screenshot(page, "6-api")
    finally:
        context.close()

    for name in ("0-login", "1-overview", "2-aggregation", "3-performance", "4-settings",
                 "5-models", "6-api"):  # fmt: skip
        shot = SCREENSHOTS / f"{name}.png"
        assert shot.stat().st_size > 5_000, name
        # PNG: width and height at bytes 16..24
        header = shot.read_bytes()[16:24]
        assert (int.from_bytes(header[:4]), int.from_bytes(header[4:])) == (1280, 800)


def test_round_number_advances_live_while_the_federation_runs(
    page: Page, federation: Federation
) -> None:
    from playwright.sync_api import expect

    # Prepare
    page.goto("/aggregation?aggregator=a1")
    expect(page.locator("#round")).to_have_text("1", timeout=WAIT)
    expect(page.locator("#active")).to_have_text("2", timeout=WAIT)
    page.evaluate("window.__notReloaded = true")

    for expected in ("2", "3", "4"):
        # Execute: both agents train a round.
        federation.train_round()
        # Assert: the page follows without being reloaded.
        expect(page.locator("#round")).to_have_text(expected, timeout=WAIT)
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#agent-rows")).to_contain_text("3")  # last round submitted


def test_complete_round_button_advances_the_round(page: Page, federation: Federation) -> None:
    from playwright.sync_api import expect

    # Prepare: one of the two agents sent its model (threshold 1.0: the round waits).
    page.goto("/aggregation?aggregator=a1")
    expect(page.locator("#round")).to_have_text("1", timeout=WAIT)
    federation.train_round("agent0", wait=False)
    expect(page.locator("#collected")).to_have_text("1", timeout=WAIT)
    expect(page.locator("#needed")).to_have_text("2")
    button = page.locator('button[data-command="complete_round"]')
    expect(button).to_be_enabled()

    # Execute
    button.click()

    # Assert: the aggregator's reply, and the next round.
    expect(page.locator("#reply")).to_contain_text(
        "a1 answered: round 1 aggregated with fedavg from 1 model(s); round 2 open", timeout=WAIT
    )
    expect(page.locator("#round")).to_have_text("2", timeout=WAIT)
    expect(page.locator("#collected")).to_have_text("0")
    screenshot(page, "7-complete-round")


def test_threshold_change_shows_the_reply_and_the_new_value(
    page: Page, federation: Federation
) -> None:
    from playwright.sync_api import expect

    # Prepare
    page.goto("/settings?aggregator=a1")
    expect(page.locator("#threshold")).to_have_text("1", timeout=WAIT)

    # Execute
    form = page.locator("#form-set_threshold")
    form.locator("input[name=value]").fill("0.5")
    form.locator("button[type=submit]").click()

    # Assert
    expect(page.locator("#reply")).to_contain_text(
        "a1 answered: threshold 1 -> 0.5: 2 active, 1 needed", timeout=WAIT
    )
    expect(page.locator("#reply")).to_have_class("flash ok")
    expect(page.locator("#threshold")).to_have_text("0.5")
    screenshot(page, "8-threshold-changed")

    # A refused value: the aggregator says why.
    form.locator("input[name=value]").fill("0")
    form.locator("button[type=submit]").click()
    expect(page.locator("#reply")).to_have_class("flash error", timeout=WAIT)
    expect(page.locator("#reply")).to_contain_text("a1 refused set threshold")
    expect(page.locator("#threshold")).to_have_text("0.5")


def test_download_the_best_model_and_load_it(
    page: Page, federation: Federation, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    # Prepare
    page.goto("/models")
    best = page.locator("#quick-a1-best")
    expect(best).to_contain_text("round 3")

    # Execute: npz from the Models page, pytorch from the Performance page's best card.
    with page.expect_download() as npz_download:
        best.locator('a[data-format="npz"]').click()
    npz_path = tmp_path / npz_download.value.suggested_filename
    npz_download.value.save_as(npz_path)
    page.goto("/performance")
    with page.expect_download() as pt_download:
        page.locator('#best a[data-format="pytorch"]').click()
    pt_path = tmp_path / pt_download.value.suggested_filename
    pt_download.value.save_as(pt_path)

    # Assert: both load, and are the model the store ranks best.
    assert npz_path.name == f"best-{federation.project}-a1-global-r3.npz"
    assert_same(npz_arrays(npz_path.read_bytes()), federation.recorded.best)
    import torch

    state = torch.load(pt_path, weights_only=True)
    assert_same({k: v.numpy() for k, v in state.items()}, federation.recorded.best)


def test_unauthenticated_requests_get_401_or_the_login_page(
    browser: Browser, federation: Federation
) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(base_url=federation.url, viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    try:
        for path in ("/", "/aggregation", "/performance", "/settings", "/models", "/api-docs"):
            page.goto(path)
            expect(page).to_have_url(f"{federation.url}/login?next={path}")
            expect(page.locator("#password")).to_be_visible()
        api = {
            path: page.request.get(path, max_redirects=0)
            for path in ("/api/overview", "/api/aggregators/a1", "/api/metrics",
                         "/api/openapi.json",
                         "/api/models/download?kind=best&format=npz",
                         "/api/models/download?kind=global&format=pytorch")
        }  # fmt: skip
        control = page.request.post(
            "/api/aggregators/a1/control", data={"command": "stop"}, max_redirects=0
        )
        form = page.request.post(
            "/control", form={"aggregator": "a1", "command": "stop"}, max_redirects=0
        )
    finally:
        context.close()

    for path, answer in api.items():
        assert answer.status == 401, path
    assert control.status == 401
    assert form.status == 303
    assert form.headers["location"].startswith("/login")


# ------------------------------------------------------------------ acceptance 3
def test_200_agents_render_in_under_a_second(page: Page, federation: Federation) -> None:
    from playwright.sync_api import expect

    # Prepare: an aggregator's status and its table of 200 agents, retained on the broker.
    sg_topic = Topics(federation.project).sg_status()
    settings = broker_settings(federation.broker)
    publish_status(settings, big_status(federation.project, round=7))
    # The browser notes when the rows are there and when round 8 shows (its own clock, in ms
    # since the navigation started): Playwright's polling would add up to its interval.
    page.add_init_script(RENDER_WATCH)
    try:
        # Execute: load the page; then a new status arrives while it is open.
        page.goto("/aggregation?aggregator=big")
        expect(page.locator("#agent-rows tr")).to_have_count(200, timeout=WAIT)
        loaded = page.evaluate("window.__rowsShown") / 1000
        timing = page.evaluate(
            "(() => { const n = performance.getEntriesByType('navigation')[0];"
            " return {load: n.loadEventEnd, dom: n.domContentLoadedEventEnd}; })()"
        )
        screenshot(page, "9-aggregation-200-agents")
        sent = page.evaluate("performance.now()")
        publish_status(settings, big_status(federation.project, round=8))
        expect(page.locator("#round")).to_have_text("8", timeout=WAIT)
        updated = (page.evaluate("window.__round8Shown") - sent) / 1000
        expect(page.locator("#agent-rows tr")).to_have_count(200)
        expect(page.locator("#agent-rows")).to_contain_text("TIMEOUT")

        publish(settings, sg_topic, encode_message(sg_status(federation.project)))
        page.goto("/")
        expect(page.locator('#agg-rows tr[data-aggregator="big"]')).to_contain_text("180")
        expect(page.locator("#sg-body")).to_contain_text("1 of 2 needed (a1)", timeout=WAIT)
        overview = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        screenshot(page, "10-overview-with-sg-layer")
    finally:
        topics = Topics(federation.project)  # clear the retained statuses
        publish_many(
            settings,
            [(topics.agg_status("big"), b""), (topics.agg_agents("big"), b""), (sg_topic, b"")],
        )

    # Assert
    assert timing["load"] < 1000, timing
    assert loaded < 1.0, loaded
    assert updated < 1.0, updated
    assert overview < 1000, overview


#: Records (performance.now(), ms) when the 200 agent rows first show and when round 8 does.
RENDER_WATCH = """
new MutationObserver(() => {
  if (window.__rowsShown === undefined
      && document.querySelectorAll('#agent-rows tr').length >= 200) {
    window.__rowsShown = performance.now();
  }
  const round = document.getElementById('round');
  if (window.__round8Shown === undefined && round && round.textContent.trim() === '8') {
    window.__round8Shown = performance.now();
  }
}).observe(document, {childList: true, subtree: true, characterData: true});
"""


def big_status(project: str, *, round: int) -> AggStatusMessage:
    states = [PresenceState.ACTIVE] * 180 + [PresenceState.TIMEOUT] * 15
    states += [PresenceState.OFFLINE] * 5
    return AggStatusMessage(
        project=project,
        sender="big",
        state=AggregatorState.ACTIVE,
        round=round,
        method="fedavg",
        threshold=0.8,
        agent_timeout=30.0,
        max_agents=250,
        max_rounds=0,
        active=180,
        needed=144,
        collected=round * 3 % 144,
        agents=[
            AgentInfo(
                name=f"edge-{i:03d}",
                state=state,
                last_heartbeat=(i % 17) * 0.3,
                last_round=round - 1 if state is PresenceState.ACTIVE else None,
            )
            for i, state in enumerate(states)
        ],
    )


def sg_status(project: str) -> SgStatusMessage:
    return SgStatusMessage(
        project=project,
        sender="sg",
        state=AggregatorState.ACTIVE,
        round=8,
        method="fedavg",
        threshold=1.0,
        aggregator_timeout=30.0,
        alive=2,
        counted=2,
        needed=2,
        collected=1,
        regional_from=["a1"],
        aggregators=[
            AggregatorInfo(name="a1", state=AggregatorLiveness.ALIVE, last_status=0.4, round=1,
                           agents=2, last_round=7),
            AggregatorInfo(name="big", state=AggregatorLiveness.ALIVE, last_status=0.2, round=8,
                           agents=180, last_round=7),
        ],
    )  # fmt: skip


def publish(settings: BrokerSettings, topic: str, payload: bytes) -> None:
    """Publish one retained message and wait for the ack."""
    publish_many(settings, [(topic, payload)])


def publish_status(settings: BrokerSettings, status: AggStatusMessage) -> None:
    """Publish a status as its aggregator does: the agent table, then the status without it."""
    bare, table = status.split()
    topics = Topics(status.project)
    publish_many(
        settings,
        [
            (topics.agg_agents(status.sender), encode_message(table)),
            (topics.agg_status(status.sender), encode_message(bare)),
        ],
    )


def publish_many(settings: BrokerSettings, messages: list[tuple[str, bytes]]) -> None:
    """Publish retained messages in order over one connection, each acknowledged."""

    async def send() -> None:
        async with MqttTransport(settings=settings) as transport:
            for topic, payload in messages:
                await transport.publish(topic, payload, retain=True)

    loop = LoopThread("publisher")
    try:
        loop.run(send(), timeout=15)
    finally:
        loop.close()
