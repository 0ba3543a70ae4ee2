"""Fleet CA: certificates that a real TLS stack and an RFC 5280 validator accept, and refuse."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from conftest import mode_of
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeota.protocol.files import write_private_file
from edgeota.protocol.identity import (
    SERVER_IDENTITY,
    DeviceIdentity,
    DevicePublicIdentity,
    InvalidDeviceIdError,
)
from edgeota.server.fleet_ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateVerificationError,
    FleetCA,
    FleetCAError,
    certificate_pem,
    private_key_pem,
    public_key_pem,
    verify_issued,
    write_device_tls,
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    return FleetCA.create(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    return FleetCA.create(tmp_path_factory.mktemp("other") / "ca", common_name="other CA")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


def client_verifier(ca: FleetCA) -> verification.ClientVerifier:
    return (
        verification.PolicyBuilder()
        .store(verification.Store([ca.certificate]))
        .time(dt.datetime.now(dt.UTC))
        .build_client_verifier()
    )


# --- the CA itself ---------------------------------------------------------


def test_create_writes_private_key_and_ca_certificate(
    tmp_path: Path, permissive_umask: None
) -> None:
    ca = FleetCA.create(tmp_path / "ca", validity_days=30)
    assert mode_of(tmp_path / "ca") == 0o700
    assert mode_of(tmp_path / "ca" / CA_KEY_FILE) == 0o600
    assert mode_of(tmp_path / "ca" / CA_CERT_FILE) == 0o644
    cert = ca.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edgeota fleet CA"
    assert cert.issuer == cert.subject
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ext(cert, x509.SubjectKeyIdentifier)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(cert)  # self-signed
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, hours=2)


def test_create_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    FleetCA.create(tmp_path)
    before = (tmp_path / CA_KEY_FILE).read_bytes()
    with pytest.raises(FleetCAError, match="already exists"):
        FleetCA.create(tmp_path)
    assert (tmp_path / CA_KEY_FILE).read_bytes() == before


def test_load_round_trip(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path)
    loaded = FleetCA.load(tmp_path)
    assert loaded.certificate == ca.certificate
    assert loaded.private_key.public_key() == ca.private_key.public_key()
    cert = loaded.issue_device_certificate("pi-1", new_key().public_key())
    verify_issued(cert, ca.certificate)


def test_load_refuses_readable_key(tmp_path: Path) -> None:
    FleetCA.create(tmp_path)
    (tmp_path / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(FleetCAError, match="0644"):
        FleetCA.load(tmp_path)


def test_load_refuses_mismatched_certificate(tmp_path: Path, other_ca: FleetCA) -> None:
    FleetCA.create(tmp_path)
    (tmp_path / CA_CERT_FILE).write_bytes(other_ca.certificate_pem())
    with pytest.raises(FleetCAError, match="does not belong"):
        FleetCA.load(tmp_path)


def test_load_refuses_missing_ca(tmp_path: Path) -> None:
    with pytest.raises(FleetCAError, match="no fleet CA"):
        FleetCA.load(tmp_path)


def test_load_refuses_non_ca_certificate(tmp_path: Path, ca: FleetCA) -> None:
    key = new_key()
    leaf = ca.issue_device_certificate("pi-1", key.public_key())
    write_private_file(tmp_path / CA_KEY_FILE, private_key_pem(key))
    (tmp_path / CA_CERT_FILE).write_bytes(certificate_pem(leaf))
    with pytest.raises(FleetCAError, match="not a CA"):
        FleetCA.load(tmp_path)


def test_repr_shows_no_private_key(ca: FleetCA) -> None:
    pem = private_key_pem(ca.private_key).decode()
    body = "".join(pem.splitlines()[1:-1])
    for text in (repr(ca), str(ca), repr([ca])):
        assert body[:40] not in text
        assert "PRIVATE" not in text
        assert "edgeota fleet CA" in text


# --- device certificates ---------------------------------------------------


def test_device_certificate(ca: FleetCA) -> None:
    cert = ca.issue_device_certificate("pi-001", new_key().public_key())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-001"
    assert len(cert.subject) == 1
    assert cert.issuer == ca.certificate.subject
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    assert ext(cert, x509.KeyUsage).value.digital_signature
    assert not ext(cert, x509.KeyUsage).value.key_cert_sign
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    assert cert.serial_number > 0
    verify_issued(cert, ca.certificate)
    verified = client_verifier(ca).verify(cert, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:edgeota:device:pi-001")]


def test_serials_are_random(ca: FleetCA) -> None:
    key = new_key().public_key()
    serials = {ca.issue_device_certificate("pi-1", key).serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


def test_certificate_from_another_ca_does_not_verify(ca: FleetCA, other_ca: FleetCA) -> None:
    foreign = other_ca.issue_device_certificate("pi-001", new_key().public_key())
    with pytest.raises(CertificateVerificationError, match="not issued by"):
        verify_issued(foreign, ca.certificate)
    with pytest.raises(verification.VerificationError):
        client_verifier(ca).verify(foreign, [])


def test_same_name_other_ca_with_forged_issuer_does_not_verify(tmp_path: Path, ca: FleetCA) -> None:
    """An attacker's CA that copies our CA's name: the signature check must catch it."""
    impostor = FleetCA.create(tmp_path, common_name="edgeota fleet CA")
    forged = impostor.issue_device_certificate("pi-001", new_key().public_key())
    assert forged.issuer == ca.certificate.subject
    with pytest.raises(CertificateVerificationError):
        verify_issued(forged, ca.certificate)


def test_verify_issued_checks_validity(ca: FleetCA) -> None:
    cert = ca.issue_device_certificate("pi-001", new_key().public_key(), validity_days=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with pytest.raises(CertificateVerificationError, match="valid from"):
        verify_issued(cert, ca.certificate, now=later)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with pytest.raises(CertificateVerificationError, match="valid from"):
        verify_issued(cert, ca.certificate, now=earlier)


def test_verify_issued_refuses_leaf_as_issuer(ca: FleetCA) -> None:
    leaf = ca.issue_device_certificate("pi-001", new_key().public_key())
    with pytest.raises(CertificateVerificationError, match="not a CA"):
        verify_issued(leaf, leaf)


def test_leaf_never_outlives_the_ca(ca: FleetCA) -> None:
    cert = ca.issue_device_certificate("pi-001", new_key().public_key(), validity_days=100_000)
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_expired_ca_refuses_to_issue(ca: FleetCA) -> None:
    after = ca.certificate.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(FleetCAError, match="expired"):
        ca.issue_device_certificate("pi-001", new_key().public_key(), now=after)


def test_certificate_is_backdated_for_slow_clocks(ca: FleetCA) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = ca.issue_device_certificate("pi-001", new_key().public_key(), now=now)
    assert cert.not_valid_before_utc <= now - dt.timedelta(minutes=30)


@pytest.mark.parametrize(
    "device_id",
    ["", "Pi-001", "pi_001", "a" * 65, "../x", "a/b", "pi\n", SERVER_IDENTITY, "p\u0456"],
)
def test_device_certificate_refuses_bad_ids(ca: FleetCA, device_id: str) -> None:
    with pytest.raises(InvalidDeviceIdError):
        ca.issue_device_certificate(device_id, new_key().public_key())


def test_device_certificate_refuses_other_key_types(ca: FleetCA) -> None:
    with pytest.raises(TypeError):
        ca.issue_device_certificate("pi-1", ed25519.Ed25519PrivateKey.generate().public_key())  # type: ignore[arg-type]
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        ca.issue_device_certificate("pi-1", p384)


# --- server and service certificates --------------------------------------


def test_server_certificate_defaults(ca: FleetCA) -> None:
    key, cert = ca.issue_server_certificate()
    assert cert.public_key() == key.public_key()
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = verification.PolicyBuilder().store(verification.Store([ca.certificate]))
    builder = builder.time(dt.datetime.now(dt.UTC))
    builder.build_server_verifier(verification.DNSName("localhost")).verify(cert, [])
    ip = verification.IPAddress(ipaddress.ip_address("127.0.0.1"))
    builder.build_server_verifier(ip).verify(cert, [])
    with pytest.raises(verification.VerificationError):
        builder.build_server_verifier(verification.DNSName("evil.example")).verify(cert, [])
    with pytest.raises(verification.VerificationError):  # serverAuth only: not a client
        client_verifier(ca).verify(cert, [])


def test_server_certificate_custom_names(ca: FleetCA) -> None:
    _, cert = ca.issue_server_certificate(["Broker.Example.com"], ["10.0.0.5"])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


@pytest.mark.parametrize(
    ("hostnames", "ips"),
    [([], []), (["bad host"], []), (["-x.example"], []), (["a/b"], []), ([], ["999.1.1.1"])],
)
def test_server_certificate_refuses_bad_names(
    ca: FleetCA, hostnames: list[str], ips: list[str]
) -> None:
    with pytest.raises(ValueError):
        ca.issue_server_certificate(hostnames, ips)


def test_device_certificate_is_not_a_server_certificate(ca: FleetCA) -> None:
    cert = ca.issue_device_certificate("localhost", new_key().public_key())
    builder = verification.PolicyBuilder().store(verification.Store([ca.certificate]))
    with pytest.raises(verification.VerificationError):
        builder.build_server_verifier(verification.DNSName("localhost")).verify(cert, [])


def test_service_client_certificate(ca: FleetCA) -> None:
    key, cert = ca.issue_service_client_certificate()
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SERVER_IDENTITY
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verify_issued(cert, ca.certificate)
    client_verifier(ca).verify(cert, [])


@pytest.mark.parametrize("name", ["edgeota-server", "pi-001", "_", "_Server", ""])
def test_service_client_certificate_refuses_device_like_names(ca: FleetCA, name: str) -> None:
    with pytest.raises(InvalidDeviceIdError):
        ca.issue_service_client_certificate(name)


# --- device TLS folder -----------------------------------------------------


def test_write_device_tls(tmp_path: Path, permissive_umask: None, ca: FleetCA) -> None:
    folder = tmp_path / "device"
    identity = DeviceIdentity.generate("pi-001")
    identity.save(folder)
    cert = write_device_tls(folder, "pi-001", ca)
    assert mode_of(folder / "tls.key.pem") == 0o600
    assert mode_of(folder / "tls.crt.pem") == 0o644
    assert (folder / "ca.crt.pem").read_bytes() == ca.certificate_pem()
    assert x509.load_pem_x509_certificate((folder / "tls.crt.pem").read_bytes()) == cert
    verify_issued(cert, ca.certificate)
    # The server's record of the device carries the TLS key of that certificate.
    public = identity.public(tls_public_key_pem=public_key_pem(cert))
    assert DevicePublicIdentity.from_dict(public.to_dict()) == public
    # Adding TLS files does not disturb the identity.
    assert DeviceIdentity.load(folder) == identity


def test_write_device_tls_refuses_bad_id(tmp_path: Path, ca: FleetCA) -> None:
    with pytest.raises(InvalidDeviceIdError):
        write_device_tls(tmp_path, "Pi_001", ca)
    assert list(tmp_path.iterdir()) == []


# --- a real mutual-TLS handshake (OpenSSL through the ssl module) -----------


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> ssl.SSLObject:
    """Run a TLS handshake in memory; return the server side's connection."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server_conn = server.wrap_bio(s_in, s_out, server_side=True)
    client_conn = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, conn, out, peer_in in (
            ("client", client_conn, c_out, s_in),
            ("server", server_conn, s_out, c_in),
        ):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                peer_in.write(data)
        if all(done.values()):
            # TLS 1.3: the server may reject the client certificate after the
            # client thinks it is done; a read surfaces that on both sides.
            client_conn.write(b"ping")
            s_in.write(c_out.read())
            assert server_conn.read(4) == b"ping"
            return server_conn
    raise AssertionError("handshake did not finish")


