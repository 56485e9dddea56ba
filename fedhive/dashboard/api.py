"""The JSON API under ``/api/``: what the pages show, documented by the OpenAPI document at
``/api/openapi.json``. Every route needs a session or ``Authorization: Bearer <token>``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from aggregator.store import CorruptBlobError, ModelNotFoundError, StoreError
from aggregator.store.export import FORMATS
from common.errors import CodecError
from common.messages import AggStatusMessage, SgStatusMessage
from fedhive.dashboard import control
from fedhive.dashboard.auth import api_user, api_writer, settings_of
from fedhive.dashboard.pages import link_of, store_of
from fedhive.dashboard.store_view import KINDS, NothingRecordedError
from fedhive.dashboard.views import (
    ControlIn,
    ControlOut,
    MetricPointOut,
    MetricsOut,
    MetricSummaryOut,
    ModelOut,
    OverviewOut,
    overview,
)

router = APIRouter(prefix="/api", tags=["api"], dependencies=[Depends(api_user)])
writer = APIRouter(prefix="/api", tags=["api"], dependencies=[Depends(api_writer)])

#: Seconds between comments on an idle event stream (keeps proxies from closing it).
KEEPALIVE = 15.0
#: Seconds at least between two snapshots on one stream (bursts of updates coalesce).
MIN_INTERVAL = 0.1

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "no session and no (or a wrong) bearer token"}
}


# ------------------------------------------------------------------ live
@router.get("/overview", responses=_UNAUTHORIZED)
async def get_overview(request: Request) -> OverviewOut:
    """Every aggregator's latest status and the SG layer's, as the broker said them."""
    return overview(settings_of(request).project, link_of(request).snapshot())


@router.get("/aggregators/{name}", responses={404: {"description": "no status from it"}})
async def get_aggregator(request: Request, name: str) -> AggStatusMessage:
    """One aggregator's latest status (the Aggregation Management view, agents included)."""
    found = link_of(request).status(name)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no status from aggregator {name!r}")
    return found


@router.get("/sg", responses={404: {"description": "no sg-aggregator status"}})
async def get_sg(request: Request) -> SgStatusMessage:
    """The sg-aggregator's latest status."""
    found = link_of(request).snapshot().sg
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no sg-aggregator status in this project")
    return found


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "snapshots"}},
)
async def events(
    request: Request,
    agents: Annotated[
        str, Query(description="whose agent tables to send: all, none or an aggregator's name")
    ] = "all",
) -> StreamingResponse:
    """Server-sent events: a ``snapshot`` event (an :class:`OverviewOut`) now and after every
    change; a comment line every 15 s while nothing changes."""
    link = link_of(request)
    project = settings_of(request).project

    async def stream() -> AsyncIterator[str]:
        seen = -1
        connected: bool | None = None
        quiet = 0.0
        while not link.closed and not await request.is_disconnected():
            version = await link.wait_changed(seen, timeout=1.0)
            if version == seen and link.connected == connected:
                quiet += 1.0
                if quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                continue
            quiet = 0.0
            snap = link.snapshot()
            seen, connected = snap.version, snap.connected
            data = overview(project, snap, agents=agents).model_dump_json()
            yield f"event: snapshot\ndata: {data}\n\n"
            await asyncio.sleep(MIN_INTERVAL)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@writer.post(
    "/aggregators/{name}/control",
    responses={
        400: {"description": "a malformed request (bad value for the command)"},
        403: {"description": "session without the X-CSRF-Token header"},
        502: {"description": "not connected to the broker"},
        504: {"description": "no aggregator answered in time"},
    },
)
async def post_control(request: Request, name: str, body: ControlIn) -> JSONResponse:
    """Send one control request to aggregator ``name``; the reply (``ok`` false: refused,
    HTTP 409)."""
    outcome = await control.send(
        link_of(request), name, body.command, body.value, params=body.params,
        timeout=settings_of(request).request_timeout,
    )  # fmt: skip
    if outcome.reply is None:
        code = {
            "invalid": status.HTTP_400_BAD_REQUEST,
            "no_answer": status.HTTP_504_GATEWAY_TIMEOUT,
        }.get(outcome.failure or "", status.HTTP_502_BAD_GATEWAY)
        return JSONResponse({"detail": outcome.text}, status_code=code)
    out = ControlOut(aggregator=name, reply=outcome.reply)
    code = status.HTTP_200_OK if outcome.reply.ok else status.HTTP_409_CONFLICT
    return JSONResponse(json.loads(out.model_dump_json()), status_code=code)


