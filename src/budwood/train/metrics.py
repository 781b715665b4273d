"""Training metrics: metrics.jsonl always, the trackers logging.report_to names (train/trackers.py); loss plots."""
from __future__ import annotations

import json
from pathlib import Path

SPARK = "▁▂▃▄▅▆▇█"


class MetricsLog:
    """Appends one JSON object per line, and hands its numbers to the trackers (train/trackers.py); on resume,
    lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None, logging, run_config: dict):
        from budwood.train.trackers import open_trackers

        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.trackers = open_trackers(logging, path.parent, run_config, resume_step)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)
                   and k != "step"}
        for tracker in self.trackers:
            tracker.log(numbers, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    if len(values) > width:  # average into `width` buckets
        chunks = [values[i * len(values) // width:(i + 1) * len(values) // width] for i in range(width)]
        values = [sum(c) / len(c) for c in chunks]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[int((v - lo) / span * (len(SPARK) - 1))] for v in values)


def plot_losses(metrics: list[dict], out: Path, title: str = "training loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per assistant token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
