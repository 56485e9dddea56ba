"""Control requests from the dashboard: the same commands, values and replies as the CLI's
``fedhive round complete``, ``fedhive set ...`` and ``fedhive aggregator stop|restart``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import FedhiveError, FedhiveTimeoutError, MessageError
from common.messages import ControlCommand, ControlReply
from fedhive.dashboard.live import BrokerLink

#: What each command's form field is read as.
_FLOAT = {ControlCommand.SET_THRESHOLD, ControlCommand.SET_TIMEOUT}
_INT = {ControlCommand.SET_MAX_AGENTS}
_TEXT = {ControlCommand.SET_METHOD}

LABELS = {
    ControlCommand.COMPLETE_ROUND: "complete round",
    ControlCommand.SET_THRESHOLD: "set threshold",
    ControlCommand.SET_TIMEOUT: "set agent timeout",
    ControlCommand.SET_METHOD: "set method",
    ControlCommand.SET_MAX_AGENTS: "set max agents",
    ControlCommand.STOP: "stop",
    ControlCommand.RESTART: "restart",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a request, in words for the page (and the reply, if one came)."""

    ok: bool
    text: str
    aggregator: str
    command: str
    reply: ControlReply | None = None
    #: Why no reply came: a malformed request, no answer in time, or not sent at all.
    failure: Literal["invalid", "no_answer", "not_sent"] | None = None

    def flash(self) -> dict[str, Any]:
        return {"ok": self.ok, "text": self.text, "aggregator": self.aggregator,
                "command": self.command}  # fmt: skip


def parse_command(text: str) -> ControlCommand:
    try:
        return ControlCommand(text)
    except ValueError:
        known = ", ".join(c.value for c in ControlCommand)
        raise MessageError(f"unknown command {text!r}; known: {known}") from None


def parse_value(command: ControlCommand, text: str | None) -> float | int | str | None:
    """A form field as the command's value (a number, an integer, a name or nothing)."""
    text = (text or "").strip()
    if command in _FLOAT:
        try:
            return float(text)
        except ValueError:
            raise MessageError(f"{command.value} takes a number, got {text!r}") from None
    if command in _INT:
        try:
            return int(text)
        except ValueError:
            raise MessageError(f"{command.value} takes an integer, got {text!r}") from None
    if command in _TEXT:
        if not text:
            raise MessageError(f"{command.value} takes a method name")
        return text
    return None


def parse_params(text: str | None) -> dict[str, Any]:
    """``KEY=VALUE`` per line or comma-separated; a VALUE is read as JSON if it parses
    (``f=1``, ``beta1=0.9``), like ``fedhive set method --param``."""
    params: dict[str, Any] = {}
    for item in (text or "").replace(",", "\n").splitlines():
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MessageError(f"method setting {item!r}: write KEY=VALUE")
        raw = raw.strip()
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


async def send(
    link: BrokerLink,
    aggregator: str,
    command: ControlCommand,
    value: float | int | str | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    timeout: float,
) -> Outcome:
    """Send one request and say what happened (never raises for a refusal or no answer)."""
    label = LABELS[command]
    try:
        reply = await link.request(aggregator, command, value, params=params, timeout=timeout)
    except MessageError as exc:
        return Outcome(False, f"{label}: {exc}", aggregator, command.value, failure="invalid")
    except FedhiveTimeoutError as exc:
        return Outcome(False, f"{label}: {exc}", aggregator, command.value, failure="no_answer")
    except FedhiveError as exc:
        text = f"{label} not sent: {exc}"
        return Outcome(False, text, aggregator, command.value, failure="not_sent")
    if reply.ok:
        text = f"{aggregator} answered: {reply.detail or 'done'}"
    else:
        text = f"{aggregator} refused {label}: {reply.reason or 'no reason given'}"
    return Outcome(reply.ok, text, aggregator, command.value, reply)


__all__ = ["LABELS", "Outcome", "parse_command", "parse_params", "parse_value", "send"]
