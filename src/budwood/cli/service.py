"""`budwood service / worker / tenants / keys issue|revoke|issued`: the hosted fine-tuning service.
Each body calls one library function."""
from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.table import Table

from budwood.cli.console import console, out
from budwood.cli.registry import keys_app

app = typer.Typer()
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants of the fine-tuning service.")

ConfigOption = typer.Option(None, "--config", "-c", envvar="BUDWOOD_SERVICE_CONFIG",
                            help="service YAML (configs/service.yaml); default: built-in settings")
SetOption = typer.Option([], "--set", help="override a key, e.g. --set database=postgresql://127.0.0.1/budwood")


def _config(config: Path | None, set_: list[str]):
    from budwood.jobs.service import load_service_config

    return load_service_config(config, set_)


def _service(config: Path | None, set_: list[str]):
    from budwood.jobs.service import Service

    return Service(_config(config, set_))


@app.command("service")
def service_cmd(
    config: Path = ConfigOption,
    set_: list[str] = SetOption,
    workers: int = typer.Option(None, help="worker processes to start beside the server (config: workers)"),
    host: str = typer.Option(None, help="interface to listen on (config: host)"),
    port: int = typer.Option(None, help="port (config: port)"),
) -> None:
    """Run the fine-tuning service: OpenAI's /v1/files and /v1/fine_tuning API, inference on the base and
    every finished job's model, the registry and the dashboard, with worker processes beside it.

    Example: budwood service --config configs/service.yaml
    then: budwood tenants create acme && budwood keys issue acme
    and: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY).fine_tuning.jobs.create(...)
    """
    from budwood.service_app import run_service

    extra = [f"{k}={v}" for k, v in (("workers", workers), ("host", host), ("port", port)) if v is not None]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_service(_config(config, set_ + extra))


@app.command("worker")
def worker_cmd(config: Path = ConfigOption, set_: list[str] = SetOption,
               worker_id: str = typer.Option(None, "--id", help="this worker's name in events (default host:pid)")
               ) -> None:
    """Run fine-tuning jobs from the service's queue (any number of workers, on any machine that reaches
    the database and the service's home folder). SIGTERM or Ctrl-C checkpoints the running job and gives
    it back to the queue.

    Example: budwood worker --config configs/service.yaml --set database=postgresql://db-host/budwood
    """
    from budwood.jobs.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(_config(config, set_), worker_id)


@tenants_app.command("create")
def tenants_create_cmd(
    name: str = typer.Argument(..., help="tenant name; also its registry namespace"),
    max_storage_bytes: int = typer.Option(None, help="storage quota in bytes (default: the service's)"),
    max_concurrent_jobs: int = typer.Option(None, help="jobs at a time (default: the service's)"),
    config: Path = ConfigOption, set_: list[str] = SetOption,
) -> None:
    """Create a tenant.

    Example: budwood tenants create acme --max-concurrent-jobs 2
    """

    service = _service(config, set_)
    service.tenants.create(name, max_storage_bytes, max_concurrent_jobs)
    out.print(f"tenant: {name}  (next: budwood keys issue {name})")


@tenants_app.command("list")
def tenants_list_cmd(config: Path = ConfigOption, set_: list[str] = SetOption) -> None:
    """List tenants with their quotas and usage."""

    service = _service(config, set_)
    rows = service.tenants.list()
    usage = service.queue.usage()
    quotas = service.config.quotas
    table = Table("tenant", "files", "storage", "jobs active", "jobs", "keys")
    keys = {}
    for k in service.tenants.keys():
        if k.revoked_at is None:
            keys[k.tenant] = keys.get(k.tenant, 0) + 1
    for t in rows:
        u = usage.get(t.name, {})
        limit = t.max_storage_bytes if t.max_storage_bytes is not None else quotas.storage_bytes
        jobs = t.max_concurrent_jobs if t.max_concurrent_jobs is not None else quotas.concurrent_jobs
        table.add_row(t.name, str(u.get("files", 0)), f"{u.get('bytes', 0):,} / {limit:,}",
                      f"{u.get('active', 0)} / {jobs}", str(u.get("jobs", 0)), str(keys.get(t.name, 0)))
    out.print(table)


@keys_app.command("issue")
def keys_issue_cmd(tenant: str = typer.Argument(..., help="the tenant the key acts for"),
                   name: str = typer.Option(None, help="what the key is for, e.g. ci"),
                   config: Path = ConfigOption, set_: list[str] = SetOption) -> None:
    """Issue an API key for a tenant of the fine-tuning service (printed once; only its hash is kept).

    Example: budwood keys issue acme --name laptop
    """

    issued = _service(config, set_).tenants.issue_key(tenant, name)
    console.print(f"API key {issued.id} for tenant {tenant} (shown once; keep it secret):")
    out.print(issued.key, highlight=False)


@keys_app.command("revoke")
def keys_revoke_cmd(key_id: str = typer.Argument(..., help="key id (as `budwood keys issued` lists it)"),
                    config: Path = ConfigOption, set_: list[str] = SetOption) -> None:
    """Revoke a tenant's API key; it stops working within seconds."""

    row = _service(config, set_).tenants.revoke_key(key_id)
    out.print(f"revoked: {row.id} (tenant {row.tenant})")


@keys_app.command("issued")
def keys_issued_cmd(tenant: str = typer.Option(None, help="only this tenant's"),
                    config: Path = ConfigOption, set_: list[str] = SetOption) -> None:
    """List the service's API keys (ids and state; the keys themselves are not kept)."""
    import time


    rows = _service(config, set_).tenants.keys(tenant)
    table = Table("id", "tenant", "name", "created", "state")
    for k in rows:
        table.add_row(k.id, k.tenant, k.name or "", time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created_at)),
                      "revoked" if k.revoked_at else "active")
    out.print(table)
