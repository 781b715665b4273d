"""Axolotl's YAML (https://docs.axolotl.ai/docs/config-reference.html) read into budwood's TrainConfig.

Each key Axolotl users set most is mapped onto its budwood equivalent; keys that change only speed or memory
are honoured and noted; keys whose effect budwood cannot reproduce are refused with what to do instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from budwood.data.sources import SUFFIXES
from budwood.interop.keys import (
    OPTIMIZERS,
    PRECISION,
    SCHEDULERS,
    Converted,
    Dialect,
    KeyReader,
    as_float,
    as_list,
)

# Axolotl's dataset `type`s budwood reads, and the budwood format each is
DATASET_TYPES = {"alpaca": "alpaca", "chat_template": "openai", "sharegpt": "sharegpt", None: "auto"}
SPEED_ONLY = "changes only speed or memory, not what is learned; budwood chooses its own"
ATTENTION = ("budwood runs attention through torch's scaled_dot_product_attention, which picks flash kernels where "
             "the GPU has them: the same results")

KNOWN = (
    "base_model", "base_model_config", "model_type", "tokenizer_type", "tokenizer_config", "trust_remote_code",
    "load_in_8bit", "load_in_4bit", "adapter", "lora_model_dir", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "lora_target_linear", "lora_fan_in_fan_out", "lora_modules_to_save", "peft_use_rslora",
    "peft_use_dora", "datasets", "test_datasets", "val_set_size", "dataset_prepared_path", "dataset_processes",
    "dataset_num_proc", "shuffle_merged_datasets", "output_dir", "sequence_len", "sample_packing",
    "eval_sample_packing", "pad_to_sequence_len", "micro_batch_size", "batch_size", "gradient_accumulation_steps",
    "num_epochs", "max_steps", "optimizer", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler", "learning_rate", "warmup_steps", "warmup_ratio", "weight_decay", "train_on_inputs",
    "group_by_length", "bf16", "fp16", "tf32", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "logging_steps", "eval_steps", "evals_per_epoch", "save_steps", "saves_per_epoch", "save_total_limit",
    "early_stopping_patience", "resume_from_checkpoint", "auto_resume_from_checkpoints", "local_rank",
    "flash_attention", "xformers_attention", "sdp_attention", "s2_attention", "attn_implementation",
    "loss_watchdog_threshold", "loss_watchdog_patience", "wandb_project", "wandb_entity", "wandb_name",
    "wandb_watch", "wandb_log_model", "wandb_run_id", "wandb_mode", "use_tensorboard", "use_mlflow",
    "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name", "seed", "special_tokens", "tokens",
    "chat_template", "chat_template_jinja", "hub_model_id", "push_dataset_to_hub", "deepspeed", "fsdp",
    "fsdp_config", "strict", "debug", "rl", "dpo_beta", "rl_beta", "dpo_label_smoothing", "rpo_alpha",
    "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model", "eval_max_new_tokens",
    "eval_table_size", "logging_first_step", "save_first_step", "ddp_timeout",
)


def looks_like(raw: dict[str, Any]) -> bool:
    """Axolotl's files have `datasets:` (budwood's have `data:`) or its own flat keys."""
    return "datasets" in raw or any(k in raw for k in ("adapter", "micro_batch_size", "sequence_len", "lora_r"))


def convert(raw: dict[str, Any], source: str) -> Converted:
    r = KeyReader(raw, source, Dialect.AXOLOTL)
    _model(r)
    _lora(r)
    _data(r)
    _training(r)
    _logging(r)
    _elsewhere(r)
    return r.finish(KNOWN)


def _model(r: KeyReader) -> None:
    base = r.take("base_model")
    if base is None:
        r.fail("base_model", "missing: Axolotl configs name the model to fine-tune here")
    else:
        r.set("base_model", str(base))
    r.refuse("base_model_config", "budwood reads the model's config from base_model itself; remove it",
             unless=lambda v: v == base)
    r.refuse("tokenizer_config", "budwood loads the tokenizer from base_model; remove it", unless=lambda v: v == base)
    for key, auto in (("model_type", "AutoModelForCausalLM"), ("tokenizer_type", "AutoTokenizer")):
        r.note(key, f"budwood loads with {auto}, which picks the class from the model's own config")
    r.note("trust_remote_code", "budwood never runs code from a model repository; architectures transformers "
           "knows load without it (one that needs it is refused when loading)")
    for key in ("is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model"):
        r.note(key, "budwood reads the architecture from the model's config")
    four, eight = r.take("load_in_4bit"), r.take("load_in_8bit")
    adapter = r.take("adapter")
    if adapter not in ("lora", "qlora"):
        r.fail("adapter", f"{adapter!r}: budwood trains LoRA adapters; set adapter: lora (or qlora)"
               if adapter is not None else "missing: without it Axolotl fine-tunes every weight; budwood trains "
               "LoRA adapters: set adapter: lora (or qlora)")
    if four and eight:
        r.fail("load_in_8bit", "and load_in_4bit are both true; choose one")
    elif four or (adapter == "qlora" and not eight):
        r.set("quantization", "nf4")
    elif eight:
        r.set("quantization", "int8")
    r.rename("lora_model_dir", "init_adapter", str)


def _lora(r: KeyReader) -> None:
    r.rename("lora_r", "lora.r")
    r.rename("lora_alpha", "lora.alpha", as_float)
    r.rename("lora_dropout", "lora.dropout", as_float)
    targets = r.take("lora_target_modules")
    if r.take("lora_target_linear"):
        r.set("lora.target_modules", "all-linear")
        if targets:
            r.notes.append(f"lora_target_modules: {targets!r}: lora_target_linear is true, so every linear layer "
                           "is adapted (these included)")
    elif targets is not None:
        r.set("lora.target_modules", as_list(targets))
    r.rename("peft_use_rslora", "lora.use_rslora")
    r.refuse("peft_use_dora", "budwood's adapters are LoRA; DoRA is not supported: remove it")
    r.refuse("lora_fan_in_fan_out", "budwood targets nn.Linear layers, which are never fan-in-fan-out: remove it")
    r.refuse("lora_modules_to_save", "budwood's adapters hold LoRA weights only (embeddings and lm_head stay the "
             "base's): remove it")


def _source(entry: Any, i: int, r: KeyReader) -> dict | None:
    where = f"datasets[{i}]"
    if not isinstance(entry, dict) or not entry.get("path"):
        r.fail(where, "each dataset needs a path (a local file or folder, or a Hub dataset id)")
        return None
    entry = dict(entry)
    kind = entry.pop("type", None)
    if not (kind is None or isinstance(kind, str)) or kind not in DATASET_TYPES:
        r.fail(f"{where}.type", f"{kind!r}: budwood reads alpaca, chat_template and sharegpt data (or any form "
               "budwood detects, with no type); custom prompt formats and preference strategies (chat_template.*, "
               "chatml.*) are not read: convert the file to OpenAI's or TRL's form")
        return None
    path = str(entry.pop("path"))
    ds_type = entry.pop("ds_type", None)
    found = SUFFIXES.get(Path(path).suffix.lower())
    if ds_type is not None and found is not None and ds_type != found and not (ds_type == "json" and found == "jsonl"):
        r.fail(f"{where}.ds_type", f"{ds_type!r} but the file is named {Path(path).name}: budwood reads the kind "
               "from the name; rename the file")
    elif ds_type is not None and found is None and not Path(path).is_dir() and ds_type != "json":
        r.fail(f"{where}.ds_type", f"{ds_type!r}: budwood reads the kind from the file name; name it .{ds_type}")
    source: dict[str, Any] = {"path": path, "format": DATASET_TYPES[kind]}
    for theirs, ours in (("split", "split"), ("name", "subset")):
        if entry.get(theirs) is not None:
            source[ours] = entry.pop(theirs)
        entry.pop(theirs, None)
    if kind == "chat_template":
        _chat_template_fields(entry, source, r, where)
    for key in ("train_on_eos", "train_on_eot"):
        value = entry.pop(key, None)
        if value not in (None, "turn"):  # budwood trains each trained turn's end-of-turn token, as "turn" asks
            r.fail(f"{where}.{key}", f"{value!r}: budwood trains the end-of-turn token of each assistant turn "
                   "(turn) and no other; remove it")
    left = {k: v for k, v in entry.items() if v is not None}
    for key in left:
        r.fail(f"{where}.{key}", "budwood does not know this dataset key; remove it or convert the file")
    return source


def _chat_template_fields(entry: dict, source: dict, r: KeyReader, where: str) -> None:
    messages = entry.pop("field_messages", None) or "messages"
    if messages != "messages":
        source["columns"] = {"messages": messages}
    mapping = dict(entry.pop("message_property_mappings", None) or {})
    for ours in ("role", "content"):
        theirs = entry.pop(f"message_field_{ours}", None) or mapping.pop(ours, None)
        if theirs and theirs != ours:
            source.setdefault("message_fields", {})[ours] = theirs
    if mapping:
        entry["message_property_mappings"] = mapping
    roles = entry.pop("roles", None)
    if roles is not None and not isinstance(roles, dict):
        r.fail(f"{where}.roles", f"{roles!r}: expected a mapping of role to the names it has in the data")
        roles = None
    # Axolotl's default names ShareGPT's roles too: human -> user, gpt -> assistant
    roles = {ours: as_list(names) for ours, names in roles.items()} if roles else {"user": ["human", "user"],
                                                                                   "assistant": ["gpt", "assistant"]}
    if any(names != [ours] for ours, names in roles.items()):  # {user: [user]} renames nothing
        source["roles"] = roles
    if entry.get("roles_to_train") in (["assistant"], ["gpt"]):  # what budwood trains on anyway
        del entry["roles_to_train"]
    if entry.get("chat_template") == "tokenizer_default":
        del entry["chat_template"]


def _data(r: KeyReader) -> None:
    entries = r.take("datasets")
    if entries is None:
        r.fail("datasets", "missing: name at least one dataset")
    else:
        sources = [s for i, e in enumerate(as_list(entries)) if (s := _source(e, i, r)) is not None]
        if sources:
            r.set("data.sources", sources)
    tests = r.take("test_datasets")
    if tests is not None:
        tests = as_list(tests)
        entry = tests[0] if len(tests) == 1 and isinstance(tests[0], dict) else {}
        if not entry.get("path") or set(entry) - {"path", "type", "split"} or entry.get("split", "train") != "train" \
                or entry.get("type") not in (None, "alpaca", "sharegpt"):
            r.fail("test_datasets", "budwood validates on one file in a form it detects (alpaca, sharegpt, OpenAI "
                   "chat): give one entry with a path, no split and no field mapping")
        else:
            r.set("data.validation", str(entry["path"]))
    share = as_float(r.take("val_set_size"))
    if share is not None:
        if isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share < 0.5:
            r.set("data.validation_split", float(share))
        else:
            r.fail("val_set_size", f"{share!r}: budwood holds out a share below 0.5 of the training data; give one, "
                   "or a validation file as test_datasets")
    template = r.take("chat_template")
    if template is not None and template != "tokenizer_default":
        r.set("data.chat_template", template)
        r.notes.append(f"chat_template: {template!r}: budwood renders with the base tokenizer's own chat template "
                       "and checks before training that it is this family")
    r.refuse("chat_template_jinja", "budwood renders with the base tokenizer's own chat template; put this "
             "template in the base's tokenizer_config.json (chat_template) or its chat_template.jinja")
    for key in ("dataset_prepared_path", "dataset_processes", "dataset_num_proc"):
        r.note(key, "budwood tokenises in memory once per run; " + SPEED_ONLY)
    if r.flag("shuffle_merged_datasets", True) is not True:
        r.fail("shuffle_merged_datasets", "false: budwood always shuffles each epoch (seeded); remove it")
    r.refuse("push_dataset_to_hub", "budwood does not upload data; remove it")
    r.refuse("train_on_inputs", "budwood trains on the assistant turns only; remove it or set it false")


def _training(r: KeyReader) -> None:
    if r.take("sample_packing"):
        r.set("training.batching", "packed")
    r.note("eval_sample_packing", "budwood's validation loss is the same packed or padded (exact masks)")
    r.note("pad_to_sequence_len", "padding is masked out of the loss, so " + SPEED_ONLY)
    r.note("group_by_length", "budwood's padded batches are always grouped by length (the loss per example is "
           "the same; only the order differs)")
    micro = r.integer("micro_batch_size", r.take("micro_batch_size", 1))  # Axolotl's defaults where unset
    r.set("training.batch_size", micro)
    accumulation, total = r.take("gradient_accumulation_steps"), r.take("batch_size")
    if accumulation is not None and total is not None:
        r.fail("batch_size", "and gradient_accumulation_steps are both set; give one")
    elif total is not None and (total := r.integer("batch_size", total)) is not None and micro:
        r.set("training.gradient_accumulation", max(1, total // micro))
    elif accumulation is not None:
        r.set("training.gradient_accumulation", accumulation)
    r.set("training.epochs", as_float(r.take("num_epochs", 1.0)))
    r.set("training.max_seq_len", r.take("sequence_len", 512))
    r.rename("max_steps", "training.max_steps")
    r.choose("optimizer", "training.optimizer", OPTIMIZERS)
    for key in ("adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "learning_rate", "weight_decay",
                "warmup_ratio"):
        r.rename(key, f"training.{key}", as_float)
    r.rename("warmup_steps", "training.warmup_steps")
    if r.get("training.warmup_steps") is None and r.get("training.warmup_ratio") is None:
        r.set("training.warmup_ratio", 0.0)  # no warmup unless asked, as there (budwood's own default is 0.03)
    r.choose("lr_scheduler", "training.scheduler", SCHEDULERS)
    r.take("bf16")
    value = r.raw.get("bf16")  # unset, as false, trains in fp32 there (budwood's own default is auto)
    if value is None or (isinstance(value, (str, bool)) and value in PRECISION):
        r.set("training.precision", PRECISION.get(value, "fp32"))
    else:
        r.fail("bf16", f"{value!r}: expected true, false or auto")
    r.refuse("fp16", "budwood trains in bf16 or fp32; set bf16: true (or auto) instead")
    r.refuse("tf32", "budwood keeps fp32 matrix products at full precision; use bf16 for speed")
    r.rename("gradient_checkpointing", "training.gradient_checkpointing")
    r.note("gradient_checkpointing_kwargs", "budwood checkpoints each decoder layer its own way; " + SPEED_ONLY)
    r.rename("seed", "training.seed")
    for key, dotted, per_epoch in (("eval_steps", "training.eval_every", "evals_per_epoch"),
                                   ("save_steps", "training.save_every", "saves_per_epoch")):
        value = as_float(r.take(key))
        if isinstance(value, float) and 0 < value < 1:
            r.fail(key, f"{value!r}: a fraction of the run; budwood counts steps: give {per_epoch} instead")
        elif value is not None:
            r.set(dotted, r.integer(key, value))
        if r.has(per_epoch) and value is not None:
            r.fail(per_epoch, f"and {key} are both set; give one")
    r.rename("evals_per_epoch", "training.evals_per_epoch")
    r.rename("saves_per_epoch", "training.saves_per_epoch")
    r.rename("save_total_limit", "training.keep_checkpoints")
    r.rename("loss_watchdog_threshold", "training.loss_watchdog_threshold", as_float)
    r.rename("loss_watchdog_patience", "training.loss_watchdog_patience")
    r.refuse("early_stopping_patience", "budwood does not stop early on validation loss; set max_steps or "
             "num_epochs (its checkpoints keep the validation loss of each)")
    for key in ("resume_from_checkpoint", "auto_resume_from_checkpoints"):
        r.refuse(key, "resuming is a command, not a setting: budwood train CONFIG --resume continues from "
                 "output_dir's last checkpoint")
    for key in ("flash_attention", "xformers_attention", "sdp_attention", "attn_implementation"):
        r.note(key, ATTENTION)
    r.refuse("s2_attention", "shifted sparse attention changes what the model attends to; budwood has only "
             "full causal attention: remove it")
    _method(r)


def _method(r: KeyReader) -> None:
    rl = r.take("rl")
    if rl is None:
        for key in ("dpo_beta", "rl_beta", "rpo_alpha", "dpo_label_smoothing"):
            r.refuse(key, "set rl: dpo to use it")
        return
    if rl != "dpo":
        r.fail("rl", f"{rl!r}: budwood's preference training is DPO (rl: dpo)")
        return
    r.set("training.method", "dpo")
    r.one_of(("rl_beta", "dpo_beta"), "training.dpo.beta", as_float)
    r.rename("rpo_alpha", "training.dpo.sft_weight", as_float)
    r.refuse("dpo_label_smoothing", "budwood's DPO has no label smoothing: remove it", unless=lambda v: v == 0)


def _logging(r: KeyReader) -> None:
    trackers: list[str] = []
    project = r.take("wandb_project")
    mode = r.take("wandb_mode")
    if project is not None and mode != "disabled":
        trackers.append("wandb")
        r.set("logging.wandb_project", str(project))
        r.rename("wandb_entity", "logging.wandb_entity", str)
        r.one_of(("wandb_name", "mlflow_run_name"), "logging.run_name", str)
    if mode not in (None, "disabled", "online"):
        r.fail("wandb_mode", f"{mode!r}: set WANDB_MODE={mode} in the environment instead (wandb reads it)")
    r.refuse("wandb_watch", "budwood logs metrics, not gradients or parameters: remove it")
    r.refuse("wandb_log_model", "budwood does not upload checkpoints to W&B; publish the adapter instead "
             "(budwood publish)", unless=lambda v: v in ("false", "False"))
    r.refuse("wandb_run_id", "budwood names W&B runs by wandb_name; remove it")
    if r.take("use_tensorboard"):
        trackers.append("tensorboard")
    if r.take("use_mlflow") or r.has("mlflow_tracking_uri") or r.has("mlflow_experiment_name"):
        trackers.append("mlflow")
    r.rename("mlflow_tracking_uri", "logging.mlflow_tracking_uri", str)
    r.rename("mlflow_experiment_name", "logging.mlflow_experiment", str)
    if r.get("logging.run_name") is None:
        r.rename("mlflow_run_name", "logging.run_name", str)
    if trackers:
        r.set("logging.report_to", trackers)
    r.rename("logging_steps", "logging.every")
    r.note("logging_first_step", "budwood logs step 1 always")
    r.note("save_first_step", "budwood's first checkpoint is at save_every; train with --set training.max_steps=1 "
           "to try saving")


def _elsewhere(r: KeyReader) -> None:
    r.rename("output_dir", "output_dir", str)
    special = r.take("special_tokens")
    if special is not None:
        others = sorted(set(special) - {"pad_token"}) if isinstance(special, dict) else ["(not a mapping)"]
        if others:
            r.fail("special_tokens", f"{', '.join(others)}: budwood keeps the base tokenizer's special tokens (an "
                   "adapter cannot change the vocabulary); only pad_token may be given")
        else:
            r.notes.append(f"special_tokens: pad_token {special['pad_token']!r}: padding is masked out of the loss, "
                           "so budwood pads with the tokenizer's pad token (or end-of-text): the same result")
    r.refuse("tokens", "an adapter cannot add tokens to the base's vocabulary: remove it")
    r.refuse("hub_model_id", "budwood does not upload while training; after it: budwood export OUTPUT_DIR --hf DIR "
             "--push HUB_ID")
    r.refuse("deepspeed", "budwood distributes with torchrun: training.distributed ddp or fsdp (docs/distributed.md)")
    fsdp = r.take("fsdp")
    if fsdp is not None:
        r.set("training.distributed", "fsdp")
        r.notes.append(f"fsdp: {fsdp!r}: budwood shards the base's weights across torchrun's ranks, one decoder "
                       "layer per unit (docs/distributed.md)")
    r.refuse("fsdp_config", "budwood's FSDP wraps each decoder layer and keeps LoRA weights unsharded; its "
             "settings are not configurable: remove fsdp_config")
    for key in ("strict", "debug", "local_rank", "ddp_timeout", "eval_max_new_tokens", "eval_table_size"):
        r.note(key, "no effect on what budwood trains")
