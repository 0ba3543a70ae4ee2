"""Errors services raise, each carrying the HTTP status and the error code the API answers with.

Every error body of ``/api/v1`` is ``{"detail": "<a sentence for people>",
"code": "<an ErrorCode value>"}``. Clients decide on ``code``, never on the
sentence: the publisher re-signs on ``stale_bin``, whatever the message says.
The codes are an explicit enumeration, not class names, so renaming or
splitting an exception class never changes the wire.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from edgeota.protocol.errors import EdgeotaError

__all__ = [
    "ConflictError",
    "ErrorCode",
    "ForbiddenError",
    "InvalidRequestError",
    "NotFoundError",
    "QuotaExceededError",
    "ReleaseRefusedError",
    "ServiceError",
    "StaleBinError",
]


class ErrorCode(enum.StrEnum):
    """The ``code`` of an API error body (documented in docs/architecture.md).

    Values are part of the HTTP API: add new ones, never rename or reuse one.
    """

    #: 400: the request is well-formed but names something impossible (no devices, bad phases).
    INVALID_REQUEST = "invalid_request"
    #: 400: bytes that do not parse as the wire contract says (a key, a manifest, a bundle).
    BAD_DATA = "bad_data"
    #: 400: any other refusal of the server's own checks.
    REFUSED = "refused"
    #: 401: no token, or one the server does not know.
    UNAUTHENTICATED = "unauthenticated"
    #: 403: the token's role may not do this.
    FORBIDDEN = "forbidden"
    #: 404: no such device, release or deployment.
    NOT_FOUND = "not_found"
    #: 409: the request clashes with the current state (a duplicate version, a finished rollout).
    CONFLICT = "conflict"
    #: 409: the signed hash bin is not the repository's next version (another release moved
    #: it on): sign again on top of the current bin.
    STALE_BIN = "stale_bin"
    #: 413: a body (bundle, report, any request) above its size limit, checked while it streams.
    TOO_LARGE = "too_large"
    #: 413: an upload that would take the server's uploads past their quota.
    QUOTA_EXCEEDED = "quota_exceeded"
    #: 408: a request body that stalled or came slower than the server's minimum rate.
    REQUEST_TIMEOUT = "request_timeout"
    #: 500: a fault of the server's own; the detail says nothing more (the log has it).
    INTERNAL_ERROR = "internal_error"
    #: 422: a request body that does not match its schema (``detail`` lists the fields).
    INVALID_BODY = "invalid_body"
    #: 422: a release that failed the server's checks; nothing reached the repositories.
    RELEASE_REFUSED = "release_refused"


class ServiceError(EdgeotaError):
    """A request the server understood and refused; ``status`` is its HTTP status."""

    status: ClassVar[int] = 400
    code: ClassVar[ErrorCode] = ErrorCode.INVALID_REQUEST


class InvalidRequestError(ServiceError):
    status = 400
    code = ErrorCode.INVALID_REQUEST


class ForbiddenError(ServiceError):
    status = 403
    code = ErrorCode.FORBIDDEN


class NotFoundError(ServiceError):
    status = 404
    code = ErrorCode.NOT_FOUND


class ConflictError(ServiceError):
    """The request clashes with the current state (a duplicate version, a finished rollout)."""

    status = 409
    code = ErrorCode.CONFLICT


class StaleBinError(ConflictError):
    """The signed bin is not the current version + 1: re-sign on the current bin."""

    code = ErrorCode.STALE_BIN


class ReleaseRefusedError(ServiceError):
    """A release that failed the server's checks; nothing reached the repositories."""

    status = 422
    code = ErrorCode.RELEASE_REFUSED


class QuotaExceededError(ServiceError):
    """An upload the uploads folder's quota has no room for."""

    status = 413
    code = ErrorCode.QUOTA_EXCEEDED
