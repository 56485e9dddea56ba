"""MqttTransport against a real Mosquitto: round trip, reconnect, last will, refusals."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, broker_settings, python_env

from broker.process import MosquittoBroker, find_free_port
from common.config import BrokerSettings
from common.errors import NotConnectedError, TransportError
from common.mqtt_io import LeanPahoClient
from common.transport import Incoming, MqttTransport

pytestmark = pytest.mark.broker


async def _next(transport: MqttTransport, timeout: float = 10.0) -> Incoming:
    return await asyncio.wait_for(anext(transport.messages()), timeout)


async def test_publish_subscribe_and_retained(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    settings = broker_settings(mosquitto)
    topic = f"fedhive/v1/{project_name}/x"
    async with MqttTransport(settings=settings) as t:
        await t.publish(topic, b"kept", retain=True)
    async with MqttTransport(settings=settings) as t:
        await t.subscribe(topic)
        got = await _next(t)
        assert got.payload == b"kept"
        assert got.retain
        await t.publish(topic, b"live")
        live = await _next(t)
        assert live.payload == b"live"
        assert not live.retain


async def test_correlation_data_and_response_topic_travel(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    topic = f"fedhive/v1/{project_name}/control"
    async with MqttTransport(settings=broker_settings(mosquitto)) as t:
        await t.subscribe(topic)
        await t.publish(topic, b"cmd", correlation=b"id-1", response_topic=topic + "/reply")
        got = await _next(t)
        assert got.correlation == b"id-1"
        assert got.response_topic == topic + "/reply"


async def test_reconnects_and_resubscribes_after_broker_restart(
    fresh_broker: MosquittoBroker, project_name: str
) -> None:
    topic = f"fedhive/v1/{project_name}/after-restart"
    settings = broker_settings(fresh_broker, reconnect_max_delay=0.5)
    async with MqttTransport(settings=settings) as t:
        await t.subscribe(topic)
        # Execute: the broker goes away and comes back on the same port.
        fresh_broker.stop()
        await asyncio.wait_for(_until(lambda: not t.connected), 10)
        await asyncio.to_thread(fresh_broker.start)
        await t.wait_connected(15)
        # Assert: the subscription survived the reconnect.
        await t.publish(topic, b"again")
        got = await _next(t)
        assert got.payload == b"again"


def _nagle_off(t: MqttTransport) -> bool:
    assert t._client is not None
    sock = t._client._client._sock
    assert isinstance(sock, socket.socket)
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_small_packets_go_out_at_once_also_after_a_reconnect(
    fresh_broker: MosquittoBroker,
) -> None:
    # Prepare: a connected transport.
    settings = broker_settings(fresh_broker, reconnect_max_delay=0.5)
    async with MqttTransport(settings=settings) as t:
        first = _nagle_off(t)

        # Execute: the broker goes away and comes back; the transport reconnects.
        fresh_broker.stop()
        await asyncio.wait_for(_until(lambda: not t.connected), 10)
        await asyncio.to_thread(fresh_broker.start)
        await t.wait_connected(15)
        again = _nagle_off(t)

    # Assert: Nagle's algorithm is off on both connections (TCP_NODELAY), so an ack written
    # while an earlier packet is unacknowledged does not wait for the broker's delayed ACK.
    assert (first, again) == (True, True)


async def test_last_will_marks_a_killed_process_offline(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    status = f"fedhive/v1/{project_name}/agents/doomed/status"
    script = tmp_path / "doomed.py"
    script.write_text(
        "import asyncio, sys\n"
        "from common.config import BrokerSettings\n"
        "from common.transport import LastWill, MqttTransport\n"
        "async def main():\n"
        f"    s = BrokerSettings(host={mosquitto.host!r}, port={mosquitto.port})\n"
        f"    will = LastWill({status!r}, b'offline')\n"
        "    async with MqttTransport(settings=s, will=will) as t:\n"
        f"        await t.publish({status!r}, b'online', retain=True)\n"
        "        print('up', flush=True)\n"
        "        await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    async with MqttTransport(settings=broker_settings(mosquitto)) as watcher:
        await watcher.subscribe(status)
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the test awaits its output
            [sys.executable, str(script)], stdout=subprocess.PIPE, env=python_env(), cwd=ROOT
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            assert line.strip() == b"up"
            assert (await _next(watcher)).payload == b"online"
            proc.send_signal(signal.SIGKILL)
            assert (await _next(watcher)).payload == b"offline"
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]


async def test_oversize_publish_is_refused_before_sending(mosquitto: MosquittoBroker) -> None:
    async with MqttTransport(settings=broker_settings(mosquitto)) as t:
        with pytest.raises(TransportError, match="max_packet_size"):
            await t.publish("fedhive/v1/x/big", b"\0" * 2_000_001)
        assert t.connected


async def test_unreachable_broker_is_a_clear_error() -> None:
    port = find_free_port()
    settings = BrokerSettings(host="127.0.0.1", port=port, connect_timeout=2)
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        async with MqttTransport(settings=settings):
            pass


async def test_misuse_raises() -> None:
    t = MqttTransport(settings=BrokerSettings())
    with pytest.raises(NotConnectedError):
        t.messages()
    with pytest.raises(NotConnectedError):
        await t.wait_connected(0.1)


async def _until(predicate: object) -> None:
    # Polls a flag owned by the transport's own task; bounded by the caller's wait_for.
    while not predicate():  # type: ignore[operator]  # noqa: ASYNC110 - no event to await
        await asyncio.sleep(0.02)


async def test_acknowledgements_of_what_one_read_brought_go_out_without_a_writer(
    mosquitto: MosquittoBroker, project_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a receiver that may hold 5 unacknowledged messages (the broker sends no more
    # until it hears PUBACKs); writer registrations on the event loop are counted.
    topic = f"fedhive/v1/{project_name}/acks"
    settings = broker_settings(mosquitto, receive_maximum=5)
    loop = asyncio.get_running_loop()
    registered: list[int] = []
    add_writer = loop.add_writer

    def counting(fd: int, *args: object) -> None:
        registered.append(fd)
        add_writer(fd, *args)

    total = 60
    async with (
        MqttTransport(settings=settings) as receiver,
        MqttTransport(settings=broker_settings(mosquitto)) as sender,
    ):
        await receiver.subscribe(topic)
        monkeypatch.setattr(loop, "add_writer", counting)

        # Execute: 60 QoS 1 messages, sent without waiting for each confirmation.
        for i in range(total):
            await sender.publish(topic, b"%d" % i, confirm=False)
        got = [(await _next(receiver)).payload for _ in range(total)]
        monkeypatch.undo()

    # Assert: all 60 arrived, so the receiver's PUBACKs reached the broker (it holds back
    # everything past 5 unacknowledged ones), and no writer was registered for them: they
    # were written when each read was done.
    assert got == [b"%d" % i for i in range(total)]
    assert registered == []


async def test_a_plain_puback_confirms_a_publish_without_pahos_decoder(
    mosquitto: MosquittoBroker, project_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: paho's PUBACK decoder fails if it is called (it builds reason-code and
    # properties objects for every PUBACK); confirmations are counted as they are set.
    import paho.mqtt._packet as packet

    def refuse(*args: object) -> None:
        raise AssertionError("paho decoded a plain PUBACK")

    monkeypatch.setattr(packet, "decode_puback", refuse)
    topic = f"fedhive/v1/{project_name}/confirmed"
    async with MqttTransport(settings=broker_settings(mosquitto)) as t:
        # Execute: confirmed QoS 1 publishes (each waits for the broker's PUBACK), first with
        # nobody subscribed (Mosquitto's PUBACK then says "no matching subscribers"), then
        # with a subscriber (a bare 2-byte PUBACK).
        for i in range(10):
            await t.publish(topic, b"%d" % i, qos=1)
        await t.subscribe(topic)
        for i in range(10, 20):
            await t.publish(topic, b"%d" % i, qos=1)
        got = [(await _next(t)).payload for _ in range(10)]

    # Assert: every publish was confirmed through the lean path (a decode would have broken
    # the connection and timed the publish out).
    assert got == [b"%d" % i for i in range(10, 20)]


async def test_publish_all_writes_its_messages_together(
    mosquitto: MosquittoBroker, project_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a receiver on as many inboxes as the sender may have QoS 1 publishes in
    # flight (more wait for the broker's PUBACKs); the sender's writes to its socket are counted.
    root = f"fedhive/v1/{project_name}/agents"
    settings = broker_settings(mosquitto)
    messages = [(f"{root}/agent{i}/inbox", b"ack %d" % i) for i in range(settings.max_inflight)]
    async with (
        MqttTransport(settings=settings) as receiver,
        MqttTransport(settings=settings) as sender,
    ):
        await receiver.subscribe(f"{root}/+/inbox")
        await sender.publish(f"{root}/warm/inbox", b"first")  # connected, subscription live
        assert (await _next(receiver)).payload == b"first"
        fd = sender._client._client.socket().fileno()  # type: ignore[union-attr]
        writes: list[int] = []
        sendmsg = socket.socket.sendmsg

        def counting(sock: socket.socket, buffers: list[bytes], *args: object) -> int:
            if sock.fileno() == fd:
                writes.append(len(buffers))
            return sendmsg(sock, buffers, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(socket.socket, "sendmsg", counting)

        # Execute: the messages published as one batch.
        await sender.publish_all(messages)
        monkeypatch.undo()
        got = [await _next(receiver) for _ in messages]

        # A batch with a payload the broker would refuse is refused.
        too_big = b"x" * settings.max_packet_size
        with pytest.raises(TransportError, match="exceed the broker's max_packet_size"):
            await sender.publish_all([(f"{root}/a/inbox", b"ok"), (f"{root}/b/inbox", too_big)])

    # Assert: every message arrived, in order, and their PUBLISH packets (header and payload
    # each) went to the socket in one write.
    assert [(m.topic, m.payload) for m in got] == messages
    assert writes == [2 * len(messages)]


async def test_what_a_failed_batch_queued_before_failing_still_goes_out(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare: a receiver on one inbox.
    topic = f"fedhive/v1/{project_name}/agents/a/inbox"
    settings = broker_settings(mosquitto)
    async with (
        MqttTransport(settings=settings) as receiver,
        MqttTransport(settings=settings) as sender,
    ):
        await receiver.subscribe(topic)
        await sender.publish(topic, b"first")  # connected, subscription live
        assert (await _next(receiver)).payload == b"first"
        client = sender._client
        assert client is not None
        lean = client._client
        assert isinstance(lean, LeanPahoClient)

        async def failing_batch() -> None:
            with lean.held_writes():
                await client.publish(topic, b"queued", qos=1, confirm=False)
                raise RuntimeError("the batch failed")

        # Execute: a batch that queues one message, then fails.
        with pytest.raises(RuntimeError, match="the batch failed"):
            await failing_batch()

        # Assert: the queued message was written anyway (nothing else would write it: the
        # sender neither reads nor publishes again).
        assert (await _next(receiver)).payload == b"queued"
