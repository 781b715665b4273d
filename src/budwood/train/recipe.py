"""The LoRA fine-tuning recipe, read top to bottom: setup -> data -> model -> loop -> save.

One function, `train(config)`, with no trainer hierarchy or callback maze. Every step is exact and
reproducible: the data plan is a pure function of (seed, epoch), RNG states are checkpointed, and
`resume=True` after a kill gives the same adapter weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

import budwood
from budwood.config import TrainConfig
from budwood.data.formats import Conversation, Dataset, Issue, data_fingerprint, read_dataset
from budwood.data.pack import collate, plan_epoch
from budwood.data.template import IGNORE, Encoded, encode_conversations
from budwood.errors import DataError, TrainingError
from budwood.models.fingerprint import model_fingerprint
from budwood.models.load import load_base, load_tokenizer, pick_device, pick_dtype
from budwood.train import distributed
from budwood.train.checkpoint import list_checkpoints, load_checkpoint, optimizer_from_files, save_checkpoint
from budwood.train.metrics import MetricsLog

log = logging.getLogger(__name__)


class TrainingInterrupted(TrainingError):
    """Ctrl-C, SIGTERM or a `stop` reason: a checkpoint was saved, and `--resume` continues from it."""

    def __init__(self, message: str, step: int = 0, checkpoint: Path | None = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class _Stop(Exception):
    """Raised inside the loop when `stop()` gives a reason, to leave it through the Ctrl-C path."""


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


@dataclass
class PreparedData:
    train: list[Encoded]
    validation: list[Encoded]
    fingerprints: dict
    issues: list[Issue] = field(default_factory=list)


def prepare_data(config: TrainConfig, tokenizer) -> PreparedData:
    """Read, validate, split and tokenise; warnings are collected, errors raise DataError."""
    dc = config.data
    from budwood.eval.data import is_eval_only

    for path in (dc.train, dc.validation):
        if path is not None and is_eval_only(path):
            raise DataError(f"{path}: this is one of budwood's evaluation sets; training on it would void its "
                            "scores, and some are licensed for evaluation only")
    train_ds = read_dataset(dc.train, dc.format, dc.min_examples)
    issues = list(train_ds.issues)
    convs = train_ds.conversations
    val_convs: list[Conversation] = []
    val_ds: Dataset | None = None
    if dc.validation is not None:
        val_ds = read_dataset(dc.validation, dc.format)
        issues += val_ds.issues
        val_convs = val_ds.conversations
    elif dc.validation_split > 0:
        order = list(range(len(convs)))
        random.Random(config.training.seed).shuffle(order)
        n_val = max(1, round(len(convs) * dc.validation_split))
        held = set(order[:n_val])
        val_convs = [c for i, c in enumerate(convs) if i in held]
        convs = [c for i, c in enumerate(convs) if i not in held]
    max_len = config.training.max_seq_len
    train = encode_conversations(tokenizer, convs, max_len, issues)
    validation = encode_conversations(tokenizer, val_convs, max_len, issues) if val_convs else []
    errors = [i for i in issues if i.level == "error"]
    if errors:
        raise DataError(f"{len(errors)} example(s) cannot be tokenised:\n" + "\n".join(map(str, errors[:50])), errors)
    if not train:
        raise TrainingError(f"{dc.train}: no example has trainable assistant tokens")
    fingerprints = {"train": {"path": str(dc.train), "format": train_ds.format, "examples": len(convs),
                              "fingerprint": data_fingerprint(convs)}}
    if val_convs:
        fingerprints["validation"] = {"path": str(dc.validation or dc.train), "examples": len(val_convs),
                                      "fingerprint": data_fingerprint(val_convs),
                                      "split": dc.validation_split if val_ds is None else None}
    return PreparedData(train, validation, fingerprints, issues)


def build_lora_model(base_model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lc = config.lora
    peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                             target_modules=lc.target_modules, use_rslora=lc.use_rslora,
                             bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, peft_config)
    for p in model.parameters():  # trainable LoRA weights stay fp32 even on a bf16 base
        if p.requires_grad:
            p.data = p.data.float()
    return model


COMPILE_AUTO_TOKENS = 5_000_000


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


def _all_rng(states: list[dict]) -> dict:
    """Every rank's RNG state in one checkpoint: rank 0's under its own keys, rank r's as `key.r`."""
    return {**states[0], **{f"{k}.{r}": v for r, s in enumerate(states[1:], start=1) for k, v in s.items()}}


