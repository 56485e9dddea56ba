"""Tests of the secured broker (issue 8): credentials, password file, ACL, TLS, `broker init`.

The integration tests run a real Mosquitto started from `broker init`'s files and observe the
broker's decisions with MQTT 5 clients: a refused publish gets PUBACK 0x87 (Not authorized), and
an observer allowed to read the whole project never receives it. The observer waits for a marker
the same client publishes afterwards on an allowed topic: the broker handles one client's
packets in order and delivers one subscription's messages in order, so once the marker is in,
anything published before it would be in too.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from support import running_aggregator

from broker.acl import render_acl
from broker.cli import broker_group
from broker.health import probe_connack
from broker.process import (
    DEFAULT_TEMPLATE,
    MosquittoBroker,
    TLSListener,
    find_free_port,
    reload_broker,
    render_config,
)
from broker.security import (
    ProjectCredentials,
    Role,
    SecurityFiles,
    add_agent,
    init_project,
    load_credentials,
    read_agent_names,
    remove_agent,
    security_files,
)
from common.config import AggregatorConfig, BrokerSettings, TLSSettings
from common.errors import ConfigError, MessageError, TransportError
from common.messages import AckMessage, AckStatus
from common.transport import MqttTransport

REPO = Path(__file__).resolve().parents[1]
PROJECT = "sec"
ROOT = f"fedhive/v1/{PROJECT}"
WAIT_S = 5.0  # generous on a shared 2-core machine; a healthy broker answers in milliseconds
NOT_AUTHORIZED = 0x87
# What AggregatorService subscribes to (aggregator/service.py), as aggregator aggr1.
AGGREGATOR_SUBSCRIPTIONS = (
    f"{ROOT}/base",
    f"{ROOT}/base/chunk",
    f"{ROOT}/agents/+/status",
    f"{ROOT}/agents/+/heartbeat",
    f"{ROOT}/agents/+/request",
    f"{ROOT}/agg/aggr1/local/#",
    f"{ROOT}/agg/aggr1/control",
)


# -- helpers -------------------------------------------------------------------------------------


class Probe:
    """A paho MQTT 5 client that records CONNACK, PUBACK reason codes and messages.

    paho reports the PUBACK reason code to ``on_publish`` (aiomqtt drops it), which is what
    shows a publish the broker refused.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        will_topic: str | None = None,
    ) -> None:
        self._broker = broker
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.will_payload = b"will-" + _token()
        if will_topic is not None:
            self.client.will_set(will_topic, self.will_payload, qos=1)
        self._cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    # paho callbacks (its network thread)
    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.connack = reason
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.pubacks[mid] = reason
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self.subacks[mid] = reasons
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload))
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.disconnect_reason = reason
            self._cond.notify_all()

    def _wait(self, predicate: Any, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, WAIT_S):
                raise AssertionError(f"timed out waiting for {what}")

    # API
    def connect(self) -> ReasonCode:
        self.client.connect(self._broker.host, self._broker.port, keepalive=60)
        self.client.loop_start()
        self._wait(lambda: self.connack is not None, "CONNACK")
        assert self.connack is not None
        return self.connack

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, *topics: str) -> None:
        _, mid = self.client.subscribe([(topic, 1) for topic in topics])
        self._wait(lambda: mid in self.subacks, "SUBACK")
        assert not any(reason.is_failure for reason in self.subacks[mid])

    def wait_for_payload(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Wait until ``payload`` arrives; return everything received so far."""
        self._wait(lambda: any(p == payload for _, p in self.messages), f"payload {payload!r}")
        with self._cond:
            return list(self.messages)

    def wait_for_disconnect(self) -> None:
        self._wait(lambda: self.disconnect_reason is not None, "the broker to disconnect us")

    def disconnect_with_will(self) -> None:
        """MQTT 5 DISCONNECT 0x04: the broker publishes the will, as if the client had died."""
        self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
        self._wait(lambda: self.disconnect_reason is not None, "disconnect")

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Secured:
    broker: MosquittoBroker
    files: SecurityFiles
    credentials: ProjectCredentials

    def password(self, name: str) -> str:
        return self.credentials.account(name).password

    def settings(self, name: str, **extra: Any) -> BrokerSettings:
        return self.credentials.broker_settings(
            name, host=self.broker.host, port=self.broker.port
        ).model_copy(update=extra)


@contextmanager
def _secured_broker(data_dir: Path, *, debug_log: bool = False, **init: Any) -> Iterator[Secured]:
    init_project(data_dir, project=PROJECT, **init)
    files = security_files(data_dir)
    template = None
    if debug_log:  # mosquitto logs each refused publish ("Denied PUBLISH") at debug level only
        template = data_dir / "debug.conf"
        template.write_text(DEFAULT_TEMPLATE.read_text() + "\nlog_type debug\n")
    broker = MosquittoBroker(
        data_dir=data_dir,
        config_template=template,
        password_file=files.password_file,
        acl_file=files.acl_file,
        tls=files.tls_listener(),
    )
    with broker:
        yield Secured(broker, files, load_credentials(data_dir))


@contextmanager
def _probe(secured: Secured, name: str | None, **options: Any) -> Iterator[Probe]:
    probe = Probe(secured.broker, name, secured.password(name) if name else None, **options)
    try:
        assert not probe.connect().is_failure, f"{name} could not log in"
        yield probe
    finally:
        probe.close()


def _token() -> bytes:
    return uuid.uuid4().hex.encode()


def _refused(reason: ReasonCode) -> bool:
    return reason.value == NOT_AUTHORIZED


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """One secured broker (passwords, ACL, TLS) for the module's integration tests."""
    with _secured_broker(
        tmp_path_factory.mktemp("secured"),
        agents=["a1", "a2"],
        aggregators=["aggr1", "aggr2"],
        sg_aggregators=["sg"],
        tls=True,
    ) as running:
        yield running


# -- ACL rendering (no broker) -------------------------------------------------------------------


def _acl_allows(acl: str, user: str, access: str, topic: str) -> bool:
    """Mosquitto's decision, re-implemented for the rule shapes render_acl writes."""
    current: str | None = None
    for line in acl.splitlines():
        if not line or line.startswith("#"):
            continue
        kind, *rest = line.split(" ")
        if kind == "user":
            current = rest[0]
            continue
        granted, pattern = rest
        if kind == "pattern":
            pattern = pattern.replace("%u", user)
        elif current != user:
            continue
        if granted in (access, "readwrite") and mqtt.topic_matches_sub(pattern, topic):
            return True
    return False


# (user, access, topic suffix, allowed): the topic facts of DESIGN.md and issue 8.
ROLE_TABLE = [
    # agent a1: its own status, heartbeat, requests and local models...
    ("a1", "write", "agents/a1/status", True),
    ("a1", "write", "agents/a1/heartbeat", True),
    ("a1", "write", "agents/a1/request", True),
    ("a1", "write", "agg/aggr1/local/a1", True),
    ("a1", "write", "agg/aggr2/local/a1/chunk", True),
    # ...nobody else's, and nothing of the aggregators' or the admin's
    ("a1", "write", "agents/a2/status", False),
    ("a1", "write", "agents/a2/heartbeat", False),
    ("a1", "write", "agg/aggr1/local/a2", False),
    ("a1", "write", "agg/aggr1/local/a2/chunk", False),
    ("a1", "write", "agents/a1/inbox", False),
    ("a1", "write", "agents/a1/assign", False),
    ("a1", "write", "agg/aggr1/model", False),
    ("a1", "write", "agg/aggr1/status", False),
    ("a1", "write", "agg/aggr1/control", False),
    ("a1", "write", "base", False),
    ("a1", "write", "sg/model", False),
    ("a1", "write", "sg/request", False),
    ("a1", "write", "agg/aggr1/inbox", False),
    # reads: models, status, its own inbox and assignment; not others' uploads or inboxes
    ("a1", "read", "agg/aggr1/model", True),
    ("a1", "read", "agg/aggr1/model/chunk", True),
    ("a1", "read", "agg/aggr1/status", True),
    ("a1", "read", "agents/a1/inbox", True),
    ("a1", "read", "agents/a1/inbox/chunk", True),
    ("a1", "read", "agents/a1/assign", True),
    ("a1", "read", "sg/model/chunk", True),
    ("a1", "read", "base", True),
    ("a1", "read", "agents/a2/inbox", False),
    ("a1", "read", "agg/aggr1/local/a2", False),
    ("a1", "read", "agents/a2/heartbeat", False),
    ("a1", "read", "agg/aggr1/control", False),
    ("a1", "read", "agg/aggr1/inbox", False),
    # aggregator aggr1
    ("aggr1", "write", "agg/aggr1/model", True),
    ("aggr1", "write", "agg/aggr1/model/chunk", True),
    ("aggr1", "write", "agg/aggr1/status", True),
    ("aggr1", "write", "agg/aggr1/regional/chunk", True),
    ("aggr1", "write", "agg/aggr1/control/reply", True),
    ("aggr1", "write", "agg/aggr1/control/reply/abc123", True),
    ("aggr1", "write", "agents/a1/inbox", True),
    ("aggr1", "write", "agents/a1/inbox/chunk", True),
    ("aggr1", "write", "agents/a1/assign", True),
    ("aggr1", "write", "metrics/aggr1", True),
    ("aggr1", "write", "agg/aggr1/control", False),
    ("aggr1", "write", "agg/aggr2/model", False),
    ("aggr1", "write", "metrics/aggr2", False),
    ("aggr1", "write", "base", False),
    ("aggr1", "write", "sg/model", False),
    ("aggr1", "write", "agents/a1/status", False),
    ("aggr1", "write", "sg/request", True),
    ("aggr1", "write", "agg/aggr2/inbox", False),
    ("aggr1", "read", "agg/aggr1/inbox/chunk", True),
    ("aggr1", "read", "agg/aggr2/inbox", False),
    ("aggr1", "read", "agg/aggr1/local/a1/chunk", True),
    ("aggr1", "read", "agents/a1/request", True),
    ("aggr1", "read", "agg/aggr1/control", True),
    ("aggr1", "read", "sg/model/chunk", True),
    ("aggr1", "read", "agg/aggr2/local/a1", False),
    ("aggr1", "read", "agg/aggr2/control", False),
    # sg-aggregator
    ("sg", "write", "sg/model", True),
    ("sg", "write", "sg/status", True),
    ("sg", "write", "agg/aggr1/model", False),
    ("sg", "write", "base", False),
    ("sg", "write", "agg/aggr1/inbox", True),
    ("sg", "write", "agg/aggr2/inbox/chunk", True),
    ("sg", "write", "agents/a1/inbox", False),
    ("sg", "read", "agg/aggr1/regional/chunk", True),
    ("sg", "read", "sg/request", True),
    ("sg", "read", "sg/model/chunk", True),
    ("sg", "read", "agg/aggr1/local/a1", False),
    # admin
    ("admin", "write", "base", True),
    ("admin", "write", "base/chunk", True),
    ("admin", "write", "agg/aggr2/control", True),
    ("admin", "write", "agg/aggr1/model", False),
    ("admin", "write", "agents/a1/inbox", False),
    ("admin", "read", "agg/aggr1/local/a1/chunk", True),
    ("admin", "read", "agents/a2/inbox", True),
    # outside the project: nobody
    ("admin", "read", "fedhive/v1/other/base", False),
    ("a1", "write", "fedhive/v1/other/agents/a1/status", False),
]


def _full(topic: str) -> str:
    return topic if topic.startswith("fedhive/") else f"{ROOT}/{topic}"


def _rendered_acl() -> str:
    return render_acl(
        PROJECT, admins=["admin"], aggregators=["aggr1", "aggr2"], sg_aggregators=["sg"]
    )


@pytest.mark.parametrize(("user", "access", "topic", "allowed"), ROLE_TABLE)
def test_acl_grants_follow_the_role_table(
    user: str, access: str, topic: str, allowed: bool
) -> None:
    assert _acl_allows(_rendered_acl(), user, access, _full(topic)) is allowed


def test_acl_grants_nothing_to_anonymous_clients_and_uses_u_patterns_for_agents() -> None:
    lines = [line for line in _rendered_acl().splitlines() if line and not line.startswith("#")]

    # Mosquitto gives `topic` lines before the first `user` line to anonymous clients.
    first_user = next(i for i, line in enumerate(lines) if line.startswith("user "))
    assert not any(line.startswith("topic ") for line in lines[:first_user])
    assert f"pattern write {ROOT}/agg/+/local/%u" in lines
    assert f"pattern write {ROOT}/agents/%u/status" in lines
    assert [line for line in lines if line.startswith("user ")] == [
        "user admin",
        "user aggr1",
        "user aggr2",
        "user sg",
    ]
    # Agents are not listed: the patterns cover whoever the password file admits.
    assert "a1" not in _rendered_acl()


def test_render_acl_rejects_names_that_are_not_topic_levels() -> None:
    with pytest.raises(MessageError, match="aggregator"):
        render_acl(PROJECT, admins=["admin"], aggregators=["a/#"])
    with pytest.raises(MessageError, match="project"):
        render_acl("p+", admins=["admin"], aggregators=[])


# -- credentials and files (no broker) -----------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_private_files_and_only_hashes_in_the_password_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "broker"

    credentials = init_project(data_dir, project=PROJECT, agents=["a1", "a2"], tls=True)
    files = security_files(data_dir)

    assert credentials.names(Role.ADMIN) == ["admin"]
    assert credentials.names(Role.AGGREGATOR) == ["aggr1"]
    assert credentials.names(Role.AGENT) == ["a1", "a2"]
    assert len({account.password for account in credentials.accounts}) == 4
    assert all(len(account.password) >= 32 for account in credentials.accounts)
    assert load_credentials(data_dir) == credentials
    assert files.server_key is not None
    assert files.ca_cert is not None
    for secret in (files.credentials_file, files.password_file, files.server_key):
        assert _mode(secret) == 0o600, secret
    assert _mode(files.ca_cert.with_name("ca.key")) == 0o600
    passwd = files.password_file.read_text()
    assert sorted(line.split(":")[0] for line in passwd.splitlines()) == [
        "a1",
        "a2",
        "admin",
        "aggr1",
    ]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd.splitlines())
    assert not any(account.password in passwd for account in credentials.accounts)
    assert files.acl_file.read_text() == render_acl(
        PROJECT, admins=["admin"], aggregators=["aggr1"]
    )
    # Nothing but the files' final versions is left behind.
    assert not [p.name for p in data_dir.rglob("*.tmp")]


