"""IntegratedClient: fedhive runs the federated loop around the user's functions (STADLE's).

The user hands over four functions and the data they work on; :meth:`IntegratedClient.start`
then runs, round after round:

1. the termination check (the termination function, :meth:`~IntegratedClient.
   stop_model_exchange_routine`, ``maximum_rounds``);
2. receive the semi-global (SG) model, the current aggregate;
3. validate the SG model (validation function);
4. train it locally (training function);
5. validate the local model, then run the test function on it, where set;
6. send the local model with its metrics (names in :data:`METRIC_NAMES`).

When the termination function (or ``maximum_rounds``) ends the loop, ``start()`` stays until
the aggregate of the last model it sent arrives (:attr:`IntegratedClient.sg_model`), so its
round closes with every agent's model, then says goodbye.

::

    client = IntegratedClient(config_file="config_agent.json", agent_name="a1")
    client.set_training_function(train, trainloader, lr=0.01, epochs=2)
    client.set_cross_validation_function(validate, valloader)
    client.set_testing_function(test, testloader)
    client.set_termination_function(judge_termination, round_to_exit=20, client=client)
    client.set_bm_obj(VGG("VGG16"))
    client.start()

Function contracts: ``train(model, data, **kwargs) -> (model, average_training_loss)``;
``validate(model, data, **kwargs)`` and ``test(model, data, **kwargs)`` ``-> (accuracy,
average_loss)``; ``terminate(**kwargs) -> bool`` (True: keep going). Before every round the
termination function is called with the keyword arguments it was registered with, plus the
live counts ``training_count`` (local trainings done by this ``start()``) and
``sg_arrival_count`` (SG models received by it), each passed only where the function takes it
(a parameter of that name or ``**kwargs``); the live counts replace registered values of the
same name.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sized
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from agent.client import BasicClient, numeric_metrics
from agent.model_loader import build_base_model
from common.config import AgentConfig
from common.errors import (
    AggregatorInactiveError,
    ConfigError,
    FedhiveError,
    FedhiveTimeoutError,
    NotConnectedError,
    TrainingFinishedError,
    TransportError,
)
from common.messages import AckMessage

log = logging.getLogger("fedhive.agent")
#: One INFO line per round (the agent daemon shows this logger by default).
round_log = logging.getLogger("fedhive.agent.round")

#: ``train(model, data, **kwargs) -> (trained_model, average_training_loss)``
TrainingFunction = Callable[..., tuple[Any, float]]
#: ``validate(model, data, **kwargs)`` / ``test(model, data, **kwargs) -> (accuracy, loss)``
EvaluationFunction = Callable[..., tuple[float, float]]
#: ``terminate(**kwargs) -> bool``: True keeps the loop going, False ends it.
TerminationFunction = Callable[..., bool]

#: The metrics sent with each local model, and where each comes from. A metric is sent only
#: when the function behind it is set.
METRIC_NAMES: Mapping[str, str] = {
    "accuracy": "validation function on the local model: accuracy",
    "loss_valid": "validation function on the local model: loss",
    "loss_training": "training function: average training loss",
    "accuracy_test": "test function on the local model: accuracy",
    "loss_test": "test function on the local model: loss",
    "sg_accuracy": "validation function on the received SG model: accuracy",
    "sg_loss_valid": "validation function on the received SG model: loss",
}

#: The live counts the termination function may take as keyword arguments.
LIVE_COUNTS = ("training_count", "sg_arrival_count")


class _Bound:
    """A user function with the data and keyword arguments it was registered with."""

    def __init__(self, role: str, fn: Callable[..., Any], data: Any, kwargs: dict[str, Any]):
        if not callable(fn):
            raise TypeError(f"the {role} function must be callable, got {type(fn).__name__}")
        self.role = role
        self.fn = fn
        self.data = data
        self.kwargs = kwargs

    def pair(self, model: Any) -> tuple[Any, Any]:
        result = self.fn(model, self.data, **self.kwargs)
        if not isinstance(result, tuple | list) or len(result) != 2:
            shape = "(model, average_training_loss)" if self.role == "training" else "(acc, loss)"
            raise TypeError(
                f"the {self.role} function {_name(self.fn)} must return {shape}, got {result!r}"
            )
        return result[0], result[1]


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _live_parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Which of :data:`LIVE_COUNTS` ``fn`` accepts as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass none
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return LIVE_COUNTS
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return tuple(n for n in LIVE_COUNTS if n in named)


def sample_count(data: Any) -> int | None:
    """How many samples ``data`` holds, where that can be told: a torch DataLoader's
    dataset, an array (first dimension), a tuple of arrays ``(x, y)``, or any sized object."""
    for candidate in (getattr(data, "dataset", None), data):
        if candidate is None:
            continue
        parts = candidate if isinstance(candidate, tuple | list) else ()
        if parts and all(hasattr(part, "shape") for part in parts):
            return int(parts[0].shape[0])
        shape = getattr(candidate, "shape", None)
        if isinstance(shape, tuple) and shape:
            return int(shape[0])
        if isinstance(candidate, Sized) and not isinstance(candidate, str | bytes | Mapping):
            return len(candidate)
    return None


class IntegratedClient:
    """A federated-learning agent that runs the training loop for you (STADLE's).

    Same constructor and config as :class:`~agent.client.BasicClient` (it connects on
    construction); the BasicClient it drives is :attr:`client`.

    Attributes:
        maximum_rounds: end after this many local trainings (None: no limit).
        num_samples: the weight of this agent's models in the aggregate; None: counted from
            the training data (see :func:`sample_count`), 1 when that cannot be told.
        training_count: local trainings done by the running (or last) ``start()``.
        sg_arrival_count: SG models received by it.
        training_finalized: True once ``start()`` ended without an error (termination
            function, ``maximum_rounds``, ``stop_model_exchange_routine()``, or the
            aggregator's ``max_rounds``).
        last_metrics: the metrics sent with the last local model.
        sg_model: the last SG model received: after ``start()``, the final aggregate.
        final_model_timeout: once the termination function (or ``maximum_rounds``) ends the
            loop, ``start()`` waits up to this many seconds for the aggregate of the last
            model sent (None or 0: it does not wait). A stop request ends that wait.
    """

    #: Seconds a wait for the SG model runs before it looks at the stop flag again.
    wait_slice: float = 1.0
    #: Longest pause between two attempts to send one local model (seconds).
    resend_max_delay: float = 30.0

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
        self._config_dir = Path(config_file).resolve().parent if config_file else Path.cwd()
        #: The BasicClient that talks to the aggregator.
        self.client = BasicClient(
            config_file,
            simulation_flag,
            aggregator_ip_address,
            reg_port,
            exch_port,
            model_path,
            agent_running,
            agent_name,
            **settings,
        )
        self._train: _Bound | None = None
        self._validate: _Bound | None = None
        self._test: _Bound | None = None
        self._terminate: tuple[TerminationFunction, dict[str, Any], tuple[str, ...]] | None = None
        self._has_model = False
        self._stop = threading.Event()
        self._stops = 0  # stop requests so far: a new one ends the wait for the final model
        self._last_sent_round = 0
        self.maximum_rounds: int | None = None
        self.num_samples: float | None = None
        self.training_count = 0
        self.sg_arrival_count = 0
        self.training_finalized = False
        self.last_metrics: dict[str, float] = {}
        self.sg_model: Any = None
        self.final_model_timeout: float | None = 600.0

    # ------------------------------------------------------------------ setup
    @property
    def config(self) -> AgentConfig:
        return self.client.config

    @property
    def agent_name(self) -> str:
        return self.client.config.agent_name

    def set_bm_obj(self, model: Any) -> None:
        """Set the model object whose architecture receives the aggregated weights.

        Without it, ``start()`` builds one from the config's ``base_model`` block
        (``model_fn`` in ``model_fn_src``, called with ``model_fn_args``).
        """
        self.client.set_bm_obj(model)
        self._has_model = True

    def set_training_function(self, fn: TrainingFunction, data: Any, **kwargs: Any) -> None:
        """``fn(model, data, **kwargs) -> (trained_model, average_training_loss)``."""
        self._train = _Bound("training", fn, data, kwargs)

    def set_cross_validation_function(
        self, fn: EvaluationFunction, data: Any, **kwargs: Any
    ) -> None:
        """``fn(model, data, **kwargs) -> (accuracy, average_loss)``, run on the received SG
        model and on the locally trained one."""
        self._validate = _Bound("validation", fn, data, kwargs)

    set_validation_function = set_cross_validation_function

    def set_testing_function(self, fn: EvaluationFunction, data: Any, **kwargs: Any) -> None:
        """``fn(model, data, **kwargs) -> (accuracy, average_loss)``, run on the local model."""
        self._test = _Bound("test", fn, data, kwargs)

    def set_termination_function(self, fn: TerminationFunction, **kwargs: Any) -> None:
        """``fn(**kwargs) -> bool``, called before every round: False ends the loop.

        Besides ``kwargs`` it gets the live ``training_count`` and ``sg_arrival_count``
        where it takes them (see the module docstring).
        """
        if not callable(fn):
            raise TypeError(f"the termination function must be callable, got {fn!r}")
        self._terminate = (fn, kwargs, _live_parameters(fn))

    # ------------------------------------------------------------------ state
    @property
    def federated_training_round(self) -> int:
        """The federated round this client last took part in: the round of the last local
        model it sent (0 before the first). STADLE's termination examples compare it with a
        round to exit at."""
        return self._last_sent_round

    @property
    def current_round(self) -> int | None:
        """Round of the last SG model received (None before the first)."""
        return self.client.current_round

    def stop_model_exchange_routine(self) -> None:
        """End the loop: the round in progress finishes training and sends its model; a wait
        for the SG model ends within :attr:`wait_slice` seconds. Thread- and signal-safe."""
        self._stops += 1
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ loop
    def start(self) -> None:
        """Run the federated loop until it is told to end, then disconnect (so a client
        runs ``start()`` once).

        Raises:
            ConfigError: no training function, or no model and no ``base_model.model_fn``.
            AgentRejectedError: the aggregator did not admit this agent (``max_agents``).
            RejectedError: the aggregator refused a model as invalid.
            Exception: whatever a user function raised.
        """
        train = self._train
        if train is None:
            raise ConfigError("call set_training_function(fn, data, **kwargs) before start()")
        if not self._has_model:
            if not self.config.base_model.model_fn:
                raise ConfigError(
                    "call set_bm_obj(model) before start(), or name base_model.model_fn and "
                    "model_fn_src in the config"
                )
            self.set_bm_obj(build_base_model(self.config.base_model, config_dir=self._config_dir))
        if self.num_samples is None:
            counted = sample_count(train.data)
            samples = float(counted) if counted is not None else 1.0
        else:
            samples = float(self.num_samples)
        self.training_count = self.sg_arrival_count = 0
        self.training_finalized = False
        try:
            next_model: Any = None
            while (ended := self._end_reason()) is None:
                model = next_model if next_model is not None else self._wait_for_model(None)
                if model is None:  # stop requested while waiting
                    ended = "stopped"
                    break
                self._arrived(model)
                next_model = self._round(model, train, samples)
            if next_model is not None:
                self._arrived(next_model)
            elif ended != "stopped":
                self._wait_for_final_model()
            log.info("%s: training loop ended (%s)", self.agent_name, ended)
            self.training_finalized = True
        except TrainingFinishedError as exc:
            log.info("%s: %s", self.agent_name, exc)
            self.training_finalized = True
        finally:
            try:
                self.disconnect()
            except FedhiveError as exc:  # the goodbye is a courtesy: the broker may be away
                log.warning("%s: disconnecting: %s", self.agent_name, exc)

    def _end_reason(self) -> str | None:
        """Why the loop ends now, or None to run another round."""
        if self._stop.is_set():
            return "stopped"
        if self.maximum_rounds is not None and self.training_count >= self.maximum_rounds:
            return "maximum_rounds"
        if self._terminate is None:
            return None
        fn, kwargs, live = self._terminate
        counts = {"training_count": self.training_count, "sg_arrival_count": self.sg_arrival_count}
        keep = fn(**{**kwargs, **{name: counts[name] for name in live}})
        return None if keep and not self._stop.is_set() else "termination function"

    def _arrived(self, model: Any) -> None:
        self.sg_model = model
        self.sg_arrival_count += 1

    def _wait_for_final_model(self) -> None:
        """Stay until the aggregate of the last model sent arrives (bounded by
        :attr:`final_model_timeout`; a new stop request ends the wait): an agent that left
        at once would no longer count as active, and its round could close without the models
        of slower agents."""
        if not self.final_model_timeout or self._last_sent_round <= (self.current_round or 0):
            return
        stops = self._stops
        final = self._wait_for_model(
            self.final_model_timeout, cancelled=lambda: self._stops != stops
        )
        if final is not None:
            self._arrived(final)
        elif self._stops == stops:
            log.warning(
                "%s: no aggregate of round %d within %s s",
                self.agent_name,
                self._last_sent_round,
                self.final_model_timeout,
            )

    def _round(self, sg_model: Any, train: _Bound, samples: float) -> Any:
        """One round on ``sg_model``; returns the next SG model if it arrived meanwhile."""
        started = time.monotonic()
        raw: dict[str, Any] = {}
        if self._validate is not None:
            raw["sg_accuracy"], raw["sg_loss_valid"] = self._validate.pair(sg_model)
        model, raw["loss_training"] = train.pair(sg_model)
        self.training_count += 1
        if self._validate is not None:
            raw["accuracy"], raw["loss_valid"] = self._validate.pair(model)
        if self._test is not None:
            raw["accuracy_test"], raw["loss_test"] = self._test.pair(model)
        metrics = numeric_metrics(raw)  # numpy/torch scalars become floats; NaN is refused
        target = (self.current_round or 0) + 1
        self.last_metrics = metrics
        ack, next_model = self._send(model, metrics, samples, target)
        figures = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        outcome = ack.status.value if ack is not None else "no acknowledgement"
        round_log.info(
            "%s: round %d %s in %.1f s: %s",
            self.agent_name,
            target,
            outcome,
            time.monotonic() - started,
            figures,
        )
        return next_model

    def _send(
        self, model: Any, metrics: dict[str, float], samples: float, target: int
    ) -> tuple[AckMessage | None, Any]:
        """Send until acknowledged: across a lost broker connection, and again when no
        acknowledgement came (the aggregator acknowledges a duplicate without counting it
        twice). Stops trying once the next SG model arrives (this round is over) or after the
        attempt in flight when a stop was requested."""
        attempt = 0
        while True:
            try:
                ack = self.client.send_trained_model(model, metrics, num_samples=samples)
            except AggregatorInactiveError as exc:
                log.warning("%s: %s; waiting for a restart", self.agent_name, exc)
                return None, None
            except NotConnectedError:
                raise
            except (TransportError, FedhiveTimeoutError) as exc:
                log.warning("%s: sending round %d failed: %s", self.agent_name, target, exc)
                ack = None
            if ack is not None:
                self._last_sent_round = target
                return ack, None
            if self._stop.is_set():
                return None, None
            attempt += 1
            delay = min(self.resend_max_delay, 2.0**attempt) * random.uniform(0.5, 1.0)
            # Wait for the next model meanwhile: if it comes, the round closed without a resend.
            next_model = self._wait_for_model(delay)
            if next_model is not None:
                self._last_sent_round = target
                return None, next_model
            if self._stop.is_set():
                return None, None
            log.info("%s: sending round %d again (attempt %d)", self.agent_name, target, attempt)

    def _wait_for_model(
        self, timeout: float | None, cancelled: Callable[[], bool] | None = None
    ) -> Any:
        """The next SG model; None once ``cancelled()`` (default: a stop was requested) or
        after ``timeout`` seconds.

        ``timeout=None`` waits as long as the config's ``model_timeout`` (forever if unset)
        and raises FedhiveTimeoutError when that runs out.
        """
        cancelled = cancelled or self._stop.is_set
        limit = self.config.model_timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while not cancelled():
            left = self.wait_slice if deadline is None else deadline - time.monotonic()
            if left <= 0:
                if timeout is None:
                    raise FedhiveTimeoutError(
                        f"no SG model from aggregator {self.config.aggregator!r} within "
                        f"{limit} s (model_timeout)"
                    )
                return None
            try:
                return self.client.wait_for_sg_model(timeout=min(left, self.wait_slice))
            except FedhiveTimeoutError:
                continue  # a slice ran out: look at the stop flag, then wait on
        return None

    # ------------------------------------------------------------------ teardown
    def disconnect(self) -> None:
        """Say goodbye (offline status) and close the connection."""
        self.client.disconnect()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()