def _rank_rng(states: dict, rank: int) -> dict:
    """This rank's RNG state from a checkpoint; a rank the checkpoint has none for (it was written by
    fewer processes) keeps its seeded stream."""
    if rank == 0:
        return {k: v for k, v in states.items() if "." not in k}
    mine = {k.rsplit(".", 1)[0]: v for k, v in states.items() if k.endswith(f".{rank}")}
    return mine or _rng_state(torch.device("cpu"))


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(rng_tensors: dict, device: torch.device) -> None:
    torch.set_rng_state(rng_tensors["torch"])
    if device.type == "cuda" and "cuda" in rng_tensors:
        torch.cuda.set_rng_state(rng_tensors["cuda"], device)


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@torch.no_grad()
def validation_loss(model, run, examples: list[Encoded], config: TrainConfig, pad_id: int,
                    device: torch.device, dtype: torch.dtype, d: distributed.Dist) -> float:
    """Mean loss per trained token; `run` maps a batch to its token losses. Several ranks share the
    examples out and sum their parts."""
    model.eval()
    total, count = 0.0, 0.0
    t = config.training
    if d.active:
        batches = distributed.share(d, list(range(len(examples))), t.batch_size, [len(e) for e in examples],
                                    t.tokens_per_batch)
    else:
        batches = [(i, 1.0) for i in plan_epoch([len(e) for e in examples], "padded", t.batch_size,
                                                t.tokens_per_batch, 0, 0)]
    for indices, weight in batches:
        with _autocast(device, dtype):
            losses = run(collate(examples, indices, "padded", pad_id).to(device))
        total += losses.sum().item() * weight
        count += losses.numel() * weight
    model.train()
    return d.sum(total) / max(d.sum(count), 1)


