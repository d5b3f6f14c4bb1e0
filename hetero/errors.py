"""Errors a user can fix: each names the key or argument, what it got and what was expected."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key, argument or budget is wrong; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class ModelPathError(ConfigError):
    """The model path is not a directory holding a Hugging Face model."""


class UnsupportedModelError(ConfigError):
    """The model's architecture is not one hetero runs (see `hetero.SUPPORTED_MODEL_TYPES`)."""


class PromptTooLongError(ConfigError):
    """The prompt plus the tokens to generate exceed the model's context."""
