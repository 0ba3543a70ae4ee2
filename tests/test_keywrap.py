"""HPKE key wrap: both KEM suites, and keys that must not open elsewhere."""

from __future__ import annotations

import os

import pytest

from edgeota.protocol.errors import KeyUnwrapError, MalformedKeyError, UnsupportedSuiteError
from edgeota.protocol.keywrap import (
    KemPrivateKey,
    KemPublicKey,
    KemSuite,
    unwrap_content_key,
    wrap_content_key,
)


@pytest.fixture(params=list(KemSuite), ids=lambda s: s.value)
def suite(request: pytest.FixtureRequest) -> KemSuite:
    return request.param


def test_round_trip(suite: KemSuite) -> None:
    key = KemPrivateKey.generate(suite)
    content_key = os.urandom(32)
    wrapped = wrap_content_key(content_key, key.public_key(), "dev-a")
    assert unwrap_content_key(wrapped, key, "dev-a") == content_key


def test_serialised_keys_round_trip(suite: KemSuite) -> None:
    key = KemPrivateKey.generate(suite)
    restored = KemPrivateKey.from_dict(key.to_dict())
    public = KemPublicKey.from_dict(key.public_key().to_dict())
    wrapped = wrap_content_key(bytes(32), public, "dev-a")
    assert unwrap_content_key(wrapped, restored, "dev-a") == bytes(32)


def test_key_wrapped_for_device_a_does_not_open_for_device_b(suite: KemSuite) -> None:
    device_a = KemPrivateKey.generate(suite)
    device_b = KemPrivateKey.generate(suite)
    wrapped = wrap_content_key(os.urandom(32), device_a.public_key(), "dev-a")
    with pytest.raises(KeyUnwrapError, match="not wrapped for device 'dev-b'"):
        unwrap_content_key(wrapped, device_b, "dev-b")


def test_wrap_is_bound_to_the_recipient_id(suite: KemSuite) -> None:
    # Even the right private key refuses a wrap made out to another device id:
    # a director target copied between devices that share a key pair fails.
    key = KemPrivateKey.generate(suite)
    wrapped = wrap_content_key(os.urandom(32), key.public_key(), "dev-a")
    with pytest.raises(KeyUnwrapError):
        unwrap_content_key(wrapped, key, "dev-b")


def test_suite_mismatch_is_named() -> None:
    classic = KemPrivateKey.generate(KemSuite.X25519)
    hybrid = KemPrivateKey.generate(KemSuite.MLKEM768_X25519)
    wrapped = wrap_content_key(os.urandom(32), hybrid.public_key(), "dev-a")
    with pytest.raises(KeyUnwrapError, match="mlkem768-x25519 but this device's key is x25519"):
        unwrap_content_key(wrapped, classic, "dev-a")


def test_tampered_wrap_is_refused(suite: KemSuite) -> None:
    key = KemPrivateKey.generate(suite)
    wrapped = bytearray(wrap_content_key(os.urandom(32), key.public_key(), "dev-a"))
    wrapped[-1] ^= 1
    with pytest.raises(KeyUnwrapError):
        unwrap_content_key(bytes(wrapped), key, "dev-a")


def test_hybrid_wrap_carries_the_ml_kem_ciphertext() -> None:
    classic = wrap_content_key(bytes(32), KemPrivateKey.generate().public_key(), "d")
    hybrid_key = KemPrivateKey.generate(KemSuite.MLKEM768_X25519)
    hybrid = wrap_content_key(bytes(32), hybrid_key.public_key(), "d")
    assert len(classic) == 6 + 32 + 32 + 16
    assert len(hybrid) > len(classic) + 1000  # ML-KEM-768 ciphertext is 1088 bytes


@pytest.mark.parametrize(
    ("wrapped", "error"),
    [
        (b"", MalformedKeyError),
        (b"XXXX\x01\x01" + bytes(80), MalformedKeyError),
        (b"EOTW\x02\x01" + bytes(80), UnsupportedSuiteError),
        (b"EOTW\x01\x07" + bytes(80), UnsupportedSuiteError),
        (b"EOTW\x01\x01" + bytes(5000), MalformedKeyError),
    ],
)
def test_malformed_wraps(wrapped: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        unwrap_content_key(wrapped, KemPrivateKey.generate(), "dev-a")


def test_public_key_parsing_refuses_bad_material() -> None:
    with pytest.raises(MalformedKeyError):
        KemPublicKey.from_dict({"suite": "x25519", "x25519": "AAAA"})
    with pytest.raises(UnsupportedSuiteError, match="known: x25519, mlkem768-x25519"):
        KemPublicKey.from_dict({"suite": "rsa", "x25519": ""})


def test_private_key_repr_hides_the_secret() -> None:
    key = KemPrivateKey.generate()
    assert key.to_dict()["x25519"] not in repr(key)
    assert "secret" in repr(key)


def test_content_key_size_is_enforced() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        wrap_content_key(b"short", KemPrivateKey.generate().public_key(), "d")
