"""The fleet CA: the X.509 authority behind broker TLS.

The broker trusts exactly one CA. It issues:

* device client certificates with CN = device id (``clientAuth``; also a URI
  SAN ``urn:edgeota:device:{id}``), so the broker can map a connection to
  ``devices/{id}/...`` in its ACL;
* the broker's server certificate (``serverAuth``, SANs for its host names
  and addresses), which agents check against the CA they got at enrolment;
* client certificates for edgeota's own services (CN = ``SERVER_IDENTITY``),
  whose names can never be device ids (see ``edgeota.protocol.identity``).

The CA is ECDSA P-256 with ``path_len=0``: it signs leaves only, never another
CA, so a leaked device key cannot mint certificates. The TLS layer only
authenticates connections; what a device installs is decided by TUF
metadata, so this CA is not a signing root for updates.

Validity periods start one hour in the past: devices without a real-time
clock, and brokers on hosts with a slightly slow clock, would otherwise
reject a certificate issued a moment ago.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import (
    FileTooLargeError,
    InsecureKeyFileError,
    atomic_write,
    make_private_dir,
    read_bounded,
    read_private_file,
    write_private_file,
)
from edgeota.protocol.identity import (
    CA_CERT_FILE,
    SERVER_IDENTITY,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    validate_device_id,
    validate_service_identity,
)

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_CA_VALIDITY_DAYS",
    "DEFAULT_DEVICE_CERT_VALIDITY_DAYS",
    "DEFAULT_SERVER_CERT_VALIDITY_DAYS",
    "DEVICE_URI_PREFIX",
    "SERVICE_URI_PREFIX",
    "CertificateVerificationError",
    "FleetCA",
    "FleetCAError",
    "certificate_pem",
    "private_key_pem",
    "public_key_pem",
    "verify_issued",
    "write_device_tls",
]

CA_KEY_FILE = "ca.key.pem"
DEFAULT_CA_VALIDITY_DAYS = 3650
# Long on purpose: there is no certificate renewal protocol yet, and a device
# whose certificate expires drops off the broker for good. Devices are cut off
# by removing them from the broker ACL, not by expiry.
DEFAULT_DEVICE_CERT_VALIDITY_DAYS = 3650
DEFAULT_SERVER_CERT_VALIDITY_DAYS = 825
# Client certificates also name their holder in a URI SAN: brokers map the CN
# (Mosquitto ``use_identity_as_username``), while strict RFC 5280 validators
# (cryptography's ``ClientVerifier``, some cloud brokers) require a SAN.
DEVICE_URI_PREFIX = "urn:edgeota:device:"
SERVICE_URI_PREFIX = "urn:edgeota:service:"
_BACKDATE = dt.timedelta(hours=1)
_MAX_PEM_SIZE = 64 * 1024  # bytes
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


class FleetCAError(EdgeotaError):
    """The fleet CA cannot be created, loaded or used; the message says why."""


class CertificateVerificationError(FleetCAError):
    """A certificate that was not issued by the given CA, or is outside its validity period."""


def _utcnow(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


def _check_days(validity_days: int) -> dt.timedelta:
    if validity_days <= 0:
        raise ValueError(f"validity_days must be positive, got {validity_days}")
    return dt.timedelta(days=validity_days)


def _require_p256(public_key: object, what: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TypeError(f"{what} must be an ECDSA P-256 public key, got {type(public_key)}")
    if public_key.curve.name != ec.SECP256R1.name:
        raise ValueError(f"{what} must be on curve P-256, got {public_key.curve.name}")
    return public_key


def _identity_san(uri: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])


def _common_name(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _leaf_key_usage() -> x509.KeyUsage:
    # digitalSignature is what (EC)DHE-ECDSA handshakes need; nothing else.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of ``cert``, as written to ``*.crt.pem`` files."""
    return cert.public_bytes(serialization.Encoding.PEM)


