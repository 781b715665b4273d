"""What the CLI shows: the two consoles (messages on stderr, results on stdout), progress bars (context
managers, so a bar stops however its command ends) and the tables more than one command prints."""
from __future__ import annotations

import signal
import time

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out = Console()


class _Bar:
    """A rich progress bar as a context manager: it stops however the command ends."""

    bar: object

    def stop(self) -> None:
        self.bar.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RichProgress(_Bar):
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
            dpo = f"  acc {record['rewards/accuracies']:.2f} margin {record['rewards/margins']:+.2f}" \
                if "rewards/margins" in record else ""
            info = f"loss {record['loss']:.3f}{self.val}{dpo}  {record['tokens_per_s']:,.0f} tok/s"
            self.bar.update(self.task, completed=record["step"], info=info)

    def note(self, message: str) -> None:
        console.print(message, markup=False, highlight=False)


class EvalProgress(_Bar):
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


def sigterm_as_interrupt() -> None:
    """A polite kill (SIGTERM) saves a checkpoint like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def print_comparison(rows: list[dict], label_a: str, label_b: str) -> None:
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

