"""fedhive: federated learning over MQTT 5.

The public API follows STADLE's, so code written for it ports with an import change::

    from fedhive import BasicClient, AdminAgent, BaseModel, BaseModelConvFormat
"""

from __future__ import annotations

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient
from agent.control import ControlClient
from agent.integrated import IntegratedClient
from common.config import AgentConfig, AggregatorConfig
from common.errors import (
    AgentRejectedError,
    AggregatorInactiveError,
    ConfigError,
    FedhiveError,
    FedhiveTimeoutError,
    RejectedError,
    TrainingFinishedError,
    TransportError,
)

__all__ = [
    "AdminAgent",
    "AgentConfig",
    "AgentRejectedError",
    "AggregatorConfig",
    "AggregatorInactiveError",
    "BaseModel",
    "BaseModelConvFormat",
    "BasicClient",
    "ConfigError",
    "ControlClient",
    "FedhiveError",
    "FedhiveTimeoutError",
    "IntegratedClient",
    "RejectedError",
    "TrainingFinishedError",
    "TransportError",
]
