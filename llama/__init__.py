"""A from-scratch Llama 2 / Llama 3 inference engine. Start reading at `llama/model.py`."""

import importlib
from typing import TYPE_CHECKING

# Each public name is imported on first use (PEP 562), so that `import llama.cli` or `llama.hub` does not import
# torch: `llama --help` and `llama download` answer in a fraction of a second instead of ~1.5 s.
_HOMES = {
    "CheckpointError": "llama.weights", "ConfigError": "llama.config", "GenerationResult": "llama.generate",
    "Llama": "llama.api", "ModelConfig": "llama.config", "RopeConfig": "llama.config", "Transformer": "llama.model",
}
__all__ = [
    "CheckpointError", "ConfigError", "GenerationResult", "Llama", "ModelConfig", "RopeConfig", "Transformer",
]

if TYPE_CHECKING:
    from llama.api import Llama
    from llama.config import ConfigError, ModelConfig, RopeConfig
    from llama.generate import GenerationResult
    from llama.model import Transformer
    from llama.weights import CheckpointError


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'llama' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
