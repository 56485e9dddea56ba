"""Run one Mosquitto process from the repo's config template.

:class:`MosquittoBroker` owns a ``mosquitto -c FILE`` child: it renders the template into its
data directory, starts the process, waits until a real MQTT 5 CONNECT gets a CONNACK, and stops it
with SIGTERM (so the database is saved), falling back to SIGKILL. The CLI (``fedhive broker
start``) and the pytest fixtures both go through it, so tests exercise the shipped configuration.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

from broker.health import probe_connack
from common.errors import BrokerError, ConfigError

__all__ = [
    "CONFIG_FILE",
    "DATABASE_FILE",
    "DEFAULT_TEMPLATE",
    "LOG_FILE",
    "OUTPUT_FILE",
    "PID_FILE",
    "BrokerState",
    "MosquittoBroker",
    "TLSListener",
    "find_free_port",
    "find_mosquitto",
    "reload_broker",
    "render_config",
]

DEFAULT_TEMPLATE: Final = Path(__file__).with_name("mosquitto.conf")
"""The canonical template shipped with the package (the repo root links to it)."""

# File names inside a broker's data directory; the template refers to them through placeholders
# (and ``persistence_file``), so keep them in step with broker/mosquitto.conf.
CONFIG_FILE: Final = "mosquitto.conf"
LOG_FILE: Final = "mosquitto.log"
OUTPUT_FILE: Final = "mosquitto.out"
DATABASE_FILE: Final = "mosquitto.db"
#: Written by :class:`MosquittoBroker` while its mosquitto runs, for :func:`reload_broker`.
PID_FILE: Final = "mosquitto.pid"

_MOSQUITTO_FALLBACKS: Final = (
    "/usr/sbin/mosquitto",  # Debian/Ubuntu: /usr/sbin is often not on a normal user's PATH
    "/usr/local/sbin/mosquitto",
    "/opt/homebrew/sbin/mosquitto",
)
_PLACEHOLDER: Final = re.compile(r"@([A-Z][A-Z0-9_]*)@")
_SECURITY_LINE: Final = re.compile(r"^@SECURITY@[ \t]*$", re.MULTILINE)
_LISTENER_LINE: Final = re.compile(r"^[ \t]*listener[ \t]+@PORT@", re.MULTILINE)
_TAIL_LINES: Final = 20
# One probe during start-up may take this long; the overall deadline is start()'s timeout.
_PROBE_TIMEOUT: Final = 0.5


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    The kernel picks it (bind to port 0), so it is free at the moment of the call; another process
    may still take it before the broker binds it, which :meth:`MosquittoBroker.start` handles.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def find_mosquitto() -> Path:
    """Return the path of the ``mosquitto`` executable.

    Raises:
        BrokerError: mosquitto is neither on ``PATH`` nor in a usual sbin directory.
    """
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for candidate in _MOSQUITTO_FALLBACKS:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise BrokerError(
        "mosquitto not found on PATH or in /usr/sbin; install it "
        "(Debian/Ubuntu: `apt-get install -y mosquitto`, macOS: `brew install mosquitto`)"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class TLSListener:
    """A second listener that speaks MQTT over TLS (``tls_version tlsv1.2`` or newer).

    Attributes:
        certfile: the server certificate (PEM), signed by a CA the clients trust.
        keyfile: its private key (PEM).
        cafile: the CA that signed client certificates, if clients present any; Mosquitto does
            not require client certificates here, the password file authenticates clients.
        port: the TLS port; :class:`MosquittoBroker` picks a free one when ``None``.
        bind_address: address to bind; the plain listener's when ``None``.
    """

    certfile: Path
    keyfile: Path
    cafile: Path | None = None
    port: int | None = None
    bind_address: str | None = None


def render_config(
    *,
    port: int,
    data_dir: Path,
    bind_address: str = "127.0.0.1",
    template: Path | None = None,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    tls: TLSListener | None = None,
) -> str:
    """Render a Mosquitto config template (``@NAME@`` placeholders) for one broker.

    Without ``password_file``, ``acl_file`` and ``tls`` the ``@SECURITY@`` line becomes
    ``allow_anonymous true`` (the development mode). With ``password_file`` it turns
    authentication on (``allow_anonymous false``, ``password_file``, ``acl_file`` if given,
    ``use_username_as_clientid true``); ``tls`` adds a TLS listener.

    Args:
        port: TCP port of the listener.
        data_dir: directory for the database and the log; made absolute here.
        bind_address: address the listener binds to.
        template: template file; the package's ``mosquitto.conf`` when ``None``.
        password_file: Mosquitto password file (``fedhive broker init`` writes one).
        acl_file: Mosquitto ACL file; needs ``password_file``.
        tls: a TLS listener to add; its ``port`` must be set.

    Returns:
        The config text, ready for ``mosquitto -c``.

    Raises:
        ConfigError: a bad port, address or path, a missing security file, an unreadable
            template, a template without a ``@PORT@`` listener (or, when security is asked for,
            without a ``@SECURITY@`` line after it), or a placeholder this function does not know.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"broker port must be 1-65535, got {port}")
    _check_address(bind_address)
    data_dir = _config_path("broker data directory", data_dir)
    security = _security_lines(
        port=port,
        bind_address=bind_address,
        password_file=password_file,
        acl_file=acl_file,
        tls=tls,
    )
    template = template or DEFAULT_TEMPLATE
    try:
        text = template.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read broker config template {template}: {exc}") from exc
    if "@PORT@" not in text:
        raise ConfigError(
            f"broker config template {template} has no @PORT@ placeholder "
            "(expected a line `listener @PORT@ @BIND_ADDRESS@`)"
        )
    secured = security != _ANONYMOUS
    security_line = _SECURITY_LINE.search(text)
    listener_line = _LISTENER_LINE.search(text)
    # use_username_as_clientid belongs to the listener above it: the block must follow it.
    if secured and (
        security_line is None
        or (listener_line is not None and security_line.start() < listener_line.start())
    ):
        raise ConfigError(
            f"broker config template {template} has no @SECURITY@ line after its @PORT@ "
            "listener, so authentication and TLS cannot be turned on with it"
        )
    values = {
        "PORT": str(port),
        "BIND_ADDRESS": bind_address,
        "DATA_DIR": str(data_dir),
        "LOG_FILE": str(data_dir / LOG_FILE),
        "USER": _current_user(),
        "SECURITY": security,
    }
    names = _PLACEHOLDER.findall(text)
    unknown = sorted({name for name in names if name not in values})
    if unknown:
        raise ConfigError(
            f"broker config template {template} uses unknown placeholder(s) "
            f"{', '.join('@' + name + '@' for name in unknown)}; known: "
            f"{', '.join('@' + name + '@' for name in values)}"
        )
    # Several lines replace @SECURITY@: inside a comment (or any line) they would become
    # directives, so it may only stand on a line of its own.
    if names.count("SECURITY") != len(_SECURITY_LINE.findall(text)):
        raise ConfigError(
            f"broker config template {template}: @SECURITY@ must stand on a line of its own"
        )
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


