"""LLaMA-Factory's YAML (its examples/train_lora and train_qlora files) read into budwood's TrainConfig.

Datasets are named as LLaMA-Factory names them: entries of `dataset_dir`/dataset_info.json (file_name or
hf_hub_url, formatting alpaca | sharegpt, ranking, columns, tags), so an existing data folder trains as is.
LLaMA-Factory's defaults differ from budwood's where they matter and are carried over: lora_rank 8,
lora_alpha twice the rank, gradient checkpointing on, sft when no stage is given.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from budwood.interop.keys import (
    OPTIMIZERS,
    PRECISION,
    SCHEDULERS,
    TRACKERS,
    Converted,
    Dialect,
    KeyReader,
    as_float,
    as_list,
)

MAX_INFO_BYTES = 16 << 20  # dataset_info.json
SPEED_ONLY = "changes only speed or memory, not what is learned"
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value"}
SHAREGPT_ROLES = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
                  "function_tag": "function_call", "system_tag": "system"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}

KNOWN = (
    "model_name_or_path", "adapter_name_or_path", "trust_remote_code", "quantization_bit", "quantization_method",
    "quantization_type", "double_quantization", "stage", "do_train", "do_eval", "do_predict", "finetuning_type",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora", "additional_target",
    "pref_beta", "pref_loss", "pref_ftx", "dataset", "eval_dataset", "dataset_dir", "template", "cutoff_len",
    "max_samples", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers", "output_dir",
    "logging_steps", "save_steps", "save_total_limit", "plot_loss", "overwrite_output_dir", "save_only_model",
    "report_to", "run_name", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "bf16",
    "fp16", "pure_bf16", "ddp_timeout", "val_size", "per_device_eval_batch_size", "eval_strategy", "eval_steps",
    "seed", "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "disable_gradient_checkpointing",
    "flash_attn", "resume_from_checkpoint", "deepspeed", "packing", "neat_packing", "train_on_prompt",
    "mask_history", "hub_model_id", "push_to_hub", "mix_strategy", "interleave_probs", "streaming",
    "save_strategy", "tokenized_path",
)


def looks_like(raw: dict[str, Any]) -> bool:
    return any(k in raw for k in ("model_name_or_path", "finetuning_type", "stage", "cutoff_len"))


def convert(raw: dict[str, Any], source: str) -> Converted:
    r = KeyReader(raw, source, Dialect.LLAMA_FACTORY)
    _model(r)
    _method(r)
    _data(r)
    _training(r)
    _output(r)
    return r.finish(KNOWN)


def _model(r: KeyReader) -> None:
    base = r.take("model_name_or_path")
    if base is None:
        r.fail("model_name_or_path", "missing: name the model to fine-tune")
    else:
        r.set("base_model", str(base))
    adapters = r.take("adapter_name_or_path")
    if adapters is not None:
        names = as_list(adapters)
        if len(names) != 1:
            r.fail("adapter_name_or_path", "budwood continues one adapter; merge the others first (budwood merge)")
        else:
            r.set("init_adapter", str(names[0]))
    r.note("trust_remote_code", "budwood never runs code from a model repository; architectures transformers "
           "knows load without it (one that needs it is refused when loading)")
    bits = r.take("quantization_bit")
    method = r.take("quantization_method", "bnb")
    kind = r.take("quantization_type", "nf4")
    double = r.flag("double_quantization", True)
    if bits is not None and (bits := r.integer("quantization_bit", bits)) is not None:
        if method not in ("bnb", "bitsandbytes"):
            r.fail("quantization_method", f"{method!r}: budwood quantises with bitsandbytes (or int8 on CPU)")
        elif bits == 4 and kind == "nf4":
            r.set("quantization", "nf4")
        elif bits == 8:
            r.set("quantization", "int8")
        else:
            r.fail("quantization_bit", f"{bits!r} ({kind}): budwood has 4-bit nf4 and 8-bit")
        if double is not True and bits == 4:
            r.fail("double_quantization", f"{double!r}: budwood's nf4 always quantises the quantisation constants "
                   "too; remove it")


def _method(r: KeyReader) -> None:
    stage = r.take("stage", "sft")
    if stage not in ("sft", "dpo"):
        r.fail("stage", f"{stage!r}: budwood trains sft and dpo")
    elif stage == "dpo":
        r.set("training.method", "dpo")
        r.rename("pref_beta", "training.dpo.beta", as_float)
        loss = r.take("pref_loss")
        if loss not in (None, "sigmoid", "ipo"):
            r.fail("pref_loss", f"{loss!r}: budwood's DPO losses are sigmoid and ipo")
        elif loss:
            r.set("training.dpo.loss_type", loss)
        r.rename("pref_ftx", "training.dpo.sft_weight", as_float)
    else:
        for key in ("pref_beta", "pref_loss", "pref_ftx"):
            r.refuse(key, "set stage: dpo to use it")
    if r.flag("do_train", True) is not True:
        r.fail("do_train", "false: budwood train always trains; to evaluate, run budwood eval")
    for key in ("do_eval", "do_predict"):
        r.refuse(key, "evaluate the adapter afterwards: budwood eval OUTPUT_DIR")
    finetuning = r.take("finetuning_type", "lora")
    if finetuning != "lora":
        r.fail("finetuning_type", f"{finetuning!r}: budwood trains LoRA adapters (finetuning_type: lora)")
    rank = r.integer("lora_rank", r.take("lora_rank", 8)) or 8
    r.set("lora.r", rank)
    r.set("lora.alpha", as_float(r.take("lora_alpha", rank * 2)))
    r.set("lora.dropout", as_float(r.take("lora_dropout", 0.0)))
    target = as_list(r.take("lora_target", "all"))
    r.set("lora.target_modules", "all-linear" if target == ["all"] else target)
    r.rename("use_rslora", "lora.use_rslora")
    r.refuse("use_dora", "budwood's adapters are LoRA; DoRA is not supported: remove it")
    r.refuse("additional_target", "budwood's adapters hold LoRA weights only: remove it")


def _dataset_info(r: KeyReader, folder: Path) -> dict:
    path = folder / "dataset_info.json"
    try:
        if path.stat().st_size > MAX_INFO_BYTES:
            r.fail("dataset_dir", f"{path} is over {MAX_INFO_BYTES} bytes")
            return {}
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        r.fail("dataset", f"{path}: no such file; LLaMA-Factory names datasets in dataset_dir/dataset_info.json "
               "(set dataset_dir)")
        return {}
    except (OSError, ValueError) as e:
        r.fail("dataset_dir", f"{path}: not a JSON file ({e.__class__.__name__})")
        return {}
    if not isinstance(info, dict):
        r.fail("dataset_dir", f"{path}: expected an object of dataset entries")
        return {}
    return info


def _source(name: str, info: dict, folder: Path, stage: str, r: KeyReader, key: str) -> dict | None:
    if not info:
        return None  # dataset_info.json could not be read: said once already
    entry = info.get(name)
    if not isinstance(entry, dict):
        r.fail(key, f"{name!r} is not in {folder / 'dataset_info.json'}")
        return None
    entry = dict(entry)
    where = f"{key}: {name!r} (dataset_info.json)"
    if entry.get("file_name"):
        path = str(folder / entry.pop("file_name"))
    elif entry.get("hf_hub_url"):
        path = str(entry.pop("hf_hub_url"))
    else:
        r.fail(where, "needs file_name or hf_hub_url (budwood does not read ModelScope or script datasets)")
        return None
    formatting = entry.pop("formatting", "alpaca")
    ranking = bool(entry.pop("ranking", False))
    columns = dict(entry.pop("columns", None) or {})
    tags = dict(entry.pop("tags", None) or {})
    source: dict[str, Any] = {"path": path}
    for theirs, ours in (("subset", "subset"), ("split", "split")):
        if entry.get(theirs):
            source[ours] = entry.pop(theirs)
    if ranking != (stage == "dpo"):
        r.fail(where, "is preference data (ranking) but stage is sft" if ranking else
               "is not preference data (ranking: true) but stage is dpo")
        return None
    if formatting == "alpaca" and not ranking:
        source["format"] = "alpaca"
        source["columns"] = {ours: columns.pop(theirs) for theirs, ours in ALPACA_COLUMNS.items() if theirs in columns}
    elif formatting == "sharegpt":
        source["format"] = "sharegpt" if not ranking else "auto"
        messages = columns.pop("messages", "conversations")
        renames = {"prompt" if ranking else "conversations": messages}
        for extra in ("chosen", "rejected") if ranking else ("system", "tools"):
            if extra in columns:
                renames[extra] = columns.pop(extra)
        if ranking:
            for extra in ("system", "tools"):  # TRL's pair form has no place for them: refused below, not dropped
                if extra in columns:
                    r.fail(where, f"columns.{extra}: budwood's preference pairs carry no separate {extra}; put it in "
                           "the conversation")
                    columns.pop(extra)
            for tag in ("observation_tag", "function_tag"):
                if tag in tags:
                    r.fail(where, f"tags.{tag}: budwood's preference pairs have no tool turns")
                    tags.pop(tag)
        source["columns"] = {ours: theirs for ours, theirs in renames.items() if ours != theirs}
        fields = {ours: tags.pop(theirs) for theirs, ours in SHAREGPT_TAGS.items() if theirs in tags}
        roles = {ours: [tags.pop(theirs)] for theirs, ours in SHAREGPT_ROLES.items() if theirs in tags}
        if ranking:  # the pair becomes TRL's conversational form: role/content, user/assistant
            fields = {"role": fields.get("from", "from"), "content": fields.get("value", "value")}
            names = {ours: names[0] for ours, names in roles.items()}
            roles = {"user": [names.get("human", "human")], "assistant": [names.get("gpt", "gpt")],
                     "system": [names.get("system", "system")]}
        source["message_fields"], source["roles"] = fields, roles
    else:
        r.fail(where, f"formatting {formatting!r}{' with ranking' if ranking else ''}: budwood reads alpaca and "
               "sharegpt (and sharegpt preference pairs)")
        return None
    for left in (columns, tags, {k: v for k, v in entry.items() if v not in (None, False)}):
        for k in left:
            r.fail(where, f"{k}: budwood does not read this dataset_info.json key; remove it or convert the data")
    return {k: v for k, v in source.items() if v not in ({}, None)}


def _data(r: KeyReader) -> None:
    folder = Path(r.take("dataset_dir", "data"))  # as LLaMA-Factory: relative to the working directory
    names = as_list(r.take("dataset") or [])
    evals = as_list(r.take("eval_dataset") or [])
    stage = r.get("training.method", "sft")
    if not names:
        r.fail("dataset", "missing: name the datasets (entries of dataset_info.json)")
    info = _dataset_info(r, folder) if names or evals else {}
    sources = [s for n in names if (s := _source(n, info, folder, stage, r, "dataset")) is not None]
    max_samples = r.take("max_samples")
    for s in sources:
        if max_samples is not None:
            s["max_examples"] = int(max_samples)
    if sources:
        r.set("data.sources", sources)
    if evals:
        found = [s for n in evals if (s := _source(n, info, folder, stage, r, "eval_dataset")) is not None]
        if len(evals) != 1 or len(found) != 1 or set(found[0]) - {"path", "format"}:
            r.fail("eval_dataset", "budwood validates on one file in its own layout: one alpaca or sharegpt entry "
                   "without column renames")
        else:
            r.set("data.validation", found[0]["path"])
    share = as_float(r.take("val_size"))
    if share is not None:
        if isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share < 0.5:
            r.set("data.validation_split", float(share))
        else:
            r.fail("val_size", f"{share!r}: budwood holds out a share below 0.5 of the training data; give one, or "
                   "an eval_dataset")
    template = r.take("template")
    if template is not None:
        r.set("data.chat_template", str(template))
        r.notes.append(f"template: {template!r}: budwood renders with the base tokenizer's own chat template and "
                       "checks before training that it is this family")
    r.rename("cutoff_len", "training.max_seq_len")
    strategy = r.take("mix_strategy", "concat")
    if strategy != "concat" or r.has("interleave_probs"):
        r.take("interleave_probs")
        r.fail("mix_strategy", f"{strategy!r}: budwood mixes by weight; write budwood's config with data.sources "
               "and a weight for each (budwood config convert writes it)")
    for key in ("overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers", "tokenized_path"):
        r.note(key, "budwood tokenises in memory once per run; " + SPEED_ONLY)
    r.refuse("streaming", "budwood reads the whole data set before training: remove it")
    if r.take("packing") or r.take("neat_packing"):
        r.set("training.batching", "packed")
        r.notes.append("packing: budwood packs without cross-contamination (each example attends only to itself), "
                       "as neat_packing")
    r.refuse("train_on_prompt", "budwood trains on the assistant turns only: remove it")
    r.refuse("mask_history", "budwood trains on every assistant turn: remove it")


# transformers' TrainingArguments defaults (and LLaMA-Factory's cutoff_len), which a LLaMA-Factory run gets for
# keys its file leaves out; budwood's own defaults differ for these
DEFAULTS = {"training.learning_rate": 5e-5, "training.scheduler": "linear", "training.warmup_ratio": 0.0,
            "training.weight_decay": 0.0, "training.epochs": 3.0, "training.batch_size": 8,
            "training.max_seq_len": 2048, "training.precision": "fp32"}


def _training(r: KeyReader) -> None:
    r.rename("per_device_train_batch_size", "training.batch_size")
    r.rename("gradient_accumulation_steps", "training.gradient_accumulation")
    r.rename("num_train_epochs", "training.epochs", as_float)
    r.rename("max_steps", "training.max_steps")
    for key in ("learning_rate", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                "max_grad_norm"):
        r.rename(key, f"training.{key}", as_float)
    r.rename("warmup_steps", "training.warmup_steps")
    r.choose("lr_scheduler_type", "training.scheduler", SCHEDULERS)
    r.choose("optim", "training.optimizer", OPTIMIZERS)
    r.take("bf16")
    value = r.raw.get("bf16")
    if isinstance(value, (str, bool)) and value in PRECISION:
        r.set("training.precision", PRECISION[value])
    elif value is not None:
        r.fail("bf16", f"{value!r}: expected true or false")
    r.refuse("fp16", "budwood trains in bf16 or fp32; set bf16: true instead")
    r.refuse("pure_bf16", "budwood keeps the LoRA weights and optimizer state in fp32 under bf16; use bf16: true")
    r.set("training.gradient_checkpointing", not r.take("disable_gradient_checkpointing"))  # on by default there
    r.note("flash_attn", "budwood runs attention through torch's scaled_dot_product_attention, which picks flash "
           "kernels where the GPU has them: the same results")
    r.rename("seed", "training.seed")
    strategy = r.take("eval_strategy")
    if strategy not in (None, "steps", "no"):
        r.fail("eval_strategy", f"{strategy!r}: budwood validates every eval_steps optimizer steps")
    r.rename("eval_steps", "training.eval_every")
    r.note("per_device_eval_batch_size", "the validation loss does not depend on it; " + SPEED_ONLY)
    save = r.take("save_strategy")
    if save not in (None, "steps"):
        r.fail("save_strategy", f"{save!r}: budwood checkpoints every save_steps optimizer steps")
    r.rename("save_steps", "training.save_every")
    r.rename("save_total_limit", "training.keep_checkpoints")
    r.refuse("resume_from_checkpoint", "resuming is a command: budwood train CONFIG --resume continues from "
             "output_dir's last checkpoint")
    r.refuse("deepspeed", "budwood distributes with torchrun: training.distributed ddp or fsdp (docs/distributed.md)")
    r.note("ddp_timeout", "no effect on what budwood trains")
    for dotted, value in DEFAULTS.items():
        if r.get(dotted) is None and not (dotted == "training.warmup_ratio" and r.get("training.warmup_steps")):
            r.set(dotted, value)


def _output(r: KeyReader) -> None:
    r.rename("output_dir", "output_dir", str)
    r.rename("logging_steps", "logging.every")
    r.note("plot_loss", "budwood train always writes the loss curve (loss.png) into output_dir")
    r.note("overwrite_output_dir", "budwood never deletes a folder: with an earlier run there, `--resume` continues "
           "it and otherwise training refuses; choose a new output_dir to start afresh")
    r.note("save_only_model", "budwood's checkpoints hold the adapter and what an exact resume needs")
    report = r.take("report_to")
    if report is not None and report not in ("none", ["none"]):
        names = list(TRACKERS) if report in ("all", ["all"]) else as_list(report)
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            r.fail("report_to", f"{', '.join(unknown)}: budwood reports to {', '.join(TRACKERS)}")
        else:
            r.set("logging.report_to", names)
    r.rename("run_name", "logging.run_name", str)
    for key in ("hub_model_id", "push_to_hub"):
        r.refuse(key, "budwood does not upload while training; after it: budwood export OUTPUT_DIR --hf DIR "
                 "--push HUB_ID")