def public_key_pem(cert: x509.Certificate) -> str:
    """SubjectPublicKeyInfo PEM of ``cert``'s key, as ``DevicePublicIdentity`` stores it."""
    return (
        cert.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM of ``key``; write it only with ``write_private_file``."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        raw = read_bounded(path, _MAX_PEM_SIZE, "certificate")
    except FileTooLargeError as e:
        raise FleetCAError(str(e)) from e
    except OSError as e:
        raise FleetCAError(f"cannot read certificate {path}: {e.strerror or e}") from e
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as e:
        raise FleetCAError(f"{path} is not a PEM certificate") from e


@dataclass(frozen=True)
class FleetCA:
    """A loaded fleet CA: its folder, certificate and private key (never shown by ``repr``)."""

    folder: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return (
            f"FleetCA(folder={str(self.folder)!r}, "
            f"subject={self.certificate.subject.rfc4514_string()!r}, <secret>)"
        )

    @classmethod
    def create(
        cls,
        folder: Path,
        common_name: str = "edgeota fleet CA",
        validity_days: int = DEFAULT_CA_VALIDITY_DAYS,
        *,
        now: dt.datetime | None = None,
    ) -> FleetCA:
        """Create a new CA in ``folder`` (0700 if created): ``ca.key.pem`` (0600), ``ca.crt.pem``.

        Refuses to replace an existing CA: every certificate it issued, and
        every agent that trusts it, would be orphaned.
        """
        folder = make_private_dir(Path(folder))
        for filename in (CA_KEY_FILE, CA_CERT_FILE):
            if (folder / filename).exists():
                raise FleetCAError(f"a fleet CA already exists in {folder} ({filename})")
        start = _utcnow(now)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        ski = x509.SubjectKeyIdentifier.from_public_key(public)
        name = _common_name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - _BACKDATE)
            .not_valid_after(start + _check_days(validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        # Key first: a folder holding a certificate but no key is the one
        # state that cannot be repaired.
        write_private_file(folder / CA_KEY_FILE, private_key_pem(key))
        atomic_write(folder / CA_CERT_FILE, certificate_pem(cert))
        return cls(folder=folder, certificate=cert, private_key=key)

    @classmethod
    def load(cls, folder: Path) -> FleetCA:
        """Load the CA in ``folder``; check the key file's mode and that key and certificate match.

        Raises:
            FleetCAError: missing or unsafe files, or parts that do not fit together.
        """
        folder = Path(folder)
        key_path = folder / CA_KEY_FILE
        try:
            key_pem = read_private_file(key_path, _MAX_PEM_SIZE)
        except FileNotFoundError as e:
            raise FleetCAError(f"no fleet CA in {folder}: {key_path} does not exist") from e
        except (InsecureKeyFileError, FileTooLargeError) as e:
            raise FleetCAError(f"refusing fleet CA key: {e}") from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise FleetCAError(f"{key_path} is not an unencrypted PKCS8 PEM private key") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FleetCAError(f"{key_path} is not an ECDSA key")
        cert = _load_certificate(folder / CA_CERT_FILE)
        if cert.public_key() != key.public_key():
            raise FleetCAError(f"{folder / CA_CERT_FILE} does not belong to the key {key_path}")
        if not _is_ca(cert):
            raise FleetCAError(f"{folder / CA_CERT_FILE} is not a CA certificate")
        return cls(folder=folder, certificate=cert, private_key=key)

    def certificate_pem(self) -> bytes:
        """The CA certificate as PEM, for agents and the broker to trust."""
        return certificate_pem(self.certificate)

    def _issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        validity_days: int,
        extended_usage: x509.ObjectIdentifier,
        now: dt.datetime | None,
        san: x509.SubjectAlternativeName | None = None,
    ) -> x509.Certificate:
        start = _utcnow(now)
        ca_end = self.certificate.not_valid_after_utc
        if ca_end <= start:
            raise FleetCAError(f"the fleet CA certificate expired on {ca_end:%Y-%m-%d}")
        # A leaf never outlives its CA: clients would reject it after that anyway.
        end = min(start + _check_days(validity_days), ca_end)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(start - _BACKDATE, self.certificate.not_valid_before_utc))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([extended_usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self.private_key, hashes.SHA256())

    def issue_device_certificate(
        self,
        device_id: str,
        public_key: ec.EllipticCurvePublicKey,
        validity_days: int = DEFAULT_DEVICE_CERT_VALIDITY_DAYS,
        *,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Issue a broker client certificate with CN = ``device_id`` for a P-256 key.

        Raises:
            InvalidDeviceIdError: ``device_id`` is not ``[a-z0-9-]{1,64}``.
            TypeError, ValueError: the key is not ECDSA P-256.
        """
        validate_device_id(device_id)
        key = _require_p256(public_key, "a device TLS key")
        return self._issue(
            _common_name(device_id),
            key,
            validity_days,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now,
            _identity_san(f"{DEVICE_URI_PREFIX}{device_id}"),
        )

    def issue_server_certificate(
        self,
        hostnames: list[str] | None = None,
        ips: list[str] | None = None,
        validity_days: int = DEFAULT_SERVER_CERT_VALIDITY_DAYS,
        *,
        now: dt.datetime | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Generate a key and issue the broker's (or HTTP server's) TLS certificate.

        ``hostnames`` default to ``["localhost"]`` and ``ips`` to
        ``["127.0.0.1", "::1"]``; clients match these SANs, not the CN.
        """
        names = ["localhost"] if hostnames is None else [h.lower() for h in hostnames]
        addresses = ["127.0.0.1", "::1"] if ips is None else list(ips)
        if not names and not addresses:
            raise ValueError("a server certificate needs at least one host name or IP address")
        general: list[x509.GeneralName] = []
        for name in names:
            if _HOSTNAME_RE.fullmatch(name) is None:
                raise ValueError(f"invalid host name {name!r} for a server certificate")
            general.append(x509.DNSName(name))
        for address in addresses:
            general.append(x509.IPAddress(ipaddress.ip_address(address)))
        key = ec.generate_private_key(ec.SECP256R1())
        cn = (names or addresses)[0][:64]
        cert = self._issue(
            _common_name(cn),
            key.public_key(),
            validity_days,
            ExtendedKeyUsageOID.SERVER_AUTH,
            now,
            x509.SubjectAlternativeName(general),
        )
        return key, cert

    def issue_service_client_certificate(
        self,
        name: str = SERVER_IDENTITY,
        validity_days: int = DEFAULT_SERVER_CERT_VALIDITY_DAYS,
        *,
        now: dt.datetime | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Generate a key and issue a broker client certificate for an edgeota service.

        ``name`` must be a service identity (``_`` + device alphabet), so the
        certificate can never pass for a device's, nor a device's for it.
        """
        validate_service_identity(name)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(
            _common_name(name),
            key.public_key(),
            validity_days,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now,
            _identity_san(f"{SERVICE_URI_PREFIX}{name}"),
        )
        return key, cert


def write_device_tls(
    folder: Path,
    device_id: str,
    ca: FleetCA,
    *,
    validity_days: int = DEFAULT_DEVICE_CERT_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Give a device its broker TLS identity in its identity ``folder``.

    Writes ``tls.key.pem`` (new ECDSA P-256 key, 0600), ``tls.crt.pem`` (issued
    by ``ca``, CN = ``device_id``) and ``ca.crt.pem`` (the CA to trust). Returns
    the certificate; ``public_key_pem(cert)`` belongs in the device's
    ``DevicePublicIdentity.tls_public_key_pem``.
    """
    validate_device_id(device_id)
    folder = make_private_dir(Path(folder))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_device_certificate(device_id, key.public_key(), validity_days, now=now)
    write_private_file(folder / TLS_KEY_FILE, private_key_pem(key))
    atomic_write(folder / TLS_CERT_FILE, certificate_pem(cert))
    atomic_write(folder / CA_CERT_FILE, ca.certificate_pem())
    return cert


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def verify_issued(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, now: dt.datetime | None = None
) -> None:
    """Check that ``ca_cert`` is a CA that signed ``cert`` and both are valid at ``now``.

    This is a direct-issuance check, not full path validation with usage
    policies (the broker's TLS stack does that); it is what tests and
    ``edgeota`` diagnostics need to tell "wrong CA" from "expired".

    Raises:
        CertificateVerificationError: with the reason.
    """
    at = _utcnow(now)
    if not _is_ca(ca_cert):
        raise CertificateVerificationError("the issuer certificate is not a CA")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise CertificateVerificationError(
            f"certificate {cert.subject.rfc4514_string()!r} was not issued by "
            f"{ca_cert.subject.rfc4514_string()!r}: {str(e) or type(e).__name__}"
        ) from e
    for which, c in (("certificate", cert), ("CA certificate", ca_cert)):
        if not c.not_valid_before_utc <= at <= c.not_valid_after_utc:
            raise CertificateVerificationError(
                f"{which} {c.subject.rfc4514_string()!r} is valid from "
                f"{c.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                f"{c.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {at:%Y-%m-%dT%H:%M:%SZ}"
            )
