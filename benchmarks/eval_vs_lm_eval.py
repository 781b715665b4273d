"""TruthfulQA MC1/MC2 by log-likelihood: `budwood eval` against lm-evaluation-harness 0.4.13, one run.

Both sides score the same model (by default the anchor's random 27.8M-parameter Llama,
`shared/anchors/make_model.py`, seed 0) on the same questions (`TruthfulQA.csv`, the first --limit
docs). lm-eval runs exactly as `shared/anchors/lm_eval/run.sh` does (rendered local task YAMLs, HF
offline, --log_samples); budwood runs through its CLI (`budwood eval --suite truthfulqa --records`).
Each command is timed by its wall clock as a subprocess. The per-request log-likelihoods of both are
then matched request by request (doc id, choice index).

    python benchmarks/eval_vs_lm_eval.py --lm-eval /work/bench-cache/lmeval-venv/bin/lm_eval --limit 200

`--anchor-run shared/anchors/lm_eval/fp32_bs8_full` adds (or, with --skip-lm-eval, replaces) the
recorded anchor run as a reference. Nothing is downloaded. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import git_state

HERE = Path(__file__).resolve().parent
ANCHORS = Path("/work/shared/anchors")
BENCH_CACHE = Path("/work/bench-cache")
# Recorded in shared/anchors/lm_eval/RESULTS.md.
MODEL_SHA256 = "eb43ae015fa6812770d79731b2fd605345439a7da7b8e7d6e6c1c6130beebb84"  # make_model.py, seed 0
CSV_SHA256 = "99d6ae7755e3b435eade956068c9de7c0c474770344237aeb66b56519ba4b697"
DATA_SHA256 = "c6269a2a99a4e12113856b4a96358323206498bd562d9a2736462e03ad260bb8"  # make_tqa_mc.py output
TASKS = {"mc1": "tqa_local_mc1", "mc2": "tqa_local_mc2"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_BS = {"fp32": 8, "bf16": 16}  # the anchor's batch sizes


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quote(cmd: list) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def find_tcmalloc() -> str | None:
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
              "/usr/lib", "/usr/local/lib"):
        hits = glob.glob(os.path.join(d, "libtcmalloc_minimal.so.4"))
        if hits:
            return hits[0]
    return None


def versions(python: Path, packages: list[str]) -> dict:
    code = ("import importlib.metadata as m, json, sys\nout = {'python': sys.version.split()[0]}\n"
            f"for p in {packages!r}:\n    try: out[p] = m.version(p)\n    except Exception: out[p] = None\n"
            "print(json.dumps(out))")
    try:
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        return {"error": repr(e)}


def busy_cpu_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait_s: float, what: str, busy_cores: float = 0.15, window_s: float = 10.0) -> float:
    """Wait (at most max_wait_s) until the machine's busy CPU over a window is below busy_cores."""
    t0 = time.perf_counter()
    said = False
    while True:
        b0 = busy_cpu_s()
        time.sleep(window_s)
        b1 = busy_cpu_s()
        if b0 is None or b1 is None or (b1 - b0) / window_s < busy_cores:
            break
        if time.perf_counter() - t0 > max_wait_s:
            print(f"  machine still busy ({(b1 - b0) / window_s:.2f} cores) after {max_wait_s:.0f} s; "
                  f"running {what} anyway", flush=True)
            break
        if not said:
            print(f"  waiting for a quiet machine before {what} ({(b1 - b0) / window_s:.2f} cores busy) ...",
                  flush=True)
            said = True
    return round(time.perf_counter() - t0, 1)


