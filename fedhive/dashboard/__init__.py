"""The web dashboard (``fedhive dashboard``): Overview, Aggregation Management, Performance
Tracking, Config & Settings and Models pages over the broker's live statuses and the store,
with a JSON API under ``/api/``.

``create_app(settings)`` builds the ASGI app (FastAPI); :mod:`fedhive.dashboard.cli` has the
click command. The web stack (FastAPI, uvicorn, Jinja2) is imported by those modules only.
"""

from __future__ import annotations

from fedhive.dashboard.settings import DashboardSettings

__all__ = ["DashboardSettings"]
