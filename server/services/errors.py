"""Errors services raise, each carrying the HTTP status the API answers with."""

from __future__ import annotations

from edgeota.protocol.errors import EdgeotaError

__all__ = [
    "ConflictError",
    "ForbiddenError",
    "InvalidRequestError",
    "NotFoundError",
    "ReleaseRefusedError",
    "ServiceError",
]


class ServiceError(EdgeotaError):
    """A request the server understood and refused; ``status`` is its HTTP status."""

    status = 400


class InvalidRequestError(ServiceError):
    status = 400


class ForbiddenError(ServiceError):
    status = 403


class NotFoundError(ServiceError):
    status = 404


class ConflictError(ServiceError):
    """The request clashes with the current state (a duplicate version, a stale bin)."""

    status = 409


class ReleaseRefusedError(ServiceError):
    """A release that failed the server's checks; nothing reached the repositories."""

    status = 422
