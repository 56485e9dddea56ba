"""Run IntegratedClients in threads and wait on conditions held in other threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.integrated import IntegratedClient


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` (state owned by another thread or event loop) until it holds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        pause.wait(0.05)


@contextmanager
def started(clients: list[IntegratedClient]) -> Iterator[list[BaseException]]:
    """Each client's ``start()`` in a thread; the list collects what they raised. On exit,
    every client is told to stop and its thread must end."""
    errors: list[BaseException] = []

    def run(client: IntegratedClient) -> None:
        try:
            client.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,), name=c.agent_name) for c in clients]
    for thread in threads:
        thread.start()
    try:
        yield errors
    finally:
        for client in clients:
            client.stop_model_exchange_routine()
        for thread in threads:
            thread.join(30)
        assert not any(t.is_alive() for t in threads), "a client did not stop"
