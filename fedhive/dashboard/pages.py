"""The server-rendered pages: Overview, Aggregation Management, Performance Tracking,
Config & Settings, Models, and the API reference; login/logout and the control form."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from aggregator.store import StoreError
from aggregator.store.export import FORMATS
from aggregator.strategies import STRATEGIES
from common.errors import FedhiveError, MessageError
from common.messages import AggStatusMessage, PresenceState
from fedhive.dashboard import control
from fedhive.dashboard.auth import (
    CSRF_FIELD,
    checked_form,
    csrf_ok,
    csrf_token,
    log_in,
    log_out,
    logged_in,
    page_user,
    password_ok,
    settings_of,
)
from fedhive.dashboard.live import BrokerLink, LiveSnapshot
from fedhive.dashboard.store_view import KINDS, StoreAccess
from fedhive.dashboard.views import query

router = APIRouter(include_in_schema=False)
Form = Annotated[dict[str, str], Depends(checked_form)]
_T = TypeVar("_T")

NAV = (
    ("overview", "/", "Overview"),
    ("aggregation", "/aggregation", "Aggregation"),
    ("performance", "/performance", "Performance"),
    ("settings", "/settings", "Config & Settings"),
    ("models", "/models", "Models"),
    ("api", "/api-docs", "API"),
)
#: Rows of the models table shown at once (the newest); filters narrow the rest.
MODELS_SHOWN = 200


def templates(request: Request) -> Jinja2Templates:
    found: Jinja2Templates = request.app.state.templates
    return found


def link_of(request: Request) -> BrokerLink:
    link: BrokerLink = request.app.state.link
    return link


def store_of(request: Request) -> StoreAccess:
    store: StoreAccess = request.app.state.store
    return store


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to (never another site: no scheme, no ``//``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def render(
    request: Request,
    template: str,
    page: str,
    title: str,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    settings = settings_of(request)
    snap: LiveSnapshot = context.pop("snap", None) or link_of(request).snapshot()
    flash = request.session.pop("flash", None)
    return templates(request).TemplateResponse(
        request,
        template,
        {
            "page": page,
            "title": title,
            "nav": NAV,
            "csrf": csrf_token(request),
            "csrf_field": CSRF_FIELD,
            "project": settings.project,
            "settings": settings,
            "snap": snap,
            "now": snap.now,
            "flash": flash,
            "logged_in": logged_in(request),
            **context,
        },
        status_code=status_code,
    )


def chosen_aggregator(snap: LiveSnapshot, asked: str | None) -> str | None:
    if asked:
        return asked
    return next(iter(snap.aggregators), None)


async def in_thread(func: Callable[[], _T]) -> _T:
    return await run_in_threadpool(func)


# ------------------------------------------------------------------ login
@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str | None = None) -> Response:
    if logged_in(request):
        return RedirectResponse(safe_next(next), status.HTTP_303_SEE_OTHER)
    return render(request, "login.html", "login", "Log in", next=safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    target = safe_next(fields.get("next"))
    if not csrf_ok(request, fields.get(CSRF_FIELD)):
        return render(
            request, "login.html", "login", "Log in", status_code=status.HTTP_403_FORBIDDEN,
            next=target, error="The form expired: log in again.",
        )  # fmt: skip
    if not password_ok(settings_of(request), fields.get("password", "")):
        return render(
            request, "login.html", "login", "Log in", status_code=status.HTTP_401_UNAUTHORIZED,
            next=target, error="Wrong password.",
        )  # fmt: skip
    log_in(request)
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


@router.post("/logout")
async def logout(request: Request, form: Form) -> Response:
    log_out(request)
    return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)


# ------------------------------------------------------------------ live pages
@router.get("/", response_class=HTMLResponse, dependencies=[Depends(page_user)])
async def overview_page(request: Request) -> Response:
    return render(request, "overview.html", "overview", "Overview")


@router.get("/aggregation", response_class=HTMLResponse, dependencies=[Depends(page_user)])
async def aggregation_page(request: Request, aggregator: str | None = None) -> Response:
    snap = link_of(request).snapshot()
    name = chosen_aggregator(snap, aggregator)
    current = snap.aggregators.get(name) if name else None
    return render(
        request, "aggregation.html", "aggregation", "Aggregation Management",
        snap=snap, aggregator=name, status=current, rows=agent_rows(current, snap.now),
        back=back_to("/aggregation", name), counts=state_counts(current),
    )  # fmt: skip


def state_counts(current: AggStatusMessage | None) -> list[tuple[str, int]]:
    """How many listed agents are in each state, in the states' order."""
    if current is None:
        return []
    counts = Counter(a.state for a in current.agents)
    return [(state.value, counts[state]) for state in PresenceState if counts[state]]


def back_to(path: str, aggregator: str | None) -> str:
    return f"{path}?{query(aggregator=aggregator)}" if aggregator else path


