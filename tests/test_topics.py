"""Topics: every builder round-trips through ``Topics.parse``; anything else is a MessageError."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from common.errors import MessageError
from common.topics import CHUNKED_KINDS, ParsedTopic, TopicKind, Topics, check_name

T = Topics("proj")

# (builder, expected parse result) for every topic a component publishes.
BUILT: list[tuple[Callable[[], str], ParsedTopic]] = [
    (T.base, ParsedTopic(TopicKind.BASE, "proj")),
    (lambda: T.agent_status("a1"), ParsedTopic(TopicKind.AGENT_STATUS, "proj", agent="a1")),
    (lambda: T.agent_heartbeat("a1"), ParsedTopic(TopicKind.AGENT_HEARTBEAT, "proj", agent="a1")),
    (lambda: T.agent_assign("a1"), ParsedTopic(TopicKind.AGENT_ASSIGN, "proj", agent="a1")),
    (lambda: T.agent_request("a1"), ParsedTopic(TopicKind.AGENT_REQUEST, "proj", agent="a1")),
    (lambda: T.agent_inbox("a1"), ParsedTopic(TopicKind.AGENT_INBOX, "proj", agent="a1")),
    (lambda: T.agg_status("g1"), ParsedTopic(TopicKind.AGG_STATUS, "proj", aggregator="g1")),
    (lambda: T.agg_agents("g1"), ParsedTopic(TopicKind.AGG_AGENTS, "proj", aggregator="g1")),
    (lambda: T.agg_model("g1"), ParsedTopic(TopicKind.AGG_MODEL, "proj", aggregator="g1")),
    (
        lambda: T.agg_local("g1", "a1"),
        ParsedTopic(TopicKind.AGG_LOCAL, "proj", agent="a1", aggregator="g1"),
    ),
    (lambda: T.agg_regional("g1"), ParsedTopic(TopicKind.AGG_REGIONAL, "proj", aggregator="g1")),
    (lambda: T.agg_inbox("g1"), ParsedTopic(TopicKind.AGG_INBOX, "proj", aggregator="g1")),
    (lambda: T.agg_control("g1"), ParsedTopic(TopicKind.AGG_CONTROL, "proj", aggregator="g1")),
    (lambda: T.agg_reply("g1"), ParsedTopic(TopicKind.AGG_REPLY, "proj", aggregator="g1")),
    (T.sg_model, ParsedTopic(TopicKind.SG_MODEL, "proj")),
    (T.sg_status, ParsedTopic(TopicKind.SG_STATUS, "proj")),
    (T.sg_request, ParsedTopic(TopicKind.SG_REQUEST, "proj")),
    (lambda: T.metrics("g1"), ParsedTopic(TopicKind.METRICS, "proj", aggregator="g1")),
]
IDS = [expected.kind.value for _, expected in BUILT]


def test_every_kind_has_a_builder_case() -> None:
    # Prepare / Execute
    kinds = {expected.kind for _, expected in BUILT}

    # Assert
    assert kinds == set(TopicKind)


@pytest.mark.parametrize(("build", "expected"), BUILT, ids=IDS)
def test_builder_round_trips(build: Callable[[], str], expected: ParsedTopic) -> None:
    # Prepare
    topic = build()

    # Execute
    parsed = T.parse(topic)

    # Assert
    assert topic.startswith("fedhive/v1/proj/")
    assert parsed == expected


@pytest.mark.parametrize(("build", "expected"), BUILT, ids=IDS)
def test_chunk_variant_round_trips_for_model_topics(
    build: Callable[[], str], expected: ParsedTopic
) -> None:
    # Prepare
    topic = Topics.chunks(build())

    # Execute / Assert
    if expected.kind in CHUNKED_KINDS:
        parsed = T.parse(topic)
        assert topic.endswith("/chunk")
        assert parsed.kind is expected.kind
        assert (parsed.agent, parsed.aggregator) == (expected.agent, expected.aggregator)
        assert parsed.chunk is True
    else:
        with pytest.raises(MessageError, match="carry no chunk frames"):
            T.parse(topic)


def test_agent_named_chunk_is_not_taken_for_a_chunk_topic() -> None:
    # Prepare
    local = T.agg_local("g1", "chunk")

    # Execute
    parsed = T.parse(local)
    parsed_chunks = T.parse(Topics.chunks(local))

    # Assert
    assert parsed == ParsedTopic(TopicKind.AGG_LOCAL, "proj", agent="chunk", aggregator="g1")
    assert parsed_chunks.agent == "chunk"
    assert parsed_chunks.chunk is True


def test_wildcard_subscriptions_cover_their_topics() -> None:
    # Prepare / Execute
    subscriptions = (T.all_agent_topics(), T.all_local("g1"), T.all_agg_status())

    # Assert
    assert subscriptions == (
        "fedhive/v1/proj/agents/+/+",
        "fedhive/v1/proj/agg/g1/local/#",
        "fedhive/v1/proj/agg/+/status",
    )


@pytest.mark.parametrize(
    "suffix",
    [
        "",
        "base/extra",
        "bases",
        "agents/a1",
        "agents/a1/unknown",
        "agents/a1/status/more/levels",
        "agg/g1",
        "agg/g1/unknown",
        "agg/g1/local",
        "agg/g1/control/other",
        "sg",
        "sg/other",
        "metrics",
        "chunk",
        "base/chunk/chunk",
    ],
)
def test_unknown_topic_is_rejected(suffix: str) -> None:
    # Prepare
    topic = f"fedhive/v1/proj/{suffix}"

    # Execute / Assert
    with pytest.raises(MessageError, match="unknown topic"):
        T.parse(topic)


@pytest.mark.parametrize(
    "topic",
    ["fedhive/v1/other/base", "fedhive/v1/projx/base", "fedhive/v2/proj/base", "proj/base", ""],
)
def test_topic_of_another_project_is_rejected(topic: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(MessageError, match="is not under 'fedhive/v1/proj/'"):
        T.parse(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "fedhive/v1/proj/agents//status",
        "fedhive/v1/proj/agents/a b/status",
        "fedhive/v1/proj/agg//model",
        "fedhive/v1/proj/agg/g1/local/",
        "fedhive/v1/proj/metrics/" + "x" * 65,
    ],
)
def test_topic_with_invalid_name_level_is_rejected(topic: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(MessageError, match=r"topic .*: invalid (agent|aggregator) name"):
        T.parse(topic)


@pytest.mark.parametrize(
    "name", ["", "a/b", "a+b", "a#", "+", "#", "a b", "agent\n", "é", "$SYS", "x" * 65]
)
def test_invalid_names_are_rejected_everywhere(name: str) -> None:
    # Prepare
    builders: list[Callable[[], object]] = [
        lambda: Topics(name),
        lambda: T.agent_status(name),
        lambda: T.agent_inbox(name),
        lambda: T.agg_model(name),
        lambda: T.agg_local("g1", name),
        lambda: T.agg_local(name, "a1"),
        lambda: T.metrics(name),
        lambda: T.all_local(name),
    ]

    # Execute / Assert
    for build in builders:
        with pytest.raises(MessageError, match=r"invalid \w+ name .*use 1-64 letters"):
            build()


@pytest.mark.parametrize("name", ["a", "agent_1", "A-b.c", "x" * 64, "chunk"])
def test_valid_names_pass(name: str) -> None:
    # Prepare / Execute / Assert
    assert check_name("agent", name) == name
