"""A from-scratch Llama 2 / Llama 3 inference engine. Start reading at `llama/model.py`."""

from llama.api import Llama
from llama.config import ConfigError, ModelConfig, RopeConfig
from llama.generate import GenerationResult
from llama.model import Transformer
from llama.weights import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "GenerationResult", "Llama", "ModelConfig", "RopeConfig", "Transformer",
]
