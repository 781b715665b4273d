"""`budwood train / generate / data check / demo`: growing an adapter, looking at it, checking data first."""
from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from budwood.cli.console import EvalProgress, RichProgress, console, out, sigterm_as_interrupt

app = typer.Typer()
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data.")
config_app = typer.Typer(no_args_is_help=True, help="Read training configs, budwood's or Axolotl's or LLaMA-Factory's.")



@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config: budwood's (see configs/), Axolotl's or LLaMA-Factory's"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set training.max_steps=20"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in output_dir"),
) -> None:
    """Train a LoRA adapter.

    An Axolotl or LLaMA-Factory config is read as budwood's own (how each key was read is printed; `budwood
    config convert` writes the result); --set uses budwood's key names.

    Example: budwood train configs/tiny_company.yaml --set training.max_steps=50
    """
    from budwood.interop import load_train_config
    from budwood.pipeline import train_adapter
    from budwood.train.recipe import StopReason, TrainingInterrupted

    sigterm_as_interrupt()
    cfg, converted = load_train_config(config, set_)
    if converted is not None and os.environ.get("RANK", "0") == "0":
        console.print(f"[bold]{escape(str(config))}[/]: read as {converted.dialect.value} config")
        for note in converted.notes:
            console.print(f"  [dim]{escape(note)}[/]")
    with RichProgress() as progress:
        try:
            adapter_dir = train_adapter(cfg, f"budwood train: {cfg.output_dir}", progress, resume=resume)
        except TrainingInterrupted as e:
            console.print(f"[yellow]{escape(str(e))}[/]")
            raise typer.Exit(1 if e.reason is StopReason.LOSS_WATCHDOG else 130) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        out.print(f"adapter: {adapter_dir}")


@config_app.command("convert")
def config_convert_cmd(
    config: Path = typer.Argument(..., help="an Axolotl or LLaMA-Factory YAML config"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write budwood's config here (default: print)"),
    set_: list[str] = typer.Option([], "--set", help="change a key of the result, in budwood's names"),
) -> None:
    """Write an Axolotl or LLaMA-Factory config as budwood's own, with how each key was read as comments.

    Every key is mapped, noted (honoured with no effect on the result) or refused with what to do instead.

    Example: budwood config convert examples/llama-3/lora-1b.yml -o lora-1b.budwood.yaml
    """
    from budwood.errors import ConfigError
    from budwood.interop import convert, to_yaml

    converted = convert(config)
    if converted.dialect is None:
        raise ConfigError(f"{config}: this is budwood's own config already (it has a data: section)")
    text = to_yaml(converted, set_)
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    out.print(f"wrote {output} (budwood train {output})", markup=False)


@app.command("generate")
def generate_cmd(
    prompt: list[str] = typer.Argument(..., help="one or more user prompts"),
    base: str = typer.Option("budwood-tiny", help="base model: budwood-tiny, a folder or a hub id"),
    adapter: Path | None = typer.Option(None, help="adapter directory"),
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    system: str | None = typer.Option(None, help="system message"),
    quantization: str | None = typer.Option(None, "--quantization", "-q", help="the base's weights: none, nf4 or "
                                            "int8; default: as the adapter was trained (its budwood.json)"),
) -> None:
    """Answer prompts with a base model, optionally with an adapter.

    Example: budwood generate --adapter runs/demo/adapter "What is the return policy?"
    """
    from budwood.engine import Engine, EngineConfig, SamplingParams
    from budwood.models.quant import adapter_quantization

    quant = quantization or (adapter_quantization(adapter) if adapter is not None else "none")
    engine = Engine(EngineConfig(base=base, precision="fp32", kv_cache_tokens=4096, quantization=quant))
    name = None
    if adapter is not None:
        name = "adapter"
        engine.register_adapter(name, adapter)
    prompts = [engine.chat_prompt(([{"role": "system", "content": system}] if system else []) +
                                  [{"role": "user", "content": p}]) for p in prompt]
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed),
                           [name] * len(prompts))
    for o in outs:
        out.print(o.choices[0].text.strip(), markup=False, highlight=False)


