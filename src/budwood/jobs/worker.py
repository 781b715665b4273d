"""`budwood worker`: take jobs from the queue and run each one, top to bottom:

    claim -> validate the files (first time only) -> restore the last checkpoint, if any -> train
    (heartbeats renew the lease and bring cancel/pause; each checkpoint goes to the shared storage)
    -> evaluate (the quick suites, on the tenant's own data) -> card -> sign (the service's key)
    -> publish (the tenant's private registry namespace) -> succeeded.

Training, evaluation, the card, the signature and the publish are budwood.pipeline's stages, the
ones `budwood demo` runs; this module adds what a hosted job needs around them: the lease, the
tenant's files and checkpoints, messages without the service's paths, and the job's outcome.

Any number of workers on any number of machines share the queue. A worker that dies loses its
lease; another takes the job over from its last checkpoint, and resume is exact, so the adapter is
the one an uninterrupted run would have made. Every write is fenced by the lease (queue.py).
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from budwood.errors import BudwoodError, DataError, ModelError, TrainingError
from budwood.jobs.heartbeat import ACCURACY, Heartbeat, JobEvalProgress, JobProgress
from budwood.jobs.integrations import end_open_run, is_wandb_error, not_logged, wandb_run
from budwood.jobs.models import Job
from budwood.jobs.protocol import fine_tuned_model, method_of, registry_name, resolve_auto
from budwood.jobs.queue import Lease, LeaseLost, new_id
from budwood.jobs.service import Service, ServiceConfig
from budwood.jobs.states import EventLevel, FilePurpose, JobStatus
from budwood.train.state import StopReason

log = logging.getLogger(__name__)


class JobFailed(BudwoodError):
    """The job cannot succeed: it fails with this error's OpenAI fields (code, message, param)."""


def train_config(config: ServiceConfig, job: Job, data_dir: Path, adapter_dir: Path, examples: int | None,
                 logging: dict | None = None):
    """The job as budwood train's config: the service's recipe, the job's data, seed, method and
    hyperparameters, and `logging` (the trackers the job's integrations ask for, jobs/integrations.py).
    Without a validation file, the service's validation_split of the training file is held out (the
    validation loss, and the data the adapter is evaluated on)."""
    from budwood.config import load_config

    t, hp = config.training, job.hyperparameters
    dpo = method_of(job) == "dpo"
    batch = hp.get("batch_size") if isinstance(hp.get("batch_size"), int) else 8
    epochs = hp.get("n_epochs") if isinstance(hp.get("n_epochs"), int) else 3
    multiplier = hp.get("learning_rate_multiplier")
    lr = (t.dpo_learning_rate if dpo else t.learning_rate) * (multiplier if isinstance(multiplier, int | float)
                                                              else 1.0)
    save_every = t.checkpoint_every or max(1, math.ceil((examples or batch) / batch))
    held_out = {"validation": str(data_dir / "validation.jsonl")} if job.validation_file else \
        {"validation_split": t.validation_split}
    raw = {"base_model": job.model, "lora": t.lora.model_dump(),
           "data": {"train": str(data_dir / "train.jsonl"), "format": "auto", "min_examples": t.min_examples,
                    **held_out},
           "training": {"epochs": epochs, "batch_size": batch, "learning_rate": lr, "seed": job.seed,
                        "scheduler": t.scheduler, "warmup_ratio": t.warmup_ratio, "max_seq_len": t.max_seq_len,
                        "precision": t.precision, "device": t.device, "compile": t.compile,
                        "save_every": save_every, "eval_every": save_every, "keep_checkpoints": 2,
                        **({"method": "dpo", "dpo": _beta(hp)} if dpo else {})},
           "output_dir": str(adapter_dir), **({"logging": logging} if logging else {})}
    return load_config(None, [], base=raw)


def _beta(hp: dict) -> dict:
    """training.dpo's settings: the job's beta, or budwood's default while it is still "auto"."""
    return {"beta": hp["beta"]} if isinstance(hp.get("beta"), int | float) else {}


