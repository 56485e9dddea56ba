"""The fedhive exception tree.

Every error fedhive raises on purpose derives from :class:`FedhiveError`; library errors
(paho, aiomqtt, msgpack, pydantic) are translated at the boundary with ``raise ... from exc``
and never leak out of the module that talks to the library.

::

    FedhiveError
    ├── ConfigError            bad or missing settings (config file, CLI options)
    ├── CodecError             bytes that cannot be decoded into tensors
    │   └── FrameError         a corrupted, truncated or oversize frame / chunk
    ├── ModelMismatchError     names, shapes or dtypes differ from the base model spec
    ├── InvalidModelError      non-finite values, bad sample count, unknown framework
    ├── MessageError           an envelope or control body that fails validation
    ├── TransportError         the MQTT connection failed or was lost
    │   └── NotConnectedError  the client was used outside its ``async with`` block
    ├── FedhiveTimeoutError    a wait ran out (no aggregator answered, no model arrived)
    ├── RejectedError          the aggregator refused a submission (reason attached)
    │   ├── AgentRejectedError       this agent was not admitted (max_agents reached)
    │   ├── AggregatorInactiveError  the aggregator was stopped (INACTIVE); retry after restart
    │   └── TrainingFinishedError    max_rounds were aggregated: there is no next round
    ├── StrategyError          an aggregation method cannot run on the models at hand
    └── BrokerError            Mosquitto could not be found, started or reached
"""

from __future__ import annotations


class FedhiveError(Exception):
    """Base class of every error fedhive raises on purpose."""


class ConfigError(FedhiveError):
    """A setting is missing, malformed or inconsistent."""


class CodecError(FedhiveError):
    """Bytes that cannot be decoded into named tensors."""


class FrameError(CodecError):
    """A frame or chunk is corrupted, truncated, oversize or fails its hash."""


class ModelMismatchError(FedhiveError):
    """Tensor names, shapes or dtypes differ from the expected model spec."""


class InvalidModelError(FedhiveError):
    """A model whose values or metadata cannot be used (NaN/Inf, bad sample count...)."""


class MessageError(FedhiveError):
    """An envelope or message body failed validation."""


class TransportError(FedhiveError):
    """The MQTT connection failed, was refused or was lost."""


class NotConnectedError(TransportError):
    """A transport was used before ``connect`` or after ``close``."""


class FedhiveTimeoutError(FedhiveError, TimeoutError):
    """A wait for a reply, a model or a state ran out of time."""


class RejectedError(FedhiveError):
    """The aggregator refused a submission; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AgentRejectedError(RejectedError):
    """The aggregator did not admit this agent: its ``max_agents`` limit was reached."""


class AggregatorInactiveError(RejectedError):
    """The aggregator was stopped by an admin (INACTIVE) and takes no models until restarted."""


class TrainingFinishedError(RejectedError):
    """The aggregator finished its ``max_rounds``: no further model will come or be taken."""


class StrategyError(FedhiveError):
    """An aggregation method cannot run on the models at hand (e.g. Krum with too few)."""


class BrokerError(FedhiveError):
    """Mosquitto could not be found, started, configured or reached."""