@data_app.command("check")
def data_check_cmd(
    file: Path = typer.Argument(..., help="JSONL training data"),
    format: str = typer.Option("auto", help="auto, openai, prompt_completion, alpaca, sharegpt, openai_preference, "
                               "trl_preference"),
    base: str = typer.Option("budwood-tiny", help="whose tokenizer counts the tokens"),
    max_seq_len: int = typer.Option(1024, help="longer examples would be truncated"),
    min_examples: int = typer.Option(10, help="fewer valid examples is an error (OpenAI asks for 10)"),
) -> None:
    """Validate a data file (chat data for SFT, or preference pairs for DPO): every problem as
    file:line: code: message, then token statistics.

    Exits 1 if there are errors. Example: budwood data check train.jsonl
    """
    from budwood.data.formats import read_dataset
    from budwood.data.stats import token_stats, tool_stats
    from budwood.errors import DataError
    from budwood.models.load import load_tokenizer

    ds = read_dataset(file, format, min_examples, raise_errors=False)
    refused = None
    try:
        stats = token_stats(ds.examples, load_tokenizer(base), max_seq_len, ds.issues) if ds.examples else None
    except DataError as e:  # e.g. a chat template without tool support: still show every issue of the file
        stats, refused = None, e
    unit = "preference pairs (for training.method dpo)" if ds.kind == "preference" else "examples"
    for issue in ds.issues:
        color = "red" if issue.level == "error" else "yellow"
        out.print(f"[{color}]{escape(str(issue))}[/]", highlight=False, soft_wrap=True)
    errors, warnings = len(ds.errors), len(ds.issues) - len(ds.errors)
    out.print(f"{file}: format {ds.format}, {len(ds.examples)} valid {unit}, "
              f"{errors} error(s), {warnings} warning(s)", highlight=False, soft_wrap=True)
    tools = tool_stats(ds.examples)
    if tools.with_tools or tools.calls or tools.results:
        out.print(f"tool use: {tools.with_tools} example(s) declare tools, {tools.with_calls} call them "
                  f"({tools.calls} call(s) of {tools.functions} function(s), {tools.results} tool result(s))",
                  highlight=False, soft_wrap=True)
    if refused is not None:
        out.print(f"[red]{escape(str(refused))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if stats:
        t = Table(title=f"tokens ({base} tokenizer)")
        t.add_column("statistic")
        t.add_column("value", justify="right")
        pairs = ds.kind == "preference"
        for name, value in [("pairs" if pairs else "examples", stats.examples),
                            ("tokens per epoch" + (" (both answers)" if pairs else ""), stats.total_tokens),
                            ("answer tokens (both sides)" if pairs else "trained (assistant) tokens",
                             stats.trained_tokens),
                            ("length min / median / p95 / max",
                             f"{stats.min_len} / {stats.median_len} / {stats.p95_len} / {stats.max_len}"),
                            (f"truncated at {max_seq_len}", stats.truncated)]:
            t.add_row(name, str(value))
        out.print(t)
        top = max(c for _, _, c in stats.histogram)
        for lo, hi, c in stats.histogram:
            out.print(f"{lo:>6}-{hi:<6} {'█' * max(1, round(30 * c / top))} {c}", highlight=False)
    if errors:
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("runs/demo"), help="where data, adapters and plot go"),
    set_: list[str] = typer.Option([], "--set", help="override a training key of both adapters, e.g. "
                                   "training.epochs=5; reliability.* keys go to the reliable adapter only"),
    eval_set: list[str] = typer.Option([], "--eval-set", help="override an evaluation setting of every side, "
                                       "e.g. limit=10 for a quick look (as budwood eval --set)"),
    tools: bool = typer.Option(True, "--tools/--no-tools", help="also grow a tool-calling adapter on the company's "
                               "order_status, request_refund and product_stock functions, and measure it with the "
                               "tools suite"),
    tool_steps: int = typer.Option(120, min=1, help="training steps of the tool-calling adapter"),
) -> None:
    """The end-to-end demo, offline: data -> a plain and a reliable adapter -> base, plain and reliable
    evaluated side by side -> card -> signed -> published -> served; then a tool-calling adapter, measured
    against the base by the tools suite and asked through the openai client with tools.

    Example: budwood demo --workdir runs/demo
    """
    from budwood.pipeline import run_demo, run_tool_demo

    sigterm_as_interrupt()
    t0 = time.time()
    with RichProgress() as progress, EvalProgress() as eval_progress:
        result = run_demo(workdir, set_, progress, eval_progress=eval_progress, eval_overrides=eval_set)
    tool_demo = None
    if tools:
        with RichProgress() as progress, EvalProgress() as eval_progress:
            tool_demo = run_tool_demo(workdir, tool_steps, set_, progress, eval_progress, eval_set)
    table = Table(title="held-out questions: base budwood-tiny, plain SFT and the reliable adapter", show_lines=True)
    for col in ("question", "reference", "base", "plain SFT", "reliable"):
        table.add_column(col, overflow="fold")
    for r in result.rows:
        table.add_row(r["question"], r["reference"] or "(not in the data: should abstain)", r["base"], r["plain"],
                      r["reliable"])
    out.print(table)
    for name, adapter in (("plain SFT", result.plain_dir), ("reliable ", result.adapter_dir)):
        out.print(_loss_line(name, adapter), highlight=False, soft_wrap=True)
    _print_sides(result.table)
    _print_shared(result)
    p = result.provenance
    out.print(f"adapter:    {result.adapter_dir}  ({p['steps']} steps, {p['tokens_seen']:,} tokens, "
              f"{p['train_time_s'] + result.plain_provenance['train_time_s']:.0f} s training both)", soft_wrap=True)
    if tool_demo is not None:
        _print_tool_demo(tool_demo)
    out.print(f"demo done in {time.time() - t0:.0f} s", soft_wrap=True)


