"""Message schemas: every MQTT message except chunk frames is a msgpack envelope
``{v, type, project, sender, ts, ...}`` validated here by pydantic before anything uses it."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from common.chunking import Manifest
from common.codec import Segments
from common.errors import FrameError, MessageError

PROTOCOL_VERSION: Final = 1
#: Envelopes are small: inline models are at most one chunk (< 2 MB, the broker's packet cap).
MAX_ENVELOPE_BYTES = 2_000_000

# Strict: an int or a float, never a bool or a numeric string (strict schema validation).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
Metrics = dict[Annotated[str, Field(max_length=128)], FiniteFloat]
# Counts, rounds and sizes are ints on the wire: no bools, floats or numeric strings.
Count = Annotated[StrictInt, Field(ge=0)]
# Project and component names are topic levels (common.topics.check_name).
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
TransferId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _inline_data(value: object) -> bytes | memoryview:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, memoryview) and value.readonly and value.ndim == 1:
        return value if value.format == "B" else value.cast("B")
    raise ValueError(f"Input should be bytes, got {type(value).__name__}")


#: A model's inline bytes: ``bytes``, or a read-only view of the received envelope
#: (``decode_message`` does not copy them out of it).
InlineData = Annotated[bytes | memoryview, PlainValidator(_inline_data)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION
    project: Name
    sender: Name
    ts: FiniteFloat = Field(default_factory=time.time)


class ModelKind(StrEnum):
    BASE = "base"
    GLOBAL = "global"
    LOCAL = "local"
    REGIONAL = "regional"
    SG = "sg"


class TransferInfo(BaseModel):
    """The manifest of a chunked payload, as it travels inside a model message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transfer_id: TransferId
    total_bytes: StrictInt = Field(gt=0)
    chunk_size: StrictInt = Field(gt=0)
    count: StrictInt = Field(gt=0)
    #: BLAKE3 hex digest of the whole payload (common/chunking.py says why not SHA-256).
    blake3: str = Field(pattern=r"^[0-9a-f]{64}$")

    def manifest(self, *, max_bytes: int) -> Manifest:
        try:
            return Manifest.from_wire(self.model_dump(), max_bytes=max_bytes)
        except FrameError as exc:
            raise MessageError(str(exc)) from exc

    @classmethod
    def of(cls, manifest: Manifest) -> TransferInfo:
        return cls.model_validate(manifest.to_wire())


class Contributor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: Name
    num_samples: FiniteFloat = Field(ge=0)


class ModelMessage(_Message):
    """A model: inline (``data``) when it fits one chunk, else announced by ``transfer``."""

    type: Literal["model"] = "model"
    kind: ModelKind
    round: Count
    num_samples: FiniteFloat = Field(default=1.0, ge=0)
    metrics: Metrics = Field(default_factory=dict)
    transfer: TransferInfo | None = None
    data: InlineData | None = None
    framework: str | None = Field(default=None, max_length=32)
    #: Whose models it aggregates. A model for agents (an aggregator's ``model`` topic) lists at
    #: most :data:`MAX_LISTED_CONTRIBUTORS` and counts the rest in ``contributors_omitted``:
    #: every agent decodes every model, and a list of all n contributors made a round O(n^2)
    #: (with 1000 agents, a million objects per round, most of the agents' CPU in garbage
    #: collection). Regional results and SG models list them all.
    contributors: list[Contributor] = Field(default_factory=list, max_length=100_000)
    contributors_omitted: Count = 0
    method: str | None = Field(default=None, max_length=64)
    #: SG models: the sha256 of the base model the federation started from (a new base starts
    #: a new federation at round 0; aggregators follow it whatever the round).
    base_sha: Sha256 | None = None
    #: A chunked payload whose sender waits to be asked (a ResendRequest for its chunks) before
    #: sending them: the receiver takes transfers in turn within its memory budget.
    pull: bool | None = None

    @model_validator(mode="after")
    def _one_payload(self) -> ModelMessage:
        if (self.transfer is None) == (self.data is None):
            raise ValueError("a model message carries exactly one of 'data' and 'transfer'")
        return self


class AgentState(StrEnum):
    """An agent's own word on its presence (its retained ``status`` topic)."""

    ONLINE = "online"
    #: It said goodbye (``disconnect``): it stops counting at once.
    OFFLINE = "offline"
    #: Its last will, published by the broker: the connection dropped without a goodbye.
    #: With an agent timeout set, the heartbeats decide (a reconnecting agent keeps its place).
    LOST = "lost"


