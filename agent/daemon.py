"""The agent daemon: a long-lived :class:`~agent.integrated.IntegratedClient` for edge devices.

``fedhive agent run --config config_agent.json --entry module:function [-p KEY=VALUE ...]``
connects an IntegratedClient with the config, calls the entry function with it and the
``-p`` values as keyword arguments (strings)::

    def setup(client: IntegratedClient, **params: str) -> None:
        client.set_training_function(train, load_data(params["data_dir"]), epochs=2)
        client.set_cross_validation_function(validate, val_data)

and runs ``client.start()``: forever, or until the termination function (or the aggregator's
``max_rounds``) ends it. The entry may call ``set_bm_obj``; otherwise the config's
``base_model`` block builds the model. ``module`` is a file next to the config (``agent`` →
``agent.py``, or a path to a ``.py`` file) or an importable module; the config's directory is
put first on ``sys.path`` so the entry's own imports resolve as they would from there.

Resilience: the first connection is retried with jittered backoff until the broker answers;
after that the MQTT transport reconnects by itself (and re-announces the agent), a send that
fails or gets no acknowledgement is repeated, and a wait for the SG model simply goes on across
broker and aggregator restarts. Should the client still fail with a connection error, the daemon
connects a new one and calls the entry function again. A (re)started daemon trains from the
aggregator's current SG model.

SIGTERM or SIGINT: the round in flight finishes training and sends its model, then the daemon
says goodbye and exits 0; a second signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from agent.integrated import IntegratedClient
from agent.model_loader import _load_module
from common.errors import ConfigError, FedhiveError, FedhiveTimeoutError, TransportError

log = logging.getLogger("fedhive.daemon")

#: ``entry(client, **params) -> None``: registers the functions (and maybe the model).
EntryPoint = Callable[..., None]


def load_entry(spec: str, *, config_dir: Path) -> EntryPoint:
    """The function named by ``module:function`` (``module`` as for ``model_fn_src``)."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise ConfigError(f"--entry {spec!r}: expected module:function, e.g. my_agent:setup")
    if str(config_dir) not in sys.path:
        sys.path.insert(0, str(config_dir))
    fn = getattr(_load_module(module, config_dir), name, None)
    if not callable(fn):
        raise ConfigError(f"--entry {spec!r}: {module} has no function {name!r}")
    return fn  # type: ignore[no-any-return]


@dataclass
class AgentDaemon:
    """Runs one IntegratedClient defined by an entry point until it ends or is stopped.

    Args:
        config_file: the agent config JSON.
        entry: ``module:function``, called as ``function(client, **params)``.
        params: keyword arguments for the entry function.
        overrides: AgentConfig fields that win over the config file (``agent_name``...).
        connect_max_delay: the longest pause between two attempts to reach the broker.
    """

    config_file: Path
    entry: str
    params: Mapping[str, str] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    connect_max_delay: float = 30.0
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _client: IntegratedClient | None = field(default=None, init=False)
    _stopping_soon: bool = field(default=False, init=False)

    def request_stop(self) -> None:
        """Finish the round in flight (train, send), then end. Thread- and signal-safe."""
        self._stopping.set()
        client = self._client
        if client is not None:
            client.stop_model_exchange_routine()

    def run(self) -> int:
        """Run until the termination function, the aggregator or a stop request ends it.

        Returns the exit status (0). Raises ConfigError for a bad config or entry, and lets
        the aggregator's refusals (AgentRejectedError, RejectedError) and the user functions'
        errors through.
        """
        config_dir = Path(self.config_file).resolve().parent
        setup = load_entry(self.entry, config_dir=config_dir)
        with self._signals():
            attempt = 0
            while not self._stopping.is_set():
                client = self._connect()
                if client is None:
                    break
                self._client = client
                try:
                    setup(client, **self.params)
                    if self._stopping.is_set():
                        client.stop_model_exchange_routine()
                    cfg = client.config
                    log.info(
                        "agent %s: training with aggregator %s of project %s at %s:%s",
                        cfg.agent_name,
                        cfg.aggregator,
                        cfg.project,
                        cfg.aggr_ip,
                        cfg.reg_port,
                    )
                    client.start()
                except (TransportError, FedhiveTimeoutError) as exc:
                    attempt += 1
                    log.warning("connection trouble: %s; reconnecting", exc)
                    self._pause(attempt)
                    continue
                finally:
                    self._client = None
                    with contextlib.suppress(FedhiveError):  # start() already said goodbye
                        client.disconnect()
                log.info(
                    "agent %s: done after %d rounds (%s)",
                    client.agent_name,
                    client.training_count,
                    "stopped" if self._stopping.is_set() else "training finished",
                )
                break
        return 0

    def _connect(self) -> IntegratedClient | None:
        """An IntegratedClient, retrying until the broker answers; None once stopped."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                return IntegratedClient(config_file=self.config_file, **self.overrides)
            except (TransportError, FedhiveTimeoutError) as exc:
                attempt += 1
                log.warning("cannot reach the broker (attempt %d): %s", attempt, exc)
                self._pause(attempt)
        return None

    def _pause(self, attempt: int) -> None:
        # Jittered exponential backoff: many devices must not reconnect in lockstep. Waits on
        # the stop flag, so a stop request ends the pause.
        delay = min(self.connect_max_delay, 0.5 * 2 ** min(attempt, 10))
        self._stopping.wait(delay * random.uniform(0.5, 1.0))

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT: a graceful stop; a second one: exit now (only in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: FrameType | None) -> None:
            if self._stopping_soon:
                sys.stderr.flush()
                os._exit(128 + signum)  # "stop now": no goodbye, nothing more sent
            log.info(
                "%s: finishing the round in flight, then stopping (again: stop now)",
                signal.Signals(signum).name,
            )
            # Not request_stop() here: the main thread may be inside the same Event's lock
            # (a non-reentrant Lock) right now; a helper thread sets it without that risk.
            self._stopping_soon = True
            threading.Thread(target=self.request_stop, name="fedhive-stop").start()

        previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