def _print_tool_demo(demo) -> None:
    """The tools suite's metrics for the base and the tool adapter, and one served request with its calls."""
    table = Table(title=f"tool calling: the tools suite on held-out requests, base vs the tool adapter "
                        f"({demo.steps} steps), with 95% intervals (* where they do not overlap)")
    table.add_column("metric", no_wrap=True)
    for col in ("base", "tool adapter"):
        table.add_column(col, justify="right")
    for r in demo.table:
        table.add_row(f"  {r['metric']}", _with_interval(r["base"]),
                      _with_interval(r["adapted"]) + (" *" if r["significant"] else ""))
    out.print(table)
    calls = demo.served.get("tool_calls") or []
    said = "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls) or \
        f"no call, text: {demo.served.get('content')!r}"
    want = "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in demo.reference)
    out.print(f"tools:      {demo.adapter_dir}  card: {demo.card}\n"
              f"served:     {demo.adapter_dir.name} with tools, through the openai client (tool_choice auto):\n"
              f"  Q: {demo.messages[-1]['content']}\n  calls: {said}\n  (the data's: {want})",
              soft_wrap=True, highlight=False, markup=False)


def _loss_line(name: str, adapter: Path) -> str:
    from budwood.train.metrics import read_metrics, sparkline

    losses = [m["loss"] for m in read_metrics(adapter / "metrics.jsonl") if "loss" in m]
    val = [m["val_loss"] for m in read_metrics(adapter / "metrics.jsonl") if "val_loss" in m]
    return f"loss {name}  {losses[0]:.2f} {sparkline(losses)} {losses[-1]:.2f}" + \
        (f"   (val {val[-1]:.2f})" if val else "")


def _print_sides(rows: list[dict]) -> None:
    """The demo's three columns, each value with its 95% interval, a section per suite; * where reliable and
    plain differ beyond both intervals (green where that is better, red where worse)."""
    table = Table(title="the same suites on the same data, with 95% intervals\n(vs plain: reliable - plain; * where "
                        "they differ beyond both intervals)")
    table.add_column("metric", no_wrap=True)
    for col in ("base", "plain SFT", "reliable", "vs plain"):
        table.add_column(col, justify="right")
    suite = None
    for r in rows:
        if r["suite"] != suite:
            suite = r["suite"]
            table.add_row(f"[bold]{suite}[/]", end_section=False)
        plain, mine = r["plain"], r["reliable"]
        delta = "" if plain is None or plain.value is None else f"{mine.value - plain.value:+.2f}"
        better = r["higher_is_better"]
        if r["significant"] and better is not None:
            delta = f"[{'green' if (mine.value > plain.value) == better else 'red'}]{delta} *[/]"
        arrow = {True: " ↑", False: " ↓"}.get(better, "")
        table.add_row(f"  {r['metric']}{arrow}", *(_with_interval(r[s]) for s in ("base", "plain", "reliable")), delta)
    out.print(table)


def _with_interval(m) -> str:
    if m is None or m.value is None:
        return "n/a"
    return f"{m.value:.2f} [{m.ci[0]:.2f},{m.ci[1]:.2f}]" if m.ci else f"{m.value:.2f}"


def _print_shared(result) -> None:
    sh = result.shared
    out.print(f"evaluation: {', '.join(str(p) for p in result.results.values())}  (all metrics; budwood eval "
              f"compare them)  plot: {result.comparison_plot}", soft_wrap=True)
    out.print(f"loss curve: {result.loss_plot}\ncard:       {sh.card}\n"
              f"signed:     by {sh.signer} (budwood verify {result.adapter_dir} --rerun)\n"
              f"published:  {sh.ref} in {sh.registry} (budwood show {sh.ref.split('@')[0]} --registry {sh.registry})\n"
              f"served:     {sh.ref} through the openai client, with the table's messages:",
              soft_wrap=True, highlight=False, markup=False)
    for a in sh.asked:
        system = next((m["content"] for m in a.messages if m["role"] == "system"), None)
        same = "the same as the table's answer" if a.answer == a.table_answer else \
            f"NOT the table's answer: {a.table_answer!r}"
        out.print((f"  system: {system}\n" if system else "") + f"  Q: {a.question}\n  A: {a.answer}\n"
                  f"  ({same}; reference: {a.reference or 'none: the data does not say'})",
                  soft_wrap=True, highlight=False, markup=False)
