"""API tokens with roles: issue, authenticate, revoke.

A token is ``"eot_" + secrets.token_urlsafe(32)`` (256 random bits). The
plaintext is returned once by :func:`issue_token` and never stored: the
database keeps only its SHA-256, so a leaked database backup does not hand out
working tokens. A plain hash (no salt, no slow KDF) is enough because the
token is random with 256 bits of entropy, not a password someone chose; it
also lets :func:`authenticate` find the row by an indexed lookup.

Roles (DESIGN "Server"): ``viewer < operator < release-manager < admin`` for
the operator API; ``device`` is apart -- a device token is bound to one device
and allows nothing of the operator API, and no operator role allows acting as
a device.

Callers own the transaction (nothing here commits), and are expected to
record issue and revoke in the audit log by token id -- never the token.

Dashboard sessions (:func:`issue_session`, :func:`authenticate_session`): a
browser that signed in with a token keeps a *session* in its cookie, not the
token, so a leaked cookie is not an API credential. A session is
``eos1.<token id>.<expiry>.<nonce>.<mac>``, the MAC an HMAC-SHA256 under a
server key (:func:`session_key`) over the rest and the token's stored hash.
It holds until it expires, and is re-checked against its token on every
request: revoking the token ends every session made with it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.identity import validate_device_id
from edgeota.server.db.models import ApiToken, Device

__all__ = [
    "LAST_USED_RESOLUTION",
    "SESSION_PREFIX",
    "TOKEN_PREFIX",
    "ApiToken",
    "AuthenticationError",
    "Principal",
    "Role",
    "TokenNotFoundError",
    "authenticate",
    "authenticate_session",
    "hash_token",
    "issue_session",
    "issue_token",
    "revoke",
    "session_key",
]

TOKEN_PREFIX = "eot_"  # noqa: S105 - a public prefix that marks edgeota tokens, not a secret
_TOKEN_BYTES = 32
_MAX_PRESENTED_LENGTH = 256  # far above a real token; refuse megabyte headers before hashing
_NAME_MAX = 128  # ApiToken.name column length
SESSION_PREFIX = "eos1"
_SESSION_INFO = b"edgeota dashboard session v1"
_SESSION_PART = re.compile(r"[0-9]{1,19}")
# last_used is a hint for operators ("is this token still in use?"), not a
# log. Writing it on every request would make each read-only request a write:
# the database-wide write lock on SQLite, a row lock on the token on PostgreSQL.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class Role(enum.StrEnum):
    """Who may do what through the API; stored as its value in ``api_tokens.role``."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    RELEASE_MANAGER = "release-manager"
    ADMIN = "admin"
    DEVICE = "device"

    def allows(self, required: Role) -> bool:
        """Whether a token with this role may call something that requires ``required``.

        Operator roles are ordered (each allows what the ones below it allow);
        ``device`` allows only ``device``, and only ``device`` allows it.
        """
        if self is Role.DEVICE or required is Role.DEVICE:
            return self is required
        return _OPERATOR_ORDER.index(self) >= _OPERATOR_ORDER.index(required)


# The operator hierarchy, lowest first.
_OPERATOR_ORDER: tuple[Role, ...] = (Role.VIEWER, Role.OPERATOR, Role.RELEASE_MANAGER, Role.ADMIN)


class AuthenticationError(EdgeotaError):
    """A presented token is not valid. The message never contains the token itself."""


class TokenNotFoundError(EdgeotaError):
    """No token with the given id (revoke of an id that was never issued)."""


@dataclass(frozen=True)
class Principal:
    """The authenticated caller behind a request; the token itself is not kept."""

    token_id: int
    name: str
    role: Role
    device_id: str | None

    def allows(self, required: Role) -> bool:
        """Whether this caller's role allows an action that requires ``required``."""
        return self.role.allows(required)


def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def issue_token(
    session: Session,
    *,
    name: str,
    role: Role | str,
    device_id: str | None = None,
    now: datetime | None = None,
) -> tuple[ApiToken, str]:
    """Create a token and return its row and the plaintext, which is not retrievable later.

    ``device_id`` is required for (and only allowed with) the ``device`` role;
    the device must be enrolled.

    Raises:
        ValueError: unknown role, bad name, a device id where none belongs (or
            none where one must be), or a device that is not enrolled.
    """
    role = Role(role)
    if not isinstance(name, str) or not name.strip() or len(name) > _NAME_MAX:
        raise ValueError(f"token name must be 1 to {_NAME_MAX} characters")
    if role is Role.DEVICE:
        if device_id is None:
            raise ValueError("a device token needs the device id it is bound to")
        validate_device_id(device_id)
        if session.get(Device, device_id) is None:
            raise ValueError(f"device {device_id!r} is not enrolled")
    elif device_id is not None:
        raise ValueError(f"a {role} token cannot be bound to a device")

    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
    token = ApiToken(
        name=name,
        role=role.value,
        token_hash=hash_token(plaintext),
        device_id=device_id,
        created_at=_now(now),
    )
    session.add(token)
    session.flush()
    return token, plaintext


