"""The `budwood` command: a thin shell over the library; each command's docstring is its --help."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Grow, prove, document, trade and serve LoRA adapters on open models.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data.")
app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Evaluate a model, an adapter or an endpoint; compare results.")
app.add_typer(eval_app, name="eval")
console = Console(stderr=True)
out = Console()


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class RichProgress:
    """Progress bar with loss, tokens/s and ETA (implements budwood.train.recipe.Progress)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            transient=False)
        self.task = None
        self.val = ""

    def start(self, total_steps: int, first_step: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=total_steps, completed=first_step, info="")

    def update(self, record: dict) -> None:
        if "val_loss" in record:
            self.val = f" val {record['val_loss']:.3f}"
        if "loss" in record:
            info = f"loss {record['loss']:.3f}{self.val}  {record['tokens_per_s']:,.0f} tok/s"
            self.bar.update(self.task, completed=record["step"], info=info)

    def note(self, message: str) -> None:
        console.print(message, markup=False, highlight=False)

    def stop(self) -> None:
        self.bar.stop()


def _sigterm_as_interrupt() -> None:
    """A polite kill (SIGTERM) saves a checkpoint like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config (see configs/)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set training.max_steps=20"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in output_dir"),
) -> None:
    """Train a LoRA adapter.

    Example: budwood train configs/tiny_company.yaml --set training.max_steps=50
    """
    from budwood.config import load_config
    from budwood.errors import BudwoodError
    from budwood.train.recipe import TrainingInterrupted, train

    _sigterm_as_interrupt()
    progress = RichProgress()
    try:
        cfg = load_config(config, set_)
        adapter_dir = train(cfg, resume=resume, progress=progress)
    except TrainingInterrupted as e:
        progress.stop()
        console.print(f"[yellow]{escape(str(e))}[/]")
        raise typer.Exit(130) from None
    except BudwoodError as e:
        progress.stop()
        _fail(e)
    progress.stop()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        out.print(f"adapter: {adapter_dir}")


@app.command("generate")
def generate_cmd(
    prompt: list[str] = typer.Argument(..., help="one or more user prompts"),
    base: str = typer.Option("budwood-tiny", help="base model: budwood-tiny, a folder or a hub id"),
    adapter: Path | None = typer.Option(None, help="adapter directory"),
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    system: str | None = typer.Option(None, help="system message"),
) -> None:
    """Answer prompts with a base model, optionally with an adapter.

    Example: budwood generate --adapter runs/demo/adapter "What is the return policy?"
    """
    from budwood.engine import Engine, EngineConfig, SamplingParams
    from budwood.errors import BudwoodError

    try:
        engine = Engine(EngineConfig(base=base, precision="fp32", kv_cache_tokens=4096))
        name = None
        if adapter is not None:
            name = "adapter"
            engine.register_adapter(name, adapter)
        prompts = [engine.chat_prompt(([{"role": "system", "content": system}] if system else []) +
                                      [{"role": "user", "content": p}]) for p in prompt]
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed),
                               [name] * len(prompts))
    except BudwoodError as e:
        _fail(e)
    for o in outs:
        out.print(o.choices[0].text.strip(), markup=False, highlight=False)


@data_app.command("check")
def data_check_cmd(
    file: Path = typer.Argument(..., help="JSONL training data"),
    format: str = typer.Option("auto", help="auto, openai, prompt_completion, alpaca, sharegpt"),
    base: str = typer.Option("budwood-tiny", help="whose tokenizer counts the tokens"),
    max_seq_len: int = typer.Option(1024, help="longer examples would be truncated"),
    min_examples: int = typer.Option(10, help="fewer valid examples is an error (OpenAI asks for 10)"),
) -> None:
    """Validate a data file: every problem as file:line: code: message, then token statistics.

    Exits 1 if there are errors. Example: budwood data check train.jsonl
    """
    from budwood.data.formats import read_dataset
    from budwood.data.stats import token_stats
    from budwood.errors import BudwoodError
    from budwood.models.load import load_tokenizer

    try:
        ds = read_dataset(file, format, min_examples, raise_errors=False)
        stats = token_stats(ds.conversations, load_tokenizer(base), max_seq_len, ds.issues) \
            if ds.conversations else None
    except BudwoodError as e:
        _fail(e)
    for issue in ds.issues:
        color = "red" if issue.level == "error" else "yellow"
        out.print(f"[{color}]{escape(str(issue))}[/]", highlight=False, soft_wrap=True)
    errors, warnings = len(ds.errors), len(ds.issues) - len(ds.errors)
    out.print(f"{file}: format {ds.format}, {len(ds.conversations)} valid examples, "
              f"{errors} error(s), {warnings} warning(s)", highlight=False, soft_wrap=True)
    if stats:
        t = Table(title=f"tokens ({base} tokenizer)")
        t.add_column("statistic")
        t.add_column("value", justify="right")
        for name, value in [("examples", stats.examples), ("tokens per epoch", stats.total_tokens),
                            ("trained (assistant) tokens", stats.trained_tokens),
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
    workdir: Path = typer.Option(Path("runs/demo"), help="where data, adapter and plot go"),
    set_: list[str] = typer.Option([], "--set", help="override a training key, e.g. training.epochs=5"),
) -> None:
    """The end-to-end demo, offline: data -> adapter -> evaluation -> card -> signed -> published -> served.

    Example: budwood demo --workdir runs/demo
    """
    from budwood.errors import BudwoodError
    from budwood.pipeline import run_demo
    from budwood.train.metrics import read_metrics, sparkline

    _sigterm_as_interrupt()
    progress = RichProgress()
    eval_progress = EvalProgress()
    t0 = time.time()
    try:
        result = run_demo(workdir, set_, progress, eval_progress=eval_progress)
    except BudwoodError as e:
        progress.stop()
        eval_progress.stop()
        _fail(e)
    progress.stop()
    table = Table(title="held-out questions: base budwood-tiny vs + adapter", show_lines=True)
    for col in ("question", "reference", "base", "adapted"):
        table.add_column(col, overflow="fold")
    for r in result.rows:
        table.add_row(r["question"], r["reference"] or "(not in the data: should abstain)", r["base"], r["adapted"])
    out.print(table)
    losses = [m["loss"] for m in read_metrics(result.adapter_dir / "metrics.jsonl") if "loss" in m]
    p = result.provenance
    val = p["final"]["val_loss"]
    out.print(f"loss  {losses[0]:.2f} {sparkline(losses)} {losses[-1]:.2f}" +
              (f"   (val {val:.2f})" if val is not None else ""), highlight=False, soft_wrap=True)
    _print_comparison([r for r in result.comparison if r["metric"] in DEMO_METRICS], "base budwood-tiny",
                      "budwood-tiny + adapter")
    out.print(f"evaluation: {result.results['base']}, {result.results['adapted']}  (all metrics; "
              f"budwood eval compare them)  plot: {result.comparison_plot}", soft_wrap=True)
    out.print(f"loss curve: {result.loss_plot}")
    sh = result.shared
    out.print(f"card:       {sh.card}\nsigned:     by {sh.signer} (budwood verify {result.adapter_dir})\n"
              f"published:  {sh.ref} in {sh.registry} (budwood show {sh.ref.split('@')[0]} --registry {sh.registry})\n"
              f"served:     {sh.ref} through the openai client\n  Q: {sh.question}\n  A: {sh.answer}\n"
              f"  (reference: {sh.reference or 'none: the data does not say'})",
              soft_wrap=True, highlight=False, markup=False)
    out.print(f"adapter:    {result.adapter_dir}  ({p['steps']} steps, {p['tokens_seen']:,} tokens, "
              f"{p['train_time_s']:.0f} s training, {time.time() - t0:.0f} s in all)", soft_wrap=True)


class EvalProgress:
    """One bar per batch of work: requests done, requests/s, ETA (implements budwood.eval.context.Progress)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"),
                            TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.t0 = 0.0

    def start(self, label: str, total: int) -> None:
        self.bar.start()
        self.t0 = time.perf_counter()
        self.task = self.bar.add_task(label, total=total, rate="")

    def advance(self, n: int) -> None:
        done = self.bar.tasks[-1].completed + n
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done, rate=f"{rate:,.1f} req/s")

    def stop(self) -> None:
        self.bar.stop()


