"""One inference engine for serving and evaluation: see engine.py for the contract.

Callers outside the engine import from here (and from `sampling`, `adapters` and `grammar` for their
own names, and `tools` for tool calls); the other modules are the engine's parts."""
from budwood.engine.adapters import AdapterCache, AdapterError, AdapterResolver, FolderResolver, UnknownAdapter
from budwood.engine.async_engine import AsyncEngine, EngineFailed, QueueFull
from budwood.engine.chat_template import TemplateBudget, TemplateBudgetExceeded
from budwood.engine.engine import ContinuationScore, Engine, EngineConfig, RequestTooLong, ToolsUnsupported
from budwood.engine.output import ChoiceDelta, FinishReason, RequestOutput, merge_outputs
from budwood.engine.sampling import ParamError, SamplingParams, TokenLogprob

__all__ = ["AdapterCache", "AdapterError", "AdapterResolver", "AsyncEngine", "ChoiceDelta", "ContinuationScore",
           "Engine", "EngineConfig", "EngineFailed", "FinishReason", "FolderResolver", "ParamError", "QueueFull",
           "RequestOutput", "RequestTooLong", "SamplingParams", "TemplateBudget",
           "TemplateBudgetExceeded", "TokenLogprob", "ToolsUnsupported", "UnknownAdapter", "merge_outputs"]