def hardware() -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    import peft
    import safetensors
    import tokenizers
    import transformers

    return {"budwood": budwood.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


def train(config: TrainConfig, resume: bool = False, progress: Progress | None = None,
          stop: Callable[[], str | None] | None = None,
          on_checkpoint: Callable[[Path], None] | None = None) -> Path:
    """Train a LoRA adapter; return the adapter directory (config.output_dir).

    `stop` is asked after every optimizer step; a reason (a string) saves a checkpoint and raises
    TrainingInterrupted with it, as Ctrl-C does (the fine-tuning service's cancel, pause and lost
    leases). `on_checkpoint` gets each checkpoint folder once it is complete on disk."""
    d = distributed.setup(config.training.distributed, config.training.device)
    try:
        with locked_output_dir(Path(config.output_dir)) if d.main else nullcontext():
            out = _train(config, resume, (progress or _LogProgress()) if d.main else _Quiet(), stop,
                         on_checkpoint, d)
    except BaseException:
        distributed.teardown(d, failed=True)
        raise
    distributed.teardown(d)
    return out


class _Quiet:
    """The progress of ranks other than 0: rank 0 reports for all."""

    def start(self, total_steps: int, first_step: int) -> None: ...
    def update(self, record: dict) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class _NoMetrics:
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def _train(config: TrainConfig, resume: bool, progress: Progress, stop: Callable[[], str | None] | None,
           on_checkpoint: Callable[[Path], None] | None, d: distributed.Dist) -> Path:
    t = config.training
    out = Path(config.output_dir)
    ckpt_root = out / "checkpoints"
    started = time.perf_counter()

    # --- setup: cheap checks first, weights last ---------------------------------------------
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    device = distributed.device_for(d, pick_device(t.device))
    dtype = pick_dtype(t.precision, device)
    checkpoints = list_checkpoints(ckpt_root)
    if resume and not checkpoints:
        raise TrainingError(f"--resume: no checkpoint in {ckpt_root}")
    if not resume and checkpoints:
        raise TrainingError(f"{out} already has checkpoints; pass --resume to continue, or choose "
                            "another output_dir")
    tokenizer = load_tokenizer(config.base_model)
    pad_id = tokenizer.pad_token_id
    data = prepare_data(config, tokenizer)
    for issue in data.issues:
        progress.note(f"warning: {issue}")
    base_fingerprint = model_fingerprint(config.base_model)
    lengths = [len(e) for e in data.train]
    micro_per_epoch = len(plan_epoch(lengths, t.batching, t.batch_size, t.tokens_per_batch, t.seed, 0))
    total_steps = count_steps(t, micro_per_epoch)

    # --- model, optimizer, schedule ------------------------------------------------------------
    from transformers import get_scheduler

    base = load_base(config.base_model, dtype=dtype, device=device, tokenizer=tokenizer)
    model = build_lora_model(base.model, config)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if t.compile is True or (t.compile == "auto" and total_steps * t.gradient_accumulation / micro_per_epoch
                                          * sum(lengths) >= COMPILE_AUTO_TOKENS):
        compile_layers(model.get_base_model())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # several ranks: the same LoRA init everywhere (the seed above), then each rank its own dropout stream
    wrapped, grad_scale = distributed.wrap(d, model.get_base_model(), device, params)
    loss_module = wrapped.module if hasattr(wrapped, "no_sync") else wrapped  # DDP's inner module

    def run(batch):  # forward only (validation): never through DDP, which expects a backward
        return loss_module(batch.input_ids, batch.labels, batch.position_ids, batch.example_index)

    if d.rank > 0:
        torch.manual_seed(t.seed + 1_000_003 * d.rank)
    label_counts = [sum(1 for x in e.labels[1:] if x != IGNORE) for e in data.train]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)
    scheduler = get_scheduler(t.scheduler, opt, num_warmup_steps=warmup, num_training_steps=total_steps)

    # `done` is the state after the last completed optimizer step: the only thing a checkpoint saves
    done = {"step": 0, "epoch": 0, "cursor": 0, "tokens_seen": 0, "trained_tokens": 0, "elapsed_s": 0.0,
            "train_loss": None, "val_loss": None, "data": data.fingerprints, "base_fingerprint": base_fingerprint,
            "config_hash": _resume_hash(config)}
    rng_after_step = _rng_state(device)
    if resume:
        from peft import set_peft_model_state_dict

        adapter, opt_tensors, rng_tensors, state = load_checkpoint(checkpoints[-1])
        _check_resumable(checkpoints[-1], state, done)
        set_peft_model_state_dict(model, adapter)
        optimizer_from_files(opt, opt_tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng_after_step = _rank_rng(rng_tensors, d.rank)
        _set_rng_state(rng_after_step, device)
        done.update({k: state[k] for k in ("step", "epoch", "cursor", "tokens_seen", "trained_tokens",
                                           "elapsed_s", "train_loss", "val_loss")})
        progress.note(f"resumed from {checkpoints[-1]} (step {done['step']})")
    metrics = MetricsLog(out / "metrics.jsonl", done["step"] if resume else None, config.logging.tensorboard,
                         config.logging.wandb, config.logging.wandb_project, config.resolved()) \
        if d.main else _NoMetrics()

    def checkpoint() -> Path:
        """Every rank calls it (the RNG states are gathered); rank 0 writes."""
        distributed.reshard(d, loss_module)
        state = dict(done, elapsed_s=done["elapsed_s"] + time.perf_counter() - loop_start)
        rng = _all_rng(d.gather(rng_after_step)) if d.active else rng_after_step
        path = ckpt_root / f"step-{done['step']:08d}"
        if d.main:
            path = save_checkpoint(ckpt_root, done["step"], model, opt, scheduler, rng, state, t.keep_checkpoints)
            if on_checkpoint is not None:
                on_checkpoint(path)
        d.barrier()
        return path

    # --- loop ----------------------------------------------------------------------------------
    step, epoch, cursor = done["step"], done["epoch"], done["cursor"]
    plan = plan_epoch(lengths, t.batching, t.batch_size, t.tokens_per_batch, t.seed, epoch)
    progress.start(total_steps, step)
    loop_start = time.perf_counter()
    elapsed_before = done["elapsed_s"]
    window_start, window_tokens = loop_start, 0
    try:
        while step < total_steps:
            window = []
            while len(window) < t.gradient_accumulation:
                if cursor >= len(plan):
                    epoch, cursor = epoch + 1, 0
                    plan = plan_epoch(lengths, t.batching, t.batch_size, t.tokens_per_batch, t.seed, epoch)
                window.append(plan[cursor])
                cursor += 1
            examples = [i for indices in window for i in indices]
            n_labels = sum(label_counts[i] for i in examples)  # the whole step's, on every rank
            # one process runs the step's micro-batches; several share its examples out (distributed.py)
            micro = distributed.share(d, examples, t.batch_size, lengths, t.tokens_per_batch,
                                      t.batching == "packed") if d.active else [(i, 1.0) for i in window]
            loss_sum = 0.0
            for j, (indices, weight) in enumerate(micro):
                batch = collate(data.train, indices, t.batching, pad_id).to(device)
                with distributed.no_sync(wrapped, j == len(micro) - 1):
                    with _autocast(device, dtype):  # through the data-parallel wrapper, if any
                        losses = wrapped(batch.input_ids, batch.labels, batch.position_ids, batch.example_index)
                        loss = losses.sum() * (weight * grad_scale / n_labels)
                    loss.backward()
                loss_sum += losses.sum().item() * weight
            distributed.all_reduce_grads(d, params)
            train_loss = d.sum(loss_sum) / n_labels
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")).item()
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                kept = list_checkpoints(ckpt_root)
                what = (f"loss became {train_loss}" if not math.isfinite(train_loss)
                        else f"gradient norm became {grad_norm}")
                raise TrainingError(f"{what} at step {step + 1}; stopped without applying the update. Last good "
                                    f"checkpoint: {kept[-1] if kept else 'none'}. Lower training.learning_rate "
                                    "(or use precision fp32) and start again in a new output_dir.")
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            rng_after_step = _rng_state(device)
            batch_tokens = sum(lengths[i] for i in examples)
            window_tokens += batch_tokens
            done.update(step=step, epoch=epoch, cursor=cursor, train_loss=train_loss,
                        tokens_seen=done["tokens_seen"] + batch_tokens,
                        trained_tokens=done["trained_tokens"] + n_labels)
            if step % config.logging.every == 0 or step == total_steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                record = {"step": step, "epoch": round(epoch + cursor / max(len(plan), 1), 4),
                          "loss": round(train_loss, 6), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "tokens": done["tokens_seen"], "tokens_per_s": round(tps, 1),
                          "elapsed_s": round(elapsed_before + now - loop_start, 2)}
                metrics.write(record)
                progress.update(dict(record, total_steps=total_steps))
            if data.validation and (step % t.eval_every == 0 or step == total_steps):
                done["val_loss"] = validation_loss(model, run, data.validation, config, pad_id, device, dtype, d)
                distributed.reshard(d, loss_module)
                metrics.write({"step": step, "val_loss": round(done["val_loss"], 6)})
                progress.update({"step": step, "val_loss": done["val_loss"], "total_steps": total_steps})
            if step % t.save_every == 0 and step < total_steps:
                checkpoint()
            reason = stop() if stop is not None and step < total_steps else None
            if d.active and stop is not None:  # rank 0 decides for all, or they would part ways
                reason = d.gather(reason)[0]
            if reason:
                raise _Stop(reason)
    except (KeyboardInterrupt, _Stop) as e:
        # a signal finds several ranks at different points: they keep the last periodic checkpoint (a stop
        # reason, decided by rank 0 for all, finds them together)
        path = checkpoint() if done["step"] > 0 and (not d.active or isinstance(e, _Stop)) else None
        metrics.close()
        what = str(e) if isinstance(e, _Stop) else "interrupted"
        raise TrainingInterrupted(f"{what} at step {done['step']}; " + (
            f"checkpoint saved to {path}; run again with --resume to continue" if path
            else "nothing to save yet"), step=done["step"], checkpoint=path) from None

    # --- save ----------------------------------------------------------------------------------
    train_time = elapsed_before + time.perf_counter() - loop_start
    checkpoint()
    if not d.main:
        return out
    model.save_pretrained(out)
    _portable_config(out / "adapter_config.json", config.base_model)
    metrics.close()
    provenance = {
        "budwood_version": budwood.__version__,
        "base_model": {"name": config.base_model, "fingerprint": base_fingerprint},
        "data": data.fingerprints,
        "config": config.resolved(),
        "config_hash": config.config_hash(),
        "versions": versions(),
        "hardware": dict(hardware(), device=str(device), dtype=str(dtype).replace("torch.", ""),
                         processes=d.world, strategy=d.strategy),
        "steps": step, "epochs": round(epoch + cursor / max(len(plan), 1), 4),
        "tokens_seen": done["tokens_seen"], "trained_tokens": done["trained_tokens"],
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_time_s": round(train_time, 2),
        "final": {"train_loss": done["train_loss"], "val_loss": done["val_loss"]},
        "data_warnings": len(data.issues),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = out / "budwood.json.tmp"
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    os.replace(tmp, out / "budwood.json")
    return out


@contextmanager
def locked_output_dir(out: Path) -> Iterator[None]:
    """One training process per output_dir (a second one would interleave checkpoints), and never
    into a folder of someone else's files."""
    import fcntl

    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "checkpoints").exists() and not (out / ".lock").exists():
        raise TrainingError(f"output_dir {out} is not empty and was not made by budwood; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"{out} is in use by another training process") from None
        yield


def _portable_config(adapter_config: Path, base_model: str) -> None:
    """peft records the local path it loaded from: record the name others can load instead. peft also
    writes "all-linear" as a list in set order, which changes with Python's hash seed: sort it, so the
    same training gives the same file (and adapter fingerprint) in every process."""
    cfg = json.loads(adapter_config.read_text())
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    adapter_config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_resumable(path: Path, saved: dict, now: dict) -> None:
    if saved["config_hash"] != now["config_hash"]:
        raise TrainingError(f"{path}: the checkpoint was written with a different config; resume needs the same "
                            "model, data, LoRA and optimisation settings (the step budget may change)")
    if saved.get("base_fingerprint") != now["base_fingerprint"]:
        raise TrainingError(f"{path}: the base model's weights changed since the checkpoint")
    for split, info in now["data"].items():
        if saved.get("data", {}).get(split, {}).get("fingerprint") != info["fingerprint"]:
            raise TrainingError(f"{path}: the {split} data ({info['path']}) changed since the checkpoint")


def _resume_hash(config: TrainConfig) -> str:
    """What must match between a checkpoint and its resume: all but the step budget and bookkeeping.
    Paths are not part of it (the data is checked by its fingerprints), so a run resumes in a moved
    folder or on another machine, as the fine-tuning service's workers do."""
    import hashlib

    resolved = config.resolved()
    for key in ("max_steps", "epochs", "save_every", "eval_every", "keep_checkpoints", "compile", "distributed"):
        resolved["training"].pop(key, None)
    for key in ("train", "validation"):
        resolved["data"].pop(key, None)
    resolved.pop("logging", None)
    resolved.pop("output_dir", None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