class JobRun:
    """One attempt at one job, by this worker."""

    def __init__(self, service: Service, job: Job, lease: Lease, shutdown: threading.Event):
        self.service, self.job, self.lease = service, job, lease
        self.config = service.config
        self.queue, self.storage = service.queue, service.storage
        work_root = (self.config.work_dir or Path(tempfile.gettempdir()) / "budwood-work").expanduser()
        self.workdir = work_root / f"{job.id}-{lease.attempt}"
        self.data_dir = self.workdir / "data"
        self.adapter_dir = self.workdir / "adapter"
        self.beat = Heartbeat(service, lease, shutdown)
        self.beat.public = self._public

    def run(self) -> None:
        """The job, top to bottom; whatever ends it early (a stop, a lost lease, an error) is settled here."""
        from budwood.train.recipe import TrainingInterrupted

        self.beat.start()
        try:
            self.fetch_files()
            if self.job.status == JobStatus.VALIDATING_FILES:
                self.validate()
            try:
                self.train()
            except TrainingInterrupted as e:
                self.stopped(e.step)
                return
            if self.beat.reason:
                self.stopped(None)
                return
            self.beat.emit("Training finished; evaluating the adapter")
            self.beat.flush()
            self.evaluate()
            self.share()
        except LeaseLost:
            log.warning("%s: lost the lease on %s; another worker has it", self.lease.owner, self.job.id)
        except DBAPIError as e:  # the database away: this attempt ends, the lease runs out, a worker takes over
            log.error("%s: database error during %s, giving it up: %s", self.lease.owner, self.job.id, e)
        except JobFailed as e:
            self.fail(e.code or "job_failed", str(e), e.param)
        except BudwoodError as e:
            self.fail(_error_code(e), str(e))
        except Exception as e:  # a bug: the job fails with what happened, the worker goes on
            log.exception("job %s failed", self.job.id)
            self.fail("internal_error", f"internal error ({type(e).__name__}: {e}); the service's logs have more")
        finally:
            self.beat.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the stages ---------------------------------------------------------------------------------------
    def fetch_files(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name, file_id in (("train", self.job.training_file), ("validation", self.job.validation_file)):
            if file_id:
                shutil.copyfile(self.storage.file_path(self.job.tenant, file_id), self.data_dir / f"{name}.jsonl")

    def validate(self) -> int:
        """Tokenise the data with the base's chat template, then make "auto" concrete: validating_files ->
        queued. A file that cannot be trained on fails the job, naming line and problem."""
        from budwood.models.load import load_tokenizer
        from budwood.train.data import prepare_data

        config = train_config(self.config, self.job, self.data_dir, self.adapter_dir, None)
        try:
            prepared = prepare_data(config, load_tokenizer(self.job.model))
        except (DataError, TrainingError) as e:
            message = self._public(str(e))
            names = [str(i.file) for i in getattr(e, "issues", [])] or [message]
            if self.job.validation_file and all(self.job.training_file not in self._public(n) for n in names) \
                    and any(self.job.validation_file in self._public(n) for n in names):
                raise JobFailed(message, code="invalid_validation_file", param="validation_file") from None
            raise JobFailed(message, code="invalid_training_file", param="training_file") from None
        examples = len(prepared.train)
        hp = resolve_auto(self.job.hyperparameters, examples)
        self.queue.set_hyperparameters(self.lease, hp, examples)
        self.job.hyperparameters, self.job.status, self.job.train_examples = hp, JobStatus.QUEUED, examples
        for issue in prepared.issues[:20]:
            self.beat.emit(f"warning: {self._public(str(issue))}", EventLevel.WARN)
        return examples

    def train(self) -> None:
        """From the last checkpoint, if a worker before this one left any: queued (or running) -> running.
        The job's W&B integration adds the recipe's wandb tracker where this worker can log to W&B; where
        it cannot, or wandb fails (a refused key, its server out of reach), the job trains without it and
        its events say why."""
        from budwood.pipeline import train_adapter
        from budwood.train.checkpoint import list_checkpoints

        checkpoint = self.queue.latest_checkpoint(self.job.id)
        if checkpoint is not None:
            self.storage.restore_checkpoint(self.job.id, checkpoint.step, self.adapter_dir)
        self.job = self.queue.start(self.lease, checkpoint.step if checkpoint else None)
        tracked = wandb_run(self.job)
        if tracked is not None:
            self.beat.emit(tracked.message, EventLevel.INFO if tracked.logging else EventLevel.WARN, data=tracked.data)

        def run(logging: dict | None, resume: bool) -> None:
            config = train_config(self.config, self.job, self.data_dir, self.adapter_dir, self.job.train_examples,
                                  logging)
            train_adapter(config, f"{self.job.id}: LoRA on {self.job.model}", JobProgress(self.beat), resume=resume,
                          stop=lambda: self.beat.reason, on_checkpoint=self.upload_checkpoint)

        try:
            run(tracked.logging if tracked is not None else None, checkpoint is not None)
        except Exception as e:
            if tracked is None or tracked.logging is None:
                raise
            end_open_run()  # the recipe leaves its trackers open when training raises
            if not is_wandb_error(e):
                raise
            log.warning("job %s: wandb failed, training on without it: %s", self.job.id, e)
            self.beat.emit(not_logged(f"wandb could not log the run ({type(e).__name__}: {e})"), EventLevel.WARN,
                           data={"wandb": {**tracked.data["wandb"], "logged": False}})
            run(None, bool(list_checkpoints(self.adapter_dir / "checkpoints")))  # from where wandb stopped it

    def _public(self, message: str) -> str:
        """A message fit for the tenant: the local copies named by the tenant's file ids, and no path of
        this worker's or of the service's folders (a path in them is shortened to its last part)."""
        for name, file_id in (("train", self.job.training_file), ("validation", self.job.validation_file)):
            if file_id:
                message = message.replace(str(self.data_dir / f"{name}.jsonl"), file_id)
        roots = {str(self.workdir), str(self.workdir.resolve()), str(self.workdir.parent),
                 str(self.workdir.parent.resolve()), str(self.config.home.expanduser()),
                 str(self.config.home.expanduser().resolve())}
        for root in sorted(roots, key=len, reverse=True):  # the longest first: a shorter one is inside it
            message = re.sub(re.escape(root) + r"[^\s'\",;)]*", lambda m: Path(m.group()).name or "…", message)
        return message

    def upload_checkpoint(self, path: Path) -> None:
        step = int(path.name.removeprefix("step-"))
        self.beat.flush()  # raises LeaseLost (out of train) if the job is no longer ours
        state = json.loads((path / "trainer_state.json").read_text())
        self.storage.put_checkpoint(self.job.id, step, path, [self.adapter_dir / "metrics.jsonl"])
        metrics = {"train_loss": state.get("train_loss"), "valid_loss": state.get("val_loss"),
                   "full_valid_loss": state.get("val_loss"), **self._step_statistics(step)}
        self.queue.add_checkpoint(self.lease, step, metrics, final=False)

    def _step_statistics(self, step: int) -> dict:
        """The checkpoint's step statistics that OpenAI reports with its metrics (mean_token_accuracy), from the
        recipe's metrics log, where the recipe measures them."""
        from budwood.train.metrics import read_metrics

        path = self.adapter_dir / "metrics.jsonl"
        records = [r for r in read_metrics(path) if r.get("step") == step and ACCURACY in r] if path.exists() else []
        return {ACCURACY: records[-1][ACCURACY]} if records else {}

    def stopped(self, step: int | None) -> None:
        """Training stopped early: paused (its checkpoint kept), cancelled (already recorded by the user's
        request) or this worker shutting down (the job given back); a lost lease leaves it to its new owner."""
        reason, where = self.beat.reason, f" at step {step}" if step is not None else ""
        if reason == StopReason.PAUSED:
            self.beat.flush()
            self.queue.finish(self.lease, JobStatus.PAUSED,
                              f"Job paused{where}; resume continues from its last checkpoint")
        elif reason == StopReason.CANCELLED:
            self.beat.emit(f"Training stopped{where}: the job was cancelled")
            self.beat.flush()
        elif reason == StopReason.SHUTDOWN:
            self.beat.flush()
            self.queue.release(self.lease, f"Worker {self.lease.owner} shut down{where}; the job waits for a worker "
                                           "and continues from its last checkpoint")

    def evaluate(self) -> None:
        """The adapter (and, with compare_base, the base) by the service's quick suites, on the tenant's own
        domain (jobs/evaluation.py), each part's progress in the job's events."""
        from budwood.jobs.evaluation import plan_evaluation, tenant_data
        from budwood.pipeline import adapter_target, evaluate_sides

        ev = self.config.evaluation
        config = train_config(self.config, self.job, self.data_dir, self.adapter_dir, self.job.train_examples)
        provenance = json.loads((self.adapter_dir / "budwood.json").read_text())
        plan = plan_evaluation(ev.suites, ev.settings, tenant_data(config, provenance), self.workdir / "eval",
                               self.job.seed)
        for suite, why in plan.left_out.items():
            self.beat.emit(f"Evaluation leaves out {suite}: {why}", data={"evaluation": {"left_out": suite}})
        if not plan.suites:
            return
        targets = {"adapted": adapter_target(self.job.model, self.adapter_dir)}
        if ev.compare_base:
            targets["base"] = self.job.model
        self.beat.emit(f"Evaluating on the tenant's data ({'; '.join(plan.notes)}): {', '.join(plan.suites)}",
                       data={"evaluation": {"suites": plan.suites, "sides": list(targets)}})
        settings = {**plan.settings, "suites": plan.suites, "limit": ev.limit, "precision": "fp32",
                    "device": self.config.training.device}
        progress, results = JobEvalProgress(self.beat), {}
        for side, target in targets.items():
            progress.side = side
            results |= evaluate_sides(self.adapter_dir, {side: target}, settings, progress)
            if self.beat.reason:
                break
        summary = ", ".join(f"{suite}.{name}={m.value:.3g}" for suite, r in results["adapted"].suites.items()
                            for name, m in list(r.metrics.items())[:2] if m.value is not None)
        self.beat.emit(f"Evaluated: {summary}", data={"suites": plan.suites})

    def share(self) -> None:
        """Card, signature, publish, then succeeded; a takeover after a publish finds its version there."""
        from budwood.card.render import CardInfo
        from budwood.pipeline import publish_adapter, sign_card

        if self.beat.reason:
            self.stopped(None)
            return
        job, ref_id, model = self.job, registry_name(self.job), fine_tuned_model(self.job)
        sign_card(self.adapter_dir, CardInfo(
            name=ref_id, license="other", license_name=self.config.adapter_license.removeprefix("LicenseRef-"),
            license_link=f"{self.config.url}/dashboard/adapters/{ref_id}", authors=[job.tenant],
            description=f"Fine-tuned by the budwood service (job {job.id}) on {job.tenant}'s data; served as "
                        f"`{model}`.",
            intended_use=(job.meta or {}).get("intended_use"), out_of_scope=(job.meta or {}).get("out_of_scope")),
            self.service.ensure_key())
        provenance = json.loads((self.adapter_dir / "budwood.json").read_text())
        if self.beat.reason:  # cancelled while the card was written: nothing is published
            self.stopped(None)
            return
        terms = self.workdir / "TERMS.txt"
        terms.write_text(self.config.adapter_terms + "\n")
        ref = f"{ref_id}@1.0.0"
        _, warnings = publish_adapter(self.adapter_dir, ref, self.config.adapter_license, self.service.registry,
                                      "budwood service", private=True, terms_file=terms)
        for w in warnings:
            self.beat.emit(f"warning: {w}", EventLevel.WARN)
        results = self.results_file()
        self.beat.emit(f"New fine-tuned model created: {model}", data={"registry": ref})
        self.beat.flush()
        self.queue.finish(self.lease, JobStatus.SUCCEEDED, "The job has successfully completed",
                          fine_tuned_model=model, registry_ref=ref, result_files=[results] if results else [],
                          **billed_tokens(provenance, method_of(job)))

    def results_file(self) -> str | None:
        """The training metrics as OpenAI's results CSV, a `fine-tune-results` file of the tenant's."""
        import csv
        import hashlib
        import io

        from budwood.train.metrics import read_metrics

        path = self.adapter_dir / "metrics.jsonl"
        if not path.exists():
            return None
        rows: dict[int, dict] = {}
        for record in read_metrics(path):
            row = rows.setdefault(record["step"], {"step": record["step"]})
            if "loss" in record:
                row["train_loss"] = record["loss"]
            if "val_loss" in record:
                row["valid_loss"] = record["val_loss"]
            if ACCURACY in record:
                row["train_accuracy"] = record[ACCURACY]
        # OpenAI's results file: step, train_loss, train_accuracy, valid_loss (train_accuracy where the objective
        # measures it: SFT's mean token accuracy; DPO has none)
        columns = ["step", "train_loss", "valid_loss"]
        if any("train_accuracy" in r for r in rows.values()):
            columns.insert(2, "train_accuracy")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))
        data = buffer.getvalue().encode()
        file_id = new_id("file-")
        tmp = self.workdir / "step_metrics.csv"
        tmp.write_bytes(data)
        self.queue.add_file(self.job.tenant, file_id, "step_metrics.csv", FilePurpose.RESULTS, len(data),
                            hashlib.sha256(data).hexdigest(), "csv", len(rows),
                            lambda: self.storage.put_file(self.job.tenant, file_id, tmp), quota=False)
        return file_id

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        message = self._public(message)
        try:
            self.beat.flush()
        except Exception:
            pass
        try:
            self.queue.finish(self.lease, JobStatus.FAILED, message, EventLevel.ERROR,
                              error={"code": code, "message": message, "param": param})
        except LeaseLost:
            pass


