"""hetero: long-context generation on one GPU with the KV cache across GPU, host memory and NVMe.

    import hetero
    model = hetero.load("path/to/model", config="offload.toml")
    out = model.generate(input_ids, max_new_tokens=256)
"""

from .api import SUPPORTED_MODEL_TYPES, generate, load, prepare
from .cache import CacheCapacityError, HeteroCache
from .config import OffloadConfig
from .errors import ConfigError, ModelPathError, PromptTooLongError, UnsupportedModelError
from .stats import GenerationStats

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CacheCapacityError",
    "ConfigError",
    "GenerationStats",
    "HeteroCache",
    "ModelPathError",
    "OffloadConfig",
    "PromptTooLongError",
    "UnsupportedModelError",
    "generate",
    "load",
    "prepare",
]
