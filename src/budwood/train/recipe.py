"""The LoRA fine-tuning recipe, read top to bottom: setup -> train (step after step) -> checkpoint -> finish.

One class, `TrainingRun`, behind one function, `train(config)`, with no trainer hierarchy or callback
maze: the run's state is typed attributes (RunState is what a checkpoint saves), the loss comes from
one Objective chosen at setup, and the processes it runs in are a Strategy called at a few fixed
points, so the recipe reads as if it ran in one process. Every step is exact and reproducible: the
data plan is a pure function of (seed, epoch), RNG states are checkpointed, and `resume=True` after a
kill gives the same adapter weights as an uninterrupted run.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol

import torch

import budwood
from budwood.config import TrainConfig
from budwood.data.pack import plan_epoch
from budwood.errors import TrainingError
from budwood.models.fingerprint import model_fingerprint
from budwood.models.load import load_base, load_tokenizer, pick_device, pick_dtype
from budwood.models.quant import QuantPlan, prepare_for_kbit_training, quant_plan
from budwood.train import checkpoint as ckpt
from budwood.train import distributed
from budwood.train.data import EpochCursor, PreparedData, prepare_data
from budwood.train.distributed import Chunking, Strategy
from budwood.train.init_adapter import AdapterResolver, InitAdapter, load_init_weights, resolve_init_adapter
from budwood.train.loss import LossModule, Objective, ReferenceLogps, objective_for
from budwood.train.metrics import MetricsLog
from budwood.train.optim import make_optimizer
from budwood.train.outputs import hardware, locked_output_dir, portable_config, versions, write_provenance
from budwood.train.state import RunIdentity, RunState, StopReason, resume_hash

__all__ = ["COMPILE_AUTO_TOKENS", "Progress", "StopReason", "TrainingInterrupted", "TrainingRun", "build_lora_model",
           "compile_layers", "count_steps", "train"]

log = logging.getLogger(__name__)

COMPILE_AUTO_TOKENS = 5_000_000


class TrainingInterrupted(TrainingError):
    """Ctrl-C, SIGTERM or a `stop` reason: a checkpoint was saved, and `--resume` continues from it.
    `reason` is StopReason.INTERRUPTED for a signal, else what `stop` returned."""

    def __init__(self, message: str, step: int = 0, checkpoint: Path | None = None,
                 reason: StopReason | str = StopReason.INTERRUPTED):
        super().__init__(message)
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


@dataclass(frozen=True)
class Stopped:
    """Why a run ended before its budget: a signal (Ctrl-C, SIGTERM) or whatever `stop` returned."""

    reason: StopReason | str
    signal: bool
    detail: str | None = None  # what happened, where the reason alone does not say (the loss watchdog's numbers)


class Progress(Protocol):
    def start(self, total_steps: int, first_step: int) -> None: ...
    def update(self, record: dict) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class _LogProgress:
    def start(self, total_steps: int, first_step: int) -> None:
        log.info("training steps %d..%d", first_step + 1, total_steps)

    def update(self, record: dict) -> None:
        log.info("%s", record)

    def note(self, message: str) -> None:
        log.info("%s", message)

    def stop(self) -> None:
        pass


class _Quiet:
    """The progress of ranks other than 0: rank 0 reports for all."""

    def start(self, total_steps: int, first_step: int) -> None: ...
    def update(self, record: dict) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class _NoMetrics:
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def build_lora_model(base_model, config: TrainConfig, init: InitAdapter | None = None):
    from peft import LoraConfig, get_peft_model

    lc = config.lora
    peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                             target_modules=lc.target_modules, use_rslora=lc.use_rslora,
                             bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, peft_config)
    if init is not None:
        load_init_weights(model, init)
    for p in model.parameters():  # trainable LoRA weights stay fp32 even on a bf16 base
        if p.requires_grad:
            p.data = p.data.float()
    return model


def count_steps(t, micro_per_epoch: int) -> int:
    """Optimizer steps for the run; accumulation windows run across epoch boundaries."""
    return t.max_steps or max(1, math.ceil(t.epochs * micro_per_epoch / t.gradient_accumulation))


def compile_layers(lm) -> None:
    """Compile each decoder layer (dynamic shapes): fuses the norm, rotary, activation, LoRA-scaling and
    residual element-wise work that otherwise costs as much as the matrix products on a small model.
    Layers share one compiled graph, so compiling costs about as much as compiling one layer."""
    decoder = lm.get_decoder()
    for layer in getattr(decoder, "layers", [decoder]):
        layer.compile(dynamic=True)


def train(config: TrainConfig, resume: bool = False, progress: Progress | None = None,
          stop: Callable[[], str | None] | None = None,
          on_checkpoint: Callable[[Path], None] | None = None,
          resolve_adapter: AdapterResolver | None = None) -> Path:
    """Train a LoRA adapter; return the adapter directory (config.output_dir).

    `stop` is asked after every optimizer step; a reason (a StopReason, or any string) saves a
    checkpoint and raises TrainingInterrupted with it, as Ctrl-C does (the fine-tuning service's
    cancel, pause and lost leases). `on_checkpoint` gets each checkpoint folder once it is complete on
    disk. `resolve_adapter` pulls an init_adapter given as a registry id (the CLI passes the registry's)."""
    config, init = resolve_init_adapter(config, resolve_adapter)
    strategy = distributed.strategy_for(config.training.distributed, config.training.device)
    try:
        with locked_output_dir(Path(config.output_dir)) if strategy.is_main else nullcontext():
            run = TrainingRun(config, strategy, progress or _LogProgress(), stop, on_checkpoint, init)
            run.setup(resume)
            stopped = run.train()
            if stopped is not None:
                run.interrupt(stopped)
            out = run.finish()
    except BaseException:
        strategy.teardown(failed=True)
        raise
    strategy.teardown()
    return out


@dataclass
class Clock:
    """Wall-clock bookkeeping. Only the training time crosses a resume (RunState.elapsed_s)."""

    started: float = field(default_factory=time.perf_counter)  # train() began: provenance's wall_time_s
    loop_start: float = 0.0
    elapsed_before: float = 0.0  # the training time of the runs this one resumed
    window_start: float = 0.0  # tokens_per_s is measured over the steps since the last metrics line
    window_tokens: int = 0

    def start_loop(self, elapsed_before: float) -> None:
        self.loop_start = self.window_start = time.perf_counter()
        self.elapsed_before = elapsed_before

    def training_time(self, now: float | None = None) -> float:
        return self.elapsed_before + (time.perf_counter() if now is None else now) - self.loop_start

    def tokens_per_s(self, now: float) -> float:
        """Over the window since the last call, which starts the next one."""
        tps = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        return tps


@dataclass
class StepResult:
    train_loss: float
    grad_norm: float


class TrainingRun:
    """One run of the recipe on one rank: `setup()`, `train()` (calling `step()` until the budget is
    spent or something stops it), then `finish()` or `interrupt()`. Every rank runs the same code;
    only the main rank reports progress and writes files."""

    config: TrainConfig
    strategy: Strategy
    state: RunState  # after the last completed optimizer step: what a checkpoint saves
    rng_after_step: dict[str, torch.Tensor]  # this rank's RNG state at that point, saved with it
    identity: RunIdentity  # what a checkpoint must share with this run to resume it
    position: EpochCursor  # where the loop is in the data; ahead of `state` while a step runs
    clock: Clock
    # set up once
    data: PreparedData
    lengths: list[int]  # tokens per training example through the decoder (objective.length)
    units: list[int]  # the objective's units per training example (SFT: trained tokens; DPO: 1 pair)
    chunking: Chunking
    total_steps: int
    device: torch.device
    dtype: torch.dtype
    quant: QuantPlan  # how the base's weights are held (config.quantization on this device)
    model: torch.nn.Module  # the peft model: what checkpoints and the adapter are saved from
    objective: Objective
    loss_module: LossModule  # forward = the objective's losses; validation runs it
    train_module: torch.nn.Module  # the same, wrapped by the strategy; training steps run it
    params: list[torch.nn.Parameter]  # the trainable (LoRA) weights
    opt: torch.optim.Optimizer

    def __init__(self, config: TrainConfig, strategy: Strategy, progress: Progress,
                 stop: Callable[[], str | None] | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None, init: InitAdapter | None = None):
        self.config, self.t, self.strategy, self.init = config, config.training, strategy, init
        self.out = Path(config.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.progress: Progress = progress if strategy.is_main else _Quiet()
        self.stop, self.on_checkpoint = stop, on_checkpoint
        self.clock = Clock()
        self.state = RunState()
        self.metrics: MetricsLog | _NoMetrics = _NoMetrics()
        self.step_stats: dict[str, float] = {}  # the objective's statistics over the last step (DPO's rewards)
        self.reference: torch.Tensor | None = None  # DPO: [pairs, 2] reference log-probabilities, checkpointed

    # --- setup: cheap checks first, weights last -----------------------------------------------
    def setup(self, resume: bool) -> None:
        t = self.t
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.device = self.strategy.place(pick_device(t.device))
        self.dtype = pick_dtype(t.precision, self.device)
        checkpoints = ckpt.list_checkpoints(self.ckpt_root)
        if resume and not checkpoints:
            raise TrainingError(f"--resume: no checkpoint in {self.ckpt_root}")
        if not resume and checkpoints:
            raise TrainingError(f"{self.out} already has checkpoints; pass --resume to continue, or choose "
                                "another output_dir")
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self.rng_after_step = ckpt.rng_state(self.device)
        if self.objective.name == "dpo":
            self._setup_reference(checkpoints[-1] if resume else None)
        if resume:
            self._load_checkpoint(checkpoints[-1])
        if self.strategy.is_main:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", self.state.step if resume else None,
                                      self.config.logging, self.config.resolved())

    def _setup_data(self) -> None:
        t = self.t
        self.tokenizer = load_tokenizer(self.config.base_model)
        self.pad_id = self.tokenizer.pad_token_id
        self.data = prepare_data(self.config, self.tokenizer)
        for issue in self.data.issues:
            self.progress.note(f"warning: {issue}")
        fingerprints = dict(self.data.fingerprints)
        if self.init is not None:  # a resume must continue from the very same starting adapter
            fingerprints["init_adapter"] = {"path": self.init.ref, "fingerprint": self.init.fingerprint}
        self.identity = RunIdentity(fingerprints, model_fingerprint(self.config.base_model), resume_hash(self.config))
        self.objective = objective_for(self.config)
        self.lengths = [self.objective.length(e) for e in self.data.train]
        self.chunking = Chunking(self.lengths, t.batch_size, t.tokens_per_batch, t.batching == "packed")
        self.micro_per_epoch = len(self._plan(0))
        self.total_steps = count_steps(t, self.micro_per_epoch)
        steps_per_epoch = max(1, -(-self.micro_per_epoch // t.gradient_accumulation))
        self.eval_every = max(1, steps_per_epoch // t.evals_per_epoch) if t.evals_per_epoch else t.eval_every
        self.save_every = max(1, steps_per_epoch // t.saves_per_epoch) if t.saves_per_epoch else t.save_every
        self.high_loss_steps = 0  # the loss watchdog's count of steps in a row above its threshold

    def _plan(self, epoch: int) -> list[list[int]]:
        t = self.t
        return plan_epoch(self.lengths, t.batching, t.batch_size, t.tokens_per_batch, t.seed, epoch)

    def _setup_model(self) -> None:
        t = self.t
        self.quant = quant_plan(self.config.quantization, self.device, self.dtype)
        if self.quant.quantized and (self.strategy.name == "fsdp" or
                                     (self.strategy.name == "ddp" and self.quant.library == "torchao")):
            raise TrainingError(f"quantization {self.config.quantization!r} ({self.quant.library}) with "
                                f"training.distributed {self.strategy.name}: its weights cannot be "
                                f"{'sharded' if self.strategy.name == 'fsdp' else 'broadcast by DDP'}; train in one "
                                "process, or with quantization none (docs/quantization.md)")
        base = load_base(self.config.base_model, dtype=self.dtype, device=self.device, tokenizer=self.tokenizer,
                         quantization=self.config.quantization)
        self.model = build_lora_model(prepare_for_kbit_training(base.model, self.quant), self.config, self.init)
        if t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        planned_tokens = self.total_steps * t.gradient_accumulation / self.micro_per_epoch * sum(self.lengths)
        if t.compile is True or (t.compile == "auto" and planned_tokens >= COMPILE_AUTO_TOKENS):
            compile_layers(self.model.get_base_model())
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # several ranks: the same LoRA init everywhere (the seed above), then each rank its own dropout stream
        self.loss_module = LossModule(self.model.get_base_model(), self.objective)
        self.train_module = self.strategy.wrap(self.loss_module, self.device, self.params)
        if self.strategy.rank > 0:
            torch.manual_seed(t.seed + 1_000_003 * self.strategy.rank)
        self.units = [self.objective.units(e) for e in self.data.train]

    def _setup_reference(self, checkpoint: Path | None) -> None:
        """DPO's reference log-probabilities of every pair's answers, training and validation: read from the
        checkpoint a resume starts from, else computed now, before any update: by the base with the adapter
        switched off (a fresh LoRA is the identity, so this is the policy at step 0, at less cost), or by base +
        init_adapter. Training pairs go in the batches of the run's own first epoch, so that even in bf16, where
        a sequence's numbers depend on its batch mates, the first step's loss is ln 2."""
        t, train, validation = self.t, self.data.train, self.data.validation
        saved = ckpt.load_reference(checkpoint) if checkpoint is not None else None
        if saved is not None and saved.shape == (len(train) + len(validation), 2):
            values = saved
        else:
            self.progress.note(f"DPO: the reference's log-probabilities of {len(train) + len(validation)} pairs")
            lengths = [self.objective.length(p) for p in validation]
            parts = [self._reference_logps(train, self._plan(0), self.chunking, t.batching)]
            if validation:  # as validation_loss batches them
                parts.append(self._reference_logps(
                    validation, plan_epoch(lengths, "padded", t.batch_size, t.tokens_per_batch, 0, 0),
                    Chunking(lengths, t.batch_size, t.tokens_per_batch), "padded"))
            values = torch.cat(parts)
        for pair, (chosen, rejected) in zip(train + validation, values.tolist(), strict=True):
            pair.reference = (chosen, rejected)
        self.reference = values

    @torch.no_grad()
    def _reference_logps(self, pairs: list, planned: list[list[int]], chunking: Chunking, batching: str
                         ) -> torch.Tensor:
        """[pairs, 2]; the ranks share the pairs out and gather every part."""
        micro = self.strategy.deal(planned, list(range(len(pairs))), chunking)
        self.model.eval()
        self.loss_module.objective = ReferenceLogps()
        mine: dict[int, tuple[float, float]] = {}
        try:
            with self.model.disable_adapter() if self.init is None else nullcontext():
                for indices, weight in micro:
                    batch = self.objective.collate(pairs, indices, batching, self.pad_id).to(self.device)
                    with self._autocast():
                        logps = self.loss_module.run(batch).tolist()
                    if weight:
                        mine.update(zip(indices, map(tuple, logps), strict=True))
        finally:
            self.loss_module.objective = self.objective
        self.model.train()
        self.strategy.reshard()
        merged = {i: v for part in self.strategy.gather(mine) for i, v in part.items()}
        return torch.tensor([merged[i] for i in range(len(pairs))], dtype=torch.float64)

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        t = self.t
        self.opt = make_optimizer(t, self.params, self.device)
        warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(t.scheduler, self.opt, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)

    def _load_checkpoint(self, path: Path) -> None:
        from peft import set_peft_model_state_dict

        adapter, opt_tensors, rng_tensors, saved = ckpt.load_checkpoint(path)
        self.identity.check(path, saved)
        set_peft_model_state_dict(self.model, adapter)
        ckpt.optimizer_from_files(self.opt, opt_tensors, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.rng_after_step = ckpt.rank_rng(rng_tensors, self.strategy.rank)
        ckpt.set_rng_state(self.rng_after_step, self.device)
        self.state = RunState.from_saved(saved)
        self.progress.note(f"resumed from {path} (step {self.state.step})")

    # --- train ---------------------------------------------------------------------------------
    def train(self) -> Stopped | None:
        """Steps until the budget is spent (None), a signal, or `stop` gives a reason (whatever it is)."""
        self.position = EpochCursor(self._plan, self.state.epoch, self.state.cursor)
        self.progress.start(self.total_steps, self.state.step)
        self.clock.start_loop(self.state.elapsed_s)
        try:
            while self.state.step < self.total_steps:
                result = self.step()
                step = self.state.step
                if step % self.config.logging.every == 0 or step == self.total_steps:
                    self._log_step(result)
                if self.data.validation and (step % self.eval_every == 0 or step == self.total_steps):
                    self._validate()
                if step % self.save_every == 0 and step < self.total_steps:
                    self.checkpoint()
                watchdog = self._loss_watchdog(result)
                if watchdog:
                    return Stopped(StopReason.LOSS_WATCHDOG, signal=False, detail=watchdog)
                reason = self._stop_requested()
                if reason:
                    return Stopped(reason, signal=False)
        except KeyboardInterrupt:
            return Stopped(StopReason.INTERRUPTED, signal=True)
        return None

    def _loss_watchdog(self, result: StepResult) -> str | None:
        """Axolotl's loss watchdog: a loss above the threshold for `patience` steps in a row stops the run with
        a checkpoint (a diverging run wastes the rest of its budget). Every rank sees the same loss."""
        threshold = self.t.loss_watchdog_threshold
        if threshold is None:
            return None
        self.high_loss_steps = self.high_loss_steps + 1 if result.train_loss > threshold else 0
        if self.high_loss_steps < self.t.loss_watchdog_patience:
            return None
        return (f"the training loss stayed above {threshold} for {self.high_loss_steps} steps "
                "(training.loss_watchdog_threshold)")

    def step(self) -> StepResult:
        """One optimizer step over the next gradient_accumulation micro-batches of the plan. The loss is
        the sum over the step's units divided by their number (counted on every rank), so it is the
        single-process loss however the strategy deals the step out. A nan or inf stops the run before
        the update is applied."""
        window = self.position.take(self.t.gradient_accumulation)
        examples = [i for indices in window for i in indices]
        n_units = sum(self.units[i] for i in examples)
        micro = self.strategy.deal(window, examples, self.chunking)
        sums = torch.zeros(1 + len(self.objective.columns), dtype=torch.float64)  # the loss, then statistics
        for j, (indices, weight) in enumerate(micro):
            batch = self.objective.collate(self.data.train, indices, self.t.batching, self.pad_id).to(self.device)
            with self.strategy.accumulate(last=j == len(micro) - 1):
                with self._autocast():  # through the data-parallel wrapper, if any
                    out = self.train_module(batch.input_ids, batch.labels, batch.position_ids, batch.example_index,
                                            batch.reference, batch.attention_mask)
                    loss = out[:, 0].sum() * (weight * self.strategy.grad_scale / n_units)
                loss.backward()
            sums += out.detach().sum(0).double().cpu() * weight
        self.strategy.reduce_grads(self.params)
        train_loss = self.strategy.sum(sums[0].item()) / n_units
        self.step_stats = {name: self.strategy.sum(v) / n_units
                           for name, v in zip(self.objective.columns, sums[1:].tolist(), strict=True)}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.t.max_grad_norm or float("inf")).item()
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            self._non_finite(train_loss, grad_norm)
        self.opt.step()
        self.scheduler.step()
        self.opt.zero_grad(set_to_none=True)
        self._commit(train_loss, sum(self.lengths[i] for i in examples), n_units)
        return StepResult(train_loss, grad_norm)

    def _commit(self, train_loss: float, tokens: int, units: int) -> None:
        """The step is done: the run state moves to it (a checkpoint from now on saves it)."""
        self.rng_after_step = ckpt.rng_state(self.device)
        self.clock.window_tokens += tokens
        s = self.state
        s.step, s.epoch, s.cursor, s.train_loss = s.step + 1, self.position.epoch, self.position.cursor, train_loss
        s.tokens_seen += tokens
        s.trained_tokens += units

    def _non_finite(self, train_loss: float, grad_norm: float) -> NoReturn:
        kept = ckpt.list_checkpoints(self.ckpt_root)
        what = f"loss became {train_loss}" if not math.isfinite(train_loss) else f"gradient norm became {grad_norm}"
        raise TrainingError(f"{what} at step {self.state.step + 1}; stopped without applying the update. Last good "
                            f"checkpoint: {kept[-1] if kept else 'none'}. Lower training.learning_rate "
                            "(or use precision fp32) and start again in a new output_dir.")

    def _log_step(self, result: StepResult) -> None:
        now = time.perf_counter()
        tps = self.clock.tokens_per_s(now)
        record = {"step": self.state.step, "epoch": self.position.epochs, "loss": round(result.train_loss, 6),
                  **{name: round(v, 6) for name, v in self.step_stats.items()},
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
                  "tokens": self.state.tokens_seen, "tokens_per_s": round(tps, 1),
                  "elapsed_s": round(self.clock.training_time(now), 2)}
        self.metrics.write(record)
        self.progress.update(dict(record, total_steps=self.total_steps))

    def _validate(self) -> None:
        self.state.val_loss = self.validation_loss()
        self.strategy.reshard()
        self.metrics.write({"step": self.state.step, "val_loss": round(self.state.val_loss, 6)})
        self.progress.update({"step": self.state.step, "val_loss": self.state.val_loss,
                              "total_steps": self.total_steps})

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss per unit over the validation set, through the unwrapped module (a forward alone
        through DDP would wait for a backward). Several ranks share the examples out and sum their parts."""
        t, examples = self.t, self.data.validation
        lengths = [self.objective.length(e) for e in examples]
        planned = plan_epoch(lengths, "padded", t.batch_size, t.tokens_per_batch, 0, 0)
        micro = self.strategy.deal(planned, list(range(len(examples))),
                                   Chunking(lengths, t.batch_size, t.tokens_per_batch))
        self.model.eval()
        total, count = 0.0, 0.0
        for indices, weight in micro:
            with self._autocast():
                batch = self.objective.collate(examples, indices, "padded", self.pad_id).to(self.device)
                losses = self.loss_module.run(batch)[:, 0]
            total += losses.sum().item() * weight
            count += losses.numel() * weight
        self.model.train()
        return self.strategy.sum(total) / max(self.strategy.sum(count), 1)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.dtype == torch.bfloat16)

    def _stop_requested(self) -> str | None:
        """`stop`'s reason, as rank 0 sees it for all (ranks that parted ways would hang)."""
        if self.stop is None:
            return None
        return self.strategy.from_main(self.stop() if self.state.step < self.total_steps else None)

    # --- checkpoint ----------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Save the state after the last completed step. Every rank calls it (the RNG states are
        gathered); the main rank writes, and the others wait for it."""
        self.strategy.reshard()
        saved = self.state.saved(self.identity, self.clock.training_time())
        rng = ckpt.all_ranks_rng(self.strategy.gather(self.rng_after_step))
        path = self.ckpt_root / f"step-{self.state.step:08d}"
        if self.strategy.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.opt, self.scheduler,
                                        rng, saved, self.t.keep_checkpoints, self.reference)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path)
        self.strategy.barrier()
        return path

    # --- finish --------------------------------------------------------------------------------
    def interrupt(self, stopped: Stopped) -> NoReturn:
        """Checkpoint and raise TrainingInterrupted. A signal finds several ranks at different points:
        they keep the last periodic checkpoint (a `stop` reason, decided by rank 0, finds them together)."""
        reason = stopped.reason
        save = self.state.step > 0 and (self.strategy.saves_on_signal or not stopped.signal)
        path = self.checkpoint() if save else None
        self.metrics.close()
        if reason is StopReason.LOSS_WATCHDOG:  # a diverged run: continuing it is not the advice
            raise TrainingInterrupted(f"{reason}: {stopped.detail}; stopped at step {self.state.step}, checkpoint "
                                      f"{path}; lower the learning rate or raise the threshold and train again",
                                      step=self.state.step, checkpoint=path, reason=reason)
        raise TrainingInterrupted(f"{reason} at step {self.state.step}; " + (
            f"checkpoint saved to {path}; run again with --resume to continue" if path
            else "nothing to save yet"), step=self.state.step, checkpoint=path, reason=reason)

    def finish(self) -> Path:
        """The last checkpoint on every rank; then the main rank writes the adapter and its provenance."""
        train_time = self.clock.training_time()
        self.checkpoint()
        if self.strategy.is_main:
            self.model.save_pretrained(self.out)
            portable_config(self.out / "adapter_config.json", self.config.base_model)
            self.metrics.close()
            write_provenance(self.out, self._provenance(train_time))
        return self.out

    def _method(self) -> dict:
        """How the adapter was trained, for the card: the objective and its settings, and where it started."""
        method: dict = {"type": self.objective.name}
        if self.t.dpo is not None:
            method["dpo"] = self.t.dpo.model_dump()
            method["pairs_seen"] = self.state.trained_tokens  # DPO's units are pairs
        if self.init is not None:
            method["init_adapter"] = self.init.provenance()
        return method

    def _provenance(self, train_time: float) -> dict:
        """budwood.json: what was trained, from what, with what, on what, and how it ended."""
        config = self.config
        return {
            "budwood_version": budwood.__version__,
            "base_model": {"name": config.base_model, "fingerprint": self.identity.base_fingerprint,
                           "quantization": self.quant.quantization,  # eval loads the base the same way
                           **({"quantized_with": self.quant.describe()} if self.quant.quantized else {})},
            "data": self.data.fingerprints,
            "config": config.resolved(),
            "config_hash": config.config_hash(),
            "method": self._method(),
            "reliability": self.data.reliability,
            "versions": versions(),
            "hardware": dict(hardware(), device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                             processes=self.strategy.world, strategy=self.strategy.name),
            "steps": self.state.step, "epochs": self.position.epochs,
            "tokens_seen": self.state.tokens_seen, "trained_tokens": self.state.trained_tokens,
            "wall_time_s": round(time.perf_counter() - self.clock.started, 2),
            "train_time_s": round(train_time, 2),
            "final": {"train_loss": self.state.train_loss, "val_loss": self.state.val_loss},
            "data_warnings": len(self.data.issues),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
