"""Which aggregators the sg-aggregator waits for: pure bookkeeping on their retained statuses.

An aggregator republishes its status every ``status_interval`` seconds; its last will (and its
goodbye) is an INACTIVE status. The tracker turns what it heard, and when, into an
:class:`~common.messages.AggregatorLiveness`:

* ALIVE: serving agents; its regional result is waited for.
* IDLE: alive without an active agent (nothing to wait for).
* PAUSED: stopped by an admin or finished its rounds (not waited for).
* LOST: its process is gone (its will) but for less than ``timeout`` seconds: still waited for,
  since it may come back. Measured from the will, so a killed aggregator stops counting exactly
  ``timeout`` seconds after it died.
* GONE: lost for longer than ``timeout``, or silent for longer than ``timeout`` (a frozen
  process whose will has not come yet): the rounds go on without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from common.messages import AggregatorInfo, AggregatorLiveness, AggregatorState, AggStatusMessage

#: The liveness states whose regional result a round waits for.
COUNTED = frozenset({AggregatorLiveness.ALIVE, AggregatorLiveness.LOST})


@dataclass(slots=True)
class TrackedAggregator:
    name: str
    #: Its last status.
    status: AggStatusMessage
    #: When it was heard last (the tracker's clock).
    heard: float
    #: Its active agents by its last status while it served (a will says 0).
    agents: int
    #: When its process was seen gone (a will or goodbye); None while it serves.
    lost_since: float | None = None
    #: The last round whose regional result from it was accepted.
    last_round: int | None = None


class AggregatorTracker:
    """The aggregators of a project as the sg-aggregator sees them."""

    def __init__(self, *, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not timeout > 0:
            raise ValueError(f"aggregator timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        self._clock = clock
        self._records: dict[str, TrackedAggregator] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._records

    @property
    def names(self) -> list[str]:
        return sorted(self._records)

    def get(self, name: str) -> TrackedAggregator | None:
        return self._records.get(name)

    def update(self, status: AggStatusMessage) -> TrackedAggregator:
        """Take one status of aggregator ``status.sender``."""
        now = self._clock()
        gone = status.state is AggregatorState.INACTIVE and not status.paused
        record = self._records.get(status.sender)
        if record is None:
            record = self._records[status.sender] = TrackedAggregator(
                status.sender, status, now, 0 if gone else status.active
            )
        record.status = status
        record.heard = now
        if gone:
            if record.lost_since is None:
                record.lost_since = now
        else:
            record.lost_since = None
            record.agents = status.active
        return record

    def forget(self, name: str) -> None:
        """Its retained status was cleared: it no longer exists."""
        self._records.pop(name, None)

    def liveness(self, name: str) -> AggregatorLiveness | None:
        record = self._records.get(name)
        return None if record is None else self._liveness(record, self._clock())

    def _liveness(self, record: TrackedAggregator, now: float) -> AggregatorLiveness:
        if record.lost_since is not None:
            lost_for = now - record.lost_since
            return AggregatorLiveness.LOST if lost_for <= self.timeout else AggregatorLiveness.GONE
        if now - record.heard > self.timeout:
            return AggregatorLiveness.GONE
        if record.status.state in (AggregatorState.INACTIVE, AggregatorState.FINISHED):
            return AggregatorLiveness.PAUSED
        return AggregatorLiveness.ALIVE if record.agents > 0 else AggregatorLiveness.IDLE

    def counted(self, name: str) -> bool:
        """Whether a round waits for this aggregator's regional result."""
        record = self._records.get(name)
        if record is None:
            return False
        return self._liveness(record, self._clock()) in COUNTED and record.agents > 0

    def states(self) -> dict[str, AggregatorLiveness]:
        now = self._clock()
        return {name: self._liveness(r, now) for name, r in sorted(self._records.items())}

    def alive(self) -> int:
        """Aggregators not GONE."""
        return sum(1 for s in self.states().values() if s is not AggregatorLiveness.GONE)

    def table(self, limit: int) -> tuple[list[AggregatorInfo], int]:
        """The aggregator rows of the SG status (at most ``limit``: live ones first), and how
        many were left out."""
        now = self._clock()
        records = sorted(
            self._records.values(),
            key=lambda r: (self._liveness(r, now) is AggregatorLiveness.GONE, -r.heard),
        )
        shown = sorted(records[:limit], key=lambda r: r.name)
        rows = [
            AggregatorInfo(
                name=r.name,
                state=self._liveness(r, now),
                last_status=round(max(0.0, now - r.heard), 2),
                round=r.status.round,
                agents=r.agents,
                last_round=r.last_round,
            )
            for r in shown
        ]
        return rows, len(records) - len(shown)
