"""Quantised bases: memory, speed and loss of LoRA on fp32, bf16 and int8 bases (CPU); nf4 vs bf16 on a GPU.

    python benchmarks/quantization.py --steps 10 --repeats 3      # CPU: budwood-tiny and an 82 M-parameter Llama
    python benchmarks/quantization.py --models tiny --no-save     # quicker, nothing appended to results.jsonl

Each (model, variant, stage) runs in its own process, so its peak RSS (`ru_maxrss`) is its own:
- `train`: budwood's recipe (`train()`) for `--steps` steps on the same synthetic chats, seed and LoRA; records
  the loss at the last step, the recipe's tokens/s (loop time) and the process's peak RSS.
- `serve`: the engine (`budwood serve`'s) loaded with the same base, greedy decoding of `--gen-tokens` tokens for
  8 prompts at once; records generated tokens/s and peak RSS.
Both record `weight_bytes`: what the model's parameters hold, int8 values and scales counted as stored.

Variants: fp32; bf16; int8 (torchao weight-only int8, fp32 activations); int8+bf16 (the same, bf16 activations).
Where CUDA is present the GPU section adds bf16 and nf4 (bitsandbytes, QLoRA) on `cuda` and reports
`torch.cuda.max_memory_allocated` as well; without CUDA it is skipped and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, emit_records, git_state

CPU_VARIANTS = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "int8": ("fp32", "int8"),
                "int8+bf16": ("bf16", "int8")}
GPU_VARIANTS = {"bf16": ("bf16", "none"), "nf4": ("bf16", "nf4")}
# a random-init model of budwood-tiny's architecture, large enough that the linears dominate memory
MEDIUM = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
          "num_key_value_heads": 4, "head_dim": 64}


def make_medium(work: Path) -> Path:
    """budwood-tiny's config and tokenizer with MEDIUM's sizes, random weights (seed 0), saved as safetensors."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from budwood.models.names import TINY_DIR

    out = work / "medium"
    if (out / "tokenizer.json").exists():  # written last
        return out
    config = AutoConfig.from_pretrained(TINY_DIR)
    for k, v in MEDIUM.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(TINY_DIR) / name).exists():
            shutil.copy(Path(TINY_DIR) / name, out / name)
    return out


def write_data(work: Path) -> Path:
    """64 short arithmetic chats: the same for every variant."""
    path = work / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} times {i % 9 + 2}?"},
                          {"role": "assistant", "content": f"{i} times {i % 9 + 2} is {i * (i % 9 + 2)}."}]}
            for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def rss_anon_mb() -> float:
    """This process's anonymous resident memory (RssAnon): what it allocated. RSS also counts the pages of the
    safetensors file it has read (RssFile): an fp32 base's weights are those pages (mapped, read on first use), a
    quantised base's are anonymous copies while the file's pages stay mapped but unused (evictable)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class AnonPeak:
    """budwood's Progress protocol, sampling RssAnon at every logged training step (the model is loaded then)."""

    def __init__(self):
        self.peak = self.file = 0.0

    def start(self, total_steps, first_step):
        self.update({})

    def update(self, record):
        self.peak, self.file = max(self.peak, rss_anon_mb()), max(self.file, rss_file_mb())

    def note(self, message): ...
    def stop(self): ...


