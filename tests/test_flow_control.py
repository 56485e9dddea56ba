"""The receive budget: transfers beyond it wait their turn, pulled senders are asked for their
chunks when it comes, pushed chunks of waiting transfers are dropped and asked for again."""

from __future__ import annotations

import pytest

from common.chunking import Manifest, iter_chunk_frames
from common.exchange import ModelReceiver, ReceivedModel, prepare_model_message
from common.messages import ModelKind, ModelMessage
from common.topics import Topics

TOPICS = Topics("proj")
CHUNK = 64
SIZE = 10 * CHUNK


def upload(
    agent: str, *, pull: bool = True, size: int = SIZE
) -> tuple[bytes, ModelMessage, Manifest]:
    payload = bytes([len(agent)]) * size
    message, manifest = prepare_model_message(
        payload,
        chunk_size=CHUNK,
        project="proj",
        sender=agent,
        kind=ModelKind.LOCAL,
        round=1,
        pull=pull or None,
    )
    assert manifest is not None
    return payload, message, manifest


class Asked:
    """Records what the receiver asks senders for (its ``on_missing``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    async def __call__(self, topic: str, message: ModelMessage, missing: list[int]) -> None:
        self.calls.append((message.sender, missing))


def feed(
    receiver: ModelReceiver, agent: str, payload: bytes, manifest: Manifest
) -> list[ReceivedModel]:
    topic = TOPICS.agg_local("a1", agent)
    done = [receiver.chunk(f, announced_on=topic) for f in iter_chunk_frames(payload, manifest)]
    return [d for d in done if d is not None]


async def test_transfers_beyond_the_budget_wait_and_are_asked_for_in_turn() -> None:
    # Prepare: room for two uploads at a time.
    asked = Asked()
    receiver = ModelReceiver(
        max_bytes=1 << 20, budget=2 * SIZE, on_missing=asked, reject_unknown_chunks=True
    )
    uploads = {name: upload(name) for name in ("a", "bb", "ccc")}

    # Execute: three announcements at once.
    for name, (_, message, _) in uploads.items():
        receiver.announce(TOPICS.agg_local("a1", name), message, budgeted=True)
    await receiver.admit()
    first_asked = list(asked.calls)
    pushed_early = feed(receiver, "ccc", uploads["ccc"][0], uploads["ccc"][2])
    done_a = feed(receiver, "a", uploads["a"][0], uploads["a"][2])
    receiver.release(done_a[0])  # its consumer is done with it
    await receiver.admit()

    # Assert: a and bb were asked for every chunk; ccc waited (its early chunks were dropped,
    # not counted as bad) and is asked for once a was done with.
    assert first_asked == [("a", list(range(10))), ("bb", list(range(10)))]
    assert pushed_early == []
    assert [d.message.sender for d in done_a] == ["a"]
    assert asked.calls[2:] == [("ccc", list(range(10)))]
    assert receiver.open_bytes == 2 * SIZE
    assert receiver.waiting == 0
    done_c = feed(receiver, "ccc", uploads["ccc"][0], uploads["ccc"][2])
    assert bytes(done_c[0].payload) == uploads["ccc"][0]


async def test_a_complete_upload_holds_its_share_until_its_consumer_releases_it() -> None:
    # Prepare: room for two uploads at a time; three announced.
    asked = Asked()
    receiver = ModelReceiver(max_bytes=1 << 20, budget=2 * SIZE, on_missing=asked)
    uploads = {name: upload(name) for name in ("a", "bb", "ccc")}
    for name, (_, message, _) in uploads.items():
        receiver.announce(TOPICS.agg_local("a1", name), message, budgeted=True)
    await receiver.admit()

    # Execute: a and bb complete; their models wait for their consumer (a round lock, say).
    done = [*feed(receiver, "a", *uploads["a"][::2]), *feed(receiver, "bb", *uploads["bb"][::2])]
    await receiver.admit()
    while_held = (receiver.open_bytes, receiver.waiting, [s for s, _ in asked.calls])
    receiver.release(done[0])
    receiver.release(done[0])  # twice: the second release is a no-op
    await receiver.admit()

    # Assert: two complete models still held the whole budget, so ccc waited; releasing a's
    # let ccc in (its bytes count now, b's still do).
    assert [d.held for d in done] == [0, SIZE]
    assert while_held == (2 * SIZE, 1, ["a", "bb"])
    assert [s for s, _ in asked.calls] == ["a", "bb", "ccc"]
    assert receiver.open_bytes == 2 * SIZE
    assert receiver.waiting == 0


async def test_a_transfer_larger_than_the_budget_is_taken_alone() -> None:
    # Prepare
    asked = Asked()
    receiver = ModelReceiver(max_bytes=1 << 20, budget=SIZE // 2, on_missing=asked)
    big, small = upload("big"), upload("s")

    # Execute
    receiver.announce(TOPICS.agg_local("a1", "big"), big[1], budgeted=True)
    receiver.announce(TOPICS.agg_local("a1", "s"), small[1], budgeted=True)
    await receiver.admit()
    before = [sender for sender, _ in asked.calls]
    receiver.release(feed(receiver, "big", big[0], big[2])[0])
    await receiver.admit()

    # Assert
    assert before == ["big"]
    assert [sender for sender, _ in asked.calls] == ["big", "s"]


async def test_pushed_transfers_within_the_budget_are_not_asked_for() -> None:
    # Prepare
    asked = Asked()
    receiver = ModelReceiver(max_bytes=1 << 20, budget=4 * SIZE, on_missing=asked)
    payload, message, manifest = upload("p", pull=False)

    # Execute
    receiver.announce(TOPICS.agg_local("a1", "p"), message, budgeted=True)
    await receiver.admit()
    done = feed(receiver, "p", payload, manifest)

    # Assert
    assert asked.calls == []
    assert bytes(done[0].payload) == payload


@pytest.mark.parametrize("budgeted", [True, False])
async def test_without_a_budget_nothing_waits(budgeted: bool) -> None:
    asked = Asked()
    receiver = ModelReceiver(max_bytes=1 << 20, on_missing=asked)
    for name in ("a", "bb", "ccc"):
        receiver.announce(TOPICS.agg_local("a1", name), upload(name)[1], budgeted=budgeted)
    await receiver.admit()
    assert receiver.waiting == 0
    assert receiver.open_bytes == 3 * SIZE
    assert [sender for sender, _ in asked.calls] == ["a", "bb", "ccc"]


async def test_pulled_chunks_are_asked_for_a_window_at_a_time() -> None:
    # Prepare: a window of three chunks over two pulled uploads.
    asked = Asked()
    receiver = ModelReceiver(max_bytes=1 << 20, window=3 * CHUNK, on_missing=asked)
    a, b = upload("a"), upload("bb")
    topic_a = TOPICS.agg_local("a1", "a")
    receiver.announce(topic_a, a[1], budgeted=True)
    receiver.announce(TOPICS.agg_local("a1", "bb"), b[1], budgeted=True)

    # Execute: deliver a's chunks one by one, topping up after each.
    await receiver.admit()
    trace = [list(asked.calls)]
    frames = list(iter_chunk_frames(a[0], a[2]))
    for frame in frames[:3]:
        receiver.chunk(frame, announced_on=topic_a)
        await receiver.admit()
        trace.append(list(asked.calls))

    # Assert: a's first three chunks, nothing more until half the window arrived, then more of
    # a (the oldest first); bb waits for room in the window.
    assert trace[0] == [("a", [0, 1, 2])]
    assert trace[1] == trace[0]
    assert trace[2] == [("a", [0, 1, 2]), ("a", [3, 4])]
    assert all(sender == "a" for sender, _ in trace[3])
