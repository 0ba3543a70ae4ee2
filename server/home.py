"""``edgeota init``: create a home with keys, fleet CA, database and both repositories.

A development home keeps every key locally so the demo runs with no ceremony,
but already in the production shape: ``keys/offline`` (root keys: move them
to an air-gapped machine or HSM), ``keys/release`` (release managers' keys:
move each to its owner), ``keys/online`` (the only keys the server reads).
``server.toml`` names only online keys; ``operator.toml`` names the release
and root keys, and the server never opens it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from securesystemslib.signer import Signer

from edgeota.protocol.files import atomic_write, make_private_dir, write_private_file
from edgeota.protocol.keywrap import KemPrivateKey, KemSuite
from edgeota.server.config import (
    DEFAULT_HTTP,
    ConfigError,
    ExpirySettings,
    KeyRef,
    OperatorConfig,
    ServerConfig,
    parse_http,
)
from edgeota.server.db.migrate import upgrade
from edgeota.server.db.session import make_engine, make_session_factory
from edgeota.server.fleet_ca import FleetCA
from edgeota.server.keystore import KeyAlgorithm, RoleKey, generate_file_key, load_signer
from edgeota.server.repo.director import DirectorRepository
from edgeota.server.repo.image import DEFAULT_BIN_BITS, ImageRepository
from edgeota.server.repo.storage import RepoStore
from edgeota.server.tokens import Role, issue_token

__all__ = ["HomeOptions", "init_home"]

logger = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "operator.token"  # noqa: S105 - a file name, not a secret
ROOTS_DIR = "roots"


@dataclass(frozen=True)
class HomeOptions:
    """Choices made once, at ``edgeota init``."""

    database_url: str | None = None  # default: SQLite in the home
    http: str = DEFAULT_HTTP
    mqtt: str = "127.0.0.1:8883"  # where the embedded broker listens and devices connect
    public_url: str | None = None
    root_keys: int = 1
    root_threshold: int = 1
    release_keys: int = 1
    release_threshold: int = 1
    online_algorithm: KeyAlgorithm = KeyAlgorithm.ED25519
    bin_bits: int = DEFAULT_BIN_BITS
    keywrap_suite: KemSuite = KemSuite.X25519
    expiry: ExpirySettings = field(default_factory=ExpirySettings)


def _ref(key: RoleKey, folder: Path, name: str) -> KeyRef:
    return KeyRef(uri=key.uri, public_key=folder / f"{name}.pub.json")


def _signer(key: RoleKey) -> Signer:
    return load_signer(key.uri, key.public_key)


def init_home(
    home: Path,
    options: HomeOptions | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[ServerConfig, OperatorConfig]:
    """Create a complete home in ``home`` (which must be empty or absent)."""
    options = options or HomeOptions()
    say = progress or (lambda _message: None)
    clock = clock or (lambda: datetime.now(UTC))
    home = home.resolve()
    if home.exists() and any(home.iterdir()):
        raise ConfigError(f"{home} is not empty: refusing to initialise over an existing home")
    if not 1 <= options.root_threshold <= options.root_keys:
        raise ConfigError("root threshold must be between 1 and the number of root keys")
    if not 1 <= options.release_threshold <= options.release_keys:
        raise ConfigError("release threshold must be between 1 and the number of release keys")
    host, port = parse_http(options.http, "--http")
    make_private_dir(home)
    offline = make_private_dir(home / "keys" / "offline")
    release = make_private_dir(home / "keys" / "release")
    online = make_private_dir(home / "keys" / "online")

    say("generating keys")
    image_roots = [generate_file_key(offline, f"image-root-{i + 1}", KeyAlgorithm.ED25519)
                   for i in range(options.root_keys)]
    director_roots = [generate_file_key(offline, f"director-root-{i + 1}", KeyAlgorithm.ED25519)
                      for i in range(options.root_keys)]
    release_keys = [generate_file_key(release, f"release-{i + 1}", KeyAlgorithm.ED25519)
                    for i in range(options.release_keys)]
    snapshot = generate_file_key(online, "image-snapshot", options.online_algorithm)
    timestamp = generate_file_key(online, "image-timestamp", options.online_algorithm)
    director = generate_file_key(online, "director", options.online_algorithm)
    keywrap = KemPrivateKey.generate(options.keywrap_suite)
    write_private_file(online / "keywrap.key.json",
                       json.dumps(keywrap.to_dict(), indent=2).encode("ascii"))
    atomic_write(online / "keywrap.pub.json",
                 json.dumps(keywrap.public_key().to_dict(), indent=2).encode("ascii"))

    say("creating the fleet CA")
    FleetCA.create(home / "ca")

    database_url = options.database_url or f"sqlite:///{home / 'edgeota.db'}"
    say("creating the database")
    upgrade(database_url)

    say("creating the image and director repositories")
    from edgeota.server.context import expiry_policy

    policy = expiry_policy(options.expiry)
    store = RepoStore(home / "blobs")
    image = ImageRepository.initialise(
        store,
        root_signers=[_signer(k) for k in image_roots],
        root_threshold=options.root_threshold,
        release_signers=[_signer(k) for k in release_keys],
        release_threshold=options.release_threshold,
        snapshot_signer=_signer(snapshot),
        timestamp_signer=_signer(timestamp),
        bin_bits=options.bin_bits,
        expiry=policy,
        clock=clock,
    )
    director_repo = DirectorRepository.initialise(
        store,
        root_signers=[_signer(k) for k in director_roots],
        root_threshold=options.root_threshold,
        online_public_key=director.public_key,
        online_signer=_signer(director),
        expiry=policy,
        clock=clock,
    )
    roots = home / ROOTS_DIR
    roots.mkdir()
    atomic_write(roots / "image-root.json", image.root_bytes())
    atomic_write(roots / "director-root.json", director_repo.root_bytes())

    say("issuing the admin token")
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            _, token = issue_token(session, name="admin", role=Role.ADMIN)
    finally:
        engine.dispose()
    write_private_file(home / ADMIN_TOKEN_FILE, (token + "\n").encode("ascii"))

    public_url = options.public_url or f"http://{host}:{port}"
    server = ServerConfig(
        home=home,
        database_url=database_url,
        blob_dir=home / "blobs",
        http_host=host,
        http_port=port,
        public_url=public_url,
        image_snapshot_key=_ref(snapshot, online, "image-snapshot"),
        image_timestamp_key=_ref(timestamp, online, "image-timestamp"),
        director_key=_ref(director, online, "director"),
        keywrap_key=online / "keywrap.key.json",
        ca_dir=home / "ca",
        expiry=options.expiry,
        mqtt_bind=options.mqtt,
        mqtt_device_url=f"mqtts://{options.mqtt}",
    )
    server.save()
    operator = OperatorConfig(
        home=home,
        server_url=public_url,
        token_file=home / ADMIN_TOKEN_FILE,
        release_keys=tuple(_ref(k, release, f"release-{i + 1}")
                           for i, k in enumerate(release_keys)),
        root_keys=tuple(_ref(k, offline, f"image-root-{i + 1}")
                        for i, k in enumerate(image_roots)),
        director_root_keys=tuple(_ref(k, offline, f"director-root-{i + 1}")
                                 for i, k in enumerate(director_roots)),
        keywrap_public=online / "keywrap.pub.json",
        trusted_image_root=roots / "image-root.json",
        trusted_director_root=roots / "director-root.json",
    )
    operator.save()
    return server, operator
