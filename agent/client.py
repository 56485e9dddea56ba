"""BasicClient: the synchronous, STADLE-compatible agent API.

An asyncio loop runs in a background thread and owns the :class:`~agent.session.AgentSession`;
every public method is an ordinary blocking call, so it fits any training loop::

    client = BasicClient(config_file="config_agent.json")
    client.set_bm_obj(model)
    model = client.wait_for_sg_model()
    for _ in range(rounds):
        train(model)
        client.send_trained_model(model, {"accuracy": acc, "loss_training": loss})
        model = client.wait_for_sg_model()
    client.disconnect()

With ``max_rounds`` set on the aggregator, ``wait_for_sg_model`` raises
:class:`~common.errors.TrainingFinishedError` once the last round's model was handed out, so a
loop can run ``while True`` and stop on it. While an admin has the aggregator stopped,
``send_trained_model`` raises :class:`~common.errors.AggregatorInactiveError` (a
:class:`~common.errors.RejectedError`) and the next ``wait_for_sg_model`` waits until it is
restarted, then returns the model to train from again.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from agent.session import AgentSession
from common.adapters import FrameworkAdapter, adapter_for, get_adapter
from common.config import AgentConfig, load_settings, parse_settings
from common.errors import (
    AgentRejectedError,
    AggregatorInactiveError,
    ConfigError,
    FedhiveError,
    FedhiveTimeoutError,
    RejectedError,
    TrainingFinishedError,
)
from common.messages import AckMessage, AckStatus, Refusal

log = logging.getLogger("fedhive.agent")
_T = TypeVar("_T")

#: The typed error for each way an aggregator refuses an agent's submissions outright.
_REFUSALS: dict[Refusal, type[RejectedError]] = {
    Refusal.MAX_AGENTS: AgentRejectedError,
    Refusal.INACTIVE: AggregatorInactiveError,
    Refusal.FINISHED: TrainingFinishedError,
}


class LoopThread:
    """An asyncio event loop in a daemon thread, for calling coroutines from sync code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():  # the coroutine itself raised a TimeoutError: pass it on
                raise
            future.cancel()
            raise FedhiveTimeoutError(f"operation did not finish within {timeout} s") from None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def _config_from(config_file: str | Path | None, overrides: Mapping[str, Any]) -> AgentConfig:
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None:
        return load_settings(AgentConfig, config_file, **given)
    return parse_settings(AgentConfig, given, source="BasicClient arguments")


def numeric_metrics(perf_values: Mapping[str, Any] | None) -> dict[str, float]:
    """Validate ``perf_values``: names to finite numbers (bools are not numbers here)."""
    metrics: dict[str, float] = {}
    for key, value in (perf_values or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            try:
                value = float(value)  # numpy and torch scalars
            except (TypeError, ValueError):
                raise TypeError(
                    f"metric {key!r} must be a number, got {type(value).__name__}"
                ) from None
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r} must be finite, got {value}")
        metrics[key] = float(value)
    return metrics