def child(args) -> dict:
    """One stage of one variant in this process; returns its record."""
    import torch

    from budwood.models.quant import weight_bytes

    if args.stage == "make":
        return {"base": str(make_medium(Path(args.work)))}
    rec: dict = {"model": args.model_name, "variant": args.variant, "stage": args.stage, "device": args.device,
                 "precision": args.precision, "quantization": args.quantization, "threads": torch.get_num_threads()}
    if args.stage == "train":
        from budwood.config import load_config
        from budwood.train.recipe import train

        out = Path(args.work) / f"adapter-{args.model_name}-{args.variant}-{args.device}"
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        config = load_config(None, [f"base_model={args.base}", f"data.train={args.data}", "data.validation_split=0",
                                    f"output_dir={out}", "training.batch_size=8", f"training.max_steps={args.steps}",
                                    f"training.precision={args.precision}", f"training.device={args.device}",
                                    "training.learning_rate=1e-3", "training.compile=false",
                                    f"quantization={args.quantization}"])
        sampler = AnonPeak()
        train(config, progress=sampler)
        rec["anon_mb"], rec["file_mb"] = sampler.peak, sampler.file
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in lines if "loss" in x]
        prov = json.loads((out / "budwood.json").read_text())
        rec.update(loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"], steps=len(steps),
                   train_tokens=prov["tokens_seen"], train_time_s=prov["train_time_s"],
                   train_tokens_per_s=round(prov["tokens_seen"] / max(prov["train_time_s"], 1e-9), 1))
    else:
        from budwood.engine import Engine, EngineConfig, SamplingParams

        engine = Engine(EngineConfig(base=args.base, precision=args.precision, device=args.device,
                                     quantization=args.quantization, max_batch_tokens=512,
                                     kv_cache_tokens=2048))  # the default 65,536 would dwarf the weights
        rec["weight_bytes"] = weight_bytes(engine.runner.model)
        prompts = [engine.chat_prompt([{"role": "user", "content": f"What is {i} times 7?"}]) for i in range(8)]
        params = SamplingParams(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
        engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        t = time.perf_counter()
        outs = engine.generate(prompts, params)
        dt = time.perf_counter() - t
        rec["anon_mb"], rec["file_mb"] = rss_anon_mb(), rss_file_mb()
        n = sum(len(o.choices[0].token_ids) for o in outs)
        rec.update(gen_tokens=n, gen_time_s=round(dt, 3), gen_tokens_per_s=round(n / dt, 1))
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.device.startswith("cuda"):
        rec["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return rec


def run_child(base: str, model_name: str, variant: str, precision: str, quantization: str, stage: str, device: str,
              args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--base", base, "--model-name", model_name, "--variant", variant,
           "--precision", precision, "--quantization", quantization, "--stage", stage, "--device", device,
           "--steps", str(args.steps), "--gen-tokens", str(args.gen_tokens), "--work", str(args.work),
           "--data", str(args.data)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    last = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not last:
        return {"model": model_name, "variant": variant, "stage": stage, "device": device,
                "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(last[-1])


def medians(runs: list[dict]) -> list[dict]:
    """One record per (model, device, variant, stage): the median of each number over its repeats."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["device"], r["variant"], r["stage"]), []).append(r)
    out = []
    for rs in groups.values():
        ok = [r for r in rs if "error" not in r] or rs
        rec = dict(ok[0], repeats=len(ok))
        for k, v in ok[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rec[k] = statistics.median(r[k] for r in ok)
        out.append(rec)
    return out


def table(records: list[dict]) -> str:
    rows = ["| model | device | variant | weights MB | train anon / file MB | loss @ last step "
            "| Δ loss vs ref | train tok/s | serve anon / file MB | gen tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in records:
        by.setdefault((r["model"], r["device"], r["variant"]), {})[r["stage"]] = r
    refs = {}
    for (model, device, variant), st in by.items():
        if variant in ("fp32", "bf16") and "train" in st and "loss_last" in st["train"]:
            refs.setdefault((model, device), st["train"]["loss_last"])
    for (model, device, variant), st in by.items():
        tr, sv = st.get("train", {}), st.get("serve", {})
        ref = refs.get((model, device))
        delta = f"{tr['loss_last'] - ref:+.4f}" if ref is not None and "loss_last" in tr else "-"
        wb = sv.get("weight_bytes")
        rows.append(f"| {model} | {device} | {variant} | {wb / 2**20:.1f} | {tr.get('anon_mb', 0):.0f} / "
                    f"{tr.get('file_mb', 0):.0f} | {tr.get('loss_last', tr.get('error', '-'))} | {delta} | "
                    f"{tr.get('train_tokens_per_s', 0):.0f} | {sv.get('anon_mb', 0):.0f} / "
                    f"{sv.get('file_mb', 0):.0f} | {sv.get('gen_tokens_per_s', 0):.0f} |"
                    if wb else f"| {model} | {device} | {variant} | error: {tr.get('error') or sv.get('error')} |")
    return "\n".join(rows)


def ratios(records: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in records):
        w = {r["variant"]: r for r in records if r["model"] == model and r["stage"] == "serve" and "weight_bytes" in r}
        t = {r["variant"]: r for r in records if r["model"] == model and r["stage"] == "train" and "anon_mb" in r}
        if "int8" in w and "fp32" in w and "bf16" in w:
            out.append(f"{model}: weights int8/fp32 = {w['int8']['weight_bytes'] / w['fp32']['weight_bytes']:.2f}, "
                       f"int8+bf16/bf16 = {w['int8+bf16']['weight_bytes'] / w['bf16']['weight_bytes']:.2f}; serve "
                       f"anon int8/fp32 = {w['int8']['anon_mb'] / w['fp32']['anon_mb']:.2f}")
        if "int8" in t and "fp32" in t:
            out.append(f"{model}: train anon int8/fp32 = {t['int8']['anon_mb'] / t['fp32']['anon_mb']:.2f}, "
                       f"int8+bf16/bf16 = {t['int8+bf16']['anon_mb'] / t['bf16']['anon_mb']:.2f}")
        if "nf4" in w and "bf16" in w and "cuda_peak_mb" in w["nf4"]:
            out.append(f"{model}: GPU weights nf4/bf16 = {w['nf4']['weight_bytes'] / w['bf16']['weight_bytes']:.2f}, "
                       f"CUDA peak nf4/bf16 = {w['nf4']['cuda_peak_mb'] / w['bf16']['cuda_peak_mb']:.2f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="training steps per variant")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per prompt (8 prompts)")
    p.add_argument("--models", default="tiny,medium", help="tiny (budwood-tiny) and/or medium (random-init, 82 M)")
    p.add_argument("--repeats", type=int, default=3, help="runs per (model, variant, stage), variants interleaved; "
                   "the table shows the median of each number")
    p.add_argument("--work", type=Path, default=HERE / "_work" / "quantization")
    p.add_argument("--results", default=HERE / "results.jsonl")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to --results")
    # the child's own options
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--base", "--model-name", "--variant", "--precision", "--quantization", "--stage", "--data"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    args.data = write_data(args.work)
    bases = {}
    if "tiny" in args.models:
        bases["budwood-tiny"] = "budwood-tiny"
    if "medium" in args.models:  # made in a child: this harness process never imports budwood
        made = subprocess.run([sys.executable, __file__, "--child", "--stage", "make", "--work", str(args.work)],
                              capture_output=True, text=True, check=True)
        bases["medium"] = json.loads(made.stdout.splitlines()[-1])["base"]
    run_id = time.strftime("%Y%m%dT%H%M%S")
    runs = []
    for repeat in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every variant
        for model_name, base in bases.items():
            for variant, (precision, quantization) in CPU_VARIANTS.items():
                for stage in ("train", "serve"):
                    rec = run_child(base, model_name, variant, precision, quantization, stage, "cpu", args)
                    print(json.dumps(dict(rec, repeat=repeat)), file=sys.stderr)
                    runs.append(rec)
    records = medians(runs)
    import torch
    if torch.cuda.is_available():
        for model_name, base in bases.items():
            for variant, (precision, quantization) in GPU_VARIANTS.items():
                for stage in ("train", "serve"):
                    records.append(run_child(base, model_name, variant, precision, quantization, stage, "cuda", args))
    else:
        print("GPU section (nf4 vs bf16 on CUDA): skipped, no CUDA device here", file=sys.stderr)
    print(table(records))
    for line in ratios(records):
        print(line)
    summary = {"run_id": run_id, "benchmark": "quantization", "git": git_state(), "steps": args.steps,
               "gen_tokens": args.gen_tokens, "cuda": torch.cuda.is_available(), "ratios": ratios(records)}
    emit_records([dict(r, run_id=run_id, benchmark="quantization") for r in records] + [summary], args.results,
                 not args.no_save)


if __name__ == "__main__":
    main()