# ------------------------------------------------------------------ store
def _store_errors(exc: Exception) -> HTTPException:
    if isinstance(exc, ModelNotFoundError):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    if isinstance(exc, CorruptBlobError):
        return HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc))
    if isinstance(exc, NothingRecordedError):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    return HTTPException(status.HTTP_400_BAD_REQUEST, str(exc))


@router.get("/models", responses={404: {"description": "nothing recorded yet"}})
async def get_models(
    request: Request,
    aggregator: str | None = None,
    kind: Annotated[str | None, Query(description=", ".join(KINDS))] = None,
    round: Annotated[int | None, Query(ge=0)] = None,
    agent: str | None = None,
) -> list[ModelOut]:
    """Stored models, newest first (``fedhive models list``)."""
    project = settings_of(request).project
    store = store_of(request)
    if kind is not None and kind not in KINDS:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown kind {kind!r}")
    try:
        found = await run_in_threadpool(
            store.models, project, aggregator=aggregator, kind=kind, round=round, agent=agent
        )
    except (StoreError, CodecError) as exc:
        raise _store_errors(exc) from exc
    return [ModelOut.of(m) for m in found]


@router.get("/models/best", responses={404: {"description": "no model has the metric"}})
async def get_best(
    request: Request, aggregator: str | None = None, metric: str | None = None
) -> ModelOut:
    """The best model by ``metric`` (default: the dashboard's best metric)."""
    project = settings_of(request).project
    store = store_of(request)
    try:
        best = await run_in_threadpool(
            lambda: store.reader().best_model(project=project, aggregator=aggregator, metric=metric)
        )
    except (StoreError, CodecError) as exc:
        raise _store_errors(exc) from exc
    return ModelOut.of(best)


@router.get(
    "/models/download",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the model file"},
        404: {"description": "no such model, or its bytes were pruned"},
    },
)
async def download(
    request: Request,
    kind: Annotated[str, Query(description=", ".join(KINDS))] = "global",
    format: Annotated[str, Query(description=", ".join(FORMATS))] = "npz",
    aggregator: str | None = None,
    round: Annotated[int | None, Query(ge=0)] = None,
    agent: str | None = None,
    metric: str | None = None,
) -> FileResponse:
    """One stored model as a file, in the formats of ``fedhive models download``: pytorch
    (``torch.load(f, weights_only=True)``), keras and npz (``np.load``), msgpack (the frame)."""
    project = settings_of(request).project
    store = store_of(request)
    try:
        exported = await run_in_threadpool(
            lambda: store.export(
                project, kind=kind, fmt=format, aggregator=aggregator, round=round,
                agent=agent, metric=metric,
            )
        )  # fmt: skip
    except (StoreError, CodecError) as exc:
        raise _store_errors(exc) from exc
    headers = {"X-Fedhive-Round": str(exported.info.round),
               "X-Fedhive-Sha256": exported.info.sha256}  # fmt: skip
    return FileResponse(
        exported.path,
        media_type="application/octet-stream",
        filename=exported.filename,
        headers=headers,
        background=BackgroundTask(exported.cleanup),
    )


@router.get("/metrics", responses={404: {"description": "nothing recorded yet"}})
async def get_metrics(
    request: Request, aggregator: str | None = None, metric: str | None = None
) -> MetricsOut:
    """Per completed round and metric: mean/min/max and the global figure, every recorded
    value, and the best model (``fedhive metrics``)."""
    project = settings_of(request).project
    store = store_of(request)
    try:
        perf = await run_in_threadpool(store.performance, project, aggregator, metric, charts=False)
    except (StoreError, CodecError) as exc:
        raise _store_errors(exc) from exc
    return MetricsOut(
        project=project,
        aggregator=perf.aggregator.name,
        summaries=[MetricSummaryOut.of(s) for s in perf.summaries],
        points=[MetricPointOut.of(p) for p in perf.points],
        best=None if perf.best is None else ModelOut.of(perf.best),
    )


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    """This API's OpenAPI document."""
    return JSONResponse(request.app.openapi())


__all__ = ["router", "writer"]
