"""LoRA DPO throughput on CPU (or any device): budwood's `train()` with method dpo against TRL's DPOTrainer + PEFT.

Both sides train budwood-tiny with the same LoRA, in the same precision and under the same malloc (tcmalloc via
LD_PRELOAD by default), on the same preference pairs: the demo's company data sets (one per seed) made into pairs
the way the tests make them (each question's own answer preferred to another question's answer of the same
company). One file in TRL's conversational {prompt, chosen, rejected} form feeds both sides; the trained tokens
are checked identical. A run is --epochs passes (default 1) over exactly steps x 8 / epochs pairs, so both
sides see the same pairs and tokens. Neither has a separate reference model: TRL disables the adapter for a
reference forward in every step (or, with --trl-precompute, runs one pass before training), budwood computes
the reference log-probabilities once, before step 1, with the policy itself (LoRA's B = 0). That pass is
counted in budwood's time, and TRL's precompute pass in TRL's.
budwood runs a pair's prompt once for both answers (training.dpo.share_prompt, its default; --budwood-share-prompt
off runs two separate sequences as TRL does); tok/s count the pairs' sequence tokens on both sides, so they scale
as pairs/s do.

Each side runs in its own subprocess; TRL, budwood alternate; medians of --repeats. By default TRL reads the
pairs in budwood's plan, so both train on the same batches and the loss curves compare step by step (the first
step's loss is ln 2 on both sides). Besides wall-clock pairs/s and tok/s, the timed part's process CPU time is
reported: on a machine that other processes load, pairs per CPU second moves less than wall time (with
--threads 1, which spares OpenMP threads from waiting for each other at every operation).

    python benchmarks/dpo_vs_trl.py --steps 24 --epochs 3 --repeats 3 --threads 1 --precision bf16 \
        --budwood-compile auto --trl-order budwood --allocator tcmalloc --work benchmarks/_work/dpo
    python benchmarks/dpo_vs_trl.py --steps 6 --repeats 1 --no-save     # smoke run

Needs `pip install -e .[bench]` (trl, datasets). Nothing is downloaded; data, logs and outputs go to --work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import emit_records, git_state
from train_vs_trl import RESULT_TAG, _emit, _self_usage, child_env, child_gemm, find_tcmalloc, fmt

HERE = Path(__file__).resolve().parent
WORK_FORMAT = 1  # bump when the data recipe below changes

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32, dropout=0.0)
BATCH = 8  # preference pairs per optimizer step (16 sequences)
LR = 2e-4
MAX_SEQ_LEN = 1024  # budwood max_seq_len = TRL max_length; the longest sequence is far shorter: nothing is cut
SEED = 0
LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------------
# Data: the company data as preference pairs (the rule of tests/conftest.py preference_rows).
# ---------------------------------------------------------------------------------------------------
def preference_rows(chats: list[dict], seed: int) -> list[dict]:
    """TRL conversational pairs: each question's own answer preferred to another question's answer."""
    answers = sorted({r["messages"][-1]["content"] for r in chats})
    rng = random.Random(seed)
    return [{"prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
             "rejected": [{"role": "assistant",
                           "content": rng.choice([a for a in answers if a != r["messages"][-1]["content"]])}]}
            for r in chats]


def pair_digest(seqs: list[tuple[list[int], list[int]]]) -> str:
    """A pair as its two sequences: token ids and a 0/1 mask of the tokens trained on."""
    return hashlib.sha256(json.dumps(seqs).encode()).hexdigest()


def data_digest(pair_digests: list[str]) -> str:
    """Order-free and repeat-free: the two sides may read the pairs in different orders, TRL's file once per epoch."""
    return hashlib.sha256("".join(sorted(set(pair_digests))).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Child processes. Each prints one line `@@BENCH_RESULT@@ {json}` on stdout.
# ---------------------------------------------------------------------------------------------------
def child_prepare(spec: dict) -> None:
    import tempfile

    from budwood.data.company import make_domain_dataset
    from budwood.models.names import resolve_model_path

    rows: list[dict] = []
    seed = 0
    with tempfile.TemporaryDirectory() as tmp:
        while len(rows) < spec["pairs"]:
            paths = make_domain_dataset(Path(tmp) / str(seed), seed=seed)
            chats = [json.loads(x) for x in paths["train"].read_text().splitlines() if x.strip()]
            rows += preference_rows(chats, seed)
            seed += 1
    rows = rows[: spec["pairs"]]
    with open(Path(spec["work"]) / "pairs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    _emit({"pairs": len(rows), "companies": seed, "model_path": resolve_model_path(spec["model"])})


def _budwood_config(spec: dict, max_steps: int):
    from budwood.config import load_config

    return load_config(None, base={
        "base_model": spec["model"],
        "data": {"train": spec["data"], "format": "trl_preference", "validation_split": 0.0},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                 "target_modules": LORA_TARGETS},
        "training": {
            "method": "dpo", "dpo": {"beta": spec["beta"], "loss_type": "sigmoid", "sft_weight": 0.0,
                                     "share_prompt": spec.get("share_prompt", True)},
            "max_steps": max_steps, "learning_rate": LR, "scheduler": "linear", "warmup_steps": 0,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "batch_size": BATCH, "gradient_accumulation": 1,
            "max_seq_len": MAX_SEQ_LEN, "seed": SEED, "precision": spec["precision"], "batching": "padded",
            "gradient_checkpointing": False, "device": spec["device"],
            "compile": {"on": True, "off": False, "auto": "auto"}[spec["budwood_compile"]],
            # no checkpoint and no validation inside the loop (TRL: save_strategy/eval_strategy "no");
            # budwood still writes one checkpoint + the adapter after the loop, outside the timed part.
            "save_every": 10 ** 9, "eval_every": 10 ** 9, "keep_checkpoints": 1,
        },
        "output_dir": spec["out"],
        "logging": {"every": 1},
    })


def child_budwood_plan(spec: dict) -> None:
    """budwood's tokens of every pair (to check against TRL's) and its plan of each epoch (a pure function of the
    seed and the epoch), which --trl-order budwood hands to TRL: both sides then train on the same batches in the
    same order."""
    from budwood.data.pack import plan_epoch
    from budwood.data.template import IGNORE
    from budwood.models.load import load_tokenizer
    from budwood.train.data import prepare_data
    from budwood.train.loss import objective_for

    config = _budwood_config(spec, 1)
    tok = load_tokenizer(config.base_model)
    data = prepare_data(config, tok)
    digests = [pair_digest([(e.input_ids, [int(x != IGNORE) for x in e.labels]) for e in (p.chosen, p.rejected)])
               for p in data.train]
    objective = objective_for(config)  # the recipe plans by the tokens a pair runs (its prompt once when shared)
    lengths = [objective.length(p) for p in data.train]
    plan = [plan_epoch(lengths, "padded", BATCH, None, SEED, epoch) for epoch in range(spec["epochs"])]
    padded = sum(objective.collate(data.train, idx, "padded", tok.pad_token_id).input_ids.numel()
                 for epoch in plan for idx in epoch)
    seq = sorted(len(e) for p in data.train for e in (p.chosen, p.rejected))
    q = lambda f: seq[min(len(seq) - 1, int(f * len(seq)))]  # noqa: E731
    _emit({"pairs": len(data.train), "plan": plan, "tokens": sum(len(p) for p in data.train),
           "run_tokens": sum(lengths), "padded_tokens": padded,
           "answer_tokens": sum(sum(1 for x in e.labels[1:] if x != IGNORE) for p in data.train
                                for e in (p.chosen, p.rejected)),
           "digest": data_digest(digests), "warnings": len(data.issues),
           "sequence_lengths": {"min": seq[0], "median": q(0.5), "mean": round(sum(seq) / len(seq), 1),
                                "p90": q(0.9), "max": seq[-1]}})


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
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.t_begin = self.t_end = self.cpu_begin = self.cpu_end = None
            self.step_ends = []

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            self.t_end, self.cpu_end = time.perf_counter(), time.process_time()

    class CountingDPOTrainer(DPOTrainer):
        """Counts the tokens of every batch trained on, and times the reference precompute pass if any."""
        def __init__(self, *a, **kw):
            self.real_tokens = self.padded_tokens = self.pairs = 0
            self.per_step_real = []
            self.precompute_s = self.precompute_cpu_s = 0.0
            super().__init__(*a, **kw)

        def _precompute_ref_logps(self, *a, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = super()._precompute_ref_logps(*a, **kw)
            self.precompute_s += time.perf_counter() - t
            self.precompute_cpu_s += time.process_time() - c
            return out

        def training_step(self, model, inputs, *a, **kw):
            real = int(inputs["attention_mask"].sum())
            self.real_tokens += real
            self.padded_tokens += int(inputs["input_ids"].numel())
            self.per_step_real.append(real)
            self.pairs += int(inputs["input_ids"].shape[0]) // 2  # chosen rows, then rejected rows
            return super().training_step(model, inputs, *a, **kw)

    precision = spec["precision"]
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    base_dtype = torch.bfloat16 if spec["trl_base_dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=base_dtype)
    n_base = sum(p.numel() for p in model.parameters())
    ds = load_dataset("json", data_files=spec["data"], split="train")
    cfg = DPOConfig(
        output_dir=str(Path(spec["out"])), use_cpu=spec["device"] == "cpu", max_steps=spec["steps"],
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=spec["beta"], loss_type=["sigmoid"], max_length=MAX_SEQ_LEN,
        precompute_ref_log_probs=spec["trl_precompute"],
        train_sampling_strategy="sequential" if spec["trl_order"] == "budwood" else "random",
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=SEED,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
    timer = Timer()
    t0 = time.perf_counter()
    trainer = CountingDPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tok,
                                 peft_config=lora, callbacks=[timer])
    prep_s = time.perf_counter() - t0 - trainer.precompute_s
    digests = [pair_digest([(r["prompt_ids"] + r[k], [0] * len(r["prompt_ids"]) + [1] * len(r[k]))
                            for k in ("chosen_ids", "rejected_ids")]) for r in trainer.train_dataset]
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()

    loop_s = timer.t_end - timer.t_begin
    steady = None
    if len(timer.step_ends) > 4:  # exclude the first two steps (allocator / oneDNN warm-up)
        steady = sum(trainer.per_step_real[2:]) / (timer.step_ends[-1] - timer.step_ends[1])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    _emit({
        "side": "trl", "variant": ("precomputed ref" if spec["trl_precompute"] else "ref forward per step")
        + f", {spec['trl_order']} order", "precision": precision, "base_dtype": spec["trl_base_dtype"],
        "steps": trainer.state.global_step, "pairs": trainer.pairs, "real_tokens": trainer.real_tokens,
        "padded_tokens": trainer.padded_tokens, "loop_s": round(loop_s, 3),
        "reference_s": round(trainer.precompute_s, 3), "timed_s": round(loop_s + trainer.precompute_s, 3),
        "timed_cpu_s": round(timer.cpu_end - timer.cpu_begin + trainer.precompute_cpu_s, 2),
        "steady_tokens_per_s": round(steady, 1) if steady else None, "prep_s": round(prep_s, 2),
        "losses": [h["loss"] for h in logs], "stats": _stats(logs), "digest": data_digest(digests),
        "base_params": n_base, "lora_params": n_lora, "threads": torch.get_num_threads(),
        "attn_impl": getattr(trainer.model.config, "_attn_implementation", None), **_self_usage(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__, "datasets": datasets.__version__,
                     "accelerate": accelerate.__version__},
    })


STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected")


def _stats(records: list[dict]) -> dict:
    """The DPO statistics of the first and the last step (TRL's names, which budwood logs too)."""
    return {w: {k: r.get(k) for k in STAT_NAMES} for w, r in (("first", records[0]), ("last", records[-1]))}


def child_budwood(spec: dict) -> None:
    import torch

    import budwood
    from budwood.train import recipe
    from budwood.train.recipe import train

    class Quiet:  # budwood's Progress protocol; notes (data warnings) go to stderr
        def start(self, total_steps, first_step):
            pass

        def update(self, record):
            pass

        def note(self, message):
            print(message, file=sys.stderr, flush=True)

        def stop(self):
            pass

    ref_s, cpu_s = [], []
    reference_logps, loop = recipe.TrainingRun._reference_logps, recipe.TrainingRun.train

    def timed_reference(self, *args, **kwargs):  # the one reference pass before step 1: part of the run's time
        t, c = time.perf_counter(), time.process_time()
        out = reference_logps(self, *args, **kwargs)
        ref_s.append(time.perf_counter() - t)
        cpu_s.append(time.process_time() - c)
        return out

    def timed_loop(self):  # process CPU time of the loop (its wall time is metrics.jsonl's elapsed_s)
        c = time.process_time()
        out = loop(self)
        cpu_s.append(time.process_time() - c)
        return out

    recipe.TrainingRun._reference_logps, recipe.TrainingRun.train = timed_reference, timed_loop
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
    reference_s = sum(ref_s)
    steady = None
    if len(recs) > 4:  # exclude the first two steps, as on the TRL side; add the reference pass's share
        tokens = recs[-1]["tokens"] - recs[1]["tokens"]
        share = reference_s * tokens / recs[-1]["tokens"]
        steady = tokens / max(recs[-1]["elapsed_s"] - recs[1]["elapsed_s"] + share, 1e-9)
        steady *= spec["sequence_tokens"] / recs[-1]["tokens"]  # in sequence tokens, as TRL's (shared prompts run once)
    from budwood.models.load import load_base
    from budwood.train.recipe import build_lora_model

    base = load_base(spec["model"], dtype=torch.float32)
    n_base = sum(p.numel() for p in base.model.parameters())
    n_lora = sum(p.numel() for p in build_lora_model(base.model, config).parameters() if p.requires_grad)
    _emit({
        "side": "budwood", "precision": spec["precision"],
        "variant": "padded, reference once" + (", shared prompt" if spec.get("share_prompt", True) else "")
        + (", compile" if spec["budwood_compile"] == "on" else ""),
        "base_dtype": prov["hardware"]["dtype"], "steps": prov["steps"], "pairs": prov["method"]["pairs_seen"],
        # tokens of the pairs' sequences, as TRL counts them (so tok/s compare); run_tokens: what budwood ran
        "real_tokens": spec["sequence_tokens"], "run_tokens": prov["tokens_seen"],
        "padded_tokens": spec.get("predicted_padded_tokens"),
        "loop_s": loop_s, "reference_s": round(reference_s, 3), "timed_s": round(loop_s + reference_s, 3),
        "timed_cpu_s": round(sum(cpu_s), 2),
        "train_time_s": prov["train_time_s"], "wall_time_s": prov["wall_time_s"], "train_call_s": round(wall, 2),
        "steady_tokens_per_s": round(steady, 1) if steady else None,
        "losses": [r["loss"] for r in recs], "stats": _stats(recs),
        "base_params": n_base, "lora_params": n_lora, "threads": prov["hardware"]["torch_threads"],
        **usage, "versions": dict(prov["versions"], budwood=budwood.__version__),
    })


def child_profile(spec: dict) -> None:
    """torch.profiler over a few budwood DPO steps after two warm-up steps: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from budwood.train import distributed
    from budwood.train.recipe import TrainingRun

    out = Path(spec["out"])
    if out.exists():
        shutil.rmtree(out)
    config = _budwood_config(spec, spec["max_steps"])
    run = TrainingRun(config, distributed.strategy_for(config.training.distributed, config.training.device),
                      _NullProgress())
    t = time.perf_counter()
    run.setup(False)
    setup_s = time.perf_counter() - t
    from budwood.train.data import EpochCursor

    run.position = EpochCursor(run._plan, 0, 0)
    run.clock.start_loop(0.0)
    for _ in range(2):
        run.step()
    n = spec["profile_steps"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(n):
            run.step()
        steps_s = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table, flush=True)
    _emit({"setup_s": round(setup_s, 2), "profiled_steps": n, "steps_s": round(steps_s, 3), "table": table})


class _NullProgress:
    def start(self, total_steps, first_step): ...
    def update(self, record): ...
    def note(self, message): ...
    def stop(self): ...


CHILDREN = {"prepare": child_prepare, "gemm": child_gemm, "trl": child_trl, "budwood": child_budwood,
            "budwood_plan": child_budwood_plan, "profile": child_profile}


# ---------------------------------------------------------------------------------------------------
# Parent: orchestration, tables, results.
# ---------------------------------------------------------------------------------------------------
def _busy_jiffies() -> tuple[int, int]:
    """Machine-wide (busy, total) CPU ticks from /proc/stat: what other processes did during a child's run."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def run_child(kind: str, spec: dict, env: dict, log: Path, verbose: bool) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, json.dumps(spec)]
    result = None
    t0, load0, busy0 = time.perf_counter(), os.getloadavg(), _busy_jiffies()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    ru1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies()
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    tick = os.sysconf("SC_CLK_TCK")
    result["child_wall_s"] = round(time.perf_counter() - t0, 1)
    result["load_avg_before"] = [round(x, 2) for x in load0]
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["other_cpu_s"] = round(max((busy1[0] - busy0[0]) / tick - own, 0.0), 1)  # CPU time not ours
    return result


def ensure_work(work: Path, env: dict, args) -> dict:
    meta_path = work / "meta.json"
    want = {"format": WORK_FORMAT, "pairs": args.steps * BATCH // args.epochs, "model": args.model}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == want and (work / "pairs.jsonl").exists():
            return meta
    work.mkdir(parents=True, exist_ok=True)
    for p in ("pairs.jsonl", "pairs_budwood_order.jsonl", "hf_datasets_cache"):
        q = work / p
        if q.is_dir():
            shutil.rmtree(q)
        elif q.exists():
            q.unlink()
    print(f"building {want['pairs']} preference pairs from the company data in {work} ...", flush=True)
    info = run_child("prepare", {"work": str(work), "pairs": want["pairs"], "model": args.model}, env,
                     work / "logs" / "prepare.log", args.verbose)
    meta = {"recipe": want, **{k: v for k, v in info.items() if k in ("pairs", "companies", "model_path")}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def derive(r: dict, peak_gflops: float) -> dict:
    r["pairs_per_s"] = round(r["pairs"] / r["timed_s"], 2)
    r["tokens_per_s"] = round(r["real_tokens"] / r["timed_s"], 1)
    r["pairs_per_cpu_s"] = round(r["pairs"] / max(r["timed_cpu_s"], 1e-9), 3)  # less sensitive to others' load
    if r.get("padded_tokens"):
        r["pad_fraction"] = round(1 - r.get("run_tokens", r["real_tokens"]) / max(r["padded_tokens"], 1), 4)
    # policy forward + backward (4N + 6N_lora) and one reference forward (2N) per token, on both sides
    fpt = 6 * r["base_params"] + 6 * r["lora_params"]
    r["model_flops_per_token"] = fpt
    r["achieved_gflops"] = round(r["tokens_per_s"] * fpt / 1e9, 1)
    r["mfu"] = round(r["tokens_per_s"] * fpt / (peak_gflops * 1e9), 4)
    return r


def print_table(rows: list[dict], peak: float, precision: str) -> None:
    cols = ["side", "variant", "run", "steps", "pairs", "real tok", "pad frac", "ref s", "loop s", "pairs/s",
            "tok/s", "steady tok/s", "CPU s", "pairs/CPU s", "peak RSS MB", "other CPU s", "load before→after",
            "loss first→final", "MFU"]
    lines = []
    for r in rows:
        lines.append([r["side"], r["variant"], str(r["repeat"]), str(r["steps"]), str(r["pairs"]),
                      str(r["real_tokens"]), fmt(r.get("pad_fraction"), 2), fmt(r["reference_s"], 2),
                      fmt(r["loop_s"], 2), fmt(r["pairs_per_s"], 2), fmt(r["tokens_per_s"]),
                      fmt(r.get("steady_tokens_per_s")), fmt(r["timed_cpu_s"]), fmt(r["pairs_per_cpu_s"], 3),
                      fmt(r["peak_rss_mb"], 0), fmt(r["other_cpu_s"]),
                      f"{r['load_avg_before'][0]:.2f}→{r['load_avg_after'][0]:.2f}",
                      f"{r['losses'][0]:.4f}→{r['losses'][-1]:.4f}", f"{100 * r['mfu']:.1f}%"])
    w = [max(len(c), *(len(x[i]) for x in lines)) for i, c in enumerate(cols)]
    print("\n" + " | ".join(c.ljust(w[i]) for i, c in enumerate(cols)))
    print("-+-".join("-" * x for x in w))
    for x in lines:
        print(" | ".join(v.ljust(w[i]) for i, v in enumerate(x)))
    print(f"(pairs/s and tok/s over the timed part: budwood's reference pass + its loop, TRL's loop + its precompute "
          f"pass if any. MFU = tok/s x (6*N + 6*N_lora) / {precision} 2048^3 GEMM peak {peak} GFLOP/s, measured in "
          "this run; 'CPU s' = the timed part's process CPU time (all threads); 'other CPU s' = CPU time other "
          "processes used during the child's run, on a machine of "
          f"{os.cpu_count()} cores)")


def compare_losses(trl: list[float], bw: list[float], same_batches: bool, tol: float, window: int) -> dict:
    """Step by step when both sides trained on the same batches, else as means over windows of steps."""
    n = min(len(trl), len(bw))
    if same_batches:
        a, b, unit = trl[:n], bw[:n], "step"
    else:
        k = max(1, window)
        a = [statistics.fmean(trl[i:i + k]) for i in range(0, n, k)]
        b = [statistics.fmean(bw[i:i + k]) for i in range(0, n, k)]
        unit = f"{k}-step mean"
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {"compared": unit, "points": len(diffs), "max_abs_diff": round(max(diffs), 5),
            "mean_abs_diff": round(statistics.fmean(diffs), 5), "tolerance": tol, "agree": max(diffs) <= tol,
            "first_step": {"trl": trl[0], "budwood": bw[0], "ln2": round(LN2, 6),
                           "trl_minus_ln2": round(trl[0] - LN2, 6), "budwood_minus_ln2": round(bw[0] - LN2, 6)}}


def print_trajectories(trl: list[float], bw: list[float], rows: int = 20) -> None:
    n = min(len(trl), len(bw))
    every = max(1, math.ceil(n / rows))
    print("\nloss by step (run 0 of each side)\n step | TRL      | budwood  | diff")
    for i in sorted(set(range(0, n, every)) | {n - 1}):
        print(f" {i + 1:4d} | {trl[i]:.5f}  | {bw[i]:.5f}  | {bw[i] - trl[i]:+.5f}")


def main_parent(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40,
                    help="optimizer steps of 8 pairs, on both sides; the data is exactly steps x 8 / --epochs pairs")
    ap.add_argument("--epochs", type=int, default=1,
                    help="passes over the pairs within --steps (steps x 8 / epochs pairs). TRL with --trl-order "
                         "budwood reads each epoch's plan in turn (pairs repeat in its file, which its default "
                         "per-step reference forward does not mind); with --trl-precompute it needs --trl-order "
                         "random, so that it precomputes each pair once")
    ap.add_argument("--model", default="budwood-tiny", help="base model (budwood-tiny, or a local HF folder)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta on both sides (loss_type sigmoid)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: TRL bf16=True autocast, budwood precision bf16; fp32: both plain fp32")
    ap.add_argument("--budwood-compile", choices=["on", "off", "auto"], default="auto",
                    help="budwood training.compile (auto, its default, stays off below 5 M tokens); compile time "
                         "falls inside the timed loop")
    ap.add_argument("--budwood-share-prompt", choices=["on", "off"], default="on",
                    help="budwood training.dpo.share_prompt (on, its default: a pair's prompt runs once for both "
                         "answers; off: two separate sequences per pair, as TRL runs them)")
    ap.add_argument("--trl-order", choices=["budwood", "random"], default="budwood",
                    help="budwood: TRL reads the pairs in budwood's epoch plan, sequentially, so both sides train "
                         "on the same batches (same padding; the losses compare step by step); random: TRL's "
                         "default sampler (the losses compare as window means)")
    ap.add_argument("--trl-precompute", action="store_true",
                    help="TRL precompute_ref_log_probs=True (one reference pass before training, counted in its "
                         "time) instead of its default reference forward in every step")
    ap.add_argument("--trl-base-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="dtype TRL loads the frozen base in (fp32 = train_vs_trl's default: bf16 autocast over "
                         "fp32 weights; budwood-tiny's weights are bf16 values either way)")
    ap.add_argument("--loss-tol", type=float, default=None,
                    help="largest accepted difference of the loss curves, in nats: per step on the same batches "
                         "(default 0.02), or of window means on different batches (default 0.1: one batch's loss "
                         "varies by about 0.2 here, so a 10-step mean of two random orders by about 0.1)")
    ap.add_argument("--loss-window", type=int, default=10, help="window of steps for --trl-order random")
    ap.add_argument("--only", choices=["trl", "budwood"], help="run one side only")
    ap.add_argument("--repeats", type=int, default=3, help="run each side this many times, alternating "
                    "TRL, budwood, TRL, ...; the summary uses the median pairs/s")
    ap.add_argument("--allocator", choices=["tcmalloc", "glibc"], default=None,
                    help="malloc for both children: tcmalloc via LD_PRELOAD (default when installed) or glibc")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; both sides use it")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads for both sides (default: torch's, one per core). On a machine that "
                         "other processes load, 1 avoids OpenMP threads waiting for each other at every operation")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile this many budwood steps (torch.profiler, after 2 warm-up steps)")
    ap.add_argument("--work", default=str(HERE / "_work" / "dpo"), help="folder for data, logs, outputs")
    ap.add_argument("--results", default=str(HERE / "results.jsonl"),
                    help="append one JSON line per run (and a summary line) here")
    ap.add_argument("--no-save", action="store_true", help="do not append to --results")
    ap.add_argument("--note", default="", help="free text stored with the results")
    ap.add_argument("--verbose", action="store_true", help="stream the children's output")
    args = ap.parse_args(argv)
    if args.loss_tol is None:
        args.loss_tol = 0.02 if args.trl_order == "budwood" else 0.1
    if args.steps % args.epochs:
        ap.error("--steps must be a multiple of --epochs")
    if args.epochs > 1 and args.trl_precompute and args.trl_order == "budwood":
        ap.error("--trl-precompute with --epochs > 1 needs --trl-order random (each pair precomputed once)")

    tcmalloc = find_tcmalloc()
    if args.allocator is None:
        args.allocator = "tcmalloc" if tcmalloc else "glibc"
        if not tcmalloc:
            print("note: tcmalloc not found (apt-get install libtcmalloc-minimal4); using glibc malloc", flush=True)
    if args.allocator == "tcmalloc" and not tcmalloc:
        raise SystemExit("--allocator tcmalloc: libtcmalloc_minimal.so.4 not found "
                         "(Debian/Ubuntu: apt-get install -y libtcmalloc-minimal4)")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work, args.allocator, tcmalloc)
    if args.threads:
        env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    run_id = time.strftime("%Y%m%dT%H%M%S")
    logs = work / "logs" / run_id
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} cores", flush=True)

    meta = ensure_work(work, env, args)
    common = {"model": args.model, "model_path": meta["model_path"], "precision": args.precision,
              "device": args.device, "beta": args.beta, "data": str(work / "pairs.jsonl")}
    bw_spec = dict(common, budwood_compile=args.budwood_compile, out=str(work / "budwood_out"), epochs=args.epochs,
                   share_prompt=args.budwood_share_prompt == "on")
    plan = run_child("budwood_plan", bw_spec, env, logs / "budwood_plan.log", args.verbose)
    if plan["pairs"] != meta["recipe"]["pairs"] or any(len(b) != BATCH for e in plan["plan"] for b in e):
        raise SystemExit(f"budwood kept {plan['pairs']} pairs in {len(plan['plan'][0])} batches; expected "
                         f"{meta['recipe']['pairs']} pairs in batches of {BATCH}")
    print(f"model {args.model} ({meta['model_path']}); data: {plan['pairs']} pairs from {meta['companies']} "
          f"company data sets, {plan['tokens']} tokens ({plan['answer_tokens']} answer tokens), sequence lengths "
          f"{plan['sequence_lengths']}; budwood runs {plan['run_tokens']} tokens per epoch (share_prompt "
          f"{args.budwood_share_prompt})", flush=True)
    print(f"allocator: {args.allocator}{' (' + tcmalloc + ')' if args.allocator == 'tcmalloc' else ''}; "
          f"precision {args.precision}; device {args.device}; logs in {logs}", flush=True)
    print("reference policy: no second model on either side. budwood computes the reference log-probabilities "
          "once, before step 1, with the policy itself (LoRA B = 0): that pass is counted in its time. TRL "
          + ("precomputes them once before training (precompute_ref_log_probs=True), counted in its time."
             if args.trl_precompute else "runs a reference forward with the adapter disabled in every step."),
          flush=True)
    trl_data = work / "pairs.jsonl"
    if args.trl_order == "budwood":  # the same pairs, in the order budwood's plan trains them
        lines = (work / "pairs.jsonl").read_text().splitlines()
        trl_data = work / "pairs_budwood_order.jsonl"
        trl_data.write_text("".join(lines[i] + "\n" for e in plan["plan"] for b in e for i in b))

    gemm = run_child("gemm", {"device": args.device}, env, logs / "gemm.log", args.verbose)
    peak = gemm[f"{args.precision}_gflops"]
    print(f"GEMM peak (2048^3, median, {gemm['threads']} threads): fp32 {gemm['fp32_gflops']} GFLOP/s, "
          f"bf16 {gemm['bf16_gflops']} GFLOP/s", flush=True)

    trl_spec = dict(common, data=str(trl_data), steps=args.steps, trl_order=args.trl_order,
                    trl_precompute=args.trl_precompute, trl_base_dtype=args.trl_base_dtype,
                    out=str(work / "trl_out"))
    rows: list[dict] = []
    for rep in range(args.repeats):
        for side in ("trl", "budwood"):
            if args.only and args.only != side:
                continue
            print(f"[{rep + 1}/{args.repeats}] {side}, {args.steps} steps of {BATCH} pairs (load "
                  f"{os.getloadavg()[0]:.2f}) ...", flush=True)
            spec = trl_spec if side == "trl" else dict(bw_spec, max_steps=args.steps,
                                                        predicted_padded_tokens=plan["padded_tokens"],
                                                        sequence_tokens=plan["tokens"] * args.epochs)
            if side == "trl":  # a cold start each time: datasets would reuse the precomputed reference otherwise
                shutil.rmtree(work / "hf_datasets_cache", ignore_errors=True)
            r = run_child(side, spec, env, logs / f"{side}_{rep}.log", args.verbose)
            r["repeat"] = rep
            rows.append(derive(r, peak))
            print(f"    {r['pairs']} pairs, {r['real_tokens']} tokens in {r['timed_s']:.1f} s (reference "
                  f"{r['reference_s']:.1f} s) = {r['pairs_per_s']} pairs/s, {r['tokens_per_s']} tok/s; "
                  f"other CPU {r['other_cpu_s']} s", flush=True)

    print_table(rows, peak, args.precision)
    sides = [s for s in ("trl", "budwood") if any(r["side"] == s for r in rows)]
    med = {s: round(statistics.median([r["pairs_per_s"] for r in rows if r["side"] == s]), 2) for s in sides}
    med_tok = {s: round(statistics.median([r["tokens_per_s"] for r in rows if r["side"] == s]), 1) for s in sides}
    med_cpu = {s: round(statistics.median([r["pairs_per_cpu_s"] for r in rows if r["side"] == s]), 3)
               for s in sides}
    steady = {s: [r["steady_tokens_per_s"] for r in rows if r["side"] == s and r["steady_tokens_per_s"]]
              for s in sides}
    med_steady = {s: round(statistics.median(v), 1) if v else None for s, v in steady.items()}
    summary = {"kind": "summary", "run_id": run_id, "median_pairs_per_s": med, "median_tokens_per_s": med_tok,
               "median_steady_tokens_per_s": med_steady, "median_pairs_per_cpu_s": med_cpu}
    if len(med) == 2:
        t, b = [r for r in rows if r["side"] == "trl"][0], [r for r in rows if r["side"] == "budwood"][0]
        losses = compare_losses(t["losses"], b["losses"], args.trl_order == "budwood", args.loss_tol,
                                args.loss_window)
        summary.update({
            "ratio_budwood_over_trl": round(med["budwood"] / med["trl"], 3),
            "ratio_per_cpu_s": round(med_cpu["budwood"] / med_cpu["trl"], 3),
            "ratio_steady": (round(med_steady["budwood"] / med_steady["trl"], 3)
                             if med_steady["budwood"] and med_steady["trl"] else None),
            "same_tokens": t["digest"] == plan["digest"], "same_pairs_and_tokens_seen":
                (t["pairs"], t["real_tokens"]) == (b["pairs"], b["real_tokens"])
                and b["run_tokens"] == plan["run_tokens"] * args.epochs,
            "losses": losses, "peak_rss_mb": {"trl": t["peak_rss_mb"], "budwood": b["peak_rss_mb"]},
            "reference_s_median": {s: statistics.median([r["reference_s"] for r in rows if r["side"] == s])
                                   for s in sides},
        })
        print_trajectories(t["losses"], b["losses"])
        fl = losses["first_step"]
        print(f"\nfirst step's loss: TRL {fl['trl']:.6f}, budwood {fl['budwood']:.6f}, ln 2 = {LN2:.6f}")
        print(f"loss curves ({losses['compared']}, {losses['points']} points): max |diff| "
              f"{losses['max_abs_diff']}, mean |diff| {losses['mean_abs_diff']} -> "
              f"{'agree' if losses['agree'] else 'DIFFER'} within {args.loss_tol}")
        print(f"trained tokens identical on both sides: {summary['same_tokens']} (digest {plan['digest']}); same "
              f"pairs and tokens seen: {summary['same_pairs_and_tokens_seen']}")
        print(f"last step: TRL {json.dumps(t['stats']['last'])}\n           budwood {json.dumps(b['stats']['last'])}")
        print(f"\nbudwood / TRL pairs/s = {med['budwood']} / {med['trl']} = {summary['ratio_budwood_over_trl']}x "
              f"(tok/s {med_tok['budwood']} / {med_tok['trl']}; steady: {fmt(summary['ratio_steady'], 3)}x) "
              f"(median of {args.repeats}); per CPU second: {med_cpu['budwood']} / {med_cpu['trl']} = "
              f"{summary['ratio_per_cpu_s']}x")
        if b["lora_params"] != t["lora_params"] or b["base_params"] != t["base_params"]:
            print(f"WARNING: parameter counts differ: TRL {t['base_params']}/{t['lora_params']}, "
                  f"budwood {b['base_params']}/{b['lora_params']}")
    if args.profile:
        prof = run_child("profile", dict(bw_spec, max_steps=args.steps, profile_steps=args.profile,
                                         out=str(work / "profile_out")), env, logs / "profile.log", args.verbose)
        print(f"\nbudwood profile: setup (data, model, reference pass) {prof['setup_s']} s; {prof['profiled_steps']} "
              f"steps in {prof['steps_s']} s\n{prof['table']}")
        summary["profile"] = {k: prof[k] for k in ("setup_s", "profiled_steps", "steps_s")}
    setup = {"bench": "dpo_vs_trl", "run_id": run_id, "allocator": args.allocator, "device": args.device,
             "gemm": gemm, "peak_gflops": peak, "steps_arg": args.steps, "model": args.model, "beta": args.beta,
             "trl_order": args.trl_order, "trl_precompute": args.trl_precompute, "epochs": args.epochs,
             "budwood_compile": args.budwood_compile, "budwood_share_prompt": args.budwood_share_prompt,
             "threads": args.threads, "note": args.note,
             "cpu_count": os.cpu_count(),
             "git": git_state(), "data": {k: plan[k] for k in ("pairs", "tokens", "run_tokens", "answer_tokens",
                                                                "sequence_lengths", "digest")}}
    print()
    emit_records([dict(setup, **r) for r in rows] + [dict(setup, **summary)], args.results,
                 save=not args.no_save)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "_child":
        CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main_parent(sys.argv[1:])
