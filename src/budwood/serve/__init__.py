"""The OpenAI-compatible server: `create_app` builds it, `serve` runs it under uvicorn."""
from budwood.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
