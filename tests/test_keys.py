"""Safe file writes (protocol.files) and TUF role keys (server.keystore)."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import mode_of
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import CryptoSigner, Signature
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from edgeota.protocol import files
from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.files import (
    FileTooLargeError,
    InsecureKeyFileError,
    atomic_write,
    make_private_dir,
    read_private_file,
    write_private_file,
)
from edgeota.server.keystore import (
    KeyAlgorithm,
    KeystoreError,
    RoleKey,
    generate_file_key,
    load_public_key,
    load_signer,
    save_public_key,
)


@pytest.fixture(params=list(KeyAlgorithm), ids=lambda a: a.value)
def algorithm(request: pytest.FixtureRequest) -> KeyAlgorithm:
    return request.param


# --- atomic_write / write_private_file -------------------------------------


@pytest.mark.parametrize("umask", [0, 0o077, 0o022])
def test_atomic_write_sets_exact_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "public.json", b"{}")
        write_private_file(tmp_path / "secret.pem", b"secret")
        atomic_write(tmp_path / "custom", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "public.json") == 0o644
    assert mode_of(tmp_path / "secret.pem") == 0o600
    assert mode_of(tmp_path / "custom") == 0o640
    assert (tmp_path / "secret.pem").read_bytes() == b"secret"


def test_private_file_is_never_wider_than_0600_while_written(
    tmp_path: Path, permissive_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catch the temp file at creation and at fsync (data written, not yet renamed)."""
    created_modes: list[int] = []
    synced_modes: list[int] = []
    real_open, real_fsync = os.open, os.fsync

    def spy_open(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        fd = real_open(path, flags, mode, **kw)  # type: ignore[arg-type]
        if flags & os.O_CREAT:
            created_modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    def spy_fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            synced_modes.append(stat.S_IMODE(st.st_mode))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "open", spy_open)
    monkeypatch.setattr(files.os, "fsync", spy_fsync)
    write_private_file(tmp_path / "k.pem", b"secret")
    assert created_modes == [0o600]
    assert synced_modes == [0o600]


def test_overwriting_a_wide_file_leaves_it_private(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    target.chmod(0o666)
    write_private_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o600


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    atomic_write(tmp_path / "journal.json", b"one")
    atomic_write(tmp_path / "journal.json", b"two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]
    assert (tmp_path / "journal.json").read_bytes() == b"two"


def test_atomic_write_syncs_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append(Path(p)))
    atomic_write(tmp_path / "f", b"x")
    assert synced == [tmp_path]


def _failing(exc: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    return fail


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_failed_write_keeps_old_content_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    target = tmp_path / "journal.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(files.os, where, _failing(OSError(errno.EIO, "simulated I/O error")))
    with pytest.raises(OSError, match="simulated"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]


def test_data_that_cannot_be_written_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "journal.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]


def test_interrupt_during_write_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files.os, "fsync", _failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_private_file(tmp_path / "k.pem", b"secret")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_make_private_dir(tmp_path: Path, permissive_umask: None) -> None:
    folder = make_private_dir(tmp_path / "a" / "keys")
    assert mode_of(folder) == 0o700
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    make_private_dir(existing)
    assert mode_of(existing) == 0o755  # an operator's folder keeps its mode


# --- read_private_file -----------------------------------------------------


def test_read_private_file_round_trip(tmp_path: Path) -> None:
    write_private_file(tmp_path / "k", b"secret")
    assert read_private_file(tmp_path / "k", max_size=6) == b"secret"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o700 | 0o010])
def test_read_private_file_refuses_group_or_world_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    write_private_file(path, b"secret")
    path.chmod(mode)
    with pytest.raises(InsecureKeyFileError, match="chmod 600") as e:
        read_private_file(path, max_size=100)
    assert isinstance(e.value, ProtocolError)


def test_read_private_file_accepts_owner_only_modes(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_private_file(path, b"secret")
    path.chmod(0o400)
    assert read_private_file(path, max_size=100) == b"secret"


def test_read_private_file_bounds_size(tmp_path: Path) -> None:
    write_private_file(tmp_path / "k", b"x" * 101)
    with pytest.raises(FileTooLargeError):
        read_private_file(tmp_path / "k", max_size=100)


def test_read_private_file_refuses_non_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InsecureKeyFileError, match="not a regular file"):
        read_private_file(fifo, max_size=100)  # must not block waiting for a writer
    folder = tmp_path / "d"
    folder.mkdir(mode=0o700)
    with pytest.raises(InsecureKeyFileError):
        read_private_file(folder, max_size=100)