def _print_results_table(results, title: str) -> None:
    from budwood.eval.results import summary_rows

    table = Table(title=title)
    for col, just in (("suite", "left"), ("metric", "left"), ("value", "right"), ("95% interval", "left")):
        table.add_column(col, justify=just, no_wrap=col != "95% interval", overflow="fold")
    for row in summary_rows(results):
        table.add_row(*row)
    out.print(table)


@eval_app.callback(invoke_without_command=True)
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
    import yaml

    from budwood.errors import BudwoodError
    from budwood.eval.results import write_results
    from budwood.eval.run import load_eval_config, run_eval

    given = {"target": target, "limit": limit, "precision": precision, "device": device, "api_key_env": api_key_env}
    overrides = {k: v for k, v in given.items() if v is not None}
    if suite:
        overrides["suites"] = [s.strip() for s in suite.split(",") if s.strip()]
    if records:
        overrides["records"] = True
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(ValueError(f"--set {item!r}: expected KEY=VALUE"))
        overrides[key.strip()] = yaml.safe_load(value)
    progress = EvalProgress()
    try:
        if config is None and target is None:
            raise BudwoodError("--target is required (or a --config that names one)")
        cfg = load_eval_config(config, overrides)
        results = run_eval(cfg, progress)
        path = write_results(results, out_path or Path("eval-results.json"))
    except BudwoodError as e:
        progress.stop()
        _fail(e)
    progress.stop()
    _print_results_table(results, f"{cfg.target}")
    out.print(f"results: {path}  ({results.seconds:.0f} s)")


