"""Fuzzing the aggregator over a real Mosquitto (issue 8, acceptance 3).

More than 10,000 malformed or adversarial messages (tests/fuzz_payloads.py: random bytes,
truncated envelopes and frames, huge declared sizes, wrong dtypes, deep nesting, NaN/Inf,
mismatched senders, unknown types and versions, oversize envelopes, broken and replayed
transfers) go to an aggregator's topics from another process. Every one is rejected exactly
once with a typed error, nothing is an internal error, the log stays short, the aggregator's
memory stays bounded, and a valid round afterwards completes with the weighted mean.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from fuzz_payloads import base_tensors
from support import ROOT, broker_settings, python_env, running_aggregator, weighted_mean

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient
from aggregator.service import AggregatorService
from broker.process import MosquittoBroker
from common.config import AggregatorConfig

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FUZZ_COUNT = 10_000
#: Sent at once, then the fuzzer waits for the aggregator (see tests/fuzz_payloads.py).
BATCH = 1000
#: What the aggregator's memory may grow by while the fuzz runs.
MEMORY_BOUND = 100 << 20


def _total(service: AggregatorService) -> int:
    # list() copies the counter's values in one C call: safe against the aggregator's thread.
    return sum(list(service.rejections.values()))


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.05)  # polling another thread's counter


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


@contextmanager
def _peak_rss() -> Iterator[Callable[[], int]]:
    """The process's peak resident memory from now on, in bytes: the kernel's high-water
    mark reset through /proc/self/clear_refs, else a sampling thread."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        peak = [_status_kib("VmRSS")]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                peak[0] = max(peak[0], _status_kib("VmRSS"))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield lambda: peak[0] << 10
        finally:
            stop.set()
            thread.join()
        return
    yield lambda: _status_kib("VmHWM") << 10


class _Lines:
    """JSON lines from a child's stdout, read by a thread so every read has a timeout."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._lines.put(line)

    def next(self, timeout: float) -> dict[str, Any]:
        line: dict[str, Any] = json.loads(self._lines.get(timeout=timeout))
        return line


@pytest.mark.timeout(900)
def test_fuzzed_messages_are_all_rejected_and_a_valid_round_completes(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: an aggregator (in this process: its counters and memory are measured here)
    # with the base model, and the fuzzer in a process of its own.
    caplog.set_level(logging.INFO, logger="fedhive")
    settings = broker_settings(mosquitto)
    config = AggregatorConfig(
        name="a1",
        project=project_name,
        broker=settings,
        data_dir=tmp_path / "agg",
        max_model_bytes=4 << 20,
    )
    common = {
        "aggregator_ip_address": mosquitto.host,
        "reg_port": mosquitto.port,
        "project": project_name,
        "aggregator": "a1",
        "model_timeout": 60,
    }
    with running_aggregator(config) as service:
        AdminAgent(
            aggregator_ip_address=mosquitto.host,
            reg_port=mosquitto.port,
            project=project_name,
            timeout=30,
            base_model=BaseModel("tiny", base_tensors(), BaseModelConvFormat.numpy_format),
        ).initialize()
        command = [
            sys.executable,
            str(ROOT / "tests" / "fuzz_payloads.py"),
            *("--host", mosquitto.host, "--port", str(mosquitto.port)),
            *("--project", project_name, "--aggregator", "a1"),
            *("--count", str(FUZZ_COUNT), "--batch", str(BATCH), "--seed", "7"),
        ]
        with (tmp_path / "fuzzer.log").open("wb") as errors:
            fuzzer = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                env=python_env(),
            )
        try:
            assert fuzzer.stdin is not None
            assert fuzzer.stdout is not None
            lines = _Lines(fuzzer.stdout)

            def consumed(line: dict[str, Any]) -> int:
                expected: int = line["expected"]
                _wait_until(lambda: _total(service) >= expected, 120, f"{expected} rejections")
                return expected

            def go() -> None:
                assert fuzzer.stdin is not None
                fuzzer.stdin.write(b"go\n")
                fuzzer.stdin.flush()

            # The first batch warms up (one-time allocations: caches, imports); memory is
            # measured from its end.
            consumed(lines.next(timeout=120))
            gc.collect()
            baseline = _status_kib("VmRSS") << 10

            # Execute
            with _peak_rss() as peak:
                while True:
                    go()
                    line = lines.next(timeout=300)
                    expected = consumed(line)
                    if line["phase"] == "done":
                        break
                grown = peak() - baseline
            assert fuzzer.wait(30) == 0
        finally:
            if fuzzer.poll() is None:
                fuzzer.kill()
                fuzzer.wait(10)
            fuzzer.stdin.close()
            fuzzer.stdout.close()
        records = caplog.records  # the warm-up's too: the log limits hold over the whole run
        warnings = [r for r in records if r.name == "fedhive.aggregator" and r.levelno >= 30]
        summary = {
            "messages": expected,
            "fuzz_seconds": line["seconds"],
            "memory_growth_mib": round(grown / 2**20, 1),
            "warning_lines": len(warnings),
            "rejections": dict(service.rejections),
        }
        print(json.dumps(summary))  # shown with -s / -rP

        # Assert: every message rejected exactly once, with a typed error; no bug surfaced.
        rejections = dict(service.rejections)
        assert expected >= FUZZ_COUNT
        assert sum(rejections.values()) == expected, rejections
        assert "InternalError" not in rejections, rejections
        for kind in (
            "MessageError",
            "FrameError",
            "ModelMismatchError",
            "InvalidModelError",
            "StaleSubmission",
            "RejectedSubmission",
            "RefusedCommand",
        ):
            assert rejections.get(kind, 0) > 0, (kind, rejections)
        # ... logged in a few lines (the first ones, then summaries), never with a traceback.
        assert len(warnings) <= 100, len(warnings)
        assert not [r for r in records if r.exc_info], [r.getMessage() for r in records][:5]
        # ... in bounded memory.
        assert grown < MEMORY_BOUND, f"memory grew by {grown / 2**20:.1f} MiB"
        # ... and nothing of it reached the round.
        assert service.engine.round == 1
        assert service.engine.collected == 0

        # Execute: a valid round afterwards.
        clients = [BasicClient(agent_name=f"agent{i}", **common) for i in range(2)]
        try:
            for client in clients:
                client.set_bm_obj(base_tensors())
                client.wait_for_sg_model()
            first = {k: np.asarray(v + 1, v.dtype) for k, v in base_tensors().items()}
            second = {k: np.asarray(v * 3, v.dtype) for k, v in base_tensors().items()}
            acks = [
                clients[0].send_trained_model(first, {"accuracy": 0.5}, num_samples=10),
                clients[1].send_trained_model(second, {"accuracy": 0.7}, num_samples=30),
            ]
            model = clients[0].wait_for_sg_model()
        finally:
            for client in clients:
                client.disconnect()

        # Assert: it completed with both models, weighted 10 : 30.
        assert all(ack is not None and ack.status.value == "accepted" for ack in acks), acks
        expected_model = weighted_mean({"agent0": (10, first), "agent1": (30, second)})
        for name, value in expected_model.items():
            np.testing.assert_allclose(np.asarray(model[name], np.float64), value, atol=1e-6)
        assert service.engine.round == 2
        assert sum(list(service.rejections.values())) == expected  # nothing valid was rejected
