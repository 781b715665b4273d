"""Load test of `budwood serve`: many concurrent streaming chat clients against one server process.

Starts `budwood serve` (budwood-tiny by default) on a free loopback port, then runs --clients asyncio
clients; each sends streaming chat requests with short random prompts back to back for --duration
seconds. Reports completed requests, errors (any non-2xx answer, error event or exception: must be 0),
p50/p99 request latency and time to first token, and output tokens/s overall. The server is stopped
at the end, also on Ctrl-C.

    python benchmarks/load_test.py --clients 64 --duration 60 --max-tokens 64

Uses httpx (a dependency of the server's test client); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import emit_records, git_state

HERE = Path(__file__).resolve().parent
SYLLABLES = ["ka", "lo", "mi", "ra", "te", "vu", "zen", "dor", "qui", "an", "el", "or", "ba", "ce", "di",
             "fo", "gu", "ha", "jo", "ny", "pe", "ri", "sa", "to", "wi", "ment", "ing", "ous", "ion"]
TASKS = ["What is {w}?", "Explain {w} in one sentence.", "Write a short note about {w}.",
         "Summarise: {w}", "List three facts about {w}.", "Why does {w} matter?"]


@dataclass
class Sample:
    ok: bool
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    prompt_tokens: int
    error: str | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "budwood", "serve", "--base", args.base, "--host", "127.0.0.1", "--port", str(port),
           "--precision", args.precision]
    if args.adapters:
        cmd += ["--adapters", args.adapters]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    print(f"starting: {' '.join(cmd)}  (log {log_path})", flush=True)
    with open(log_path, "w") as log:
        # its own session: a Ctrl-C in the terminal reaches this script only, which then stops the server
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_cpu_s(pid: int) -> float | None:
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return round(t.user + t.system, 1)
    except Exception:  # psutil missing or the process gone: the number is optional
        return None


async def wait_ready(client, proc: subprocess.Popen | None, timeout: float, log_path: Path | None) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = "".join(log_path.read_text().splitlines(True)[-30:]) if log_path else ""
            raise SystemExit(f"the server exited (rc={proc.returncode}) before it was ready; last lines:\n{tail}")
        try:
            r = await client.get("/health")
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


def random_prompt(rng: random.Random) -> str:
    words = " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
                     for _ in range(rng.randint(2, 20)))
    return rng.choice(TASKS).format(w=words)


async def one_request(client, body: dict) -> Sample:
    t0 = time.perf_counter()
    ttft, usage, done, error = None, None, False, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code // 100 != 2:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"error event: {json.dumps(chunk['error'])[:200]}"
                        continue
                    if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                        ttft = time.perf_counter() - t0
                    usage = chunk.get("usage") or usage
                if error is None and not done:
                    error = "the stream ended without [DONE]"
                if error is None and usage is None:
                    error = "no usage chunk (stream_options.include_usage)"
    except Exception as e:  # every failure counts; the test goes on
        error = f"{type(e).__name__}: {e}"[:200]
    latency = time.perf_counter() - t0
    if error is not None:
        return Sample(False, latency, ttft, 0, 0, error)
    return Sample(True, latency, ttft, usage["completion_tokens"], usage["prompt_tokens"])


async def client_loop(client, i: int, models: list[str], args, deadline: float, out: list[Sample]) -> None:
    rng = random.Random(args.seed * 100003 + i)
    k = i
    while time.monotonic() < deadline:
        body = {"model": models[k % len(models)], "messages": [{"role": "user", "content": random_prompt(rng)}],
                "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
        out.append(await one_request(client, body))
        k += 1


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, max(0, int(-(-q * len(xs) // 100)) - 1))], 4)


async def run_load(args, url: str, proc: subprocess.Popen | None, log_path: Path | None) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        health = await wait_ready(client, proc, args.startup_timeout, log_path)
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        if not args.adapters and not args.all_models:
            models = models[:1]  # the base
        warm = await one_request(client, {"model": models[0], "messages": [{"role": "user", "content": "Hello"}],
                                          "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
        if not warm.ok:
            raise SystemExit(f"the warm-up request failed: {warm.error}")
        print(f"server ready ({health}); models {models}; {args.clients} clients for {args.duration:.0f} s ...",
              flush=True)
        samples: list[Sample] = []
        cpu0 = process_cpu_s(proc.pid) if proc else None
        t0 = time.monotonic()
        deadline = t0 + args.duration
        await asyncio.gather(*(client_loop(client, i, models, args, deadline, samples) for i in range(args.clients)))
        elapsed = time.monotonic() - t0
        cpu1 = process_cpu_s(proc.pid) if proc else None
    ok = [s for s in samples if s.ok]
    errors = [s for s in samples if not s.ok]
    out_tokens = sum(s.completion_tokens for s in ok)
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    tpot = [(s.latency_s - s.ttft_s) / (s.completion_tokens - 1) for s in ok
            if s.ttft_s is not None and s.completion_tokens > 1]
    return {
        "models": models, "elapsed_s": round(elapsed, 2), "requests": len(ok), "errors": len(errors),
        "error_samples": sorted({s.error for s in errors})[:5],
        "requests_per_s": round(len(ok) / elapsed, 2),
        "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "prompt_tokens": sum(s.prompt_tokens for s in ok),
        "mean_output_tokens": round(out_tokens / max(len(ok), 1), 1),
        "no_content_requests": sum(1 for s in ok if s.ttft_s is None),
        "latency_s": {"p50": pct([s.latency_s for s in ok], 50), "p90": pct([s.latency_s for s in ok], 90),
                      "p99": pct([s.latency_s for s in ok], 99), "max": pct([s.latency_s for s in ok], 100)},
        "ttft_s": {"p50": pct(ttfts, 50), "p90": pct(ttfts, 90), "p99": pct(ttfts, 99), "max": pct(ttfts, 100)},
        "time_per_output_token_s": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)},
        "server_cpu_s": round(cpu1 - cpu0, 1) if cpu0 is not None and cpu1 is not None else None,
    }


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="budwood-tiny", help="budwood serve --base")
    ap.add_argument("--adapters", help="budwood serve --adapters DIR; clients then spread over the base and "
                    "every adapter it lists")
    ap.add_argument("--all-models", action="store_true", help="spread over every model /v1/models lists")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="budwood serve --precision")
    ap.add_argument("--max-num-seqs", type=int, help="budwood serve --max-num-seqs (default: the server's)")
    ap.add_argument("--url", help="test a server already running at this URL (e.g. http://127.0.0.1:8000) "
                    "instead of starting one")
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds during which clients start requests; "
                    "requests under way at the end are finished and counted")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true: every request "
                    "generates exactly --max-tokens")
    ap.add_argument("--seed", type=int, default=0, help="seed of the clients' random prompts")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--work", default=str(HERE / "_work"), help="the server's log goes to WORK/logs/load_<run id>/")
    ap.add_argument("--results", default=str(HERE / "results.jsonl"), help="append the result line here")
    ap.add_argument("--no-save", action="store_true", help="do not append to --results")
    ap.add_argument("--note", default="", help="free text stored with the results")
    args = ap.parse_args(argv)

    run_id = time.strftime("%Y%m%dT%H%M%S")
    load_before = [round(x, 2) for x in os.getloadavg()]
    proc, log_path = None, None
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally below always stops the server
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            port = free_port()
            log_path = Path(args.work).resolve() / "logs" / f"load_{run_id}" / "server.log"
            proc = start_server(args, port, log_path)
            url = f"http://127.0.0.1:{port}"
        stats = asyncio.run(run_load(args, url, proc, log_path))
    except KeyboardInterrupt:
        print("interrupted; stopping the server", file=sys.stderr)
        return 130
    finally:
        if proc is not None:
            stop_server(proc)

    import httpx

    import budwood

    ru = resource.getrusage(resource.RUSAGE_SELF)
    record = {"bench": "load_test", "run_id": run_id, "base": args.base, "adapters": args.adapters,
              "precision": args.precision, "url": args.url, "clients": args.clients, "duration_s": args.duration,
              "max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": args.ignore_eos,
              **stats, "client_cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
              "load_avg_before": load_before, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "cpu_count": os.cpu_count(), "git": git_state(),
              "versions": {"budwood": budwood.__version__, "httpx": httpx.__version__},
              "server_log": str(log_path) if log_path else None, "note": args.note}
    lat, ttft = stats["latency_s"], stats["ttft_s"]
    print(f"\n{stats['requests']} requests in {stats['elapsed_s']} s ({stats['requests_per_s']} req/s), "
          f"{stats['errors']} errors; {stats['output_tokens']} output tokens = {stats['output_tokens_per_s']} tok/s "
          f"(mean {stats['mean_output_tokens']} per request)\n"
          f"latency p50 {lat['p50']} s, p99 {lat['p99']} s; time to first token p50 {ttft['p50']} s, "
          f"p99 {ttft['p99']} s; server CPU {stats['server_cpu_s']} s, client CPU {record['client_cpu_s']} s")
    if stats["errors"]:
        print(f"FAIL: {stats['errors']} errors, e.g. {stats['error_samples']}")
    emit_records([record], args.results, save=not args.no_save)
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