def _server_context(tmp_path: Path, ca: FleetCA) -> ssl.SSLContext:
    key, cert = ca.issue_server_certificate()
    write_private_file(tmp_path / "server.key.pem", private_key_pem(key))
    (tmp_path / "server.crt.pem").write_bytes(certificate_pem(cert))
    (tmp_path / "trust.pem").write_bytes(ca.certificate_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt.pem", tmp_path / "server.key.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(tmp_path / "trust.pem")
    return context


def _device_context(folder: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(folder / "ca.crt.pem")
    context.load_cert_chain(folder / "tls.crt.pem", folder / "tls.key.pem")
    return context


def test_mutual_tls_handshake(tmp_path: Path, ca: FleetCA) -> None:
    server = _server_context(tmp_path, ca)
    write_device_tls(tmp_path / "device", "pi-001", ca)
    conn = _handshake(server, _device_context(tmp_path / "device"), "localhost")
    peer = conn.getpeercert()
    assert peer is not None
    assert (("commonName", "pi-001"),) in peer["subject"]


def test_mutual_tls_refuses_device_of_another_ca(
    tmp_path: Path, ca: FleetCA, other_ca: FleetCA
) -> None:
    server = _server_context(tmp_path, ca)
    write_device_tls(tmp_path / "device", "pi-001", other_ca)
    client = _device_context(tmp_path / "device")
    client.load_verify_locations(cadata=ca.certificate_pem().decode())  # trusts the server
    with pytest.raises(ssl.SSLError):
        _handshake(server, client, "localhost")


def test_device_refuses_server_of_another_ca(
    tmp_path: Path, ca: FleetCA, other_ca: FleetCA
) -> None:
    server = _server_context(tmp_path, other_ca)
    write_device_tls(tmp_path / "device", "pi-001", ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, _device_context(tmp_path / "device"), "localhost")
