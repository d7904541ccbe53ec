"""Errors the engine raises about requests and its own state; they subclass the project's hierarchy
(adapters_store.errors) and the built-in they resemble, so callers can catch either.
"""
from __future__ import annotations

from adapters_store.errors import OnlineLLMError


class InvalidRequestError(OnlineLLMError, ValueError):
    """Bad generation or learn input: sampling values, data shapes, roles, steps/lr out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (or a training example) does not fit in the model's context."""


class EngineStoppedError(OnlineLLMError, RuntimeError):
    """The engine was shut down, or its scheduler thread died; requests cannot run."""
