"""Who may use the dashboard, and CSRF protection of what they post.

* A person logs in by posting the admin password (or the configured token) to ``/login``; the
  session cookie (signed by Starlette's SessionMiddleware with itsdangerous, ``SameSite=Strict``,
  ``HttpOnly``) then says so. Logging in starts a new session (no fixation).
* Every session has a random CSRF token; every form carries it in a hidden ``csrf`` field and
  every POST is refused (403) unless it matches. API writes authenticated by the session send it
  in the ``X-CSRF-Token`` header.
* Scripts call the API with ``Authorization: Bearer <admin password or token>`` (no cookie, so
  no CSRF token needed).
* Unauthenticated: pages redirect to ``/login`` (303); the API and downloads answer 401.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedhive.dashboard.settings import DashboardSettings

CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_COOKIE = "fedhive_dashboard"

_bearer = HTTPBearer(
    auto_error=False,
    description="The admin password (from `fedhive broker init`) or the dashboard token.",
)


class LoginRequiredError(Exception):
    """A page was asked for without a session: the app answers with a redirect to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path

    def login_url(self) -> str:
        return "/login?next=" + quote(self.next_path, safe="/")


def settings_of(request: Request) -> DashboardSettings:
    settings: DashboardSettings = request.app.state.settings
    return settings


def password_ok(settings: DashboardSettings, given: str) -> bool:
    """Whether ``given`` is one of the accepted secrets (compared in constant time)."""
    candidate = given.encode("utf-8", "surrogateescape")
    ok = False
    for secret in settings.passwords():
        ok |= hmac.compare_digest(candidate, secret.encode("utf-8"))
    return ok


def csrf_token(request: Request) -> str:
    """This session's CSRF token (created on first use)."""
    token = request.session.get(CSRF_FIELD)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session[CSRF_FIELD] = token
    return token


def csrf_ok(request: Request, given: Any) -> bool:
    expected = request.session.get(CSRF_FIELD)
    if not isinstance(given, str) or not isinstance(expected, str) or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def log_in(request: Request) -> None:
    """A fresh session: authenticated, with a new CSRF token."""
    request.session.clear()
    request.session["auth"] = True
    request.session[CSRF_FIELD] = secrets.token_urlsafe(32)


def log_out(request: Request) -> None:
    request.session.clear()


def logged_in(request: Request) -> bool:
    return request.session.get("auth") is True


# ------------------------------------------------------------------ dependencies
def page_user(request: Request) -> None:
    """Pages: a session, else a redirect to the login page."""
    if not logged_in(request):
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequiredError(path)


async def checked_form(request: Request) -> dict[str, str]:
    """Page POSTs: a session and the matching CSRF field; the form's text fields."""
    page_user(request)
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not csrf_ok(request, fields.get(CSRF_FIELD)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")
    return fields


def api_user(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The API and downloads: a bearer token or a session, else 401. Returns how."""
    if bearer is not None:
        if password_ok(settings_of(request), bearer.credentials):
            return "token"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "wrong token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if logged_in(request):
        return "session"
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "log in, or send Authorization: Bearer <admin password or token>",
        headers={"WWW-Authenticate": "Bearer"},
    )


def api_writer(request: Request, via: Annotated[str, Depends(api_user)]) -> str:
    """API writes: as :func:`api_user`, and a session must send its CSRF token as a header."""
    if via == "session" and not csrf_ok(request, request.headers.get(CSRF_HEADER)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header")
    return via


__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "LoginRequiredError",
    "api_user",
    "api_writer",
    "checked_form",
    "csrf_ok",
    "csrf_token",
    "log_in",
    "log_out",
    "logged_in",
    "page_user",
    "password_ok",
]
