"""Multi-adapter generation throughput on CPU (or any device): budwood's engine against PEFT `generate`.

One random-init ~40M-parameter Llama (the model of train_vs_trl.py, with budwood-tiny's tokenizer and
chat template) and 4 random LoRA adapters, built here. The workload is the same for every case: 32
requests with prompts of 64-256 tokens, 128 new tokens each (greedy, end-of-turn ignored), spread
round-robin over a0, a1, a2, a3 and the bare base.

    python benchmarks/serve_vs_peft.py --precision fp32 --repeats 3 --work benchmarks/_work

Cases: PEFT `generate(adapter_names=...)` in static left-padded batches of 8 (the anchor's way);
budwood's `Engine.generate` (continuous batching) in reproducible mode (batch_invariant=True, the
default) and without it; and the engine with every request on a0 against every request on the base.
Nothing is downloaded. See benchmarks/README.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import emit_records, git_state

HERE = Path(__file__).resolve().parent
RESULT_TAG = "@@BENCH_RESULT@@ "
WORK_FORMAT = 1  # bump when the model / adapter recipe below changes

# The model of train_vs_trl.py (N = 39,596,544 with tied embeddings); the tokenizer is budwood-tiny's
# (vocab 8192, specials <|pad|>=0 <|bos|>=1 <|end|>=2 <|system|> <|user|> <|assistant|>, chat template).
MODEL_CFG = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1408, vocab_size=8192, max_position_embeddings=1024,
                 tie_word_embeddings=True)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32)
ADAPTERS = ["a0", "a1", "a2", "a3"]
MIX = ADAPTERS + [None]  # request i goes to MIX[i % 5]; None is the bare base
FIRST_WORD_ID = 6  # ids below are the tokenizer's specials
WORKLOADS = {"mixed": 0, "a0": 1, "base": 2}  # variant offsets, see _variant


# ---------------------------------------------------------------------------------------------------
# Child processes. Each prints one line `@@BENCH_RESULT@@ {json}` on stdout.
# ---------------------------------------------------------------------------------------------------
def _emit(obj: dict) -> None:
    print(RESULT_TAG + json.dumps(obj), flush=True)


def _self_usage() -> dict:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "user_cpu_s": round(ru.ru_utime, 1),
            "sys_cpu_s": round(ru.ru_stime, 1)}


def _versions() -> dict:
    import peft
    import torch
    import transformers

    import budwood

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "budwood": budwood.__version__}


def _lora_config():
    from peft import LoraConfig

    # init_lora_weights=False: B is random too, so every adapter really changes the output (as in the anchor)
    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      init_lora_weights=False, target_modules=LORA_TARGETS)


def child_prepare(spec: dict) -> None:
    import copy

    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from budwood.models.load import TINY_DIR

    work = Path(spec["work"])
    model_dir, adapters_dir = work / "serve_model", work / "serve_adapters"
    tok = AutoTokenizer.from_pretrained(TINY_DIR)
    assert len(tok) <= MODEL_CFG["vocab_size"] and tok.chat_template, (len(tok), tok.chat_template)
    torch.manual_seed(spec["model_seed"])
    cfg = LlamaConfig(**MODEL_CFG, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)  # safetensors (budwood loads safetensors only)
    tok.save_pretrained(model_dir)
    lora_params = None
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(spec["adapter_seed"] + i)
        pm = get_peft_model(copy.deepcopy(model), _lora_config())  # adapter "default": saved at the top level
        lora_params = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        pm.save_pretrained(adapters_dir / name)
    # A user turn through the chat template, split around its content: prompts are built from these ids.
    marker = "\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    _emit({"params": sum(p.numel() for p in model.parameters()), "lora_params": lora_params, "vocab": len(tok),
           "head_ids": tok(head, add_special_tokens=False)["input_ids"],
           "tail_ids": tok(tail, add_special_tokens=False)["input_ids"]})


def _variant(prompts: list[list[int]], v: int, at: int, vocab: int) -> list[list[int]]:
    """The prompts with the first content token set from `v`. Each timed run uses its own variant, so no
    run finds its prompts in the engine's prefix cache (freed blocks keep their hashes); lengths stay."""
    tok = FIRST_WORD_ID + v % (vocab - FIRST_WORD_ID)
    return [p[:at] + [tok] + p[at + 1:] for p in prompts]