class AgentStatusMessage(_Message):
    type: Literal["agent_status"] = "agent_status"
    state: AgentState
    aggregator: Name | None = None


class HeartbeatMessage(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    state: str = Field(default="idle", max_length=32)
    round: Count | None = None
    metrics: Metrics = Field(default_factory=dict)


class AggregatorState(StrEnum):
    WAITING_BASE = "WAITING_BASE"
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    FINISHED = "FINISHED"


class PresenceState(StrEnum):
    """How an aggregator sees one agent (the Aggregation Management view)."""

    #: Online, admitted and heard from within the agent timeout: counts toward ``needed``.
    ACTIVE = "ACTIVE"
    #: No heartbeat for ``agent_timeout`` seconds (frozen, killed or cut off).
    TIMEOUT = "TIMEOUT"
    #: Said goodbye (or its connection dropped with no agent timeout set).
    OFFLINE = "OFFLINE"
    #: Connected but not admitted: ``max_agents`` was reached.
    REJECTED = "REJECTED"


#: The most contributors a model for agents lists (:attr:`ModelMessage.contributors`).
MAX_LISTED_CONTRIBUTORS = 256

#: The longest agent table an aggregator status carries (the rest are counted, not listed).
MAX_STATUS_AGENTS = 256


class AgentInfo(BaseModel):
    """One row of the agent table in an aggregator's status."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    state: PresenceState
    #: Seconds since the last heartbeat (or status) when the status was published.
    last_heartbeat: FiniteFloat | None = Field(default=None, ge=0)
    #: The last round this agent submitted an accepted model for.
    last_round: Count | None = None


class AggStatusMessage(_Message):
    type: Literal["agg_status"] = "agg_status"
    state: AggregatorState
    round: Count
    model_round: Count | None = None
    method: str = Field(max_length=64)
    #: The method the next round switches to (``set_method``), if any.
    next_method: str | None = Field(default=None, max_length=64)
    threshold: FiniteFloat = Field(ge=0, le=1)
    agent_timeout: float = Field(ge=0)  # inf (never) is a valid setting; NaN is not
    max_agents: Count
    max_rounds: Count
    active: Count
    needed: Count
    collected: Count
    blocker: str | None = None
    base_sha: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    #: The agent table. Published apart, on ``agg/{aggr}/agents`` (:class:`AggAgentsMessage`):
    #: every agent receives every status and none reads the table, which made a status 80
    #: times larger (with 1000 agents, most of their CPU went into it). Empty in a status on
    #: the status topic; readers that show it merge it back in (:meth:`with_agents`); a
    #: control reply's status snapshot carries it.
    agents: list[AgentInfo] = Field(default_factory=list, max_length=MAX_STATUS_AGENTS)
    #: Agents known but left out of ``agents`` (the table is bounded).
    agents_omitted: Count = 0
    #: INACTIVE because an admin stopped it: it still serves, so agents wait instead of
    #: re-homing (an INACTIVE status without it is the process gone: its will, or its goodbye).
    paused: bool = False
    #: The sg-aggregator this aggregator sends its regional results to (None: it advances alone).
    sg_aggregator: Name | None = None
    #: The round whose regional result was sent and whose SG model it waits for.
    regional_round: Count | None = None
    #: Agents announce chunked uploads and send the chunks when asked (``ModelMessage.pull``):
    #: the aggregator takes them in turn within its receive budget.
    pull_uploads: bool | None = None
    #: ... except uploads up to this many bytes: their chunks may follow the announcement at
    #: once (each active agent's share of the receive budget, which they all fit in together),
    #: sparing the round trip of being asked.
    push_limit: int | None = Field(default=None, ge=0)
    #: How agents pack their updates for the wire (``common.packing``; None: plain frames).
    compression: str | None = Field(default=None, max_length=64)

    def split(self) -> tuple[AggStatusMessage, AggAgentsMessage]:
        """This status without its agent table, and the table: what the status and agents
        topics carry."""
        table = AggAgentsMessage(
            project=self.project,
            sender=self.sender,
            ts=self.ts,
            agents=self.agents,
            agents_omitted=self.agents_omitted,
        )
        return self.model_copy(update={"agents": [], "agents_omitted": 0}), table

    def with_agents(self, table: AggAgentsMessage | None) -> AggStatusMessage:
        """This status with its agent table merged in: ``table`` if it is the one published
        with this status (same sender and timestamp), else itself (also when it carries a
        table already)."""
        if (
            table is None
            or (table.sender, table.ts) != (self.sender, self.ts)
            or self.agents
            or self.agents_omitted
        ):
            return self
        return self.model_copy(
            update={"agents": table.agents, "agents_omitted": table.agents_omitted}
        )


class AggAgentsMessage(_Message):
    """An aggregator's agent table (retained on ``agg/{aggr}/agents``, published with each
    status): for the CLI and the dashboard, which agents do not subscribe to."""

    type: Literal["agg_agents"] = "agg_agents"
    agents: list[AgentInfo] = Field(default_factory=list, max_length=MAX_STATUS_AGENTS)
    #: Agents known but left out of ``agents`` (the table is bounded).
    agents_omitted: Count = 0


class AggregatorLiveness(StrEnum):
    """How the sg-aggregator sees one aggregator."""

    #: Serving agents: its regional result counts toward ``needed``.
    ALIVE = "ALIVE"
    #: Alive without an active agent: it has nothing to send, so it is not waited for.
    IDLE = "IDLE"
    #: Stopped by an admin, or finished its rounds: not waited for.
    PAUSED = "PAUSED"
    #: Its process is gone (its last will) or silent: still waited for until the aggregator
    #: timeout runs out (it may come back).
    LOST = "LOST"
    #: Gone for longer than the aggregator timeout: the rounds go on without it.
    GONE = "GONE"


class AggregatorInfo(BaseModel):
    """One row of the aggregator table in the sg-aggregator's status."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    state: AggregatorLiveness
    #: Seconds since its last status when the SG status was published.
    last_status: FiniteFloat | None = Field(default=None, ge=0)
    #: The round it is collecting, by its last status.
    round: Count | None = None
    #: Its active agents, by its last status while it served.
    agents: Count = 0
    #: The last round whose regional result from it was accepted.
    last_round: Count | None = None


