"""Shared pytest fixtures for fedhive's tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.process import MosquittoBroker

# =================================================================================================
# Broker fixtures (broker/): a real Mosquitto on loopback, started from the repo's mosquitto.conf
# template through the same code as `fedhive broker start`.
# =================================================================================================


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker for the whole session, on a free port; tests keep apart by ``project_name``.

    Do not stop, kill or restart it: use ``fresh_broker`` for that.
    """
    broker = MosquittoBroker(data_dir=tmp_path_factory.mktemp("mosquitto"))
    with broker:
        yield broker


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of the test's own (own port and data dir), free to be killed and restarted."""
    broker = MosquittoBroker(data_dir=tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        # stop() is a no-op after the test stopped or killed it.
        broker.stop()


@pytest.fixture
def project_name() -> str:
    """A project name unique to this test, so its topics never meet another test's."""
    return f"t_{uuid.uuid4().hex[:8]}"


# ======================================== end of broker fixtures ================================


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own directory: components that default to ./fedhive-data write
    there, never into the checkout."""
    monkeypatch.chdir(tmp_path)
