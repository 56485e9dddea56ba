"""AckOutbox: acknowledgements held back and sent together (pure logic, no broker)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from aggregator.outbox import AckOutbox
from common.errors import TransportError


class Recorder:
    """A ``send`` that records each call; it fails while ``failing`` is set."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, bytes]]] = []
        self.failing = False
        self.sent = asyncio.Event()

    async def __call__(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if self.failing:
            raise TransportError("not connected")
        self.calls.append(list(messages))
        self.sent.set()


def _acks(n: int) -> list[tuple[str, bytes]]:
    return [(f"inbox/{i}", b"ack %d" % i) for i in range(n)]


async def test_held_acks_go_out_together_in_order_when_flushed() -> None:
    # Prepare: an outbox whose timer would not fire during the test.
    send = Recorder()
    outbox = AckOutbox(send, delay=60.0)

    # Execute: three acks held, a turn of the loop, then a flush.
    for topic, payload in _acks(3):
        outbox.put(topic, payload)
    await asyncio.sleep(0)
    held_before_flush = (len(outbox), list(send.calls))
    outbox.flush()
    await asyncio.wait_for(send.sent.wait(), 5)

    # Assert: nothing went out before the flush; then all three in one send, in order.
    assert held_before_flush == (3, [])
    assert send.calls == [_acks(3)]
    assert len(outbox) == 0


async def test_an_ack_nobody_flushes_goes_out_after_the_delay() -> None:
    send = Recorder()
    outbox = AckOutbox(send, delay=0.05)
    outbox.put("inbox/x", b"ack")

    await asyncio.wait_for(send.sent.wait(), 5)

    assert send.calls == [[("inbox/x", b"ack")]]


async def test_a_full_batch_goes_out_without_a_flush() -> None:
    send = Recorder()
    outbox = AckOutbox(send, delay=60.0, batch=4)
    for topic, payload in _acks(5):
        outbox.put(topic, payload)

    await asyncio.wait_for(send.sent.wait(), 5)

    # The first four went out as a batch; the fifth waits for the next flush.
    assert send.calls == [_acks(4)]
    assert len(outbox) == 1


async def test_a_failed_send_is_logged_and_later_acks_still_go_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    send = Recorder()
    outbox = AckOutbox(send, delay=60.0)
    send.failing = True
    outbox.put("inbox/a", b"lost")
    with caplog.at_level(logging.WARNING, logger="fedhive.aggregator"):
        await outbox.drain(timeout=5)
    send.failing = False

    outbox.put("inbox/b", b"kept")
    await outbox.drain(timeout=5)

    assert "cannot send 1 acknowledgement(s): not connected" in caplog.text
    assert send.calls == [[("inbox/b", b"kept")]]


async def test_drain_sends_what_is_held_and_cancel_stops_the_timer() -> None:
    send = Recorder()
    outbox = AckOutbox(send, delay=0.01)
    outbox.put("inbox/a", b"1")
    await outbox.drain(timeout=5)
    outbox.put("inbox/b", b"2")
    assert outbox.cancel() == []  # nothing is being sent: only the timer was running
    await asyncio.sleep(0.05)  # past the delay: a timer still running would have sent it

    assert send.calls == [[("inbox/a", b"1")]]
    assert len(outbox) == 1


@pytest.mark.parametrize(("delay", "batch"), [(-1.0, 10), (0.1, 0)])
def test_bad_settings_are_refused(delay: float, batch: int) -> None:
    with pytest.raises(ValueError, match="delay >= 0 and batch >= 1"):
        AckOutbox(Recorder(), delay=delay, batch=batch)
