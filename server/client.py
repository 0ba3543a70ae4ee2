"""The operator CLI's HTTP client for the ``/api/v1`` API.

Operator commands go through the API (never straight to the database), so the
same commands work against a local dev server and a remote production one,
and every action passes the server's authorisation and audit log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from edgeota.protocol.errors import EdgeotaError
from edgeota.server.services.errors import ErrorCode

__all__ = ["ApiError", "OperatorClient", "ServerUnreachableError"]

_UPLOAD_BLOCK = 1024 * 1024


class ApiError(EdgeotaError):
    """The server refused a request; ``status`` is the HTTP status, the message its reason.

    ``code`` is the body's :class:`ErrorCode` (None when the body has none, such as
    a request-validation 422, or a code this client does not know): decide on it,
    not on the message.
    """

    def __init__(self, status: int, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerUnreachableError(EdgeotaError):
    """No answer from the server (not running, wrong URL, network down)."""


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI's request-validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}"
            for item in detail if isinstance(item, dict)
        )
    return str(body)[:500]


def _code(response: httpx.Response) -> ErrorCode | None:
    try:
        body = response.json()
    except ValueError:
        return None
    raw = body.get("code") if isinstance(body, dict) else None
    try:
        return ErrorCode(raw) if isinstance(raw, str) else None
    except ValueError:  # a newer server's code: the message still says what happened
        return None


class OperatorClient:
    """Typed access to the operator API with a bearer token; every call is bounded."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServerUnreachableError(
                f"cannot reach the edgeota server at {self.base_url}: {e} (is `edgeota serve` "
                "running?)"
            ) from e
        if response.status_code >= 400:
            raise ApiError(response.status_code,
                           f"{method} {path}: HTTP {response.status_code}: {_reason(response)}",
                           _code(response))
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params={k: v for k, v in params.items()
                                                   if v is not None}).json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._request("POST", path, json=body or {}).json()

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path).content

    def upload_blob(self, path: Path, progress: Callable[[int], None] | None = None) -> str:
        """Stream a file to ``PUT /api/v1/blobs/{sha256}``; returns its sha256."""
        digest = hashlib.sha256()
        with path.open("rb") as source:
            while block := source.read(_UPLOAD_BLOCK):
                digest.update(block)
        sha256 = digest.hexdigest()

        def body() -> Iterator[bytes]:
            with path.open("rb") as source:
                while block := source.read(_UPLOAD_BLOCK):
                    if progress is not None:
                        progress(len(block))
                    yield block

        self._request(
            "PUT",
            f"/api/v1/blobs/{sha256}",
            content=body(),
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(path.stat().st_size)},
        )
        return sha256
