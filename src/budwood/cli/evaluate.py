"""`budwood eval / eval compare / eval schema`: measuring a model, an adapter or an endpoint."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from budwood.cli.console import EvalProgress, out, print_comparison
from budwood.errors import BudwoodError

app = typer.Typer(help="Evaluate a model, an adapter or an endpoint; compare results.")


def _print_results_table(results, title: str) -> None:
    from budwood.eval.results import summary_rows

    table = Table(title=title)
    for col, just in (("suite", "left"), ("metric", "left"), ("value", "right"), ("95% interval", "left")):
        table.add_column(col, justify=just, no_wrap=col != "95% interval", overflow="fold")
    for row in summary_rows(results):
        table.add_row(*row)
    out.print(table)


@app.callback(invoke_without_command=True)
def eval_cmd(
    ctx: typer.Context,
    target: str = typer.Option(None, help="budwood-tiny | MODEL_PATH | BASE+ADAPTER_DIR | openai:BASE_URL#MODEL"),
    suite: str = typer.Option(None, help="comma-separated: domain, grounding, truthfulqa, reproducibility, bias "
                                         "(default: domain,grounding,reproducibility)"),
    out_path: Path = typer.Option(None, "--out", help="results JSON (default: eval-results.json)"),
    config: Path = typer.Option(None, help="YAML eval config (any EvalConfig field)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set grounding.data=q.jsonl"),
    limit: int = typer.Option(None, min=1, help="examples per suite, for a quick look"),
    records: bool = typer.Option(False, "--records", help="keep per-example records in the results"),
    precision: str = typer.Option(None, help="fp32 (default: repeatable), bf16 or auto (local targets)"),
    device: str = typer.Option(None, help="auto, cpu, cuda ... (local targets)"),
    api_key_env: str = typer.Option(None, help="environment variable with a remote target's key "
                                                "(default OPENAI_API_KEY)"),
) -> None:
    """Run evaluation suites on a target and write a results JSON.

    Examples: budwood eval --target budwood-tiny+runs/demo/adapter --suite grounding,domain
              budwood eval --target openai:http://127.0.0.1:8000/v1#my-adapter --suite grounding
              budwood eval compare base.json adapted.json
    """
    if ctx.invoked_subcommand is not None:
        return
    from budwood.eval.results import write_results
    from budwood.eval.run import load_eval_config, run_eval

    given = {"target": target, "limit": limit, "precision": precision, "device": device, "api_key_env": api_key_env}
    options = {k: v for k, v in given.items() if v is not None}
    if suite:
        options["suites"] = [s.strip() for s in suite.split(",") if s.strip()]
    if records:
        options["records"] = True
    if config is None and target is None:
        raise BudwoodError("--target is required (or a --config that names one)")
    labels = {key: "--suite" if key == "suites" else "--" + key.replace("_", "-") for key in options}
    cfg = load_eval_config(config, options, set_, labels)
    with EvalProgress() as progress:
        results = run_eval(cfg, progress)
    path = write_results(results, out_path or Path("eval-results.json"))
    _print_results_table(results, f"{cfg.target}")
    out.print(f"results: {path}  ({results.seconds:.0f} s)")


@app.command("compare")
def eval_compare_cmd(
    a: Path = typer.Argument(..., help="results JSON (the reference)"),
    b: Path = typer.Argument(..., help="results JSON (compared with A)"),
    plot: Path = typer.Option(None, help="plot file (default: B's name with -compare.png)"),
) -> None:
    """Table of metric deltas (B - A); * marks a change outside both 95% intervals."""
    from budwood.eval.results import compare, load_results, plot_comparison

    ra, rb = load_results(a), load_results(b)
    rows = compare(ra, rb)
    if not rows:
        raise BudwoodError(f"{a} and {b} share no metric")
    label_a, label_b = ra.target.spec, rb.target.spec
    print_comparison(rows, label_a, label_b)
    path = plot_comparison(rows, (label_a, label_b), plot or b.with_name(b.stem + "-compare.png"))
    out.print(f"plot: {path}")



@app.command("schema")
def eval_schema_cmd() -> None:
    """Print the results file's JSON Schema."""
    import json

    from budwood.eval.results import json_schema

    out.print_json(json.dumps(json_schema()))

