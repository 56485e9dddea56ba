"""Build a base model from the config's ``base_model`` block.

``model_fn_src`` names a module: either a file next to the config (``"vgg"`` → ``vgg.py``) or an
importable module path (``"examples.digits.model"``); ``model_fn`` is the callable in it, called
with ``model_fn_args``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from common.config import BaseModelSettings
from common.errors import ConfigError


def _load_module(src: str, config_dir: Path) -> ModuleType:
    candidate = Path(src if src.endswith(".py") else src + ".py")
    file = candidate if candidate.is_absolute() else config_dir / candidate
    if file.is_file():
        name = f"fedhive_user_model_{file.stem}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load model source {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(src)
    except ImportError as exc:
        raise ConfigError(
            f"model_fn_src {src!r}: no file {file} and no importable module ({exc})"
        ) from exc


def build_base_model(settings: BaseModelSettings, *, config_dir: Path) -> Any:
    """Call ``model_fn`` from ``model_fn_src`` with ``model_fn_args``."""
    if not settings.model_fn or not settings.model_fn_src:
        raise ConfigError("base_model needs model_fn and model_fn_src to build the model")
    module = _load_module(settings.model_fn_src, config_dir)
    fn = getattr(module, settings.model_fn, None)
    if not callable(fn):
        raise ConfigError(f"{settings.model_fn_src} has no callable {settings.model_fn!r}")
    return fn(**settings.model_fn_args)
