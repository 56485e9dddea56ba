"""Malformed and adversarial payloads for an aggregator's topics, and a publisher that sends
them (run as a separate process by tests/test_fuzz.py, so the test process's memory is the
aggregator's alone).

Every generated message is one the aggregator must reject, each exactly once, except the few
marked ``counted=False`` that set up a transfer (an announcement, the valid chunks of an upload
whose hash or round is wrong): the expected number of rejections is the number of counted ones.
Nothing generated is valid on its own (a valid base model, an online status or an accepted
local model would change the federation the test checks afterwards).

    python tests/fuzz_payloads.py --host H --port P --project X --aggregator a1 \\
        --count 10000 --batch 1000 --seed 7

sends the shots in batches: after each it prints ``{"phase": "batch", "expected": N}`` (N: the
rejections expected so far) and waits for a line on stdin before the next; after the last it
prints ``{"phase": "done", "expected": N, "seconds": ..., "kinds": {...}}``. The pause lets the
aggregator catch up: a publisher that outruns its subscriber by more than Mosquitto's
per-client queue (``max_queued_messages``) loses QoS 1 messages at the broker, silently, and the
aggregator holds only a bounded buffer itself (common/transport.py), so an unpaced flood would
be partly dropped before the aggregator ever saw it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import random
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.chunking import CHUNK_MAGIC, make_manifest
from common.codec import Array, ModelSpec, encode
from common.config import BrokerSettings
from common.topics import Topics
from common.transport import MqttTransport

#: The broker's max_packet_size: the biggest publish is a little under it.
MAX_PACKET = 2_000_000
_CHUNK_HEADER = struct.Struct("<4s16sIIQI")


def base_tensors() -> dict[str, Array]:
    """The base model the aggregator under test trains (tiny, three dtypes)."""
    return {
        "w": np.arange(12, dtype=np.float32).reshape(4, 3),
        "b": np.zeros(3, dtype=np.float32),
        "steps": np.array(0, dtype=np.int64),
    }


@dataclass(frozen=True, slots=True)
class Shot:
    """One message: where, what, and whether the aggregator counts it as a rejection."""

    topic: str
    payload: bytes
    counted: bool = True
    what: str = ""


#: A group of shots sent in order, each after the broker acknowledged the one before.
Volley = list[Shot]


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def deep_array(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def deep_map(depth: int) -> bytes:
    return b"\x81\xa1k" * depth + b"\xc0"


def frame(
    index: list[dict[str, Any]], raw: bytes, *, meta: Any = None, header_len: int | None = None
) -> bytes:
    """A tensor frame built by hand (b"FHT1" | u32 header length | header | pad | raw)."""
    header = pack({"index": index, "meta": {} if meta is None else meta})
    start = -(-(8 + len(header)) // 64) * 64
    prefix = struct.pack("<4sI", b"FHT1", len(header) if header_len is None else header_len)
    return prefix + header + bytes(start - 8 - len(header)) + raw


def frame_with_raw_meta(index: list[dict[str, Any]], raw: bytes, meta: bytes) -> bytes:
    """A frame whose header's ``meta`` is the given msgpack bytes (e.g. nested too deep)."""
    header = b"\x82" + pack("index") + pack(index) + pack("meta") + meta
    start = -(-(8 + len(header)) // 64) * 64
    return struct.pack("<4sI", b"FHT1", len(header)) + header + bytes(start - 8 - len(header)) + raw


def chunk_frame(
    tid: str, index: int, count: int, offset: int, data: bytes, length: int | None = None
) -> bytes:
    header = _CHUNK_HEADER.pack(
        CHUNK_MAGIC,
        bytes.fromhex(tid),
        index,
        count,
        offset,
        len(data) if length is None else length,
    )
    return header + data


class Fuzzer:
    """Generates the shots for one aggregator, deterministic for a seed."""

    def __init__(self, *, project: str, aggregator: str, seed: int) -> None:
        self.project = project
        self.aggr = aggregator
        self.topics = Topics(project)
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.good = base_tensors()
        self.good_frame = encode(self.good)
        self.lo, self.hi = ModelSpec.from_tensors(self.good).encoded_size_range()
        self.kinds: Counter[str] = Counter()
        #: Announcements of transfers sent in this batch, replayed in the next (see
        #: :meth:`transfer_volley`).
        self.replays: list[tuple[str, bytes]] = []

    # ------------------------------------------------------------------ helpers
    def agent(self) -> str:
        return f"fz{self.rng.randrange(40)}"

    def local_topic(self, agent: str) -> str:
        return self.topics.agg_local(self.aggr, agent)

    def envelope(self, sender: str, **fields: Any) -> dict[str, Any]:
        return {"v": 1, "project": self.project, "sender": sender, "ts": time.time(), **fields}

    def local(self, sender: str, **fields: Any) -> dict[str, Any]:
        """A local model envelope: VALID as it stands (round 1, the right model); every
        caller breaks it."""
        body = {
            "type": "model",
            "kind": "local",
            "round": 1,
            "num_samples": 5.0,
            "metrics": {},
            "data": self.good_frame,
        }
        body.update(fields)
        return self.envelope(sender, **body)

    def rand_bytes(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    def shot(self, what: str, topic: str, payload: bytes | dict[str, Any]) -> Shot:
        self.kinds[what] += 1
        data = payload if isinstance(payload, bytes) else pack(payload)
        return Shot(topic, data, True, what)

    # ------------------------------------------------------------------ categories
    def random_bytes(self) -> Shot:
        a = self.agent()
        t = self.topics
        topic = self.rng.choice(
            [
                self.local_topic(a),
                Topics.chunks(self.local_topic(a)),
                t.agent_status(a),
                t.agent_heartbeat(a),
                t.agent_request(a),
                t.agg_control(self.aggr),
                t.base(),
                Topics.chunks(t.base()),
            ]
        )
        clearable = topic in (t.agent_status(a), t.base())  # an empty payload clears those
        return self.shot("random bytes", topic, self.rand_bytes(1 if clearable else 0, 3000))

    def truncated_envelope(self) -> Shot:
        a = self.agent()
        t = self.topics
        choices: list[tuple[str, dict[str, Any]]] = [
            (self.local_topic(a), self.local(a)),
            (t.agent_heartbeat(a), self.envelope(a, type="heartbeat", state="idle")),
            (t.agent_status(a), self.envelope(a, type="agent_status", state="online")),
            (t.agent_request(a), self.envelope(a, type="model_request")),
            (t.agg_control(self.aggr), self.envelope("mallory", type="control", command="stop")),
        ]
        topic, body = self.rng.choice(choices)
        full = pack(body)
        return self.shot("truncated envelope", topic, full[: self.rng.randrange(1, len(full))])

    def bad_chunk(self) -> Shot:
        a = self.agent()
        topic = Topics.chunks(self.rng.choice([self.local_topic(a), self.topics.base()]))
        tid = uuid.uuid4().hex
        data = self.rand_bytes(0, 2000)
        variants: list[Callable[[], bytes]] = [
            lambda: chunk_frame(tid, 0, 1, 0, data),  # a transfer nobody announced
            lambda: chunk_frame(tid, 3, 2, 0, data),  # index beyond its count
            lambda: chunk_frame(tid, 0, 1, 0, data, length=len(data) + 1),  # length mismatch
            lambda: chunk_frame(tid, 0, 1, 0, data, length=2**32 - 1),  # huge declared length
            lambda: chunk_frame(tid, 0, 2**32 - 1, 2**63, data),  # huge offset and count
            lambda: chunk_frame(tid, 0, 1, 0, data)[: self.rng.randrange(0, 40)],  # truncated
            lambda: b"XXXX" + chunk_frame(tid, 0, 1, 0, data)[4:],  # bad magic
        ]
        return self.shot("bad chunk frame", topic, self.rng.choice(variants)())

    def bad_local_envelope(self) -> Shot:
        """A local model message whose envelope is wrong (schema, identity, sizes...)."""
        a = self.agent()
        other = f"fz{self.rng.randrange(40, 80)}"
        tid = uuid.uuid4().hex
        sha = hashlib.sha256(b"x").hexdigest()

        def transfer(total: int, chunk: int = 1024, count: int | None = None) -> dict[str, Any]:
            n = -(-total // chunk) if count is None else count
            info = {"transfer_id": tid, "total_bytes": total, "chunk_size": chunk, "count": n}
            return {**info, "blake3": sha}

        r = self.rng
        mutations: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (
                "wrong version",
                lambda: {**self.local(a), "v": r.choice([0, 2, True, 1.0, "1", None])},
            ),
            ("no version", lambda: {k: v for k, v in self.local(a).items() if k != "v"}),
            ("unknown type", lambda: self.local(a, type=r.choice(["bogus", "ack", "", "MODEL"]))),
            ("no type", lambda: {k: v for k, v in self.local(a).items() if k != "type"}),
            ("mismatched sender", lambda: self.local(other)),
            ("other project", lambda: {**self.local(a), "project": "elsewhere"}),
            ("bad project name", lambda: {**self.local(a), "project": "no/such project"}),
            ("wrong kind", lambda: self.local(a, kind=r.choice(["global", "base", "sg", "weird"]))),
            ("stale round", lambda: self.local(a, round=0)),
            ("unknown round", lambda: self.local(a, round=r.choice([3, 7, 2**63, 2**64 - 1]))),
            ("bad round", lambda: self.local(a, round=r.choice([-1, 1.0, "1", True, None, [1]]))),
            (
                "bad samples",
                lambda: self.local(a, num_samples=r.choice([math.nan, math.inf, -1.0, "5", None])),
            ),
            (
                "NaN/Inf metric",
                lambda: self.local(a, metrics={"acc": r.choice([math.nan, -math.inf])}),
            ),
            (
                "bad metric",
                lambda: self.local(a, metrics=r.choice([{"a" * 129: 1.0}, {"acc": "x"}])),
            ),
            ("NaN timestamp", lambda: {**self.local(a), "ts": r.choice([math.nan, "now", None])}),
            ("extra field", lambda: self.local(a, evil=r.randrange(10))),
            ("data and transfer", lambda: self.local(a, transfer=transfer(500))),
            ("neither data nor transfer", lambda: self.local(a, data=None)),
            ("bad contributors", lambda: self.local(a, contributors=[{"agent": "no way!"}])),
            ("bad base_sha", lambda: self.local(a, base_sha="zz")),
            ("long framework", lambda: self.local(a, framework="f" * 33)),
            ("huge declared size", lambda: self.local(a, data=None, transfer=transfer(10**15))),
            ("size beyond the model", lambda: self.local(a, data=None, transfer=transfer(10**8))),
            (
                "size below the model",
                lambda: self.local(a, data=None, transfer=transfer(self.lo - 1)),
            ),
            (
                "count that does not add up",
                lambda: self.local(a, data=None, transfer=transfer(400, 64, count=3)),
            ),
            (
                "bad transfer fields",
                lambda: self.local(
                    a,
                    data=None,
                    transfer={**transfer(400), r.choice(["transfer_id", "blake3"]): "XYZ"},
                ),
            ),
            (
                "zero chunk size",
                lambda: self.local(
                    a, data=None, transfer=transfer(400, 1, count=400) | {"chunk_size": 0}
                ),
            ),
        ]
        what, make = r.choice(mutations)
        return self.shot(what, self.local_topic(a), make())

    def bad_model_frame(self) -> Shot:
        """A well-formed local envelope carrying a model that is wrong (acked REJECTED)."""
        a = self.agent()
        g = self.good
        r = self.rng

        def with_(**changes: Array) -> bytes:
            return encode({**g, **changes})

        def idx(
            name: str, dtype: str, shape: list[int], offset: int, nbytes: int
        ) -> dict[str, Any]:
            return {
                "name": name,
                "dtype": dtype,
                "shape": shape,
                "offset": offset,
                "nbytes": nbytes,
            }

        raw = bytes(256)
        variants: list[tuple[str, Callable[[], bytes]]] = [
            ("wrong dtype", lambda: with_(w=g["w"].astype(np.float64))),
            ("wrong dtype", lambda: with_(b=g["b"].astype(np.int32))),
            ("wrong dtype", lambda: with_(steps=np.array(0, np.float64))),
            ("wrong shape", lambda: with_(w=np.zeros((3, 4), np.float32))),
            (
                "missing tensor",
                lambda: encode({"w": g["w"], "b": g["b"], "x": np.zeros(4, np.int64)}),
            ),
            ("extra tensor", lambda: with_(extra=np.zeros(2, np.float32))),
            ("NaN tensor", lambda: with_(w=np.full((4, 3), np.nan, np.float32))),
            ("Inf tensor", lambda: with_(b=np.array([0, np.inf, -np.inf], np.float32))),
            (
                "bad dtype name",
                lambda: frame(
                    [idx("w", r.choice(["object", "<f4", "float128", "str"]), [4, 3], 0, 48)], raw
                ),
            ),
            ("huge nbytes", lambda: frame([idx("w", "float32", [2**20, 2**20], 0, 2**42)], raw)),
            ("nbytes that lie", lambda: frame([idx("w", "float32", [4, 3], 0, 4)], raw)),
            ("misaligned offset", lambda: frame([idx("w", "float32", [4, 3], 3, 48)], raw)),
            (
                "overlapping tensors",
                lambda: frame(
                    [idx("w", "float32", [4, 3], 0, 48), idx("b", "float32", [3], 0, 12)], raw
                ),
            ),
            ("huge header length", lambda: frame([], raw, header_len=2**32 - 1)),
            ("deep meta", lambda: frame_with_raw_meta([], raw, deep_array(20_000))),
            ("not a frame", lambda: self.rand_bytes(self.lo, self.lo + 300)),
            (
                "truncated frame",
                lambda: self.good_frame[: r.randrange(self.lo, len(self.good_frame))],
            ),
            ("negative shape", lambda: frame([idx("w", "float32", [-4, 3], 0, 48)], raw)),
            ("bool bytes", lambda: frame([idx("w", "bool", [4, 3], 0, 12)], b"\x02" * 256)),
            ("model too small", lambda: self.good_frame[: r.randrange(0, self.lo)]),
            ("model too big", lambda: self.rand_bytes(self.hi + 1, self.hi + 50_000)),
        ]
        what, make = r.choice(variants)
        return self.shot(what, self.local_topic(a), self.local(a, data=make()))

    def bad_agent_message(self) -> Shot:
        """Status, heartbeat and request messages that are wrong."""
        a = self.agent()
        other = f"fz{self.rng.randrange(40, 80)}"
        t = self.topics
        r = self.rng

        def status(**f: Any) -> dict[str, Any]:
            return self.envelope(f.pop("sender", a), type="agent_status", state="online") | f

        def beat(**f: Any) -> dict[str, Any]:
            return self.envelope(f.pop("sender", a), type="heartbeat", state="idle") | f

        def req(**f: Any) -> dict[str, Any]:
            return self.envelope(f.pop("sender", a), type="model_request") | f

        variants: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
            (
                "status: bad state",
                t.agent_status(a),
                lambda: status(state=r.choice(["zombie", 1, None])),
            ),
            ("status: bad aggregator", t.agent_status(a), lambda: status(aggregator="no way!")),
            ("status: mismatched sender", t.agent_status(a), lambda: status(sender=other)),
            ("status: extra field", t.agent_status(a), lambda: status(evil=True)),
            ("status: wrong type", t.agent_status(a), lambda: beat()),
            ("status: wrong version", t.agent_status(a), lambda: status(v=2)),
            ("heartbeat: long state", t.agent_heartbeat(a), lambda: beat(state="s" * 33)),
            (
                "heartbeat: bad round",
                t.agent_heartbeat(a),
                lambda: beat(round=r.choice([-1, 1.5, "3"])),
            ),
            (
                "heartbeat: NaN/Inf metric",
                t.agent_heartbeat(a),
                lambda: beat(metrics={"loss": r.choice([math.nan, math.inf])}),
            ),
            ("heartbeat: mismatched sender", t.agent_heartbeat(a), lambda: beat(sender=other)),
            ("heartbeat: unknown type", t.agent_heartbeat(a), lambda: beat(type="bogus")),
            ("heartbeat: other project", t.agent_heartbeat(a), lambda: beat(project="elsewhere")),
            ("request: bad transfer id", t.agent_request(a), lambda: req(transfer_id="abc")),
            (
                "request: bad chunks",
                t.agent_request(a),
                lambda: req(chunks=r.choice([[-1], "x", [1.5], [True]])),
            ),
            ("request: mismatched sender", t.agent_request(a), lambda: req(sender=other)),
            ("request: wrong type", t.agent_request(a), lambda: status()),
        ]
        what, topic, make = r.choice(variants)
        return self.shot(what, topic, make())

    def bad_name_topic(self) -> Shot:
        name = self.rng.choice(["bad name", "é", "a" * 65, "a+b".replace("+", "%")])
        t = self.topics
        topic = self.rng.choice(
            [
                f"{t.root}/agents/{name}/heartbeat",
                f"{t.root}/agents/{name}/status",
                f"{t.root}/agg/{self.aggr}/local/{name}",
                f"{t.root}/agg/{self.aggr}/local/fz1/chunk/extra",
            ]
        )
        return self.shot("bad topic", topic, pack(self.envelope("fz1", type="heartbeat")))

    def bad_control(self) -> Shot:
        r = self.rng

        def c(**f: Any) -> dict[str, Any]:
            return self.envelope("mallory", type="control") | f

        variants: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (
                "control: not an admin",
                lambda: c(command=r.choice(["stop", "restart", "complete_round"])),
            ),
            ("control: unknown command", lambda: c(command="explode")),
            (
                "control: bad value",
                lambda: c(command="set_threshold", value=r.choice(["x", True, math.nan])),
            ),
            ("control: value for none", lambda: c(command="stop", value=1)),
            ("control: params", lambda: c(command="stop", params={"a": 1})),
            ("control: wrong type", lambda: self.envelope("mallory", type="heartbeat")),
        ]
        what, make = r.choice(variants)
        return self.shot(what, self.topics.agg_control(self.aggr), make())

    def bad_base(self) -> Shot:
        r = self.rng
        tid = uuid.uuid4().hex
        sha = hashlib.sha256(b"y").hexdigest()

        def base(**f: Any) -> dict[str, Any]:
            return self.envelope("admin", type="model", kind="base", round=0) | f

        total = r.choice([10**9, 10**15])
        huge = {
            "transfer_id": tid,
            "total_bytes": total,
            "chunk_size": 1 << 20,
            "count": -(-total // (1 << 20)),
            "blake3": sha,
        }
        variants: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (
                "base: NaN model",
                lambda: base(data=encode({**self.good, "w": np.full((4, 3), np.nan, np.float32)})),
            ),
            ("base: not a frame", lambda: base(data=self.rand_bytes(1, 500))),
            ("base: huge declared size", lambda: base(transfer=huge)),
            ("base: wrong kind", lambda: base(kind="local", data=self.good_frame)),
            ("base: wrong version", lambda: base(v=3, data=self.good_frame)),
        ]
        what, make = r.choice(variants)
        return self.shot(what, self.topics.base(), make())

    def deep_nesting(self) -> Shot:
        a = self.agent()
        t = self.topics
        topic = self.rng.choice(
            [
                self.local_topic(a),
                t.agent_status(a),
                t.agent_heartbeat(a),
                t.agent_request(a),
                t.agg_control(self.aggr),
                t.base(),
            ]
        )
        payload = self.rng.choice([deep_array(100_000), deep_map(50_000)])
        if self.rng.random() < 0.5:  # deep inside an otherwise plausible envelope
            head = pack(self.envelope(a, type="heartbeat"))
            # A fixmap of one entry more, the last one "metrics": <nested too deep>.
            payload = bytes([head[0] + 1]) + head[1:] + pack("metrics") + payload
        return self.shot("deep nesting", topic, payload)

    def oversize(self) -> Shot:
        a = self.agent()
        t = self.topics
        r = self.rng
        kind = r.choice(["local", "chunk", "heartbeat", "control", "status"])
        topic = {
            "local": self.local_topic(a),
            "chunk": Topics.chunks(self.local_topic(a)),
            "heartbeat": t.agent_heartbeat(a),
            "control": t.agg_control(self.aggr),
            "status": t.agent_status(a),
        }[kind]
        room = MAX_PACKET - len(topic) - 200
        if kind == "local":
            payload = pack(self.local(a, data=bytes(room - 400)))
        elif kind == "chunk":
            payload = chunk_frame(uuid.uuid4().hex, 0, 1, 0, bytes(room - 100))
        elif kind == "heartbeat":
            payload = pack(self.envelope(a, type="heartbeat", state="s" * (room - 200)))
        elif kind == "control":
            payload = pack(
                self.envelope(
                    "mallory", type="control", command="stop", params={"x": "y" * (room - 300)}
                )
            )
        else:
            payload = pack(
                self.envelope(a, type="agent_status", state="online", evil=bytes(room - 300))
            )
        assert len(payload) + len(topic) + 64 <= MAX_PACKET, (kind, len(payload))
        return self.shot(f"oversize {kind}", topic, payload)

    def transfer_volley(self) -> Volley:
        """A chunked upload announced validly, then broken: chunks that do not fit it, a chunk
        on another agent's topic, a corrupted chunk (the hash fails when the last arrives), a
        late repeat (quietly dropped), the same announcement replayed (in the next batch); or a
        whole valid upload for a round that is over (STALE)."""
        a = f"fzs{self.rng.randrange(1000)}"
        topic = self.local_topic(a)
        chunks = Topics.chunks(topic)
        payload = self.good_frame
        manifest = make_manifest(payload, 64)
        info = manifest.to_wire()
        stale = self.rng.random() < 0.3
        announce = Shot(
            topic, pack(self.local(a, data=None, transfer=info, round=0 if stale else 1)), False
        )
        tid = manifest.transfer_id

        def piece(i: int, data: bytes | None = None) -> bytes:
            offset, length = manifest.chunk_span(i)
            return chunk_frame(
                tid,
                i,
                manifest.count,
                offset,
                data if data is not None else payload[offset : offset + length],
            )

        volley: Volley = [announce]
        last = manifest.count - 1
        if stale:
            volley += [Shot(chunks, piece(i), False) for i in range(last)]
            volley.append(self.shot("stale upload", chunks, piece(last)))
            return volley
        volley.append(
            self.shot(
                "chunk: wrong count",
                chunks,
                chunk_frame(tid, 0, manifest.count + 1, 0, payload[:64]),
            )
        )
        volley.append(
            self.shot(
                "chunk: wrong offset",
                chunks,
                chunk_frame(tid, 1, manifest.count, 0, payload[64:128]),
            )
        )
        volley.append(
            self.shot(
                "chunk: wrong length", chunks, chunk_frame(tid, 0, manifest.count, 0, payload[:10])
            )
        )
        other = Topics.chunks(self.local_topic(f"fzs{self.rng.randrange(1000, 2000)}"))
        volley.append(self.shot("chunk: another agent's topic", other, piece(0)))
        pieces = [piece(i) for i in range(last)]
        corrupt = bytearray(payload[64:128])
        corrupt[6] ^= 0xFF  # a chunk that fits, with one byte flipped
        pieces[1] = piece(1, bytes(corrupt))
        volley += [Shot(chunks, p, False) for p in pieces]
        volley.append(self.shot("chunk: hash mismatch", chunks, piece(last)))
        volley.append(Shot(chunks, piece(0), False))  # late repeat of an ended transfer: dropped
        # The same announcement again, in the next batch: the aggregator takes announcements
        # ahead of queued chunks (common/transport.py), so one replayed now could arrive while
        # the transfer is still open, when it is a duplicate to ignore, not a replay to refuse.
        # A batch is sent only once the previous one was fully taken.
        self.replays.append((topic, announce.payload))
        return volley

    # ------------------------------------------------------------------ the mix
    def volleys(self, count: int) -> Iterator[Volley]:
        """At least ``count`` counted shots, in a seeded mix of every category."""
        weights: list[tuple[Callable[[], Shot], int]] = [
            (self.random_bytes, 22),
            (self.truncated_envelope, 12),
            (self.bad_chunk, 12),
            (self.bad_local_envelope, 20),
            (self.bad_model_frame, 14),
            (self.bad_agent_message, 12),
            (self.bad_name_topic, 1),
            (self.bad_control, 2),
            (self.bad_base, 2),
            (self.deep_nesting, 2),
        ]
        makers = [m for m, w in weights for _ in range(w)]
        produced = 0
        replays, self.replays = self.replays, []
        for topic, payload in replays:
            produced += 1
            yield [self.shot("replayed transfer", topic, payload)]
        n = 0
        while produced < count:
            n += 1
            if n % 250 == 0:
                volley = [self.oversize()]
            elif n % 80 == 0:
                volley = self.transfer_volley()
            else:
                volley = [self.rng.choice(makers)()]
            produced += sum(s.counted for s in volley)
            yield volley


