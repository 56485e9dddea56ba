"""Per-round figures from recorded metric values (what ``fedhive metrics`` prints)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from aggregator.store.types import MetricPoint, MetricSummary


def summarize(points: Sequence[MetricPoint]) -> list[MetricSummary]:
    """Group values by (round, metric): agents' values give mean/min/max and, unless a value
    was measured on the round's model, a sample-weighted mean as the global figure."""
    groups: dict[tuple[int, str], list[MetricPoint]] = {}
    for p in points:
        groups.setdefault((p.round, p.key), []).append(p)
    out: list[MetricSummary] = []
    for (rnd, key), group in sorted(groups.items()):
        for source in ("agent", "aggregator"):
            values = [p for p in group if p.source == source]
            if not values:
                continue
            nums = [p.value for p in values]
            on_model = [p.value for p in group if p.source == "model"]
            global_value: float | None = None
            if source == "agent":
                global_value = on_model[0] if on_model else _weighted_mean(values)
            out.append(
                MetricSummary(
                    round=rnd,
                    key=key,
                    source=source,
                    count=len(nums),
                    mean=math.fsum(nums) / len(nums),
                    min=min(nums),
                    max=max(nums),
                    global_value=global_value,
                    values={p.agent or source: p.value for p in values},
                )
            )
        if not any(p.source in ("agent", "aggregator") for p in group):
            value = next(p.value for p in group if p.source == "model")
            out.append(MetricSummary(rnd, key, "model", 1, value, value, value, value, {}))
    return out


def _weighted_mean(points: Sequence[MetricPoint]) -> float:
    weights = [p.weight or 0.0 for p in points]
    total = math.fsum(weights)
    if total <= 0:
        return math.fsum(p.value for p in points) / len(points)
    return math.fsum(p.value * w for p, w in zip(points, weights, strict=True)) / total
