"""An aggregator's link to its sg-aggregator: regional results out, the SG model in.

:class:`SgLink` sends the regional result of a round on ``agg/{aggr}/regional`` (manifest and
chunks, not retained) and keeps it until that round's SG model arrives: the sg-aggregator may ask
for chunks again (a :class:`~common.messages.ResendRequest` in ``agg/{aggr}/inbox``), or, when
its status shows it lacks the result (it restarted, a message was lost), get it whole again. It
also asks on ``sg/request`` for an SG model this aggregator never got (or for the missing chunks
of one whose retained manifest came alone). Nothing here decides rounds: the aggregator service
does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aggregator.engine import RoundResult
from common.codec import encode
from common.config import AggregatorConfig
from common.exchange import ModelReceiver, prepare_model_message, publish_chunks, publish_model
from common.messages import (
    AckMessage,
    AckStatus,
    Contributor,
    ModelKind,
    ModelMessage,
    ModelRequest,
    ResendRequest,
    SgStatusMessage,
    encode_message,
)
from common.topics import Topics
from common.transport import Transport

log = logging.getLogger("fedhive.aggregator")

#: A regional result is sent again when the sg-aggregator still lacks it after this many
#: chunk timeouts (a large transfer may well be under way before that).
RESEND_AFTER_CHUNK_TIMEOUTS = 3


@dataclass(slots=True)
class RegionalResult:
    """A regional result as sent, kept until its round's SG model arrives."""

    round: int
    payload: bytes
    message: ModelMessage
    sent: float


