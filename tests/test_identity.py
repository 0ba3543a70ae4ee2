"""Device identity: ids, public/private round trips, signed reports, files on disk."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import mode_of
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from edgeota.protocol.errors import MalformedKeyError, ProtocolError, UnsupportedSuiteError
from edgeota.protocol.files import InsecureKeyFileError
from edgeota.protocol.identity import (
    IDENTITY_FILE,
    KEM_KEY_FILE,
    REPORT_KEY_FILE,
    SERVER_IDENTITY,
    DeviceIdentity,
    DevicePublicIdentity,
    InvalidDeviceIdError,
    MalformedIdentityError,
    ReportSignatureError,
    validate_device_id,
    validate_service_identity,
    verify_report,
)
from edgeota.protocol.keywrap import KemSuite, unwrap_content_key, wrap_content_key


@pytest.fixture(params=list(KemSuite), ids=lambda s: s.value)
def suite(request: pytest.FixtureRequest) -> KemSuite:
    return request.param


def tls_public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


# --- device ids ------------------------------------------------------------


@pytest.mark.parametrize(
    "device_id", ["a", "0", "pi-001", "rpi4-kitchen-2", "a" * 64, "0123456789abcdef"]
)
def test_valid_device_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "A",
        "Pi-001",
        "pi_001",
        "a" * 65,
        "../x",
        "a/b",
        "a.b",
        "pi 1",
        "pi\n",  # re.match("...$") would accept this one
        "\npi",
        "pi\x00",
        "pi+",
        "pi#",
        "p\u0456",  # Cyrillic i
        "\uff50\uff49",  # fullwidth "pi"
        "\u212a",  # Kelvin sign: lowercases to "k" under IGNORECASE
        "café",
        SERVER_IDENTITY,
    ],
)
def test_invalid_device_ids(device_id: str) -> None:
    with pytest.raises(InvalidDeviceIdError) as e:
        validate_device_id(device_id)
    assert isinstance(e.value, ValueError)
    assert isinstance(e.value, ProtocolError)
    assert "[a-z0-9-]{1,64}" in str(e.value)
    assert "lowercase" in str(e.value)


@pytest.mark.parametrize("value", [None, 7, b"pi-1"])
def test_non_string_device_ids(value: object) -> None:
    with pytest.raises(InvalidDeviceIdError):
        validate_device_id(value)  # type: ignore[arg-type]


def test_long_id_is_shortened_in_message() -> None:
    with pytest.raises(InvalidDeviceIdError) as e:
        validate_device_id("x" * 10_000)
    assert len(str(e.value)) < 300


def test_server_identity_is_a_service_identity_and_never_a_device_id() -> None:
    assert validate_service_identity(SERVER_IDENTITY) == SERVER_IDENTITY
    with pytest.raises(InvalidDeviceIdError):
        validate_device_id(SERVER_IDENTITY)
    # ...and conversely no device id is a service identity.
    with pytest.raises(InvalidDeviceIdError):
        validate_service_identity("edgeota-server")
    with pytest.raises(InvalidDeviceIdError):
        validate_service_identity("_")
    with pytest.raises(InvalidDeviceIdError):
        validate_service_identity("_Server")


def test_generate_refuses_bad_id() -> None:
    with pytest.raises(InvalidDeviceIdError):
        DeviceIdentity.generate("../etc")


# --- public identity -------------------------------------------------------


def test_public_identity_round_trips_through_json(suite: KemSuite) -> None:
    identity = DeviceIdentity.generate("pi-001", suite)
    public = identity.public(tls_public_key_pem=tls_public_pem())
    restored = DevicePublicIdentity.from_dict(json.loads(json.dumps(public.to_dict())))
    assert restored == public
    assert restored.kem_public_key.suite is suite


def test_public_identity_without_tls_key() -> None:
    public = DeviceIdentity.generate("pi-001").public()
    data = public.to_dict()
    assert "tls_public_key_pem" not in data
    assert DevicePublicIdentity.from_dict(data) == public


def test_public_identity_wraps_to_the_device() -> None:
    identity = DeviceIdentity.generate("pi-001")
    public = DevicePublicIdentity.from_dict(identity.public().to_dict())
    wrapped = wrap_content_key(bytes(32), public.kem_public_key, public.device_id)
    assert unwrap_content_key(wrapped, identity.kem_private_key, "pi-001") == bytes(32)


def _public_dict() -> dict[str, Any]:
    return DeviceIdentity.generate("pi-001").public(tls_public_key_pem=tls_public_pem()).to_dict()


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda d: d.pop("kem"), MalformedIdentityError, "'kem'"),
        (lambda d: d.pop("report_key"), MalformedIdentityError, "'report_key'"),
        (lambda d: d.update(format="v0"), MalformedIdentityError, "format"),
        (lambda d: d.update(extra=1), MalformedIdentityError, "unknown fields"),
        (lambda d: d.update(device_id="Pi-001"), InvalidDeviceIdError, "lowercase"),
        (lambda d: d.pop("device_id"), InvalidDeviceIdError, "device id"),
        (lambda d: d["report_key"].update(scheme="rsa"), MalformedIdentityError, "scheme"),
        (lambda d: d["report_key"].update(public="%%%"), MalformedIdentityError, "base64"),
        (
            lambda d: d["report_key"].update(public=base64.b64encode(b"x" * 31).decode()),
            MalformedKeyError,
            "32",
        ),
        (lambda d: d["kem"].update(suite="rsa"), UnsupportedSuiteError, "suite"),
        (lambda d: d["kem"].update(x25519="AAAA"), MalformedKeyError, "x25519"),
        (lambda d: d.update(tls_public_key_pem=5), MalformedIdentityError, "text"),
        (lambda d: d.update(tls_public_key_pem="nope"), MalformedKeyError, "PEM"),
    ],
)
def test_public_identity_from_dict_refuses(
    mutate: Callable[[dict[str, Any]], object], error: type[Exception], match: str
) -> None:
    data = _public_dict()
    mutate(data)
    with pytest.raises(error, match=match):
        DevicePublicIdentity.from_dict(data)


def test_public_identity_refuses_non_p256_tls_key() -> None:
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = ed.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(MalformedKeyError, match="P-256"):
        DeviceIdentity.generate("pi-001").public(tls_public_key_pem=pem)


def test_public_identity_from_non_object() -> None:
    with pytest.raises(MalformedIdentityError):
        DevicePublicIdentity.from_dict([])


# --- signed reports --------------------------------------------------------


def test_report_signature_verifies() -> None:
    identity = DeviceIdentity.generate("pi-001")
    payload = b'{"state": "committed", "release": 7}'
    signature = identity.sign_report(payload)
    assert len(signature) == 64
    verify_report(identity.public(), payload, signature)


def test_flipped_byte_in_report_or_signature_fails() -> None:
    identity = DeviceIdentity.generate("pi-001")
    payload = b'{"state": "committed", "release": 7}'
    signature = identity.sign_report(payload)
    for i in (0, len(payload) // 2, len(payload) - 1):
        tampered = bytearray(payload)
        tampered[i] ^= 0x01
        with pytest.raises(ReportSignatureError):
            verify_report(identity.public(), bytes(tampered), signature)
    for i in (0, 31, 63):
        bad = bytearray(signature)
        bad[i] ^= 0x01
        with pytest.raises(ReportSignatureError):
            verify_report(identity.public(), payload, bytes(bad))
    with pytest.raises(ReportSignatureError, match="64 bytes"):
        verify_report(identity.public(), payload, signature[:-1])


def test_report_of_device_a_does_not_verify_as_device_b() -> None:
    a = DeviceIdentity.generate("dev-a")
    b = DeviceIdentity.generate("dev-b")
    payload = b'{"state": "failed"}'
    with pytest.raises(ReportSignatureError, match="dev-b"):
        verify_report(b.public(), payload, a.sign_report(payload))


def test_report_is_bound_to_the_device_id() -> None:
    """Even with the same key (a cloned SD card), a report names exactly one device."""
    a = DeviceIdentity.generate("dev-a")
    clone = replace(a.public(), device_id="dev-b")
    payload = b'{"state": "failed"}'
    with pytest.raises(ReportSignatureError):
        verify_report(clone, payload, a.sign_report(payload))


def test_report_signature_is_not_a_plain_signature_over_the_payload() -> None:
    """Domain separation: the key's signatures cannot be reused outside reports."""
    identity = DeviceIdentity.generate("dev-a")
    payload = b"anything"
    raw_key = ed25519.Ed25519PrivateKey.from_private_bytes(identity.report_private_key)
    with pytest.raises(ReportSignatureError):
        verify_report(identity.public(), payload, raw_key.sign(payload))