def test_init_refuses_an_initialised_directory_unless_forced(tmp_path: Path) -> None:
    first = init_project(tmp_path, project=PROJECT)

    with pytest.raises(ConfigError, match="already holds broker credentials"):
        init_project(tmp_path, project=PROJECT)
    again = init_project(tmp_path, project=PROJECT, force=True)

    assert again.account("admin").password != first.account("admin").password
    assert again.tls_hostnames is None
    assert security_files(tmp_path).tls_listener() is None


def test_init_rejects_bad_and_repeated_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid agent name"):
        init_project(tmp_path, project=PROJECT, agents=["a/b"])
    with pytest.raises(ConfigError, match="given twice"):
        init_project(tmp_path, project=PROJECT, agents=["aggr1"])
    with pytest.raises(ConfigError, match="invalid project name"):
        init_project(tmp_path, project="p#")
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        init_project(tmp_path, project=PROJECT, tls=True, hostnames=["bad host"])
    assert not (tmp_path / "credentials.json").exists()


def test_add_and_remove_agent(tmp_path: Path) -> None:
    init_project(tmp_path, project=PROJECT, agents=["a1"])

    account = add_agent(tmp_path, "late", project=PROJECT)
    passwd = (tmp_path / "passwd").read_text()

    assert account.role is Role.AGENT
    assert load_credentials(tmp_path).account("late") == account
    assert passwd.count("\n") == 4
    assert "late:$7$" in passwd
    assert account.password not in passwd
    with pytest.raises(ConfigError, match="already exists"):
        add_agent(tmp_path, "aggr1")
    with pytest.raises(ConfigError, match="not Q"):
        add_agent(tmp_path, "other", project="Q")
    with pytest.raises(ConfigError, match="not an agent"):
        remove_agent(tmp_path, "admin")

    remove_agent(tmp_path, "late")

    assert load_credentials(tmp_path).names(Role.AGENT) == ["a1"]
    assert "late:" not in (tmp_path / "passwd").read_text()
    with pytest.raises(ConfigError, match="no broker user"):
        remove_agent(tmp_path, "late")


