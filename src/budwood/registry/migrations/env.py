"""Alembic environment: runs on the connection budwood.registry.db hands over (never a URL in an ini file)."""
from alembic import context

import budwood.jobs.models  # noqa: F401  (the service tables share the metadata)
from budwood.registry.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
