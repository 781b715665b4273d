"""budwood merge vs peft's add_weighted_adapter: the same two adapters merged by the same method, each
side in a fresh process; wall time, peak memory and how far apart the merged deltas are.

    python benchmarks/merge_vs_peft.py [--methods cat,svd,ties] [--repeats 3] [--work benchmarks/_work]

The model is the serving benchmark's random-init Llama (12 x 512, 39.6 M parameters), the adapters
two random LoRAs (r 16, all seven projections, B non-zero). peft needs the base loaded and both
adapters injected into it (add_weighted_adapter works on a PeftModel), then saves the new adapter;
budwood reads the two adapter files and writes one. Both sides use the delta-space methods (peft:
cat, svd, ties_svd) with the same weights, rank and density.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, emit_records, git_state

MODEL_CFG = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 8,
             "num_key_value_heads": 8, "vocab_size": 8192, "max_position_embeddings": 2048, "tie_word_embeddings": True}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_METHOD = {"cat": "cat", "svd": "svd", "ties": "ties_svd"}


def child(kind: str, spec: dict) -> None:
    import torch

    work, method = Path(spec["work"]), spec["method"]
    out = work / f"merge_{kind}_{method}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if kind == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(work / "merge_model", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(work / "merge_a"), adapter_name="a")
        model.load_adapter(str(work / "merge_b"), adapter_name="b")
        extra = {"svd_rank": 16} if method == "svd" else {"density": 0.5, "svd_rank": 32} if method == "ties" else {}
        model.add_weighted_adapter(["a", "b"], [0.7, 0.7], "m", combination_type=PEFT_METHOD[method], **extra)
        model.save_pretrained(out, selected_adapters=["m"])
        out = out / "m"
    else:
        from budwood.merge.merge import merge_adapters

        extra = {"rank": 16} if method == "svd" else {"density": 0.5} if method == "ties" else {}
        merge_adapters([str(work / "merge_a"), str(work / "merge_b")], out, [0.7, 0.7], method, **extra)
    seconds = time.perf_counter() - t0
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork and exec)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm / 1024, "out": str(out)}), flush=True)


def prepare(work: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if (work / "merge_b" / "adapter_model.safetensors").exists():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CFG))
    model.save_pretrained(work / "merge_model")
    for i, name in enumerate(("merge_a", "merge_b")):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
        pm = get_peft_model(LlamaForCausalLM(LlamaConfig(**MODEL_CFG)), cfg)
        pm.save_pretrained(work / name)
        config = json.loads((work / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(work / "merge_model")
        (work / name / "adapter_config.json").write_text(json.dumps(config, indent=2))


def deltas(folder: Path) -> dict:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    t = load_file(folder / "adapter_model.safetensors")
    out = {}
    for k, a in t.items():
        if ".lora_A." in k:
            mod = k.split(".lora_A.")[0]
            b = t[k.replace(".lora_A.", ".lora_B.")]
            out[mod] = scale * (b.double() @ a.double())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="cat,svd,ties")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / "_work"))
    ap.add_argument("--results", default=str(HERE / "results.jsonl"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, __file__, "--prepare", str(work)], check=True)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    records = []
    for method in args.methods.split(","):
        runs: dict[str, list[dict]] = {"peft": [], "budwood": []}
        for _ in range(args.repeats):
            for kind in ("peft", "budwood"):  # alternating
                done = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(
                    {"work": str(work), "method": method})], capture_output=True, text=True, check=True)
                runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
        a, b = deltas(Path(runs["peft"][-1]["out"])), deltas(Path(runs["budwood"][-1]["out"]))
        import torch

        rel = max(float(torch.linalg.norm(a[m] - b[m]) / torch.linalg.norm(a[m])) for m in a)
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
        records.append({"benchmark": "merge_vs_peft", "run_id": run_id, "git": git_state(), "method": method,
                        "peft_s": [round(r["seconds"], 3) for r in runs["peft"]],
                        "budwood_s": [round(r["seconds"], 3) for r in runs["budwood"]],
                        "peft_median_s": round(med["peft"], 3), "budwood_median_s": round(med["budwood"], 3),
                        "speedup": round(med["peft"] / med["budwood"], 2), "peft_peak_rss_mb": round(rss["peft"]),
                        "budwood_peak_rss_mb": round(rss["budwood"]), "max_rel_delta_difference": rel})
    emit_records(records, args.results, not args.no_save)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--prepare":
        prepare(Path(sys.argv[2]))
    else:
        main()
