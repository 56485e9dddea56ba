"""AdminAgent, BaseModel and BaseModelConvFormat: uploading the base model (STADLE's API).

The admin publishes the base model on the project's retained ``base`` topic (chunks not
retained) and waits until an aggregator confirms it loaded exactly those bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.client import LoopThread, _config_from
from agent.model_loader import build_base_model
from common.adapters import get_adapter
from common.codec import encode
from common.config import AgentConfig
from common.errors import ConfigError, FedhiveTimeoutError
from common.exchange import prepare_model_message, publish_chunks, publish_model
from common.messages import AggStatusMessage, ModelKind, ResendRequest, decode_message
from common.topics import Topics
from common.transport import MqttTransport

log = logging.getLogger("fedhive.admin")


class BaseModelConvFormat(StrEnum):
    """The framework a base model object belongs to."""

    pytorch_format = "PyTorch"
    keras_format = "Keras"
    numpy_format = "NumPy"


@dataclass
class BaseModel:
    """A named base model object and its framework (STADLE's ``BaseModel(name, obj, type)``)."""

    name: str
    obj: Any
    type: BaseModelConvFormat | str = BaseModelConvFormat.pytorch_format


class AdminAgent:
    """Uploads the base model of a project.

    Args:
        config_file: an agent config JSON; its ``base_model`` block builds the model when
            ``base_model`` is not given.
        base_model: the model to upload.
        timeout: seconds to wait for an aggregator to confirm the upload.
    """

    def __init__(
        self,
        config_file: str | Path | None = None,
        simulation_flag: bool = True,
        aggregator_ip_address: str | None = None,
        reg_port: int | str | None = None,
        exch_port: int | str | None = None,
        model_path: str | Path | None = None,
        base_model: BaseModel | None = None,
        agent_running: bool = True,
        *,
        timeout: float = 60.0,
        **settings: Any,
    ) -> None:
        settings.setdefault("agent_name", "admin")
        self.config: AgentConfig = _config_from(
            config_file,
            {
                "aggr_ip": aggregator_ip_address,
                "reg_port": reg_port,
                "model_path": model_path,
                **settings,
            },
        )
        self._config_dir = Path(config_file).resolve().parent if config_file else Path.cwd()
        self.base_model = base_model
        self.timeout = timeout

    def preload(self) -> BaseModel:
        """Build the base model from the config's ``base_model`` block if none was given."""
        if self.base_model is None:
            bm = self.config.base_model
            obj = build_base_model(bm, config_dir=self._config_dir)
            self.base_model = BaseModel(bm.model_name, obj, bm.model_format)
        return self.base_model

    def initialize(self) -> str:
        """Upload the base model; return its sha256 once an aggregator confirmed it."""
        base = self.preload()
        adapter = get_adapter(str(base.type))
        payload = encode(adapter.to_numpy(base.obj), {"name": base.name})
        loop = LoopThread("fedhive-admin")
        try:
            return loop.run(self._upload(payload, adapter.framework))
        finally:
            loop.close()

    upload_base_model = initialize

    async def _upload(self, payload: bytes, framework: str) -> str:
        cfg = self.config
        topics = Topics(cfg.project)
        sha = hashlib.sha256(payload).hexdigest()
        message, manifest = prepare_model_message(
            payload,
            chunk_size=cfg.chunk_size,
            project=cfg.project,
            sender=cfg.agent_name,
            kind=ModelKind.BASE,
            round=0,
            framework=framework,
        )
        async with MqttTransport(
            settings=cfg.broker(), client_id=f"{cfg.project}.admin.{cfg.agent_name}"
        ) as t:
            # Aggregators ask here for chunks that never reached them: a broker whose queue
            # for a slow reader is full drops what comes next (a 1 GB base model, measured).
            await t.subscribe(topics.all_agg_status(), topics.agent_inbox(cfg.agent_name))
            await publish_model(t, topics.base(), message, payload, manifest, retain=True)
            log.info("base model published (%d bytes, sha256 %s…)", len(payload), sha[:12])

            async def confirmed() -> str:
                async for incoming in t.messages():
                    if not incoming.payload:
                        continue
                    received = decode_message(incoming.payload)
                    if isinstance(received, AggStatusMessage) and received.base_sha == sha:
                        return received.sender
                    if (
                        isinstance(received, ResendRequest)
                        and manifest is not None
                        and received.transfer_id == manifest.transfer_id
                    ):
                        log.info(
                            "%s asked for %d chunks of the base model again",
                            received.sender,
                            len(received.chunks),
                        )
                        await publish_chunks(
                            t,
                            Topics.chunks(topics.base()),
                            payload,
                            manifest,
                            indices=received.chunks,
                        )
                raise ConfigError("connection closed before an aggregator confirmed")

            try:
                aggregator = await asyncio.wait_for(confirmed(), self.timeout)
            except TimeoutError:
                raise FedhiveTimeoutError(
                    f"no aggregator of project {cfg.project!r} confirmed the base model within "
                    f"{self.timeout} s: is 'fedhive aggregator start' running against "
                    f"{cfg.aggr_ip}:{cfg.reg_port}?"
                ) from None
        log.info("aggregator %s loaded the base model", aggregator)
        return sha
