"""decoupled: pipeline-parallel training without end-to-end backprop."""

from __future__ import annotations

from .compare import compare
from .config import Config, ConfigError, build_config, load_config
from .train import resume, train

__all__ = ["Config", "ConfigError", "build_config", "compare", "load_config", "resume", "train"]
__version__ = "0.1.0"
