"""The one place that builds and parses fedhive's MQTT topics.

Every topic lives under ``fedhive/v1/{project}/``. Large payloads on a topic ``T`` travel as a
manifest on ``T`` and chunk frames on ``T/chunk`` (see :mod:`common.chunking`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum

from common.errors import MessageError

PREFIX = "fedhive/v1"
CHUNK_SUFFIX = "chunk"

# Project, agent and aggregator names become topic levels: no wildcards, no separators.
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it can be a topic level, else raise :class:`MessageError`."""
    # fullmatch: with ``match`` the ``$`` anchor would let a trailing newline through.
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise MessageError(
            f"invalid {kind} name {value!r}: use 1-64 letters, digits, '_', '.' or '-'"
        )
    return value


class TopicKind(StrEnum):
    BASE = "base"
    AGENT_STATUS = "agent_status"
    AGENT_HEARTBEAT = "agent_heartbeat"
    AGENT_ASSIGN = "agent_assign"
    AGENT_REQUEST = "agent_request"
    AGENT_INBOX = "agent_inbox"
    AGG_STATUS = "agg_status"
    AGG_AGENTS = "agg_agents"
    AGG_MODEL = "agg_model"
    AGG_LOCAL = "agg_local"
    AGG_REGIONAL = "agg_regional"
    AGG_INBOX = "agg_inbox"
    AGG_CONTROL = "agg_control"
    AGG_REPLY = "agg_reply"
    SG_MODEL = "sg_model"
    SG_STATUS = "sg_status"
    SG_REQUEST = "sg_request"
    METRICS = "metrics"


