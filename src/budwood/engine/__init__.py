"""One inference engine for serving and evaluation: see engine.py for the contract."""
from budwood.engine.adapters import AdapterCache, AdapterError, AdapterResolver, FolderResolver, UnknownAdapter
from budwood.engine.engine import AsyncEngine, ContinuationScore, Engine, EngineConfig, QueueFull, RequestOutput
from budwood.engine.sampling import ParamError, SamplingParams

__all__ = ["AdapterCache", "AdapterError", "AdapterResolver", "AsyncEngine", "ContinuationScore", "Engine",
           "EngineConfig", "FolderResolver", "ParamError", "QueueFull", "RequestOutput", "SamplingParams",
           "UnknownAdapter"]
