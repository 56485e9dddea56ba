"""Credentials, password file, ACL and TLS files of a secured fedhive broker.

``fedhive broker init --project P`` calls :func:`init_project`, which writes into the broker's data
directory:

- ``credentials.json`` (mode 0600): every user's plaintext password, for the operator, who hands
  each component its own (an agent's is the ``token`` of its config). Nothing else stores them.
- ``passwd``: Mosquitto's password file (salted PBKDF2-SHA512 hashes, by ``mosquitto_passwd``);
- ``acl``: the project's ACL (:mod:`broker.acl`);
- with TLS, ``tls/``: a development CA and a server certificate (:mod:`broker.tls`).

User names: an agent logs in as its agent name (the default of ``AgentConfig.username``), the
admin as ``admin`` (or the admin names given: one per admin tool that runs at the same time, since
a user name holds one session) and each (sg-)aggregator as its own name; names are unique across
roles.
:func:`add_agent` and :func:`remove_agent` change the password file only (the ACL's ``%u``
patterns cover any agent); a running broker picks the change up on SIGHUP
(:func:`broker.process.reload_broker`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from broker._files import write_private
from broker.acl import render_acl
from broker.process import TLSListener
from broker.tls import DEFAULT_HOSTNAMES, DevPKI, check_hostnames, create_dev_pki
from common.config import DEFAULT_AGGREGATOR, BrokerSettings, TLSSettings, parse_settings
from common.errors import BrokerError, ConfigError, MessageError
from common.topics import check_name

__all__ = [
    "ACL_FILE",
    "CREDENTIALS_FILE",
    "DEFAULT_ADMIN",
    "PASSWORD_FILE",
    "TLS_DIR",
    "Account",
    "ProjectCredentials",
    "Role",
    "SecurityFiles",
    "add_agent",
    "find_mosquitto_passwd",
    "init_project",
    "load_credentials",
    "read_agent_names",
    "remove_agent",
    "security_files",
    "write_password_file",
]

log = logging.getLogger(__name__)

CREDENTIALS_FILE: Final = "credentials.json"
PASSWORD_FILE: Final = "passwd"
ACL_FILE: Final = "acl"
TLS_DIR: Final = "tls"
DEFAULT_ADMIN: Final = "admin"
# Serialises init/add/remove between processes (two operators, or a script and a person).
_LOCK_FILE: Final = ".security.lock"
# 32 characters of [A-Za-z0-9_-]: 192 bits, no ':' (the password file's separator) or space.
_PASSWORD_BYTES: Final = 24
_MOSQUITTO_PASSWD_FALLBACKS: Final = (
    "/usr/bin/mosquitto_passwd",
    "/usr/local/bin/mosquitto_passwd",
    "/opt/homebrew/bin/mosquitto_passwd",
)
_HASH_PREFIXES: Final = ("$7$", "$6$")  # PBKDF2-SHA512 (2.0's default), salted SHA512


class Role(StrEnum):
    """What a broker user is to fedhive; the ACL grants per role."""

    ADMIN = "admin"
    AGGREGATOR = "aggregator"
    SG_AGGREGATOR = "sg-aggregator"
    AGENT = "agent"


class Account(BaseModel):
    """One broker user: its name (also its MQTT client id), role and password."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role
    password: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _valid_name("user", value)

    @field_validator("password")
    @classmethod
    def _password(cls, value: str) -> str:
        # One line "name:password" of mosquitto_passwd's input must stay one line.
        if not value or any(c in value for c in ":\r\n\0"):
            raise ValueError("a password must be non-empty, without ':', newline or NUL")
        return value


