"""`budwood merge / compose`: combining adapters. Each body calls one library function."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from budwood.cli.console import console, out
from budwood.cli.registry import RegistryOption
from budwood.errors import BudwoodError

app = typer.Typer()


def _weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise BudwoodError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.5,0.5") from None
    if len(values) != n:
        raise BudwoodError(f"--weights gives {len(values)} number(s) for {n} adapter(s)")
    return values


def _lineage(result) -> Table:
    table = Table("parent", "weight", "rank", "adapter fingerprint")
    for parent, weight in zip(result.parents, result.weights, strict=True):
        table.add_row(parent.source, f"{weight:g}", str(parent.rank), parent.fingerprint[:12])
    return table


@app.command("merge")
def merge_cmd(
    adapters: list[str] = typer.Argument(..., help="adapter folders or registry ids ORG/NAME[@VERSION], one base"),
    out_dir: Path = typer.Option(..., "--out", help="the merged adapter directory (new or empty)"),
    method: str = typer.Option("cat", help="cat (exact), linear (exact, SVD factors), svd (truncated), ties, "
                                           "dare_linear, dare_ties (docs/merge.md)"),
    weights: str = typer.Option(None, help="one weight per adapter, e.g. 0.5,0.5 (default 1 each)"),
    rank: int = typer.Option(None, help="rank of the merged adapter (linear, svd, ties, dare_*)"),
    density: float = typer.Option(None, help="share of each delta's entries kept (ties, dare_*), e.g. 0.5"),
    seed: int = typer.Option(0, help="seed of DARE's random drops"),
    into_base: Path = typer.Option(None, "--into-base", help="also write the base with the merge added into its "
                                                             "weights, in Hugging Face format"),
    registry: str = RegistryOption,
    accept_license: bool = typer.Option(False, "--accept-license", help="accept the terms of registry adapters"),
) -> None:
    """Merge adapters on one base into one adapter directory (its budwood.json records the lineage).

    Example: budwood merge runs/a runs/b --method cat --weights 1,1 --out runs/ab
    Example: budwood merge acme/support@1.0.0 acme/billing@1.2.0 --method svd --rank 16 --out runs/both
    """
    from budwood.merge.merge import check_new_folder, merge_adapters, merge_into_base
    from budwood.registry import open_registry

    if into_base is not None:
        check_new_folder(into_base, "--into-base folder")  # before anything is written
    reg = open_registry(registry) if registry else None
    result = merge_adapters(adapters, out_dir, _weights(weights, len(adapters)), method, rank, density, seed,
                            reg, accept_license)
    out.print(_lineage(result))
    exact = "exact" if result.exact else \
        f"relative error {result.mean_error:.4f} mean, {result.max_error:.4f} worst layer"
    out.print(f"merged ({result.method}, rank {result.rank}, {exact}): {result.path}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    if into_base is not None:
        out.print(f"full model: {merge_into_base(result.path, into_base)}")


@app.command("compose")
def compose_cmd(
    adapters: list[str] = typer.Argument(..., help="adapter folders or registry ids on one base"),
    examples: Path = typer.Option(..., help="a few examples of the task, JSONL in any training format"),
    out_dir: Path = typer.Option(..., "--out", help="the composed adapter directory (a cat merge)"),
    steps: int = typer.Option(40, help="evaluations of the few-shot loss the search may spend"),
    l1: float = typer.Option(0.05, help="L1 penalty on the weights (LoraHub's 0.05)"),
    bound: float = typer.Option(1.5, help="each weight stays within [-bound, bound]"),
    seed: int = typer.Option(0),
    registry: str = RegistryOption,
    accept_license: bool = typer.Option(False, "--accept-license", help="accept the terms of registry adapters"),
) -> None:
    """Learn one weight per adapter from a few examples (LoraHub's gradient-free search), then merge with them.

    Example: budwood compose runs/a runs/b runs/c --examples few.jsonl --out runs/composed
    """
    from budwood.merge.compose import compose
    from budwood.registry import open_registry

    with console.status(f"searching weights ({steps} evaluations of the few-shot loss)"):
        result = compose(adapters, examples, out_dir, steps, l1, bound, seed=seed,
                         registry=open_registry(registry) if registry else None, accept_license=accept_license)
    out.print(_lineage(result.merged))
    out.print(f"few-shot loss: base {result.loss_base:.4f}, starting weights {result.loss_initial:.4f}, "
              f"found {result.loss_final:.4f}")
    out.print(f"composed: {result.merged.path}")
