"""Device identity: the keys a device gets at enrolment and the public part the server keeps.

A device holds three private keys (DESIGN "Trust model"):

* an HPKE key pair (:class:`~edgeota.protocol.keywrap.KemPrivateKey`) that
  release content keys are wrapped to, so only this device can decrypt a
  bundle deployed to it;
* an Ed25519 key that signs its status reports, so the server can tell a
  report from the device apart from one forged by anything else on the broker;
* an ECDSA P-256 TLS key whose certificate the fleet CA issues with CN = device
  id, so the broker can tie an MQTT connection to ``devices/{id}/...``. The TLS
  key and certificates are written by ``edgeota.server.fleet_ca`` into the same
  folder under the names defined here.

Only ``cryptography`` is used (not securesystemslib), because this module is
part of the wire contract the base install ships.

Device ids are deliberately narrow (``[a-z0-9-]{1,64}``): they appear in MQTT
topics, file names, certificate CNs and repository paths, and none of ``/``,
``+``, ``#``, ``.``, ``_``, upper case, white space or non-ASCII can reach any
of those through them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from edgeota.protocol.encoding import b64decode_field, b64encode
from edgeota.protocol.errors import MalformedKeyError, ProtocolError
from edgeota.protocol.files import (
    atomic_write,
    make_private_dir,
    read_private_file,
    write_private_file,
)
from edgeota.protocol.keywrap import KemPrivateKey, KemPublicKey, KemSuite

__all__ = [
    "CA_CERT_FILE",
    "DEVICE_ID_PATTERN",
    "IDENTITY_FILE",
    "KEM_KEY_FILE",
    "REPORT_KEY_FILE",
    "REPORT_SIGNATURE_SIZE",
    "SERVER_IDENTITY",
    "SERVICE_IDENTITY_PATTERN",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "DeviceIdentity",
    "DevicePublicIdentity",
    "InvalidDeviceIdError",
    "MalformedIdentityError",
    "ReportSignatureError",
    "validate_device_id",
    "validate_service_identity",
    "verify_report",
]

DEVICE_ID_PATTERN = r"[a-z0-9-]{1,64}"
_DEVICE_ID_RULE = "1 to 64 characters, each a lowercase ASCII letter, a digit or '-'"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)

# Broker and certificate identities of edgeota's own services start with "_",
# a character outside the device alphabet. The broker ACL grants a client
# named X the topics ``devices/X/...`` and grants the server identity every
# device's topics, and both names come from the certificate CN; if the
# server's name were a valid device id, enrolling a device under that name
# would hand the device the server's access. Keeping the two alphabets
# disjoint makes that impossible by construction rather than by a deny-list.
SERVICE_IDENTITY_PATTERN = r"_[a-z0-9-]{1,63}"
_SERVICE_IDENTITY_RE = re.compile(SERVICE_IDENTITY_PATTERN)
SERVER_IDENTITY = "_edgeota-server"

# File names inside a device's identity folder (``device enroll --out DIR``).
KEM_KEY_FILE = "kem.key.json"  # 0600, KemPrivateKey.to_dict()
REPORT_KEY_FILE = "report.key.pem"  # 0600, Ed25519 PKCS8 PEM
IDENTITY_FILE = "identity.json"  # 0644, DevicePublicIdentity.to_dict()
TLS_KEY_FILE = "tls.key.pem"  # 0600, written by edgeota.server.fleet_ca
TLS_CERT_FILE = "tls.crt.pem"  # 0644, written by edgeota.server.fleet_ca
CA_CERT_FILE = "ca.crt.pem"  # 0644, the fleet CA certificate

REPORT_SIGNATURE_SIZE = 64
_ED25519_KEY_SIZE = 32
_IDENTITY_FORMAT = "edgeota-device-identity/v1"
_REPORT_KEY_SCHEME = "ed25519"
# Reports are signed over a context naming the protocol, the purpose and the
# device, so a report key signature can never be replayed as anything else or
# under another device's name.
_REPORT_CONTEXT = b"edgeota/v1 device-report\x00"
_MAX_KEY_FILE_SIZE = 16 * 1024  # bytes; the hybrid KEM key JSON is well under 1 KiB
_MAX_IDENTITY_FILE_SIZE = 64 * 1024  # bytes


class InvalidDeviceIdError(ProtocolError, ValueError):
    """A device id (or service identity) outside its allowed alphabet or length."""


class MalformedIdentityError(ProtocolError):
    """Identity JSON that does not match the schema, or an identity folder whose parts disagree."""


class ReportSignatureError(ProtocolError):
    """A report signature that does not verify with the claimed device's report key."""


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid device id, else raise ``InvalidDeviceIdError``.

    ``re.fullmatch`` is used on purpose: ``re.match(...$)`` would accept a
    trailing newline, which would then end up in topics and log lines.
    """
    if not isinstance(device_id, str) or _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise InvalidDeviceIdError(
            f"invalid device id {_short_repr(device_id)}: a device id must be {_DEVICE_ID_RULE} "
            f"(pattern {DEVICE_ID_PATTERN})"
        )
    return device_id


def validate_service_identity(name: str) -> str:
    """Return ``name`` if it is a valid service identity (``_`` + device alphabet), else raise.

    See ``SERVER_IDENTITY`` for why service names can never be device ids.
    """
    if not isinstance(name, str) or _SERVICE_IDENTITY_RE.fullmatch(name) is None:
        raise InvalidDeviceIdError(
            f"invalid service identity {_short_repr(name)}: it must be '_' followed by "
            f"1 to 63 lowercase ASCII letters, digits or '-' (pattern {SERVICE_IDENTITY_PATTERN})"
        )
    return name



def _b64(data: bytes) -> str:
    return b64encode(data)


def _unb64(value: object, field: str) -> bytes:
    return b64decode_field(value, field, MalformedIdentityError)

def _report_public_key(raw: bytes) -> ed25519.Ed25519PublicKey:
    if len(raw) != _ED25519_KEY_SIZE:
        raise MalformedKeyError(
            f"report public key must be {_ED25519_KEY_SIZE} raw Ed25519 bytes, got {len(raw)}"
        )
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise MalformedKeyError(f"invalid Ed25519 report public key: {e}") from e


def _load_tls_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as e:
        raise MalformedKeyError("TLS public key is not a PEM SubjectPublicKeyInfo") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MalformedKeyError("TLS public key must be an ECDSA P-256 key")
    return key


def _signed_report_bytes(device_id: str, payload: bytes) -> bytes:
    return _REPORT_CONTEXT + device_id.encode("ascii") + b"\x00" + payload


@dataclass(frozen=True)
class DevicePublicIdentity:
    """What the server stores about an enrolled device: its id and public keys.

    ``report_public_key`` is the raw 32-byte Ed25519 public key.
    ``tls_public_key_pem`` is the SubjectPublicKeyInfo PEM of the device's TLS
    key, when the enrolment issued a certificate.
    """

    device_id: str
    kem_public_key: KemPublicKey
    report_public_key: bytes
    tls_public_key_pem: str | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        _report_public_key(self.report_public_key)
        if self.tls_public_key_pem is not None:
            _load_tls_public_key(self.tls_public_key_pem)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": _IDENTITY_FORMAT,
            "device_id": self.device_id,
            "kem": self.kem_public_key.to_dict(),
            "report_key": {"scheme": _REPORT_KEY_SCHEME, "public": _b64(self.report_public_key)},
        }
        if self.tls_public_key_pem is not None:
            data["tls_public_key_pem"] = self.tls_public_key_pem
        return data

    @classmethod
    def from_dict(cls, data: object) -> DevicePublicIdentity:
        """Parse and validate the output of :meth:`to_dict`.

        Raises:
            MalformedIdentityError: wrong structure, format or unknown fields.
            InvalidDeviceIdError: the device id breaks the device id rule.
            MalformedKeyError, UnsupportedSuiteError: a key that does not parse.
        """
        if not isinstance(data, dict):
            raise MalformedIdentityError("device identity must be a JSON object")
        known = {"format", "device_id", "kem", "report_key", "tls_public_key_pem"}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise MalformedIdentityError(f"device identity has unknown fields: {unknown}")
        if data.get("format") != _IDENTITY_FORMAT:
            raise MalformedIdentityError(
                f"device identity format is {_short_repr(data.get('format'))}, "
                f"expected {_IDENTITY_FORMAT!r}"
            )
        kem = data.get("kem")
        if not isinstance(kem, dict):
            raise MalformedIdentityError("device identity field 'kem' must be an object")
        report = data.get("report_key")
        if not isinstance(report, dict):
            raise MalformedIdentityError("device identity field 'report_key' must be an object")
        if report.get("scheme") != _REPORT_KEY_SCHEME:
            raise MalformedIdentityError(
                f"report key scheme is {_short_repr(report.get('scheme'))}, "
                f"expected {_REPORT_KEY_SCHEME!r}"
            )
        tls = data.get("tls_public_key_pem")
        if tls is not None and not isinstance(tls, str):
            raise MalformedIdentityError("device identity field 'tls_public_key_pem' must be text")
        return cls(
            device_id=validate_device_id(data.get("device_id")),  # type: ignore[arg-type]
            kem_public_key=KemPublicKey.from_dict(kem),
            report_public_key=_unb64(report.get("public"), "report_key.public"),
            tls_public_key_pem=tls,
        )


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's private identity: its id, key-wrap private key and report signing key.

    Lives only on the device (or, for the moment of enrolment, in the folder
    ``device enroll --out`` writes). ``repr`` never shows key material.
    ``report_private_key`` is the raw 32-byte Ed25519 private key.
    """

    device_id: str
    kem_private_key: KemPrivateKey
    report_private_key: bytes

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if len(self.report_private_key) != _ED25519_KEY_SIZE:
            raise MalformedKeyError(
                f"report private key must be {_ED25519_KEY_SIZE} raw Ed25519 bytes, "
                f"got {len(self.report_private_key)}"
            )

    def __repr__(self) -> str:  # never print key material by accident
        return (
            f"DeviceIdentity(device_id={self.device_id!r}, "
            f"kem_suite={self.kem_private_key.suite.value}, <secret>)"
        )

    __str__ = __repr__

    @classmethod
    def generate(cls, device_id: str, kem_suite: KemSuite = KemSuite.X25519) -> DeviceIdentity:
        """Create fresh keys for ``device_id`` (validated first)."""
        validate_device_id(device_id)
        report = ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(device_id, KemPrivateKey.generate(kem_suite), report)

    def _report_key(self) -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.from_private_bytes(self.report_private_key)

    def public(self, *, tls_public_key_pem: str | None = None) -> DevicePublicIdentity:
        """The part the server stores; pass the TLS public key once a certificate is issued."""
        report_public = self._report_key().public_key().public_bytes_raw()
        return DevicePublicIdentity(
            device_id=self.device_id,
            kem_public_key=self.kem_private_key.public_key(),
            report_public_key=report_public,
            tls_public_key_pem=tls_public_key_pem,
        )

    def sign_report(self, payload: bytes) -> bytes:
        """Sign a status report; the signature is bound to this device's id (64 bytes)."""
        return self._report_key().sign(_signed_report_bytes(self.device_id, payload))

    def save(self, folder: Path) -> None:
        """Write the identity into ``folder`` (created 0700 if missing).

        Private keys go to ``kem.key.json`` and ``report.key.pem`` (0600); the
        public part goes to ``identity.json`` (0644) last, so a folder with an
        ``identity.json`` holds complete keys even after a crash mid-save.
        """
        folder = make_private_dir(Path(folder))
        kem_json = json.dumps(self.kem_private_key.to_dict(), indent=2, sort_keys=True) + "\n"
        write_private_file(folder / KEM_KEY_FILE, kem_json.encode("ascii"))
        report_pem = self._report_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(folder / REPORT_KEY_FILE, report_pem)
        public_json = json.dumps(self.public().to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(folder / IDENTITY_FILE, public_json.encode("ascii"))

    @classmethod
    def load(cls, folder: Path) -> DeviceIdentity:
        """Read an identity written by :meth:`save` and check its parts agree.

        Raises:
            OSError: a file is missing or unreadable.
            InsecureKeyFileError: a private key file is accessible to group or others.
            MalformedIdentityError: a file does not parse, or ``identity.json``
                names another device or other keys than the private key files.
            MalformedKeyError, UnsupportedSuiteError: key material that does not parse.
        """
        folder = Path(folder)
        kem_raw = read_private_file(folder / KEM_KEY_FILE, _MAX_KEY_FILE_SIZE)
        try:
            kem_dict = json.loads(kem_raw)
        except ValueError as e:
            raise MalformedIdentityError(f"{folder / KEM_KEY_FILE} is not valid JSON") from e
        if not isinstance(kem_dict, dict):
            raise MalformedIdentityError(f"{folder / KEM_KEY_FILE} must hold a JSON object")
        kem = KemPrivateKey.from_dict(kem_dict)

        report_pem = read_private_file(folder / REPORT_KEY_FILE, _MAX_KEY_FILE_SIZE)
        try:
            report_key = serialization.load_pem_private_key(report_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise MalformedKeyError(
                f"{folder / REPORT_KEY_FILE} is not an unencrypted PKCS8 PEM private key"
            ) from e
        if not isinstance(report_key, ed25519.Ed25519PrivateKey):
            raise MalformedKeyError(f"{folder / REPORT_KEY_FILE} is not an Ed25519 key")

        public = _read_public_identity(folder / IDENTITY_FILE)
        identity = cls(public.device_id, kem, report_key.private_bytes_raw())
        derived = identity.public(tls_public_key_pem=public.tls_public_key_pem)
        if derived != public:
            raise MalformedIdentityError(
                f"{folder / IDENTITY_FILE} does not match the private keys in {folder}"
            )
        return identity


def _read_public_identity(path: Path) -> DevicePublicIdentity:
    with path.open("rb") as f:
        raw = f.read(_MAX_IDENTITY_FILE_SIZE + 1)
    if len(raw) > _MAX_IDENTITY_FILE_SIZE:
        raise MalformedIdentityError(f"{path} is larger than {_MAX_IDENTITY_FILE_SIZE} bytes")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise MalformedIdentityError(f"{path} is not valid JSON") from e
    return DevicePublicIdentity.from_dict(data)


def verify_report(public: DevicePublicIdentity, payload: bytes, signature: bytes) -> None:
    """Check that ``signature`` is ``public.device_id``'s signature over ``payload``.

    Raises ``ReportSignatureError`` otherwise, including for a valid signature
    by another device: the signed bytes include the device id.
    """
    if len(signature) != REPORT_SIGNATURE_SIZE:
        raise ReportSignatureError(
            f"report signature for device {public.device_id!r} must be "
            f"{REPORT_SIGNATURE_SIZE} bytes, got {len(signature)}"
        )
    key = _report_public_key(public.report_public_key)
    try:
        key.verify(signature, _signed_report_bytes(public.device_id, payload))
    except InvalidSignature as e:
        raise ReportSignatureError(
            f"report signature does not verify with device {public.device_id!r}'s report key"
        ) from e