#: The topics whose payloads may be chunked (they carry models): only these have ``/chunk``.
CHUNKED_KINDS = frozenset(
    {
        TopicKind.BASE,
        TopicKind.AGENT_INBOX,
        TopicKind.AGG_MODEL,
        TopicKind.AGG_LOCAL,
        TopicKind.AGG_REGIONAL,
        TopicKind.AGG_INBOX,
        TopicKind.SG_MODEL,
    }
)


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic taken apart: its kind, the names in it, and whether it carries chunk frames."""

    kind: TopicKind
    project: str
    agent: str | None = None
    aggregator: str | None = None
    chunk: bool = False


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic builder for one project."""

    project: str

    def __post_init__(self) -> None:
        check_name("project", self.project)

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.project}"

    def base(self) -> str:
        return f"{self.root}/base"

    def agent_status(self, agent: str) -> str:
        return f"{self.root}/agents/{_agent(agent)}/status"

    def agent_heartbeat(self, agent: str) -> str:
        return f"{self.root}/agents/{_agent(agent)}/heartbeat"

    def agent_assign(self, agent: str) -> str:
        return f"{self.root}/agents/{_agent(agent)}/assign"

    def agent_request(self, agent: str) -> str:
        """Agent → aggregator: model requests and chunk re-requests."""
        return f"{self.root}/agents/{_agent(agent)}/request"

    def agent_inbox(self, agent: str) -> str:
        """Aggregator → one agent: acks, rejections, re-sent chunks, models for late joiners."""
        return f"{self.root}/agents/{_agent(agent)}/inbox"

    def agg_status(self, aggregator: str) -> str:
        return f"{self.root}/agg/{_aggr(aggregator)}/status"

    def agg_agents(self, aggregator: str) -> str:
        """The aggregator's agent table (retained), apart from its status: for the CLI and
        the dashboard; agents do not subscribe to it."""
        return f"{self.root}/agg/{_aggr(aggregator)}/agents"

    def agg_model(self, aggregator: str) -> str:
        return f"{self.root}/agg/{_aggr(aggregator)}/model"

    def agg_local(self, aggregator: str, agent: str) -> str:
        return f"{self.root}/agg/{_aggr(aggregator)}/local/{_agent(agent)}"

    def agg_regional(self, aggregator: str) -> str:
        """Aggregator → sg-aggregator: the aggregator's regional result of a round."""
        return f"{self.root}/agg/{_aggr(aggregator)}/regional"

    def agg_inbox(self, aggregator: str) -> str:
        """sg-aggregator → one aggregator: acks for regional results, re-send requests for
        their chunks, and the SG model (or its chunks) for an aggregator that asked for it."""
        return f"{self.root}/agg/{_aggr(aggregator)}/inbox"

    def agg_control(self, aggregator: str) -> str:
        return f"{self.root}/agg/{_aggr(aggregator)}/control"

    def agg_reply(self, aggregator: str) -> str:
        return f"{self.root}/agg/{_aggr(aggregator)}/control/reply"

    def sg_model(self) -> str:
        return f"{self.root}/sg/model"

    def sg_status(self) -> str:
        return f"{self.root}/sg/status"

    def sg_request(self) -> str:
        """Aggregator → sg-aggregator: send me the current SG model (or these chunks of it)."""
        return f"{self.root}/sg/request"

    def metrics(self, aggregator: str) -> str:
        return f"{self.root}/metrics/{_aggr(aggregator)}"

    # Subscriptions with wildcards
    def all_agent_topics(self) -> str:
        return f"{self.root}/agents/+/+"

    def all_local(self, aggregator: str) -> str:
        """Local models and their chunk frames for one aggregator."""
        return f"{self.root}/agg/{_aggr(aggregator)}/local/#"

    def all_agg_status(self) -> str:
        return f"{self.root}/agg/+/status"

    def all_agg_agents(self) -> str:
        return f"{self.root}/agg/+/agents"

    def all_regional(self) -> str:
        """Every aggregator's regional results (their chunk frames: ``chunks`` of this)."""
        return f"{self.root}/agg/+/regional"

    @staticmethod
    def chunks(topic: str) -> str:
        """The topic that carries the chunk frames of payloads announced on ``topic``."""
        return f"{topic}/{CHUNK_SUFFIX}"

    def parse(self, topic: str) -> ParsedTopic:
        """Take a topic of this project apart; raise :class:`MessageError` if unknown.

        Names in the topic are checked like the builders check them. ``T/chunk`` parses as
        ``T`` with ``chunk=True``, for the topics that carry model payloads. The same few
        topics come again with every message: recent results are kept (errors are not).
        """
        return _parse(self, topic)

    def _parse(self, topic: str) -> ParsedTopic:
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise MessageError(f"topic {topic!r} is not under {prefix!r}")
        parts = topic[len(prefix) :].split("/")
        # A topic as it stands wins: an agent named "chunk" has ``agg/{aggr}/local/chunk``.
        parsed = self._match(topic, parts, chunk=False)
        if parsed is not None:
            return parsed
        if len(parts) > 1 and parts[-1] == CHUNK_SUFFIX:
            parsed = self._match(topic, parts[:-1], chunk=True)
            if parsed is not None:
                if parsed.kind not in CHUNKED_KINDS:
                    raise MessageError(
                        f"topic {topic!r}: {parsed.kind.value} topics carry no chunk frames"
                    )
                return parsed
        raise MessageError(f"unknown topic {topic!r}")

    def _match(self, topic: str, parts: list[str], *, chunk: bool) -> ParsedTopic | None:
        p = self.project
        match parts:
            case ["base"]:
                return ParsedTopic(TopicKind.BASE, p, chunk=chunk)
            case ["agents", agent, leaf] if leaf in _AGENT_LEAVES:
                return ParsedTopic(
                    _AGENT_LEAVES[leaf], p, agent=_level("agent", agent, topic), chunk=chunk
                )
            case ["agg", aggr, "local", agent]:
                return ParsedTopic(
                    TopicKind.AGG_LOCAL,
                    p,
                    agent=_level("agent", agent, topic),
                    aggregator=_level("aggregator", aggr, topic),
                    chunk=chunk,
                )
            case ["agg", aggr, "control", "reply"]:
                aggregator = _level("aggregator", aggr, topic)
                return ParsedTopic(TopicKind.AGG_REPLY, p, aggregator=aggregator, chunk=chunk)
            case ["agg", aggr, leaf] if leaf in _AGG_LEAVES:
                return ParsedTopic(
                    _AGG_LEAVES[leaf], p, aggregator=_level("aggregator", aggr, topic), chunk=chunk
                )
            case ["sg", "model"]:
                return ParsedTopic(TopicKind.SG_MODEL, p, chunk=chunk)
            case ["sg", "status"]:
                return ParsedTopic(TopicKind.SG_STATUS, p, chunk=chunk)
            case ["sg", "request"]:
                return ParsedTopic(TopicKind.SG_REQUEST, p, chunk=chunk)
            case ["metrics", aggr]:
                return ParsedTopic(
                    TopicKind.METRICS, p, aggregator=_level("aggregator", aggr, topic), chunk=chunk
                )
        return None


@functools.lru_cache(maxsize=4096)
def _parse(topics: Topics, topic: str) -> ParsedTopic:
    return topics._parse(topic)


def _agent(name: str) -> str:
    return check_name("agent", name)


def _aggr(name: str) -> str:
    return check_name("aggregator", name)


def _level(kind: str, value: str, topic: str) -> str:
    try:
        return check_name(kind, value)
    except MessageError as exc:
        raise MessageError(f"topic {topic!r}: {exc}") from None


_AGENT_LEAVES = {
    "status": TopicKind.AGENT_STATUS,
    "heartbeat": TopicKind.AGENT_HEARTBEAT,
    "assign": TopicKind.AGENT_ASSIGN,
    "request": TopicKind.AGENT_REQUEST,
    "inbox": TopicKind.AGENT_INBOX,
}
_AGG_LEAVES = {
    "status": TopicKind.AGG_STATUS,
    "agents": TopicKind.AGG_AGENTS,
    "model": TopicKind.AGG_MODEL,
    "regional": TopicKind.AGG_REGIONAL,
    "inbox": TopicKind.AGG_INBOX,
    "control": TopicKind.AGG_CONTROL,
}
