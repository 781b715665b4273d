"""LoRA SFT throughput on CPU (or any device): budwood's `train()` against TRL's SFTTrainer + PEFT.

Both sides train the same random-init ~40M-parameter Llama (built here from a config, with a byte-level
BPE tokenizer trained here) with the same LoRA, on the same synthetic chat data with long-tailed lengths,
in the same precision, for (about) the same number of tokens. Each side runs in its own subprocess, so
its peak RSS is its own, and both run under the same malloc (tcmalloc via LD_PRELOAD by default).

    python benchmarks/train_vs_trl.py --steps 30 --precision bf16 --budwood-batching padded \
        --trl-variant padding-free --allocator tcmalloc --work _bench

Needs `pip install -e .[bench]` (trl, datasets). Nothing is downloaded: model, tokenizer and data are
built in --work (reused on later runs). See benchmarks/README.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import emit_records

HERE = Path(__file__).resolve().parent
RESULT_TAG = "@@BENCH_RESULT@@ "
WORK_FORMAT = 1  # bump when the model / tokenizer / data recipe below changes

# ---------------------------------------------------------------------------------------------------
# The model, tokenizer and data (same recipe as shared/anchors make_model.py / make_data.py, but with
# 12 layers (~40M params) and a chat template with {% generation %} markers).
# ---------------------------------------------------------------------------------------------------
MODEL_CFG = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1408, vocab_size=8192, max_position_embeddings=1024,
                 tie_word_embeddings=True)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32, dropout=0.0)
BATCH = 8
LR = 2e-4
MAX_SEQ_LEN = 1024
SEED = 0
VAL_EXAMPLES = 8

SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Renders exactly like the anchor's `<|role|>\ncontent<|end|>\n`. The {% generation %} block is what
# TRL's assistant_only_loss needs (return_assistant_tokens_mask); it covers the assistant content, its
# <|end|> and the newline after it, which is exactly the character span budwood trains on (budwood
# finds it by rendering prefixes, and ignores the markers). Both sides therefore put loss on the same tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|end|>\n{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SYLLABLES = [
    "ka", "lo", "mi", "ra", "te", "vu", "zen", "dor", "ph", "qui", "st", "an", "el", "or",
    "un", "ba", "ce", "di", "fo", "gu", "ha", "jo", "ny", "pe", "ri", "sa", "to", "wi",
    "xa", "yo", "tr", "bl", "ment", "ing", "ed", "ly", "ous", "ion", "er", "al",
]
SYSTEM = ["You are a helpful assistant.", "You are a concise assistant that answers about {a}.",
          "Answer carefully and explain the role of {a} and {b}."]
USER = ["What is {a}?", "Explain how {a} relates to {b}.", "Write a short note about {a}, {b} and {c}.",
        "Summarise the following: {p}", "Can you list the steps to {a} the {b}?",
        "Translate into plain words: {p}", "Why does {a} {b} when {c} is present? {p}"]
ASSIST_PREFIX = ["Sure. ", "", "Here is an answer. ", "In short: ", "Step 1: ", "Good question. "]


def _vocab_words(n_words=3000, seed=7):
    rng = random.Random(seed)
    words = set()
    while len(words) < n_words:
        k = rng.choice([1, 2, 2, 3, 3, 3, 4, 5])
        words.add("".join(rng.choice(SYLLABLES) for _ in range(k)))
    return sorted(words)


class _Words:
    def __init__(self, rng):
        self.rng = rng
        self.words = _vocab_words()
        self.cum, s = [], 0.0
        for i in range(len(self.words)):  # Zipf-ish
            s += 1.0 / (i + 1) ** 1.05
            self.cum.append(s)

    def words_n(self, n):
        return self.rng.choices(self.words, cum_weights=self.cum, k=n)

    def sentence(self, n):
        ws = self.words_n(n)
        ws[0] = ws[0].capitalize()
        if self.rng.random() < 0.3:
            ws.insert(self.rng.randint(1, len(ws)), str(self.rng.randint(0, 9999)))
        return " ".join(ws) + self.rng.choice([".", ".", ".", "!", "?", ";"])

    def paragraph(self, n_words):
        out, count = [], 0
        while count < n_words:
            s = self.sentence(min(max(3, n_words - count), self.rng.randint(4, 14)))
            out.append(s)
            count += len(s.split())
        return " ".join(out)


def _example(rng, ws):
    def fill(t):
        return t.format(a=ws.words_n(1)[0], b=ws.words_n(1)[0], c=ws.words_n(1)[0],
                        p=ws.paragraph(rng.randint(5, 30)))
    msgs = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": fill(rng.choice(SYSTEM))})
    n_turns = 1 if rng.random() < 0.8 else rng.randint(2, 3)
    total_words = int(min(420, max(12, math.exp(rng.gauss(4.3, 0.75)))))  # long-tailed answer length
    for _ in range(n_turns):
        msgs.append({"role": "user", "content": fill(rng.choice(USER))})
        msgs.append({"role": "assistant",
                     "content": rng.choice(ASSIST_PREFIX) + ws.paragraph(max(6, total_words // n_turns))})
    return {"messages": msgs}


def _corpus(n_lines=20000, seed=99):
    rng = random.Random(seed)
    ws = _Words(rng)
    for _ in range(n_lines):
        yield ws.paragraph(rng.randint(5, 60))


# ---------------------------------------------------------------------------------------------------
# Child processes. Each prints one line `@@BENCH_RESULT@@ {json}` on stdout.
# ---------------------------------------------------------------------------------------------------
def _emit(obj: dict) -> None:
    print(RESULT_TAG + json.dumps(obj), flush=True)


def _self_usage() -> dict:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "user_cpu_s": round(ru.ru_utime, 1),
            "sys_cpu_s": round(ru.ru_stime, 1), "minor_faults": ru.ru_minflt}


def child_prepare(spec: dict) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    work = Path(spec["work"])
    model_dir, data_path = work / "model", work / "data.jsonl"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=MODEL_CFG["vocab_size"], special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", model_max_length=MAX_SEQ_LEN)
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= MODEL_CFG["vocab_size"], len(fast)

    torch.manual_seed(spec["model_seed"])
    cfg = LlamaConfig(**MODEL_CFG, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)  # safetensors (budwood loads safetensors only)
    fast.save_pretrained(model_dir)

    rng = random.Random(spec["data_seed"])
    ws = _Words(rng)
    rows = [_example(rng, ws) for _ in range(spec["n_examples"])]
    with open(data_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    # A few held-out chats for budwood only: budwood's prepare_data crashes without validation data
    # (see README), and its one validation pass comes after the last step's metrics line (not timed).
    vrng = random.Random(spec["data_seed"] + 1)
    vws = _Words(vrng)
    with open(work / "val.jsonl", "w") as f:
        for _ in range(VAL_EXAMPLES):
            f.write(json.dumps(_example(vrng, vws)) + "\n")

    lens = sorted(len(fast.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                  for r in rows)
    n = sum(p.numel() for p in model.parameters())
    n_emb = model.get_input_embeddings().weight.numel()
    q = lambda f: lens[min(len(lens) - 1, int(f * len(lens)))]  # noqa: E731
    _emit({"params": n, "embedding_params": n_emb, "vocab": len(fast), "examples": len(rows),
           "token_lengths": {"min": lens[0], "p10": q(0.1), "median": q(0.5),
                             "mean": round(sum(lens) / len(lens), 1), "p90": q(0.9), "p99": q(0.99),
                             "max": lens[-1]}})


def child_gemm(spec: dict) -> None:
    import torch

    device = torch.device(spec.get("device", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"threads": torch.get_num_threads(), "device": str(device)}
    n, reps = 2048, spec.get("reps", 10)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(3):
            torch.matmul(a, b)
        sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            sync()
            ts.append(time.perf_counter() - t)
        out[f"{name}_gflops"] = round(2 * n ** 3 / statistics.median(ts) / 1e9, 1)
    _emit(out)


def child_trl(spec: dict) -> None:
    import accelerate
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.t_begin = self.t_end = None
            self.step_ends = []

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            self.t_end = time.perf_counter()

    class CountingSFTTrainer(SFTTrainer):
        """Counts the tokens of every batch actually trained on (as in shared/anchors/trl_sft.py)."""
        def __init__(self, *a, **kw):
            self.real_tokens = self.padded_tokens = self.loss_tokens = self.examples = 0
            self.per_step_real = []
            super().__init__(*a, **kw)

        def training_step(self, model, inputs, *a, **kw):
            ids = inputs["input_ids"]
            am = inputs.get("attention_mask")
            real = int(am.sum()) if am is not None else int(ids.numel())  # padding-free: no padding at all
            self.real_tokens += real
            self.padded_tokens += int(ids.numel())
            self.per_step_real.append(real)
            labels = inputs.get("labels")
            if labels is not None:  # the model shifts labels by one: position 0 of a row is never a target
                self.loss_tokens += int((labels[:, 1:] != -100).sum())
            pos = inputs.get("position_ids")
            self.examples += int((pos == 0).sum()) if pos is not None else int(ids.shape[0])
            return super().training_step(model, inputs, *a, **kw)

    variant, precision = spec["trl_variant"], spec["precision"]
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    base_dtype = torch.bfloat16 if spec["trl_base_dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=base_dtype)
    n_base = sum(p.numel() for p in model.parameters())
    ds = load_dataset("json", data_files=spec["data"], split="train")

    packing = variant == "packing"
    padding_free = variant in ("padding-free", "packing")
    # TRL 1.16 refuses padding_free without packing unless max_length=None (it cannot truncate there);
    # the longest example is ~650 tokens, below budwood's max_seq_len, so nothing is truncated either side.
    max_length = None if variant == "padding-free" else spec["trl_max_length"]
    cfg = SFTConfig(
        output_dir=str(Path(spec["out"])), use_cpu=spec["device"] == "cpu", max_steps=spec["steps"],
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        packing=packing, padding_free=padding_free, max_length=max_length,
        assistant_only_loss=spec["assistant_only_loss"],
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=SEED,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
    timer = Timer()
    t0 = time.perf_counter()
    trainer = CountingSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                                 peft_config=lora, callbacks=[timer])
    prep_s = time.perf_counter() - t0
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    lora_dtypes = sorted({str(p.dtype).replace("torch.", "")
                          for p in trainer.model.parameters() if p.requires_grad})
    trainer.train()

    loop_s = timer.t_end - timer.t_begin
    steps = trainer.state.global_step
    steady = None
    if len(timer.step_ends) > 4:  # exclude the first two steps (allocator / oneDNN warm-up)
        steady = sum(trainer.per_step_real[2:]) / (timer.step_ends[-1] - timer.step_ends[1])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _emit({
        "side": "trl", "variant": variant, "precision": precision, "base_dtype": spec["trl_base_dtype"],
        "assistant_only_loss": spec["assistant_only_loss"], "max_length": max_length,
        "steps": steps, "examples": trainer.examples, "real_tokens": trainer.real_tokens,
        "padded_tokens": trainer.padded_tokens, "loss_tokens": trainer.loss_tokens,
        "loop_s": round(loop_s, 3), "steady_tokens_per_s": round(steady, 1) if steady else None,
        "prep_s": round(prep_s, 2), "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "base_params": n_base, "lora_params": n_lora,
        "lora_dtype": lora_dtypes, "threads": torch.get_num_threads(),
        "attn_impl": getattr(trainer.model.config, "_attn_implementation", None),
        **_self_usage(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__, "datasets": datasets.__version__,
                     "accelerate": accelerate.__version__},
    })


def _budwood_config(spec: dict, max_steps: int):
    from budwood.config import load_config

    return load_config(None, base={
        "base_model": spec["model"],
        "data": {"train": spec["data"], "validation": spec["val_data"], "format": "openai"},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                 "target_modules": LORA_TARGETS},
        "training": {
            "max_steps": max_steps, "learning_rate": LR, "scheduler": "linear", "warmup_steps": 0,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "batch_size": BATCH, "gradient_accumulation": 1,
            "max_seq_len": MAX_SEQ_LEN, "seed": SEED, "precision": spec["precision"],
            "batching": spec["budwood_batching"], "gradient_checkpointing": False, "device": spec["device"],
            "compile": {"on": True, "off": False, "auto": "auto"}[spec["budwood_compile"]],
            # no checkpoint and no validation inside the loop (TRL: save_strategy/eval_strategy "no");
            # budwood still writes one checkpoint + the adapter after the loop, outside the timed part.
            "save_every": 10 ** 9, "eval_every": 10 ** 9, "keep_checkpoints": 1,
        },
        "output_dir": spec["out"],
        "logging": {"every": 1},
    })


def child_budwood_plan(spec: dict) -> None:
    """Predict budwood's per-step tokens (its data plan is a pure function of seed, epoch); pick max_steps."""
    from budwood.data.pack import collate, plan_epoch
    from budwood.models.load import load_tokenizer
    from budwood.train.data import prepare_data

    config = _budwood_config(spec, 1)
    t = config.training
    data = prepare_data(config, load_tokenizer(config.base_model))
    lengths = [len(e) for e in data.train]
    cum_tok, cum_ex, cum_loss, cum_pad, cum_steps = [0], [0], [0], [0], [0]
    series = {"tokens": cum_tok, "examples": cum_ex, "steps": cum_steps}[spec["match"]]
    epoch = 0
    while series[-1] < 2 * spec["target"] + 10:  # the same walk over epochs as recipe.train's loop
        for idx in plan_epoch(lengths, t.batching, t.batch_size, t.tokens_per_batch, t.seed, epoch):
            b = collate(data.train, idx, t.batching, 0)
            cum_tok.append(cum_tok[-1] + b.n_tokens)
            cum_ex.append(cum_ex[-1] + len(idx))
            cum_loss.append(cum_loss[-1] + b.n_label_tokens)
            cum_pad.append(cum_pad[-1] + b.input_ids.numel())  # tokens the model runs, padding included
            cum_steps.append(cum_steps[-1] + 1)
        epoch += 1
    k = min(range(1, len(series)), key=lambda i: (abs(series[i] - spec["target"]), i))
    _emit({"max_steps": k, "tokens": cum_tok[k], "examples": cum_ex[k], "loss_tokens": cum_loss[k],
           "padded_tokens": cum_pad[k],
           "train_examples": len(lengths)})


