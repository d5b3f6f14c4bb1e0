"""Errors a user can fix. Each names the key or argument at fault, what it got and what was expected,
in the form `key: got X, expected Y`, and carries the key as `.key` for programs.

All are `ValueError`s, so code that already catches bad values catches these too.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key, argument or budget is wrong.

    Raised by `OffloadConfig` (an unknown key, a wrong type, a value out of range, a mode that is
    not available yet, an unreadable file), by `resolve_budgets` (a budget larger than the machine
    has) and by the planner and the cache (a KV cache that the budgets cannot hold).

    Args:
        key: the key or argument at fault, e.g. "cpu_kv_bytes", "config" (the file itself), "model".
        message: the whole message, starting with the key.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        # The default reduce would call cls(message) and lose the key: errors cross process pools.
        return (type(self), (self.key, str(self)))


class ModelPathError(ConfigError):
    """Raised when the model path is not a directory holding a Hugging Face model (no readable
    config.json); `key` is "model"."""


class UnsupportedModelError(ConfigError):
    """Raised when the model's architecture is not one hetero runs (see
    `hetero.SUPPORTED_MODEL_TYPES`); `key` is "model"."""


class PromptTooLongError(ConfigError):
    """Raised before generation when the prompt plus the tokens to generate exceed the model's
    context (`max_position_embeddings`); `key` names the argument to shorten."""
