"""API tokens: the role table, issue/authenticate/revoke, and no plaintext in the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgeota.server.db.models import ROLE_VALUES, ApiToken, Base, Device
from edgeota.server.tokens import (
    LAST_USED_RESOLUTION,
    SESSION_PREFIX,
    TOKEN_PREFIX,
    AuthenticationError,
    Principal,
    Role,
    TokenNotFoundError,
    authenticate,
    authenticate_session,
    hash_token,
    issue_session,
    issue_token,
    revoke,
    session_key,
)

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

REQUIRED = (Role.VIEWER, Role.OPERATOR, Role.RELEASE_MANAGER, Role.ADMIN, Role.DEVICE)
# Rows: the token's role; columns: the role an endpoint requires, in REQUIRED order.
# fmt: off
ROLE_TABLE = {
    #                      viewer operator rel-mgr admin  device
    Role.VIEWER:          (True,  False,   False,  False, False),
    Role.OPERATOR:        (True,  True,    False,  False, False),
    Role.RELEASE_MANAGER: (True,  True,    True,   False, False),
    Role.ADMIN:           (True,  True,    True,   True,  False),
    Role.DEVICE:          (False, False,   False,  False, True),
}
# fmt: on


@pytest.mark.parametrize(
    ("role", "required", "allowed"),
    [
        (role, required, allowed)
        for role, row in ROLE_TABLE.items()
        for required, allowed in zip(REQUIRED, row, strict=True)
    ],
    ids=lambda value: str(value),
)
def test_role_table(role: Role, required: Role, allowed: bool) -> None:
    assert role.allows(required) is allowed


def test_roles_match_the_stored_vocabulary() -> None:
    assert tuple(role.value for role in Role) == ROLE_VALUES
    assert set(ROLE_TABLE) == set(Role)


def add_device(session: Session, device_id: str = "pi-1", *, disabled: bool = False) -> Device:
    device = Device(id=device_id, hardware="rpi4", identity={}, disabled=disabled)
    session.add(device)
    session.flush()
    return device


def test_issue_and_authenticate(db_session: Session) -> None:
    token, plaintext = issue_token(db_session, name="ci-bot", role="operator", now=T0)
    db_session.commit()
    assert plaintext.startswith(TOKEN_PREFIX)
    assert len(plaintext) > 40
    assert token.token_hash == hash_token(plaintext)
    assert token.last_used is None

    principal = authenticate(db_session, plaintext, now=T0 + timedelta(seconds=5))
    assert principal == Principal(
        token_id=token.id, name="ci-bot", role=Role.OPERATOR, device_id=None
    )
    assert principal.allows(Role.VIEWER)
    assert not principal.allows(Role.ADMIN)
    db_session.commit()
    db_session.expire_all()
    stored = db_session.get(ApiToken, token.id)
    assert stored is not None
    assert stored.last_used == T0 + timedelta(seconds=5)


def test_last_used_is_written_at_most_once_per_resolution(db_session: Session) -> None:
    token, plaintext = issue_token(db_session, name="n", role=Role.VIEWER, now=T0)
    authenticate(db_session, plaintext, now=T0)
    authenticate(db_session, plaintext, now=T0 + LAST_USED_RESOLUTION / 2)
    assert token.last_used == T0
    authenticate(db_session, plaintext, now=T0 + LAST_USED_RESOLUTION)
    assert token.last_used == T0 + LAST_USED_RESOLUTION


def test_two_tokens_are_different(db_session: Session) -> None:
    _, first = issue_token(db_session, name="a", role=Role.ADMIN)
    _, second = issue_token(db_session, name="a", role=Role.ADMIN)
    assert first != second


def test_revoked_token_refused(db_session: Session) -> None:
    token, plaintext = issue_token(db_session, name="old", role=Role.ADMIN)
    db_session.commit()
    revoked = revoke(db_session, token.id, now=T0)
    db_session.commit()
    assert revoked.revoked_at == T0
    with pytest.raises(AuthenticationError, match="revoked") as caught:
        authenticate(db_session, plaintext)
    assert plaintext not in str(caught.value)
    # Revoking again keeps the first time.
    assert revoke(db_session, token.id, now=T0 + timedelta(days=1)).revoked_at == T0


def test_revoke_unknown_id(db_session: Session) -> None:
    with pytest.raises(TokenNotFoundError, match="42"):
        revoke(db_session, 42)


@pytest.mark.parametrize(
    "presented",
    [
        TOKEN_PREFIX + "A" * 43,  # well formed, never issued
        "eot_",
        "Bearer eot_xyz",
        "x" * 10_000,
        "",
    ],
    ids=["unknown", "prefix-only", "with-scheme", "huge", "empty"],
)
def test_unknown_or_malformed_token_refused(db_session: Session, presented: str) -> None:
    issue_token(db_session, name="real", role=Role.ADMIN)
    with pytest.raises(AuthenticationError) as caught:
        authenticate(db_session, presented)
    message = str(caught.value)
    assert "token" in message
    if presented:
        assert presented not in message


def test_plaintext_is_not_stored_anywhere(db_session: Session) -> None:
    add_device(db_session)
    _, operator_token = issue_token(db_session, name="op", role=Role.OPERATOR)
    _, device_token = issue_token(db_session, name="dev", role=Role.DEVICE, device_id="pi-1")
    authenticate(db_session, operator_token)
    db_session.commit()

    dump: list[str] = []
    for table in Base.metadata.sorted_tables:
        for row in db_session.execute(select(table)):
            dump.extend(
                value.decode("latin-1") if isinstance(value, bytes) else str(value) for value in row
            )
    everything = "\n".join(dump)
    for plaintext in (operator_token, device_token):
        assert plaintext not in everything
        assert plaintext.removeprefix(TOKEN_PREFIX) not in everything
        assert hash_token(plaintext) in everything  # only the digest is kept


def test_device_token_carries_device_id(db_session: Session) -> None:
    add_device(db_session, "pi-7")
    token, plaintext = issue_token(db_session, name="pi-7", role=Role.DEVICE, device_id="pi-7")
    db_session.commit()
    assert token.device_id == "pi-7"
    principal = authenticate(db_session, plaintext)
    assert principal.role is Role.DEVICE
    assert principal.device_id == "pi-7"
    assert not principal.allows(Role.VIEWER)


def test_device_token_of_disabled_device_refused(db_session: Session) -> None:
    device = add_device(db_session, "pi-8")
    _, plaintext = issue_token(db_session, name="pi-8", role=Role.DEVICE, device_id="pi-8")
    device.disabled = True
    db_session.commit()
    with pytest.raises(AuthenticationError, match="disabled"):
        authenticate(db_session, plaintext)


def test_device_binding_rules(db_session: Session) -> None:
    with pytest.raises(ValueError, match="device id"):
        issue_token(db_session, name="d", role=Role.DEVICE)
    with pytest.raises(ValueError, match="not enrolled"):
        issue_token(db_session, name="d", role=Role.DEVICE, device_id="ghost")
    add_device(db_session)
    with pytest.raises(ValueError, match="cannot be bound"):
        issue_token(db_session, name="o", role=Role.OPERATOR, device_id="pi-1")
    with pytest.raises(ValueError, match="superuser"):
        issue_token(db_session, name="o", role="superuser")
    with pytest.raises(ValueError, match="name"):
        issue_token(db_session, name=" ", role=Role.VIEWER)


def test_database_enforces_device_binding(db_session: Session) -> None:
    with pytest.raises(IntegrityError):
        db_session.execute(
            text(
                "INSERT INTO api_tokens (name, role, token_hash, created_at) "
                "VALUES ('x', 'device', :h, :t)"
            ),
            {"h": "0" * 64, "t": T0},
        )


# -- dashboard sessions ------------------------------------------------------------------

KEY = session_key(b"a server secret of thirty-two b.")


def _session(db_session: Session, role: Role = Role.VIEWER) -> tuple[ApiToken, str]:
    row, token = issue_token(db_session, name="browser", role=role, now=T0)
    principal = authenticate(db_session, token, now=T0)
    return row, issue_session(db_session, principal, KEY, lifetime=timedelta(hours=12), now=T0)


def test_a_session_is_signed_and_holds_no_token(db_session: Session) -> None:
    row, session = _session(db_session)
    assert session.startswith(f"{SESSION_PREFIX}.{row.id}.")
    assert row.token_hash not in session
    principal = authenticate_session(db_session, session, KEY, now=T0 + timedelta(hours=11))
    assert (principal.token_id, principal.role) == (row.id, Role.VIEWER)
    # Not an API credential: the bearer path refuses it.
    with pytest.raises(AuthenticationError, match="malformed API token"):
        authenticate(db_session, session, now=T0)


def test_forged_expired_and_revoked_sessions_are_refused(db_session: Session) -> None:
    row, session = _session(db_session)
    prefix, token_id, expires, nonce, mac = session.split(".")
    other_row, _ = issue_token(db_session, name="other", role=Role.ADMIN, now=T0)
    forged = {
        "a later expiry": f"{prefix}.{token_id}.{int(expires) + 86400}.{nonce}.{mac}",
        "another token's id": f"{prefix}.{other_row.id}.{expires}.{nonce}.{mac}",
        "a changed mac": f"{prefix}.{token_id}.{expires}.{nonce}.{mac[:-1]}"
                         f"{'0' if mac[-1] != '0' else '1'}",
        "an unknown token id": f"{prefix}.999999.{expires}.{nonce}.{mac}",
        "an id past 64 bits": f"{prefix}.{'9' * 19}.{expires}.{nonce}.{mac}",
    }
    for what, value in forged.items():
        with pytest.raises(AuthenticationError, match="unknown session"):
            authenticate_session(db_session, value, KEY, now=T0)
            pytest.fail(f"a session with {what} was accepted")
    with pytest.raises(AuthenticationError, match="unknown session"):
        authenticate_session(db_session, session, session_key(b"another secret"), now=T0)
    for malformed in ("", "eos1", "eos1.1.2.3", "eos2." + session[5:], session + ".x",
                      "eos1.x.1.n.m", "eos1.1.1.n.m" + "m" * 300):
        with pytest.raises(AuthenticationError, match="malformed session"):
            authenticate_session(db_session, malformed, KEY, now=T0)
    with pytest.raises(AuthenticationError, match="expired"):
        authenticate_session(db_session, session, KEY, now=T0 + timedelta(hours=12))
    revoke(db_session, row.id, now=T0)
    with pytest.raises(AuthenticationError, match="revoked"):
        authenticate_session(db_session, session, KEY, now=T0)
