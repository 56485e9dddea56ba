"""Settings as pydantic models: the agent config JSON (STADLE's keys plus fedhive's) and the
aggregator config. Bad settings raise :class:`~common.errors.ConfigError` naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from common.chunking import DEFAULT_CHUNK_SIZE
from common.errors import ConfigError, MessageError
from common.topics import check_name

DEFAULT_PROJECT = "default"
DEFAULT_AGGREGATOR = "aggr1"
DEFAULT_SG_AGGREGATOR = "sg"
#: An agent config's ``aggregator`` value that lets the agent pick its aggregator (the one with
#: the fewest active agents) and re-home when it is gone. No aggregator may be named so.
AUTO_AGGREGATOR = "auto"
DEFAULT_BROKER_PORT = 1883
#: The largest model payload accepted by default (2 GiB): checked before any allocation.
DEFAULT_MAX_MODEL_BYTES = 2 << 30
#: Where an aggregator keeps its store (SQLite file and model blobs) unless told otherwise; the
#: ``fedhive models`` and ``fedhive metrics`` commands read the same place by default.
DEFAULT_DATA_DIR = Path("./fedhive-data")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# What check_name calls each name field in its message ("invalid agent name 'a/b'").
_NAME_KINDS = {"agent_name": "agent", "name": "aggregator", "sg_aggregator": "sg-aggregator"}


def _retention(value: Any) -> Any:
    """``keep_local``: ``"all"``, ``"none"`` or a round count K >= 0 (also as its text)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", "none"):
            return text
        value = int(text) if text.isascii() and text.isdecimal() else value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"must be 'all', 'none' or a number of rounds >= 0, got {value!r}")


#: Which local models keep their bytes once their round completed: every one, none, or those
#: of the last K rounds (their records, metrics and the best model are always kept).
Retention = Literal["all", "none"] | Annotated[int, Field(ge=0, strict=True)]

#: How agents pack model updates for the wire (``common.packing``): a lossy cast of the float
#: tensors, a lossless compressor, or both.
Compression = Literal["float16", "bfloat16", "zlib", "float16+zlib", "bfloat16+zlib"]


def _topic_level(value: str, info: ValidationInfo) -> str:
    """A name that becomes a topic level; the error names the field (``agent_name``...)."""
    field = info.field_name or "name"
    try:
        return check_name(_NAME_KINDS.get(field, field), value)
    except MessageError as exc:  # → a validation error pydantic reports with the field
        raise ValueError(str(exc)) from None


class TLSSettings(_Settings):
    """TLS to the broker. ``ca_file`` verifies the server; cert/key authenticate the client."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(
        default=False, description="skip hostname verification (development only)"
    )


class BrokerSettings(_Settings):
    """Where and how a component reaches the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_BROKER_PORT, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: TLSSettings = Field(default_factory=lambda: TLSSettings())
    # DESIGN.md: a long upload on a slow link must not trip the keepalive.
    keepalive: int = Field(default=60, ge=60, le=65535)
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024, le=1_900_000)
    #: QoS 1 publishes outstanding at once; Mosquitto's max_inflight_messages is 20.
    max_inflight: int = Field(default=16, ge=1, le=20)
    connect_timeout: float = Field(default=10.0, gt=0)
    #: The broker's max_packet_size (mosquitto.conf); larger publishes are refused locally,
    #: because Mosquitto would disconnect the sender instead of answering.
    max_packet_size: int = Field(default=2_000_000, ge=4096)
    reconnect_max_delay: float = Field(default=10.0, gt=0)
    #: Seconds the broker keeps an aggregator's or agent's session (its subscriptions and the
    #: QoS 1 messages published for it) while it is disconnected, so a component that
    #: reconnects gets what it missed; 0 turns persistent sessions off.
    session_expiry: int = Field(default=3600, ge=0, le=4_294_967_295)
    #: QoS 1 messages the broker may send this client before it acknowledges them (MQTT 5
    #: Receive Maximum); the client holds acknowledgements back while its buffer is full.
    receive_maximum: int = Field(default=20, ge=1, le=65535)
    #: Bytes of received messages a client holds for its consumer; past them it acknowledges
    #: QoS 1 messages only as they are taken (the broker keeps the rest, up to its own queue
    #: limits) and drops QoS 0 ones. Raise it for large chunked models with many agents.
    receive_buffer: int = Field(default=32 << 20, ge=1 << 20)


class BaseModelSettings(_Settings):
    """STADLE's ``base_model`` block: how to build the base model."""

    model_config = ConfigDict(extra="allow")

    model_fn: str | None = None
    model_fn_src: str | None = None
    model_format: str = "PyTorch"
    model_name: str = "model"
    model_fn_args: dict[str, Any] = Field(default_factory=dict)


