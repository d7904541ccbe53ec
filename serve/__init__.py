"""online-llm serving package: `from serve import OnlineLLM, AsyncOnlineLLM` (shared/SEED_API.md).

Imports are lazy (module `__getattr__`), so `import serve` stays cheap: torch, transformers and Ray
load only when an API class, the engine or the Ray app is first used.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "OnlineLLM": "serve.api",
    "AsyncOnlineLLM": "serve.api",
    "errors": "serve.errors",
}
_ERROR_NAMES = (
    "AdapterNotFoundError", "CommitConflictError", "CorruptAdapterError", "InvalidAdapterError",
    "InvalidAdapterNameError", "OnlineLLMError", "RevisionNotFoundError", "StorePermissionError",
    "StoreUnavailableError", "UnsafeFileError",
)
_LAZY.update({name: "serve.errors" for name in _ERROR_NAMES})

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'serve' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if name == "errors" else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
