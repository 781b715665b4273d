"""Dashboard routes (under construction)."""
from __future__ import annotations

from fastapi import APIRouter


def dashboard_router(service) -> APIRouter:
    return APIRouter(prefix="/dashboard")