def test_commands_on_an_uninitialised_directory_say_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedhive broker init"):
        add_agent(tmp_path, "a1")
    with pytest.raises(ConfigError, match="fedhive broker init"):
        security_files(tmp_path)


def test_read_agent_names(tmp_path: Path) -> None:
    good = tmp_path / "agents.txt"
    good.write_text("# enrolment list\nedge-01\n\n  edge-02  \n")
    bad = tmp_path / "bad.txt"
    bad.write_text("edge-01\nedge 02\n")

    assert read_agent_names(good) == ["edge-01", "edge-02"]
    with pytest.raises(ConfigError, match="line 2"):
        read_agent_names(bad)


def test_dev_certificates_name_localhost_and_chain_to_the_ca(tmp_path: Path) -> None:
    init_project(tmp_path, project=PROJECT, tls=True, hostnames=["broker.example", "10.0.0.7"])
    files = security_files(tmp_path)
    assert files.ca_cert is not None
    assert files.server_cert is not None

    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    assert names.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    default = init_project(tmp_path / "default", project=PROJECT, tls=True)
    assert default.tls_hostnames == ["localhost", "127.0.0.1"]


# -- config rendering (no broker) ----------------------------------------------------------------


def test_render_config_turns_on_logins_acl_and_a_tls_listener(tmp_path: Path) -> None:
    init_project(tmp_path, project=PROJECT, tls=True)
    files = security_files(tmp_path)
    tls = files.tls_listener(port=18883, bind_address="0.0.0.0")

    text = render_config(
        port=18999,
        data_dir=tmp_path,
        password_file=files.password_file,
        acl_file=files.acl_file,
        tls=tls,
    )
    lines = text.splitlines()

    assert "allow_anonymous true" not in lines
    expected = [
        "allow_anonymous false",
        f"password_file {files.password_file}",
        f"acl_file {files.acl_file}",
        "use_username_as_clientid true",
        "",
        "listener 18883 0.0.0.0",
        "use_username_as_clientid true",
        f"certfile {files.server_cert}",
        f"keyfile {files.server_key}",
        f"cafile {files.ca_cert}",
        "tls_version tlsv1.2",
    ]
    start = lines.index("allow_anonymous false")
    assert lines[start : start + len(expected)] == expected
    assert lines.index("listener 18999 127.0.0.1") < start