class BrokerState(enum.Enum):
    """Life cycle of a :class:`MosquittoBroker`: NEW → RUNNING ⇄ STOPPED."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


#: glibc malloc settings for mosquitto (``GLIBC_TUNABLES``). It allocates a buffer for every
#: message it takes in; a chunk of 1 MiB was above glibc's mapping threshold, or freed memory
#: was trimmed off the heap's top, so each chunk faulted in fresh, zeroed pages: 17% of the
#: broker's CPU with 10 agents x 1M parameters. These keep up to 64 MiB of freed memory mapped
#: for reuse (the broker's RSS may stay that much higher) and allocate chunks from the heap.
MALLOC_TUNABLES: Final = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864"


def _broker_env() -> dict[str, str]:
    """The environment mosquitto runs in: ours, plus :data:`MALLOC_TUNABLES` (after any
    tunables already set, which win)."""
    env = dict(os.environ)
    mine = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = MALLOC_TUNABLES if not mine else f"{MALLOC_TUNABLES}:{mine}"
    return env


class MosquittoBroker:
    """One Mosquitto process, configured from the repo's template, owned by this object.

    ``start`` and ``stop`` may alternate (``restart`` does both); the port and the data directory
    stay the same, so retained messages and sessions persist across restarts::

        with MosquittoBroker(data_dir=Path("fedhive-data/broker")) as broker:
            print(broker.url)
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int | None = None,
        bind_address: str = "127.0.0.1",
        config_template: Path | None = None,
        mosquitto_path: Path | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: TLSListener | None = None,
    ) -> None:
        """Prepare a broker; nothing runs until :meth:`start`.

        Without ``password_file``, ``acl_file`` and ``tls`` the broker admits anonymous clients
        (development on loopback). ``fedhive broker init`` writes the files for the others.

        Args:
            data_dir: directory for the rendered config, database and logs (created on start).
            port: listener port; a free one is picked when ``None``.
            bind_address: address the listener binds to.
            config_template: template to render; the package's ``mosquitto.conf`` when ``None``.
            mosquitto_path: the mosquitto executable; searched for when ``None``.
            password_file: Mosquitto password file: clients must log in, anonymous ones are
                refused and a client's id is its user name (no session takeover).
            acl_file: Mosquitto ACL applied to the users of ``password_file``.
            tls: a TLS listener besides the plain one; a free port is picked if it names none.

        Raises:
            BrokerError: mosquitto cannot be found.
            ConfigError: ``bind_address`` is not an IP address.
        """
        _check_address(bind_address)
        self._mosquitto = mosquitto_path or find_mosquitto()
        self._data_dir = Path(data_dir).absolute()
        self._bind_address = bind_address
        self._template = config_template
        self._password_file = password_file
        self._acl_file = acl_file
        # A port we picked may be taken by someone else before mosquitto binds it: then (and only
        # then) start() may pick another one. A port the caller asked for is never changed.
        self._port_chosen = port is None
        self._port = port if port is not None else find_free_port(bind_address)
        self._tls = tls
        self._tls_port_chosen = tls is not None and tls.port is None
        if tls is not None:
            _check_address(tls.bind_address or bind_address)
            if tls.port is None:
                self._tls = dataclasses.replace(tls, port=self._free_tls_port(tls))
        self._state = BrokerState.NEW
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._output_path = self._data_dir / OUTPUT_FILE
        self._offsets: dict[Path, int] = {}

    # -- properties -----------------------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        """Where the broker is in its life cycle (as this object last left it)."""
        return self._state

    @property
    def host(self) -> str:
        """Address clients on this machine connect to (loopback when bound to all addresses)."""
        address = ipaddress.ip_address(self._bind_address)
        if address.is_unspecified:
            return "::1" if address.version == 6 else "127.0.0.1"
        return self._bind_address

    @property
    def port(self) -> int:
        """TCP port of the listener."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` for clients."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self._port}"

    @property
    def secured(self) -> bool:
        """Whether clients must log in (a password file was given)."""
        return self._password_file is not None

    @property
    def tls_port(self) -> int | None:
        """Port of the TLS listener, ``None`` without one."""
        return self._tls.port if self._tls is not None else None

    @property
    def tls_url(self) -> str | None:
        """``mqtts://host:port`` of the TLS listener, ``None`` without one."""
        if self._tls is None:
            return None
        address = ipaddress.ip_address(self._tls.bind_address or self._bind_address)
        host = str(address)
        if address.is_unspecified:
            host = "::1" if address.version == 6 else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"mqtts://{host}:{self._tls.port}"

    @property
    def pid_path(self) -> Path:
        """File holding mosquitto's process id while this object runs it."""
        return self._data_dir / PID_FILE

    @property
    def data_dir(self) -> Path:
        """Directory holding the rendered config, the database and the logs."""
        return self._data_dir

    @property
    def config_path(self) -> Path:
        """The rendered config file mosquitto runs with."""
        return self._data_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        """Mosquitto's own log file."""
        return self._data_dir / LOG_FILE

    @property
    def database_path(self) -> Path:
        """The persistence database."""
        return self._data_dir / DATABASE_FILE

    @property
    def pid(self) -> int | None:
        """Process id of the running mosquitto, ``None`` when not running."""
        return self._process.pid if self._process and self._state is BrokerState.RUNNING else None

    def is_alive(self) -> bool:
        """Tell whether the mosquitto process exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Render the config into the data directory, start mosquitto and wait until it answers.

        Args:
            timeout: seconds to wait for the first CONNACK.

        Raises:
            BrokerError: already running, mosquitto exited (its complaint is in the message) or
                did not answer in time.
            ConfigError: the template or the settings are unusable.
        """
        if self._state is BrokerState.RUNNING:
            raise BrokerError(f"broker on {self.url} is already running; stop() it first")
        chosen = self._port_chosen or self._tls_port_chosen
        attempts = 3 if chosen and self._state is BrokerState.NEW else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except _PortTakenError as taken:
                # Mosquitto's "Address already in use" does not say which listener (tls=None).
                plain = taken.tls is not True and self._port_chosen
                secure = taken.tls is not False and self._tls_port_chosen
                if attempt == attempts - 1 or not (plain or secure):
                    raise self._port_taken_error(tls=taken.tls is True) from None
                if plain:
                    self._port = find_free_port(self._bind_address)
                if secure and self._tls is not None:
                    self._tls = dataclasses.replace(self._tls, port=self._free_tls_port(self._tls))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop mosquitto: SIGTERM (it saves its database), then SIGKILL after ``timeout`` s.

        Stopping a stopped broker does nothing.

        Raises:
            BrokerError: the broker was never started.
        """
        if self._state is BrokerState.NEW:
            raise BrokerError("broker was never started; nothing to stop")
        if self._state is BrokerState.STOPPED:
            return
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill mosquitto with SIGKILL, as a crash would (no database save). For crash tests.

        Raises:
            BrokerError: the broker is not running.
        """
        if self._state is not BrokerState.RUNNING:
            raise BrokerError(f"cannot kill a broker that is {self._state.value}")
        self._terminate(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop the broker if it runs, then start it again on the same port and data directory.

        Raises:
            BrokerError: the broker was never started, or it fails to come back.
        """
        if self._state is BrokerState.NEW:
            raise BrokerError("broker was never started; call start()")
        self.stop(timeout)
        self.start(timeout)

    def reload(self) -> None:
        """Make mosquitto re-read its password file and ACL (SIGHUP), e.g. after ``add-agent``.

        Clients that connect afterwards meet the new files; mosquitto applies the reload
        asynchronously, within milliseconds.

        Raises:
            BrokerError: the broker is not running.
        """
        if self._state is not BrokerState.RUNNING or self._process is None:
            raise BrokerError(f"cannot reload a broker that is {self._state.value}")
        self._process.send_signal(signal.SIGHUP)

    def save_database(self, timeout: float = 10.0) -> None:
        """Make mosquitto write its database now (SIGUSR1) and wait until the file is replaced.

        Raises:
            BrokerError: the broker is not running or no new database appeared in time (for
                instance because the template disables persistence).
        """
        if self._state is not BrokerState.RUNNING or self._process is None:
            raise BrokerError(f"cannot save the database of a broker that is {self._state.value}")
        before = _file_identity(self.database_path)
        self._process.send_signal(signal.SIGUSR1)
        # Mosquitto writes mosquitto.db.new and renames it over mosquitto.db: a new inode (or
        # mtime/size) and no .new file left means the save is complete.
        partial = self.database_path.with_name(DATABASE_FILE + ".new")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = _file_identity(self.database_path)
            if current is not None and current != before and not partial.exists():
                return
            # Nothing signals a finished rename; pace the polling on the process instead, which
            # also notices if mosquitto dies meanwhile.
            if self.wait(timeout=0.01) is not None:
                raise BrokerError(f"mosquitto exited while saving its database; {self._tail()}")
        raise BrokerError(
            f"mosquitto did not write {self.database_path} within {timeout:.1f}s "
            "(is persistence enabled in the config?)"
        )

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until mosquitto exits; return its exit code (``None`` if it still runs).

        Args:
            timeout: seconds to wait; forever when ``None``.

        Raises:
            BrokerError: the broker was never started.
        """
        if self._process is None:
            raise BrokerError("broker was never started")
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """Return the last ``lines`` lines of mosquitto's captured stderr and of its log."""
        return self._read_tails(lines, since_start=False)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is BrokerState.RUNNING:
            self.stop()

    def __repr__(self) -> str:
        return f"MosquittoBroker(url={self.url!r}, state={self._state.value}, pid={self.pid})"

    # -- internals ------------------------------------------------------------------------------

    def _port_taken_error(self, *, tls: bool) -> BrokerError:
        port, address = self._port, self._bind_address
        if tls and self._tls is not None and self._tls.port is not None:
            port, address = self._tls.port, self._tls.bind_address or address
        return BrokerError(f"port {port} on {address} is taken by another process")

    def _free_tls_port(self, tls: TLSListener) -> int:
        address = tls.bind_address or self._bind_address
        while True:
            port = find_free_port(address)
            if port != self._port:
                return port

    def _start_once(self, timeout: float) -> None:
        text = render_config(
            port=self._port,
            data_dir=self._data_dir,
            bind_address=self._bind_address,
            template=self._template,
            password_file=self._password_file,
            acl_file=self._acl_file,
            tls=self._tls,
        )
        # The readiness probe cannot tell our mosquitto from another broker already on the port
        # (ours would exit with "Address already in use" just after that one answers), so make
        # sure the port is ours to take first.
        if not _port_is_bindable(self._bind_address, self._port):
            raise _PortTakenError(tls=False)
        tls = self._tls
        if (
            tls is not None
            and tls.port is not None
            and not _port_is_bindable(tls.bind_address or self._bind_address, tls.port)
        ):
            raise _PortTakenError(tls=True)
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(text, encoding="utf-8")
            self._offsets = {path: _file_size(path) for path in (self._output_path, self.log_path)}
            # Append: a restart must not erase what the previous run logged (crash evidence).
            self._output = self._output_path.open("ab")
            self._process = subprocess.Popen(
                [str(self._mosquitto), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                # Own session: Ctrl-C in the terminal reaches only us, and we stop mosquitto
                # cleanly (SIGTERM saves the database) instead of it dying mid-write.
                start_new_session=True,
                env=_broker_env(),
            )
        except OSError as exc:
            self._close_output()
            raise BrokerError(f"cannot start {self._mosquitto}: {exc}") from exc
        self._state = BrokerState.RUNNING
        try:
            self._wait_until_answering(timeout)
            # For `fedhive broker add-agent` in another process: whom to SIGHUP (reload_broker).
            self.pid_path.write_text(f"{self._process.pid}\n", encoding="utf-8")
        except BaseException:
            self._terminate(signal.SIGKILL, 5.0)
            raise

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                tail = self._tail()
                if "Address already in use" in tail:
                    raise _PortTakenError(tls=None)
                code = self._process.returncode if self._process else None
                raise BrokerError(f"mosquitto exited with code {code} during start-up; {tail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"mosquitto did not accept an MQTT connection on {self.url} within "
                    f"{timeout:.1f}s; {self._tail()}"
                )
            # Any CONNACK counts: once authentication is on, an anonymous probe is refused by a
            # broker that is nevertheless up. A refused TCP connect returns at once, so this
            # loop paces itself on the probe's own timeout only while the port is silent.
            answered = probe_connack(self.host, self._port, min(_PROBE_TIMEOUT, remaining))
            if answered is not None and self.is_alive():
                return
            # The listener is not open yet; wait for the process briefly rather than spinning.
            self.wait(timeout=min(0.02, max(deadline - time.monotonic(), 0.0)))

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        process = self._process
        try:
            if process is not None and process.poll() is None:
                process.send_signal(sig)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        finally:
            self._close_output()
            self._state = BrokerState.STOPPED
            if process is not None:
                _remove_pid_file(self.pid_path, process.pid)

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def _read_tails(self, lines: int, *, since_start: bool) -> str:
        parts = []
        for path in (self._output_path, self.log_path):
            # Both files are appended to across restarts; an error report shows this run only.
            start = self._offsets.get(path, 0) if since_start else 0
            text = _read_end(path, start).strip()
            if text:
                parts.append(f"{path.name}:\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def _tail(self) -> str:
        tail = self._read_tails(_TAIL_LINES, since_start=True)
        return f"mosquitto said:\n{tail}" if tail else "mosquitto logged nothing"


_ANONYMOUS: Final = "allow_anonymous true"


def _security_lines(
    *,
    port: int,
    bind_address: str,
    password_file: Path | None,
    acl_file: Path | None,
    tls: TLSListener | None,
) -> str:
    """The lines that replace ``@SECURITY@`` (see the template's Security section)."""
    if password_file is None and acl_file is None and tls is None:
        return _ANONYMOUS
    if acl_file is not None and password_file is None:
        raise ConfigError(
            "an ACL file needs a password file: without logins every client is anonymous"
        )
    lines = ["# Rendered by broker.process.render_config (fedhive broker start --secure)."]
    if password_file is None:
        lines.append(_ANONYMOUS)
    else:
        lines += ["allow_anonymous false", f"password_file {_existing('password', password_file)}"]
        if acl_file is not None:
            lines.append(f"acl_file {_existing('ACL', acl_file)}")
        lines.append("use_username_as_clientid true")
    if tls is not None:
        if tls.port is None or not 0 < tls.port < 65536:
            raise ConfigError(f"TLS listener port must be 1-65535, got {tls.port}")
        if tls.port == port:
            raise ConfigError(f"TLS listener port {tls.port} is the plain listener's port too")
        address = tls.bind_address or bind_address
        _check_address(address)
        lines += ["", f"listener {tls.port} {address}"]
        if password_file is not None:
            lines.append("use_username_as_clientid true")  # a per-listener setting
        lines.append(f"certfile {_existing('TLS certificate', tls.certfile)}")
        lines.append(f"keyfile {_existing('TLS key', tls.keyfile)}")
        if tls.cafile is not None:
            lines.append(f"cafile {_existing('TLS CA', tls.cafile)}")
        lines.append("tls_version tlsv1.2")
    return "\n".join(lines)


def _config_path(what: str, path: Path) -> Path:
    path = Path(path).absolute()
    # A config value runs to the end of its line: a newline in a path would inject a directive.
    if "\n" in str(path) or "\r" in str(path):
        raise ConfigError(f"{what} may not contain a newline: {str(path)!r}")
    return path


def _existing(what: str, path: Path) -> Path:
    path = _config_path(f"{what} file", path)
    if not path.is_file():
        raise ConfigError(
            f"{what} file {path} does not exist (`fedhive broker init` writes the security files)"
        )
    return path


class _PortTakenError(Exception):
    """Mosquitto could not bind a port (someone took it after find_free_port).

    ``tls`` says which listener: ``False`` the plain one, ``True`` the TLS one, ``None`` unknown.
    """

    def __init__(self, *, tls: bool | None) -> None:
        super().__init__("port taken")
        self.tls = tls


def reload_broker(data_dir: Path) -> int | None:
    """SIGHUP the mosquitto a :class:`MosquittoBroker` runs from ``data_dir``, if one runs.

    Mosquitto then re-reads its password file and ACL. The process id comes from the data
    directory's pid file and is only signalled if that process is a mosquitto running this data
    directory's config (a stale pid file may name an unrelated process by now).

    Returns:
        The process id signalled, or ``None`` when no such broker runs (or this system cannot
        tell, having no ``/proc``): then a restart applies the change.
    """
    data_dir = Path(data_dir).absolute()
    try:
        pid = int((data_dir / PID_FILE).read_text(encoding="utf-8").strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    config = os.fsencode(data_dir / CONFIG_FILE)
    if not cmdline or Path(os.fsdecode(cmdline[0])).name != "mosquitto" or config not in cmdline:
        return None
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:  # it exited meanwhile, or is someone else's
        return None
    return pid


def _remove_pid_file(path: Path, pid: int) -> None:
    # Only our own: a newer broker on the same data dir may have written its pid since.
    try:
        if path.read_text(encoding="utf-8").strip() == str(pid):
            path.unlink()
    except (OSError, ValueError):
        pass


def _check_address(address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError as exc:
        raise ConfigError(f"broker bind address must be an IP address, got {address!r}") from exc


def _port_is_bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As mosquitto does: connections of a previous run in TIME_WAIT must not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_end(path: Path, start: int, limit: int = 65536) -> str:
    """Read ``path`` from ``start``, at most its last ``limit`` bytes ('' if it is missing)."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(start, size - limit))
            return file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)