class ProjectCredentials(BaseModel):
    """The content of ``credentials.json``: a project's users and whether TLS files exist."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    project: str
    #: Host names and addresses of the dev server certificate; ``None`` without TLS.
    tls_hostnames: list[str] | None = None
    accounts: list[Account]

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        return _valid_name("project", value)

    @model_validator(mode="after")
    def _unique_names(self) -> ProjectCredentials:
        seen: set[str] = set()
        for account in self.accounts:
            if account.name in seen:
                raise ValueError(f"user name {account.name!r} appears twice")
            seen.add(account.name)
        if not any(account.role is Role.ADMIN for account in self.accounts):
            raise ValueError("there is no admin account")
        return self

    def account(self, name: str) -> Account:
        """The account called ``name``.

        Raises:
            ConfigError: there is none.
        """
        for account in self.accounts:
            if account.name == name:
                return account
        raise ConfigError(f"project {self.project} has no broker user {name!r}")

    def names(self, role: Role) -> list[str]:
        """The user names of one role, in enrolment order."""
        return [account.name for account in self.accounts if account.role is role]

    def broker_settings(
        self, name: str, *, host: str = "127.0.0.1", port: int = 1883, ca_file: Path | None = None
    ) -> BrokerSettings:
        """Connection settings for user ``name`` (TLS, verifying the server, with ``ca_file``)."""
        account = self.account(name)
        tls = TLSSettings(enabled=True, ca_file=ca_file) if ca_file is not None else TLSSettings()
        return BrokerSettings(
            host=host, port=port, username=account.name, password=account.password, tls=tls
        )

    def agent_config_entries(self, name: str, *, ca_file: Path | None = None) -> dict[str, Any]:
        """The keys of an agent config (JSON) that let agent ``name`` log in."""
        account = self.account(name)
        if account.role is not Role.AGENT:
            raise ConfigError(f"broker user {name!r} is the {account.role.value}, not an agent")
        entries: dict[str, Any] = {
            "agent_name": name,
            "project": self.project,
            "token": account.password,
        }
        if ca_file is not None:
            entries["tls"] = {"enabled": True, "ca_file": str(ca_file)}
        return entries


@dataclass(frozen=True, slots=True)
class SecurityFiles:
    """Where a data directory's security files are (see :func:`security_files`)."""

    data_dir: Path
    project: str
    credentials_file: Path
    password_file: Path
    acl_file: Path
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None

    def tls_listener(
        self, *, port: int | None = None, bind_address: str | None = None
    ) -> TLSListener | None:
        """The broker's TLS listener for these files, ``None`` if init made no certificates."""
        if self.server_cert is None or self.server_key is None:
            return None
        return TLSListener(
            certfile=self.server_cert,
            keyfile=self.server_key,
            cafile=self.ca_cert,
            port=port,
            bind_address=bind_address,
        )


def init_project(
    data_dir: Path,
    *,
    project: str,
    agents: Iterable[str] = (),
    aggregators: Iterable[str] = (DEFAULT_AGGREGATOR,),
    sg_aggregators: Iterable[str] = (),
    admins: Iterable[str] = (DEFAULT_ADMIN,),
    tls: bool = False,
    hostnames: Iterable[str] | None = None,
    force: bool = False,
    mosquitto_passwd: Path | None = None,
) -> ProjectCredentials:
    """Create the credentials, password file, ACL and (with ``tls``) certificates of a project.

    Args:
        data_dir: the broker's data directory (``fedhive broker start --data-dir``).
        project: the project the ACL covers.
        agents: agents to enrol now (more later with :func:`add_agent`).
        aggregators: aggregator names.
        sg_aggregators: semi-global aggregator names.
        admins: the admins' user names (at least one). A user name holds one connection at a
            time, so admin tools that run at the same time need one each.
        tls: also create a development CA and a server certificate.
        hostnames: names and addresses the server certificate is valid for (default
            ``localhost`` and ``127.0.0.1``).
        force: replace existing credentials (every password changes).
        mosquitto_passwd: the ``mosquitto_passwd`` executable; searched for when ``None``.

    Returns:
        The new credentials (also in ``data_dir/credentials.json``).

    Raises:
        ConfigError: a bad or repeated name, or the directory already holds credentials and
            ``force`` is not set.
        BrokerError: ``mosquitto_passwd`` is missing or fails.
    """
    data_dir = Path(data_dir).absolute()
    project = _valid_name("project", project)
    tool = mosquitto_passwd or find_mosquitto_passwd()
    names: list[tuple[str, Role]] = [(name, Role.ADMIN) for name in admins]
    names += [(name, Role.AGGREGATOR) for name in aggregators]
    names += [(name, Role.SG_AGGREGATOR) for name in sg_aggregators]
    names += [(name, Role.AGENT) for name in agents]
    roles: dict[str, Role] = {}
    for name, role in names:
        if name in roles:
            raise ConfigError(
                f"name {name!r} is given twice ({roles[name].value} and {role.value}): broker "
                "user names must be unique, across roles too"
            )
        roles[name] = role
    accounts = [
        Account(name=_valid_name(role.value, n), role=role, password=_new_password())
        for n, role in names
    ]
    tls_names: list[str] | None = None
    if tls:
        tls_names = list(dict.fromkeys(hostnames if hostnames is not None else DEFAULT_HOSTNAMES))
        check_hostnames(tls_names)
    credentials = _validated(
        {
            "project": project,
            "tls_hostnames": tls_names,
            "accounts": [a.model_dump() for a in accounts],
        },
        "the new credentials",
    )
    _make_private_dir(data_dir)
    with _locked(data_dir):
        existing = data_dir / CREDENTIALS_FILE
        if existing.exists() and not force:
            raise ConfigError(
                f"{data_dir} already holds broker credentials ({existing}); enrol agents with "
                "`fedhive broker add-agent`, or pass --force to replace every credential"
            )
        if tls_names is not None:
            create_dev_pki(
                data_dir / TLS_DIR, project=credentials.project, hostnames=tuple(tls_names)
            )
        write_password_file(data_dir / PASSWORD_FILE, credentials.accounts, mosquitto_passwd=tool)
        acl = render_acl(
            credentials.project,
            admins=credentials.names(Role.ADMIN),
            aggregators=credentials.names(Role.AGGREGATOR),
            sg_aggregators=credentials.names(Role.SG_AGGREGATOR),
        )
        write_private(data_dir / ACL_FILE, acl.encode("utf-8"))
        # Last: credentials.json is what says the directory is initialised.
        _save(data_dir, credentials)
    return credentials


