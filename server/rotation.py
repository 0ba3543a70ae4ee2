"""``edgeota keys rotate ROLE``: replace a repository key through a new root version.

Rotation is a key ceremony on a machine that holds the home: it needs the
offline root keys (to sign the new root) and writes the new online key into
the server's keystore. Clients follow the change through the root chain:
the repositories re-sign the role with the old *and* the new key before the
new root appears, so a device refreshing at any moment finds metadata it
trusts. A running server keeps signing with the key it loaded, which the new
root no longer trusts, so it must be restarted after an online-key rotation
(the CLI says so).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path

from edgeota.protocol.files import atomic_write, make_private_dir
from edgeota.server.config import (
    KeyRef,
    load_operator_config,
    load_server_config,
)
from edgeota.server.context import expiry_policy, load_key_signer
from edgeota.server.db.session import lock, make_engine, make_session_factory
from edgeota.server.keystore import KeyAlgorithm, generate_file_key, load_public_key
from edgeota.server.repo.director import DirectorRepository
from edgeota.server.repo.image import ImageRepository
from edgeota.server.repo.storage import RepoStore

__all__ = ["RotatableRole", "RotationResult", "rotate_key"]


class RotatableRole(enum.StrEnum):
    IMAGE_ROOT = "image-root"
    IMAGE_SNAPSHOT = "image-snapshot"
    IMAGE_TIMESTAMP = "image-timestamp"
    DIRECTOR_ROOT = "director-root"
    DIRECTOR = "director"


@dataclass(frozen=True)
class RotationResult:
    role: RotatableRole
    root_version: int
    new_key_uri: str
    restart_server: bool


def _fresh_name(folder: Path, base: str) -> str:
    index = 2
    while (folder / f"{base}-{index}.key.pem").exists():
        index += 1
    return f"{base}-{index}"


def rotate_key(
    home: Path, role: RotatableRole, *, algorithm: KeyAlgorithm = KeyAlgorithm.ED25519
) -> RotationResult:
    """Rotate ``role``'s key(s) in the home's repositories; update the configs to match."""
    server = load_server_config(home)
    operator = load_operator_config(home)
    store = RepoStore(server.blob_dir)
    policy = expiry_policy(server.expiry)
    image_roots = [load_key_signer(k) for k in operator.root_keys]
    director_roots = [load_key_signer(k) for k in operator.director_root_keys]
    online = make_private_dir(server.home / "keys" / "online")
    offline = make_private_dir(server.home / "keys" / "offline")
    engine = make_engine(server.database_url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            # Serialise with publishing and deployments on every replica.
            lock(session, "director" if role.value.startswith("director") else "image")
            if role in (RotatableRole.IMAGE_SNAPSHOT, RotatableRole.IMAGE_TIMESTAMP):
                name = _fresh_name(online, role.value)
                key = generate_file_key(online, name, algorithm)
                image = ImageRepository(
                    store,
                    snapshot_signer=load_key_signer(server.image_snapshot_key),
                    timestamp_signer=load_key_signer(server.image_timestamp_key),
                    expiry=policy,
                )
                short = role.value.removeprefix("image-")
                version = image.rotate_online_key(short, key.public_key,
                                                  load_key_signer(_ref(key.uri, online, name)),
                                                  image_roots)
                ref = _ref(key.uri, online, name)
                if role is RotatableRole.IMAGE_SNAPSHOT:
                    dataclasses.replace(server, image_snapshot_key=ref).save()
                else:
                    dataclasses.replace(server, image_timestamp_key=ref).save()
                return RotationResult(role, version, key.uri, restart_server=True)
            if role is RotatableRole.DIRECTOR:
                name = _fresh_name(online, "director")
                key = generate_file_key(online, name, algorithm)
                director = DirectorRepository(store, online_signer=load_key_signer(
                    server.director_key), expiry=policy)
                version = director.rotate_online_key(
                    key.public_key, load_key_signer(_ref(key.uri, online, name)), director_roots)
                dataclasses.replace(server, director_key=_ref(key.uri, online, name)).save()
                return RotationResult(role, version, key.uri, restart_server=True)
            # Root: every root key is replaced by a fresh one, threshold unchanged.
            is_image = role is RotatableRole.IMAGE_ROOT
            old_refs = operator.root_keys if is_image else operator.director_root_keys
            new_refs = []
            for _ in old_refs:
                name = _fresh_name(offline, role.value)
                key = generate_file_key(offline, name, KeyAlgorithm.ED25519)
                new_refs.append(_ref(key.uri, offline, name))
            new_signers = [load_key_signer(r) for r in new_refs]
            new_public = [load_public_key(r.public_key) for r in new_refs]
            if is_image:
                repo = ImageRepository(
                    store,
                    snapshot_signer=load_key_signer(server.image_snapshot_key),
                    timestamp_signer=load_key_signer(server.image_timestamp_key),
                    expiry=policy,
                )
                threshold = repo.current("root").signed.roles["root"].threshold
                version = repo.rotate_root(new_public, new_signers, image_roots, threshold)
                trusted, root_bytes = operator.trusted_image_root, repo.root_bytes()
                operator = dataclasses.replace(operator, root_keys=tuple(new_refs))
            else:
                repo_d = DirectorRepository(store, online_signer=load_key_signer(
                    server.director_key), expiry=policy)
                threshold = (_current_root_threshold(repo_d.root_bytes()))
                version = repo_d.rotate_root(new_public, new_signers, director_roots, threshold)
                trusted, root_bytes = operator.trusted_director_root, repo_d.root_bytes()
                operator = dataclasses.replace(operator, director_root_keys=tuple(new_refs))
            operator.save()
            if trusted is not None:
                # New enrolments bootstrap from the newest root; old devices follow the chain.
                atomic_write(trusted, root_bytes)
            return RotationResult(role, version, new_refs[0].uri, restart_server=False)
    finally:
        engine.dispose()


def _ref(uri: str, folder: Path, name: str) -> KeyRef:
    return KeyRef(uri=uri, public_key=folder / f"{name}.pub.json")


def _current_root_threshold(root_bytes: bytes) -> int:
    from tuf.api.metadata import Metadata, Root

    return Metadata[Root].from_bytes(root_bytes).signed.roles["root"].threshold