class SgStatusMessage(_Message):
    """The sg-aggregator's retained status (``sg/status``)."""

    type: Literal["sg_status"] = "sg_status"
    state: AggregatorState
    #: The round being collected (one past ``model_round``).
    round: Count
    model_round: Count | None = None
    method: str = Field(max_length=64)
    next_method: str | None = Field(default=None, max_length=64)
    #: The fraction of counted aggregators whose regional results complete a round.
    threshold: FiniteFloat = Field(ge=0, le=1)
    aggregator_timeout: FiniteFloat = Field(ge=0)
    #: Aggregators alive (ALIVE, IDLE, PAUSED or LOST within the timeout).
    alive: Count
    #: Aggregators whose regional result is waited for (ALIVE, or LOST within the timeout).
    counted: Count
    needed: Count
    collected: Count
    #: The aggregators whose regional results for ``round`` are in.
    regional_from: list[Name] = Field(default_factory=list, max_length=MAX_STATUS_AGENTS)
    blocker: str | None = None
    base_sha: Sha256 | None = None
    aggregators: list[AggregatorInfo] = Field(default_factory=list, max_length=MAX_STATUS_AGENTS)
    aggregators_omitted: Count = 0


class Refusal(StrEnum):
    """Why an aggregator refuses an agent's submissions outright (not one bad model)."""

    #: The agent was not admitted: ``max_agents`` was reached.
    MAX_AGENTS = "max_agents"
    #: The aggregator was stopped by an admin (INACTIVE); it takes models again after restart.
    INACTIVE = "inactive"
    #: ``max_rounds`` were aggregated: training is over.
    FINISHED = "finished"


