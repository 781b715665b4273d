"""The OpenAI-compatible server: `create_app` builds it, `serve` runs it under uvicorn.

For routes other packages add (`create_app(..., routers=[...])`): `CallerDep` (or `caller_of`) names
the caller, `operator_only` refuses tenants, and any `BudwoodError` a route raises is answered with
its kind's status and OpenAI's error object (serve/errors.py).
"""
from budwood.serve.app import create_app, serve, serving
from budwood.serve.auth import Caller, CallerDep, caller_of, operator_only
from budwood.serve.errors import install_error_handlers
from budwood.serve.protocol import APIError
from budwood.serve.serving import OpenAIServing, ServingDep, get_serving

__all__ = ["APIError", "Caller", "CallerDep", "OpenAIServing", "ServingDep", "caller_of",
           "create_app", "get_serving", "install_error_handlers", "operator_only", "serve", "serving"]