def test_read_private_file_missing_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_private_file(tmp_path / "missing", max_size=100)


# --- keystore --------------------------------------------------------------


def test_generate_file_key_writes_files(
    tmp_path: Path, permissive_umask: None, algorithm: KeyAlgorithm
) -> None:
    folder = tmp_path / "keys"
    role = generate_file_key(folder, "timestamp", algorithm)
    private, public = folder / "timestamp.key.pem", folder / "timestamp.pub.json"
    assert mode_of(folder) == 0o700
    assert mode_of(private) == 0o600
    assert mode_of(public) == 0o644
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert role.uri == f"file2:{private.resolve()}"
    assert role.public_key.scheme == algorithm.scheme
    assert role.keyid == role.public_key.keyid
    data = json.loads(public.read_text())
    assert data["keyid"] == role.keyid
    assert data["keytype"] == {"ed25519": "ed25519", "ecdsa-p256": "ecdsa"}[algorithm.value]
    assert load_public_key(public) == role.public_key


def test_relative_folder_gives_absolute_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    role = generate_file_key(Path("keys"), "root-1", KeyAlgorithm.ED25519)
    assert role.uri == f"file2:{(tmp_path / 'keys' / 'root-1.key.pem').resolve()}"


def test_signed_metadata_verifies_through_root(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    role = generate_file_key(tmp_path, "targets", algorithm)
    public = load_public_key(tmp_path / "targets.pub.json")
    signer = load_signer(role.uri, public)

    root = Root()
    root.add_key(public, "targets")
    metadata = Metadata(Targets(version=3))
    metadata.sign(signer)
    # Through the wire form, as a client would see it.
    received = Metadata.from_bytes(metadata.to_bytes())
    root.verify_delegate("targets", received.signed_bytes, received.signatures)

    received.signed.version = 4  # a flipped field in the signed part
    with pytest.raises(UnsignedMetadataError):
        root.verify_delegate("targets", received.signed_bytes, received.signatures)


def test_flipped_signature_byte_fails(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    role = generate_file_key(tmp_path, "snapshot", algorithm)
    signer = load_signer(role.uri, role.public_key)
    payload = b"signed bytes"
    signature = signer.sign(payload)
    role.public_key.verify_signature(signature, payload)
    raw = bytearray(bytes.fromhex(signature.signature))
    raw[len(raw) // 2] ^= 0x01
    flipped = Signature(signature.keyid, raw.hex())
    with pytest.raises(UnverifiedSignatureError):
        role.public_key.verify_signature(flipped, payload)
    with pytest.raises(UnverifiedSignatureError):
        role.public_key.verify_signature(signature, payload + b"!")


def test_uri_works_with_securesystemslib_loader(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    """Other TUF tooling reading our URIs gets the same key."""
    role = generate_file_key(tmp_path, "director", algorithm)
    signer = CryptoSigner.from_priv_key_uri(role.uri, role.public_key)
    role.public_key.verify_signature(signer.sign(b"x"), b"x")


def test_world_readable_private_key_is_refused(tmp_path: Path) -> None:
    role = generate_file_key(tmp_path, "root-1", KeyAlgorithm.ED25519)
    (tmp_path / "root-1.key.pem").chmod(0o644)
    with pytest.raises(KeystoreError, match="0644") as e:
        load_signer(role.uri, role.public_key)
    assert isinstance(e.value.__cause__, InsecureKeyFileError)


def test_missing_private_key(tmp_path: Path) -> None:
    role = generate_file_key(tmp_path, "root-1", KeyAlgorithm.ED25519)
    (tmp_path / "root-1.key.pem").unlink()
    with pytest.raises(KeystoreError, match="does not exist"):
        load_signer(role.uri, role.public_key)


def test_private_key_of_another_key_is_refused(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    a = generate_file_key(tmp_path, "a", algorithm)
    b = generate_file_key(tmp_path, "b", algorithm)
    with pytest.raises(KeystoreError, match="does not match"):
        load_signer(a.uri, b.public_key)


def test_private_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    ed = generate_file_key(tmp_path, "ed", KeyAlgorithm.ED25519)
    ec = generate_file_key(tmp_path, "ec", KeyAlgorithm.ECDSA_P256)
    with pytest.raises(KeystoreError, match="cannot sign as"):
        load_signer(ed.uri, ec.public_key)


def test_garbage_private_key_file(tmp_path: Path) -> None:
    role = generate_file_key(tmp_path, "k", KeyAlgorithm.ED25519)
    write_private_file(tmp_path / "k.key.pem", b"not a pem")
    with pytest.raises(KeystoreError, match="PKCS8 PEM"):
        load_signer(role.uri, role.public_key)


def test_unknown_scheme(tmp_path: Path) -> None:
    role = generate_file_key(tmp_path, "k", KeyAlgorithm.ED25519)
    with pytest.raises(KeystoreError, match=r"unknown signer URI scheme 'nope'.*file2"):
        load_signer("nope:whatever", role.public_key)
    with pytest.raises(KeystoreError, match="unknown signer URI scheme"):
        load_signer("no-scheme-at-all", role.public_key)


def test_relative_file2_uri_is_refused(tmp_path: Path) -> None:
    role = generate_file_key(tmp_path, "k", KeyAlgorithm.ED25519)
    with pytest.raises(KeystoreError, match="absolute path"):
        load_signer("file2:k.key.pem", role.public_key)


def test_kms_signer_failure_is_typed_and_hides_uri_options(tmp_path: Path) -> None:
    role = generate_file_key(tmp_path, "k", KeyAlgorithm.ECDSA_P256)
    with pytest.raises(KeystoreError) as e:
        load_signer("hsm:?pin-value=hunter2", role.public_key)
    assert "hunter2" not in str(e.value)
    assert "hsm:" in str(e.value)


def test_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    generate_file_key(tmp_path, "root-1", KeyAlgorithm.ED25519)
    before = (tmp_path / "root-1.key.pem").read_bytes()
    with pytest.raises(KeystoreError, match="already exists"):
        generate_file_key(tmp_path, "root-1", KeyAlgorithm.ED25519)
    assert (tmp_path / "root-1.key.pem").read_bytes() == before


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a b", "ключ"])
def test_bad_key_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid key name"):
        generate_file_key(tmp_path, name, KeyAlgorithm.ED25519)


def test_folder_that_cannot_be_a_uri(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="URI"):
        generate_file_key(tmp_path / "a#b", "k", KeyAlgorithm.ED25519)
    assert not (tmp_path / "a#b").exists()


def test_load_public_key_errors(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="cannot read"):
        load_public_key(tmp_path / "missing.pub.json")
    (tmp_path / "bad.pub.json").write_text("{")
    with pytest.raises(KeystoreError, match="not valid JSON"):
        load_public_key(tmp_path / "bad.pub.json")
    (tmp_path / "nokeyid.pub.json").write_text('{"keytype": "ed25519"}')
    with pytest.raises(KeystoreError, match="keyid"):
        load_public_key(tmp_path / "nokeyid.pub.json")
    (tmp_path / "notkey.pub.json").write_text('{"keyid": "x", "keytype": "ed25519"}')
    with pytest.raises(KeystoreError, match="not a valid TUF key"):
        load_public_key(tmp_path / "notkey.pub.json")


def test_save_public_key_round_trip(tmp_path: Path) -> None:
    signer = CryptoSigner.generate_ecdsa()
    save_public_key(tmp_path / "kms.pub.json", signer.public_key)
    assert load_public_key(tmp_path / "kms.pub.json") == signer.public_key
    assert mode_of(tmp_path / "kms.pub.json") == 0o644


def test_role_key_repr_has_no_private_material(tmp_path: Path) -> None:
    role = generate_file_key(tmp_path, "k", KeyAlgorithm.ED25519)
    assert isinstance(role, RoleKey)
    pem = (tmp_path / "k.key.pem").read_text()
    body = "".join(pem.splitlines()[1:-1])
    assert body not in repr(role)
