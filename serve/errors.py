"""The project's typed errors, re-exported for users of `serve` (`from serve.errors import ...`).

Defined in adapters_store.errors (shared by the store and the server); nothing is added here.
"""
from adapters_store.errors import (  # noqa: F401
    AdapterNotFoundError, CommitConflictError, CorruptAdapterError, InvalidAdapterError,
    InvalidAdapterNameError, OnlineLLMError, RevisionNotFoundError, StorePermissionError,
    StoreUnavailableError, UnsafeFileError, InvalidRequestError, PromptTooLongError,
    EngineStoppedError,
)

__all__ = [
    "AdapterNotFoundError", "CommitConflictError", "CorruptAdapterError", "InvalidAdapterError",
    "InvalidAdapterNameError", "OnlineLLMError", "RevisionNotFoundError", "StorePermissionError",
    "StoreUnavailableError", "UnsafeFileError", "InvalidRequestError", "PromptTooLongError",
    "EngineStoppedError",
]
