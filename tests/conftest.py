import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from budwood.data.company import make_domain_dataset
from budwood.serve.app import serving as running  # noqa: F401  (tests import it from here)

E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e/ (a trained model, a live server, subprocesses) is marked `e2e`, so that
    `pytest -m "not e2e"` is the fast loop: the unit tests, mirroring src/budwood."""
    for item in items:
        if E2E in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def company_data(tmp_path_factory) -> dict[str, Path]:
    """The demo's company data set (train / validation / heldout JSONL)."""
    return make_domain_dataset(tmp_path_factory.mktemp("company"), seed=0)


def preference_rows(chat_file: Path, seed: int = 0) -> list[dict]:
    """OpenAI preference rows from chat data: each question's own answer preferred to another question's."""
    import random

    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    answers = sorted({r["messages"][-1]["content"] for r in rows})
    rng = random.Random(seed)
    def other(answer: str) -> str:
        return rng.choice([a for a in answers if a != answer])

    return [{"input": {"messages": r["messages"][:-1]}, "preferred_output": [r["messages"][-1]],
             "non_preferred_output": [{"role": "assistant", "content": other(r["messages"][-1]["content"])}]}
            for r in rows]


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory, company_data) -> dict[str, Path]:
    """The company data as preference pairs (train / validation JSONL in OpenAI's DPO format)."""
    out = tmp_path_factory.mktemp("preference")
    return {split: write_jsonl(out / f"{split}.jsonl", preference_rows(company_data[split]))
            for split in ("train", "validation")}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from budwood.models.load import load_tokenizer

    return load_tokenizer("budwood-tiny")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat_rows(n: int, question: str, answer: str) -> list[dict]:
    """n one-turn chat examples; `question` and `answer` are formats of i."""
    return [{"messages": [{"role": "user", "content": question.format(i=i, x=i * 7)},
                          {"role": "assistant", "content": answer.format(i=i, x=i * 7)}]} for i in range(n)]


def tiny_train_config(data: Path, out: Path, *extra: str):
    """A few quick steps of budwood-tiny on `data`: fp32, no compile, no validation split."""
    from budwood.config import load_config

    return load_config(None, ["base_model=budwood-tiny", f"data.train={data}", "data.validation_split=0",
                              "data.min_examples=1", f"output_dir={out}", "training.batch_size=4",
                              "training.precision=fp32", "training.compile=false", *extra])


def make_random_adapter(out: Path, seed: int, r: int = 8, targets: list[str] | None = None) -> Path:
    """A peft LoRA adapter on budwood-tiny with random A and B, so it really changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from budwood.models.load import load_base

    torch.manual_seed(seed)
    model = load_base("budwood-tiny").model
    cfg = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                     target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory) -> Path:
    """A folder of three adapters on budwood-tiny: `alpha` (all projections, r 8), `beta` (q and v only,
    r 4) and `gamma` (all projections, r 16)."""
    root = tmp_path_factory.mktemp("adapters")
    make_random_adapter(root / "alpha", 1, 8)
    make_random_adapter(root / "beta", 2, 4, ["q_proj", "v_proj"])
    make_random_adapter(root / "gamma", 3, 16)
    return root


@pytest.fixture
def budwood_home(tmp_path, monkeypatch) -> Path:
    """A private BUDWOOD_HOME (keys, the default registry, pulled adapters) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("BUDWOOD_HOME", str(home))
    monkeypatch.delenv("BUDWOOD_REGISTRY", raising=False)
    monkeypatch.delenv("BUDWOOD_DATABASE_URL", raising=False)
    monkeypatch.delenv("BUDWOOD_KEY_PASSPHRASE", raising=False)
    return home


_THROWAWAY_PG = []  # the pgserver started for this session, if one was


def postgres_url() -> str:
    """The PostgreSQL the tests use: BUDWOOD_TEST_POSTGRES where it is set (CI sets the machine's server), else a
    throwaway server from the pip-installable `pgserver`, started on first use (under a second) and stopped when
    the session ends, so a machine with nothing but Python runs every test."""
    url = os.environ.get("BUDWOOD_TEST_POSTGRES")
    if url:
        return url
    if not _THROWAWAY_PG:
        import atexit
        import tempfile

        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="budwood-test-pg-"), cleanup_mode="delete")
        atexit.register(server.cleanup)
        _THROWAWAY_PG.append(server)
    return _THROWAWAY_PG[0].get_uri()


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema in the tests' database; yields a URL whose search_path is that schema."""
    from sqlalchemy import create_engine, text

    base = postgres_url()
    name = f"bw_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as c:
            c.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


@contextmanager
def queue_service(backend: str, home: Path, quotas: dict, files: dict[str, str]) -> Iterator:
    """A jobs Service on SQLite or a fresh PostgreSQL schema, with each tenant of `files` (tenant -> file
    id) created and holding that one uploaded training file."""
    from contextlib import nullcontext

    from budwood.jobs.service import Service, ServiceConfig

    with nullcontext(None) if backend == "sqlite" else pg_schema() as url:
        svc = Service(ServiceConfig.model_validate({"home": str(home), "database": url, "quotas": quotas}))
        try:
            for tenant, file_id in files.items():
                svc.tenants.create(tenant)
                svc.queue.add_file(tenant, file_id, "t.jsonl", "fine-tune", 10, "0" * 64, "openai", 10, lambda: None)
            yield svc
        finally:
            svc.close()