@eval_app.command("compare")
def eval_compare_cmd(
    a: Path = typer.Argument(..., help="results JSON (the reference)"),
    b: Path = typer.Argument(..., help="results JSON (compared with A)"),
    plot: Path = typer.Option(None, help="plot file (default: B's name with -compare.png)"),
) -> None:
    """Table of metric deltas (B - A); * marks a change outside both 95% intervals."""
    from budwood.errors import BudwoodError
    from budwood.eval.results import compare, load_results, plot_comparison

    try:
        ra, rb = load_results(a), load_results(b)
    except BudwoodError as e:
        _fail(e)
    rows = compare(ra, rb)
    if not rows:
        _fail(ValueError(f"{a} and {b} share no metric"))
    label_a, label_b = ra.target.spec, rb.target.spec
    _print_comparison(rows, label_a, label_b)
    path = plot_comparison(rows, (label_a, label_b), plot or b.with_name(b.stem + "-compare.png"))
    out.print(f"plot: {path}")


DEMO_METRICS = {"exact_match", "token_f1", "rouge_l", "loss", "hallucination_rate", "answerable_correct",
                "unanswerable_abstained", "determinism_greedy", "determinism_seeded", "format_agreement",
                "format_spread", "option_order_agreement", "pararel_consistency"}


def _print_comparison(rows: list[dict], label_a: str, label_b: str) -> None:
    table = Table(title=f"A = {label_a}\nB = {label_b}")
    for col, just in (("suite", "left"), ("metric", "left"), ("A", "right"), ("B", "right"), ("B - A", "right"),
                      ("", "left")):
        table.add_column(col, justify=just)
    for r in rows:
        better = r["higher_is_better"]
        color = "" if better is None or not r["significant"] else \
            ("green" if (r["delta"] > 0) == better else "red")
        delta = f"{r['delta']:+.3g}"
        table.add_row(r["suite"], r["metric"], f"{r['a']:.3g}", f"{r['b']:.3g}",
                      f"[{color}]{delta}[/]" if color else delta, "*" if r["significant"] else "")
    out.print(table)


