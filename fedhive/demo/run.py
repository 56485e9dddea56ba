"""``fedhive demo``: a whole federation on this machine, end to end.

A Mosquitto broker (started here, or the configured one if it answers), one aggregator process,
the admin's base-model upload and N agent processes training a small CNN on scikit-learn's
digits. The demo watches the broker, evaluates every global model on held-out data, and finally
trains the same model centrally with the same total epochs for comparison.

With ``aggregators`` > 1 it runs the two-level federation: an sg-aggregator process, that many
aggregator processes under it (``aggr1``, ``aggr2``...), the agents spread over them in turn,
and the SG models are the ones evaluated.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agent.admin import AdminAgent
from broker.health import broker_answers
from broker.process import MosquittoBroker
from common.codec import decode
from common.config import (
    DEFAULT_SG_AGGREGATOR,
    AggregatorConfig,
    BrokerSettings,
    SgAggregatorConfig,
)
from common.errors import FedhiveError, FedhiveTimeoutError
from common.exchange import ModelReceiver
from common.messages import (
    AggStatusMessage,
    ModelKind,
    ModelMessage,
    SgStatusMessage,
    decode_message,
)
from common.topics import Topics
from common.transport import MqttTransport


@dataclass
class DemoOptions:
    agents: int = 3
    rounds: int = 8
    epochs: int = 1
    host: str = "127.0.0.1"
    port: int | None = None  # use this broker if it answers; else start one
    project: str = "demo"
    aggregator: str = "aggr1"
    method: str = "fedavg"
    workdir: Path | None = None
    timeout: float = 120.0
    #: More than one: an sg-aggregator over that many aggregators (``aggr1``, ``aggr2``...).
    aggregators: int = 1
    #: How agents pack their updates (``AggregatorConfig.compression``); None: plain frames.
    compression: str | None = None

    @property
    def aggregator_names(self) -> list[str]:
        if self.aggregators <= 1:
            return [self.aggregator]
        return [f"aggr{i + 1}" for i in range(self.aggregators)]

    def home(self, agent: int) -> str:
        """The aggregator agent ``agent`` is assigned to (in turn)."""
        names = self.aggregator_names
        return names[agent % len(names)]


@dataclass
class DemoResult:
    accuracies: list[float] = field(default_factory=list)
    centralized: float = 0.0
    seconds: float = 0.0


def _python_env() -> dict[str, str]:
    """The children import fedhive from wherever this process did (installed or a checkout)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # N trainers on 2 cores: no thread oversubscription
    return env


def _spawn(args: list[str], log_file: Path, stack: ExitStack) -> subprocess.Popen[bytes]:
    out = stack.enter_context(log_file.open("wb"))
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=_python_env()
    )

    def reap() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(reap)
    return proc


def run_demo(options: DemoOptions, console: Console | None = None) -> DemoResult:
    """Run the whole demo; raises FedhiveError if any part fails."""
    console = console or Console()
    started = time.perf_counter()
    with ExitStack() as stack:
        workdir = options.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fedhive-demo-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        host, port = options.host, options.port
        if port is not None and broker_answers(host, port):
            console.print(f"using the broker at {host}:{port}")
        else:
            broker = MosquittoBroker(data_dir=workdir / "broker", port=port)
            broker.start()
            stack.callback(broker.stop)
            host, port = broker.host, broker.port
            console.print(f"started Mosquitto on {host}:{port}")

        broker_settings = BrokerSettings(host=host, port=port)
        two_level = options.aggregators > 1
        procs: list[subprocess.Popen[bytes]] = []
        if two_level:
            sg_cfg = SgAggregatorConfig(
                project=options.project,
                broker=broker_settings,
                method=options.method,
                data_dir=workdir / "sg-aggregator",
            )
            sg_path = workdir / "sg-aggregator.json"
            sg_path.write_text(sg_cfg.model_dump_json(indent=2))
            procs.append(
                _spawn(
                    ["-m", "fedhive", "sg-aggregator", "start", "--config", str(sg_path)],
                    workdir / "sg-aggregator.log",
                    stack,
                )
            )
        for name in options.aggregator_names:
            agg_cfg = AggregatorConfig(
                name=name,
                project=options.project,
                broker=broker_settings,
                method=options.method,
                data_dir=workdir / name,
                sg_aggregator=DEFAULT_SG_AGGREGATOR if two_level else None,
                compression=options.compression,
            )
            suffix = f"-{name}" if two_level else ""
            agg_path = workdir / f"aggregator{suffix}.json"
            agg_path.write_text(agg_cfg.model_dump_json(indent=2))
            procs.append(
                _spawn(
                    ["-m", "fedhive", "aggregator", "start", "--config", str(agg_path)],
                    workdir / f"aggregator{suffix}.log",
                    stack,
                )
            )
        servers = len(procs)
        agent_path = workdir / "config_agent.json"
        agent_path.write_text(
            json.dumps(
                {
                    "model_path": str(workdir / "agents"),
                    "aggr_ip": host,
                    "reg_port": str(port),
                    "token": None,
                    "agent_name": "agent",
                    "project": options.project,
                    "aggregator": options.aggregator,
                    "heartbeat_interval": 2.0,
                    "base_model": {
                        "model_fn": "make_model",
                        "model_fn_src": "fedhive.demo.task",
                        "model_format": "PyTorch",
                        "model_name": "digits-cnn",
                    },
                },
                indent=2,
            )
        )

        for i in range(options.agents):
            procs.append(
                _spawn(
                    [
                        "-m",
                        "fedhive.demo.agent",
                        "--config",
                        str(agent_path),
                        "--index",
                        str(i),
                        "--agents",
                        str(options.agents),
                        "--rounds",
                        str(options.rounds),
                        "--epochs",
                        str(options.epochs),
                        "--aggregator",
                        options.home(i),
                    ],
                    workdir / f"agent{i}.log",
                    stack,
                )
            )
        what = f"sg-aggregator, {options.aggregators} aggregators" if two_level else "aggregator"
        console.print(f"{what} and {options.agents} agents started (logs in {workdir})")
        result = asyncio.run(_watch(options, broker_settings, agent_path, procs, console, workdir))
        for proc in procs[servers:]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise FedhiveError(f"agent process {proc.pid} did not finish") from None
            if proc.returncode != 0:
                raise FedhiveError(f"an agent exited with {proc.returncode}; see {workdir}")

    from fedhive.demo.task import centralized_accuracy

    console.print(f"training centrally for {options.rounds * options.epochs} epochs...")
    result.centralized = centralized_accuracy(options.rounds * options.epochs)
    result.seconds = time.perf_counter() - started
    return result