def child_budwood(spec: dict) -> None:
    import torch

    import budwood
    from budwood.train.recipe import train

    class Quiet:  # budwood's Progress protocol; notes (data warnings) go to stderr
        def start(self, total_steps, first_step):
            pass

        def update(self, record):
            pass

        def note(self, message):
            print(message, file=sys.stderr, flush=True)

    out = Path(spec["out"])
    if out.exists():
        shutil.rmtree(out)
    config = _budwood_config(spec, spec["max_steps"])
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    train(config, progress=Quiet())
    wall = time.perf_counter() - t0
    usage = _self_usage()
    prov = json.loads((out / "budwood.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "loss" in r]
    loop_s = recs[-1]["elapsed_s"]  # loop start -> end of the last step (+ its metrics line)
    steady = None
    if len(recs) > 4:  # exclude the first two steps, as on the TRL side
        steady = ((recs[-1]["tokens"] - recs[1]["tokens"])
                  / max(recs[-1]["elapsed_s"] - recs[1]["elapsed_s"], 1e-9))
    # parameter counts, computed the same way as on the TRL side (no training involved)
    from budwood.models.load import load_base
    from budwood.train.recipe import build_lora_model

    base = load_base(spec["model"], dtype=torch.float32)
    n_base = sum(p.numel() for p in base.model.parameters())
    n_lora = sum(p.numel() for p in build_lora_model(base.model, config).parameters() if p.requires_grad)
    _emit({
        "side": "budwood", "precision": spec["precision"],
        "variant": spec["budwood_batching"] + ("+compile" if spec["budwood_compile"] == "on" else ""),
        "base_dtype": prov["hardware"]["dtype"], "max_seq_len": MAX_SEQ_LEN,
        "steps": prov["steps"], "examples": spec.get("predicted_examples"),
        "real_tokens": prov["tokens_seen"], "padded_tokens": spec.get("predicted_padded_tokens"),
        "loss_tokens": prov["trained_tokens"], "loop_s": loop_s, "train_time_s": prov["train_time_s"],
        "wall_time_s": prov["wall_time_s"], "train_call_s": round(wall, 2),
        "steady_tokens_per_s": round(steady, 1) if steady else None,
        "first_loss": recs[0]["loss"], "final_loss": recs[-1]["loss"],
        "base_params": n_base, "lora_params": n_lora, "threads": prov["hardware"]["torch_threads"],
        **usage, "versions": dict(prov["versions"], budwood=budwood.__version__),
    })


CHILDREN = {"prepare": child_prepare, "gemm": child_gemm, "trl": child_trl, "budwood": child_budwood,
            "budwood_plan": child_budwood_plan}


# ---------------------------------------------------------------------------------------------------
# Parent: orchestration, tables, results.
# ---------------------------------------------------------------------------------------------------
def find_tcmalloc() -> str | None:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        path = line.rsplit("=>", 1)[-1].strip()
        if path.endswith("libtcmalloc_minimal.so.4") and os.path.exists(path):
            return path
    for p in ("/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
              "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4"):
        if os.path.exists(p):
            return p
    return None


def child_env(work: Path, allocator: str, tcmalloc: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if allocator == "tcmalloc":
        env["LD_PRELOAD"] = tcmalloc
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"),
                "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"})
    return env


def run_child(kind: str, spec: dict, env: dict, log: Path, verbose: bool) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, json.dumps(spec)]
    result = None
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
            elif verbose:
                sys.stderr.write(f"  [{kind}] {line}")
        rc = proc.wait()
    if rc != 0 or result is None:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        raise SystemExit(f"child '{kind}' failed (rc={rc}); log {log}; last lines:\n{tail}")
    result["child_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def ensure_work(work: Path, env: dict, args) -> dict:
    meta_path = work / "meta.json"
    want = {"format": WORK_FORMAT, "model": MODEL_CFG, "model_seed": args.model_seed,
            "data_seed": args.data_seed,
            "n_examples": args.n_examples, "val_examples": VAL_EXAMPLES, "chat_template": CHAT_TEMPLATE}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == want:
            return meta
    for p in ("model", "data.jsonl", "val.jsonl", "hf_datasets_cache"):
        q = work / p
        if q.is_dir():
            shutil.rmtree(q)
        elif q.exists():
            q.unlink()
    work.mkdir(parents=True, exist_ok=True)
    print(f"building model, tokenizer and data in {work} ...", flush=True)
    spec = {"work": str(work), "model_seed": args.model_seed, "data_seed": args.data_seed,
            "n_examples": args.n_examples}
    info = run_child("prepare", spec, env, work / "logs" / "prepare.log", args.verbose)
    meta = {"recipe": want, **info}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def derive(r: dict, peak_gflops: float) -> dict:
    r["tokens_per_s"] = round(r["real_tokens"] / r["loop_s"], 1)
    if r.get("padded_tokens"):
        r["pad_fraction"] = round(1 - r["real_tokens"] / max(r["padded_tokens"], 1), 4)
    fpt = 4 * r["base_params"] + 6 * r["lora_params"]
    r["model_flops_per_token"] = fpt
    r["achieved_gflops"] = round(r["tokens_per_s"] * fpt / 1e9, 1)
    r["mfu"] = round(r["tokens_per_s"] * fpt / (peak_gflops * 1e9), 4)
    return r


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(rows: list[dict], peak: float, precision: str) -> None:
    cols = ["side", "variant", "run", "steps", "examples", "real tok", "loss tok", "pad frac", "loop s", "tok/s",
            "steady tok/s", "peak RSS MB", "user/sys CPU s", "loss first→final", "GFLOP/s", "MFU"]
    lines = []
    for r in rows:
        lines.append([r["side"], r["variant"], str(r["repeat"]), str(r["steps"]), fmt(r.get("examples")),
                      str(r["real_tokens"]), str(r["loss_tokens"]), fmt(r.get("pad_fraction"), 2),
                      fmt(r["loop_s"], 2),
                      fmt(r["tokens_per_s"]),
                      fmt(r.get("steady_tokens_per_s")), fmt(r["peak_rss_mb"], 0),
                      f"{fmt(r['user_cpu_s'])}/{fmt(r['sys_cpu_s'])}",
                      f"{r['first_loss']:.4f}→{r['final_loss']:.4f}", fmt(r["achieved_gflops"]),
                      f"{100 * r['mfu']:.1f}%"])
    w = [max(len(c), *(len(x[i]) for x in lines)) for i, c in enumerate(cols)]
    print("\n" + " | ".join(c.ljust(w[i]) for i, c in enumerate(cols)))
    print("-+-".join("-" * x for x in w))
    for x in lines:
        print(" | ".join(v.ljust(w[i]) for i, v in enumerate(x)))
    print(f"(MFU = tok/s x (4*N + 6*N_lora) / {precision} 2048^3 GEMM peak {peak} GFLOP/s, "
          "measured in this run)")


def main_parent(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60,
                    help="TRL optimizer steps (batch 8); budwood gets a matching budget, see --match")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: TRL bf16=True autocast, budwood precision bf16; fp32: both plain fp32")
    ap.add_argument("--budwood-batching", choices=["padded", "packed"], default="padded")
    ap.add_argument("--budwood-compile", choices=["on", "off", "auto"], default="on",
                    help="budwood training.compile; compile time falls inside the timed loop (first steps)")
    ap.add_argument("--trl-variant", choices=["padding-free", "padding", "packing"], default="padding-free",
                    help="padding-free: flattened batch, max_length=None (TRL's fastest in the anchor); "
                         "padding: right-padded rows, max_length=--trl-max-length; "
                         "packing: bfd packing to --trl-max-length")
    ap.add_argument("--trl-max-length", type=int, default=MAX_SEQ_LEN,
                    help=f"TRL max_length for padding/packing (default {MAX_SEQ_LEN}, = budwood max_seq_len)")
    ap.add_argument("--trl-base-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="dtype TRL loads the frozen base in. fp32 (default) = the anchor's setup (bf16 "
                         "autocast over fp32 weights). budwood's bf16 loads the base in bf16; pass bf16 "
                         "here to match that")
    ap.add_argument("--trl-full-loss", action="store_true",
                    help="TRL loss on all tokens instead of assistant_only_loss=True "
                         "(budwood: assistant tokens only)")
    ap.add_argument("--match", choices=["tokens", "examples"], default="tokens",
                    help="budwood max_steps: closest cumulative real-token count to TRL's (default), "
                         "or closest example count to TRL's")
    ap.add_argument("--budwood-steps", type=int, help="fix budwood's max_steps instead of matching")
    ap.add_argument("--only", choices=["trl", "budwood"],
                    help="run one side (budwood alone needs --budwood-steps)")
    ap.add_argument("--repeats", type=int, default=3, help="run each side this many times, alternating "
                    "TRL, budwood, TRL, ...; the summary uses the median tok/s")
    ap.add_argument("--allocator", choices=["tcmalloc", "glibc"], default=None,
                    help="malloc for both children: tcmalloc via LD_PRELOAD (default when installed: "
                         "apt-get install libtcmalloc-minimal4) or glibc")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; both sides use it")
    ap.add_argument("--work", default=str(HERE / "_work"), help="folder for model, data, logs, outputs "
                    "(model/data are reused across runs)")
    ap.add_argument("--results", default=str(HERE / "results.jsonl"),
                    help="append one JSON line per run (and a summary line) here")
    ap.add_argument("--no-save", action="store_true", help="do not append to --results")
    ap.add_argument("--n-examples", type=int, default=2000)
    ap.add_argument("--data-seed", type=int, default=1234)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--note", default="", help="free text stored with the results")
    ap.add_argument("--verbose", action="store_true", help="stream the children's output")
    args = ap.parse_args(argv)
    if args.only == "budwood" and not args.budwood_steps:
        ap.error("--only budwood needs --budwood-steps (there is no TRL run to match)")

    tcmalloc = find_tcmalloc()
    if args.allocator is None:
        args.allocator = "tcmalloc" if tcmalloc else "glibc"
        if not tcmalloc:
            print("note: tcmalloc not found (apt-get install libtcmalloc-minimal4); using glibc malloc",
                  flush=True)
    if args.allocator == "tcmalloc" and not tcmalloc:
        raise SystemExit("--allocator tcmalloc: libtcmalloc_minimal.so.4 not found "
                         "(Debian/Ubuntu: apt-get install -y libtcmalloc-minimal4)")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work, args.allocator, tcmalloc)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    logs = work / "logs" / run_id

    meta = ensure_work(work, env, args)
    print(f"model: Llama {MODEL_CFG['num_hidden_layers']}x{MODEL_CFG['hidden_size']}, "
          f"N = {meta['params']:,} params "
          f"({meta['params'] - meta['embedding_params']:,} non-embedding + {meta['embedding_params']:,} tied "
          f"embedding); data: {meta['examples']} chats, token lengths {meta['token_lengths']}", flush=True)
    print(f"allocator: {args.allocator}{' (' + tcmalloc + ')' if args.allocator == 'tcmalloc' else ''}; "
          f"precision {args.precision}; device {args.device}; logs in {logs}", flush=True)

    gemm = run_child("gemm", {"device": args.device}, env, logs / "gemm.log", args.verbose)
    peak = gemm[f"{args.precision}_gflops"]
    print(f"GEMM peak (2048^3, median, {gemm['threads']} threads): fp32 {gemm['fp32_gflops']} GFLOP/s, "
          f"bf16 {gemm['bf16_gflops']} GFLOP/s", flush=True)

    common = {"model": str(work / "model"), "data": str(work / "data.jsonl"), "precision": args.precision,
              "device": args.device}
    trl_spec = dict(common, steps=args.steps, trl_variant=args.trl_variant,
                    trl_max_length=args.trl_max_length, trl_base_dtype=args.trl_base_dtype,
                    assistant_only_loss=not args.trl_full_loss,
                    out=str(work / "trl_out"))
    bw_spec = dict(common, budwood_batching=args.budwood_batching, budwood_compile=args.budwood_compile,
                   out=str(work / "budwood_out"),
                   val_data=str(work / "val.jsonl"))
    rows: list[dict] = []
    plan = None
    for rep in range(args.repeats):
        if args.only != "budwood":
            print(f"[{rep + 1}/{args.repeats}] TRL {args.trl_variant} {args.precision}, "
                  f"{args.steps} steps ...", flush=True)
            r = run_child("trl", trl_spec, env, logs / f"trl_{rep}.log", args.verbose)
            r["repeat"] = rep
            rows.append(derive(r, peak))
            print(f"    {r['real_tokens']} tokens in {r['loop_s']:.1f} s = {r['tokens_per_s']} tok/s",
                  flush=True)
        if args.only == "trl":
            continue
        if plan is None:
            if args.budwood_steps:  # predict what that many steps train on (match target = steps * 8)
                plan = run_child("budwood_plan", dict(bw_spec, match="steps", target=args.budwood_steps), env,
                                 logs / "budwood_plan.log", args.verbose)
            else:
                first = rows[0]
                target = first["real_tokens"] if args.match == "tokens" else first["examples"]
                plan = run_child("budwood_plan", dict(bw_spec, match=args.match, target=target), env,
                                 logs / "budwood_plan.log", args.verbose)
                print(f"    budwood plan: max_steps {plan['max_steps']} -> {plan['tokens']} tokens, "
                      f"{plan['examples']} examples (matching TRL's {args.match}: {target})", flush=True)
        print(f"[{rep + 1}/{args.repeats}] budwood {args.budwood_batching} {args.precision}, "
              f"{plan['max_steps']} steps ...", flush=True)
        spec = dict(bw_spec, max_steps=plan["max_steps"], predicted_examples=plan["examples"],
                    predicted_padded_tokens=plan["padded_tokens"])
        r = run_child("budwood", spec, env, logs / f"budwood_{rep}.log", args.verbose)
        if plan["tokens"] != r["real_tokens"]:
            print(f"    warning: budwood trained {r['real_tokens']} tokens, "
                  f"the plan predicted {plan['tokens']}")
        r["repeat"] = rep
        rows.append(derive(r, peak))
        print(f"    {r['real_tokens']} tokens in {r['loop_s']:.1f} s = {r['tokens_per_s']} tok/s", flush=True)

    print_table(rows, peak, args.precision)
    sides = [s for s in ("trl", "budwood") if any(r["side"] == s for r in rows)]
    med = {s: round(statistics.median([r["tokens_per_s"] for r in rows if r["side"] == s]), 1) for s in sides}
    steady = {s: [r["steady_tokens_per_s"] for r in rows if r["side"] == s and r["steady_tokens_per_s"]]
              for s in sides}
    med_steady = {s: round(statistics.median(v), 1) if v else None for s, v in steady.items()}
    summary = {"kind": "summary", "run_id": run_id, "median_tokens_per_s": med,
               "median_steady_tokens_per_s": med_steady}
    if len(med) == 2:
        t, b = [r for r in rows if r["side"] == "trl"][0], [r for r in rows if r["side"] == "budwood"][0]
        summary.update({
            "ratio_budwood_over_trl": round(med["budwood"] / med["trl"], 3),
            "ratio_steady": (round(med_steady["budwood"] / med_steady["trl"], 3)
                             if med_steady["budwood"] and med_steady["trl"] else None),
            "token_diff_pct": round(100 * (b["real_tokens"] - t["real_tokens"]) / t["real_tokens"], 2),
            "loss_token_diff_pct": round(100 * (b["loss_tokens"] - t["loss_tokens"])
                                         / max(t["loss_tokens"], 1), 2),
            "peak_rss_mb": {"trl": t["peak_rss_mb"], "budwood": b["peak_rss_mb"]},
        })
        print(f"\nbudwood / TRL tok/s = {med['budwood']} / {med['trl']} = "
              f"{summary['ratio_budwood_over_trl']}x (steady: {fmt(summary['ratio_steady'], 3)}x) "
              f"(median of {args.repeats}); tokens differ by {summary['token_diff_pct']}% "
              f"(loss tokens {summary['loss_token_diff_pct']}%)")
        if b["lora_params"] != t["lora_params"] or b["base_params"] != t["base_params"]:
            print(f"WARNING: parameter counts differ: TRL {t['base_params']}/{t['lora_params']}, "
                  f"budwood {b['base_params']}/{b['lora_params']}")
    setup = {"run_id": run_id, "allocator": args.allocator, "device": args.device, "gemm": gemm,
             "peak_gflops": peak, "steps_arg": args.steps, "match": args.match,
             "model_params": meta["params"], "note": args.note, "cpu_count": os.cpu_count(),
             "data": {"examples": meta["examples"], "token_lengths": meta["token_lengths"]}}
    print()
    emit_records([dict(setup, **r) for r in rows] + [dict(setup, **summary)], args.results,
                 save=not args.no_save)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "_child":
        CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main_parent(sys.argv[1:])
