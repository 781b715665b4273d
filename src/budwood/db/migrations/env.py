"""Alembic environment: runs on the connection budwood.db hands over (never a URL in an ini file).

Upgrades need no metadata. To autogenerate a new revision, import every table module (budwood.registry.models,
budwood.jobs.models) and pass `config.attributes["target_metadata"] = budwood.db.Base.metadata`; db/ itself
imports neither, so the registry and the service depend on db and never the other way round."""
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=context.config.attributes.get("target_metadata"),
                  render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