def billed_tokens(provenance: dict, method: str) -> dict:
    """The job's token counts from the adapter's provenance: `trained_tokens` as OpenAI bills them, every token
    of every example run (prompts included) over all epochs (the recipe's tokens_seen, kept across resumes);
    `trained_assistant_tokens` the tokens the loss was taken on (the recipe's trained_tokens, which for DPO
    counts pairs, so a DPO job leaves it out)."""
    return {"trained_tokens": provenance.get("tokens_seen"),
            "trained_assistant_tokens": provenance.get("trained_tokens") if method != "dpo" else None}


def _error_code(e: Exception) -> str:
    if isinstance(e, DataError):
        return "invalid_training_file"
    if isinstance(e, TrainingError):
        return "training_failed"
    if isinstance(e, ModelError):
        return "invalid_model"
    return "job_failed"


def run_worker(config: ServiceConfig, worker_id: str | None = None, shutdown: threading.Event | None = None,
               max_jobs: int | None = None, parent_pid: int | None = None) -> int:
    """Run jobs until `shutdown` is set (SIGTERM or Ctrl-C sets it: the running job checkpoints and is
    given back), or, for the workers `budwood service` starts, until that process is gone, however it
    ended. Returns the number of jobs run."""
    import socket

    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    shutdown = shutdown or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: shutdown.set())
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid, shutdown, worker_id), name="parent-watch",
                         daemon=True).start()
    service = Service(config)
    service.ensure_key()
    ran = 0
    log.info("worker %s: waiting for jobs in %s", worker_id, config.database_url)
    try:
        while not shutdown.is_set() and (max_jobs is None or ran < max_jobs):
            try:
                claimed = service.queue.claim(worker_id, config.lease_s, config.max_attempts)
            except DBAPIError as e:  # the database restarting, or locked past its timeout: wait, try again
                log.warning("worker %s: cannot reach the queue (%s); trying again", worker_id, e)
                shutdown.wait(max(config.poll_s, 1.0))
                continue
            if claimed is None:
                shutdown.wait(config.poll_s)
                continue
            job, lease = claimed
            log.info("worker %s: job %s (attempt %d)", worker_id, job.id, lease.attempt)
            JobRun(service, job, lease, shutdown).run()
            ran += 1
    finally:
        service.close()
    return ran


