"""Steering a running aggregator from the command line (the Aggregation Management view).

``fedhive status``, ``fedhive round complete``, ``fedhive set threshold|timeout|method|max-agents
VALUE`` and ``fedhive aggregator stop|restart``. Each command sends one request through
:class:`~agent.control.ControlClient`, prints the aggregator's reply (``--json`` for scripts)
and exits with 1 when the aggregator refused, 3 when no aggregator answered in time or the
broker could not be reached.

When the project has an sg-aggregator, ``fedhive status`` shows the SG layer (its round, the
aggregators alive, the regional results collected) above the aggregator's view;
``fedhive sg-aggregator status`` shows the SG layer alone (``--json``: its status message).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from agent.control import DEFAULT_ADMIN, ControlClient
from common.config import DEFAULT_AGGREGATOR, DEFAULT_BROKER_PORT, DEFAULT_PROJECT, BrokerSettings
from common.errors import FedhiveError, FedhiveTimeoutError, MessageError
from common.messages import (
    AggregatorLiveness,
    AggStatusMessage,
    ControlCommand,
    ControlReply,
    SgStatusMessage,
    decode_message,
)
from common.tasks import finish
from common.topics import Topics
from common.transport import MqttTransport

EXIT_REFUSED = 1
EXIT_NO_ANSWER = 3

_F = TypeVar("_F", bound=Callable[..., Any])


class RefusedError(click.ClickException):
    """The aggregator answered and refused the command."""

    exit_code = EXIT_REFUSED


class NoAnswerError(click.ClickException):
    """No aggregator answered in time, or the broker could not be reached."""

    exit_code = EXIT_NO_ANSWER


@dataclass(frozen=True)
class Connection:
    """Where the aggregator is and who is asking (the ``--host ... --timeout`` options)."""

    host: str
    port: int
    project: str
    aggregator: str
    user: str
    password: str | None
    timeout: float

    def settings(self) -> BrokerSettings:
        return BrokerSettings(
            host=self.host,
            port=self.port,
            username=self.user,
            password=self.password,
            connect_timeout=self.timeout,
        )

    def client(self) -> ControlClient:
        try:
            return ControlClient(
                settings=self.settings(),
                project=self.project,
                aggregator=self.aggregator,
                sender=self.user,
            )
        except (ValueError, FedhiveError) as exc:  # a bad name or port
            raise click.BadParameter(str(exc)) from exc

    def sg_follower(self) -> SgStatusFollower:
        try:
            return SgStatusFollower(settings=self.settings(), project=self.project, user=self.user)
        except (ValueError, FedhiveError) as exc:
            raise click.BadParameter(str(exc)) from exc


class SgStatusFollower:
    """Follows a project's retained sg-aggregator status (``sg/status``)."""

    def __init__(self, *, settings: BrokerSettings, project: str, user: str) -> None:
        self.topics = Topics(project)
        self._transport = MqttTransport(
            settings=settings, client_id=f"{project}.admin.{user}.sg.{uuid.uuid4().hex[:12]}"
        )
        self.latest: SgStatusMessage | None = None
        self._version = 0
        self._updated = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._transport.__aenter__()
        try:
            # Subscribed (and acknowledged) before anything else is asked: the retained status
            # is on its way before the aggregator's answer can be.
            await self._transport.subscribe(self.topics.sg_status())
        except BaseException:
            await self._transport.__aexit__(None, None, None)
            raise
        self._consumer = asyncio.create_task(self._consume(), name="sg-status-follower")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._transport.__aexit__(exc_type, exc, tb)
        if self._consumer is not None:
            await finish([self._consumer])

    async def _consume(self) -> None:
        try:
            async for incoming in self._transport.messages():
                if not incoming.payload:
                    continue
                with contextlib.suppress(FedhiveError):
                    message = decode_message(incoming.payload)
                    if isinstance(message, SgStatusMessage):
                        self.latest = message
                        self._version += 1
                        updated, self._updated = self._updated, asyncio.Event()
                        updated.set()
        finally:
            self._updated.set()

    async def settle(self, timeout: float = 0.2) -> SgStatusMessage | None:
        """The retained status if there is one, waiting at most ``timeout`` seconds for it."""
        if self.latest is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._updated.wait(), timeout)
        return self.latest

    async def statuses(self, *, timeout: float | None) -> AsyncIterator[SgStatusMessage]:
        """The current status, then every update; ``timeout`` bounds the first wait."""
        seen = 0
        first = True
        while True:
            if self._version > seen and self.latest is not None:
                seen = self._version
                first = False
                yield self.latest
                continue
            if self._consumer is None or self._consumer.done():
                return
            updated = self._updated
            try:
                async with asyncio.timeout(timeout if first else None):
                    await updated.wait()
            except TimeoutError:
                raise FedhiveTimeoutError(
                    f"no sg-aggregator status in project {self.topics.project!r} within "
                    f"{timeout} s: is 'fedhive sg-aggregator start' running?"
                ) from None


