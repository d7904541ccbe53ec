"""Errors the engine raises about requests and its own state. They are defined with the rest of the
project's hierarchy in adapters_store.errors (so `serve.errors` can re-export them without importing
torch) and re-exported here for the engine's modules.
"""
from adapters_store.errors import EngineStoppedError, InvalidRequestError, PromptTooLongError  # noqa: F401