async def publish(
    settings: BrokerSettings, volleys: Iterator[Volley], *, inflight: int = 16
) -> int:
    """Send every volley, up to ``inflight`` QoS 1 publishes outstanding; returns the number
    of counted shots sent."""
    counted = 0
    async with MqttTransport(settings=settings) as transport:

        async def worker() -> None:
            nonlocal counted
            for volley in volleys:  # shared iterator: each volley is sent by one worker
                for shot in volley:  # in order: each waits for the broker's PUBACK
                    await transport.publish(shot.topic, shot.payload, qos=1)
                    counted += shot.counted

        async with asyncio.TaskGroup() as tg:
            for i in range(inflight):
                tg.create_task(worker(), name=f"fuzz-{i}")
    return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--aggregator", default="a1")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt's notes on pending publishes
    settings = BrokerSettings(host=args.host, port=args.port)
    fuzzer = Fuzzer(project=args.project, aggregator=args.aggregator, seed=args.seed)
    expected = 0
    seconds = 0.0
    while True:
        t0 = time.perf_counter()
        size = min(args.batch, args.count - expected)
        expected += asyncio.run(publish(settings, fuzzer.volleys(size)))
        seconds += time.perf_counter() - t0
        last = expected >= args.count
        line = {"phase": "done" if last else "batch", "expected": expected}
        if last:
            line |= {"seconds": round(seconds, 2), "kinds": dict(fuzzer.kinds)}
        print(json.dumps(line), flush=True)
        if last:
            return
        sys.stdin.readline()


if __name__ == "__main__":
    main()
