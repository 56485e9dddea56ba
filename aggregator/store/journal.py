"""The store as an asyncio service uses it: one aggregator's (or the sg-aggregator's) record.

Every call blocks on fsync and database round trips, so each runs in a worker thread and the
service awaits it: a service that awaits :meth:`RoundJournal.local` before acknowledging a
model, and :meth:`RoundJournal.complete` before publishing a round's model, keeps the store
ahead of everything it tells the world. The journal also counts the bytes each round took in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

from aggregator.store.blobs import Buffer
from aggregator.store.store import Store
from aggregator.store.types import (
    AggregatorRef,
    Contributor,
    RecoveredState,
    Retention,
)
from common.messages import ModelKind


class RoundJournal:
    """The record of aggregator ``name`` of ``project`` (``role`` ``sg``: the sg-aggregator).

    Open it with :meth:`open`; :meth:`close` closes the store it opened.
    """

    def __init__(self, store: Store, agg: AggregatorRef) -> None:
        self.store = store
        self.agg = agg
        self._bytes_in: dict[int, int] = {}

    @classmethod
    async def open(
        cls,
        *,
        data_dir: Path,
        url: str | None,
        keep_local: Retention,
        best_metric: str,
        project: str,
        name: str,
        role: str = "aggregator",
    ) -> RoundJournal:
        """Open (or create) the store and register the aggregator in it.

        Raises:
            StoreError: the store cannot be opened (bad URL, database down, another schema).
        """

        def opening() -> RoundJournal:
            store = Store(
                data_dir=data_dir, url=url, keep_local=keep_local, best_metric=best_metric
            )
            try:
                return cls(store, store.ensure_aggregator(project, name, role=role))
            except BaseException:
                store.close()
                raise

        return await asyncio.to_thread(opening)

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)

    async def resume(self) -> RecoveredState | None:
        """Where the aggregator stood (None: nothing recorded). The recovered local models
        count toward the open round's bytes in."""
        state = await asyncio.to_thread(self.store.open_round_state, self.agg)
        if state is not None:
            self._bytes_in = {state.open_round: sum(len(r.payload) for r in state.locals)}
        return state

    async def base(self, payload: Buffer, *, framework: str) -> None:
        """Record the base model (a different one after round 0: StoreError, new federation)."""
        await asyncio.to_thread(self.store.record_base, self.agg, payload, framework=framework)

    async def local(
        self,
        *,
        round: int,
        agent: str,
        num_samples: float,
        metrics: Mapping[str, float],
        payload: Buffer,
        kind: ModelKind = ModelKind.LOCAL,
    ) -> None:
        """Record an accepted model of the open round: await it before acknowledging."""
        await asyncio.to_thread(
            self.store.record_local,
            self.agg,
            round=round,
            agent=agent,
            num_samples=num_samples,
            metrics=metrics,
            payload=payload,
            kind=kind,
        )
        self._bytes_in[round] = self._bytes_in.get(round, 0) + memoryview(payload).nbytes

    async def complete(
        self,
        *,
        round: int,
        payload: Buffer,
        contributors: Sequence[Contributor],
        method: str,
        threshold: float,
        started: float,
        completed: float,
        kind: ModelKind,
    ) -> None:
        """Record a completed round and its model: await it before publishing the model."""
        await asyncio.to_thread(
            self.store.complete_round,
            self.agg,
            round=round,
            payload=payload,
            contributors=contributors,
            method=method,
            threshold=threshold,
            started=started,
            completed=completed,
            bytes_in=self._bytes_in.get(round, 0),
            bytes_out=memoryview(payload).nbytes,
            kind=kind,
        )
        self._bytes_in = {r: n for r, n in self._bytes_in.items() if r > round}

    async def adopt(
        self,
        *,
        round: int,
        payload: Buffer,
        framework: str,
        base_sha256: str | None,
        num_samples: float,
    ) -> None:
        """Record an SG model this aggregator adopted (round 0, the base: :meth:`base`)."""
        await asyncio.to_thread(
            self.store.record_adopted,
            self.agg,
            round=round,
            payload=payload,
            framework=framework,
            base_sha256=base_sha256,
            num_samples=num_samples,
        )
