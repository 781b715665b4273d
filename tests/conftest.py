import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from budwood.data.company import make_domain_dataset


@pytest.fixture(scope="session")
def company_data(tmp_path_factory) -> dict[str, Path]:
    """The demo's company data set (train / validation / heldout JSONL)."""
    return make_domain_dataset(tmp_path_factory.mktemp("company"), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from budwood.models.load import load_tokenizer

    return load_tokenizer("budwood-tiny")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


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


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` on a free loopback port in a thread; yields the base URL."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server exited while starting"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