def torchrun_config(tmp: Path, data: dict, out: Path, **training) -> Path:
    """A 12-step fp32 training config on budwood-tiny for `torchrun` tests (dropout 0: dropout draws
    differ across ranks); `training` overrides its training section."""
    import yaml

    cfg = {"base_model": "budwood-tiny",
           "data": {"train": str(data["train"]), "validation": str(data["validation"])},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "training": {"max_steps": 12, "batch_size": 8, "gradient_accumulation": 2, "learning_rate": 1e-3,
                        "precision": "fp32", "compile": False, "save_every": 6, "eval_every": 6, "seed": 0,
                        "max_seq_len": 256, **training},
           "output_dir": str(out)}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, *args: str, timeout: float = 600) -> tuple[int | None, str]:
    """`torchrun --nproc_per_node 2 budwood train CONFIG ARGS` on a free port: (exit code, or None if it
    was still running after `timeout` s and was killed; its output). torchrun starts each worker in a
    session of its own, so on a timeout the workers are killed by pid."""
    import os
    import socket
    import subprocess
    import sys

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), "-m", "budwood", "train", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        for worker in psutil.Process(proc.pid).children(recursive=True):
            worker.kill()
        proc.kill()
        output, _ = proc.communicate()
        return None, output


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request, tmp_path, budwood_home) -> Iterator[str]:
    """Where a registry lives: a folder (SQLite) or a PostgreSQL database (blobs under BUDWOOD_HOME)."""
    if request.param == "sqlite":
        yield str(tmp_path / "registry")
    else:
        with pg_schema() as url:
            yield url


@pytest.fixture(scope="session")
def evaluated_adapter(tmp_path_factory) -> Path:
    """A budwood-style adapter on budwood-tiny: peft files, budwood.json with the base fingerprint, and
    evaluation results for itself (eval/adapted.json) and its base (eval/base.json). Copy before changing."""
    from budwood.eval.results import write_results
    from budwood.eval.run import EvalConfig, run_eval
    from budwood.models.fingerprint import model_fingerprint
    from budwood.train.outputs import portable_config

    path = make_random_adapter(tmp_path_factory.mktemp("evaluated") / "adapter", seed=7, r=8)
    (path / "README.md").unlink(missing_ok=True)  # peft's placeholder card
    portable_config(path / "adapter_config.json", "budwood-tiny")  # the base's name, as training writes it
    (path / "budwood.json").write_text(json.dumps({
        "budwood_version": "0.1.0", "created": "2026-11-01T00:00:00Z",
        "base_model": {"name": "budwood-tiny", "fingerprint": model_fingerprint("budwood-tiny")}}))
    quick = {"suites": ["grounding", "domain"], "limit": 3, "bootstrap": 20, "max_tokens": 12,
             "domain": {"data": str(make_domain_dataset(path.parent / "data", seed=0)["validation"])}}
    for side, target in (("adapted", f"budwood-tiny+{path}"), ("base", "budwood-tiny")):
        write_results(run_eval(EvalConfig.model_validate({**quick, "target": target})), path / "eval" / f"{side}.json")
    return path


def copy_adapter(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


# -- the fine-tuning service ------------------------------------------------------------------------------
# small and quick: jobs on budwood-tiny finish in seconds; workers notice cancel/pause within half a second
SERVICE_TEST_CONFIG = {
    "serving": {"precision": "fp32", "kv_cache_tokens": 4096},
    "training": {"learning_rate": 2e-3, "checkpoint_every": 5, "precision": "fp32", "compile": False},
    "evaluation": {"suites": ["domain", "grounding"], "limit": 4, "compare_base": False,
                   "settings": {"max_tokens": 16, "bootstrap": 20}},
    "heartbeat_s": 0.5, "lease_s": 4.0, "poll_s": 0.2, "key_cache_s": 0.5,
}


def service_config(home: Path, database: str | None = None, **overrides):
    from budwood.jobs.service import ServiceConfig

    raw = json.loads(json.dumps(SERVICE_TEST_CONFIG))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return ServiceConfig.model_validate({**raw, "home": str(home), "database": database})


class LiveService:
    """A running service (app in a thread, workers in threads) and helpers to drive it as a client would."""

    def __init__(self, url: str, service, stop):
        self.url, self.service, self.stop = url, service, stop

    def tenant(self, name: str, **quotas) -> str:
        """Create a tenant; returns an API key for it."""
        self.service.tenants.create(name, **quotas)
        return self.service.tenants.issue_key(name).key

    def client(self, key: str):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def wait(self, client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status in statuses:
                return job
            time.sleep(0.2)
        raise AssertionError(f"{job_id} still {job.status} after {timeout} s")


@contextmanager
def live_service(home: Path, database: str | None = None, workers: int = 1, **overrides) -> Iterator[LiveService]:
    import threading

    from budwood.jobs.service import Service
    from budwood.jobs.worker import run_worker
    from budwood.service_app import create_service_app

    config = service_config(home, database, **overrides)
    service = Service(config)
    service.ensure_key()
    stop = threading.Event()
    threads = [threading.Thread(target=run_worker, args=(config, f"test-w{i}", stop), daemon=True)
               for i in range(workers)]
    for t in threads:
        t.start()
    try:
        with running(create_service_app(service)) as url:
            yield LiveService(url, service, stop)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        service.close()


def upload(client, path: Path):
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune")
