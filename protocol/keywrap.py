"""Per-recipient wrapping of a bundle's content key with HPKE (RFC 9180).

A release is sealed once with a random content key; that key then travels to
each device wrapped to the device's own KEM public key, so the weights are
readable by exactly the devices a deployment names. The wrap binds the
recipient id into the HPKE ``info`` so a wrapped key copied to another device's
director target fails to open even if both devices somehow shared a key pair.

Two suites:

* ``x25519`` -- DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305:
  fast everywhere, the default.
* ``mlkem768-x25519`` -- the ML-KEM-768 + X25519 hybrid KEM, for post-quantum
  protection of weights recorded today and attacked later.

Wire form of a wrapped key (all integers big-endian)::

    magic "EOTW" | version u8 (=1) | suite id u8 | HPKE enc || ciphertext
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# The x25519 key classes by name: inside KemPublicKey and KemPrivateKey the
# field `x25519` (the raw bytes) would shadow a module of that name in annotations.
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from edgeota.protocol.encoding import b64decode_field, b64encode
from edgeota.protocol.errors import KeyUnwrapError, MalformedKeyError, UnsupportedSuiteError

__all__ = [
    "CONTENT_KEY_SIZE",
    "KemPrivateKey",
    "KemPublicKey",
    "KemSuite",
    "unwrap_content_key",
    "wrap_content_key",
]

CONTENT_KEY_SIZE = 32
_WRAP_MAGIC = b"EOTW"
_WRAP_VERSION = 1
_INFO_PREFIX = b"edgeota/v1 content-key for "
# X25519 enc (32) + key (32) + tag (16) is 80 bytes; the hybrid adds 1088 for
# the ML-KEM ciphertext. Anything beyond this bound is not a wrapped key.
_MAX_WRAPPED_SIZE = 4096


class KemSuite(enum.Enum):
    """The KEM suites a device key pair and a wrapped key can use."""

    X25519 = "x25519"
    MLKEM768_X25519 = "mlkem768-x25519"

    @property
    def wire_id(self) -> int:
        return _SUITE_IDS[self]

    @classmethod
    def from_wire_id(cls, wire_id: int) -> KemSuite:
        for suite, known in _SUITE_IDS.items():
            if known == wire_id:
                return suite
        raise UnsupportedSuiteError(f"unknown key-wrap suite id {wire_id}")

    def hpke_suite(self) -> hpke.Suite:
        kem = hpke.KEM.X25519 if self is KemSuite.X25519 else hpke.KEM.MLKEM768_X25519
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


_SUITE_IDS = {KemSuite.X25519: 1, KemSuite.MLKEM768_X25519: 2}



def _b64(data: bytes) -> str:
    return b64encode(data)


def _unb64(value: object, field: str) -> bytes:
    return b64decode_field(value, field, MalformedKeyError)

@dataclass(frozen=True)
class KemPublicKey:
    """A device's key-wrap public key, as the server stores and uses it."""

    suite: KemSuite
    x25519: bytes
    mlkem768: bytes = b""

    def to_dict(self) -> dict[str, str]:
        data = {"suite": self.suite.value, "x25519": _b64(self.x25519)}
        if self.suite is KemSuite.MLKEM768_X25519:
            data["mlkem768"] = _b64(self.mlkem768)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KemPublicKey:
        suite = _parse_suite(data.get("suite"))
        key = cls(
            suite=suite,
            x25519=_unb64(data.get("x25519"), "x25519"),
            mlkem768=_unb64(data.get("mlkem768", ""), "mlkem768"),
        )
        key._crypto_key()  # refuse a malformed key now, not at wrap time
        return key

    def _crypto_key(self) -> X25519PublicKey | hpke.MLKEM768X25519PublicKey:
        try:
            classic = X25519PublicKey.from_public_bytes(self.x25519)
            if self.suite is KemSuite.X25519:
                return classic
            pq = mlkem.MLKEM768PublicKey.from_public_bytes(self.mlkem768)
        except ValueError as e:
            raise MalformedKeyError(f"invalid {self.suite.value} public key: {e}") from e
        return hpke.MLKEM768X25519PublicKey(pq, classic)


