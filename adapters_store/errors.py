"""The project's exception hierarchy: one base, subclasses that also inherit the built-in they resemble.

Shared by `adapters_store` and `serve` (serve re-exports it); HTTP status codes are assigned only in
the ingress, never here.
"""
from __future__ import annotations


class OnlineLLMError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidAdapterNameError(OnlineLLMError, ValueError):
    """An adapter name (or name@rev reference) that does not match the allowed pattern."""


class AdapterNotFoundError(OnlineLLMError, KeyError):
    """The adapter does not exist where it was looked up."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep messages readable
        return str(self.args[0]) if self.args else "adapter not found"


class RevisionNotFoundError(AdapterNotFoundError):
    """The adapter exists, the requested revision does not."""


class InvalidAdapterError(OnlineLLMError, ValueError):
    """Adapter content or config that is well-formed bytes but not an acceptable adapter
    (rank out of range, unknown target module, shape mismatch, NaN/Inf, ...)."""

    def __init__(self, message: str, *, adapter: str | None = None, revision: str | None = None,
                 file: str | None = None):
        super().__init__(message)
        self.adapter, self.revision, self.file = adapter, revision, file


class CorruptAdapterError(InvalidAdapterError):
    """Stored bytes that fail their checksum or cannot be parsed (truncated, bit-flipped, bad header)."""


class CommitConflictError(OnlineLLMError, RuntimeError):
    """A commit whose expected parent is no longer the latest revision (another writer won)."""


class StoreUnavailableError(OnlineLLMError, ConnectionError):
    """The store cannot be reached or answered with a server error; retrying later may work."""


class StorePermissionError(OnlineLLMError, PermissionError):
    """The store refuses the operation (read-only directory, denied credentials)."""


class UnsafeFileError(OnlineLLMError, ValueError):
    """A file that would need code execution to load (a pickle that is not plain tensors)."""


class InvalidRequestError(OnlineLLMError, ValueError):
    """Bad generation or learn input: sampling values, data shapes, roles, steps/lr out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (or a training example) does not fit in the model's context."""


class EngineStoppedError(OnlineLLMError, RuntimeError):
    """The engine was shut down, or its scheduler thread died; requests cannot run."""
