"""The dashboard's ASGI app: ``create_app(settings)``.

It adds no second source of truth: live statuses come from the broker (one
:class:`~fedhive.dashboard.live.BrokerLink`), history and models from the store (the
``StoreReader`` the CLI uses), and changes go through the aggregators' control topics.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from common.transport import Transport
from fedhive.dashboard import api, pages
from fedhive.dashboard.auth import SESSION_COOKIE, LoginRequiredError
from fedhive.dashboard.live import BrokerLink
from fedhive.dashboard.settings import DashboardSettings
from fedhive.dashboard.store_view import StoreAccess
from fedhive.dashboard.views import FILTERS, query

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"

#: Everything the pages load comes from the dashboard itself (closed networks: no CDN).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def _version() -> str:
    try:
        return version("fedhive")
    except PackageNotFoundError:
        return "0"


def create_app(
    settings: DashboardSettings,
    *,
    transport_factory: Callable[[], Transport] | None = None,
) -> FastAPI:
    """The dashboard for ``settings.project``.

    Args:
        settings: where the broker and the store are, and the accepted passwords.
        transport_factory: the broker connection to use instead of MQTT (tests).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        link = BrokerLink(
            settings=settings.broker,
            project=settings.project,
            sender=settings.admin_user,
            transport_factory=transport_factory,
        )
        async with link:
            app.state.link = link
            try:
                yield
            finally:
                store.close()

    app = FastAPI(
        title="fedhive dashboard",
        version=_version(),
        description=(
            "The JSON API of the fedhive dashboard: live aggregator and SG status from the "
            "broker, control requests, stored models and metrics. Authenticate with the "
            "dashboard's session or `Authorization: Bearer <admin password or token>`."
        ),
        lifespan=lifespan,
        # FastAPI's viewers load their scripts from a CDN: the dashboard lists the API itself
        # (/api-docs) and serves the document behind the same login (/api/openapi.json).
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    store = StoreAccess(
        data_dir=settings.data_dir, url=settings.db_url, best_metric=settings.best_metric
    )
    templates = Jinja2Templates(directory=TEMPLATE_DIR)
    templates.env.filters.update(FILTERS)
    templates.env.globals["query"] = query
    app.state.settings = settings
    app.state.store = store
    app.state.templates = templates

    secret = settings.session_secret
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret.get_secret_value() if secret else secrets.token_urlsafe(32),
        session_cookie=SESSION_COOKIE,
        max_age=settings.session_max_age,
        same_site="strict",
        https_only=settings.secure_cookies,
    )

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoginRequiredError)
    async def to_login(request: Request, exc: LoginRequiredError) -> Response:
        return RedirectResponse(exc.login_url(), status_code=303)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(api.writer)
    return app


__all__ = ["CONTENT_SECURITY_POLICY", "create_app"]