def add_agent(
    data_dir: Path,
    name: str,
    *,
    project: str | None = None,
    mosquitto_passwd: Path | None = None,
) -> Account:
    """Enrol agent ``name``: a new password in the credentials and the password file.

    The ACL needs no change. A running broker admits the agent after a reload (SIGHUP,
    :func:`broker.process.reload_broker`) or a restart.

    Args:
        data_dir: the initialised broker data directory.
        name: the agent name (its user name and MQTT client id).
        project: if given, must be the directory's project (guards against a wrong directory).
        mosquitto_passwd: the ``mosquitto_passwd`` executable; searched for when ``None``.

    Returns:
        The new account (its password is the agent config's ``token``).

    Raises:
        ConfigError: not initialised, another project, a bad name or one already in use.
        BrokerError: ``mosquitto_passwd`` is missing or fails.
    """
    data_dir = Path(data_dir).absolute()
    tool = mosquitto_passwd or find_mosquitto_passwd()
    name = _valid_name("agent", name)
    with _locked(data_dir):
        credentials = _load_for(data_dir, project)
        for account in credentials.accounts:
            if account.name == name:
                raise ConfigError(
                    f"broker user {name!r} already exists in project {credentials.project} "
                    f"(the {account.role.value}); pick another agent name"
                )
        account = Account(name=name, role=Role.AGENT, password=_new_password())
        updated = credentials.model_copy(update={"accounts": [*credentials.accounts, account]})
        write_password_file(data_dir / PASSWORD_FILE, updated.accounts, mosquitto_passwd=tool)
        _save(data_dir, updated)
    return account


def remove_agent(
    data_dir: Path,
    name: str,
    *,
    project: str | None = None,
    mosquitto_passwd: Path | None = None,
) -> None:
    """Revoke agent ``name``: drop it from the credentials and the password file.

    After a reload (SIGHUP) the broker refuses its logins. Arguments are :func:`add_agent`'s.

    Raises:
        ConfigError: not initialised, another project, or no such agent.
        BrokerError: ``mosquitto_passwd`` is missing or fails.
    """
    data_dir = Path(data_dir).absolute()
    tool = mosquitto_passwd or find_mosquitto_passwd()
    with _locked(data_dir):
        credentials = _load_for(data_dir, project)
        if credentials.account(name).role is not Role.AGENT:
            raise ConfigError(f"broker user {name!r} is not an agent; only agents can be removed")
        kept = [account for account in credentials.accounts if account.name != name]
        updated = credentials.model_copy(update={"accounts": kept})
        write_password_file(data_dir / PASSWORD_FILE, updated.accounts, mosquitto_passwd=tool)
        _save(data_dir, updated)


def load_credentials(data_dir: Path) -> ProjectCredentials:
    """Read ``data_dir/credentials.json``.

    Raises:
        ConfigError: it is missing, unreadable or invalid.
    """
    path = Path(data_dir).absolute() / CREDENTIALS_FILE
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"no broker credentials in {path.parent}: run `fedhive broker init --project P "
            f"--data-dir {path.parent}` first"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return _validated(data, str(path))