@eval_app.command("schema")
def eval_schema_cmd() -> None:
    """Print the results file's JSON Schema."""
    import json

    from budwood.eval.results import json_schema

    out.print_json(json.dumps(json_schema()))


@app.command("serve")
def serve_cmd(
    base: str = typer.Option("budwood-tiny", help="base model: budwood-tiny, a local HF folder or a hub id"),
    adapters: Path = typer.Option(None, help="folder of adapter directories; each subfolder is served by its name"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 for all)"),
    port: int = typer.Option(8000),
    api_key: str = typer.Option(None, envvar="BUDWOOD_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    max_loaded_adapters: int = typer.Option(8, help="adapters kept in memory (least recently used evicted)"),
    max_lora_rank: int = typer.Option(16, help="largest adapter rank served (a cat merge's rank is the sum of its "
                                                 "parents')"),
    max_num_seqs: int = typer.Option(64, help="sequences decoding at once"),
    kv_cache_tokens: int = typer.Option(65536, help="KV-cache capacity in tokens"),
    max_queue: int = typer.Option(256, help="requests in flight before the server answers 429"),
    engine: str = typer.Option("budwood", help="budwood, or vllm (GPU; hands the same adapter folders to vLLM)"),
    registry: str = typer.Option(None, envvar="BUDWOOD_REGISTRY",
                                 help="serve registry ids ORG/NAME@VERSION from this registry (a folder, database "
                                      "URL or http(s)://server); a local one is also offered at /v1/registry"),
    registry_key: str = typer.Option(None, envvar="BUDWOOD_REGISTRY_API_KEY", help="key of a remote --registry"),
) -> None:
    """Serve the base and every adapter behind an OpenAI-compatible API.

    Example: budwood serve --base budwood-tiny --adapters runs/adapters --port 8000
    Registry ids: budwood serve --registry ~/.budwood then model="acme/support@1.0.0"
    then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(model="my-adapter", ...)
    """
    from budwood.errors import BudwoodError

    if engine == "vllm" and registry:
        _fail(ValueError("--registry works with --engine budwood; for vLLM, budwood pull the adapters into the "
                         "--adapters folder"))
    if engine == "vllm":
        from budwood.serve.vllm import serve_vllm
        try:
            serve_vllm(base, adapters, host, port, api_key, max_loaded_adapters)
        except BudwoodError as e:
            _fail(e)
        return
    if engine != "budwood":
        _fail(ValueError(f"--engine {engine!r}: expected budwood or vllm"))
    from budwood.engine import EngineConfig
    from budwood.serve import serve

    try:
        config = EngineConfig(base=base, adapters=str(adapters) if adapters else None, precision=precision,
                              device=device, max_loaded_adapters=max_loaded_adapters, max_lora_rank=max_lora_rank,
                              max_num_seqs=max_num_seqs,
                              kv_cache_tokens=kv_cache_tokens, max_queue=max_queue)
        if adapters is not None and not adapters.is_dir():
            raise BudwoodError(f"--adapters {adapters}: no such folder")
        from budwood.registry import open_registry

        serve(config, host, port, api_key, open_registry(registry, registry_key) if registry else None)
    except BudwoodError as e:
        _fail(e)


def main() -> None:
    """Console-script entry: under tcmalloc where installed (see budwood.allocator)."""
    from budwood.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc()
    app(prog_name="budwood")


from budwood import cli_merge, cli_registry, cli_service  # noqa: E402,F401  (register card, merge, service, …)
