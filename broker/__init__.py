"""Mosquitto for fedhive: config rendering, start/stop, health checks, and the credentials, ACL
and TLS files of a secured broker (CLI in broker.cli)."""

from broker.acl import render_acl
from broker.health import broker_answers, probe_connack
from broker.process import (
    DEFAULT_TEMPLATE,
    BrokerState,
    MosquittoBroker,
    TLSListener,
    find_free_port,
    find_mosquitto,
    reload_broker,
    render_config,
)
from broker.security import (
    Account,
    ProjectCredentials,
    Role,
    SecurityFiles,
    add_agent,
    init_project,
    load_credentials,
    remove_agent,
    security_files,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "Account",
    "BrokerState",
    "MosquittoBroker",
    "ProjectCredentials",
    "Role",
    "SecurityFiles",
    "TLSListener",
    "add_agent",
    "broker_answers",
    "find_free_port",
    "find_mosquitto",
    "init_project",
    "load_credentials",
    "probe_connack",
    "reload_broker",
    "remove_agent",
    "render_acl",
    "render_config",
    "security_files",
]
