"""`budwood worker`: take jobs from the queue and run each one, top to bottom:

    claim -> validate the files (first time only) -> restore the last checkpoint, if any -> train
    (heartbeats renew the lease and bring cancel/pause; each checkpoint goes to the shared storage)
    -> evaluate (the quick suites) -> card -> sign (the service's key) -> publish (the tenant's
    private registry namespace) -> succeeded.

Any number of workers on any number of machines share the queue. A worker that dies loses its
lease; another takes the job over from its last checkpoint, and resume is exact, so the adapter is
the one an uninterrupted run would have made. Every write is fenced by the lease (queue.py).
"""
from __future__ import annotations

import logging
import math
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from budwood.errors import BudwoodError, DataError, ModelError, TrainingError
from budwood.jobs.models import Job
from budwood.jobs.protocol import registry_name, resolve_auto
from budwood.jobs.queue import Lease, LeaseLost
from budwood.jobs.service import Service, ServiceConfig

log = logging.getLogger(__name__)


class JobFailed(BudwoodError):
    """The job cannot succeed: fails with OpenAI's error fields (code, message, param)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


class Heartbeat:
    """Renews the lease every heartbeat_s on its own thread, carrying progress and buffered events; its
    `reason` becomes 'cancelled', 'paused', 'lease lost' or 'shutdown' when training must stop."""

    def __init__(self, service: Service, lease: Lease, shutdown: threading.Event):
        self.service, self.lease, self.shutdown = service, lease, shutdown
        self.config = service.config
        self.reason: str | None = None
        self.progress: dict | None = None
        self.estimated_finish: float | None = None
        self.events: list[tuple] = []
        self.lock = threading.Lock()
        self.flushing = threading.Lock()  # one flush at a time, so events keep their order
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)
        self.last_ok = time.monotonic()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=self.config.lease_s)

    def emit(self, message: str, level: str = "info", type_: str = "message", data: dict | None = None) -> None:
        with self.lock:
            self.events.append((level, type_, message, data))

    def flush(self) -> None:
        """Events and progress to the database now (checkpoints and outcomes call this first)."""
        with self.flushing:
            self._flush()

    def _flush(self) -> None:
        with self.lock:
            events, self.events = self.events, []
            progress, eta = self.progress, self.estimated_finish
        try:
            self.service.queue.emit(self.lease, events)
        except Exception:
            with self.lock:
                self.events[:0] = events  # kept for the next try
            raise
        status = self.service.queue.heartbeat(self.lease, self.config.lease_s, progress, eta)
        self.last_ok = time.monotonic()
        if status == "cancelled" and not self.reason:
            self.reason = "cancelled"
        elif status == "pausing" and not self.reason:
            self.reason = "paused"

    def _run(self) -> None:
        while not self.done.wait(self.config.heartbeat_s):
            if self.shutdown.is_set() and not self.reason:
                self.reason = "shutdown"
            try:
                self.flush()
            except LeaseLost:
                self.reason = "lease lost"
                return
            except Exception as e:  # the database away for a moment: try again, until the lease must be gone
                log.warning("heartbeat of %s failed: %s", self.lease.job_id, e)
                if time.monotonic() - self.last_ok > self.config.lease_s:
                    self.reason = "lease lost"
                    return


class JobProgress:
    """budwood.train.recipe.Progress for a job: per-step metrics events and the estimated finish."""

    def __init__(self, beat: Heartbeat):
        self.beat = beat
        self.started = time.time()
        self.first_step = 0
        self.total = 0
        self.valid_loss: float | None = None

    def start(self, total_steps: int, first_step: int) -> None:
        self.total, self.first_step, self.started = total_steps, first_step, time.time()

    def update(self, record: dict) -> None:
        step = record["step"]
        if "val_loss" in record:
            self.valid_loss = record["val_loss"]
            self.beat.emit(f"Step {step}/{self.total}: validation loss={record['val_loss']:.4f}", type_="metrics",
                           data={"step": step, "valid_loss": record["val_loss"], "total_steps": self.total})
            with self.beat.lock:
                if self.beat.progress is not None:
                    self.beat.progress = dict(self.beat.progress, valid_loss=self.valid_loss)
            return
        data = {"step": step, "train_loss": record["loss"], "total_steps": self.total,
                "tokens_per_s": record.get("tokens_per_s"), "learning_rate": record.get("lr")}
        self.beat.emit(f"Step {step}/{self.total}: training loss={record['loss']:.4f}", type_="metrics", data=data)
        done = step - self.first_step
        rate = (time.time() - self.started) / done if done > 0 else None
        with self.beat.lock:
            self.beat.progress = {"step": step, "total_steps": self.total, "train_loss": record["loss"],
                                  "valid_loss": self.valid_loss, "tokens_per_s": record.get("tokens_per_s")}
            self.beat.estimated_finish = time.time() + rate * (self.total - step) if rate else None

    def note(self, message: str) -> None:
        self.beat.emit(message, "warn" if message.startswith("warning") else "info")

    def stop(self) -> None:
        pass


def train_config(config: ServiceConfig, job: Job, data_dir: Path, adapter_dir: Path, examples: int | None):
    """The job as budwood train's config: the service's recipe, the job's data, seed and hyperparameters."""
    from budwood.config import load_config

    t, hp = config.training, job.hyperparameters
    batch = hp.get("batch_size") if isinstance(hp.get("batch_size"), int) else 8
    epochs = hp.get("n_epochs") if isinstance(hp.get("n_epochs"), int) else 3
    multiplier = hp.get("learning_rate_multiplier")
    lr = t.learning_rate * (multiplier if isinstance(multiplier, int | float) else 1.0)
    save_every = t.checkpoint_every or max(1, math.ceil((examples or batch) / batch))
    raw = {"base_model": job.model, "lora": t.lora.model_dump(),
           "data": {"train": str(data_dir / "train.jsonl"), "format": "auto", "min_examples": t.min_examples,
                    **({"validation": str(data_dir / "validation.jsonl")} if job.validation_file else {})},
           "training": {"epochs": epochs, "batch_size": batch, "learning_rate": lr, "seed": job.seed,
                        "scheduler": t.scheduler, "warmup_ratio": t.warmup_ratio, "max_seq_len": t.max_seq_len,
                        "precision": t.precision, "device": t.device, "compile": t.compile,
                        "save_every": save_every, "eval_every": save_every, "keep_checkpoints": 2},
           "output_dir": str(adapter_dir)}
    return load_config(None, [], base=raw)


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

    def run(self) -> None:
        from budwood.train.recipe import TrainingInterrupted, train

        self.beat.start()
        try:
            self.fetch_files()
            if self.job.status == "validating_files":
                self.validate()
            checkpoint = self.queue.latest_checkpoint(self.job.id)
            if checkpoint is not None:
                self.storage.restore_checkpoint(self.job.id, checkpoint.step, self.adapter_dir)
            self.job = self.queue.start(self.lease, checkpoint.step if checkpoint else None)
            config = train_config(self.config, self.job, self.data_dir, self.adapter_dir, self.job.train_examples)
            try:
                train(config, resume=checkpoint is not None, progress=JobProgress(self.beat),
                      stop=lambda: self.beat.reason, on_checkpoint=self.upload_checkpoint)
            except TrainingInterrupted as e:
                self.stopped(e.step)
                return
            if self.beat.reason:
                self.stopped(None)
                return
            self.plot_losses()
            self.beat.emit("Training finished; evaluating the adapter")
            self.beat.flush()
            self.evaluate()
            self.share()
        except LeaseLost:
            log.warning("%s: lost the lease on %s; another worker has it", self.lease.owner, self.job.id)
        except DBAPIError as e:  # the database away: this attempt ends, the lease runs out, a worker takes over
            log.error("%s: database error during %s, giving it up: %s", self.lease.owner, self.job.id, e)
        except JobFailed as e:
            self.fail(e.code, str(e), e.param)
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
        from budwood.train.recipe import prepare_data

        config = train_config(self.config, self.job, self.data_dir, self.adapter_dir, None)
        try:
            prepared = prepare_data(config, load_tokenizer(self.job.model))
        except (DataError, TrainingError) as e:
            message = self._public(str(e))
            names = [str(i.file) for i in getattr(e, "issues", [])] or [message]
            if self.job.validation_file and all(self.job.training_file not in self._public(n) for n in names) \
                    and any(self.job.validation_file in self._public(n) for n in names):
                raise JobFailed("invalid_validation_file", message, "validation_file") from None
            raise JobFailed("invalid_training_file", message, "training_file") from None
        examples = len(prepared.train)
        hp = resolve_auto(self.job.hyperparameters, examples)
        self.queue.set_hyperparameters(self.lease, hp, examples)
        self.job.hyperparameters, self.job.status, self.job.train_examples = hp, "queued", examples
        for issue in prepared.issues[:20]:
            self.beat.emit(f"warning: {self._public(str(issue))}", "warn")
        return examples

    def _public(self, message: str) -> str:
        """A message fit for the tenant: the local copies named by the tenant's file ids, and no path of
        this worker's or of the service's folders (a path in them is shortened to its last part)."""
        for name, file_id in (("train", self.job.training_file), ("validation", self.job.validation_file)):
            if file_id:
                message = message.replace(str(self.data_dir / f"{name}.jsonl"), file_id)
        for root in {str(self.workdir), str(self.workdir.resolve()), str(self.config.home.expanduser()),
                     str(self.config.home.expanduser().resolve())}:
            message = re.sub(re.escape(root) + r"[^\s'\",;)]*", lambda m: Path(m.group()).name or "…", message)
        return message

    def upload_checkpoint(self, path: Path) -> None:
        import json

        step = int(path.name.removeprefix("step-"))
        self.beat.flush()  # raises LeaseLost (out of train) if the job is no longer ours
        state = json.loads((path / "trainer_state.json").read_text())
        self.storage.put_checkpoint(self.job.id, step, path, [self.adapter_dir / "metrics.jsonl"])
        metrics = {"train_loss": state.get("train_loss"), "valid_loss": state.get("val_loss"),
                   "full_valid_loss": state.get("val_loss")}
        self.queue.add_checkpoint(self.lease, step, metrics, final=False)

    def stopped(self, step: int | None) -> None:
        reason, where = self.beat.reason, f" at step {step}" if step is not None else ""
        if reason == "paused":
            self.beat.flush()
            self.queue.finish(self.lease, "paused", f"Job paused{where}; resume continues from its last checkpoint")
        elif reason == "cancelled":
            self.beat.emit(f"Training stopped{where}: the job was cancelled")
            self.beat.flush()
        elif reason == "shutdown":
            self.beat.flush()
            self.queue.release(self.lease, f"Worker {self.lease.owner} shut down{where}; the job waits for a worker "
                                           "and continues from its last checkpoint")

    def plot_losses(self) -> None:
        from budwood.train.metrics import plot_losses, read_metrics

        plot_losses(read_metrics(self.adapter_dir / "metrics.jsonl"), self.adapter_dir / "loss.png",
                    title=f"{self.job.id}: LoRA on {self.job.model}")

    def evaluate(self) -> None:
        from budwood.eval.results import write_results
        from budwood.eval.run import EvalConfig, run_eval

        ev = self.config.evaluation
        suites = [s for s in ev.suites if s != "domain" or self.job.validation_file]
        if not suites:
            return
        sides = [("adapted", f"{self.job.model}+{self.adapter_dir}")]
        if ev.compare_base:
            sides.append(("base", self.job.model))
        for side, target in sides:
            settings = {**ev.settings, "domain": {**ev.settings.get("domain", {}),
                                                  "data": str(self.data_dir / "validation.jsonl")}}
            config = EvalConfig.model_validate({**settings, "target": target, "suites": suites, "limit": ev.limit,
                                                "precision": "fp32", "device": self.config.training.device})
            results = run_eval(config)
            write_results(results, self.adapter_dir / "eval" / f"{side}.json")
            if side == "adapted":
                summary = ", ".join(f"{suite}.{name}={m.value:.3g}" for suite, r in results.suites.items()
                                    for name, m in list(r.metrics.items())[:2] if m.value is not None)
                self.beat.emit(f"Evaluated: {summary}", data={"suites": suites})
            if self.beat.reason:
                return

    def share(self) -> None:
        """Card, signature, publish, then succeeded; a takeover after a publish finds its version there."""
        import json

        from budwood.card.attest import sign
        from budwood.card.render import CardInfo, render_card
        from budwood.jobs.protocol import fine_tuned_model
        from budwood.registry import publish
        from budwood.registry.names import NotFound, VersionExists

        if self.beat.reason:
            self.stopped(None)
            return
        job = self.job
        ref_id = registry_name(job)
        model = fine_tuned_model(job)
        render_card(self.adapter_dir, CardInfo(
            name=ref_id, license="other", license_name=self.config.adapter_license.removeprefix("LicenseRef-"),
            license_link=f"{self.config.url}/dashboard/adapters/{ref_id}", authors=[job.tenant],
            description=f"Fine-tuned by the budwood service (job {job.id}) on {job.tenant}'s data; served as "
                        f"`{model}`.",
            intended_use=(job.meta or {}).get("intended_use"), out_of_scope=(job.meta or {}).get("out_of_scope")))
        sign(self.adapter_dir, str(self.service.ensure_key()))
        ref = f"{ref_id}@1.0.0"
        provenance = json.loads((self.adapter_dir / "budwood.json").read_text())
        if self.beat.reason:  # cancelled while the card was written: nothing is published
            self.stopped(None)
            return
        try:
            existing = self.service.registry.version_info(ref)
        except NotFound:
            existing = None
        if existing is None:
            terms = self.workdir / "TERMS.txt"
            terms.write_text(self.config.adapter_terms + "\n")
            try:
                _, warnings = publish(self.adapter_dir, ref, self.config.adapter_license, terms_file=terms,
                                      private=True, registry=self.service.registry, publisher="budwood service")
                for w in warnings:
                    self.beat.emit(f"warning: {w}", "warn")
            except VersionExists:  # a worker that lost this job published the same version meanwhile
                existing = self.service.registry.version_info(ref)
        if existing is not None:
            from budwood.models.fingerprint import adapter_fingerprint

            if existing.adapter_fingerprint != adapter_fingerprint(self.adapter_dir):
                raise BudwoodError(f"{ref} is already in the registry with other weights")
        results = self.results_file()
        self.beat.emit(f"New fine-tuned model created: {model}", data={"registry": ref})
        self.beat.flush()
        self.queue.finish(self.lease, "succeeded", "The job has successfully completed", fine_tuned_model=model,
                          registry_ref=ref, trained_tokens=provenance.get("trained_tokens"),
                          result_files=[results] if results else [])

    def results_file(self) -> str | None:
        """The training metrics as OpenAI's results CSV, a `fine-tune-results` file of the tenant's."""
        import csv
        import hashlib
        import io

        from budwood.jobs.queue import new_id
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
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["step", "train_loss", "valid_loss"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))
        data = buffer.getvalue().encode()
        file_id = new_id("file-")
        tmp = self.workdir / "step_metrics.csv"
        tmp.write_bytes(data)
        self.queue.add_file(self.job.tenant, file_id, "step_metrics.csv", "fine-tune-results", len(data),
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
            self.queue.finish(self.lease, "failed", message, "error",
                              error={"code": code, "message": message, "param": param})
        except LeaseLost:
            pass


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
    import os
    import socket

    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    shutdown = shutdown or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: shutdown.set())
    if parent_pid is not None:
        def orphaned() -> None:
            while not shutdown.wait(1.0):
                if os.getppid() != parent_pid:
                    log.warning("worker %s: the service that started it is gone; stopping", worker_id)
                    shutdown.set()
        threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()
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
