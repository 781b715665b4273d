"""FastAPI dependencies of the fine-tuning routes: who is calling (a tenant) and the serving objects.

The serving objects are made once, with the app (budwood.service_app), and held on `app.state`.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from budwood.errors import BudwoodError, ErrorKind
from budwood.jobs.serving_files import ServingFiles, ServingUploads
from budwood.jobs.serving_jobs import ServingFineTuning
from budwood.serve.auth import CallerDep


def tenant_of(caller: CallerDep) -> str:
    """The calling tenant; the operator's key or none is refused, as these routes belong to a tenant."""
    if caller.tenant is None:
        raise BudwoodError("this route needs a tenant's API key", code="invalid_api_key",
                           kind=ErrorKind.UNAUTHENTICATED)
    return caller.tenant


def serving_files(request: Request) -> ServingFiles:
    return request.app.state.serving_files


def serving_jobs(request: Request) -> ServingFineTuning:
    return request.app.state.serving_jobs


def serving_uploads(request: Request) -> ServingUploads:
    return request.app.state.serving_uploads


TenantDep = Annotated[str, Depends(tenant_of)]
FilesDep = Annotated[ServingFiles, Depends(serving_files)]
JobsDep = Annotated[ServingFineTuning, Depends(serving_jobs)]
UploadsDep = Annotated[ServingUploads, Depends(serving_uploads)]