def run_timed(cmd: list, env: dict, log: Path, verbose: bool, cwd: Path | None = None) -> dict:
    """Run `cmd`, its output (stdout + stderr) into `log`; wall clock and the child's own rusage."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(f"$ {quote(cmd)}\n")
        f.flush()
        busy0 = busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd)
        try:
            for raw in iter(lambda: proc.stdout.read1(1 << 16), b""):
                text = raw.decode("utf-8", "replace")
                f.write(text)
                if verbose:
                    sys.stderr.write(text)
            _, status, ru = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        busy1 = busy_cpu_s()
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {"rc": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
           "user_cpu_s": round(ru.ru_utime, 1), "sys_cpu_s": round(ru.ru_stime, 1)}
    if busy0 is not None and busy1 is not None:  # CPU time other processes took meanwhile: a noisy machine
        res["other_cpu_s"] = round(max(0.0, busy1 - busy0 - ru.ru_utime - ru.ru_stime), 1)
    return res


def fail_with_log(what: str, res: dict, log: Path) -> None:
    tail = "".join(log.read_text(errors="replace").splitlines(True)[-40:])
    raise SystemExit(f"{what} failed (rc={res['rc']}); log {log}; last lines:\n{tail}")


# ---------------------------------------------------------------------------------------------------
# Inputs: model and data
# ---------------------------------------------------------------------------------------------------
def ensure_model(args) -> dict:
    model = Path(args.model)
    if not (model / "config.json").exists():
        cmd = [sys.executable, args.anchors / "make_model.py", model, "--seed", str(args.model_seed)]
        print(f"building the anchor model: {quote(cmd)}", flush=True)
        subprocess.run([str(c) for c in cmd], check=True)
    info = {"dir": str(model)}
    st = model / "model.safetensors"
    if st.exists():
        info["sha256"] = sha256(st)
        info["matches_anchor"] = info["sha256"] == MODEL_SHA256
    return info


def ensure_data(args, work: Path) -> dict:
    data = work / "tqa_mc.jsonl"
    csv_path = Path(args.csv)
    if not data.exists() or data.stat().st_mtime < csv_path.stat().st_mtime:
        cmd = [sys.executable, args.anchors / "lm_eval" / "make_tqa_mc.py", csv_path, data]
        subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)
    info = {"csv": str(csv_path), "csv_sha256": sha256(csv_path), "data": str(data), "data_sha256": sha256(data)}
    info["csv_matches_anchor"] = info["csv_sha256"] == CSV_SHA256
    info["data_matches_anchor"] = info["data_sha256"] == DATA_SHA256
    bundled = HERE.parent / "src" / "budwood" / "eval" / "data" / "truthfulqa" / "TruthfulQA.csv"
    if bundled.exists():  # the copy budwood evaluates on
        info["budwood_csv_sha256"] = sha256(bundled)
        info["budwood_csv_same"] = info["budwood_csv_sha256"] == info["csv_sha256"]
    return info


def load_docs(data: Path, limit: int | None) -> list[dict]:
    docs = [json.loads(line) for line in open(data, encoding="utf-8")]
    return docs[:limit] if limit else docs


# ---------------------------------------------------------------------------------------------------
# A "side" is {"name", "ll": {"mc1"|"mc2": {doc_id: [(loglik, is_greedy), ...]}}, "reported": {...}, ...}
# ---------------------------------------------------------------------------------------------------
def _greedy(x) -> bool | None:
    if isinstance(x, bool) or x is None:
        return x
    return str(x) == "True"


def run_lm_eval(args, work: Path, data: Path, env: dict, run_id: str) -> tuple[Path, dict, list]:
    lm_eval = Path(args.lm_eval)
    py = lm_eval.parent / "python"  # as run.sh: the python of the venv lm_eval lives in
    tasks_dir = Path(tempfile.mkdtemp(prefix="tqa_tasks_"))
    subprocess.run([str(py), str(args.anchors / "lm_eval" / "render_tasks.py"), str(data), str(tasks_dir)],
                   check=True, stdout=subprocess.DEVNULL)
    out = work / f"lm_eval_{run_id}"
    cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={Path(args.model).resolve()},"
           f"dtype={DTYPES[args.precision]}", "--tasks", ",".join(TASKS.values()), "--include_path", tasks_dir,
           "--batch_size", str(args.batch_size), "--device", args.device]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    cmd += ["--output_path", out, "--log_samples"]
    env = dict(env, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    print(f"lm-eval: {quote(cmd)}", flush=True)
    log = work / "logs" / f"lm_eval_{run_id}.log"
    res = run_timed(cmd, env, log, args.verbose)
    shutil.rmtree(tasks_dir, ignore_errors=True)
    if res["rc"] != 0:
        fail_with_log("lm_eval", res, log)
    shutil.copy(log, out / "log.txt")
    (out / "timing.json").write_text(json.dumps(res, indent=1) + "\n")
    return out, res, cmd


def parse_lm_eval(out: Path) -> dict:
    """lm-eval's --output_path: <out>/<model>/results_<date>.json and samples_<task>_<date>.jsonl."""
    results = sorted(glob.glob(str(out / "*" / "results_*.json")) + glob.glob(str(out / "results_*.json")))
    if not results:
        raise SystemExit(f"no results_*.json under {out}")
    res_path = Path(results[-1])
    date = res_path.stem[len("results_"):]
    res = json.loads(res_path.read_text())
    side = {"name": "lm-eval", "source": str(out), "ll": {}, "reported": {}}
    for key, task in TASKS.items():
        cands = [res_path.parent / f"samples_{task}_{date}.jsonl", res_path.parent / f"samples_{task}_{date}.jsonl.gz"]
        path = next((p for p in cands if p.exists()), None)
        if path is None:
            raise SystemExit(f"no samples file for {task} next to {res_path} (was --log_samples given?)")
        opener = gzip.open if path.suffix == ".gz" else open
        per_doc = {}
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                s = json.loads(line)
                per_doc[int(s["doc_id"])] = [(float(ll), _greedy(g)) for ll, g in s["filtered_resps"]]
        side["ll"][key] = per_doc
        side["reported"][key] = res["results"][task].get("acc,none")
    side["eval_time_s"] = float(res.get("total_evaluation_time_seconds", "nan"))
    side["config"] = {k: res.get("config", {}).get(k) for k in ("model_args", "batch_size", "device", "limit")}
    side["versions"] = {"lm_eval": res.get("lm_eval_version"), "transformers": res.get("transformers_version")}
    log = out / "log.txt"
    if log.exists():  # tqdm's own timing of the log-likelihood loop (as collect.py reads it)
        m = re.findall(r"Running loglikelihood requests: 100%\|[^|]*\| (\d+)/(\d+) \[([\d:]+)<", log.read_text())
        if m:
            parts = [float(x) for x in m[-1][2].split(":")]
            side["loop_s"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    t = out / "timing.json"
    if t.exists():
        side["timing"] = json.loads(t.read_text())
    return side


def parse_anchor_run(run: Path) -> dict:
    """A run recorded by shared/anchors/lm_eval/collect.py: loglik_<task>.tsv, results.json, summary.json."""
    side = {"name": f"anchor:{run.name}", "source": str(run), "ll": {}, "reported": {}}
    res = json.loads((run / "results.json").read_text())
    for key, task in TASKS.items():
        per_doc: dict[int, list] = {}
        with open(run / f"loglik_{task}.tsv", encoding="utf-8") as f:
            for r in csv.DictReader(f, delimiter="\t"):
                per_doc.setdefault(int(r["doc_id"]), []).append((int(r["choice"]), float(r["loglik"]),
                                                                 _greedy(r["is_greedy"])))
        side["ll"][key] = {d: [(ll, g) for _, ll, g in sorted(v)] for d, v in per_doc.items()}
        side["reported"][key] = res["results"][task].get("acc,none")
    summ = run / "summary.json"
    if summ.exists():
        s = json.loads(summ.read_text())
        side["timing"] = {"wall_s": s.get("wall_s"), "peak_rss_mb": s.get("peak_rss_mib"), "recorded": True}
        side["eval_time_s"] = s.get("total_evaluation_time_seconds")
        side["loop_s"] = s.get("loglik_loop_s_tqdm")
        side["recorded_requests"] = s.get("loglikelihood_requests")
    side["config"] = {k: res.get("config", {}).get(k) for k in ("model_args", "batch_size", "device", "limit")}
    return side


def run_budwood(args, work: Path, env: dict, run_id: str) -> tuple[Path, dict, list]:
    out = work / f"budwood_{run_id}.json"
    cmd = [args.budwood, "eval", "--target", Path(args.model).resolve(), "--suite", "truthfulqa",
           "--precision", args.precision]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    cmd += ["--records", "--out", out, *args.budwood_arg]
    print(f"budwood: {quote(cmd)}", flush=True)
    log = work / "logs" / f"budwood_{run_id}.log"
    res = run_timed(cmd, env, log, args.verbose)
    if res["rc"] != 0 or not out.exists():
        fail_with_log("budwood eval", res, log)
    out.with_suffix(".timing.json").write_text(json.dumps(res, indent=1) + "\n")
    return out, res, cmd


def _value(m):
    return m.get("value") if isinstance(m, dict) else m


def parse_budwood(path: Path) -> dict:
    """`budwood eval --records --out FILE.json`: suites.truthfulqa.{metrics,timing,records}."""
    blob = json.loads(path.read_text())
    suite = blob["suites"]["truthfulqa"] if "suites" in blob else blob
    metrics = suite.get("metrics", {})
    side = {"name": "budwood", "source": str(path), "ll": {"mc1": {}, "mc2": {}}, "choices": {"mc1": {}, "mc2": {}},
            "reported": {"mc1": _value(metrics.get("mc1")), "mc2": _value(metrics.get("mc2"))},
            "metrics": metrics, "suite_timing": suite.get("timing", {})}
    for rec in suite.get("records") or []:
        doc = int(rec["id"])
        for key in ("mc1", "mc2"):
            lls = rec.get(f"{key}_logliks")
            if lls is None:
                continue
            greedy = rec.get(f"{key}_greedy") or [None] * len(lls)
            side["ll"][key][doc] = [(float(ll), _greedy(g)) for ll, g in zip(lls, greedy)]
            if rec.get(f"{key}_choices") is not None:
                side["choices"][key][doc] = rec[f"{key}_choices"]
        if rec.get("mc2_labels") is not None:
            side.setdefault("labels", {})[doc] = list(rec["mc2_labels"])
    if not side["ll"]["mc1"] and not side["ll"]["mc2"]:
        raise SystemExit(f"{path}: no per-question records with mc1_logliks/mc2_logliks (was --records given?)")
    t = path.with_suffix(".timing.json")
    if t.exists():
        side["timing"] = json.loads(t.read_text())
    side["eval_time_s"] = side["suite_timing"].get("seconds")
    side["versions"] = {k: blob.get(k) for k in ("budwood_version", "version", "torch_version") if k in blob}
    return side


# ---------------------------------------------------------------------------------------------------
# Scores and parity
# ---------------------------------------------------------------------------------------------------
def n_requests(side: dict, doc_ids: list[int]) -> int:
    return sum(len(side["ll"][k].get(d, [])) for k in ("mc1", "mc2") for d in doc_ids)


def scores(side: dict, docs: list[dict]) -> dict:
    """MC1 = lm-eval's acc (argmax is choice 0, first on ties); MC2 with lm-eval's exp() formula
    (NaN where every exp(ll) underflows) and with a log-sum-exp shift (stable)."""
    mc1, raw, stable = [], [], []
    for d, doc in enumerate(docs):
        ll1 = side["ll"]["mc1"].get(d)
        if ll1:
            lls = [x for x, _ in ll1]
            mc1.append(float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == 0))
        ll2 = side["ll"]["mc2"].get(d)
        if ll2:
            labels = doc["mc2_targets"]["labels"]
            lls = [x for x, _ in ll2]
            p = [math.exp(x) for x in lls]
            tot = sum(p)
            raw.append(sum(pi for pi, lab in zip(p, labels) if lab == 1) / tot if tot > 0 else float("nan"))
            top = max(lls)
            q = [math.exp(x - top) for x in lls]
            stable.append(sum(qi for qi, lab in zip(q, labels) if lab == 1) / sum(q))
    finite = [r for r in raw if not math.isnan(r)]
    def mean(xs: list) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {"docs_mc1": len(mc1), "docs_mc2": len(raw), "mc1": mean(mc1),
            "mc2_lm_eval_formula": mean(raw) if len(finite) == len(raw) else float("nan"),
            "mc2_nan_docs": len(raw) - len(finite), "mc2_lm_eval_over_non_nan_docs": mean(finite),
            "mc2_stable": mean(stable)}