class SgLink:
    """One aggregator's side of the SG layer.

    Args:
        config: the aggregator's settings (``sg_aggregator`` names the other side).
        transport: returns the aggregator's open transport.
        receiver: the aggregator's model receiver (an SG transfer under way is not asked for
            again).
    """

    def __init__(
        self,
        *,
        config: AggregatorConfig,
        transport: Callable[[], Transport],
        receiver: ModelReceiver,
    ) -> None:
        assert config.sg_aggregator is not None
        self.sg_aggregator = config.sg_aggregator
        self.config = config
        self.topics = Topics(config.project)
        self._transport = transport
        self._receiver = receiver
        self.regional: RegionalResult | None = None
        self._requested = 0.0  # when the SG model was last asked for (monotonic)

    @property
    def name(self) -> str:
        return self.config.name

    def settled(self, round: int) -> None:
        """The SG model of ``round`` arrived: a regional result up to it is no longer needed."""
        if self.regional is not None and self.regional.round <= round:
            self.regional = None

    @staticmethod
    def encode_result(result: RoundResult) -> bytes:
        """The regional result's payload: its float64 tensors, and its contributors in the
        frame's meta (the sg-aggregator's store keeps the frame, so a restarted sg-aggregator
        still knows which agents a recovered regional result stands for)."""
        meta = {"contributors": [[c.agent, c.num_samples] for c in result.contributors]}
        return encode(result.model, meta)

    async def send(
        self,
        result: RoundResult,
        *,
        framework: str,
        base_sha: str | None,
        payload: bytes | None = None,
    ) -> None:
        """Send the regional result of a sealed round (float64 tensors, their total sample
        count and the contributors); ``payload``: the result already encoded
        (:meth:`encode_result`)."""
        if payload is None:
            payload = self.encode_result(result)
        contributors = [(c.agent, c.num_samples) for c in result.contributors]
        self.regional = self._prepare(
            result.round, payload, contributors, result.method, framework, base_sha
        )
        await self._publish(self.regional)

    def restore(
        self,
        *,
        round: int,
        payload: bytes,
        contributors: Sequence[tuple[str, float]],
        method: str,
        framework: str,
        base_sha: str | None,
    ) -> None:
        """Keep the regional result of ``round`` sent before a restart (from the store), to
        send again when the sg-aggregator's status shows it lacks it."""
        regional = self._prepare(round, payload, contributors, method, framework, base_sha)
        regional.sent = -math.inf  # no wait: it is sent again as soon as the status asks
        self.regional = regional

    def _prepare(
        self,
        round: int,
        payload: bytes,
        contributors: Sequence[tuple[str, float]],
        method: str,
        framework: str,
        base_sha: str | None,
    ) -> RegionalResult:
        listed = [Contributor(agent=agent, num_samples=n) for agent, n in contributors]
        message, _manifest = prepare_model_message(
            payload,
            chunk_size=self.config.broker.chunk_size,
            project=self.config.project,
            sender=self.name,
            kind=ModelKind.REGIONAL,
            round=round,
            num_samples=sum(c.num_samples for c in listed),
            framework=framework,
            contributors=listed,
            method=method,
            base_sha=base_sha,
        )
        return RegionalResult(round, payload, message, time.monotonic())

    async def _publish(self, regional: RegionalResult) -> None:
        message = regional.message
        manifest = (
            message.transfer.manifest(max_bytes=self.config.max_model_bytes)
            if message.transfer is not None
            else None
        )
        regional.sent = time.monotonic()
        await publish_model(
            self._transport(),
            self.topics.agg_regional(self.name),
            message,
            regional.payload,
            manifest,
            max_inflight=self.config.broker.max_inflight,
        )

    async def resend_chunks(self, request: ResendRequest) -> None:
        """The sg-aggregator lacks chunks of the regional result."""
        regional = self.regional
        if regional is None or regional.message.transfer is None:
            return
        if regional.message.transfer.transfer_id != request.transfer_id:
            return
        manifest = regional.message.transfer.manifest(max_bytes=self.config.max_model_bytes)
        log.info("re-sending %d chunks of the regional result", len(request.chunks))
        await publish_chunks(
            self._transport(),
            Topics.chunks(self.topics.agg_regional(self.name)),
            regional.payload,
            manifest,
            indices=[i for i in request.chunks if 0 <= i < manifest.count],
            max_inflight=self.config.broker.max_inflight,
        )

    def on_ack(self, ack: AckMessage) -> None:
        """The sg-aggregator's word on a regional result: a stale or rejected one is dropped
        (sending it again would change nothing)."""
        if ack.status not in (AckStatus.STALE, AckStatus.REJECTED):
            return
        log.warning(
            "regional result of round %d %s by %s: %s",
            ack.round,
            ack.status.value,
            ack.sender,
            ack.reason,
        )
        if self.regional is not None and self.regional.round == ack.round:
            self.regional = None

    async def on_status(
        self, status: SgStatusMessage, *, model_round: int, base_sha: str | None
    ) -> None:
        """Catch up with the SG layer: ask for an SG model this aggregator lacks, send again a
        regional result the sg-aggregator lacks."""
        behind = status.base_sha is not None and status.base_sha != base_sha
        if status.model_round is not None and (behind or status.model_round > model_round):
            await self.request_model()
            return
        regional = self.regional
        wait = RESEND_AFTER_CHUNK_TIMEOUTS * self.config.chunk_timeout
        if (
            regional is not None
            and status.round == regional.round
            and self.name not in status.regional_from
            and time.monotonic() - regional.sent >= wait
        ):
            log.info(
                "sg-aggregator %s lacks the regional result of round %d: sending it again",
                status.sender,
                regional.round,
            )
            await self._publish(regional)

    async def request_model(self) -> None:
        """Ask for the current SG model, sent to this aggregator's inbox (at most once per
        chunk timeout, and not while a transfer of it is under way)."""
        now = time.monotonic()
        if now - self._requested < self.config.chunk_timeout:
            return
        if self._receiver.pending_for(self.topics.sg_model()) is not None:
            return  # the chunk watch asks for what it lacks
        self._requested = now
        request = ModelRequest(project=self.config.project, sender=self.name)
        await self._transport().publish(self.topics.sg_request(), encode_message(request))

    async def request_chunks(self, message: ModelMessage, missing: list[int]) -> None:
        """Ask for the chunks of an SG model transfer that never arrived."""
        request = ModelRequest(
            project=self.config.project,
            sender=self.name,
            transfer_id=message.transfer.transfer_id if message.transfer else None,
            chunks=missing,
        )
        log.info("asking sg-aggregator %s for %d missing chunks", message.sender, len(missing))
        await self._transport().publish(self.topics.sg_request(), encode_message(request))