def authenticate(session: Session, presented: str, *, now: datetime | None = None) -> Principal:
    """Return the principal for a presented token, or raise :class:`AuthenticationError`.

    Refused: anything not shaped like an edgeota token, unknown tokens,
    revoked tokens, and device tokens of a disabled device. ``last_used`` is
    updated at most once per :data:`LAST_USED_RESOLUTION`.
    """
    if (
        not isinstance(presented, str)
        or len(presented) > _MAX_PRESENTED_LENGTH
        or not presented.startswith(TOKEN_PREFIX)
    ):
        raise AuthenticationError("malformed API token")
    digest = hash_token(presented)
    token = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).one_or_none()
    # The lookup already matched; compare_digest keeps the final decision
    # constant-time and independent of how the database compares strings.
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        raise AuthenticationError("unknown API token")
    return _principal(session, token, now)


def _principal(session: Session, token: ApiToken, now: datetime | None) -> Principal:
    """The principal of a token row found by a valid credential, unless it is revoked."""
    if token.revoked_at is not None:
        raise AuthenticationError(f"API token {token.id} ({token.name}) has been revoked")
    role = Role(token.role)
    if role is Role.DEVICE:
        device = session.get(Device, token.device_id)
        if device is None or device.disabled:
            raise AuthenticationError(f"API token {token.id}: device {token.device_id} is disabled")

    current = _now(now)
    if token.last_used is None or current - token.last_used >= LAST_USED_RESOLUTION:
        token.last_used = current
        session.flush()
    return Principal(token_id=token.id, name=token.name, role=role, device_id=token.device_id)


def session_key(secret: bytes) -> bytes:
    """The dashboard sessions' MAC key, derived from a server secret (HKDF-SHA256).

    Every replica holding the same secret derives the same key, so a session
    made by one is honoured by the others; a new secret ends every session.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_SESSION_INFO).derive(secret)


def _session_mac(key: bytes, payload: str, token_hash: str) -> str:
    return hmac.new(key, f"{payload}.{token_hash}".encode(), hashlib.sha256).hexdigest()


def issue_session(session: Session, principal: Principal, key: bytes, *,
                  lifetime: timedelta, now: datetime | None = None) -> str:
    """A session for ``principal``'s token, valid for ``lifetime`` (the cookie's value)."""
    token = session.get(ApiToken, principal.token_id)
    if token is None:
        raise AuthenticationError(f"API token {principal.token_id} no longer exists")
    expires = int((_now(now) + lifetime).timestamp())
    payload = f"{SESSION_PREFIX}.{token.id}.{expires}.{secrets.token_urlsafe(12)}"
    return f"{payload}.{_session_mac(key, payload, token.token_hash)}"


def authenticate_session(session: Session, presented: str, key: bytes, *,
                         now: datetime | None = None) -> Principal:
    """The principal behind a dashboard session, or :class:`AuthenticationError`.

    Refused: anything not shaped like a session, a MAC that does not match
    (forged, or made for another token or under another key), an expired
    session, and whatever :func:`authenticate` refuses of its token.
    """
    parts = presented.split(".")
    if (len(presented) > _MAX_PRESENTED_LENGTH or len(parts) != 5
            or parts[0] != SESSION_PREFIX or not all(
                _SESSION_PART.fullmatch(p) for p in parts[1:3])):
        raise AuthenticationError("malformed session")
    token = session.get(ApiToken, int(parts[1])) if int(parts[1]) < 2**63 else None
    payload = ".".join(parts[:4])
    expected = _session_mac(key, payload, token.token_hash if token is not None else "")
    if token is None or not hmac.compare_digest(parts[4], expected):
        raise AuthenticationError("unknown session")
    if int(parts[2]) <= _now(now).timestamp():
        raise AuthenticationError("the session has expired: sign in again")
    return _principal(session, token, now)


def revoke(session: Session, token_id: int, *, now: datetime | None = None) -> ApiToken:
    """Revoke a token; revoking it again keeps the first revocation time.

    Raises:
        TokenNotFoundError: no token has this id.
    """
    token = session.get(ApiToken, token_id)
    if token is None:
        raise TokenNotFoundError(f"no API token with id {token_id}")
    if token.revoked_at is None:
        token.revoked_at = _now(now)
        session.flush()
    return token
