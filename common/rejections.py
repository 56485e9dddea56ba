"""Counting rejected messages by kind, and logging them without flooding the log.

A component that takes messages from untrusted senders (an aggregator from its agents) rejects
bad ones with a typed error. :class:`RejectionLog` counts every rejection by kind (the error's
class name, or an outcome such as ``StaleSubmission``) and logs it as one line, within limits:
per ``period`` seconds at most ``burst`` lines for each (source, kind) and ``max_lines`` lines in
all; what is left out is summarised when the period ends ("suppressed K similar rejections
..."). Ten thousand bad messages make a few dozen log lines, never a storm. Unexpected
exceptions (bugs) are counted as ``InternalError`` and logged with their traceback once per
exception class.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

#: The kind an unexpected exception (a bug, not a bad message) is counted as.
INTERNAL_ERROR = "InternalError"
#: (source, kind) pairs whose suppressed lines are counted apart; more share one entry.
_MAX_KEYS = 1024
#: A summary names each (source, kind) up to this many; beyond, it is one line in all.
_MAX_SUMMARY_LINES = 10


class RejectionLog:
    """Counts rejections by kind (:attr:`counts`) and logs them, rate-limited."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 3,
        max_lines: int = 50,
        period: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._max_lines = max_lines
        self._period = period
        self._clock = clock
        #: Rejected messages by kind, each counted exactly once.
        self.counts: Counter[str] = Counter()
        self._start = clock()
        self._lines = 0  # lines logged in this period
        self._logged: Counter[tuple[str, str]] = Counter()  # ... per (source, kind)
        self._suppressed: Counter[tuple[str, str]] = Counter()
        self._tracebacks: set[str] = set()  # exception classes logged with a traceback

    @property
    def total(self) -> int:
        """All rejections counted so far."""
        return sum(self.counts.values())

    def reject(self, kind: str, source: str, msg: str, *args: object, count: bool = True) -> None:
        """Count one rejection of ``kind`` from ``source`` and log ``msg % args`` unless the
        period's limits are reached. ``count=False`` logs the same way without counting (a
        failure that is not the message's fault)."""
        if count:
            self.counts[kind] += 1
        if self._admit(kind, source):
            self._log.warning(msg, *args)

    def internal(self, source: str, msg: str, *args: object, exc: BaseException) -> None:
        """Count an unexpected exception as :data:`INTERNAL_ERROR`; log it with its traceback
        the first time its class is seen, afterwards as one rate-limited line."""
        self.counts[INTERNAL_ERROR] += 1
        name = type(exc).__name__
        if name not in self._tracebacks and len(self._tracebacks) < 256:
            self._tracebacks.add(name)
            self._log.error(msg, *args, exc_info=exc)
        elif self._admit(INTERNAL_ERROR, source):
            self._log.error(msg + " (%s: %s)", *args, name, exc)

    def flush(self) -> None:
        """Summarise what was suppressed once the period is over (call it now and then, e.g.
        from a monitor loop; a rejection does it too)."""
        if self._clock() - self._start < self._period:
            return
        self._summarise()
        self._start = self._clock()
        self._lines = 0
        self._logged.clear()
        self._suppressed.clear()

    def _admit(self, kind: str, source: str) -> bool:
        """Whether this rejection gets its own log line."""
        self.flush()
        key = (source, kind)
        if self._lines < self._max_lines and self._logged[key] < self._burst:
            self._lines += 1
            self._logged[key] += 1
            return True
        if key not in self._suppressed and len(self._suppressed) >= _MAX_KEYS:
            key = ("other sources", kind)  # a flood of names must not grow this without end
        self._suppressed[key] += 1
        return False

    def _summarise(self) -> None:
        if not self._suppressed:
            return
        seconds = self._clock() - self._start
        if len(self._suppressed) <= _MAX_SUMMARY_LINES:
            for (source, kind), n in sorted(self._suppressed.items()):
                self._log.warning(
                    "suppressed %d similar rejections (%s) from %s in %.0f s",
                    n,
                    kind,
                    source,
                    seconds,
                )
            return
        kinds: Counter[str] = Counter()
        for (_source, kind), n in self._suppressed.items():
            kinds[kind] += n
        self._log.warning(
            "suppressed %d similar rejections from %d sources in %.0f s (%s)",
            sum(kinds.values()),
            len({source for source, _kind in self._suppressed}),
            seconds,
            ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common()),
        )
