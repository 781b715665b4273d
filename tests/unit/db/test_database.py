"""budwood.db: one database for the registry's and the service's tables, migrated on open, refused clearly."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import budwood.jobs.models  # noqa: F401  (both table sets are declared on db.Base)
import budwood.registry.models  # noqa: F401
from budwood.db import Base, DatabaseError, budwood_home, open_database


def test_a_fresh_database_gets_every_declared_table_and_nothing_else(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'new' / 'budwood.db'}")  # the parent folder is made too
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
    assert {"adapters", "versions", "tenants", "ft_jobs"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_opening_twice_migrates_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    open_database(url).dispose()
    engine = open_database(url)  # already at head: one read, no second upgrade
    with engine.connect() as c:
        assert MigrationContext.configure(c).get_current_revision() is not None
    engine.dispose()


@pytest.mark.parametrize(("url", "message"), [
    ("not a url", "expected sqlite:///PATH or postgresql://HOST/DB"),
    ("mysql://h/db", "runs on SQLite or PostgreSQL, not mysql"),
])
def test_bad_urls_are_refused_by_name(url, message):
    with pytest.raises(DatabaseError, match=message):
        open_database(url)


def test_home_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDWOOD_HOME", str(tmp_path / "h"))
    assert budwood_home() == tmp_path / "h"