def security_files(data_dir: Path) -> SecurityFiles:
    """The security files ``fedhive broker init`` wrote into ``data_dir``, checked to exist.

    Raises:
        ConfigError: the directory is not initialised or a file is missing.
    """
    data_dir = Path(data_dir).absolute()
    credentials = load_credentials(data_dir)
    pki = DevPKI.at(data_dir / TLS_DIR) if credentials.tls_hostnames is not None else None
    files = SecurityFiles(
        data_dir=data_dir,
        project=credentials.project,
        credentials_file=data_dir / CREDENTIALS_FILE,
        password_file=data_dir / PASSWORD_FILE,
        acl_file=data_dir / ACL_FILE,
        ca_cert=pki.ca_cert if pki else None,
        server_cert=pki.server_cert if pki else None,
        server_key=pki.server_key if pki else None,
    )
    required = [files.password_file, files.acl_file, files.ca_cert, files.server_cert]
    required.append(files.server_key)
    missing = [str(path) for path in required if path is not None and not path.is_file()]
    if missing:
        raise ConfigError(
            f"broker security files missing: {', '.join(missing)}; run `fedhive broker init "
            f"--project {credentials.project} --data-dir {data_dir} --force` to recreate them"
        )
    return files


def write_password_file(
    path: Path, accounts: Iterable[Account], *, mosquitto_passwd: Path | None = None
) -> None:
    """Write Mosquitto's password file for ``accounts`` (hashed by ``mosquitto_passwd -U``).

    The plaintext exists only in a 0600 file next to ``path`` while ``mosquitto_passwd`` hashes
    it (passwords never appear on a command line, where ``ps`` shows them); the hashed file then
    replaces ``path`` atomically, so a broker reloading meanwhile reads the old or the new one.

    Raises:
        BrokerError: ``mosquitto_passwd`` is missing, fails or leaves a password unhashed.
    """
    tool = mosquitto_passwd or find_mosquitto_passwd()
    accounts = list(accounts)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    plain = "".join(f"{account.name}:{account.password}\n" for account in accounts)
    try:
        write_private(partial, plain.encode("utf-8"))
        try:
            result = subprocess.run(
                [str(tool), "-U", str(partial)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrokerError(f"cannot run {tool}: {exc}") from exc
        if result.returncode != 0:
            raise BrokerError(
                f"{tool} -U failed with code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        lines = partial.read_text(encoding="utf-8").splitlines()
        hashed = dict(line.split(":", 1) for line in lines if ":" in line)
        if sorted(hashed) != sorted(a.name for a in accounts) or not all(
            value.startswith(_HASH_PREFIXES) for value in hashed.values()
        ):
            raise BrokerError(f"{tool} -U did not hash every password in the password file")
        os.chmod(partial, 0o600)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def find_mosquitto_passwd() -> Path:
    """Return the path of ``mosquitto_passwd`` (part of the mosquitto package).

    Raises:
        BrokerError: it is neither on ``PATH`` nor in a usual bin directory.
    """
    found = shutil.which("mosquitto_passwd")
    if found:
        return Path(found)
    for candidate in _MOSQUITTO_PASSWD_FALLBACKS:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise BrokerError(
        "mosquitto_passwd not found; it comes with mosquitto "
        "(Debian/Ubuntu: `apt-get install -y mosquitto`, macOS: `brew install mosquitto`)"
    )


def read_agent_names(path: Path) -> list[str]:
    """Read an agent enrolment list: one agent name a line; blank lines and ``#`` comments skip.

    Raises:
        ConfigError: the file cannot be read or names an invalid agent.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the agent list {path}: {exc}") from exc
    names = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            names.append(check_name("agent", line))
        except MessageError as exc:
            raise ConfigError(f"{path}, line {number}: {exc}") from None
    return names


# -- internals ------------------------------------------------------------------------------------


def _new_password() -> str:
    return secrets.token_urlsafe(_PASSWORD_BYTES)


def _valid_name(kind: str, value: str) -> str:
    try:
        return check_name(kind, value)
    except MessageError as exc:
        raise ConfigError(str(exc)) from None


def _validated(data: Any, source: str) -> ProjectCredentials:
    return parse_settings(ProjectCredentials, data, source=source)


def _load_for(data_dir: Path, project: str | None) -> ProjectCredentials:
    credentials = load_credentials(data_dir)
    if project is not None and project != credentials.project:
        raise ConfigError(
            f"{data_dir} holds the credentials of project {credentials.project}, not {project}"
        )
    return credentials


def _save(data_dir: Path, credentials: ProjectCredentials) -> None:
    text = json.dumps(credentials.model_dump(mode="json"), indent=2) + "\n"
    write_private(data_dir / CREDENTIALS_FILE, text.encode("utf-8"))


def _make_private_dir(path: Path) -> None:
    if not path.exists():
        # Only its owner (who runs mosquitto) needs the broker's files.
        path.mkdir(mode=0o700, parents=True)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    if not data_dir.is_dir():
        raise ConfigError(f"broker data directory {data_dir} does not exist")
    fd = os.open(data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
