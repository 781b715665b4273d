"""A job's integrations on the worker that trains it: OpenAI's W&B integration made into the training
recipe's tracker settings (`logging.report_to: [wandb]`, train/trackers.py), or the reason this worker
cannot log to W&B.

A job never fails for its integration: a worker without the wandb package or a W&B key, or whose wandb
cannot start the run, trains the job all the same, and the job's events say why nothing went to W&B.
The key is looked for before training (where wandb itself looks: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE,
the netrc file `wandb login` writes) so that wandb never prompts for one on a worker started from a
terminal; WANDB_MODE=offline needs none (the run stays in the worker's WANDB_DIR until `wandb sync`).
"""
from __future__ import annotations

import netrc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from budwood.jobs.models import Job

WANDB_API_HOST = "api.wandb.ai"  # where `wandb login` keeps a key, whatever front door the client uses


@dataclass(frozen=True)
class WandbRun:
    """What the worker does with a job's W&B integration: `logging` is the TrainConfig's logging section
    (None: not logged to W&B), `message` the job event that says so."""

    logging: dict | None
    message: str
    data: dict


def wandb_run(job: Job) -> WandbRun | None:
    """The job's W&B run on this worker, or None for a job without a W&B integration: the integration's
    project, entity and tags, and its name, else the job's id (as OpenAI names the run)."""
    wandb = next((i["wandb"] for i in job.integrations or [] if i.get("type") == "wandb"), None)
    if wandb is None:
        return None
    name = wandb.get("name") or job.id
    data = {"project": wandb["project"], "run": name}
    unavailable = wandb_unavailable()
    if unavailable is not None:
        return WandbRun(None, not_logged(unavailable), {"wandb": {**data, "logged": False}})
    logging = {"report_to": ["wandb"], "wandb_project": wandb["project"], "run_name": name,
               "wandb_entity": wandb.get("entity"), "wandb_tags": wandb.get("tags") or []}
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
    message = f"Logging metrics to Weights & Biases: project {wandb['project']}, run {name}"
    if offline:
        message += " (offline: kept on the worker until the service's operator syncs it)"
    return WandbRun(logging, message, {"wandb": {**data, "logged": True, "offline": offline}})


def not_logged(reason: str) -> str:
    return f"Metrics not logged to Weights & Biases: {reason}; the job trains without it"


def wandb_unavailable() -> str | None:
    """Why this worker cannot log to W&B, in words for the job's owner; None when it can."""
    try:
        import wandb
    except ImportError:
        return "the wandb package is not installed on this worker (the service's operator installs budwood[trackers])"
    mode = os.environ.get("WANDB_MODE", "online").lower()
    if mode == "disabled":
        return "W&B is turned off on this worker (WANDB_MODE=disabled)"
    if mode in ("offline", "dryrun"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    base_url = os.environ.get("WANDB_BASE_URL")
    hosts = {urlsplit(base_url).netloc} if base_url else {urlsplit(wandb.Settings().base_url).netloc, WANDB_API_HOST}
    if any(_netrc_has(host) for host in hosts):
        return None
    return ("this worker has no W&B API key (the service's operator sets WANDB_API_KEY or runs `wandb login` "
            "for its workers)")


def _netrc_has(host: str) -> bool:
    """Whether the netrc file wandb reads (NETRC, else ~/.netrc, else ~/_netrc) has a key for `host`."""
    candidates = [Path(os.environ["NETRC"]).expanduser()] if os.environ.get("NETRC") else \
        [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return False
    try:
        found = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(found and found[2])


def is_wandb_error(e: BaseException) -> bool:
    """An error raised by wandb itself (no key, a refused key, its server out of reach)."""
    return type(e).__module__.partition(".")[0] == "wandb"


def end_open_run() -> None:
    """Finish (as failed) the W&B run a job's training left open when it raised: wandb.init hands an
    unfinished run back to the next caller in the process, which would log the worker's next job, maybe
    another tenant's, to this job's run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=1)
