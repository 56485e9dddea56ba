"""The sg-aggregator: one federation over many aggregators (semi-global models)."""

from __future__ import annotations

from aggregator.sg.liveness import AggregatorTracker, TrackedAggregator
from aggregator.sg.service import SgAggregatorService

__all__ = ["AggregatorTracker", "SgAggregatorService", "TrackedAggregator"]
