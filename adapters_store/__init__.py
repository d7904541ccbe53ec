"""adapters_store: versioned, immutable, PEFT-format LoRA adapter revisions over fsspec.

Knows nothing about Ray, GPUs or the serving engine; see store.py for the store itself.
"""
from adapters_store.errors import (  # noqa: F401
    AdapterNotFoundError, CommitConflictError, CorruptAdapterError, InvalidAdapterError,
    InvalidAdapterNameError, OnlineLLMError, RevisionNotFoundError, StorePermissionError,
    StoreUnavailableError, UnsafeFileError,
)
from adapters_store.names import parse_ref, validate_name  # noqa: F401
from adapters_store.store import AdapterRevision, AdapterStore, open_store  # noqa: F401
