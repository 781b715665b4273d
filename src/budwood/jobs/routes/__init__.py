"""OpenAI's fine-tuning API over HTTP: /v1/files (files.py) and /v1/fine_tuning/jobs (fine_tuning.py).

Each module has one module-level `router` of thin routes: read the request, call the surface's serving
object (from `app.state`, through deps.py), return its typed response. Refusals are budwood.errors
raised below; the app's one error handler (serve/errors.py) answers them in OpenAI's shape.
"""
