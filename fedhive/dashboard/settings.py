"""What the dashboard needs to know: where the broker and the store are, and what opens it.

The password that logs a person in is the project's admin password (``fedhive broker init``
writes it to ``credentials.json`` in the broker's data directory) or a token of the operator's
choice (``--token`` / ``FEDHIVE_DASHBOARD_TOKEN``); either also works as an API bearer token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from broker.security import Role, load_credentials
from common.config import DEFAULT_PROJECT, BrokerSettings
from common.errors import ConfigError, MessageError
from common.topics import check_name

DEFAULT_DATA_DIR = Path("./fedhive-data")
DEFAULT_ADMIN = "admin"
#: The admin account the dashboard uses when the credentials have one of that name.
DASHBOARD_ADMIN = "dashboard"


class DashboardSettings(BaseModel):
    """Settings of one dashboard (one project).

    Args:
        broker: how to reach the broker, as the admin (control requests are sent as
            ``admin_user``; the aggregator checks it against its ``admins``).
        project: the project shown.
        admin_user: the name control requests are sent under.
        data_dir: the aggregators' data directory (SQLite store and model blobs).
        db_url: a database URL instead of the SQLite file in ``data_dir``.
        best_metric: the metric the best model is ranked by.
        admin_password: the admin password, accepted to log in (and as a bearer token).
        token: another accepted password / bearer token.
        session_secret: signs the session cookie; None: a random one per start (sessions end
            when the dashboard restarts).
        request_timeout: seconds to wait for an aggregator's answer to a control request.
        secure_cookies: send the session cookie over HTTPS only (behind a TLS proxy).
        session_max_age: seconds a login lasts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: BrokerSettings = Field(default_factory=lambda: BrokerSettings())
    project: str = DEFAULT_PROJECT
    admin_user: str = DEFAULT_ADMIN
    data_dir: Path = DEFAULT_DATA_DIR
    db_url: str | None = None
    best_metric: str = "accuracy"
    admin_password: SecretStr | None = None
    token: SecretStr | None = None
    session_secret: SecretStr | None = None
    request_timeout: float = Field(default=5.0, gt=0, le=300)
    secure_cookies: bool = False
    session_max_age: int = Field(default=12 * 3600, gt=0)

    @model_validator(mode="after")
    def _checked(self) -> Self:
        try:
            check_name("project", self.project)
            check_name("admin", self.admin_user)
        except MessageError as exc:
            raise ValueError(str(exc)) from None
        if not self.passwords():
            raise ValueError(
                "the dashboard needs a password: the admin password (--broker-data-dir, read "
                "from credentials.json) or a token (--token / FEDHIVE_DASHBOARD_TOKEN)"
            )
        return self

    def passwords(self) -> list[str]:
        """The secrets that log a person in (non-empty ones)."""
        return [
            s.get_secret_value()
            for s in (self.admin_password, self.token)
            if s is not None and s.get_secret_value()
        ]

    @classmethod
    def create(cls, **values: Any) -> DashboardSettings:
        """Validated settings; ConfigError names what is wrong."""
        try:
            return cls.model_validate(values)
        except (ValidationError, ValueError) as exc:
            raise ConfigError(f"dashboard settings: {_first_error(exc)}") from exc

    @classmethod
    def from_credentials(
        cls,
        broker_data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        ca_file: Path | None = None,
        **values: Any,
    ) -> DashboardSettings:
        """Settings from a broker data directory: its project, an admin account for the broker
        connection (``admin_user``, else ``dashboard`` if there is one, else the first admin)
        and the first admin's password to log in; ``values`` override.

        Raises:
            ConfigError: no or bad ``credentials.json``, or bad settings.
        """
        credentials = load_credentials(broker_data_dir)
        admins = credentials.names(Role.ADMIN)
        # A user name holds one connection at a time: an admin account of the dashboard's own
        # (`fedhive broker init --admin admin --admin dashboard`) lets the CLI run beside it.
        admin = values.pop("admin_user", None) or (
            DASHBOARD_ADMIN if DASHBOARD_ADMIN in admins else admins[0]
        )
        if credentials.account(admin).role is not Role.ADMIN:
            raise ConfigError(f"broker user {admin!r} is not an admin of {credentials.project}")
        broker = credentials.broker_settings(admin, host=host, port=port, ca_file=ca_file)
        given = {
            "project": credentials.project,
            "broker": broker,
            "admin_user": admin,
            # The password printed by `fedhive broker init` (the first admin's) logs in.
            "admin_password": credentials.account(admins[0]).password,
        }
        return cls.create(**{**given, **values})


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)


__all__ = ["DASHBOARD_ADMIN", "DEFAULT_ADMIN", "DEFAULT_DATA_DIR", "DashboardSettings"]
