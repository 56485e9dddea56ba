"""Serving the dashboard with uvicorn: in the foreground (``fedhive dashboard``) or in a
background thread (tests, or a program that embeds the dashboard next to a federation)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from common.errors import FedhiveTimeoutError

#: Seconds open connections (event streams) get to finish when the server stops.
GRACEFUL_SHUTDOWN = 2


def uvicorn_config(
    app: FastAPI, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        ws="none",  # no WebSocket route: the live view is server-sent events
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        server_header=False,
        log_config=None,  # the fedhive command's logging configuration applies
    )


def serve(app: FastAPI, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()


@contextmanager
def serving_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 15.0
) -> Iterator[str]:
    """Serve ``app`` from a background thread until the block ends; yields its base URL
    (``port`` 0: a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host=host, port=bound_port, log_level="warning"))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"dashboard-{bound_port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        # uvicorn says it started with a flag only: look at it between short waits.
        while not server.started:
            if failure or not thread.is_alive():
                raise RuntimeError(f"the dashboard did not start: {failure or 'it exited'}")
            if time.monotonic() > deadline:
                raise FedhiveTimeoutError(f"the dashboard did not start within {timeout} s")
            thread.join(0.02)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout + GRACEFUL_SHUTDOWN)
        sock.close()


__all__ = ["GRACEFUL_SHUTDOWN", "serve", "serving_in_thread", "uvicorn_config"]
