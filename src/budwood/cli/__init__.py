"""The `budwood` command: a thin shell over the library; each command's docstring is its --help.

One module per family of commands (train, evaluate, registry, merge, serve, service), each with its own
Typer app, merged here into the root; errors are reported in one place (boundary.py)."""
from __future__ import annotations

import typer

from budwood.cli import evaluate, merge, registry, serve, service, train
from budwood.cli.boundary import BoundaryGroup

app = typer.Typer(cls=BoundaryGroup, add_completion=False, no_args_is_help=True,
                  help="Grow, prove, document, trade and serve LoRA adapters on open models.")
app.add_typer(train.app)
app.add_typer(train.data_app, name="data")
app.add_typer(train.config_app, name="config")
app.add_typer(evaluate.app, name="eval")
app.add_typer(evaluate.calibrate_app)
app.add_typer(registry.app)
app.add_typer(registry.keys_app, name="keys")
app.add_typer(merge.app)
app.add_typer(serve.app)
app.add_typer(service.app)
app.add_typer(service.tenants_app, name="tenants")


def main() -> None:
    """Console-script entry: under tcmalloc where installed (see budwood.allocator)."""
    from budwood.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc()
    app(prog_name="budwood")