def test_render_config_without_security_options_is_the_anonymous_dev_mode(tmp_path: Path) -> None:
    lines = render_config(port=18999, data_dir=tmp_path).splitlines()

    assert "allow_anonymous true" in lines
    assert not [line for line in lines if line.startswith(("password_file", "acl_file"))]
    assert not [line for line in lines if line.startswith("use_username_as_clientid")]


def test_render_config_rejects_inconsistent_security_options(tmp_path: Path) -> None:
    init_project(tmp_path, project=PROJECT, tls=True)
    files = security_files(tmp_path)
    assert files.server_cert is not None
    assert files.server_key is not None
    commented = tmp_path / "commented.conf"
    commented.write_text("listener @PORT@\n# @SECURITY@ in a comment\n@SECURITY@\n")
    early = tmp_path / "early.conf"
    early.write_text("@SECURITY@\nlistener @PORT@\n")

    with pytest.raises(ConfigError, match="needs a password file"):
        render_config(port=18999, data_dir=tmp_path, acl_file=files.acl_file)
    with pytest.raises(ConfigError, match="does not exist"):
        render_config(port=18999, data_dir=tmp_path, password_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="port"):
        render_config(
            port=18999,
            data_dir=tmp_path,
            tls=TLSListener(certfile=files.server_cert, keyfile=files.server_key, port=18999),
        )
    with pytest.raises(ConfigError, match="line of its own"):
        render_config(port=18999, data_dir=tmp_path, template=commented)
    with pytest.raises(ConfigError, match="after its @PORT@"):
        render_config(
            port=18999, data_dir=tmp_path, template=early, password_file=files.password_file
        )
    assert "@SECURITY@" in DEFAULT_TEMPLATE.read_text()


