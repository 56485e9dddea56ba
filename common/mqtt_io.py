"""paho-mqtt's client with a lean socket path, for the MQTT transport.

paho reads a packet a byte at a time up to its length, then grows one ``bytearray`` with every
``recv``; ``decode_publish`` slices the payload out through three more copies, and a publish is
copied into a new packet buffer and copied again on every write (``packet[pos:]``). For 1 MiB
model chunks those copies cost more than the socket itself. :class:`LeanPahoClient` keeps paho's
state machine, callbacks and session logic and replaces only the byte moving:

* reads go through one 64 KiB buffer; a packet that fits is parsed from it in place, and a
  larger PUBLISH gets a ``bytearray`` of exactly its payload's size that the socket fills
  directly (``recv_into``): one copy from the kernel, none after. Those bytearrays are reused
  once nobody references them any more (a refcount check), so chunk after chunk lands in
  memory that is already mapped instead of fresh pages;
* a publish is queued as its small header plus the caller's payload, untouched; writes gather
  the queued packets into one ``sendmsg`` (plain TCP) without joining them. What handling a
  read queues (the PUBACKs of the messages it brought) is written when the read is done, in
  one ``sendmsg``, instead of through a writer registered for the next turn of the event loop
  (two ``epoll_ctl`` calls and a loop turn per message);
* :meth:`LeanPahoClient.held_writes` writes what is published inside it together, in one
  ``sendmsg`` (the aggregator's acknowledgements of a round's uploads);
* a plain PUBACK (success, no properties: nearly all of them) confirms its publish without
  paho's decoder and its new reason-code and properties objects, and a message goes straight
  to ``on_message`` when no per-topic callbacks are registered.

The socket has ``TCP_NODELAY`` set (the broker's side has ``set_tcp_nodelay true``): with
Nagle's algorithm, 50 agents × 4 KB models took 0.110 s a round, without it 0.062 s.

Each ``loop_read`` call reads at most :data:`READ_BUDGET` bytes from the socket, so a model
streaming in does not hold the event loop; it always finishes the packets already buffered
(the socket would not wake the loop for them). TLS and websocket sockets keep paho's own write
path (``sendmsg`` is not allowed on TLS sockets); TLS reads use the same buffered reader.

This relies on paho-mqtt 2.x internals (``_in_packet``, ``_out_packet``, ``_packet_handle``,
``_handle_on_message``), like the transport relies on aiomqtt 2.x's: both are pinned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MessageState, MQTTErrorCode, MQTTProtocolVersion, _ConnectionState
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.codec import BufferPool, Segments

#: Bytes of the read buffer: packets up to this size are parsed in place. A larger packet's
#: first part is copied out of it, so small is cheap: 50 agents × 400 KB models ran 5% faster
#: with 64 KiB than with 256 KiB (less to copy, less memory touched per process).
READ_BUFFER = 64 << 10
#: Bytes read from the socket per ``loop_read`` call before the event loop gets a turn.
READ_BUDGET = 8 << 20
#: Payload buffers kept for reuse (see ``_payload_buffer``), and the smallest size pooled.
POOL_BUFFERS = 24
POOL_MIN_BYTES = 64 << 10
#: Packets gathered into one ``sendmsg`` (Linux allows 1024 buffers).
MAX_GATHER = 256
#: Bytes offered to one ``sendmsg``.
MAX_GATHER_BYTES = 8 << 20

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_PUBLISH = 0x30
_PUBACK = 0x40
_DISCONNECT = 0xE0
_MAX_REMAINING = 268_435_455
_U16 = struct.Struct("!H")
_NO_PROPERTIES = b"\x00"
# paho's clock for keepalive bookkeeping (time.monotonic where it exists).
_now = time.monotonic
_NO_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
# A PUBACK that says success (0) or "no matching subscribers" (16, also a success) without
# properties: after the packet id, nothing (success), the reason code, or the reason code and
# an empty property list. The reason codes they stand for are shared, never modified.
_SUCCESS = ReasonCode(PacketTypes.PUBACK, identifier=0)
_NO_SUBSCRIBERS = ReasonCode(PacketTypes.PUBACK, identifier=16)
_PLAIN_PUBACKS = {
    b"": _SUCCESS,
    b"\x00": _SUCCESS,
    b"\x00\x00": _SUCCESS,
    b"\x10": _NO_SUBSCRIBERS,
    b"\x10\x00": _NO_SUBSCRIBERS,
}
_NO_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


_tuned = False


def keep_buffers_mapped() -> None:
    """Have glibc keep freed memory for reuse (once per process; elsewhere a no-op).

    Every received chunk lands in a fresh ~1 MiB buffer. With glibc's defaults the heap top
    is trimmed back to the kernel and the next buffer faults its pages in again, which cost
    more than the socket read itself (measured: receive CPU -35% with these settings). Memory
    up to 64 MiB stays mapped for reuse; allocations above 4 MiB (models) are their own
    mappings, returned as soon as they are freed (frames and reassembly buffers up to 256 MiB
    are kept for reuse by ``common.codec.new_raw`` instead)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _fresh_in_packet() -> Any:
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """(value, bytes used) of the MQTT variable byte integer at ``pos``; None if it is not
    all there. ValueError if it is longer than 4 bytes."""
    value = 0
    mult = 1
    for i in range(4):
        if pos + i >= end:
            return None
        byte = view[pos + i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, i + 1
        mult *= 128
    raise ValueError("remaining length longer than 4 bytes")


@dataclass(slots=True)
class _PublishHeader:
    command: int
    topic: bytes
    mid: int
    properties: Properties | None


@dataclass(slots=True)
class _Body:
    """A packet too large for the read buffer, filled straight from the socket."""

    buffer: bytearray
    view: memoryview
    filled: int
    command: int
    #: For a PUBLISH, its parsed variable header (``buffer`` is then the payload alone).
    publish: _PublishHeader | None


class LeanPahoClient(mqtt.Client):
    """paho's client with buffered reads and gathered writes (see the module docstring).

    Made from a plain client with :meth:`adopt` (aiomqtt constructs the paho client itself).
    """

    _rbuf: bytearray
    _rview: memoryview
    _rpos: int
    _rend: int
    _body: _Body | None

    @classmethod
    def adopt(cls, client: mqtt.Client) -> None:
        """Turn ``client`` (a plain paho client, not connected yet) into a lean one."""
        if type(client) is not mqtt.Client:
            raise TypeError(f"expected a paho-mqtt Client, got {type(client).__name__}")
        client.__class__ = cls
        assert isinstance(client, LeanPahoClient)
        client._lean_reset()
        keep_buffers_mapped()

    def _lean_reset(self) -> None:
        # Packets queued on this thread (the event loop's) are written at once.
        self._loop_thread = threading.get_ident()
        self._writing = False
        #: Inside loop_read: what handling the packets queues is written once it is done.
        self._reading = False
        #: Inside held_writes: what is queued is written when it ends.
        self._holding = False
        self._pool = BufferPool(bytearray, min_bytes=POOL_MIN_BYTES, max_count=POOL_BUFFERS)
        self._rbuf = bytearray(READ_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._body = None

    def reconnect(self) -> MQTTErrorCode:
        # Nothing read on the old socket belongs to the new one (aiomqtt connects from an
        # executor thread, so the loop's thread is kept).
        loop_thread = self._loop_thread
        self._lean_reset()
        self._loop_thread = loop_thread
        rc = super().reconnect()
        sock = self._sock
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # No Nagle: a small packet (an ack, a status, a PUBACK) written while an earlier
            # one is unacknowledged would wait for the peer's delayed ACK, up to 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return rc

    # ------------------------------------------------------------------ reading
    def _plain(self) -> bool:
        return isinstance(self._sock, socket.socket)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        if not self._plain():
            return super().loop_read(max_packets)
        self._reading = True
        try:
            rc = self._read_packets()
        finally:
            self._reading = False
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._out_packet and not self._writing:
            # What handling the packets queued (acknowledgements) goes out now, in one write,
            # not through a writer registered for the next turn of the event loop.
            return self.loop_write()
        return rc

    def _read_packets(self) -> MQTTErrorCode:
        budget = [READ_BUDGET]
        while True:
            if self._sock is None:  # closed while handling a packet (DISCONNECT)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            try:
                rc = self._next_packet(budget)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except ConnectionError as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "connection lost: %s", err)
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            except OSError as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            except (ValueError, struct.error, MQTTException) as exc:
                self._easy_log(mqtt.MQTT_LOG_ERR, "malformed packet: %s", exc)
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
            if rc is None:  # the budget is spent, or only part of a packet is here
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            if rc > 0:
                return self._loop_rc_handle(rc)

    def _packet_read(self) -> MQTTErrorCode:
        # paho's own loop() calls this; the event loop goes through loop_read.
        if not self._plain():
            return super()._packet_read()
        rc = self.loop_read()
        return MQTTErrorCode.MQTT_ERR_AGAIN if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else rc

    def _recv_into(self, view: memoryview, budget: list[int]) -> int:
        """Read into ``view``; BlockingIOError when nothing is there (or the budget is
        spent), ConnectionError when the peer closed."""
        if budget[0] <= 0:
            raise BlockingIOError
        sock = self._sock
        if not isinstance(sock, socket.socket):
            raise ConnectionError("socket closed")
        try:
            n: int = sock.recv_into(view)
        except ssl.SSLWantReadError:
            raise BlockingIOError from None
        except ssl.SSLWantWriteError:
            self._call_socket_register_write()
            raise BlockingIOError from None
        if n == 0:
            raise ConnectionError("connection closed by the broker")
        budget[0] -= n
        self._last_bytes_received = _now()
        return n

    def _fill(self, budget: list[int]) -> None:
        """Read more into the buffer, moving a partial packet to its front first."""
        if self._rpos == self._rend:
            self._rpos = self._rend = 0
        elif self._rend == len(self._rbuf):
            kept = self._rend - self._rpos
            self._rbuf[:kept] = self._rview[self._rpos : self._rend]
            self._rpos, self._rend = 0, kept
        self._rend += self._recv_into(self._rview[self._rend :], budget)

    def _next_packet(self, budget: list[int]) -> MQTTErrorCode | None:
        """Handle one packet; None if no whole packet can be had now (BlockingIOError too)."""
        while True:
            body = self._body
            if body is not None:
                while body.filled < len(body.buffer):
                    body.filled += self._recv_into(body.view[body.filled :], budget)
                self._body = None
                body.view.release()
                if body.publish is not None:
                    return self._deliver_publish(body.publish, body.buffer)
                return self._handle_whole(body.command, memoryview(body.buffer))
            view, pos, end = self._rview, self._rpos, self._rend
            header = _varint(view, pos + 1, end) if end - pos >= 2 else None
            if header is None:
                self._fill(budget)
                continue
            remaining, used = header
            command = view[pos]
            start = pos + 1 + used
            if end - start >= remaining:  # the whole packet is buffered
                self._rpos = start + remaining
                return self._handle_whole(command, view[start : start + remaining])
            if start - pos + remaining <= len(self._rbuf):
                self._fill(budget)  # it fits the buffer: wait for the rest there
                continue
            parsed = None
            if command & 0xF0 == _PUBLISH:
                parsed = self._publish_header(command, view[start:end])
                if parsed is None and not (pos == 0 and end == len(self._rbuf)):
                    self._fill(budget)  # its variable header is still coming
                    continue
            if parsed is None:  # not a PUBLISH, or a variable header larger than the buffer
                self._start_body(command, None, remaining, start, end)
            else:
                publish, used = parsed
                self._start_body(command, publish, remaining - used, start + used, end)

    def _handle_whole(self, command: int, packet: memoryview) -> MQTTErrorCode:
        """Handle one whole packet (a view the caller's buffer may reuse afterwards)."""
        if command & 0xF0 != _PUBLISH:
            if command == _PUBACK and 2 <= len(packet) <= 4:
                code = _PLAIN_PUBACKS.get(bytes(packet[2:]))
                if code is not None:
                    return self._puback(_U16.unpack_from(packet)[0], code)
            return self._handle_other(command, bytes(packet))
        parsed = self._publish_header(command, packet)
        if parsed is None:
            raise ValueError("truncated PUBLISH variable header")
        publish, used = parsed
        return self._deliver_publish(publish, bytes(packet[used:]))

    def _payload_buffer(self, size: int) -> bytearray:
        """A bytearray of ``size`` bytes to receive a payload into: one handed out before and
        released by everyone since (its only reference is the pool's), or a new one."""
        return self._pool.take(size)

    def _start_body(
        self, command: int, publish: _PublishHeader | None, size: int, start: int, end: int
    ) -> None:
        buffer = self._payload_buffer(size) if publish is not None else bytearray(size)
        have = end - start
        buffer[:have] = self._rview[start:end]
        self._rpos = self._rend = 0
        self._body = _Body(buffer, memoryview(buffer), have, command, publish)

    def _publish_header(self, command: int, view: memoryview) -> tuple[_PublishHeader, int] | None:
        """The variable header of a PUBLISH at the start of ``view`` and its length; None
        if ``view`` does not hold all of it yet."""
        n = len(view)
        if n < 2:
            return None
        (topic_len,) = _U16.unpack_from(view, 0)
        pos = 2 + topic_len
        if n < pos:
            return None
        topic = bytes(view[2:pos])
        mid = 0
        if command & 0x06:
            if n < pos + 2:
                return None
            (mid,) = _U16.unpack_from(view, pos)
            pos += 2
        properties = None
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            length = _varint(view, pos, n)
            if length is None:
                return None
            props_len, vbi = length
            if n < pos + vbi + props_len:
                return None
            if props_len:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.unpack(bytes(view[pos : pos + vbi + props_len]))  # type: ignore[no-untyped-call]
            else:  # most messages carry none: one shared, empty, never modified object
                properties = _NO_PUBLISH_PROPERTIES
            pos += vbi + props_len
        elif not topic_len:
            raise ValueError("topic can't be empty in MQTTv3")
        return _PublishHeader(command, topic, mid, properties), pos

    def _deliver_publish(self, header: _PublishHeader, payload: bytes | bytearray) -> MQTTErrorCode:
        """paho's ``_handle_publish`` after the parsing."""
        command = header.command
        message = mqtt.MQTTMessage(mid=header.mid, topic=header.topic)
        message.dup = bool(command & 0x08)
        message.qos = (command & 0x06) >> 1
        message.retain = bool(command & 0x01)
        message.properties = header.properties
        message.payload = payload  # bytes or, if large, the bytearray it was read into
        message.timestamp = _now()
        if message.qos == 0:
            self._handle_on_message(message)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if message.qos == 1:
            self._handle_on_message(message)
            if self._manual_ack:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            return self._send_puback(message.mid)
        if message.qos == 2:
            rc = self._send_pubrec(message.mid)
            message.state = MessageState.MQTT_MS_WAIT_FOR_PUBREL
            with self._in_message_mutex:
                self._in_messages[message.mid] = message
            return rc
        return MQTTErrorCode.MQTT_ERR_PROTOCOL

    def _puback(self, mid: int, code: ReasonCode) -> MQTTErrorCode:
        """paho's PUBACK handling for a plain one (success, no properties), without decoding
        it into new reason-code and properties objects."""
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, code, _NO_PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        """paho's, without matching the topic against per-topic callbacks when there are
        none (the transport has one ``on_message``): that walk decoded the topic twice and
        split it into levels for every message."""
        if self._on_message_filtered._root._children:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def _handle_other(self, command: int, packet: bytes | bytearray) -> MQTTErrorCode:
        """Any packet but PUBLISH: paho's own handlers, given the packet as it expects."""
        self._in_packet = {
            "command": command,
            "have_remaining": 1,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": len(packet),
            "packet": packet,  # type: ignore[typeddict-item]
            "to_process": 0,
            "pos": 0,
        }
        try:
            return self._packet_handle()
        finally:
            self._in_packet = _fresh_in_packet()

    # ------------------------------------------------------------------ writing
    def publish(  # type: ignore[override]
        self,
        topic: str,
        payload: bytes | bytearray | Segments | str | None = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """paho's ``publish``, also taking :class:`~common.codec.Segments` (written back to
        back, never joined)."""
        if not isinstance(payload, Segments):
            return super().publish(topic, payload, qos, retain, properties)
        if self._protocol != MQTTProtocolVersion.MQTTv5 and not topic:
            raise ValueError("Invalid topic.")
        topic_bytes = topic.encode("utf-8")
        self._raise_for_invalid_topic(topic_bytes)
        if qos < 0 or qos > 2:
            raise ValueError("Invalid QoS level.")
        if len(payload) > _MAX_REMAINING:
            raise ValueError("Payload too large.")
        mid = self._mid_generate()
        if qos == 0:
            info = mqtt.MQTTMessageInfo(mid)
            info.rc = self._send_publish(
                mid,
                topic_bytes,
                payload,
                qos,
                retain,
                False,
                info,
                properties,
            )
            return info
        message = mqtt.MQTTMessage(mid, topic_bytes)
        message.timestamp = _now()
        message.payload = payload  # type: ignore[assignment]  # paho re-sends it after a reconnect
        message.qos = qos
        message.retain = retain
        message.dup = False
        message.properties = properties
        with self._out_message_mutex:
            if (
                self._max_queued_messages > 0
                and len(self._out_messages) >= self._max_queued_messages
            ) or mid in self._out_messages:
                message.info.rc = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
                return message.info
            self._out_messages[mid] = message
            if (
                self._max_inflight_messages == 0
                or self._inflight_messages < self._max_inflight_messages
            ):
                self._inflight_messages += 1
                message.state = (
                    MessageState.MQTT_MS_WAIT_FOR_PUBACK
                    if qos == 1
                    else MessageState.MQTT_MS_WAIT_FOR_PUBREC
                )
                rc = self._send_publish(
                    mid,
                    topic_bytes,
                    payload,
                    qos,
                    retain,
                    False,
                    message.info,
                    properties,
                )
                if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:  # sent after the next connect
                    self._inflight_messages -= 1
                    message.state = MessageState.MQTT_MS_PUBLISH
                message.info.rc = rc
                return message.info
            message.state = MessageState.MQTT_MS_QUEUED
            message.info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            return message.info

    def _send_publish(
        self,
        mid: int,
        topic: bytes,
        payload: bytes | bytearray | Segments = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: mqtt.MQTTMessageInfo | None = None,
        properties: Properties | None = None,
    ) -> MQTTErrorCode:
        """paho's ``_send_publish`` without copying the payload into the packet."""
        if not isinstance(topic, bytes):
            raise TypeError("topic must be bytes, not str")
        if payload and not isinstance(payload, bytes | bytearray | Segments):
            raise TypeError("payload must be bytes if set")
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        command = _PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | retain
        remaining = 2 + len(topic) + len(payload) + (2 if qos > 0 else 0)
        packed_properties = b""
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            packed_properties = (
                _NO_PROPERTIES if properties is None else properties.pack()  # type: ignore[no-untyped-call]
            )
            remaining += len(packed_properties)
        header = bytearray((command,))
        self._pack_remaining_length(header, remaining)
        header += _U16.pack(len(topic))
        header += topic
        if qos > 0:
            header += _U16.pack(mid)
        header += packed_properties
        return self._queue_packet(
            {
                "command": _PUBLISH,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(header) + len(payload),
                "packet": bytes(header),
                "payload": payload if payload else None,
                "info": info,
            }
        )

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: mqtt.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        return self._queue_packet(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )

    def _queue_packet(self, packet: Any) -> MQTTErrorCode:
        """paho's ``_packet_queue``, but on the event loop's thread the packet is written at
        once (what the socket takes): no self-pipe wake-up and no loop turn per publish."""
        self._out_packet.append(packet)
        if self._sockpairW is not None:  # paho's threaded mode: wake its select()
            with contextlib.suppress(BlockingIOError):
                self._sockpairW.send(b"0")
        on_loop = threading.get_ident() == self._loop_thread
        if on_loop and (self._reading or self._holding):
            return MQTTErrorCode.MQTT_ERR_SUCCESS  # written when loop_read or the hold is done
        if (
            self._sock is not None
            and not self._writing
            and on_loop
            # Not from inside one of paho's callbacks (an ack sent while a message is handed
            # over): a failed write would report the disconnection under the mutex it holds.
            and self._in_callback_mutex.acquire(False)
        ):
            self._in_callback_mutex.release()
            self._writing = True
            try:
                return self.loop_write()  # registers the writer only for what is left
            finally:
                self._writing = False
        if (
            self._thread is None
            and self._on_socket_register_write is None
            and self._in_callback_mutex.acquire(False)
        ):
            self._in_callback_mutex.release()
            return self.loop_write()
        self._call_socket_register_write()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    @contextlib.contextmanager
    def held_writes(self) -> Iterator[None]:
        """Packets queued inside (on the event loop's thread) are written together when it
        ends, in one ``sendmsg`` where the socket takes them all, instead of one write each.
        What was queued is written even if the block fails. Off the loop's thread, or nested,
        it changes nothing."""
        if threading.get_ident() != self._loop_thread or self._holding:
            yield
            return
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._out_packet and not self._writing and not self._reading:
                self.loop_write()

    def _packet_write(self) -> MQTTErrorCode:
        self._writing = True
        try:
            return self._write_queued()
        finally:
            self._writing = False

    def _write_queued(self) -> MQTTErrorCode:
        sock = self._sock
        gather = isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)
        queue: deque[Any] = self._out_packet
        while queue:
            buffers: list[memoryview | bytes | bytearray] = []
            offered = 0
            for packet in queue:
                for piece in _unsent(packet):
                    buffers.append(piece)
                    offered += len(piece)
                if len(buffers) >= MAX_GATHER or offered >= MAX_GATHER_BYTES or not gather:
                    break
            if not gather:
                buffers = buffers[:1]
                offered = len(buffers[0])
            try:
                if gather:
                    assert isinstance(sock, socket.socket)
                    written = sock.sendmsg(buffers)
                else:
                    written = self._sock_send(buffers[0])  # type: ignore[arg-type]
            except (AttributeError, ValueError):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            with self._msgtime_mutex:
                self._last_msg_out = _now()
            while written > 0:
                packet = queue[0]
                step = min(written, packet["to_process"])
                packet["to_process"] -= step
                packet["pos"] += step
                written -= step
                if packet["to_process"]:
                    break
                queue.popleft()
                if self._packet_sent(packet):
                    return MQTTErrorCode.MQTT_ERR_SUCCESS
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_sent(self, packet: Any) -> bool:
        """paho's bookkeeping once a packet is written; True if the connection closed."""
        if (packet["command"] & 0xF0) == _PUBLISH and packet["qos"] == 0:
            with self._callback_mutex:
                on_publish: Any = self.on_publish
            if on_publish:
                with self._in_callback_mutex:
                    try:
                        on_publish(
                            self,
                            self._userdata,
                            packet["mid"],
                            ReasonCode(PacketTypes.PUBACK),
                            Properties(PacketTypes.PUBACK),  # type: ignore[no-untyped-call]
                        )
                    except Exception as err:
                        self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_publish: %s", err)
                        if not self.suppress_exceptions:
                            raise
            packet["info"]._set_as_published()
        if (packet["command"] & 0xF0) == _DISCONNECT:
            with self._msgtime_mutex:
                self._last_msg_out = _now()
            self._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_SUCCESS)
            self._sock_close()
            if self._state == _ConnectionState.MQTT_CS_DISCONNECTING:
                self._state = _ConnectionState.MQTT_CS_DISCONNECTED
            return True
        return False


def _unsent(packet: Any) -> list[memoryview | bytes | bytearray]:
    """The buffers of ``packet`` not written yet."""
    data, pos = packet["packet"], packet["pos"]
    payload = packet.get("payload")
    parts: list[memoryview | bytes | bytearray] = (
        []
        if payload is None
        else list(payload.parts)
        if isinstance(payload, Segments)
        else [payload]
    )
    if pos < len(data):
        return [data if pos == 0 else memoryview(data)[pos:], *parts]
    skip = pos - len(data)
    for i, part in enumerate(parts):
        if skip < len(part):
            return [memoryview(part)[skip:], *parts[i + 1 :]]
        skip -= len(part)
    raise AssertionError("a written packet left in the queue")  # pragma: no cover


__all__ = ["MAX_GATHER", "READ_BUDGET", "READ_BUFFER", "LeanPahoClient"]