# --- files -----------------------------------------------------------------


def test_save_and_load(tmp_path: Path, permissive_umask: None, suite: KemSuite) -> None:
    identity = DeviceIdentity.generate("pi-001", suite)
    folder = tmp_path / "device"
    identity.save(folder)
    assert mode_of(folder) == 0o700
    assert mode_of(folder / KEM_KEY_FILE) == 0o600
    assert mode_of(folder / REPORT_KEY_FILE) == 0o600
    assert mode_of(folder / IDENTITY_FILE) == 0o644
    assert (folder / REPORT_KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = DeviceIdentity.load(folder)
    assert loaded == identity
    stored = json.loads((folder / IDENTITY_FILE).read_text())
    assert DevicePublicIdentity.from_dict(stored) == identity.public()
    payload = b"report"
    verify_report(identity.public(), payload, loaded.sign_report(payload))


@pytest.mark.parametrize("name", [KEM_KEY_FILE, REPORT_KEY_FILE])
def test_load_refuses_readable_private_files(tmp_path: Path, name: str) -> None:
    DeviceIdentity.generate("pi-001").save(tmp_path)
    (tmp_path / name).chmod(0o644)
    with pytest.raises(InsecureKeyFileError):
        DeviceIdentity.load(tmp_path)


def test_load_refuses_mixed_folder(tmp_path: Path) -> None:
    DeviceIdentity.generate("pi-001").save(tmp_path / "a")
    DeviceIdentity.generate("pi-001").save(tmp_path / "b")
    (tmp_path / "a" / IDENTITY_FILE).write_bytes((tmp_path / "b" / IDENTITY_FILE).read_bytes())
    with pytest.raises(MalformedIdentityError, match="does not match"):
        DeviceIdentity.load(tmp_path / "a")


def test_load_refuses_corrupt_files(tmp_path: Path) -> None:
    DeviceIdentity.generate("pi-001").save(tmp_path)
    (tmp_path / IDENTITY_FILE).write_text("{")
    with pytest.raises(MalformedIdentityError, match="JSON"):
        DeviceIdentity.load(tmp_path)


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DeviceIdentity.load(tmp_path / "nothing")


# --- no secrets in text ----------------------------------------------------


def test_repr_and_str_show_no_secret(suite: KemSuite) -> None:
    identity = DeviceIdentity.generate("pi-001", suite)
    secrets = [
        identity.report_private_key.hex(),
        base64.b64encode(identity.report_private_key).decode(),
        base64.b64encode(identity.kem_private_key.x25519).decode(),
        identity.kem_private_key.x25519.hex(),
        repr(identity.report_private_key),
        repr(identity.kem_private_key.x25519),
    ]
    if suite is KemSuite.MLKEM768_X25519:
        secrets.append(base64.b64encode(identity.kem_private_key.mlkem768_seed).decode())
        secrets.append(identity.kem_private_key.mlkem768_seed.hex())
    texts = [repr(identity), str(identity), f"{identity}", repr([identity]), repr({"i": identity})]
    for text in texts:
        assert "pi-001" in text
        for secret in secrets:
            assert secret not in text