def agent_rows(current: AggStatusMessage | None, now: float) -> list[dict[str, Any]]:
    """The agent table: when each agent was last heard (epoch), for the page to age."""
    if current is None:
        return []
    return [
        {
            "name": a.name,
            "state": a.state.value,
            "heard_at": None if a.last_heartbeat is None else current.ts - a.last_heartbeat,
            "last_round": a.last_round,
        }
        for a in current.agents
    ]


@router.get("/settings", response_class=HTMLResponse, dependencies=[Depends(page_user)])
async def settings_page(request: Request, aggregator: str | None = None) -> Response:
    snap = link_of(request).snapshot()
    name = chosen_aggregator(snap, aggregator)
    return render(
        request, "settings.html", "settings", "Config & Settings",
        snap=snap, aggregator=name, status=snap.aggregators.get(name) if name else None,
        methods=sorted(STRATEGIES), back=back_to("/settings", name),
    )  # fmt: skip


@router.post("/control")
async def control_action(request: Request, form: Form) -> Response:
    """A control button or settings form: send the request, show the aggregator's reply."""
    aggregator = form.get("aggregator", "")
    back = safe_next(form.get("next"))
    try:
        command = control.parse_command(form.get("command", ""))
        value = control.parse_value(command, form.get("value"))
        params = control.parse_params(form.get("params"))
    except MessageError as exc:
        request.session["flash"] = {"ok": False, "text": str(exc), "aggregator": aggregator}
        return RedirectResponse(back, status.HTTP_303_SEE_OTHER)
    outcome = await control.send(
        link_of(request), aggregator, command, value, params=params,
        timeout=settings_of(request).request_timeout,
    )  # fmt: skip
    request.session["flash"] = outcome.flash()
    return RedirectResponse(back, status.HTTP_303_SEE_OTHER)


# ------------------------------------------------------------------ store pages
@router.get("/performance", response_class=HTMLResponse, dependencies=[Depends(page_user)])
async def performance_page(
    request: Request, aggregator: str | None = None, metric: str | None = None
) -> Response:
    project = settings_of(request).project
    store = store_of(request)
    metric = metric or None

    def read() -> dict[str, Any]:
        refs = [r for r in store.aggregators(project) if r.role == "aggregator"]
        name = aggregator or (refs[0].name if refs else None)
        perf = store.performance(project, name, metric) if name else None
        keys = sorted({p.key for p in perf.points}) if perf else []
        if perf is not None and metric is not None:
            keys = sorted(set(keys) | {metric})
        return {"refs": refs, "aggregator": name, "perf": perf, "all_keys": keys}

    data, error = await _store_read(read)
    return render(
        request, "performance.html", "performance", "Performance Tracking",
        metric=metric, error=error, formats=FORMATS, **(data or {}),
    )  # fmt: skip


@router.get("/models", response_class=HTMLResponse, dependencies=[Depends(page_user)])
async def models_page(
    request: Request,
    aggregator: str | None = None,
    kind: str | None = None,
    round: str | None = None,
    agent: str | None = None,
) -> Response:
    project = settings_of(request).project
    store = store_of(request)
    aggregator, kind, agent = aggregator or None, kind or None, agent or None
    round_number = int(round) if round and round.isdecimal() else None

    def read() -> dict[str, Any]:
        refs = store.aggregators(project)
        models = store.models(
            project, aggregator=aggregator, kind=kind, round=round_number, agent=agent
        )
        bests = {r.name: store.best(project, r.name) for r in refs if r.role == "aggregator"}
        return {"refs": refs, "models": models[:MODELS_SHOWN], "total": len(models),
                "bests": bests}  # fmt: skip

    if kind is not None and kind not in KINDS:
        data: dict[str, Any] | None = None
        error: str | None = f"unknown kind {kind!r}"
    else:
        data, error = await _store_read(read)
    return render(
        request, "models.html", "models", "Models",
        error=error, formats=FORMATS, kinds=KINDS,
        filters={"aggregator": aggregator, "kind": kind, "round": round_number, "agent": agent},
        **(data or {}),
    )  # fmt: skip


async def _store_read(
    read: Callable[[], dict[str, Any]],
) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return await in_thread(read), None
    except (StoreError, FedhiveError) as exc:
        return None, str(exc)


# ------------------------------------------------------------------ API reference
@router.get("/api-docs", response_class=HTMLResponse, dependencies=[Depends(page_user)])
async def api_page(request: Request) -> Response:
    """The JSON API, listed from the app's OpenAPI document (no third-party viewer)."""
    spec = request.app.openapi()
    operations = [
        {
            "method": method.upper(),
            "path": path,
            "summary": str(op.get("description") or op.get("summary", "")).split("\n\n")[0],
            "parameters": [p.get("name", "") for p in op.get("parameters", [])],
        }
        for path, item in spec.get("paths", {}).items()
        for method, op in item.items()
    ]
    return render(request, "api.html", "api", "API", operations=operations)


__all__ = ["router", "safe_next"]