class AgentConfig(_Settings):
    """The agent config JSON. STADLE's keys keep their meaning: ``aggr_ip``/``reg_port`` name
    the broker, ``token`` is the agent's broker password."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    agent_name: str = "default_agent"
    model_path: Path = Path("./fedhive-data/agent")
    aggr_ip: str = "127.0.0.1"
    reg_port: int = Field(default=DEFAULT_BROKER_PORT, ge=1, le=65535)
    token: str | None = None
    base_model: BaseModelSettings = Field(default_factory=lambda: BaseModelSettings())
    # fedhive's own keys
    project: str = DEFAULT_PROJECT
    #: The aggregator's name, or ``auto``: pick the live aggregator with the fewest active
    #: agents and re-home when it is gone for longer than ``rehome_timeout``.
    aggregator: str = DEFAULT_AGGREGATOR
    rehome_timeout: float = Field(
        default=15.0,
        gt=0,
        description="seconds an auto-assigned agent's aggregator may be gone before it re-homes",
    )
    username: str | None = Field(default=None, description="broker user; defaults to agent_name")
    tls: TLSSettings = Field(default_factory=lambda: TLSSettings())
    heartbeat_interval: float = Field(default=5.0, gt=0)
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024, le=1_900_000)
    keepalive: int = Field(default=60, ge=60, le=65535)
    model_timeout: float | None = Field(
        default=None, gt=0, description="seconds wait_for_sg_model waits; None waits forever"
    )
    ack_timeout: float = Field(default=30.0, gt=0)
    max_model_bytes: int = Field(default=DEFAULT_MAX_MODEL_BYTES, gt=0)
    # STADLE keys that have no meaning here are accepted and ignored.
    simulation: bool | None = None
    exch_port: int | None = None

    _topic_safe = field_validator("agent_name", "project", "aggregator")(_topic_level)

    @property
    def auto_aggregator(self) -> bool:
        """Whether the agent picks (and re-picks) its aggregator itself."""
        return self.aggregator == AUTO_AGGREGATOR

    @field_validator("reg_port", mode="before")
    @classmethod
    def _port_from_str(cls, value: Any) -> Any:
        # STADLE's sample configs write the port as a string ("8765"); isdecimal, not isdigit:
        # "²" is a digit that int() refuses.
        text = value.strip() if isinstance(value, str) else None
        return int(text) if text is not None and text.isascii() and text.isdecimal() else value

    def broker(self) -> BrokerSettings:
        return BrokerSettings(
            host=self.aggr_ip,
            port=self.reg_port,
            username=self.username or self.agent_name,
            password=self.token,
            tls=self.tls,
            keepalive=self.keepalive,
            chunk_size=self.chunk_size,
        )


class AggregatorConfig(_Settings):
    """Settings of one aggregator (``fedhive aggregator start --config FILE``)."""

    name: str = DEFAULT_AGGREGATOR
    project: str = DEFAULT_PROJECT
    broker: BrokerSettings = Field(default_factory=lambda: BrokerSettings())
    method: str = "fedavg"
    method_params: dict[str, Any] = Field(default_factory=dict)
    threshold: float = Field(default=1.0, gt=0, le=1)
    agent_timeout: float = Field(default=0.0, ge=0, description="seconds; 0 disables the timeout")
    max_agents: int = Field(default=0, ge=0, description="0: no limit")
    max_rounds: int = Field(default=0, ge=0, description="0: no limit")
    max_model_bytes: int = Field(default=DEFAULT_MAX_MODEL_BYTES, gt=0)
    chunk_timeout: float = Field(
        default=5.0, gt=0, description="re-request missing chunks after this"
    )
    #: Senders allowed on the control topic. The broker ACL (admin role) will enforce who may
    #: publish there; until then the sender's name is checked against this list.
    admins: list[str] = Field(default_factory=lambda: ["admin"])
    monitor_interval: float = Field(
        default=0.5, gt=0, le=60, description="seconds between heartbeat-monitor checks"
    )
    status_interval: float = Field(
        default=5.0, gt=0, description="republish the status at least this often (seconds)"
    )
    #: The store: a SQLite file and the model blobs (blobs only with ``db_url``).
    data_dir: Path = DEFAULT_DATA_DIR
    db_url: str | None = Field(
        default=None,
        description="database URL of the store (postgresql://user@host/db); None: SQLite in "
        "data_dir",
    )
    keep_local: Retention = Field(
        default="all",
        description="local models whose bytes are kept once their round completed: all, "
        "none, or those of the last K rounds",
    )
    best_metric: str = Field(
        default="accuracy",
        min_length=1,
        max_length=128,
        description="the agents' metric the best model is tracked by (loss and loss_*: lower "
        "is better)",
    )
    resume_grace: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="seconds a round resumed from the store with models already collected "
        "waits for its agents to report before it may complete on the threshold",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: The project's sg-aggregator: when set, this aggregator sends its regional result of each
    #: round to it and serves the SG model it sends back, instead of advancing on its own.
    sg_aggregator: str | None = None
    store: bool = Field(
        default=True,
        description="record every accepted model and round in the store and resume from it "
        "after a restart; false keeps nothing on disk (no crash recovery)",
    )
    receive_budget: int = Field(
        default=128 << 20,
        ge=1 << 20,
        description="bytes of local-model uploads held at once, from their first chunk until "
        "they are folded; further uploads wait their turn (agents send their chunks when "
        "asked), so memory does not grow with the number of agents. One upload larger than "
        "this is received alone",
    )
    compression: Compression | None = Field(
        default=None,
        description="how agents pack their updates for the wire: float16 or bfloat16 (lossy "
        "casts of float tensors), zlib (lossless), or a cast plus zlib (float16+zlib); None "
        "sends plain frames",
    )

    _topic_safe = field_validator("name", "project")(_topic_level)
    _retention = field_validator("keep_local", mode="before")(_retention)

    @field_validator("sg_aggregator")
    @classmethod
    def _sg_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _topic_level(value, info)

    @field_validator("name")
    @classmethod
    def _not_auto(cls, value: str) -> str:
        if value == AUTO_AGGREGATOR:
            raise ValueError(
                f"{AUTO_AGGREGATOR!r} is reserved: agents use it to pick an aggregator"
            )
        return value

    @field_validator("admins")
    @classmethod
    def _admin_names(cls, value: list[str]) -> list[str]:
        for name in value:
            try:
                check_name("admin", name)
            except MessageError as exc:
                raise ValueError(str(exc)) from None
        return value


class SgAggregatorConfig(_Settings):
    """Settings of the sg-aggregator (``fedhive sg-aggregator start --config FILE``)."""

    name: str = DEFAULT_SG_AGGREGATOR
    project: str = DEFAULT_PROJECT
    broker: BrokerSettings = Field(default_factory=lambda: BrokerSettings())
    #: How regional results are combined: ``fedavg`` (weighted by their sample totals: exactly
    #: the weighted mean over every agent's model) or a robust method over the regional models
    #: (``coordinate_median``, ``geometric_median``, ``krum``...).
    method: str = "fedavg"
    method_params: dict[str, Any] = Field(default_factory=dict)
    threshold: float = Field(
        default=1.0, gt=0, le=1, description="fraction of live aggregators needed per round"
    )
    aggregator_timeout: float = Field(
        default=15.0,
        gt=0,
        description="seconds an aggregator may be gone (or silent) before rounds go on without "
        "it; keep it above the aggregators' status_interval",
    )
    max_model_bytes: int = Field(default=DEFAULT_MAX_MODEL_BYTES, gt=0)
    chunk_timeout: float = Field(
        default=5.0, gt=0, description="re-request missing chunks after this"
    )
    monitor_interval: float = Field(
        default=0.5, gt=0, le=60, description="seconds between liveness checks"
    )
    status_interval: float = Field(
        default=5.0, gt=0, description="republish the status at least this often (seconds)"
    )
    #: The store of SG rounds and the regional results they combined.
    data_dir: Path = DEFAULT_DATA_DIR
    db_url: str | None = Field(
        default=None,
        description="database URL of the store (postgresql://user@host/db); None: SQLite in "
        "data_dir",
    )
    keep_local: Retention = Field(
        default="all",
        description="regional results whose bytes are kept once their round completed: all, "
        "none, or those of the last K rounds",
    )
    resume_grace: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="seconds a round resumed from the store with regional results already "
        "collected waits for the aggregators' statuses before it may complete",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _topic_safe = field_validator("name", "project")(_topic_level)
    _retention = field_validator("keep_local", mode="before")(_retention)


_M = TypeVar("_M", bound=BaseModel)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_settings(model: type[_M], data: Any, *, source: str = "settings") -> _M:
    """Validate ``data`` into ``model``; ConfigError lists every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc


def load_settings(model: type[_M], path: str | Path, **overrides: Any) -> _M:
    """Read a JSON config file into ``model``; keyword overrides that are not None win."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not UTF-8
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {p} is nested too deeply") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_settings(model, data, source=str(p))