class AckStatus(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"


class AckMessage(_Message):
    """Aggregator → agent (inbox): what became of a submission."""

    type: Literal["ack"] = "ack"
    round: Count
    status: AckStatus
    reason: str | None = None
    transfer_id: TransferId | None = None
    #: Set when the agent's submissions are refused as such (status ``rejected``).
    refusal: Refusal | None = None


class NoticeKind(StrEnum):
    ADMITTED = "admitted"
    REJECTED = "rejected"


class NoticeMessage(_Message):
    """Aggregator → agent (inbox): whether the agent was admitted, answering its online
    status (``rejected``: ``max_agents`` reached, with the reason)."""

    type: Literal["notice"] = "notice"
    kind: NoticeKind
    reason: str | None = None


class ModelRequest(_Message):
    """Agent → aggregator: send me the current model (``chunks`` None) or these chunks of it."""

    type: Literal["model_request"] = "model_request"
    transfer_id: TransferId | None = None
    chunks: list[Count] | None = Field(default=None, max_length=1_000_000)


class ResendRequest(_Message):
    """Aggregator → agent: chunks of your upload that never arrived."""

    type: Literal["resend"] = "resend"
    transfer_id: TransferId
    chunks: list[Count] = Field(max_length=1_000_000)


class ControlCommand(StrEnum):
    """What an admin can ask an aggregator to do (``agg/{aggr}/control``)."""

    #: Aggregate the open round now with what was collected (at least one model).
    COMPLETE_ROUND = "complete_round"
    #: ``value``: the fraction of active agents whose models complete a round, in (0, 1].
    SET_THRESHOLD = "set_threshold"
    #: ``value``: seconds without a heartbeat before an agent is TIMEOUT; 0 disables.
    SET_TIMEOUT = "set_timeout"
    #: ``value``: the method's name, ``params`` its settings; applies from the next round.
    SET_METHOD = "set_method"
    #: ``value``: how many agents may be connected at once; 0 means no limit.
    SET_MAX_AGENTS = "set_max_agents"
    #: Stop aggregating (INACTIVE): uploads are refused, collected models are kept.
    STOP = "stop"
    #: Aggregate again (ACTIVE), continuing the same round.
    RESTART = "restart"


_NUMBER_COMMANDS = {ControlCommand.SET_THRESHOLD, ControlCommand.SET_TIMEOUT}


class ControlRequest(_Message):
    """Admin → aggregator, with an MQTT 5 response topic and correlation data."""

    type: Literal["control"] = "control"
    command: ControlCommand
    # Strict: a bool or a numeric string is no number here.
    value: (
        StrictInt
        | Annotated[StrictFloat, Field(allow_inf_nan=False)]
        | Annotated[StrictStr, Field(max_length=64)]
        | None
    ) = None
    params: dict[Annotated[str, Field(max_length=64)], Any] = Field(
        default_factory=dict, max_length=64
    )

    @model_validator(mode="after")
    def _value_fits_command(self) -> ControlRequest:
        command, value = self.command, self.value
        if command in _NUMBER_COMMANDS:
            ok = isinstance(value, int | float)
            what = "a number"
        elif command is ControlCommand.SET_MAX_AGENTS:
            ok = isinstance(value, int)
            what = "an integer"
        elif command is ControlCommand.SET_METHOD:
            ok = isinstance(value, str) and value != ""
            what = "a method name"
        else:
            ok = value is None
            what = "no value"
        if not ok:
            raise ValueError(f"{command.value} takes {what}, got {value!r}")
        if self.params and command is not ControlCommand.SET_METHOD:
            raise ValueError(f"{command.value} takes no params")
        return self


class ControlReply(_Message):
    """Aggregator → admin: whether the command was carried out, and the status after it."""

    type: Literal["control_reply"] = "control_reply"
    command: ControlCommand | None = None
    ok: bool
    #: Why the command was refused (``ok`` false).
    reason: str | None = None
    #: What was done (``ok`` true).
    detail: str | None = None
    status: AggStatusMessage | None = None


Message = Annotated[
    ModelMessage
    | AgentStatusMessage
    | HeartbeatMessage
    | AggStatusMessage
    | AggAgentsMessage
    | SgStatusMessage
    | AckMessage
    | NoticeMessage
    | ModelRequest
    | ResendRequest
    | ControlRequest
    | ControlReply,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def encode_message(message: BaseModel) -> bytes:
    """msgpack bytes of a message (``None`` fields left out)."""
    packed: bytes = msgpack.packb(message.model_dump(mode="python", exclude_none=True))
    return packed


#: The msgpack ``str`` "data" (fixstr, or str8 as :func:`encode_model_message` writes it).
_DATA_KEYS = (b"\xa4data", b"\xd9\x04data")
_MAP_WIDTHS = {0xDE: 2, 0xDF: 4}
_BIN_WIDTHS = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def encode_model_message(message: ModelMessage) -> bytes | Segments:
    """:func:`encode_message` for a model, without copying its inline ``data``: the map's
    header and ``data``'s key, ``data`` itself, then the other fields, sent back to back.
    Packing would copy ``data`` twice (into msgpack's buffer, then into the bytes it returns).

    ``data`` comes first so :func:`decode_message` finds it without parsing the rest, and
    16 bytes into the envelope: the map32, str8 and bin32 headers (wider than msgpack needs,
    which it allows) make that head 16 bytes long, so the tensors a receiver decodes in place
    are aligned. Misaligned, NumPy copied every tensor before BLAS read it, and cast it by
    its slow path."""
    if message.data is None:
        return encode_message(message)
    fields = message.model_dump(mode="python", exclude_none=True, exclude={"data"})
    packer = msgpack.Packer()
    head = b"".join(
        (
            b"\xdf" + (len(fields) + 1).to_bytes(4, "big"),
            _DATA_KEYS[1],
            b"\xc6" + len(message.data).to_bytes(4, "big"),
        )
    )
    rest = b"".join(packer.pack(key) + packer.pack(value) for key, value in fields.items())
    return Segments(head, message.data, rest)


def _leading_data(payload: bytes | bytearray) -> tuple[bytes, memoryview] | None:
    """For a map whose first entry is ``data`` with a ``bin`` value (as
    :func:`encode_model_message` writes it): the map without that entry, and a read-only view
    of the value, not a copy (msgpack would copy it into new bytes). None for any other map."""
    first = payload[0] if payload else 0
    if 0x81 <= first <= 0x8F:
        count, pos = first & 0x0F, 1
    elif first in _MAP_WIDTHS:
        pos = 1 + _MAP_WIDTHS[first]
        count = int.from_bytes(payload[1:pos], "big")
    else:
        return None
    key = next((k for k in _DATA_KEYS if payload[pos : pos + len(k)] == k), None)
    if key is None:
        return None
    pos += len(key)
    width = _BIN_WIDTHS.get(payload[pos]) if len(payload) > pos else None
    if width is None or count < 1:
        return None
    start = pos + 1 + width
    end = start + int.from_bytes(payload[pos + 1 : start], "big")
    if end > len(payload):
        return None  # truncated: msgpack says so
    view = memoryview(payload)
    others = count - 1
    if others < 16:
        header = bytes((0x80 | others,))
    elif others < 1 << 16:
        header = b"\xde" + others.to_bytes(2, "big")
    else:
        header = b"\xdf" + others.to_bytes(4, "big")
    return header + view[end:], view[start:end].toreadonly()


def decode_message(payload: bytes | bytearray, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Message:
    """Unpack and validate one envelope; MessageError says what was wrong.

    A model's inline ``data`` written first in the map (:func:`encode_model_message`) is
    decoded as a read-only view of ``payload``, not copied: ``payload`` must not change
    while the message is in use."""
    if len(payload) > max_bytes:
        raise MessageError(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    leading = _leading_data(payload)
    try:
        raw = msgpack.unpackb(
            payload if leading is None else leading[0],
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=65_536,
            max_array_len=1_000_000,
            max_map_len=10_000,
            max_ext_len=0,
        )
    except (msgpack.exceptions.StackError, RecursionError) as exc:
        raise MessageError("not a msgpack envelope: nesting too deep") from exc
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        # Some msgpack errors have an empty message: name the class at least.
        raise MessageError(f"not a msgpack envelope: {type(exc).__name__} {exc}".rstrip()) from exc
    if not isinstance(raw, dict):
        raise MessageError(f"envelope must be a map, got {type(raw).__name__}")
    if leading is not None:
        if "data" in raw:
            raise MessageError("envelope has the key 'data' twice")
        raw["data"] = leading[1]
    version = raw.get("v")
    # ``True == 1`` and ``1.0 == 1`` in Python: only the int 1 is version 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise MessageError(
            f"unsupported protocol version {version!r} (expected {PROTOCOL_VERSION})"
        )
    return _validate(raw)


def _validate(raw: dict[str, Any]) -> Message:
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'envelope'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise MessageError(f"invalid {raw.get('type', 'untyped')!r} message: {errors}") from exc