def connection_options(func: _F) -> _F:
    """Add the connection options; the command receives them as ``conn``."""
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, envvar="FEDHIVE_HOST"),
        click.option(
            "--port",
            type=click.IntRange(1, 65535),
            default=DEFAULT_BROKER_PORT,
            show_default=True,
            envvar="FEDHIVE_PORT",
        ),
        click.option(
            "--project", default=DEFAULT_PROJECT, show_default=True, envvar="FEDHIVE_PROJECT"
        ),
        click.option(
            "--aggregator",
            default=DEFAULT_AGGREGATOR,
            show_default=True,
            envvar="FEDHIVE_AGGREGATOR",
            help="the aggregator's name",
        ),
        click.option(
            "--user",
            default=DEFAULT_ADMIN,
            show_default=True,
            envvar="FEDHIVE_USER",
            help="admin user (broker user name; the aggregator checks it is an admin)",
        ),
        click.option("--password", default=None, envvar="FEDHIVE_PASSWORD", help="broker password"),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=5.0,
            show_default=True,
            help="seconds to wait for the aggregator's answer",
        ),
    ]

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        host: str,
        port: int,
        project: str,
        aggregator: str,
        user: str,
        password: str | None,
        timeout: float,
        **kwargs: Any,
    ) -> Any:
        conn = Connection(host, port, project, aggregator, user, password, timeout)
        return func(*args, conn=conn, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def _json_option(func: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(func)


# ------------------------------------------------------------------ commands
def send(
    conn: Connection,
    command: ControlCommand,
    value: float | int | str | None = None,
    *,
    params: dict[str, Any] | None = None,
    as_json: bool = False,
) -> ControlReply:
    """Send one command, print the reply; RefusedError / NoAnswerError as the exit."""

    async def run() -> ControlReply:
        async with conn.client() as control:
            return await control.request(command, value, params=params, timeout=conn.timeout)

    try:
        reply = asyncio.run(run())
    except MessageError as exc:  # the request itself is malformed
        raise click.BadParameter(str(exc)) from exc
    except FedhiveError as exc:  # no answer, no broker
        raise NoAnswerError(str(exc)) from exc
    if as_json:
        click.echo(reply.model_dump_json(indent=2))
    elif reply.ok:
        click.echo(f"{conn.aggregator}: {reply.detail or 'done'}")
        if reply.status is not None:
            click.echo(summary(reply.status))
    if not reply.ok:
        raise RefusedError(
            f"aggregator {conn.aggregator!r} refused {command.value}: {reply.reason}"
        )
    return reply


def summary(status: AggStatusMessage) -> str:
    """One line: state, round, method, counts."""
    method = status.method + (f" (next: {status.next_method})" if status.next_method else "")
    return (
        f"{status.state.value}, round {status.round}, method {method}, "
        f"threshold {status.threshold:g}, {status.active} active, {status.needed} needed, "
        f"{status.collected} collected"
    )


@click.command("status")
@connection_options
@click.option("--watch", is_flag=True, help="keep the view up to date until interrupted")
@_json_option
@click.option("--updates", type=click.IntRange(min=1), default=None, hidden=True)
def status_command(conn: Connection, watch: bool, as_json: bool, updates: int | None) -> None:
    """Show the Aggregation Management view of one aggregator."""
    console = Console(highlight=False)

    async def run() -> None:
        async with conn.sg_follower() as sg, conn.client() as control:
            first = await control.status(timeout=conn.timeout)
            if not watch:
                if as_json:
                    click.echo(first.model_dump_json(indent=2))
                else:
                    console.print(render(first, await sg.settle()))
                return
            if as_json:  # JSON Lines: one status per line
                shown = 0
                async for status in control.statuses():
                    click.echo(status.model_dump_json())
                    shown += 1
                    if updates is not None and shown >= updates:
                        return
                return
            with Live(
                render(first, await sg.settle()), console=console, auto_refresh=False
            ) as live:
                shown = 0
                async for status in control.statuses():
                    live.update(render(status, sg.latest), refresh=True)
                    shown += 1
                    if updates is not None and shown >= updates:
                        return

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # --watch ends with Ctrl-C
        pass
    except FedhiveError as exc:
        raise NoAnswerError(str(exc)) from exc


def render(status: AggStatusMessage, sg: SgStatusMessage | None = None) -> Group:
    """The Aggregation Management view: settings and counts, then the agents (below the SG
    layer's view when the project has an sg-aggregator)."""
    view = Table.grid(padding=(0, 2))
    view.add_column(style="bold")
    view.add_column()
    age = max(0.0, time.time() - status.ts)
    method = status.method
    if status.next_method:
        method += f" (from next round: {status.next_method})"
    rows: list[tuple[str, str]] = [
        ("Aggregator", f"{status.sender} (project {status.project}, updated {age:.1f} s ago)"),
        ("State", status.state.value + (f": {status.blocker}" if status.blocker else "")),
        ("Current round", str(status.round)),
        ("Method", method),
        ("Threshold", f"{status.threshold:g}"),
        ("Agent timeout", f"{status.agent_timeout:g} s" if status.agent_timeout else "disabled"),
        ("Max connectable agents", str(status.max_agents) if status.max_agents else "no limit"),
        ("Max rounds", str(status.max_rounds) if status.max_rounds else "no limit"),
        ("Active agents", str(status.active)),
        ("Models needed", str(status.needed)),
        ("Models collected", str(status.collected)),
    ]
    if status.sg_aggregator is not None:
        regional = (
            f"round {status.regional_round} sent, waiting for the SG model"
            if status.regional_round is not None
            else "collecting"
        )
        rows.append(("SG aggregator", f"{status.sg_aggregator} ({regional})"))
    for key, value in rows:
        view.add_row(key, value)
    agents = Table(title=f"Agents ({len(status.agents) + status.agents_omitted})")
    agents.add_column("Name")
    agents.add_column("State")
    agents.add_column("Last heartbeat", justify="right")
    agents.add_column("Last round", justify="right")
    styles = {"ACTIVE": "green", "TIMEOUT": "yellow", "OFFLINE": "dim", "REJECTED": "red"}
    for agent in status.agents:
        heard = "-" if agent.last_heartbeat is None else f"{agent.last_heartbeat:.1f} s ago"
        agents.add_row(
            agent.name,
            f"[{styles[agent.state.value]}]{agent.state.value}[/]",
            heard,
            "-" if agent.last_round is None else str(agent.last_round),
        )
    parts: list[Any] = [view, agents]
    if status.agents_omitted:
        parts.append(f"... and {status.agents_omitted} more agents not listed")
    if sg is not None:
        parts = [render_sg(sg), "", *parts]
    return Group(*parts)


def render_sg(status: SgStatusMessage) -> Group:
    """The SG layer: its round, the aggregators alive, the regional results collected."""
    view = Table.grid(padding=(0, 2))
    view.add_column(style="bold")
    view.add_column()
    age = max(0.0, time.time() - status.ts)
    method = status.method + (
        f" (from next round: {status.next_method})" if status.next_method else ""
    )
    collected = f"{status.collected} of {status.needed} needed"
    if status.regional_from:
        collected += f" ({', '.join(status.regional_from)})"
    rows = [
        ("SG aggregator", f"{status.sender} (project {status.project}, updated {age:.1f} s ago)"),
        ("SG state", status.state.value + (f": {status.blocker}" if status.blocker else "")),
        ("SG round", str(status.round)),
        ("SG method", method),
        ("SG threshold", f"{status.threshold:g}"),
        ("Aggregator timeout", f"{status.aggregator_timeout:g} s"),
        ("Aggregators alive", f"{status.alive} ({status.counted} waited for)"),
        ("Regional results", collected),
    ]
    for key, value in rows:
        view.add_row(key, value)
    table = Table(title=f"Aggregators ({len(status.aggregators) + status.aggregators_omitted})")
    table.add_column("Name")
    table.add_column("State")
    table.add_column("Round", justify="right")
    table.add_column("Agents", justify="right")
    table.add_column("Last status", justify="right")
    table.add_column("Last regional", justify="right")
    styles = {
        AggregatorLiveness.ALIVE: "green",
        AggregatorLiveness.IDLE: "cyan",
        AggregatorLiveness.PAUSED: "yellow",
        AggregatorLiveness.LOST: "red",
        AggregatorLiveness.GONE: "dim",
    }
    for a in status.aggregators:
        table.add_row(
            a.name,
            f"[{styles[a.state]}]{a.state.value}[/]",
            "-" if a.round is None else str(a.round),
            str(a.agents),
            "-" if a.last_status is None else f"{a.last_status:.1f} s ago",
            "-" if a.last_round is None else str(a.last_round),
        )
    parts: list[Any] = [view, table]
    if status.aggregators_omitted:
        parts.append(f"... and {status.aggregators_omitted} more aggregators not listed")
    return Group(*parts)


@click.group("round")
def round_group() -> None:
    """Act on the current round."""


@round_group.command("complete")
@connection_options
@_json_option
def round_complete(conn: Connection, as_json: bool) -> None:
    """Aggregate the current round now with the models collected (at least one)."""
    send(conn, ControlCommand.COMPLETE_ROUND, as_json=as_json)


@click.group("set")
def set_group() -> None:
    """Change an aggregator setting while it runs."""


@set_group.command("threshold")
@click.argument("value", type=float)
@connection_options
@_json_option
def set_threshold(value: float, conn: Connection, as_json: bool) -> None:
    """Fraction of active agents whose models complete a round, in (0, 1]."""
    send(conn, ControlCommand.SET_THRESHOLD, value, as_json=as_json)


@set_group.command("timeout")
@click.argument("value", type=float)
@connection_options
@_json_option
def set_timeout(value: float, conn: Connection, as_json: bool) -> None:
    """Seconds without a heartbeat before an agent is TIMEOUT (0 disables)."""
    send(conn, ControlCommand.SET_TIMEOUT, value, as_json=as_json)


@set_group.command("method")
@click.argument("value")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="a method setting; VALUE is read as JSON if it parses (e.g. f=1, beta=0.9)",
)
@connection_options
@_json_option
def set_method(value: str, params: tuple[str, ...], conn: Connection, as_json: bool) -> None:
    """Aggregation method from the next round on (e.g. fedavg, geometric_median)."""
    send(conn, ControlCommand.SET_METHOD, value, params=parse_params(params), as_json=as_json)


@set_group.command("max-agents")
@click.argument("value", type=click.IntRange(min=0))
@connection_options
@_json_option
def set_max_agents(value: int, conn: Connection, as_json: bool) -> None:
    """How many agents may be connected at once (0: no limit)."""
    send(conn, ControlCommand.SET_MAX_AGENTS, value, as_json=as_json)


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write KEY=VALUE", param_hint="--param")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


@click.command("stop")
@connection_options
@_json_option
def aggregator_stop(conn: Connection, as_json: bool) -> None:
    """Stop aggregating (INACTIVE): uploads are refused, agents wait, the round is kept."""
    send(conn, ControlCommand.STOP, as_json=as_json)


@click.command("restart")
@connection_options
@_json_option
def aggregator_restart(conn: Connection, as_json: bool) -> None:
    """Aggregate again (ACTIVE), continuing the same round."""
    send(conn, ControlCommand.RESTART, as_json=as_json)


@click.command("status")
@connection_options
@click.option("--watch", is_flag=True, help="keep the view up to date until interrupted")
@_json_option
@click.option("--updates", type=click.IntRange(min=1), default=None, hidden=True)
def sg_status_command(conn: Connection, watch: bool, as_json: bool, updates: int | None) -> None:
    """Show the SG layer: its round, the aggregators alive, the regional results collected."""
    console = Console(highlight=False)

    async def run() -> None:
        async with conn.sg_follower() as sg:
            shown = 0
            live: Live | None = None
            try:
                async for status in sg.statuses(timeout=conn.timeout):
                    if as_json:
                        click.echo(status.model_dump_json(indent=None if watch else 2))
                    elif not watch:
                        console.print(render_sg(status))
                    elif live is None:
                        live = Live(render_sg(status), console=console, auto_refresh=False)
                        live.start()
                    else:
                        live.update(render_sg(status), refresh=True)
                    shown += 1
                    if not watch or (updates is not None and shown >= updates):
                        return
            finally:
                if live is not None:
                    live.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # --watch ends with Ctrl-C
        pass
    except FedhiveError as exc:
        raise NoAnswerError(str(exc)) from exc


def add_control_commands(
    main: click.Group, aggregator_group: click.Group, sg_group: click.Group | None = None
) -> None:
    """Attach these commands to the ``fedhive`` root and its ``aggregator`` group (and
    ``sg-aggregator status`` to the ``sg-aggregator`` group)."""
    main.add_command(status_command)
    main.add_command(round_group)
    main.add_command(set_group)
    aggregator_group.add_command(aggregator_stop)
    aggregator_group.add_command(aggregator_restart)
    if sg_group is not None:
        sg_group.add_command(sg_status_command)


__all__ = [
    "EXIT_NO_ANSWER",
    "EXIT_REFUSED",
    "Connection",
    "NoAnswerError",
    "RefusedError",
    "SgStatusFollower",
    "add_control_commands",
    "render",
    "render_sg",
    "summary",
]