def ulp32(x: float) -> float:
    """The float32 spacing at x (lm-eval's log-likelihoods are float32 sums)."""
    return 2.0 ** (math.frexp(abs(x))[1] - 24) if x else 2.0 ** -149


def parity(ref: dict, bud: dict, doc_ids: list[int], tol: float, show: int) -> dict:
    """Request-by-request comparison of two sides' log-likelihoods (doc id, choice index)."""
    rows, missing, shape = [], [], []
    out: dict = {"reference": ref["name"], "tol": tol}
    for key in ("mc1", "mc2"):
        for d in doc_ids:
            a, b = ref["ll"][key].get(d), bud["ll"][key].get(d)
            if a is None or b is None:
                missing.append({"task": key, "doc": d, "in_reference": a is not None, "in_budwood": b is not None})
                continue
            if len(a) != len(b):
                shape.append({"task": key, "doc": d, "reference_choices": len(a), "budwood_choices": len(b)})
                continue
            for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b)):
                rows.append({"task": key, "doc": d, "choice": i, "ref": la, "budwood": lb, "abs": abs(lb - la),
                             "rel": abs(lb - la) / max(abs(la), 1e-30), "ulp32": abs(lb - la) / ulp32(la),
                             "greedy_ref": ga, "greedy_budwood": gb})
    over = [r for r in rows if r["abs"] > tol]
    greedy_pairs = [r for r in rows if r["greedy_ref"] is not None and r["greedy_budwood"] is not None]
    out.update({
        "requests": len(rows), "missing": len(missing), "choice_count_mismatch": len(shape),
        "max_abs": max((r["abs"] for r in rows), default=float("nan")),
        "mean_abs": sum(r["abs"] for r in rows) / len(rows) if rows else float("nan"),
        "max_rel": max((r["rel"] for r in rows), default=float("nan")),
        "max_ulp32": max((r["ulp32"] for r in rows), default=float("nan")),
        "ll_range": [min((r["ref"] for r in rows), default=None), max((r["ref"] for r in rows), default=None)],
        "identical": sum(1 for r in rows if r["abs"] == 0.0), "over_tol": len(over),
        "greedy_compared": len(greedy_pairs),
        "greedy_agree": sum(1 for r in greedy_pairs if r["greedy_ref"] == r["greedy_budwood"]),
        "greedy_true_ref": sum(1 for r in greedy_pairs if r["greedy_ref"]),
        "first_over_tol": over[:show], "largest": sorted(rows, key=lambda r: -r["abs"])[:show],
        "first_missing": missing[:show], "first_choice_count_mismatch": shape[:show],
    })
    for key in ("mc1", "mc2"):
        sub = [r for r in rows if r["task"] == key]
        out[f"{key}_requests"] = len(sub)
        out[f"{key}_max_abs"] = max((r["abs"] for r in sub), default=float("nan"))
        out[f"{key}_over_tol"] = sum(1 for r in sub if r["abs"] > tol)
    # MC1 per doc: the argmax-is-first decision on each side
    flips = []
    for d in doc_ids:
        a, b = ref["ll"]["mc1"].get(d), bud["ll"]["mc1"].get(d)
        if a and b and len(a) == len(b):
            ca = max(range(len(a)), key=lambda i: (a[i][0], -i)) == 0
            cb = max(range(len(b)), key=lambda i: (b[i][0], -i)) == 0
            if ca != cb:
                flips.append({"doc": d, "ref_correct": ca, "budwood_correct": cb})
    out["mc1_doc_flips"] = len(flips)
    out["first_mc1_doc_flips"] = flips[:show]
    return out


