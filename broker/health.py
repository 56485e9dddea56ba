"""Health checks: does an MQTT 5 broker answer at host:port?

Other components use :func:`broker_answers` to decide whether the broker named in their config can
be used; :class:`broker.process.MosquittoBroker` uses :func:`probe_connack` to know when a broker it
started is ready.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["broker_answers", "probe_connack"]


def broker_answers(
    host: str,
    port: int,
    timeout: float = 2.0,
    *,
    username: str | None = None,
    password: str | None = None,
) -> bool:
    """Tell whether an MQTT 5 broker at ``host:port`` accepts a connection.

    A real CONNECT is sent and the CONNACK awaited, so a port held by something that is not a
    working broker answers ``False``. Use it to decide whether a configured broker can be used.

    Args:
        host: broker host name or address.
        port: broker TCP port.
        timeout: seconds for the whole check (TCP connect, CONNECT, CONNACK).
        username: user name to log in with, when the broker requires credentials.
        password: password for ``username``.

    Returns:
        ``True`` if the CONNACK says success, ``False`` on any failure or when time runs out.
    """
    reason = probe_connack(host, port, timeout, username=username, password=password)
    return reason is not None and not reason.is_failure


def probe_connack(
    host: str,
    port: int,
    timeout: float,
    *,
    username: str | None = None,
    password: str | None = None,
) -> ReasonCode | None:
    """Send one MQTT 5 CONNECT and return the CONNACK's reason code.

    Unlike :func:`broker_answers`, a refusal (e.g. bad credentials) is an answer too: it proves a
    broker is up. Arguments are those of :func:`broker_answers`.

    Returns:
        The CONNACK reason code, or ``None`` when no CONNACK arrived within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"fedhive-probe-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5,
    )
    client.connect_timeout = max(timeout, 0.01)
    if username is not None:
        client.username_pw_set(username, password)
    answers: list[ReasonCode] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        answers.append(reason)

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=60)
        while not answers:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or client.loop(timeout=min(remaining, 0.1)) != mqtt.MQTT_ERR_SUCCESS:
                break
        if answers and not answers[0].is_failure:
            # Say goodbye properly so the broker does not log an unexpected disconnect.
            client.disconnect()
            client.loop(timeout=0.1)
    except (OSError, ValueError):
        # Refused, unreachable, unresolvable or timed out: the broker does not answer.
        return None
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
    return answers[0] if answers else None