# -- the broker's decisions ----------------------------------------------------------------------


@pytest.mark.broker
def test_agent_publishes_to_others_topics_are_refused_and_never_delivered(
    secured: Secured,
) -> None:
    # Prepare: the admin reads the whole project; the aggregator subscribes as it does in
    # aggregator/service.py. Agent a1 will publish on what is not its own.
    denied = [
        "agg/aggr1/local/a2",  # another agent's local model
        "agg/aggr1/local/a2/chunk",
        "agents/a2/status",
        "agents/a2/heartbeat",
        "agg/aggr1/control",
        "agg/aggr1/control/reply",
        "base",
        "base/chunk",
        "agg/aggr1/model",
        "agg/aggr1/model/chunk",
        "agg/aggr1/status",
        "agg/aggr1/regional",
        "sg/model",
        "agents/a1/inbox",
        "agents/a2/inbox",
        "agents/a1/assign",
        "metrics/aggr1",
    ]
    payloads = {topic: _token() for topic in denied}
    marker = _token()
    with (
        _probe(secured, "admin") as admin,
        _probe(secured, "aggr1") as aggregator,
        _probe(secured, "a1") as agent,
    ):
        admin.subscribe(f"{ROOT}/#")
        aggregator.subscribe(*AGGREGATOR_SUBSCRIPTIONS)

        # Execute
        reasons = {
            topic: agent.publish(_full(topic), payloads[topic], retain=True) for topic in denied
        }
        allowed = agent.publish(f"{ROOT}/agg/aggr1/local/a1", marker)
        seen_by_admin = admin.wait_for_payload(marker)
        seen_by_aggregator = aggregator.wait_for_payload(marker)

    # Assert: every refusal is the broker's PUBACK 0x87, and nobody got any of them.
    assert {t: r.value for t, r in reasons.items()} == dict.fromkeys(denied, NOT_AUTHORIZED)
    assert not allowed.is_failure
    leaked = set(payloads.values()) & {p for _, p in seen_by_admin + seen_by_aggregator}
    assert not leaked


@pytest.mark.broker
def test_agent_may_publish_on_its_own_topics(secured: Secured) -> None:
    own = [
        "agents/a1/status",
        "agents/a1/heartbeat",
        "agents/a1/request",
        "agg/aggr1/local/a1",
        "agg/aggr1/local/a1/chunk",
    ]
    payloads = {_full(topic): _token() for topic in own}
    with _probe(secured, "aggr1") as aggregator, _probe(secured, "a1") as agent:
        aggregator.subscribe(*AGGREGATOR_SUBSCRIPTIONS)

        reasons = [agent.publish(topic, payload) for topic, payload in payloads.items()]
        seen = aggregator.wait_for_payload(payloads[_full(own[-1])])

    assert not [reason for reason in reasons if reason.is_failure]
    assert set(payloads.items()) <= set(seen)


@pytest.mark.broker
def test_each_role_writes_only_its_own_topics(secured: Secured) -> None:
    # The role table above, checked against Mosquitto for every write it lists.
    writes = [
        (user, _full(topic), ok) for user, access, topic, ok in ROLE_TABLE if access == "write"
    ]
    markers = {
        "a1": f"{ROOT}/agents/a1/heartbeat",
        "aggr1": f"{ROOT}/agg/aggr1/status",
        "sg": f"{ROOT}/sg/status",
        "admin": f"{ROOT}/base",
    }
    reasons: dict[tuple[str, str], bool] = {}
    payloads: dict[tuple[str, str], bytes] = {}
    with _probe(secured, "admin") as observer:
        observer.subscribe(f"{ROOT}/#")
        for user, marker_topic in markers.items():
            # A second admin connection would end the observer's: one session per user name.
            same = user == "admin"
            with nullcontext(observer) if same else _probe(secured, user) as client:
                for who, topic, _ in writes:
                    if who == user:
                        payloads[who, topic] = _token()
                        reason = client.publish(topic, payloads[who, topic])
                        reasons[who, topic] = not reason.is_failure
                marker = _token()
                assert not client.publish(marker_topic, marker).is_failure
            seen = {p for _, p in observer.wait_for_payload(marker)}
            for key, payload in payloads.items():
                if key[0] == user:
                    assert (payload in seen) is reasons[key], key

    assert reasons == {(user, topic): ok for user, topic, ok in writes}


@pytest.mark.broker
def test_agent_receives_only_what_it_may_read(secured: Secured) -> None:
    # Prepare: a2 subscribes to the whole project (the broker grants the subscription and filters
    # each delivery against the ACL).
    secret_upload, secret_ack, marker = _token(), _token(), _token()
    with (
        _probe(secured, "a2") as spy,
        _probe(secured, "a1") as agent,
        _probe(secured, "aggr1") as aggregator,
    ):
        spy.subscribe(f"{ROOT}/#")

        # Execute: a1 uploads, the aggregator answers a1, then publishes a model a2 may read.
        assert not agent.publish(f"{ROOT}/agg/aggr1/local/a1", secret_upload).is_failure
        assert not aggregator.publish(f"{ROOT}/agents/a1/inbox", secret_ack).is_failure
        assert not aggregator.publish(f"{ROOT}/agg/aggr1/model/chunk", marker).is_failure
        seen = {payload for _, payload in spy.wait_for_payload(marker)}

    # Assert
    assert secret_upload not in seen
    assert secret_ack not in seen