def check_choices(bud: dict, docs: list[dict]) -> list[dict]:
    """Where budwood's records name their choices (or MC2 labels), they must be lm-eval's, in its order."""
    bad = []
    for key, field in (("mc1", "mc1_targets"), ("mc2", "mc2_targets")):
        for d, choices in bud["choices"][key].items():
            if d < len(docs) and list(choices) != docs[d][field]["choices"]:
                bad.append({"task": key, "doc": d})
    for d, labels in bud.get("labels", {}).items():
        if d < len(docs) and labels != docs[d]["mc2_targets"]["labels"]:
            bad.append({"task": "mc2_labels", "doc": d})
    return bad


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def fmt(x, spec=".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return format(x, spec)


def print_report(sides: list[dict], doc_ids: list[int], docs: list[dict], parities: list[dict], args) -> dict:
    print(f"\n{'side':<26} {'requests':>8} {'wall s':>8} {'req/s':>7} {'inner s':>8} {'peak RSS MB':>11} "
          f"{'other CPU s':>11} {'MC1':>7} {'MC2 reported':>12} {'MC2 lm-eval non-NaN':>19} {'MC2 stable':>10}")
    table = {}
    for s in sides:
        n = n_requests(s, doc_ids)
        t = s.get("timing", {})
        wall = t.get("wall_s")
        n_all = sum(len(v) for k in ("mc1", "mc2") for v in s["ll"][k].values())  # all it scored in that time
        rps = n_all / wall if wall else None
        sc = scores(s, docs)
        rep = s["reported"]
        table[s["name"]] = {"requests": n, "requests_in_run": n_all, "wall_s": wall, "req_per_s": rps,
                            "inner_s": s.get("eval_time_s"),
                            "loop_s": s.get("loop_s"), "peak_rss_mb": t.get("peak_rss_mb"),
                            "user_cpu_s": t.get("user_cpu_s"), "sys_cpu_s": t.get("sys_cpu_s"),
                            "other_cpu_s": t.get("other_cpu_s"),
                            "reported_mc1": rep.get("mc1"), "reported_mc2": rep.get("mc2"), **sc}
        print(f"{s['name']:<26} {n:>8} {fmt(wall, '.1f'):>8} {fmt(rps, '.2f'):>7} "
              f"{fmt(s.get('eval_time_s'), '.1f'):>8} {fmt(t.get('peak_rss_mb'), '.0f'):>11} "
              f"{fmt(t.get('other_cpu_s'), '.1f'):>11} "
              f"{fmt(rep.get('mc1') if rep.get('mc1') is not None else sc['mc1']):>7} {fmt(rep.get('mc2')):>12} "
              f"{fmt(sc['mc2_lm_eval_over_non_nan_docs']):>19} {fmt(sc['mc2_stable']):>10}")
    print("  requests: those compared here; wall s: the whole command as a subprocess (start-up, model load,\n"
          "  scoring); req/s = all requests that run scored / wall s;\n"
          "  other CPU s: CPU time other processes used during that run (should be ~0 on a quiet machine);\n"
          "  inner s: lm-eval's total_evaluation_time_seconds, budwood's suites.truthfulqa.timing.seconds;\n"
          "  MC2 reported: each tool's own value; the last two columns are recomputed here from each side's\n"
          "  log-likelihoods (lm-eval's exp() formula over the docs where it is not NaN, and log-sum-exp).")
    for s in sides:
        sc = table[s["name"]]
        if sc["reported_mc1"] is not None and sc["docs_mc1"] and abs(sc["reported_mc1"] - sc["mc1"]) > 1e-9:
            print(f"  NOTE: {s['name']} reports MC1 {sc['reported_mc1']} but its own log-likelihoods give {sc['mc1']}")
        if s["name"] == "budwood" and sc["reported_mc2"] is not None and sc["docs_mc2"] and \
                not abs(sc["reported_mc2"] - sc["mc2_stable"]) <= 1e-6:
            print(f"  NOTE: budwood reports MC2 {sc['reported_mc2']} but its own log-likelihoods give "
                  f"{sc['mc2_stable']} (log-sum-exp)")
        oc, wall = sc.get("other_cpu_s"), sc.get("wall_s")
        if oc is not None and wall and oc > 0.05 * wall:
            print(f"  WARNING: other processes used {oc:.0f} CPU s during the {wall:.0f} s {s['name']} run: "
                  f"its timing is not from a quiet machine")
        if sc["mc2_nan_docs"]:
            print(f"  {s['name']}: lm-eval's MC2 formula is NaN on {sc['mc2_nan_docs']} of {sc['docs_mc2']} docs "
                  f"(every exp(ll) underflows)")

    summary: dict = {"table": table, "parity": parities}
    bud = table.get("budwood")
    lines = []
    for s in sides:
        if s["name"] == "budwood" or bud is None:
            continue
        ref = table[s["name"]]
        if ref["req_per_s"] and bud["req_per_s"]:
            ratio = bud["req_per_s"] / ref["req_per_s"]
            tag = " (recorded on another machine)" if s["name"].startswith("anchor:") else ""
            if ref["requests_in_run"] != bud["requests_in_run"]:
                tag += f" (that run scored {ref['requests_in_run']} requests, budwood {bud['requests_in_run']})"
            summary.setdefault("speed_ratio", {})[s["name"]] = round(ratio, 3)
            lines.append(f"speed budwood / {s['name']}{tag}: {bud['req_per_s']:.2f} / {ref['req_per_s']:.2f} "
                         f"req/s = {ratio:.2f}x (wall clock)")
            if ref.get("inner_s") and bud.get("inner_s") and not s["name"].startswith("anchor:"):
                r2 = (ref["inner_s"] / ref["requests_in_run"]) / (bud["inner_s"] / bud["requests_in_run"])
                summary.setdefault("speed_ratio_inner", {})[s["name"]] = round(r2, 3)
                lines.append(f"  inner timers (lm-eval eval time vs budwood timing.seconds): {r2:.2f}x")
        if bud["reported_mc1"] is not None:
            same = bud["reported_mc1"] == (ref["reported_mc1"] if ref["reported_mc1"] is not None else ref["mc1"])
            lines.append(f"MC1 budwood {fmt(bud['reported_mc1'])} vs {s['name']} "
                         f"{fmt(ref['reported_mc1'] if ref['reported_mc1'] is not None else ref['mc1'])}: "
                         f"{'identical' if same else 'DIFFERENT'}")
    print("\n" + "\n".join(lines))
    for p in parities:
        print(f"\nparity: budwood vs {p['reference']} ({p['requests']} requests matched by doc id and choice; "
              f"MC1 {p['mc1_requests']}, MC2 {p['mc2_requests']})")
        print(f"  max |d loglik| = {fmt(p['max_abs'], '.3g')} nats (MC1 {fmt(p['mc1_max_abs'], '.3g')}, "
              f"MC2 {fmt(p['mc2_max_abs'], '.3g')}); mean {fmt(p['mean_abs'], '.3g')}; "
              f"max relative = {fmt(p['max_rel'], '.3g')}; max {fmt(p['max_ulp32'], '.2f')} float32 ulp "
              f"(log-likelihoods from {fmt(p['ll_range'][0], '.1f')} to {fmt(p['ll_range'][1], '.1f')})")
        print(f"  |d| > {p['tol']:g}: {p['over_tol']} (MC1 {p['mc1_over_tol']}, MC2 {p['mc2_over_tol']}); "
              f"bit-identical: {p['identical']}/{p['requests']}")
        print(f"  is_greedy agreement: {p['greedy_agree']}/{p['greedy_compared']} "
              f"({p['greedy_true_ref']} greedy in the reference)")
        print(f"  MC1 per-doc decisions that differ: {p['mc1_doc_flips']}")
        if p["missing"] or p["choice_count_mismatch"]:
            print(f"  WARNING: {p['missing']} (task, doc) pairs on one side only, "
                  f"{p['choice_count_mismatch']} with different choice counts; first: "
                  f"{(p['first_missing'] + p['first_choice_count_mismatch'])[:args.show]}")
        if p["over_tol"]:
            print(f"  first requests over {p['tol']:g} (task doc choice: reference budwood diff):")
            for r in p["first_over_tol"]:
                print(f"    {r['task']} {r['doc']:>4} {r['choice']:>2}: {r['ref']:.6f} {r['budwood']:.6f} "
                      f"{r['budwood'] - r['ref']:+.3g}")
        if p["mc1_doc_flips"]:
            print(f"  first MC1 flips: {p['first_mc1_doc_flips']}")
    return summary


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval", default=str(BENCH_CACHE / "lmeval-venv" / "bin" / "lm_eval"),
                    help="the lm_eval executable (lm-eval 0.4.13 in its own venv; its python renders the tasks)")
    ap.add_argument("--budwood", default=str(Path(sys.executable).parent / "budwood"),
                    help="the budwood executable (default: next to this python)")
    ap.add_argument("--model", default=str(BENCH_CACHE / "anchor-model"),
                    help="model directory; built with shared/anchors/make_model.py when missing")
    ap.add_argument("--model-seed", type=int, default=0, help="seed for make_model.py when the model is built")
    ap.add_argument("--csv", default="/work/shared/data/truthfulqa/TruthfulQA.csv",
                    help="TruthfulQA.csv that lm-eval's JSONL is made from (make_tqa_mc.py)")
    ap.add_argument("--anchors", type=Path, default=ANCHORS,
                    help="shared/anchors (make_model.py, lm_eval/{make_tqa_mc,render_tasks}.py, lm_eval/tasks)")
    ap.add_argument("--limit", type=int, default=200, help="first N questions on both sides (0: all 817)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="lm-eval dtype=float32|bfloat16, budwood --precision (per-request parity needs fp32)")
    ap.add_argument("--batch-size", type=int, help="lm-eval --batch_size (default: 8 for fp32, 16 for bf16)")
    ap.add_argument("--device", default="cpu", help="lm-eval --device (budwood picks its own)")
    ap.add_argument("--allocator", choices=["default", "glibc", "tcmalloc"], default="default",
                    help="default: each tool as shipped (lm-eval with glibc malloc as in the anchor, budwood's "
                         "CLI under tcmalloc where installed); glibc or tcmalloc: both sides the same")
    ap.add_argument("--anchor-run", type=Path, action="append", default=[],
                    help="a recorded anchor run (e.g. shared/anchors/lm_eval/fp32_bs8_full): also compare "
                         "budwood with its TSVs (only its first --limit docs); repeatable")
    ap.add_argument("--skip-lm-eval", action="store_true", help="do not run lm-eval (use --anchor-run or "
                    "--lm-eval-output as the reference)")
    ap.add_argument("--lm-eval-output", type=Path,
                    help="parse this earlier lm-eval --output_path (a folder this script wrote) instead of running it")
    ap.add_argument("--skip-budwood", action="store_true", help="do not run budwood (lm-eval side only)")
    ap.add_argument("--budwood-json", type=Path, help="parse this earlier `budwood eval --records` output instead "
                    "of running budwood")
    ap.add_argument("--budwood-arg", action="append", default=[], help="extra argument for `budwood eval` "
                    "(repeatable, e.g. --budwood-arg=--batch-size --budwood-arg=16)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each tool, wait up to this long until other processes use < 0.15 cores "
                         "(like run.sh waiting for trl_sft.py); 0: do not wait")
    ap.add_argument("--tol", type=float, default=1e-4, help="|d loglik| threshold counted in the parity (nats)")
    ap.add_argument("--show", type=int, default=10, help="differing requests / docs listed")
    ap.add_argument("--work", type=Path, default=BENCH_CACHE / "eval_vs_lm_eval",
                    help="data, lm-eval outputs, budwood outputs and logs")
    ap.add_argument("--out", type=Path, help="JSON summary (default: --work/summary_<run id>.json)")
    ap.add_argument("--note", default="", help="free text stored in the summary")
    ap.add_argument("--verbose", action="store_true", help="stream the tools' output")
    args = ap.parse_args(argv)
    args.batch_size = args.batch_size or DEFAULT_BS[args.precision]
    args.limit = args.limit or None
    args.anchors = args.anchors.resolve()
    if args.lm_eval_output:
        args.skip_lm_eval = True
    if args.budwood_json:
        args.skip_budwood = True
    if not args.skip_lm_eval and not Path(args.lm_eval).exists():
        ap.error(f"--lm-eval {args.lm_eval}: not found (see benchmarks/README.md for its venv)")
    if not args.skip_budwood and not shutil.which(args.budwood):
        ap.error(f"--budwood {args.budwood}: not found")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    load_before = [round(x, 2) for x in os.getloadavg()]
    model_info = ensure_model(args)
    data_info = ensure_data(args, work)
    docs = load_docs(Path(data_info["data"]), args.limit)
    doc_ids = list(range(len(docs)))
    for what, ok in (("model.safetensors", model_info.get("matches_anchor")),
                     ("TruthfulQA.csv", data_info["csv_matches_anchor"]),
                     ("tqa_mc.jsonl", data_info["data_matches_anchor"]),
                     ("budwood's bundled TruthfulQA.csv vs --csv", data_info.get("budwood_csv_same", True))):
        if ok is False:
            print(f"WARNING: sha256 of {what} differs from the anchor's (shared/anchors/lm_eval/RESULTS.md)")

    tcmalloc = find_tcmalloc()
    base_env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    base_env.pop("LD_PRELOAD", None)
    lm_env, bw_env = dict(base_env), dict(base_env)
    if args.allocator == "glibc":
        bw_env["BUDWOOD_ALLOCATOR"] = "system"
    elif args.allocator == "tcmalloc":
        if not tcmalloc:
            ap.error("--allocator tcmalloc: libtcmalloc_minimal.so.4 not found")
        lm_env["LD_PRELOAD"] = tcmalloc
    allocators = {"lm-eval": "tcmalloc" if "LD_PRELOAD" in lm_env else "glibc",
                  "budwood": "glibc" if args.allocator == "glibc" or not tcmalloc else "tcmalloc"}

    vers = {}
    if not args.skip_lm_eval:
        vers["lm_eval_venv"] = versions(Path(args.lm_eval).parent / "python",
                                        ["lm_eval", "torch", "transformers", "datasets", "accelerate", "numpy"])
    if not args.skip_budwood:
        vers["budwood_venv"] = versions(Path(shutil.which(args.budwood)).parent / "python",
                                        ["budwood", "torch", "transformers", "numpy"])
    n_expect = sum(len(d["mc1_targets"]["choices"]) + len(d["mc2_targets"]["choices"]) for d in docs)
    print(f"model {model_info['dir']} (sha256 {'= anchor' if model_info.get('matches_anchor') else 'differs'}); "
          f"{len(docs)} questions, {n_expect} log-likelihood requests; precision {args.precision}; "
          f"lm-eval batch {args.batch_size}; allocators {allocators}; load average before {load_before}; "
          f"cpu {cpu_model()} x{os.cpu_count()}; work {work}", flush=True)

    sides, commands = [], {}
    if not args.skip_lm_eval:
        if args.wait_quiet:
            wait_quiet(args.wait_quiet, "lm-eval")
        out, _, cmd = run_lm_eval(args, work, Path(data_info["data"]), lm_env, run_id)
        commands["lm_eval"] = quote(cmd)
        sides.append(parse_lm_eval(out))
        print(f"  lm-eval done: {sides[-1]['timing']['wall_s']} s wall", flush=True)
    elif args.lm_eval_output:
        sides.append(parse_lm_eval(args.lm_eval_output.resolve()))
        sides[-1]["name"] = "lm-eval (earlier)"
    for run in args.anchor_run:
        sides.append(parse_anchor_run(run.resolve()))
    if not args.skip_budwood:
        if args.wait_quiet:
            wait_quiet(args.wait_quiet, "budwood")
        out, _, cmd = run_budwood(args, work, bw_env, run_id)
        commands["budwood"] = quote(cmd)
        sides.append(parse_budwood(out))
        print(f"  budwood done: {sides[-1]['timing']['wall_s']} s wall", flush=True)
    elif args.budwood_json:
        sides.append(parse_budwood(args.budwood_json.resolve()))
    for s in sides:  # a run over other docs than ours: its own MC1/MC2 cover those, so only recompute
        if s["name"] != "budwood" and "config" in s and float(s["config"].get("limit") or 0) != float(args.limit or 0):
            s["reported"] = {"mc1": None, "mc2": None}
    if not sides:
        ap.error("nothing to compare: give lm-eval, --lm-eval-output, --anchor-run and/or budwood")

    bud = next((s for s in sides if s["name"] == "budwood"), None)
    parities = []
    if bud is not None:
        for s in sides:
            if s is not bud:
                parities.append(parity(s, bud, doc_ids, args.tol, args.show))
        bad = check_choices(bud, docs)
        if bad:
            print(f"WARNING: budwood's choices or MC2 labels differ from lm-eval's for {len(bad)} (task, doc): "
                  f"{bad[:args.show]}")
        if bud["suite_timing"].get("requests") not in (None, n_requests(bud, doc_ids)):
            print(f"note: budwood's timing.requests = {bud['suite_timing']['requests']}, records hold "
                  f"{n_requests(bud, doc_ids)} log-likelihoods")
    lm = [s for s in sides if s is not bud]
    if len(lm) >= 2:  # a fresh lm-eval run against the recorded anchor: lm-eval's own run-to-run parity
        p = parity(lm[1], dict(lm[0], name=lm[0]["name"]), doc_ids, args.tol, args.show)
        p["reference"] = f"{lm[1]['name']} (vs {lm[0]['name']})"
        print(f"\nlm-eval reproducibility: {lm[0]['name']} vs {lm[1]['name']}: {p['requests']} requests, "
              f"max |d| {fmt(p['max_abs'], '.3g')}, {p['over_tol']} over {args.tol:g}, "
              f"MC1 flips {p['mc1_doc_flips']}")
        parities_lm = [p]
    else:
        parities_lm = []

    summary = print_report(sides, doc_ids, docs, parities, args)
    summary["lm_eval_reproducibility"] = parities_lm
    print("\ncommands:")
    print(f"  {quote([sys.executable, *sys.argv])}")
    for k, v in commands.items():
        print(f"  {k}: {v}")
    result = {"bench": "eval_vs_lm_eval", "run_id": run_id, "argv": [sys.executable, *sys.argv],
              "commands": commands, "precision": args.precision, "limit": args.limit, "questions": len(docs),
              "expected_requests": n_expect, "lm_eval_batch_size": args.batch_size, "device": args.device,
              "allocators": allocators, "model": model_info, "data": data_info, "versions": vers,
              "sources": {s["name"]: s["source"] for s in sides},
              "load_avg_before": load_before, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "cpu": cpu_model(), "cpu_count": os.cpu_count(), "git": git_state(), "note": args.note, **summary}
    out_path = args.out or work / f"summary_{run_id}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"summary: {out_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
