"""The CLI's one error boundary: a `BudwoodError` raised anywhere below a command is printed as one red
line (no traceback) and exits 2; commands never catch it themselves. Internal bugs still show their
traceback, since they are ours to fix."""
from __future__ import annotations

import typer
from rich.markup import escape
from typer.core import TyperGroup

from budwood.errors import BudwoodError

EXIT_BAD_INPUT = 2


class BoundaryGroup(TyperGroup):
    """The root command group: every subcommand and nested group runs inside its `invoke`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BudwoodError as e:
            from budwood.cli.console import console

            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