@dataclass(frozen=True)
class KemPrivateKey:
    """A device's key-wrap private key. Lives only on the device (file 0600)."""

    suite: KemSuite
    x25519: bytes
    mlkem768_seed: bytes = b""

    @classmethod
    def generate(cls, suite: KemSuite = KemSuite.X25519) -> KemPrivateKey:
        classic = X25519PrivateKey.generate().private_bytes_raw()
        if suite is KemSuite.X25519:
            return cls(suite, classic)
        seed = mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
        return cls(suite, classic, seed)

    def public_key(self) -> KemPublicKey:
        classic = X25519PrivateKey.from_private_bytes(self.x25519).public_key()
        classic_raw = classic.public_bytes_raw()
        if self.suite is KemSuite.X25519:
            return KemPublicKey(self.suite, classic_raw)
        pq = mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem768_seed).public_key()
        return KemPublicKey(self.suite, classic_raw, pq.public_bytes_raw())

    def to_dict(self) -> dict[str, str]:
        data = {"suite": self.suite.value, "x25519": _b64(self.x25519)}
        if self.suite is KemSuite.MLKEM768_X25519:
            data["mlkem768_seed"] = _b64(self.mlkem768_seed)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KemPrivateKey:
        key = cls(
            suite=_parse_suite(data.get("suite")),
            x25519=_unb64(data.get("x25519"), "x25519"),
            mlkem768_seed=_unb64(data.get("mlkem768_seed", ""), "mlkem768_seed"),
        )
        key._crypto_key()
        return key

    def __repr__(self) -> str:  # never print key material by accident
        return f"KemPrivateKey(suite={self.suite.value}, <secret>)"

    def _crypto_key(self) -> X25519PrivateKey | hpke.MLKEM768X25519PrivateKey:
        try:
            classic = X25519PrivateKey.from_private_bytes(self.x25519)
            if self.suite is KemSuite.X25519:
                return classic
            pq = mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem768_seed)
        except ValueError as e:
            raise MalformedKeyError(f"invalid {self.suite.value} private key: {e}") from e
        return hpke.MLKEM768X25519PrivateKey(pq, classic)


def _parse_suite(value: object) -> KemSuite:
    try:
        return KemSuite(value)
    except ValueError as e:
        known = ", ".join(s.value for s in KemSuite)
        raise UnsupportedSuiteError(f"unknown key-wrap suite {value!r} (known: {known})") from e


def _info(recipient_id: str) -> bytes:
    return _INFO_PREFIX + recipient_id.encode("utf-8")


def wrap_content_key(content_key: bytes, recipient: KemPublicKey, recipient_id: str) -> bytes:
    """Wrap ``content_key`` so only ``recipient_id``, holding the matching private key, opens it."""
    if len(content_key) != CONTENT_KEY_SIZE:
        raise ValueError(f"content key must be {CONTENT_KEY_SIZE} bytes, got {len(content_key)}")
    sealed = recipient.suite.hpke_suite().encrypt(
        content_key, recipient._crypto_key(), info=_info(recipient_id)
    )
    return _WRAP_MAGIC + bytes([_WRAP_VERSION, recipient.suite.wire_id]) + sealed


def unwrap_content_key(wrapped: bytes, private_key: KemPrivateKey, recipient_id: str) -> bytes:
    """Open a wrapped content key; raise ``KeyUnwrapError`` if it is not for this recipient."""
    if len(wrapped) > _MAX_WRAPPED_SIZE or len(wrapped) < len(_WRAP_MAGIC) + 2:
        raise MalformedKeyError(f"wrapped key has implausible size {len(wrapped)}")
    if wrapped[:4] != _WRAP_MAGIC:
        raise MalformedKeyError("wrapped key does not start with the EOTW magic")
    if wrapped[4] != _WRAP_VERSION:
        raise UnsupportedSuiteError(f"unsupported wrapped-key version {wrapped[4]}")
    suite = KemSuite.from_wire_id(wrapped[5])
    if suite is not private_key.suite:
        raise KeyUnwrapError(
            f"key was wrapped with suite {suite.value} but this device's key is "
            f"{private_key.suite.value}"
        )
    try:
        content_key = suite.hpke_suite().decrypt(
            wrapped[6:], private_key._crypto_key(), info=_info(recipient_id)
        )
    except Exception as e:
        raise KeyUnwrapError(
            f"content key is not wrapped for device {recipient_id!r} (HPKE open failed)"
        ) from e
    if len(content_key) != CONTENT_KEY_SIZE:
        raise KeyUnwrapError(f"unwrapped content key has wrong size {len(content_key)}")
    return content_key