@pytest.mark.broker
async def test_anonymous_and_wrong_passwords_are_refused(secured: Secured) -> None:
    broker = secured.broker
    attempts = {
        "anonymous": Probe(broker, None, None),
        "wrong password": Probe(broker, "a1", secured.password("a2")),
        "unknown user": Probe(broker, "intruder", "guess"),
    }
    try:
        reasons = {name: probe.connect() for name, probe in attempts.items()}
    finally:
        for probe in attempts.values():
            probe.close()

    assert {name: reason.value for name, reason in reasons.items()} == dict.fromkeys(
        attempts, NOT_AUTHORIZED
    )
    # Our own client says so clearly.
    for settings in (
        BrokerSettings(host=broker.host, port=broker.port, connect_timeout=WAIT_S),
        secured.settings("a1", password="wrong", connect_timeout=WAIT_S),
    ):
        with pytest.raises(TransportError, match="Not authorized"):
            async with MqttTransport(settings=settings):
                pass


@pytest.mark.broker
def test_a_client_id_cannot_take_over_another_users_session(secured: Secured) -> None:
    # Prepare: a1 is connected; its client id is its user name whatever it asked for.
    marker = _token()
    with _probe(secured, "admin") as observer, _probe(secured, "a1", client_id="anything") as a1:
        observer.subscribe(f"{ROOT}/agents/a1/heartbeat")

        # Execute: a2 connects with a1's client id (with and without the username form).
        with (
            _probe(secured, "a2", client_id="a1"),
            _probe(secured, "a2", client_id="anything") as second,
        ):
            time.sleep(0.2)  # a takeover would disconnect a1 now
            reason = a1.publish(f"{ROOT}/agents/a1/heartbeat", marker)
            observer.wait_for_payload(marker)
            second_alive = second.client.is_connected()

        # Assert: a1 kept its session.
        assert a1.disconnect_reason is None
        assert a1.client.is_connected()
        assert not reason.is_failure
        assert second_alive
    log = secured.broker.log_path.read_text()
    assert "as a1 (p5" in log
    assert "as a2 (p5" in log
    assert "as anything" not in log


@pytest.mark.broker
def test_a_spoofed_last_will_is_dropped(secured: Secured) -> None:
    # Prepare: two connections of a1, one with a will on its own status, one on a2's.
    password = secured.password("a1")
    honest = Probe(secured.broker, "a1", password, will_topic=f"{ROOT}/agents/a1/status")
    spoof = Probe(secured.broker, "a1", password, will_topic=f"{ROOT}/agents/a2/status")
    marker = _token()
    with _probe(secured, "admin") as observer:
        observer.subscribe(f"{ROOT}/agents/+/status")
        try:
            # Execute: both go away as if they had died (DISCONNECT 0x04 sends the will).
            assert not honest.connect().is_failure
            honest.disconnect_with_will()
            observer.wait_for_payload(honest.will_payload)  # the mechanism works
            assert not spoof.connect().is_failure
            spoof.disconnect_with_will()
        finally:
            honest.close()
            spoof.close()
        with _probe(secured, "a1") as agent:
            assert not agent.publish(f"{ROOT}/agents/a1/status", marker).is_failure
        seen = observer.wait_for_payload(marker)

    # Assert: the spoofed will never went out.
    assert spoof.will_payload not in {payload for _, payload in seen}


