"""Message envelopes: every type round-trips; anything malformed is a MessageError naming why."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from common.errors import MessageError
from common.messages import (
    MAX_ENVELOPE_BYTES,
    MAX_STATUS_AGENTS,
    AckMessage,
    AckStatus,
    AgentInfo,
    AgentState,
    AgentStatusMessage,
    AggAgentsMessage,
    AggregatorInfo,
    AggregatorLiveness,
    AggregatorState,
    AggStatusMessage,
    Contributor,
    ControlCommand,
    ControlReply,
    ControlRequest,
    HeartbeatMessage,
    ModelKind,
    ModelMessage,
    ModelRequest,
    NoticeKind,
    NoticeMessage,
    PresenceState,
    Refusal,
    ResendRequest,
    SgStatusMessage,
    TransferInfo,
    decode_message,
    encode_message,
    encode_model_message,
)

TID = "0123456789abcdef" * 2
SHA = "ab" * 32
ENVELOPE: dict[str, Any] = {"project": "proj", "sender": "a1"}


def transfer() -> TransferInfo:
    return TransferInfo(transfer_id=TID, total_bytes=10, chunk_size=4, count=3, blake3=SHA)


MESSAGES: list[BaseModel] = [
    ModelMessage(
        **ENVELOPE,
        kind=ModelKind.LOCAL,
        round=3,
        num_samples=12.5,
        metrics={"acc": 0.9, "loss": 0.1},
        data=b"\x00\x01binary\xff",
        framework="numpy",
    ),
    ModelMessage(
        **ENVELOPE,
        kind=ModelKind.GLOBAL,
        round=4,
        transfer=transfer(),
        contributors=[Contributor(agent="a1", num_samples=3.0)],
        method="fedavg",
    ),
    AgentStatusMessage(**ENVELOPE, state=AgentState.ONLINE, aggregator="g1"),
    HeartbeatMessage(**ENVELOPE, state="training", round=2, metrics={"cpu": 0.5}),
    AggStatusMessage(
        **ENVELOPE,
        state=AggregatorState.ACTIVE,
        round=2,
        model_round=1,
        method="fedavg",
        threshold=0.7,
        agent_timeout=30.0,
        max_agents=0,
        max_rounds=10,
        active=3,
        needed=3,
        collected=1,
        blocker=None,
        base_sha=SHA,
    ),
    AckMessage(**ENVELOPE, round=2, status=AckStatus.STALE, reason="late", transfer_id=TID),
    AckMessage(
        **ENVELOPE, round=2, status=AckStatus.REJECTED, reason="stopped", refusal=Refusal.INACTIVE
    ),
    ModelRequest(**ENVELOPE),
    ModelRequest(**ENVELOPE, transfer_id=TID, chunks=[0, 5]),
    ResendRequest(**ENVELOPE, transfer_id=TID, chunks=[1, 2]),
    AgentStatusMessage(**ENVELOPE, state=AgentState.LOST),
    AggStatusMessage(
        **ENVELOPE,
        state=AggregatorState.INACTIVE,
        round=3,
        method="fedavg",
        next_method="geometric_median",
        threshold=1.0,
        agent_timeout=3.0,
        max_agents=3,
        max_rounds=0,
        active=2,
        needed=2,
        collected=1,
        blocker="stopped by admin 'admin'",
        agents=[
            AgentInfo(name="a0", state=PresenceState.ACTIVE, last_heartbeat=0.4, last_round=2),
            AgentInfo(name="a1", state=PresenceState.TIMEOUT, last_heartbeat=3.5),
            AgentInfo(name="a2", state=PresenceState.REJECTED),
        ],
        agents_omitted=5,
    ),
    AggAgentsMessage(
        **ENVELOPE,
        agents=[AgentInfo(name="a0", state=PresenceState.ACTIVE, last_heartbeat=0.4)],
        agents_omitted=2,
    ),
    NoticeMessage(**ENVELOPE, kind=NoticeKind.REJECTED, reason="max_agents 3 reached"),
    ModelMessage(
        **ENVELOPE,
        kind=ModelKind.SG,
        round=2,
        num_samples=30.0,
        data=b"\x00",
        contributors=[Contributor(agent="x1", num_samples=10.0)],
        method="fedavg",
        base_sha=SHA,
    ),
    SgStatusMessage(
        **ENVELOPE,
        state=AggregatorState.ACTIVE,
        round=3,
        model_round=2,
        method="fedavg",
        threshold=1.0,
        aggregator_timeout=15.0,
        alive=2,
        counted=2,
        needed=2,
        collected=1,
        regional_from=["g1"],
        base_sha=SHA,
        aggregators=[
            AggregatorInfo(
                name="g1", state=AggregatorLiveness.ALIVE, last_status=0.5, round=3, agents=3
            ),
            AggregatorInfo(name="g2", state=AggregatorLiveness.LOST, agents=2, last_round=2),
        ],
    ),
    ControlRequest(**ENVELOPE, command=ControlCommand.COMPLETE_ROUND),
    ControlRequest(**ENVELOPE, command=ControlCommand.SET_THRESHOLD, value=0.5),
    ControlRequest(**ENVELOPE, command=ControlCommand.SET_MAX_AGENTS, value=3),
    ControlRequest(
        **ENVELOPE, command=ControlCommand.SET_METHOD, value="krum", params={"f": 1, "m": [1]}
    ),
    ControlReply(**ENVELOPE, command=ControlCommand.STOP, ok=True, detail="stopped"),
    ControlReply(**ENVELOPE, ok=False, reason="not an admin"),
]


def packed(fields: Any) -> bytes:
    data: bytes = msgpack.packb(fields)
    return data


def heartbeat(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "type": "heartbeat", **ENVELOPE, "ts": 1.0, **fields}


def model(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "type": "model", **ENVELOPE, "ts": 1.0, "kind": "local", "round": 1, **fields}


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: BaseModel) -> None:
    # Prepare
    payload = encode_message(message)

    # Execute
    decoded = decode_message(payload)

    # Assert
    assert type(decoded) is type(message)
    assert decoded == message


def test_every_message_type_is_covered() -> None:
    # Prepare / Execute
    types = {type(m) for m in MESSAGES}

    # Assert
    assert types == {
        ModelMessage,
        AgentStatusMessage,
        HeartbeatMessage,
        AggStatusMessage,
        AggAgentsMessage,
        SgStatusMessage,
        AckMessage,
        NoticeMessage,
        ModelRequest,
        ResendRequest,
        ControlRequest,
        ControlReply,
    }


def test_control_reply_carries_the_status_snapshot() -> None:
    # Prepare
    status = next(m for m in MESSAGES if isinstance(m, AggStatusMessage))
    reply = ControlReply(**ENVELOPE, command=ControlCommand.RESTART, ok=True, status=status)

    # Execute
    decoded = decode_message(encode_message(reply))

    # Assert
    assert isinstance(decoded, ControlReply)
    assert decoded.status == status


@pytest.mark.parametrize(
    ("command", "value", "match"),
    [
        ("set_threshold", None, "set_threshold takes a number"),
        ("set_threshold", "0.5", "set_threshold takes a number"),
        ("set_threshold", True, "value"),  # a bool is no number
        ("set_timeout", float("inf"), "value"),
        ("set_max_agents", 3.0, "set_max_agents takes an integer"),
        ("set_method", "", "set_method takes a method name"),
        ("set_method", 1, "set_method takes a method name"),
        ("stop", 1, "stop takes no value"),
        ("restart", "now", "restart takes no value"),
        ("reboot", None, "command"),
    ],
)
def test_control_request_value_must_fit_the_command(command: str, value: Any, match: str) -> None:
    raw = {"v": 1, "type": "control", **ENVELOPE, "ts": 1.0, "command": command}
    if value is not None:
        raw["value"] = value
    with pytest.raises(MessageError, match=match):
        decode_message(packed(raw))


def test_control_request_params_only_for_set_method() -> None:
    raw = {
        "v": 1,
        "type": "control",
        **ENVELOPE,
        "ts": 1.0,
        "command": "stop",
        "params": {"f": 1},
    }
    with pytest.raises(MessageError, match="stop takes no params"):
        decode_message(packed(raw))


def test_status_agent_table_is_bounded() -> None:
    row = {"name": "a", "state": "ACTIVE"}
    raw = {
        "v": 1,
        "type": "agg_status",
        **ENVELOPE,
        "ts": 1.0,
        "state": "ACTIVE",
        "round": 1,
        "method": "fedavg",
        "threshold": 1.0,
        "agent_timeout": 0.0,
        "max_agents": 0,
        "max_rounds": 0,
        "active": 0,
        "needed": 1,
        "collected": 0,
        "agents": [row] * (MAX_STATUS_AGENTS + 1),
    }
    with pytest.raises(MessageError, match="agents"):
        decode_message(packed(raw))


def test_encoding_leaves_none_fields_out() -> None:
    # Prepare
    message = ModelRequest(**ENVELOPE)

    # Execute
    raw = msgpack.unpackb(encode_message(message))

    # Assert
    assert set(raw) == {"v", "type", "project", "sender", "ts"}


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "not a msgpack envelope"),
        (b"\xc1", "not a msgpack envelope"),
        (b"\x92\x01", "not a msgpack envelope"),
        (packed(heartbeat()) + b"\x00", "not a msgpack envelope.*extra data"),
        (packed({1: 2}), "not a msgpack envelope"),
        (packed([1, 2]), "envelope must be a map, got list"),
        (packed("text"), "envelope must be a map, got str"),
        (packed(None), "envelope must be a map, got NoneType"),
    ],
)
def test_non_msgpack_or_non_map_is_rejected(payload: bytes, match: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(MessageError, match=match):
        decode_message(payload)


@pytest.mark.parametrize("version", [0, 2, None, "1", 1.0, True])
def test_wrong_version_is_rejected(version: object) -> None:
    # Prepare
    payload = packed(heartbeat(v=version))

    # Execute / Assert
    with pytest.raises(MessageError, match=r"unsupported protocol version .* \(expected 1\)"):
        decode_message(payload)


def test_missing_version_is_rejected() -> None:
    # Prepare
    fields = heartbeat()
    del fields["v"]

    # Execute / Assert
    with pytest.raises(MessageError, match="unsupported protocol version None"):
        decode_message(packed(fields))


def test_unknown_type_is_rejected() -> None:
    # Prepare
    payload = packed(heartbeat(type="gossip"))

    # Execute / Assert
    with pytest.raises(MessageError, match=r"invalid 'gossip' message.*does not match"):
        decode_message(payload)


def test_missing_type_is_rejected() -> None:
    # Prepare
    fields = heartbeat()
    del fields["type"]

    # Execute / Assert
    with pytest.raises(MessageError, match=r"invalid 'untyped' message.*discriminator 'type'"):
        decode_message(packed(fields))


@pytest.mark.parametrize("field", ["project", "sender"])
def test_missing_envelope_field_is_rejected(field: str) -> None:
    # Prepare
    fields = heartbeat()
    del fields[field]

    # Execute / Assert
    with pytest.raises(MessageError, match=rf"heartbeat\.{field}: Field required"):
        decode_message(packed(fields))


def test_missing_body_field_is_rejected() -> None:
    # Prepare
    fields = model(data=b"x")
    del fields["kind"]

    # Execute / Assert
    with pytest.raises(MessageError, match=r"model\.kind: Field required"):
        decode_message(packed(fields))


def test_extra_field_is_rejected() -> None:
    # Prepare
    payload = packed(heartbeat(admin=True))

    # Execute / Assert
    with pytest.raises(MessageError, match=r"heartbeat\.admin: Extra inputs are not permitted"):
        decode_message(payload)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metric_is_rejected(bad: float) -> None:
    # Prepare
    payload = packed(model(data=b"x", metrics={"acc": 0.5, "loss": bad}))

    # Execute / Assert
    with pytest.raises(MessageError, match=r"metrics\.loss: Input should be a finite number"):
        decode_message(payload)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        (model(data=b"x", num_samples=float("nan")), "num_samples"),
        (heartbeat(ts=float("inf")), "ts"),
        (heartbeat(metrics={"cpu": float("nan")}), r"metrics\.cpu"),
    ],
)
def test_non_finite_number_is_rejected(fields: dict[str, Any], where: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(MessageError, match=rf"{where}: Input should be a finite number"):
        decode_message(packed(fields))


def test_oversize_payload_is_rejected_before_unpacking() -> None:
    # Prepare
    payload = packed(model(data=b"x" * 200))

    # Execute / Assert
    with pytest.raises(MessageError, match=r"message of \d+ bytes exceeds the 100-byte limit"):
        decode_message(payload, max_bytes=100)


def test_default_size_limit_rejects_a_large_envelope() -> None:
    # Prepare
    payload = packed(model(data=bytes(MAX_ENVELOPE_BYTES)))

    # Execute / Assert
    with pytest.raises(MessageError, match="exceeds the 2000000-byte limit"):
        decode_message(payload)


def test_model_with_both_data_and_transfer_is_rejected() -> None:
    # Prepare
    payload = packed(model(data=b"x", transfer=transfer().model_dump()))

    # Execute / Assert
    with pytest.raises(MessageError, match="exactly one of 'data' and 'transfer'"):
        decode_message(payload)


def test_model_with_neither_data_nor_transfer_is_rejected() -> None:
    # Prepare
    payload = packed(model())

    # Execute / Assert
    with pytest.raises(MessageError, match="exactly one of 'data' and 'transfer'"):
        decode_message(payload)


def test_model_with_both_payloads_cannot_be_built_either() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValidationError, match="exactly one of 'data' and 'transfer'"):
        ModelMessage(**ENVELOPE, kind=ModelKind.LOCAL, round=1)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("transfer_id", "0123"),
        ("transfer_id", TID.upper()),
        ("transfer_id", TID + "\n"),
        ("blake3", "xyz"),
        ("blake3", SHA[:-1]),
        ("blake3", SHA.upper()),
    ],
)
def test_bad_transfer_id_or_digest_is_rejected(key: str, value: str) -> None:
    # Prepare
    info = {**transfer().model_dump(), key: value}

    # Execute / Assert
    with pytest.raises(MessageError, match=rf"transfer\.{key}: String should match pattern"):
        decode_message(packed(model(transfer=info)))


def test_inconsistent_transfer_is_a_message_error() -> None:
    # Prepare
    message = decode_message(packed(model(transfer={**transfer().model_dump(), "count": 2})))
    assert isinstance(message, ModelMessage)
    assert message.transfer is not None

    # Execute / Assert
    with pytest.raises(MessageError, match="count 2 but 10 bytes in chunks of 4 make 3"):
        message.transfer.manifest(max_bytes=1000)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        (model(data=b"x", round=True), "round"),
        (model(data=b"x", round="3"), "round"),
        (model(data=b"x", round=-1), "round"),
        (model(transfer={**transfer().model_dump(), "total_bytes": 10.0}), "total_bytes"),
        (heartbeat(sender="a/b"), "sender"),
        (heartbeat(project=""), "project"),
    ],
)
def test_wrongly_typed_field_is_rejected(fields: dict[str, Any], where: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(MessageError, match=rf"\.{where}: "):
        decode_message(packed(fields))


def test_negative_chunk_index_is_rejected() -> None:
    # Prepare
    fields = {"v": 1, "type": "resend", **ENVELOPE, "transfer_id": TID, "chunks": [0, -1]}

    # Execute / Assert
    with pytest.raises(MessageError, match=r"resend\.chunks\.1: Input should be greater"):
        decode_message(packed(fields))


def test_deeply_nested_arrays_are_a_message_error() -> None:
    # Prepare: 100k nested one-element arrays (0x91), ending in nil
    payload = b"\x91" * 100_000 + b"\xc0"

    # Execute / Assert
    with pytest.raises(MessageError, match="nesting too deep"):
        decode_message(payload)


def test_deep_nesting_inside_a_field_is_a_message_error() -> None:
    # Prepare: a valid envelope whose metrics value is 100k nested arrays
    fields = heartbeat()
    head = packed(fields)[1:]  # the entries of the fixmap, without its header byte
    nested = packed("metrics") + b"\x91" * 100_000 + b"\xc0"
    payload = bytes([0x80 | (len(fields) + 1)]) + head + nested

    # Execute / Assert
    with pytest.raises(MessageError, match="nesting too deep"):
        decode_message(payload)


def test_moderately_nested_field_fails_validation_not_the_process() -> None:
    # Prepare: nesting msgpack accepts, but no field of the schema allows
    value: Any = 1.0
    for _ in range(500):
        value = [value]

    # Execute / Assert
    with pytest.raises(MessageError, match=r"metrics\.cpu: Input should be a valid number"):
        decode_message(packed(heartbeat(metrics={"cpu": value})))


# ------------------------------------------------------------------ statuses for agents
def _status_with_table(rows: int, omitted: int = 0) -> AggStatusMessage:
    return AggStatusMessage(
        **ENVELOPE,
        state=AggregatorState.ACTIVE,
        round=4,
        method="fedavg",
        threshold=1.0,
        agent_timeout=10.0,
        max_agents=0,
        max_rounds=0,
        active=rows + omitted,
        needed=rows + omitted,
        collected=1,
        agents=[
            AgentInfo(name=f"a{i}", state=PresenceState.ACTIVE, last_heartbeat=0.5, last_round=3)
            for i in range(rows)
        ],
        agents_omitted=omitted,
    )


@pytest.mark.parametrize(("rows", "omitted"), [(0, 0), (3, 0), (MAX_STATUS_AGENTS, 744)])
def test_a_status_splits_into_status_and_agent_table_and_merges_back(
    rows: int, omitted: int
) -> None:
    # Prepare
    status = _status_with_table(rows, omitted)

    # Execute: over the wire, as the aggregator publishes them.
    bare, table = status.split()
    got_status = decode_message(encode_message(bare))
    got_table = decode_message(encode_message(table))

    # Assert: the status carries no table (and is small), the table carries it all, and
    # merging gives the status back.
    assert isinstance(got_status, AggStatusMessage)
    assert isinstance(got_table, AggAgentsMessage)
    assert (got_status.agents, got_status.agents_omitted) == ([], 0)
    assert len(encode_message(bare)) < 400
    assert (got_table.agents, got_table.agents_omitted) == (status.agents, omitted)
    assert (got_table.sender, got_table.ts) == (status.sender, status.ts)
    assert got_status.with_agents(got_table) == status


def test_a_status_merges_only_the_table_published_with_it() -> None:
    # Prepare: two publications of one aggregator (their timestamps differ).
    status = _status_with_table(3)
    bare, table = status.split()
    later_bare, later_table = _status_with_table(5).model_copy(update={"ts": status.ts + 1}).split()

    # Execute / Assert: a table merges into its own status only; a status that carries a
    # table keeps it.
    assert bare.with_agents(table) == status
    assert bare.with_agents(later_table) is bare
    assert later_bare.with_agents(table) is later_bare
    assert bare.with_agents(None) is bare
    assert status.with_agents(table) is status


@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536, 400_000])
def test_a_model_envelope_sent_in_two_parts_is_the_same_message(size: int) -> None:
    # Prepare: a model with inline data at each bin header size (8, 16, 32-bit lengths).
    data = bytes(i % 251 for i in range(size))
    message = ModelMessage(
        project="p", sender="a1", kind=ModelKind.GLOBAL, round=4, data=data,
        metrics={"loss": 0.5}, contributors=[Contributor(agent="x", num_samples=2.0)],
    )  # fmt: skip

    # Execute
    envelope = encode_model_message(message)
    joined = bytes(envelope)

    # Assert: the same map as encode_message (data first), decoding to the same message, with
    # the data itself as a part, not a copy; decoded, the data is a view of the envelope.
    assert msgpack.unpackb(joined) == msgpack.unpackb(encode_message(message))
    decoded = decode_message(joined)
    assert decoded == message
    assert len(envelope) == len(joined)
    assert 0 <= len(joined) - len(encode_message(message)) <= 10  # wider headers, same map
    if size:
        assert not isinstance(envelope, bytes)
        assert envelope.parts[1].obj is data
        assert isinstance(decoded, ModelMessage)
        assert isinstance(decoded.data, memoryview)
        assert decoded.data.obj is joined
        assert decoded.data.readonly
        # The data starts 16 bytes into the envelope: tensors decoded in place are aligned.
        assert len(bytes(envelope.parts[0])) == 16
        assert np.frombuffer(decoded.data, dtype=np.uint8).ctypes.data % 16 == 0


@pytest.mark.parametrize("full", [False, True])
def test_a_model_envelope_with_data_first_decodes_like_any_other_order(full: bool) -> None:
    # Prepare: the same fields with 'data' first and last; every field makes a map of 16
    # entries (msgpack's map16 header, not a fixmap).
    fields = model(data=b"\x00\x01\x02")
    if full:
        fields |= {
            "num_samples": 2.0, "metrics": {"acc": 0.5}, "framework": "numpy",
            "contributors": [{"agent": "a1", "num_samples": 2.0}], "contributors_omitted": 0,
            "method": "fedavg", "base_sha": "0" * 64, "pull": False,
        }  # fmt: skip
    assert len(fields) == (16 if full else 8)
    first = {"data": fields.pop("data"), **fields}
    last = {**fields, "data": first["data"]}

    # Execute
    a = decode_message(msgpack.packb(first))
    b = decode_message(bytearray(msgpack.packb(last)))

    # Assert
    assert a == b
    assert isinstance(a, ModelMessage)
    assert isinstance(a.data, memoryview)
    assert bytes(a.data) == b"\x00\x01\x02"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x82\xa4data\xc4\x05ab", "not a msgpack envelope"),  # data cut short
        (b"\x82\xa4data\xc4\x01a\xa4data\xc4\x01b", "'data' twice"),
        (b"\x81\xa4data\xa1a", "unsupported protocol version"),  # str, not bin: msgpack's path
        (b"\xdf\xff\xff\xff\xff\xd9\x04data\xc4\x01a", "not a msgpack envelope"),  # 4G keys
    ],
)
def test_a_malformed_leading_data_entry_is_refused(payload: bytes, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        decode_message(payload)


def test_a_chunked_model_envelope_is_plain_bytes() -> None:
    message = ModelMessage(
        project="p", sender="a1", kind=ModelKind.GLOBAL, round=4, transfer=transfer()
    )
    assert encode_model_message(message) == encode_message(message)
