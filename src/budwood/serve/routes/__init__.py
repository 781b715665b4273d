"""The HTTP routes, one module-level router per endpoint family; `create_app` includes them.

Each route is thin: FastAPI gives it its parsed body, its caller (`CallerDep`) and its surface's
serving object (`ServingDep`, or the registry), and it calls one method.
"""
from budwood.serve.routes import adapters, chat, completions, health, models, tokens

OPENAI_ROUTERS = [health.router, models.router, chat.router, completions.router, adapters.router, tokens.router]

__all__ = ["OPENAI_ROUTERS"]