class BasicClient:
    """A federated-learning agent for your own training loop (STADLE's BasicClient).

    Args:
        config_file: the agent config JSON (STADLE keys plus fedhive's); keyword arguments
            override its values.
        simulation_flag: accepted for STADLE compatibility; has no effect.
        aggregator_ip_address: the broker's host (STADLE's ``aggr_ip``).
        reg_port: the broker's port.
        agent_name: this agent's name (unique in the project).
        **settings: any other :class:`~common.config.AgentConfig` field (``project``,
            ``aggregator``, ``token``, ``heartbeat_interval``...). ``aggregator="auto"`` lets
            the agent pick the aggregator with the fewest active agents and re-home to another
            one when it is gone for longer than ``rehome_timeout`` seconds.
    """

    def __init__(
        self,
        config_file: str | Path | None = None,
        simulation_flag: bool = True,
        aggregator_ip_address: str | None = None,
        reg_port: int | str | None = None,
        exch_port: int | str | None = None,
        model_path: str | Path | None = None,
        agent_running: bool = True,
        agent_name: str | None = None,
        **settings: Any,
    ) -> None:
        self.config = _config_from(
            config_file,
            {
                "aggr_ip": aggregator_ip_address,
                "reg_port": reg_port,
                "model_path": model_path,
                "agent_name": agent_name,
                **settings,
            },
        )
        self._bm: Any = None
        self._adapter: FrameworkAdapter | None = None
        self._round: int | None = None  # round of the last model handed to the user
        # The last upload was refused because the aggregator was stopped: the next wait hands
        # out the same model again once the aggregator is active, to train and send again.
        self._retry = False
        self._loop = LoopThread(f"fedhive-agent-{self.config.agent_name}")
        self._session = AgentSession(config=self.config)
        try:
            self._loop.run(
                self._session.__aenter__(), timeout=self.config.broker().connect_timeout * 2
            )
        except BaseException:
            self._loop.close()
            raise
        self._open = True

    # STADLE API ------------------------------------------------------------
    def set_bm_obj(self, model: Any) -> None:
        """Set the model object whose architecture receives the aggregated weights."""
        self._bm = model
        try:
            self._adapter = adapter_for(model)
        except FedhiveError:
            self._adapter = get_adapter(self.config.base_model.model_format)

    def wait_for_sg_model(self, timeout: float | None = None) -> Any:
        """Block until the next aggregated model arrives and return a copy of the base model
        object with its weights loaded (the first call returns the current model).

        Waits without polling, also while the aggregator is stopped (INACTIVE). After an
        upload refused because the aggregator was stopped, it returns (once the aggregator is
        active again) the model to train from: the same one unless a newer one arrived.

        Raises:
            AgentRejectedError: the aggregator did not admit this agent (``max_agents``).
            TrainingFinishedError: the aggregator finished its ``max_rounds`` and there is no
                model after the one last returned.
            FedhiveTimeoutError: nothing arrived within ``timeout`` (or ``model_timeout``).
        """
        adapter, bm = self._require_model()
        wait = timeout if timeout is not None else self.config.model_timeout
        retry = self._retry and self._round is not None
        after = self._round - 1 if retry and self._round is not None else self._round
        self._session.state = "waiting"
        latest = self._loop.run(
            self._session.wait_model(after=after, timeout=wait, until_active=retry)
        )
        model = copy.deepcopy(bm)
        adapter.load_numpy(model, latest.tensors)
        self._round = latest.round
        self._retry = False
        self._session.state = "training"
        return model

    def send_trained_model(
        self,
        model: Any,
        perf_values: Mapping[str, Any] | None = None,
        *,
        num_samples: float | None = None,
    ) -> AckMessage | None:
        """Send a locally trained model with its numeric metrics.

        ``num_samples`` (or ``perf_values["num_samples"]``) weights it in the aggregate;
        default 1. Returns the aggregator's acknowledgement (None when none came within
        ``ack_timeout``).

        Raises:
            RejectedError: the aggregator refused the model (the reason says why); its
                subclasses say when the agent itself is refused: AgentRejectedError (not
                admitted), AggregatorInactiveError (stopped: call ``wait_for_sg_model`` to wait
                for the restart), TrainingFinishedError (``max_rounds`` done).
        """
        adapter, _ = self._require_model()
        if self._round is None:
            raise FedhiveError("call wait_for_sg_model() first: a local model trains from one")
        metrics = numeric_metrics(perf_values)
        samples = num_samples if num_samples is not None else metrics.pop("num_samples", 1.0)
        self._session.state = "sending"
        try:
            ack = self._loop.run(
                self._session.submit(
                    adapter.to_numpy(model),
                    round=self._round + 1,
                    num_samples=float(samples),
                    metrics=metrics,
                    framework=adapter.framework,
                    ack_timeout=self.config.ack_timeout,
                )
            )
        finally:
            self._session.state = "idle"
        if ack is not None and ack.status is AckStatus.REJECTED:
            reason = ack.reason or "rejected by the aggregator"
            error = _REFUSALS.get(ack.refusal, RejectedError) if ack.refusal else RejectedError
            self._retry = error is AggregatorInactiveError
            raise error(reason)
        if ack is not None and ack.status is AckStatus.STALE:
            log.warning("%s: %s", self.config.agent_name, ack.reason)
        return ack

    def federated_training_round(
        self,
        model: Any,
        perf_values: Mapping[str, Any] | None = None,
        *,
        num_samples: float | None = None,
    ) -> Any:
        """Send ``model`` and return the next aggregated model."""
        self.send_trained_model(model, perf_values, num_samples=num_samples)
        return self.wait_for_sg_model()

    def disconnect(self) -> None:
        """Say goodbye (offline status) and close the connection."""
        if not getattr(self, "_open", False):
            return
        self._open = False
        try:
            self._loop.run(self._session.__aexit__(None, None, None), timeout=15)
        finally:
            self._loop.close()

    # helpers ---------------------------------------------------------------
    @property
    def current_round(self) -> int | None:
        """Round of the last model returned by :meth:`wait_for_sg_model`."""
        return self._round

    @property
    def aggregator(self) -> str | None:
        """The aggregator this agent is with: the configured one, or with ``aggregator``
        ``"auto"`` the one it picked (None until it picked one; it changes when it re-homes)."""
        return self._session.aggregator

    def _require_model(self) -> tuple[FrameworkAdapter, Any]:
        if self._bm is None or self._adapter is None:
            raise ConfigError("call set_bm_obj(model) first")
        return self._adapter, self._bm

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()
