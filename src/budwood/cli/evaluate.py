"""`budwood eval / eval compare / eval schema`: measuring a model, an adapter or an endpoint."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from budwood.cli.console import EvalProgress, out, print_comparison
from budwood.errors import BudwoodError

app = typer.Typer(help="Evaluate a model, an adapter or an endpoint; compare results.")
calibrate_app = typer.Typer()  # `budwood calibrate`, a root command


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
    suite: str = typer.Option(None, help="comma-separated: domain, grounding, truthfulqa, reproducibility, bias, "
                                         "tools (default: domain,grounding,reproducibility)"),
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


@calibrate_app.command("calibrate")
def calibrate_cmd(
    adapter: Path = typer.Argument(..., help="adapter directory"),
    base: str = typer.Option(None, help="base model (default: the one the adapter names)"),
    data: Path = typer.Option(None, help="held-out chat JSONL (default: the adapter's validation split)"),
    score: str = typer.Option(None, help="mean_logprob | min_logprob | agreement (default: the adapter's training "
                                         "setting, else min_logprob)"),
    target_precision: float = typer.Option(None, help="share of kept answers that must be right (default 0.9)"),
    samples: int = typer.Option(None, help="seeded samples per answer, score agreement (default 5)"),
    abstention: str = typer.Option(None, help="what to answer instead (default: the abstention recipe's answer)"),
    default: bool = typer.Option(False, "--default/--no-default",
                                 help="budwood serve applies it to requests that leave calibrated_abstention unset "
                                      "(else only to requests that ask for it)"),
    precision: str = typer.Option("fp32", help="fp32 (repeatable), bf16 or auto"),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
) -> None:
    """Fit the confidence threshold below which the adapter abstains, on held-out data: calibration.json.

    Examples: budwood calibrate runs/demo/adapter --target-precision 0.9
              budwood calibrate my-adapter --data held_out.jsonl --score min_logprob
    """
    from pydantic import ValidationError

    from budwood.artifacts import AdapterDir
    from budwood.config import AbstentionConfig, CalibrationConfig
    from budwood.eval.calibration import calibrate, read_calibration

    folder = AdapterDir.open(adapter)
    trained = folder.provenance.get("config", {}).get("reliability", {})
    given = {k: v for k, v in (("score", score), ("target_precision", target_precision), ("samples", samples))
             if v is not None}
    try:
        settings = CalibrationConfig.model_validate({**trained.get("calibration", {}), **given, "enabled": True})
    except ValidationError as e:
        first = e.errors()[0]
        name = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "option"
        raise BudwoodError(f"{name}: {first['msg']}") from None
    text = abstention or trained.get("abstention", {}).get("answer") or AbstentionConfig().answer
    with EvalProgress() as progress:
        path = calibrate(folder.path, base or folder.base_model, settings, text, data, default=default,
                         precision=precision, device=device, progress=progress)
    _print_calibration(read_calibration(folder.path), path)


def _print_calibration(cal, path: Path) -> None:
    table = Table(title=f"calibration ({cal.score}, {cal.n} held-out questions)")
    for col in ("", "value", "95% interval"):
        table.add_column(col)
    for name, m in (("precision", cal.precision), ("coverage", cal.coverage)):
        table.add_row(name, "n/a" if m.value is None else f"{m.value:.3f}",
                      f"[{m.ci[0]:.3f}, {m.ci[1]:.3f}]" if m.ci else "")
    table.add_row("threshold", f"{cal.threshold:.4g}", f"target precision {cal.target_precision}")
    out.print(table)
    if cal.warning:
        out.print(f"[yellow]warning:[/] {cal.warning}")
    out.print(f"calibration: {path}")
