"""The operator dashboard at ``/`` (placeholder: being built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["dashboard"])
