import json
from pathlib import Path

import pytest

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
