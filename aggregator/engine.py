"""The round engine: pure round logic, no I/O.

Round 0 is the base model. For round r the engine collects local models trained from model
r-1; ``needed = max(1, ceil(threshold × active))``; when enough are collected (and the method can
run on them) the round is aggregated and round r+1 opens. Failures are data: stale, duplicate
and rejected submissions are counted and returned as outcomes, never raised.

Agents: an agent counts as *active* while it is online, admitted (``max_agents``) and heard
from within ``agent_timeout`` seconds (0 disables the timeout). A goodbye (``offline``) takes it
out at once; a lost connection (its last will) does too when no timeout is set, else the
heartbeats decide, so an agent that reconnects within the timeout keeps its place.

Under an sg-aggregator the round ends differently: :meth:`RoundEngine.seal` turns the
collected models into the regional result (unrounded float64, so the SG layer stays exact) and
keeps the round closed (later submissions are stale) until :meth:`RoundEngine.set_model`
installs the SG model of that round and opens the next one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np

from aggregator.strategies import RoundAccumulator, Strategy
from aggregator.strategies.fedavg import FedAvgAccumulator
from common.codec import Array, ModelSpec, Tensors, check_finite
from common.errors import ConfigError, FedhiveError, StrategyError
from common.messages import AckStatus, AgentState, PresenceState


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one submission."""

    status: AckStatus
    reason: str | None = None
    #: For a rejection: the class name of the typed error behind it (what it is counted as).
    error: str | None = field(default=None, compare=False)


@dataclass(slots=True)
class AgentRecord:
    name: str
    #: What the agent last said of itself (or its will said for it).
    status: AgentState = AgentState.ONLINE
    #: Its last sign of life (a heartbeat or an online status); None: never seen alive.
    last_seen: float | None = None
    last_round: int | None = None
    #: Not admitted: ``max_agents`` agents were active when it came online.
    rejected: bool = False

    @property
    def online(self) -> bool:
        return self.status is not AgentState.OFFLINE


@dataclass(frozen=True, slots=True)
class Contribution:
    agent: str
    num_samples: float
    metrics: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class RoundResult:
    round: int
    model: dict[str, Array]
    contributors: tuple[Contribution, ...]
    method: str
    started: float
    completed: float


#: Completed rounds a service keeps in its ``results`` (the oldest go first).
RESULTS_KEPT = 1000


class RoundResults(deque[RoundResult]):
    """The last :data:`RESULTS_KEPT` completed rounds, newest last. Only the newest keeps its
    model: an earlier one is a record (round, contributors, method, times) with an empty model,
    so a long training holds one model here, not one per round."""

    def __init__(self) -> None:
        super().__init__(maxlen=RESULTS_KEPT)

    def append(self, result: RoundResult) -> None:
        if self:
            self[-1] = replace(self[-1], model={})
        super().append(result)


def widen(tensors: Tensors) -> dict[str, Array]:
    """Every tensor as float64 (complex128 for complex ones): how regional results travel, so
    nothing is rounded to the model's dtypes before the SG layer combines them."""
    # A copy, always: the input may live in memory an accumulator releases when it closes.
    return {
        name: np.array(x, dtype=_wide_dtype(np.asarray(x).dtype)) for name, x in tensors.items()
    }


