"""serve.engine: the in-process engine every worker runs (frozen base model, mixed-adapter batched
generation, online learning). See docs/INTERFACES.md for the contract; no Ray, no HTTP here.
"""
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.engine.errors import EngineStoppedError, InvalidRequestError, PromptTooLongError
from serve.engine.types import GenerationResult, LearnReport

__all__ = ["Engine", "EngineConfig", "GenerationResult", "LearnReport", "InvalidRequestError",
           "PromptTooLongError", "EngineStoppedError"]