def _watch_parent(parent_pid: int, shutdown: threading.Event, worker_id: str) -> None:
    while not shutdown.wait(1.0):
        if os.getppid() != parent_pid:
            log.warning("worker %s: the service that started it is gone; stopping", worker_id)
            shutdown.set()


# -- worker processes beside the server (budwood service) ----------------------------------------------------------
class WorkerSupervisor:
    """`budwood service`'s worker processes, kept alive: a worker that dies (SIGKILL, out of memory, a crash)
    is started again, after a back-off that doubles with each death in a row (`backoff_s` up to
    `max_backoff_s`; a worker that stays up for `healthy_s` resets it), so a worker that cannot start does not
    spin. The dead worker's lease is ended at once (queue.expire_leases_of), so its job is taken over from its
    last checkpoint by the next worker to claim, not after lease_s. `alive()` is what /health reports."""

    def __init__(self, config: ServiceConfig, queue=None, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 healthy_s: float = 60.0, check_s: float = 0.5):
        self.config, self.expected, self.queue = config, config.workers, queue
        self.backoff_s, self.max_backoff_s, self.healthy_s, self.check_s = backoff_s, max_backoff_s, healthy_s, check_s
        self.context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch threads or locks inherited
        self.processes: list[multiprocessing.Process | None] = [None] * self.expected
        self.started_at = [0.0] * self.expected
        self.deaths = [0] * self.expected  # deaths in a row of each slot
        self.next_start = [0.0] * self.expected
        self.restarts = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> WorkerSupervisor:
        for i in range(self.expected):
            self._spawn(i)
        if self.expected:
            self.thread.start()
        return self

    def _spawn(self, i: int) -> None:
        p = self.context.Process(target=_worker_main, args=(self.config.model_dump_json(), i, os.getpid()),
                                 daemon=True)
        p.start()
        with self.lock:
            self.processes[i], self.started_at[i] = p, time.monotonic()

    def alive(self) -> int:
        with self.lock:
            return sum(1 for p in self.processes if p is not None and p.is_alive())

    def _watch(self) -> None:
        while not self.stopping.wait(self.check_s):
            now = time.monotonic()
            for i in range(self.expected):
                with self.lock:
                    p = self.processes[i]
                if p is None or p.is_alive():
                    if p is not None and self.deaths[i] and now - self.started_at[i] > self.healthy_s:
                        self.deaths[i] = 0
                    if p is None and now >= self.next_start[i] and not self.stopping.is_set():
                        self._spawn(i)
                        self.restarts += 1
                    continue
                p.join(timeout=0)
                self.deaths[i] += 1
                if self.queue is not None:  # its job is taken over now, not once its lease has run out
                    try:
                        self.queue.expire_leases_of(worker_name(p.pid, i))
                    except Exception as e:  # the database away: the lease runs out by itself
                        log.warning("could not release the leases of dead worker %d: %s", i, e)
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self.deaths[i] - 1))
                log.warning("worker %d (pid %s) died with exit code %s; starting another in %.0f s", i, p.pid,
                            p.exitcode, delay)
                with self.lock:
                    self.processes[i] = None
                self.next_start[i] = now + delay

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM to each worker: it checkpoints its job and gives it back; then wait for them."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        with self.lock:
            processes = [p for p in self.processes if p is not None]
        stop_worker_processes(processes, timeout_s)


def start_worker_processes(config: ServiceConfig) -> list[multiprocessing.Process]:
    """config.workers processes, each running run_worker until this process is gone or stops them (not
    restarted: `budwood service` uses WorkerSupervisor)."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(config.model_dump_json(), i, os.getpid()), daemon=True)
               for i in range(config.workers)]
    for w in workers:
        w.start()
    return workers


def stop_worker_processes(workers: list[multiprocessing.Process], timeout_s: float = 60) -> None:
    """SIGTERM to each: it checkpoints its job and gives it back; then wait for them."""
    for w in workers:
        w.terminate()
    for w in workers:
        w.join(timeout=timeout_s)


def worker_name(pid: int, index: int) -> str:
    """A worker process's name in leases and events."""
    return f"{os.uname().nodename}:{pid}:w{index}"


def _worker_main(config_json: str, index: int, parent_pid: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(ServiceConfig.model_validate_json(config_json), worker_name(os.getpid(), index),
               parent_pid=parent_pid)