@pytest.mark.broker
def test_enrolled_agent_logs_in_after_reload_and_revoked_one_is_refused(
    secured: Secured,
) -> None:
    # Prepare
    data_dir = secured.files.data_dir
    name = f"late{uuid.uuid4().hex[:6]}"

    # Execute: the CLI enrols it and reloads the running broker (found through its pid file).
    result = CliRunner().invoke(
        broker_group,
        ["add-agent", name, "--project", PROJECT, "--data-dir", str(data_dir), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    password = load_credentials(data_dir).account(name).password

    # Assert
    assert report["reloaded_pid"] == secured.broker.pid
    assert "agent_config" not in report  # no secret without --show-secrets
    assert _connack_within(secured.broker, name, password, refused=False)

    # Execute: revoke it while it is connected.
    live = Probe(secured.broker, name, password)
    try:
        assert not live.connect().is_failure
        remove_agent(data_dir, name)
        secured.broker.reload()

        # Assert: the reload ends its session, and it cannot log in again.
        live.wait_for_disconnect()
    finally:
        live.close()
    assert _connack_within(secured.broker, name, password, refused=True)


def test_reload_signals_only_a_mosquitto_of_that_data_directory(tmp_path: Path) -> None:
    # A stale pid file may name an unrelated process by now: it must not get the SIGHUP.
    with subprocess.Popen(["sleep", "30"]) as bystander:
        try:
            (tmp_path / "mosquitto.pid").write_text(f"{bystander.pid}\n")

            assert reload_broker(tmp_path) is None
            assert bystander.poll() is None
        finally:
            bystander.kill()
    assert reload_broker(tmp_path / "missing") is None


def _connack_within(broker: MosquittoBroker, user: str, password: str, *, refused: bool) -> bool:
    """Probe until the CONNACK is as expected: mosquitto applies a reload asynchronously."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        reason = probe_connack(broker.host, broker.port, 1.0, username=user, password=password)
        if reason is not None and reason.is_failure is refused:
            return True
        time.sleep(0.05)
    return False


# -- TLS -----------------------------------------------------------------------------------------


def _tls_settings(secured: Secured, host: str, tls: TLSSettings) -> BrokerSettings:
    assert secured.broker.tls_port is not None
    return secured.settings("admin", host=host, port=secured.broker.tls_port, tls=tls)


@pytest.mark.broker
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_tls_client_with_the_ca_connects(secured: Secured, host: str) -> None:
    settings = _tls_settings(
        secured, host, TLSSettings(enabled=True, ca_file=secured.files.ca_cert)
    )
    topic = f"{ROOT}/agg/aggr1/control"
    payload = _token()

    async with MqttTransport(settings=settings) as transport:
        await transport.subscribe(topic)
        await transport.publish(topic, payload)
        async with asyncio.timeout(WAIT_S):
            incoming = await anext(transport.messages())

    assert incoming.payload == payload


@pytest.mark.broker
def test_tls_client_without_the_ca_fails_with_a_certificate_error(secured: Secured) -> None:
    settings = _tls_settings(secured, "127.0.0.1", TLSSettings(enabled=True))

    async def connect() -> None:
        async with MqttTransport(settings=settings.model_copy(update={"connect_timeout": WAIT_S})):
            pass

    # A loop of its own (asyncio.run): see the end of the test.
    with pytest.raises(TransportError, match="certificate verify failed") as caught:
        asyncio.run(connect())

    assert f"127.0.0.1:{secured.broker.tls_port}" in str(caught.value)
    # paho 2.2 leaves the socket of a failed TLS handshake open, kept alive by the error's
    # traceback and the finished loop's tasks: collect it here, rather than let its
    # ResourceWarning (an error under filterwarnings) fail whichever test runs the GC next.
    del caught
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        gc.collect()


# -- real components over the secured broker -----------------------------------------------------


@pytest.mark.broker
def test_a_round_with_real_components_over_the_secured_broker(tmp_path: Path) -> None:
    # Prepare: the ACL must let the shipped aggregator, agents and admin do their work.
    from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
    from agent.client import BasicClient

    with _secured_broker(tmp_path / "broker", agents=["a1", "a2"], debug_log=True) as secured:
        broker = secured.broker
        config = AggregatorConfig(
            name="aggr1",
            project=PROJECT,
            broker=secured.settings("aggr1"),
            data_dir=tmp_path / "agg",
        )
        common = {
            "aggregator_ip_address": broker.host,
            "reg_port": broker.port,
            "project": PROJECT,
            "aggregator": "aggr1",
            "model_timeout": 30,
        }
        base = {"w": np.zeros((2, 3), dtype=np.float32)}
        online = threading.Barrier(3, timeout=30)

        def agent(name: str, value: float) -> tuple[AckMessage | None, dict[str, Any]]:
            with BasicClient(agent_name=name, token=secured.password(name), **common) as client:
                client.set_bm_obj(base)
                online.wait()
                model = client.wait_for_sg_model()
                local = {"w": model["w"] + np.float32(value)}
                ack = client.send_trained_model(local, {"accuracy": 0.5}, num_samples=1)
                result: dict[str, Any] = client.wait_for_sg_model()
                return ack, result

        # Execute
        with running_aggregator(config) as service, ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(agent, "a1", 1.0), pool.submit(agent, "a2", 3.0)]
            online.wait()
            AdminAgent(
                aggregator_ip_address=broker.host,
                reg_port=broker.port,
                project=PROJECT,
                token=secured.password("admin"),
                timeout=30,
                base_model=BaseModel("tiny", base, BaseModelConvFormat.numpy_format),
            ).initialize()
            outcomes = [future.result(timeout=60) for future in futures]

        # Assert: one round aggregated from both agents, acknowledged to and received by both
        # (an ACL that hid the inbox or the model would show here), and no publish refused.
        assert len(service.results) == 1
        assert sorted(c.agent for c in service.results[0].contributors) == ["a1", "a2"]
        for ack, model in outcomes:
            assert ack is not None
            assert ack.status is AckStatus.ACCEPTED
            np.testing.assert_allclose(model["w"], np.full((2, 3), 2.0, dtype=np.float32))
        log = broker.log_path.read_text()
        assert "Received PUBLISH from aggr1" in log  # debug logging is on
        assert "Denied PUBLISH" not in log


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_init_reports_files_and_users_without_secrets(tmp_path: Path) -> None:
    agents_file = tmp_path / "agents.txt"
    agents_file.write_text("edge-01\nedge-02\n")
    args = ["init", "--project", PROJECT, "--data-dir", str(tmp_path / "d"), "--json"]
    args += ["--agents", "a1", "--agents-file", str(agents_file), "--aggregators", "x1,x2", "--tls"]
    args += ["--admin", "admin", "--admin", "ops"]

    result = CliRunner().invoke(broker_group, args)
    again = CliRunner().invoke(broker_group, args)

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    credentials = load_credentials(tmp_path / "d")
    assert report["users"] == {
        "admin": ["admin", "ops"],
        "aggregator": ["x1", "x2"],
        "sg-aggregator": [],
        "agent": ["a1", "edge-01", "edge-02"],
    }
    assert Path(report["ca_file"]).is_file()
    assert Path(report["password_file"]).is_file()
    assert not any(account.password in result.output for account in credentials.accounts)
    assert again.exit_code == 1
    assert "--force" in again.output
    assert "user ops" in Path(report["acl_file"]).read_text()


def test_cli_init_shows_secrets_only_when_asked(tmp_path: Path) -> None:
    args = ["init", "--project", PROJECT, "--data-dir", str(tmp_path), "--show-secrets"]

    result = CliRunner().invoke(broker_group, args)

    assert result.exit_code == 0, result.output
    assert f"password of admin: {load_credentials(tmp_path).account('admin').password}" in (
        result.output
    )


@pytest.mark.broker
def test_cli_check_logs_in_and_tells_a_refusal_from_silence(secured: Secured) -> None:
    runner = CliRunner()
    port = ["--port", str(secured.broker.port)]

    anonymous = runner.invoke(broker_group, ["check", *port])
    as_json = runner.invoke(broker_group, ["check", *port, "--json"])
    logged_in = runner.invoke(
        broker_group,
        ["check", *port, "--username", "aggr1"],
        env={"FEDHIVE_BROKER_PASSWORD": secured.password("aggr1")},
    )

    assert anonymous.exit_code == 1
    assert "refused an anonymous client: Not authorized" in anonymous.output
    assert json.loads(as_json.output)["refused"] == "Not authorized"
    assert logged_in.exit_code == 0, logged_in.output


def test_cli_start_secure_without_init_says_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        broker_group, ["start", "--secure", "--data-dir", str(tmp_path / "empty")]
    )

    assert result.exit_code == 1
    assert "fedhive broker init" in result.output


@pytest.mark.broker
def test_cli_start_secure_requires_logins_and_serves_tls(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    credentials = init_project(data_dir, project=PROJECT, tls=True)
    port, tls_port = find_free_port(), find_free_port()
    command = [sys.executable, "-m", "broker.cli", "start", "--secure", "--port", str(port)]
    command += ["--tls-port", str(tls_port), "--data-dir", str(data_dir)]
    lines: queue.Queue[str | None] = queue.Queue()

    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        reader = threading.Thread(target=lambda: [*map(lines.put, stdout), lines.put(None)])
        reader.start()
        try:
            first = lines.get(timeout=30)
            assert first is not None
            assert f"listening on mqtt://127.0.0.1:{port}" in first, first
            admin = credentials.account("admin")
            anonymous = probe_connack("127.0.0.1", port, WAIT_S)
            logged_in = probe_connack(
                "127.0.0.1", port, WAIT_S, username="admin", password=admin.password
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join(timeout=10)

    output = [first]
    while (line := lines.get_nowait()) is not None:
        output.append(line)
    assert anonymous is not None
    assert anonymous.value == NOT_AUTHORIZED
    assert logged_in is not None
    assert not logged_in.is_failure
    assert f"TLS    mqtts://127.0.0.1:{tls_port}" in "".join(output)
    assert "secured: project sec" in "".join(output)


@pytest.mark.broker
async def test_our_transport_raises_when_the_broker_refuses_a_publish(secured: Secured) -> None:
    # Prepare: agent a1, logged in through fedhive's own transport.
    async with MqttTransport(settings=secured.settings("a1")) as transport:
        # Execute / Assert: its own topic is fine; another agent's local topic is refused
        # loudly (PUBACK 0x87 becomes a TransportError), not dropped in silence.
        await transport.publish(f"{ROOT}/agents/a1/heartbeat", b"ok")
        with pytest.raises(TransportError, match="refused"):
            await transport.publish(f"{ROOT}/agg/aggr1/local/a2", b"spoof")
        assert transport.connected


@pytest.mark.broker
async def test_an_unconfirmed_publish_the_broker_refuses_is_logged(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: agent a1 through fedhive's transport; a refusal of a publish nobody waits for
    # (confirm=False: acknowledgements, statuses) must still be told, in the log.
    spoof = f"{ROOT}/agg/aggr1/local/a2"
    async with MqttTransport(settings=secured.settings("a1")) as transport:
        with caplog.at_level(logging.WARNING, logger="fedhive.transport"):
            # Execute: returns at once; the PUBACK 0x87 comes later.
            await transport.publish(spoof, b"spoof", confirm=False)
            # A confirmed publish after it: its PUBACK comes after the refusal's.
            await transport.publish(f"{ROOT}/agents/a1/heartbeat", b"ok")
            with pytest.raises(TransportError, match="refused"):
                await transport.publish(spoof, b"spoof again")

    # Assert: the refusal named its topic in one warning; the confirmed refusal still raised.
    refusals = [r.getMessage() for r in caplog.records if "refused a publish" in r.getMessage()]
    assert len(refusals) == 1
    assert spoof in refusals[0]
    assert "Not authorized" in refusals[0]