async def _watch(
    options: DemoOptions,
    broker: BrokerSettings,
    agent_config: Path,
    procs: list[subprocess.Popen[bytes]],
    console: Console,
    workdir: Path,
) -> DemoResult:
    from common.adapters import get_adapter
    from fedhive.demo.task import evaluate, load_digits_split, make_model

    split = load_digits_split()
    model = make_model()
    torch_adapter = get_adapter("pytorch")
    topics = Topics(options.project)
    two_level = options.aggregators > 1
    # The models evaluated: the SG models, or the one aggregator's global models.
    model_topic = topics.sg_model() if two_level else topics.agg_model(options.aggregator)
    model_kind = ModelKind.SG if two_level else ModelKind.GLOBAL
    active: dict[str, int] = {}
    sg_ready = not two_level
    receiver = ModelReceiver(max_bytes=1 << 30)
    result = DemoResult()
    deadline = time.monotonic() + options.timeout

    def check_children() -> None:
        for proc in procs:
            code = proc.poll()
            if code not in (None, 0):
                raise FedhiveError(f"a demo process exited with {code}; logs in {workdir}")
        if time.monotonic() > deadline:
            raise FedhiveTimeoutError(f"the demo did not finish within {options.timeout} s")

    async with MqttTransport(
        settings=broker, client_id=f"{options.project}.monitor.demo"
    ) as transport:
        status_topics = [topics.agg_status(name) for name in options.aggregator_names]
        if two_level:
            status_topics.append(topics.sg_status())
        await transport.subscribe(*status_topics, model_topic, Topics.chunks(model_topic))
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            waiting = progress.add_task("agents online", total=options.agents, info="")
            rounds = progress.add_task("rounds", total=options.rounds, info="", visible=False)
            uploaded = False
            messages = transport.messages()
            while len(result.accuracies) < options.rounds:
                check_children()
                try:
                    incoming = await asyncio.wait_for(anext(messages), 1.0)
                except TimeoutError:
                    continue
                if Topics.chunks(model_topic) == incoming.topic:
                    received = receiver.chunk(incoming.payload)
                elif not incoming.payload:
                    continue
                else:
                    message = decode_message(incoming.payload)
                    received = None
                    if isinstance(message, SgStatusMessage):
                        sg_ready = True
                    if isinstance(message, AggStatusMessage | SgStatusMessage):
                        if isinstance(message, AggStatusMessage):
                            active[message.sender] = message.active
                        online = sum(active.values())
                        if not uploaded:
                            progress.update(waiting, completed=online)
                        if not uploaded and sg_ready and online >= options.agents:
                            admin = AdminAgent(config_file=agent_config, timeout=30)
                            await asyncio.to_thread(admin.initialize)
                            uploaded = True
                            progress.update(rounds, visible=True)
                        continue
                    if isinstance(message, ModelMessage) and message.kind is model_kind:
                        received = receiver.announce(incoming.topic, message)
                if received is None or received.message.round == 0:
                    continue
                tensors, _ = decode(received.payload)
                torch_adapter.load_numpy(model, tensors)
                acc, _loss = evaluate(model, split.x_test, split.y_test)
                result.accuracies.append(acc)
                n = len(received.message.contributors) + received.message.contributors_omitted
                progress.console.print(
                    f"round {received.message.round:3d}: {'SG' if two_level else 'global'} "
                    "model test accuracy "
                    f"{acc * 100:6.2f}%  ({n} local models)"
                )
                progress.update(
                    rounds, completed=len(result.accuracies), info=f"acc {acc * 100:.1f}%"
                )
    return result
