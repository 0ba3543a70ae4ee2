"""Everything a running server holds, built once from ``server.toml``.

One explicit object instead of module globals: the HTTP app, the background
re-signing task and the tests all get the same context passed in, and two
servers (replicas in a test) never share hidden state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import Signer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgeota.protocol.files import read_private_file
from edgeota.protocol.keywrap import KemPrivateKey
from edgeota.server.config import ExpirySettings, KeyRef, ServerConfig
from edgeota.server.db.session import make_engine, make_session_factory
from edgeota.server.fleet_ca import FleetCA
from edgeota.server.keystore import load_public_key, load_signer
from edgeota.server.metrics import ServerMetrics
from edgeota.server.repo.director import DirectorRepository
from edgeota.server.repo.image import ExpiryPolicy, ImageRepository
from edgeota.server.repo.storage import RepoStore

__all__ = ["ServerContext", "expiry_policy", "load_key_signer"]

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def load_key_signer(ref: KeyRef) -> Signer:
    """The signer for a configured key, checked against its public key."""
    return load_signer(ref.uri, load_public_key(ref.public_key))


def expiry_policy(settings: ExpirySettings) -> ExpiryPolicy:
    return ExpiryPolicy(
        root=timedelta(days=settings.root_days),
        targets=timedelta(days=settings.targets_days),
        bins=timedelta(days=settings.bins_days),
        snapshot=timedelta(days=settings.snapshot_days),
        timestamp=timedelta(days=settings.timestamp_days),
        director_targets=timedelta(days=settings.director_targets_days),
        director_snapshot=timedelta(days=settings.director_snapshot_days),
        director_timestamp=timedelta(days=settings.director_timestamp_days),
    )


@dataclass
class ServerContext:
    """The server's long-lived objects. Holds online keys only, never a release key."""

    config: ServerConfig
    engine: Engine
    sessions: sessionmaker[Session]
    store: RepoStore
    image: ImageRepository
    director: DirectorRepository
    keywrap_key: KemPrivateKey
    ca: FleetCA
    clock: Clock
    uploads_dir: Path
    metrics: ServerMetrics
    # Tells a device its director metadata changed (MQTT notify); a no-op until
    # the MQTT transport is attached, devices then find out on their next poll.
    notify: Callable[[str], None] = lambda _device_id: None

    @classmethod
    def open(cls, config: ServerConfig, *, clock: Clock | None = None) -> ServerContext:
        clock = clock or _utcnow
        engine = make_engine(config.database_url)
        store = RepoStore(config.blob_dir)
        policy = expiry_policy(config.expiry)
        image = ImageRepository(
            store,
            snapshot_signer=load_key_signer(config.image_snapshot_key),
            timestamp_signer=load_key_signer(config.image_timestamp_key),
            expiry=policy,
            clock=clock,
        )
        director = DirectorRepository(
            store, online_signer=load_key_signer(config.director_key), expiry=policy, clock=clock
        )
        keywrap = KemPrivateKey.from_dict(
            json.loads(read_private_file(config.keywrap_key, 64 * 1024))
        )
        uploads = config.blob_dir / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        sessions = make_session_factory(engine)
        return cls(
            config=config,
            engine=engine,
            sessions=sessions,
            store=store,
            image=image,
            director=director,
            keywrap_key=keywrap,
            ca=FleetCA.load(config.ca_dir),
            clock=clock,
            uploads_dir=uploads,
            metrics=ServerMetrics(sessions),
        )

    def set_clock(self, clock: Clock) -> None:
        """Judge time by ``clock`` from now on: the context's and both repositories' signing."""
        self.clock = clock
        self.image.clock = clock
        self.director.clock = clock

    def close(self) -> None:
        self.engine.dispose()
