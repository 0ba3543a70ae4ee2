"""TUF role keys, addressed by securesystemslib signer URIs.

Every signing key of the image and director repositories is named by a
private key URI plus its public key, never by a loaded key object kept around:

* ``file2:/abs/path/name.key.pem`` -- the default local keystore, an
  unencrypted PKCS8 PEM file with mode 0600 (development, the demo, tests);
* ``awskms:``, ``gcpkms:``, ``azurekms:``, ``hsm:``, ``hv:`` -- production keys
  in a KMS or HSM, handed straight to ``securesystemslib``'s signers.

Online keys (snapshot, timestamp, director) may be ECDSA P-256 because that is
what most KMS and HSM products can hold; offline and release keys default to
Ed25519.

``file2:`` keys are loaded here rather than by ``CryptoSigner.from_priv_key_uri``
so that the file goes through :func:`edgeota.protocol.files.read_private_file`
(a 0644 private key is refused, as ``ssh`` does) and so that the
``CRYPTO_SIGNER_PATH_PREFIX`` environment variable cannot silently redirect a
key: a ``file2:`` URI here must name an absolute path, and that is the file used.

There is no module state: the keystore folder is always an argument.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.exceptions import KeyMismatchError
from securesystemslib.signer import (
    ECDSA_SHA2_NISTP256,
    ED25519,
    SIGNER_FOR_URI_SCHEME,
    CryptoSigner,
    Key,
    SecretsHandler,
    Signer,
    SSlibKey,
)

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import (
    PUBLIC_FILE_MODE,
    FileTooLargeError,
    InsecureKeyFileError,
    atomic_write,
    make_private_dir,
    read_bounded,
    read_private_file,
    write_private_file,
)

__all__ = [
    "FILE_URI_SCHEME",
    "PRIVATE_KEY_SUFFIX",
    "PUBLIC_KEY_SUFFIX",
    "KeyAlgorithm",
    "KeystoreError",
    "RoleKey",
    "generate_file_key",
    "load_public_key",
    "load_signer",
    "save_public_key",
]

FILE_URI_SCHEME = CryptoSigner.SCHEME  # "file2"
PRIVATE_KEY_SUFFIX = ".key.pem"
PUBLIC_KEY_SUFFIX = ".pub.json"
# Names become file names next to other keys: no separators, no hidden files.
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_PRIVATE_KEY_SIZE = 64 * 1024  # bytes; a PKCS8 PEM of any supported key is far smaller
_MAX_PUBLIC_KEY_SIZE = 64 * 1024  # bytes


class KeystoreError(EdgeotaError):
    """A signing key that cannot be generated, found, trusted or loaded; the message says why."""


class KeyAlgorithm(enum.Enum):
    """Signing algorithms for TUF role keys."""

    ED25519 = "ed25519"
    # ECDSA over P-256 with SHA-256: the algorithm KMS and HSM products offer
    # everywhere, so online keys can move there without changing metadata format.
    ECDSA_P256 = "ecdsa-p256"

    @property
    def scheme(self) -> str:
        """The TUF/securesystemslib signature scheme of this algorithm."""
        return ED25519 if self is KeyAlgorithm.ED25519 else ECDSA_SHA2_NISTP256


@dataclass(frozen=True)
class RoleKey:
    """A role key as repositories use it: the public key for metadata, the URI to sign with."""

    public_key: SSlibKey
    uri: str

    @property
    def keyid(self) -> str:
        return self.public_key.keyid


def _redact(uri: str) -> str:
    # Signer URIs may carry options after "?" (PKCS#11 URIs can even hold a
    # PIN); error messages show only the part before it.
    return uri.split("?", 1)[0]


def _file2_uri(path: Path) -> str:
    uri = f"{FILE_URI_SCHEME}:{path}"
    # securesystemslib and other TUF tooling parse the URI with urlparse; a
    # path that does not survive that (one holding "?" or "#") would name
    # another file for them than for us.
    if urlparse(uri).path != str(path):
        raise KeystoreError(
            f"key path {path} cannot be written as a {FILE_URI_SCHEME}: URI "
            "(it contains a character such as '?' or '#'); choose another keystore folder"
        )
    return uri


def save_public_key(path: Path, key: Key) -> None:
    """Write ``key`` as TUF key JSON (``Key.to_dict()`` plus ``keyid``), mode 0644.

    Useful for KMS/HSM keys too: their public half is what goes into root.
    """
    data = {"keyid": key.keyid, **key.to_dict()}
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path), text.encode("utf-8"), mode=PUBLIC_FILE_MODE)


def load_public_key(path: Path) -> Key:
    """Read a public key written by :func:`save_public_key`.

    Raises:
        KeystoreError: the file is missing, too large, not JSON, or not a key.
    """
    path = Path(path)
    try:
        raw = read_bounded(path, _MAX_PUBLIC_KEY_SIZE, "public key")
    except FileTooLargeError as e:
        raise KeystoreError(str(e)) from e
    except OSError as e:
        raise KeystoreError(f"cannot read public key file {path}: {e.strerror or e}") from e
    try:
        data: Any = json.loads(raw)
    except ValueError as e:
        raise KeystoreError(f"public key file {path} is not valid JSON") from e
    if not isinstance(data, dict) or not isinstance(data.get("keyid"), str):
        raise KeystoreError(f"public key file {path} must be a JSON object with a 'keyid' string")
    keyid = data.pop("keyid")
    try:
        return Key.from_dict(keyid, data)
    except (KeyError, TypeError, ValueError) as e:
        raise KeystoreError(f"public key file {path} is not a valid TUF key: {e}") from e


def generate_file_key(folder: Path, name: str, algorithm: KeyAlgorithm) -> RoleKey:
    """Create a new key pair in the local keystore ``folder`` and return its ``file2:`` address.

    Writes ``{name}.key.pem`` (PKCS8 PEM, 0600) and ``{name}.pub.json`` (TUF
    key JSON, 0644); ``folder`` is created 0700 if missing. An existing key of
    the same name is never overwritten: losing a root or release key is not
    recoverable, so rotation uses a new name.

    Raises:
        ValueError: ``name`` is not a plain file-name stem.
        KeystoreError: a key of that name exists, or the path cannot be a URI.
    """
    if not isinstance(name, str) or _KEY_NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid key name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    folder = Path(folder).resolve()
    private_path = folder / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = folder / f"{name}{PUBLIC_KEY_SUFFIX}"
    uri = _file2_uri(private_path)
    for existing in (private_path, public_path):
        if existing.exists():
            raise KeystoreError(f"key {name!r} already exists in {folder} ({existing.name})")

    if algorithm is KeyAlgorithm.ED25519:
        signer = CryptoSigner.generate_ed25519()
    else:
        signer = CryptoSigner.generate_ecdsa(scheme=algorithm.scheme)
    make_private_dir(folder)
    write_private_file(private_path, signer.private_bytes)
    save_public_key(public_path, signer.public_key)
    return RoleKey(public_key=signer.public_key, uri=uri)


def load_signer(uri: str, public_key: Key, secrets_handler: SecretsHandler | None = None) -> Signer:
    """Return a signer for the private key at ``uri`` that matches ``public_key``.

    ``file2:`` URIs are read here (absolute paths only, 0600 files only);
    every other scheme securesystemslib knows is passed to
    ``Signer.from_priv_key_uri`` with ``secrets_handler`` (for a PIN or passphrase).

    Raises:
        KeystoreError: unknown scheme, missing or unreadable file, a private
            key file accessible to others, a file that is not a PKCS8 PEM key,
            or a private key that does not match ``public_key``.
    """
    scheme, sep, _ = uri.partition(":")
    if not sep or scheme not in SIGNER_FOR_URI_SCHEME:
        known = ", ".join(sorted(SIGNER_FOR_URI_SCHEME))
        raise KeystoreError(
            f"unknown signer URI scheme {scheme!r} in {_redact(uri)!r} (known: {known})"
        )
    if scheme == FILE_URI_SCHEME:
        return _load_file_signer(uri, public_key)
    try:
        return Signer.from_priv_key_uri(uri, public_key, secrets_handler)
    except Exception as e:  # KMS/HSM signers raise network, import and auth errors alike
        raise KeystoreError(
            f"cannot load {scheme}: signer {_redact(uri)!r} for key {public_key.keyid}: "
            f"{type(e).__name__}: {e}"
        ) from e


def _load_file_signer(uri: str, public_key: Key) -> CryptoSigner:
    path = Path(urlparse(uri).path)
    if not path.is_absolute():
        raise KeystoreError(
            f"{FILE_URI_SCHEME}: URI {uri!r} must name an absolute path (the keystore "
            "does not resolve keys relative to the working folder)"
        )
    if not isinstance(public_key, SSlibKey):
        raise KeystoreError(
            f"{FILE_URI_SCHEME}: keys need an SSlibKey public key, got {type(public_key).__name__}"
        )
    try:
        pem = read_private_file(path, _MAX_PRIVATE_KEY_SIZE)
    except FileNotFoundError as e:
        raise KeystoreError(f"private key file {path} does not exist") from e
    except InsecureKeyFileError as e:
        raise KeystoreError(f"refusing private key file: {e}") from e
    except FileTooLargeError as e:
        raise KeystoreError(f"refusing private key file: {e}") from e
    except OSError as e:
        raise KeystoreError(f"cannot read private key file {path}: {e.strerror or e}") from e
    try:
        private_key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeystoreError(
            f"private key file {path} is not an unencrypted PKCS8 PEM private key"
        ) from e
    try:
        return CryptoSigner(private_key, public_key)
    except KeyMismatchError as e:
        raise KeystoreError(
            f"private key file {path} does not match public key {public_key.keyid}"
        ) from e
    except ValueError as e:
        # Wrong key type or curve for the public key's scheme.
        raise KeystoreError(
            f"private key file {path} cannot sign as {public_key.keytype}/{public_key.scheme} "
            f"(public key {public_key.keyid}): {e}"
        ) from e