def wide_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of :func:`widen` applied to a model of ``spec``."""
    zeros = {
        t.name: np.zeros(
            t.shape, dtype=np.complex128 if t.dtype.startswith("complex") else np.float64
        )
        for t in spec.tensors
    }
    return ModelSpec.from_tensors(zeros, spec.framework)


def _wide_dtype(dtype: np.dtype[Any]) -> type[np.generic]:
    return np.complex128 if dtype.kind == "c" else np.float64


def regional_tensors(acc: RoundAccumulator) -> dict[str, Array]:
    """The aggregate of a round in float64: FedAvg's weighted mean before any rounding (the SG
    layer weights it by the round's total samples: exact); other methods' result, widened."""
    if isinstance(acc, FedAvgAccumulator):
        return acc.mean()
    return widen(acc.result())


@dataclass(slots=True)
class RoundCounters:
    """Submissions of the open round by outcome (stale ones arrive during a later round)."""

    accepted: int = 0
    duplicate: int = 0
    stale: int = 0
    rejected: int = 0

    def count(self, status: AckStatus) -> None:
        match status:
            case AckStatus.ACCEPTED:
                self.accepted += 1
            case AckStatus.DUPLICATE:
                self.duplicate += 1
            case AckStatus.STALE:
                self.stale += 1
            case AckStatus.REJECTED:
                self.rejected += 1


class RoundEngine:
    """Collects local models round by round and aggregates them with a strategy."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        threshold: float = 1.0,
        clock: Callable[[], float] = time.time,
        agent_timeout: float = 0.0,
        max_agents: int = 0,
    ) -> None:
        self._strategy = strategy
        self._pending_strategy: Strategy | None = None
        self._threshold = 1.0
        self._threshold_exact = Fraction(1)
        self.threshold = threshold
        #: Seconds after the last sign of life that an online agent stops counting as active;
        #: 0 disables the timeout (DESIGN.md "Rounds").
        self.agent_timeout = agent_timeout
        self._max_agents = 0
        self.max_agents = max_agents
        self._clock = clock
        self.spec: ModelSpec | None = None
        self.model: dict[str, Array] | None = None
        self.model_round = -1
        self.agents: dict[str, AgentRecord] = {}
        #: (active count, engine time until which it holds): see :attr:`active`.
        self._active_cache: tuple[int, float] | None = None
        self.counters = RoundCounters()
        self._acc: RoundAccumulator | None = None
        self._collected: dict[str, Contribution] = {}
        self._started = 0.0
        self._sealed = False

    # ----------------------------------------------------------------- state
    @property
    def has_model(self) -> bool:
        return self.model is not None

    @property
    def round(self) -> int:
        """The round being collected (one past the current model's round)."""
        return self.model_round + 1

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def next_strategy(self) -> Strategy | None:
        """The method the next round switches to (:meth:`set_strategy`), if any."""
        return self._pending_strategy

    @property
    def agent_timeout(self) -> float:
        """Seconds after the last sign of life that an agent stops counting; 0 disables."""
        return self._agent_timeout

    @agent_timeout.setter
    def agent_timeout(self, value: float) -> None:
        t = float(value)
        if not t >= 0:  # also refuses NaN
            raise ConfigError(f"agent timeout must be >= 0 seconds, got {value!r}")
        self._agent_timeout = t
        self._active_cache = None

    @property
    def max_agents(self) -> int:
        """How many agents may be active at once; 0 means no limit."""
        return self._max_agents

    @max_agents.setter
    def max_agents(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"max_agents must be an integer >= 0, got {value!r}")
        self._max_agents = value

    @property
    def threshold(self) -> float:
        """The fraction of active agents whose models complete a round, in (0, 1]."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        t = float(value)
        if not 0 < t <= 1:  # also refuses NaN
            raise ConfigError(f"threshold must be in (0, 1], got {value!r}")
        self._threshold = t
        # The threshold as the decimal it was written as (repr is the shortest round-trip
        # form): 0.7 × 10 is exactly 7, where float maths says 7.000000000000001 → 8.
        self._threshold_exact = Fraction(repr(t))

    @property
    def active(self) -> int:
        """Agents that count toward ``needed``: online, admitted, and heard from within
        ``agent_timeout`` (if set).

        Counting walks every agent, and every accepted model asks (``needed``): with 1000
        agents that was a million presence checks a round. The count is kept until an agent's
        state changes or the first active agent could time out, whichever comes first (a
        heartbeat only moves that moment later, so it keeps the count)."""
        now = self._clock()
        cached = self._active_cache
        if cached is not None and now < cached[1]:
            return cached[0]
        count, until = 0, math.inf
        for record in self.agents.values():
            if self._presence(record, now) is PresenceState.ACTIVE:
                count += 1
                if self._agent_timeout > 0 and record.last_seen is not None:
                    until = min(until, record.last_seen + self._agent_timeout)
        self._active_cache = (count, until)
        return count

    @property
    def needed(self) -> int:
        """``max(1, ceil(threshold × active))``, computed exactly."""
        return max(1, math.ceil(self._threshold_exact * self.active))

    @property
    def collected(self) -> int:
        return len(self._collected)

    @property
    def contributors(self) -> list[str]:
        return list(self._collected)

    @property
    def sealed(self) -> bool:
        """The open round's regional result was produced (:meth:`seal`): it takes no more
        models and waits for the SG model."""
        return self._sealed

    def blocker(self) -> str | None:
        """Why the open round cannot be aggregated now (beyond the count), or None."""
        if self._acc is None or not self._collected or self._sealed:
            return None
        return self._acc.blocker()

    def ready(self) -> bool:
        return (
            self._acc is not None
            and not self._sealed
            and self.collected >= self.needed
            and self._acc.blocker() is None
        )

    # ---------------------------------------------------------------- agents
    def now(self) -> float:
        """The engine's clock (seconds), which ``last_seen`` is measured on."""
        return self._clock()

    def presence(self, name: str) -> PresenceState | None:
        """How the engine sees agent ``name`` now (None if it never announced itself)."""
        record = self.agents.get(name)
        return None if record is None else self._presence(record, self._clock())

    def presences(self) -> dict[str, PresenceState]:
        now = self._clock()
        return {name: self._presence(a, now) for name, a in self.agents.items()}

    def _presence(self, record: AgentRecord, now: float) -> PresenceState:
        if record.status is AgentState.OFFLINE:
            return PresenceState.OFFLINE
        if record.rejected:
            online = record.status is AgentState.ONLINE
            return PresenceState.REJECTED if online else PresenceState.OFFLINE
        if self._agent_timeout > 0:
            if record.last_seen is None or record.last_seen < now - self._agent_timeout:
                return PresenceState.TIMEOUT
            return PresenceState.ACTIVE
        # No timeout: the last will is the only sign that a vanished agent is gone.
        return PresenceState.OFFLINE if record.status is AgentState.LOST else PresenceState.ACTIVE

    def admitted(self, name: str) -> bool:
        """Whether ``name`` may submit: known and not rejected (anyone when there is no limit
        and the agent never announced itself, since presence comes from status alone)."""
        record = self.agents.get(name)
        if record is None:
            return self._max_agents == 0
        return not record.rejected

    def agent_seen(self, name: str, *, online: bool = True) -> AgentRecord:
        """An online (or, ``online=False``, offline) status from ``name``."""
        return self.agent_status(name, AgentState.ONLINE if online else AgentState.OFFLINE)

    def agent_status(self, name: str, state: AgentState) -> AgentRecord:
        """Take an agent's status: online (admitted if there is room), offline, or lost."""
        now = self._clock()
        record = self.agents.get(name)
        if record is None:
            record = self.agents[name] = AgentRecord(name, status=AgentState.OFFLINE)
        was_active = self._presence(record, now) is PresenceState.ACTIVE
        record.status = state
        if state is AgentState.ONLINE:
            record.last_seen = now
            if not was_active:  # an agent that holds its place keeps it across reconnects
                record.rejected = not self._room_for(record, now)
        self._active_cache = None
        return record

    def heartbeat(self, name: str) -> AgentRecord | None:
        """A heartbeat from ``name``; ignored (None) from agents that never said they are
        online. An agent back from TIMEOUT is admitted again only if there is room."""
        record = self.agents.get(name)
        if record is None or record.status is AgentState.OFFLINE:
            return None
        now = self._clock()
        was = self._presence(record, now)
        record.last_seen = now
        if was is PresenceState.TIMEOUT:
            record.rejected = not self._room_for(record, now)
        if was is not PresenceState.ACTIVE:  # (an active agent stays active: the count holds)
            self._active_cache = None
        return record

    def admit_waiting(self) -> list[str]:
        """Admit rejected agents that are still connected while there is room (after
        ``max_agents`` was raised); returns their names, oldest sign of life first."""
        now = self._clock()
        waiting = sorted(
            (a for a in self.agents.values() if a.rejected and a.status is AgentState.ONLINE),
            key=lambda a: a.last_seen or 0.0,
        )
        admitted: list[str] = []
        for record in waiting:
            if not self._room_for(record, now):
                break
            record.rejected = False
            self._active_cache = None
            admitted.append(record.name)
        return admitted

    def _room_for(self, record: AgentRecord, now: float) -> bool:
        if self._max_agents == 0:
            return True
        # Counted afresh (the cached count may predate this agent's change): only when an
        # agent arrives or returns, and only with a limit.
        taken = sum(
            1
            for a in self.agents.values()
            if a is not record and self._presence(a, now) is PresenceState.ACTIVE
        )
        return taken < self._max_agents

    # ---------------------------------------------------------------- models
    def set_model(self, tensors: Mapping[str, Array], *, round: int, spec: ModelSpec) -> None:
        """Install the current model (the base model as round 0) and open the next round."""
        self._close_round()
        self.spec = spec
        self.model = dict(tensors)
        self.model_round = round
        self._open_round()

    def set_strategy(self, strategy: Strategy) -> None:
        """Switch method from the next round on (the open round keeps its method)."""
        self._pending_strategy = strategy

    def submit(
        self,
        agent: str,
        *,
        round: int,
        num_samples: float,
        tensors: Tensors,
        metrics: Mapping[str, float] | None = None,
    ) -> Outcome:
        """Validate and fold in one local model; never raises for bad input."""
        outcome = self._check(agent, round, tensors)
        if outcome is None:
            assert self._acc is not None
            try:
                self._acc.add_finite(tensors, num_samples)  # _check checked the values
            except FedhiveError as exc:
                outcome = Outcome(AckStatus.REJECTED, str(exc), type(exc).__name__)
            else:
                self._collected[agent] = Contribution(
                    agent, float(num_samples), dict(metrics or {})
                )
                # Presence comes from status and heartbeats only: a submission from an agent
                # that never said it is online must not raise `needed`.
                record = self.agents.get(agent)
                if record is not None:
                    record.last_round = round
                outcome = Outcome(AckStatus.ACCEPTED)
        self.counters.count(outcome.status)
        return outcome

    def _check(self, agent: str, round: int, tensors: Tensors) -> Outcome | None:
        if self.spec is None or self._acc is None:
            return Outcome(AckStatus.REJECTED, "no base model yet: nothing to train from")
        if round < self.round:
            return Outcome(
                AckStatus.STALE, f"round {round} is over (collecting round {self.round})"
            )
        if self._sealed and round == self.round:
            return Outcome(
                AckStatus.STALE,
                f"round {round} is over: its regional result was sent (waiting for the SG model)",
            )
        if round > self.round:
            return Outcome(
                AckStatus.REJECTED, f"unknown round {round} (collecting round {self.round})"
            )
        if agent in self._collected:
            return Outcome(AckStatus.DUPLICATE, f"already have {agent}'s model for round {round}")
        try:
            self.spec.check(tensors)
            check_finite(tensors)
        except FedhiveError as exc:
            return Outcome(AckStatus.REJECTED, str(exc), type(exc).__name__)
        return None

    def complete(self, *, force: bool = False) -> RoundResult:
        """Aggregate the open round and open the next one.

        ``force`` skips the threshold (complete-round with at least one model). Raises
        StrategyError when the method cannot run on what was collected."""
        acc = self._completable(force)
        result = self._result(acc.result())
        assert self.spec is not None
        self.set_model(result.model, round=result.round, spec=self.spec)
        return result

    def seal(self, *, force: bool = False) -> RoundResult:
        """Aggregate the open round into its regional result and close it without opening
        the next one (:meth:`set_model` does, with the SG model).

        The result's tensors are float64 (complex128), unrounded: FedAvg's weighted mean
        (:func:`regional_tensors`). Models for the sealed round are stale from now on.
        ``force`` and errors as for :meth:`complete`."""
        acc = self._completable(force)
        result = self._result(regional_tensors(acc))
        self._sealed = True
        acc.close()  # the models are folded into the result: release what they hold
        return result

    def mark_sealed(self) -> None:
        """Close the open round as :meth:`seal` does, for a round whose regional result was
        produced before a restart (the result itself comes from the store): models for it are
        stale until :meth:`set_model` installs its SG model."""
        if self._acc is None:
            raise StrategyError("no round is open")
        if self._collected:
            raise StrategyError(f"round {self.round} has models: seal it instead")
        self._sealed = True

    def _completable(self, force: bool) -> RoundAccumulator:
        if self._acc is None:
            raise StrategyError("no round is open")
        if self._sealed:
            raise StrategyError(f"round {self.round} was sealed: waiting for the SG model")
        if not self._collected:
            raise StrategyError(f"round {self.round} has no model yet")
        if not force and self.collected < self.needed:
            raise StrategyError(f"round {self.round} has {self.collected} of {self.needed} models")
        return self._acc

    def _result(self, model: dict[str, Array]) -> RoundResult:
        return RoundResult(
            round=self.round,
            model=model,
            contributors=tuple(self._collected.values()),
            method=self._strategy.name,
            started=self._started,
            completed=self._clock(),
        )

    def _open_round(self) -> None:
        if self._pending_strategy is not None:
            self._strategy, self._pending_strategy = self._pending_strategy, None
        assert self.model is not None
        self._acc = self._strategy.begin(self.model)
        self._collected = {}
        self.counters = RoundCounters()
        self._started = self._clock()
        self._sealed = False

    def _close_round(self) -> None:
        if self._acc is not None:
            self._acc.close()
            self._acc = None