def _workload_adapters(workload: str, n: int) -> list[str | None]:
    if workload == "mixed":
        return [MIX[i % len(MIX)] for i in range(n)]
    return [None if workload == "base" else workload] * n


def child_peft(spec: dict) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    device = torch.device(spec["device"])
    base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    adapters = Path(spec["adapters"])
    pm = PeftModel.from_pretrained(base, adapters / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        pm.load_adapter(adapters / name, adapter_name=name)
    pm.to(device=device, dtype=dtype)  # weights in the stated dtype, not autocast (as in the anchor)
    pm.eval()
    pad = base.config.pad_token_id
    prompts, meta = spec["prompts"], spec["meta"]
    names = ["__base__" if a is None else a for a in _workload_adapters("mixed", len(prompts))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(batch_prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        out_ids = []
        t = time.perf_counter()
        for s in range(0, len(batch_prompts), spec["batch"]):
            chunk = batch_prompts[s:s + spec["batch"]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with torch.inference_mode():
                out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=pad, adapter_names=names[s:s + len(chunk)])
            out_ids += out[:, width:].tolist()
        sync()
        return time.perf_counter() - t, out_ids

    run(_variant(prompts, 10 ** 6, meta["at"], meta["vocab"])[:spec["batch"]], 4)  # warm-up
    times, tokens = [], None
    for rep in range(spec["repeats"]):
        sec, out = run(_variant(prompts, 3 * rep + WORKLOADS["mixed"], meta["at"], meta["vocab"]), spec["new"])
        assert all(len(o) == spec["new"] for o in out), [len(o) for o in out]
        times.append(round(sec, 3))
        tokens = tokens or out
        print(f"run {rep + 1}: {sec:.2f} s", file=sys.stderr, flush=True)
    _emit({"case": "peft", "workload": "mixed", "times_s": times, "tokens": tokens,
           "threads": torch.get_num_threads(), **_self_usage(), "versions": _versions()})


def child_budwood(spec: dict) -> None:
    """Both engines (reproducible and plain) live in this one process; their runs alternate."""
    import logging

    import torch

    from budwood.engine import Engine, EngineConfig, SamplingParams

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    overrides = {k: spec[k] for k in ("max_num_seqs", "max_batch_tokens") if spec.get(k)}
    engines = {}
    for case, invariant in (("engine", True), ("engine_plain", False)):
        if case in spec["cases"] or (case == "engine" and "lora" in spec["cases"]):
            engines[case] = Engine(EngineConfig(base=spec["model"], adapters=spec["adapters"],
                                                precision=spec["precision"], device=spec["device"],
                                                batch_invariant=invariant, **overrides))
    prompts, meta, n = spec["prompts"], spec["meta"], len(spec["prompts"])
    params = SamplingParams(max_tokens=spec["new"], temperature=0, ignore_eos=True)
    plan = []  # (result key, engine, workload), alternating within each repeat
    if "engine" in spec["cases"]:
        plan.append(("engine", "engine", "mixed"))
    if "engine_plain" in spec["cases"]:
        plan.append(("engine_plain", "engine_plain", "mixed"))
    if "lora" in spec["cases"]:
        plan += [("engine_a0", "engine", "a0"), ("engine_base", "engine", "base")]

    def run(engine, workload: str, v: int, sp=params, k=n) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        outs = engine.generate(_variant(prompts, v, meta["at"], meta["vocab"])[:k], sp,
                               _workload_adapters(workload, n)[:k])
        sec = time.perf_counter() - t
        return sec, [o.choices[0].token_ids for o in outs]

    for engine in engines.values():  # warm-up; also loads every adapter
        run(engine, "mixed", 10 ** 6, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), len(MIX) * 2)
    results = {key: {"case": key, "workload": wl, "times_s": [], "tokens": None} for key, _, wl in plan}
    for rep in range(spec["repeats"]):
        for key, eng_key, wl in plan:
            sec, out = run(engines[eng_key], wl, 3 * rep + WORKLOADS[wl])
            assert all(len(o) == spec["new"] for o in out), [len(o) for o in out]
            results[key]["times_s"].append(round(sec, 3))
            print(f"run {rep + 1} {key}: {sec:.2f} s", file=sys.stderr, flush=True)
            results[key]["tokens"] = results[key]["tokens"] or out
    profile = None
    if spec.get("profile") and "engine" in engines:  # one extra, untimed mixed run under cProfile
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run(engines["engine"], "mixed", 10 ** 6 + 1)
        prof.disable()
        prof.dump_stats(spec["profile"])
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        profile = buf.getvalue()
    # the runner's batch-invariance row floors, by whatever name this engine version gives them
    floors = ("min_rows", "min_rows_f32", "rows", "rows_f32")
    info = {key: {"row_floors": {k: repr(getattr(e.runner, k)) for k in floors if hasattr(e.runner, k)},
                  "prefix_cache_tokens": e.scheduler.cached_tokens, "dtype": str(e.dtype).replace("torch.", ""),
                  "max_num_seqs": e.config.max_num_seqs, "max_batch_tokens": e.config.max_batch_tokens}
            for key, e in engines.items()}
    _emit({"results": list(results.values()), "engines": info, "profile": profile,
           "threads": torch.get_num_threads(), **_self_usage(), "versions": _versions()})


CHILDREN = {"prepare": child_prepare, "peft": child_peft, "budwood": child_budwood}


# ---------------------------------------------------------------------------------------------------
# Parent: orchestration, tables, results.
# ---------------------------------------------------------------------------------------------------
def find_tcmalloc() -> str | None:
    from budwood.allocator import find_tcmalloc as find

    return find()


def child_env(allocator: str, tcmalloc: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if allocator == "tcmalloc":
        env["LD_PRELOAD"] = tcmalloc
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                "PYTHONUNBUFFERED": "1"})
    return env


def run_child(kind: str, spec: dict, env: dict, log: Path, verbose: bool) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    spec_path = log.with_suffix(".spec.json")  # prompts make the spec too long for argv
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, str(spec_path)]
    result = None
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_TAG):
                    result = json.loads(line[len(RESULT_TAG):])
                    continue
                f.write(line)
                if verbose:
                    sys.stderr.write(f"  [{kind}] {line}")
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
    if rc != 0 or result is None:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        raise SystemExit(f"child '{kind}' failed (rc={rc}); log {log}; last lines:\n{tail}")
    result["child_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def ensure_work(work: Path, env: dict, args) -> dict:
    meta_path = work / "serve_meta.json"
    want = {"format": WORK_FORMAT, "model": MODEL_CFG, "lora": LORA, "targets": LORA_TARGETS, "adapters": ADAPTERS,
            "model_seed": args.model_seed, "adapter_seed": args.adapter_seed}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == want and (work / "serve_model" / "config.json").exists():
            return meta
    print(f"building model and {len(ADAPTERS)} adapters in {work} ...", flush=True)
    spec = {"work": str(work), "model_seed": args.model_seed, "adapter_seed": args.adapter_seed}
    info = run_child("prepare", spec, env, work / "logs" / "serve_prepare.log", args.verbose)
    meta = {"recipe": want, **info}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def make_prompts(meta: dict, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n chat prompts (user turn + assistant header) of lo..hi tokens, content random word ids."""
    rng = random.Random(seed)
    head, tail = meta["head_ids"], meta["tail_ids"]
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        body = [rng.randrange(FIRST_WORD_ID, meta["vocab"]) for _ in range(length - len(head) - len(tail))]
        out.append(head + body + tail)
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of requests whose tokens are identical, and the mean length of the common prefix."""
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(k)
    same = sum(1 for x, y in zip(a, b) if x == y)
    return {"identical": same, "of": len(prefix), "share": round(same / max(len(prefix), 1), 3),
            "mean_common_prefix": round(sum(prefix) / max(len(prefix), 1), 1)}


def main_parent(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="weights of base and adapters on both sides (PEFT: loaded in it; budwood: "
                         "EngineConfig.precision, LoRA maths in fp32)")
    ap.add_argument("--requests", type=int, default=32, help="requests per run")
    ap.add_argument("--new", type=int, default=128, help="new tokens per request (greedy, end-of-turn ignored)")
    ap.add_argument("--min-prompt", type=int, default=64, help="shortest prompt, in tokens")
    ap.add_argument("--max-prompt", type=int, default=256, help="longest prompt, in tokens")
    ap.add_argument("--peft-batch", type=int, default=8, help="PEFT static batch size")
    ap.add_argument("--cases", default="peft,engine,engine_plain,lora",
                    help="comma list: peft, engine (batch_invariant=True, mixed adapters), engine_plain "
                         "(batch_invariant=False), lora (all on a0 vs all on base)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case after a warm-up; "
                    "the summary uses the median")
    ap.add_argument("--threads", type=int, help="torch threads in the children (default: torch's choice)")
    ap.add_argument("--max-num-seqs", type=int, help="EngineConfig.max_num_seqs (default: the engine's)")
    ap.add_argument("--max-batch-tokens", type=int, help="EngineConfig.max_batch_tokens (default: the engine's)")
    ap.add_argument("--allocator", choices=["tcmalloc", "glibc"], default=None,
                    help="malloc for the children: tcmalloc via LD_PRELOAD (default when installed) or glibc")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; both sides use it")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, profile one more mixed engine run with cProfile "
                         "(top 15 by tottime printed; stats saved in the run's log folder)")
    ap.add_argument("--work", default=str(HERE / "_work"), help="folder for model, adapters and logs "
                    "(model/adapters are reused across runs)")
    ap.add_argument("--results", default=str(HERE / "results.jsonl"),
                    help="append one JSON line per case (and a summary line) here")
    ap.add_argument("--no-save", action="store_true", help="do not append to --results")
    ap.add_argument("--data-seed", type=int, default=1234)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--adapter-seed", type=int, default=100, help="adapter i is built with seed + i")
    ap.add_argument("--note", default="", help="free text stored with the results")
    ap.add_argument("--verbose", action="store_true", help="stream the children's output")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = sorted(set(cases) - {"peft", "engine", "engine_plain", "lora"})
    if bad:
        ap.error(f"--cases: unknown {', '.join(bad)}")
    if not 8 <= args.min_prompt <= args.max_prompt:
        ap.error("need 8 <= --min-prompt <= --max-prompt")

    tcmalloc = find_tcmalloc()
    if args.allocator is None:
        args.allocator = "tcmalloc" if tcmalloc else "glibc"
    if args.allocator == "tcmalloc" and not tcmalloc:
        raise SystemExit("--allocator tcmalloc: libtcmalloc_minimal.so.4 not found "
                         "(Debian/Ubuntu: apt-get install -y libtcmalloc-minimal4)")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.allocator, tcmalloc)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    logs = work / "logs" / f"serve_{run_id}"
    load_before = [round(x, 2) for x in os.getloadavg()]
    git = git_state()

    meta = ensure_work(work, env, args)
    prompts = make_prompts(meta, args.requests, args.min_prompt, args.max_prompt, args.data_seed)
    lens = sorted(len(p) for p in prompts)
    print(f"model: Llama {MODEL_CFG['num_hidden_layers']}x{MODEL_CFG['hidden_size']}, N = {meta['params']:,} "
          f"params; {len(ADAPTERS)} LoRA adapters r={LORA['r']} ({meta['lora_params']:,} params each)\n"
          f"workload: {args.requests} requests, prompts {lens[0]}-{lens[-1]} tokens (median "
          f"{lens[len(lens) // 2]}), {args.new} new tokens each, adapters round-robin over "
          f"{[a or 'base' for a in MIX]}; precision {args.precision}; allocator {args.allocator}; "
          f"load average before {load_before}; logs in {logs}", flush=True)

    common = {"model": str(work / "serve_model"), "adapters": str(work / "serve_adapters"),
              "precision": args.precision, "device": args.device, "threads": args.threads, "new": args.new,
              "repeats": args.repeats, "prompts": prompts,
              "meta": {"at": len(meta["head_ids"]), "vocab": meta["vocab"]}}
    rows: list[dict] = []
    children: dict[str, dict] = {}
    if "peft" in cases:
        print(f"PEFT generate(adapter_names=...), batches of {args.peft_batch}, {args.repeats} runs ...", flush=True)
        r = run_child("peft", dict(common, batch=args.peft_batch), env, logs / "peft.log", args.verbose)
        children["peft"] = r
        rows.append(dict(r, batch=args.peft_batch))
    bw_cases = [c for c in cases if c != "peft"]
    if bw_cases:
        print(f"budwood engine ({', '.join(bw_cases)}), {args.repeats} alternating runs ...", flush=True)
        spec = dict(common, cases=bw_cases, max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                    profile=str(logs / "engine.prof") if args.profile else None)
        r = run_child("budwood", spec, env, logs / "budwood.log", args.verbose)
        children["budwood"] = r
        for res in r["results"]:
            eng = "engine_plain" if res["case"] == "engine_plain" else "engine"
            rows.append(dict(res, **r["engines"][eng], threads=r["threads"], peak_rss_mb=r["peak_rss_mb"],
                             user_cpu_s=r["user_cpu_s"], sys_cpu_s=r["sys_cpu_s"], versions=r["versions"],
                             child_wall_s=r["child_wall_s"]))

    n_tok = args.requests * args.new
    for row in rows:
        row["median_s"] = statistics.median(row["times_s"])
        row["tokens_per_s"] = round(n_tok / row["median_s"], 1)
    by = {row["case"]: row for row in rows}
    tps = {k: v["tokens_per_s"] for k, v in by.items()}

    print(f"\n{'case':<14} {'workload':<8} {'runs (s)':<26} {'median s':>9} {'new tok/s':>10} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['case']:<14} {row['workload']:<8} {' '.join(f'{t:.2f}' for t in row['times_s']):<26} "
              f"{row['median_s']:>9.2f} {row['tokens_per_s']:>10.1f} {row['peak_rss_mb']:>12.0f}")
    summary: dict = {"kind": "summary", "tokens_per_s": tps}
    lines = []
    if "engine" in tps and "peft" in tps:
        summary["ratio_engine_over_peft"] = round(tps["engine"] / tps["peft"], 3)
        lines.append(f"engine / PEFT                 = {tps['engine']} / {tps['peft']} = "
                     f"{summary['ratio_engine_over_peft']}x   (goal >= 3x)")
    if "engine_a0" in tps and "engine_base" in tps:
        summary["lora_cost_pct"] = round(100 * (tps["engine_base"] / tps["engine_a0"] - 1), 1)
        lines.append(f"LoRA cost (all a0 vs all base) = {summary['lora_cost_pct']}% extra time   (goal <= 15%)")
    if "engine" in tps and "engine_plain" in tps:
        summary["invariant_cost_pct"] = round(100 * (tps["engine_plain"] / tps["engine"] - 1), 1)
        lines.append(f"batch-invariant mode cost      = {summary['invariant_cost_pct']}% extra time   (goal <= 10%)")
    if "engine" in tps and "engine_base" in tps:
        summary["mixed_vs_base_cost_pct"] = round(100 * (tps["engine_base"] / tps["engine"] - 1), 1)
        lines.append(f"mixed adapters vs all base     = {summary['mixed_vs_base_cost_pct']}% extra time")
    checks = {}
    for x, y in (("engine", "peft"), ("engine_plain", "peft"), ("engine", "engine_plain")):
        if x in by and y in by:
            checks[f"{x}_vs_{y}"] = agreement(by[x]["tokens"], by[y]["tokens"])
    summary["greedy_agreement"] = checks
    for name, c in checks.items():
        lines.append(f"greedy tokens {name:<22}: {c['identical']}/{c['of']} requests identical "
                     f"(mean common prefix {c['mean_common_prefix']}/{args.new} tokens)")
    hits = {row["case"]: row.get("prefix_cache_tokens") for row in rows if row.get("prefix_cache_tokens")}
    if hits:
        lines.append(f"WARNING: prefix-cache hits during timed runs: {hits}")
    print("\n" + "\n".join(lines))
    if children.get("budwood", {}).get("profile"):
        print(f"\ncProfile of one extra mixed engine run (stats: {logs / 'engine.prof'}):\n"
              + children["budwood"]["profile"])

    setup = {"bench": "serve_vs_peft", "run_id": run_id, "precision": args.precision, "device": args.device,
             "allocator": args.allocator, "requests": args.requests, "new_tokens": args.new,
             "prompt_tokens": {"min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1], "total": sum(lens)},
             "repeats": args.repeats, "model_params": meta["params"], "lora_params": meta["lora_params"],
             "load_avg_before": load_before, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
             "cpu_count": os.cpu_count(), "git": git, "note": args.note}
    records = [dict(setup, **{k: v for k, v in row.items() if k not in ("tokens", "profile")}) for row in rows]
    records.append(dict(setup, **summary))
    print()
    emit_records(records, args.results, save=not args.no_save)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "_child":
        CHILDREN[sys.argv[2]](json.loads(Path(sys.argv[3]).read_text()))
    else:
        main_parent(sys.argv[1:])
