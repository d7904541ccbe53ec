"""adapters_store: versioned, immutable, PEFT-format LoRA adapter revisions over fsspec.

Knows nothing about Ray, GPUs or the serving engine; see store.py for the store itself.
"""
from adapters_store.errors import (  # noqa: F401
    AdapterNotFoundError, CommitConflictError, CorruptAdapterError, InvalidAdapterError,
    InvalidAdapterNameError, OnlineLLMError, RevisionNotFoundError, StorePermissionError,
    StoreUnavailableError, UnsafeFileError,
)
