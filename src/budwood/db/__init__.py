"""The one owner of budwood's database: URL, engine, sessions, schema migrations and the home folder.

The adapter registry (`registry/`) and the fine-tuning service (`jobs/`) keep their tables in the same
database and the same Alembic chain (`db/migrations/versions/`, append-only); both declare their tables
on `db.Base` and open the database through `open_database`. Nothing here imports either of them.
"""
from budwood.db.database import Base, DatabaseError, default_url, migrate, open_database, session_makers, writer
from budwood.db.home import budwood_home

__all__ = ["Base", "DatabaseError", "budwood_home", "default_url", "migrate", "open_database", "session_makers",
           "writer"]
