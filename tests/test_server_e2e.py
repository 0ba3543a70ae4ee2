"""The update server end to end: real HTTP, real ngclient, real SQL (SQLite and PostgreSQL).

Every operator action goes through the ``edgeota`` CLI against a running
server; every device-side check uses an unmodified ``tuf.ngclient.Updater``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from server_support import SAMPLES, RunningServer, running_server
from sqlalchemy import select, text, update
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import Updater

from edgeota.agent.config import AgentConfig
from edgeota.protocol.targets_custom import DirectorTargetCustom, ImageTargetCustom
from edgeota.runtime.http_fetcher import HttpFetcher, HttpFetcherConfig
from edgeota.server.db.models import AuditEntry, Release
from edgeota.server.home import HomeOptions
from edgeota.server.services.deployments import DirectorFailure
from edgeota.server.services.errors import ErrorCode
from edgeota.server.tokens import Role

V1_TARGET = "models/digits/1.0.0.eotb"


def image_updater(server: RunningServer, cache: Path) -> Updater:
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "targets").mkdir(exist_ok=True)
    return Updater(
        metadata_dir=str(cache),
        metadata_base_url=f"{server.url}/repo/image/metadata/",
        target_dir=str(cache / "targets"),
        target_base_url=f"{server.url}/repo/image/targets/",
        bootstrap=server.operator.trusted_image_root.read_bytes(),
    )


def director_updater(agent_dir: Path, cache: Path, token: str | None = None) -> Updater:
    config = AgentConfig.load(agent_dir / "agent.toml")
    cache.mkdir(parents=True, exist_ok=True)
    return Updater(
        metadata_dir=str(cache),
        metadata_base_url=config.director_metadata_url,
        fetcher=HttpFetcher(HttpFetcherConfig(token=token if token is not None
                                              else config.token())),
        bootstrap=config.director_root.read_bytes(),
    )


def published(server: RunningServer, sample: str = "digits_v1", version: str = "1.0.0") -> dict:
    result = server.publish(sample, version)
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_unmodified_ngclient_reads_both_repositories_over_http(
    server: RunningServer, tmp_path: Path
) -> None:
    device = server.enroll("pi-1", "rpi4", "site=lab")
    release = published(server)
    assert release["status"] == "published"
    deploy = server.cli("deploy", "digits@1.0.0", "--tag", "site=lab", "--json")
    assert deploy.code == 0, deploy.err
    assert json.loads(deploy.out)["assigned"] == ["pi-1"]

    # Image repository: plain ngclient, its own default HTTP fetcher.
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    info = image.get_targetinfo(V1_TARGET)
    assert info is not None
    custom = ImageTargetCustom.from_custom(info.custom)
    assert (custom.name, custom.version, custom.release_counter) == ("digits", "1.0.0", 1)
    path = Path(image.download_target(info))
    assert path.stat().st_size == release["length"]

    # Director repository: the device's own credentials.
    director = director_updater(device, tmp_path / "director")
    director.refresh()
    assigned = director.get_targetinfo(V1_TARGET)
    assert assigned is not None
    assert (assigned.length, assigned.hashes) == (info.length, info.hashes)
    director_custom = DirectorTargetCustom.from_custom(assigned.custom)
    assert director_custom.device_id == "pi-1"
    assert director_custom.hardware_id == "rpi4"


def test_ngclient_follows_a_root_rotation(server: RunningServer, tmp_path: Path) -> None:
    published(server)
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    from edgeota.server.keystore import KeyAlgorithm, generate_file_key, load_signer
    from edgeota.server.repo.image import ImageRepository

    operator = server.operator
    old_signers = [load_signer(k.uri, _public(k.public_key)) for k in operator.root_keys]
    new_key = generate_file_key(server.home / "keys" / "offline", "image-root-new",
                                KeyAlgorithm.ED25519)
    repo: ImageRepository = server.ctx.image
    version = repo.rotate_root([new_key.public_key], [load_signer(new_key.uri,
                                                                  new_key.public_key)],
                               old_signers, 1)
    assert version == 2
    fresh = image_updater(server, tmp_path / "image")  # same cache: knows root v1
    fresh.refresh()
    assert json.loads((tmp_path / "image" / "root.json").read_text())["signed"]["version"] == 2
    assert fresh.get_targetinfo(V1_TARGET) is not None


def _public(path: Path):
    from edgeota.server.keystore import load_public_key

    return load_public_key(path)


def test_tampered_target_on_the_server_is_refused_by_ngclient(
    server: RunningServer, tmp_path: Path
) -> None:
    release = published(server)
    stored = server.ctx.store.target_file_for_request(
        f"models/digits/{release['sha256']}.1.0.0.eotb")
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0x01
    stored.write_bytes(bytes(data))
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    info = image.get_targetinfo(V1_TARGET)
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        image.download_target(info)


def test_replayed_older_timestamp_is_refused_by_ngclient(
    server: RunningServer, tmp_path: Path
) -> None:
    pointer = server.config.blob_dir / "image" / "metadata" / "timestamp.json"
    old_timestamp = pointer.read_bytes()
    published(server)
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    pointer.write_bytes(old_timestamp)  # a malicious mirror serves the old, still valid one
    with pytest.raises(tuf_errors.BadVersionNumberError):
        image_updater(server, tmp_path / "image").refresh()


def test_director_files_only_for_their_device(server: RunningServer, tmp_path: Path) -> None:
    device_a = server.enroll("pi-a")
    device_b = server.enroll("pi-b")
    token_b = AgentConfig.load(device_b / "agent.toml").token()
    with pytest.raises(tuf_errors.DownloadHTTPError) as caught:
        director_updater(device_a, tmp_path / "stolen", token=token_b).refresh()
    assert caught.value.status_code == 403
    with pytest.raises(tuf_errors.DownloadHTTPError) as caught:
        director_updater(device_a, tmp_path / "anon", token="").refresh()
    assert caught.value.status_code == 401
    operator_token = server.operator.token()
    with pytest.raises(tuf_errors.DownloadHTTPError) as caught:
        director_updater(device_a, tmp_path / "admin", token=operator_token).refresh()
    assert caught.value.status_code == 403
    director_updater(device_a, tmp_path / "own").refresh()  # and the owner is served


def test_roles_guard_the_api(server: RunningServer) -> None:
    viewer = server.token(Role.VIEWER)
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/api/v1/devices").status_code == 401
        headers = {"Authorization": f"Bearer {viewer}"}
        assert client.get("/api/v1/devices", headers=headers).status_code == 200
        refused = client.post("/api/v1/releases", headers=headers, json={})
        assert refused.status_code == 403
        assert "needs release-manager" in refused.json()["detail"]
        assert refused.json()["code"] == "forbidden"
        assert client.put(f"/api/v1/blobs/{'0' * 64}", headers=headers,
                          content=b"x").status_code == 403
        unknown = client.get("/api/v1/devices", headers={
            "Authorization": "Bearer eot_not-a-token"})
        assert unknown.status_code == 401 and unknown.json()["code"] == "unauthenticated"
        missing = client.get(f"/api/v1/releases/{10**6}", headers=headers)
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        assert client.get("/healthz").json() == {"status": "ok"}
        schema = client.get("/openapi.json")
        assert schema.status_code == 200
        assert schema.headers["content-security-policy"].startswith("default-src 'none'")
        # No Swagger UI: FastAPI's pulls its scripts from a CDN into this origin.
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404


def test_viewer_cannot_publish_through_the_cli(server: RunningServer) -> None:
    viewer = server.token(Role.VIEWER)
    server.operator.token_file.write_text(viewer)
    result = server.publish("digits_v1", "1.0.0")
    assert result.code == 1
    assert "HTTP 403" in result.err
    assert result.err.count("\n") == 1


def _state(server: RunningServer) -> tuple[int, int, list[tuple[str, str]]]:
    with server.ctx.sessions() as session:
        releases = [(r.version, str(r.status)) for r in session.scalars(select(Release))]
    return (server.ctx.store.latest_version("image", "timestamp"),
            server.ctx.store.latest_version("image", "snapshot"), releases)


def test_bad_model_with_good_vectors_is_refused_and_changes_nothing(
    server: RunningServer,
) -> None:
    published(server, "digits_v2", "2.0.0")
    before = _state(server)
    result = server.cli(
        "release", "publish", str(SAMPLES / "digits_bad.onnx"), "--name", "digits",
        "--version", "3.0.0", "--hardware", "rpi4",
        "--vectors", str(SAMPLES / "digits_v2.vectors.json"),
    )
    assert result.code == 1
    assert "validation vectors" in result.err or "vectors" in result.err
    assert _state(server) == before


def test_server_revalidates_what_the_cli_let_through(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A release manager's CLI with its checks disabled (or a malicious one): the
    # server must refuse on its own, record why, and leave the repositories alone.
    import edgeota.server.publisher as publisher

    monkeypatch.setattr(publisher, "validate_model", lambda *a, **k: None)
    before = _state(server)
    result = server.cli(
        "release", "publish", str(SAMPLES / "digits_bad.onnx"), "--name", "digits",
        "--version", "3.0.0", "--hardware", "rpi4",
        "--vectors", str(SAMPLES / "digits_v2.vectors.json"),
    )
    assert result.code == 1
    assert "HTTP 422" in result.err and "vectors_mismatch" in result.err
    assert str(server.home) not in result.err  # the refusal names no server path
    assert _state(server) == before
    with server.ctx.sessions() as session:
        last = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
    assert last.action == "release.refused" and "vectors_mismatch" in last.detail
    # The refused bundle is not kept: nothing is left in the uploads folder.
    assert list(server.ctx.uploads_dir.iterdir()) == []


def test_incompatible_io_signature_and_duplicate_version_are_refused(
    server: RunningServer, tmp_path: Path
) -> None:
    published(server)
    before = _state(server)
    duplicate = server.publish("digits_v2", "1.0.0")
    assert duplicate.code == 1 and "already exists" in duplicate.err
    renamed = tmp_path / "renamed.onnx"
    _rename_input(SAMPLES / "digits_v2.onnx", renamed)
    result = server.cli("release", "publish", str(renamed), "--name", "digits",
                        "--version", "2.0.0", "--hardware", "rpi4")
    assert result.code == 1 and "input" in result.err
    assert _state(server) == before
    forced = server.cli("release", "publish", str(renamed), "--name", "digits",
                        "--version", "2.0.0", "--hardware", "rpi4", "--allow-breaking")
    assert forced.code == 0, forced.err


def _rename_input(source: Path, target: Path) -> None:
    import onnx

    model = onnx.load(str(source))
    old = model.graph.input[0].name
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if name == old else name for name in node.input]
    onnx.save(model, str(target))


def test_stolen_server_keys_cannot_publish_a_target(
    server: RunningServer, tmp_path: Path
) -> None:
    """An attacker holding every key the server holds signs a bin: nobody accepts it."""
    from datetime import timedelta

    from tuf.api.metadata import MetaFile, TargetFile

    from edgeota.server.context import load_key_signer
    from edgeota.server.repo.image import add_target_to_bin, bin_for, next_version, sign

    release = published(server)
    online = [load_key_signer(server.config.image_snapshot_key),
              load_key_signer(server.config.image_timestamp_key),
              load_key_signer(server.config.director_key)]
    targets = server.ctx.image.current("targets")
    path = "models/digits/6.6.6.eotb"
    role = bin_for(targets, path)
    evil = add_target_to_bin(server.ctx.image.current(role), path,
                             TargetFile(release["length"], {"sha256": release["sha256"]}, path),
                             expires=server.ctx.clock().replace(year=2100))
    for signer in online:
        sign(evil, signer)
    # Through the API: refused before anything is written.
    before = _state(server)
    with httpx.Client(base_url=server.url,
                      headers={"Authorization": f"Bearer {server.operator.token()}"}) as client:
        answer = client.post("/api/v1/releases", json={
            "name": "digits", "version": "6.6.6", "target_path": path,
            "bundle_sha256": release["sha256"], "bin_metadata": evil.to_dict(),
            "wrapped_content_key": "AAAA"})
    assert answer.status_code in (400, 422)
    assert _state(server) == before
    # Straight into the store (a compromised host): the server's own re-signing will
    # not reference a bin whose signatures fail ...
    store = server.ctx.store
    store.write_metadata("image", role, evil.signed.version, evil.to_bytes())
    server.ctx.image.refresh(now=server.ctx.clock() + timedelta(days=6))
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    assert image.get_targetinfo(path) is None
    # ... and when the attacker writes snapshot and timestamp with the stolen online keys
    # themselves, ngclient refuses the bin.
    expires = server.ctx.clock() + timedelta(days=1)
    snapshot = next_version(server.ctx.image.current("snapshot"), expires=expires)
    snapshot.signed.meta[f"{role}.json"] = MetaFile(version=evil.signed.version)
    sign(snapshot, online[0])
    store.write_metadata("image", "snapshot", snapshot.signed.version, snapshot.to_bytes())
    timestamp = next_version(server.ctx.image.current("timestamp"), expires=expires)
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    sign(timestamp, online[1])
    store.write_metadata("image", "timestamp", timestamp.signed.version, timestamp.to_bytes())
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        image.get_targetinfo(path)


@pytest.fixture
def two_of_three(tmp_path: Path, db_url: str):
    with running_server(tmp_path, db_url,
                        HomeOptions(bin_bits=4, release_keys=3, release_threshold=2)) as running:
        yield running


def test_two_of_three_release_signatures(two_of_three: RunningServer, tmp_path: Path) -> None:
    server = two_of_three
    first = server.publish("digits_v1", "1.0.0", "--key", "1")
    assert first.code == 0, first.err
    pending = json.loads(first.out)
    assert (pending["status"], pending["signatures"], pending["threshold"]) == ("pending", 1, 2)
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    assert image.get_targetinfo(V1_TARGET) is None  # invisible until the threshold is met
    same_key = server.cli("release", "sign", str(pending["id"]), "--key", "1")
    assert same_key.code == 1 and "already carries" in same_key.err
    second = server.cli("release", "sign", str(pending["id"]), "--key", "2", "--json")
    assert second.code == 0, second.err
    assert json.loads(second.out)["status"] == "published"
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    assert image.get_targetinfo(V1_TARGET) is not None


def test_audit_verify_detects_an_edited_row(server: RunningServer) -> None:
    server.enroll("pi-1")
    published(server)
    ok = server.cli("audit", "verify", "--json")
    assert ok.code == 0, ok.err
    assert json.loads(ok.out)["ok"] is True
    with server.ctx.engine.begin() as connection:
        connection.execute(update(AuditEntry).where(AuditEntry.id == 1)
                           .values(actor="someone-else"))
    broken = server.cli("audit", "verify")
    assert broken.code == 1
    assert "broken at entry 1" in broken.err


def test_fleet_status_and_release_list_json(server: RunningServer) -> None:
    server.enroll("pi-1", "rpi4", "site=lab")
    server.enroll("pi-2", "jetson", "site=lab")
    published(server)
    deploy = server.cli("deploy", "digits@1.0.0", "--tag", "site=lab", "--json")
    answer = json.loads(deploy.out)
    assert answer["assigned"] == ["pi-1"]
    assert "jetson" in answer["skipped"]["pi-2"]
    fleet = json.loads(server.cli("fleet", "status", "--json").out)
    assert {d["id"]: d["assigned"] for d in fleet} == {"pi-1": {"digits": "1.0.0"}, "pi-2": {}}
    releases = json.loads(server.cli("release", "list", "--json").out)
    assert [(r["version"], r["status"]) for r in releases] == [("1.0.0", "published")]


def test_cli_against_a_stopped_server_fails_with_one_line(server: RunningServer) -> None:
    server.stop()
    result = server.cli("fleet", "status")
    assert result.code == 1
    assert "cannot reach the edgeota server" in result.err
    server.start()


def test_server_keeps_no_release_key(server: RunningServer) -> None:
    config_text = (server.home / "server.toml").read_text()
    for key in server.operator.release_keys:
        assert key.uri not in config_text
    assert "keys/release" not in config_text and "keys/offline" not in config_text


def test_expired_metadata_is_refused(tmp_path: Path, db_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    past = datetime.now(UTC) - timedelta(days=3)
    with (
        running_server(tmp_path, db_url, clock=lambda: past) as server,
        pytest.raises(tuf_errors.ExpiredMetadataError),
    ):
        image_updater(server, tmp_path / "image").refresh()


def test_sql_state_survives_a_restart(server: RunningServer) -> None:
    server.enroll("pi-1")
    published(server)
    server.restart()
    fleet = json.loads(server.cli("fleet", "status", "--json").out)
    assert [d["id"] for d in fleet] == ["pi-1"]
    with server.ctx.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM releases")).scalar() == 1
    shutil.rmtree(server.enrolled["pi-1"])


@pytest.mark.parametrize("role", ["image-timestamp", "image-snapshot", "image-root"])
def test_image_key_rotation_is_followed_by_old_clients(
    server: RunningServer, tmp_path: Path, role: str
) -> None:
    published(server)
    image_updater(server, tmp_path / "image").refresh()  # a client that knows root v1
    server.stop()
    result = server.cli("keys", "rotate", role, "--json")
    assert result.code == 0, result.err
    rotated = json.loads(result.out)
    assert rotated["root_version"] == 2
    assert rotated["restart_server"] is (role != "image-root")
    server.start()
    published(server, "digits_v2", "2.0.0")  # the restarted server signs with the new key
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    assert json.loads((tmp_path / "image" / "root.json").read_text())["signed"]["version"] == 2
    assert image.get_targetinfo("models/digits/2.0.0.eotb") is not None
    if role == "image-root":  # new enrolments bootstrap from the new root
        trusted = json.loads(server.operator.trusted_image_root.read_text())
        assert trusted["signed"]["version"] == 2


@pytest.mark.parametrize("role", ["director", "director-root"])
def test_director_key_rotation_is_followed_by_devices(
    server: RunningServer, tmp_path: Path, role: str
) -> None:
    device = server.enroll("pi-1")
    published(server)
    director_updater(device, tmp_path / "director").refresh()
    server.stop()
    assert server.cli("keys", "rotate", role).code == 0
    server.start()
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    director = director_updater(device, tmp_path / "director")
    director.refresh()
    assert director.get_targetinfo(V1_TARGET) is not None


def test_two_replicas_share_one_database_and_blob_store(
    server: RunningServer, tmp_path: Path
) -> None:
    """Two server processes' worth of state over one DB and one blob folder stay consistent."""
    import threading

    from server_support import RunningServer as Replica
    from server_support import _bound_socket

    replica = Replica(home=server.home, sock=_bound_socket())
    replica.start()
    try:
        server.enroll("pi-1")
        published(server)
        # The second replica serves what the first published.
        with httpx.Client(base_url=replica.url) as client:
            assert client.get("/repo/image/metadata/timestamp.json").status_code == 200
        # Concurrent publishes, one through each replica, land as distinct bin versions.
        import dataclasses

        from edgeota.server.client import OperatorClient
        from edgeota.server.publisher import PublishRequest, publish_release

        results: dict[str, str] = {}

        def publish_via(target: RunningServer, version: str) -> None:
            config = dataclasses.replace(server.operator, server_url=target.url)
            with OperatorClient(target.url, config.token()) as client:
                answer = publish_release(config, client, PublishRequest(
                    model=SAMPLES / "digits_v2.onnx", name="digits", version=version,
                    hardware=("rpi4",)))
            results[version] = answer["status"]

        threads = [threading.Thread(target=publish_via, args=(server, "2.0.0")),
                   threading.Thread(target=publish_via, args=(replica, "2.1.0"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results == {"2.0.0": "published", "2.1.0": "published"}
        image = image_updater(replica, tmp_path / "image")
        image.refresh()
        for version in ("1.0.0", "2.0.0", "2.1.0"):
            assert image.get_targetinfo(f"models/digits/{version}.eotb") is not None
        with OperatorClient(replica.url, server.operator.token()) as client:
            answer = client.post("/api/v1/deployments", {
                "name": "digits", "version": "2.1.0", "devices": ["pi-1"], "tags": {}})
        assert answer["assigned"] == ["pi-1"]
        fleet = json.loads(server.cli("fleet", "status", "--json").out)
        assert fleet[0]["assigned"] == {"digits": "2.1.0"}
    finally:
        replica.stop()
        replica.sock.close()


def test_targets_are_served_with_http_range(server: RunningServer) -> None:
    release = published(server)
    path = f"/repo/image/targets/models/digits/{release['sha256']}.1.0.0.eotb"
    with httpx.Client(base_url=server.url) as client:
        whole = client.get(path).content
        part = client.get(path, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == whole[100:200]
    assert len(whole) == release["length"]


def test_expiring_online_metadata_is_re_signed(server: RunningServer, tmp_path: Path) -> None:
    from datetime import timedelta

    from edgeota.server.api.app import refresh_expiring_metadata

    server.enroll("pi-1")
    before_image = server.ctx.store.latest_version("image", "timestamp")
    before_device = server.ctx.store.latest_version("director/pi-1", "timestamp")
    assert refresh_expiring_metadata(server.ctx) == []  # nothing is close to expiry yet
    later = server.ctx.clock() + timedelta(hours=20)  # past half of the 1-day timestamp period
    server.ctx.set_clock(lambda: later)
    refreshed = refresh_expiring_metadata(server.ctx)
    assert "image/timestamp" in refreshed
    assert server.ctx.store.latest_version("image", "timestamp") == before_image + 1
    assert server.ctx.store.latest_version("director/pi-1", "timestamp") == before_device + 1
    image_updater(server, tmp_path / "image").refresh()


def test_error_codes_are_a_stable_wire_contract() -> None:
    """Clients decide on these values: a renamed class or member must not change them."""
    assert {code.name: code.value for code in ErrorCode} == {
        "INVALID_REQUEST": "invalid_request", "BAD_DATA": "bad_data", "REFUSED": "refused",
        "UNAUTHENTICATED": "unauthenticated", "FORBIDDEN": "forbidden",
        "NOT_FOUND": "not_found", "CONFLICT": "conflict", "STALE_BIN": "stale_bin",
        "TOO_LARGE": "too_large", "QUOTA_EXCEEDED": "quota_exceeded",
        "REQUEST_TIMEOUT": "request_timeout", "INTERNAL_ERROR": "internal_error",
        "INVALID_BODY": "invalid_body", "RELEASE_REFUSED": "release_refused",
    }
    assert {f.name: f.value for f in DirectorFailure} == {
        "SIGNING": "signing_failed", "UNKNOWN_DEVICE": "unknown_device",
        "INVALID_ASSIGNMENT": "invalid_assignment", "KEY_WRAP": "key_wrap_failed",
        "STORAGE": "storage_failed", "REPOSITORY": "repository_error",
        "INTERNAL": "internal_error",
    }


def test_publish_re_signs_when_another_release_moved_the_bin_on(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two releases in the same hash bin: the second CLI must notice and re-sign."""
    from tuf.api.metadata import SuccinctRoles

    import edgeota.server.publisher as publisher

    bins = SuccinctRoles([], 1, 1, "bins")
    same_bin = next(v for v in (f"2.0.{i}" for i in range(50))
                    if bins.get_role_for_target(f"models/digits/{v}.eotb")
                    == bins.get_role_for_target(V1_TARGET))
    with running_server(tmp_path, db_url, HomeOptions(bin_bits=1)) as server:
        real = publisher.verified_bin
        calls = {"n": 0}

        def racing(config, target_path, workdir):
            result = real(config, target_path, workdir)
            calls["n"] += 1
            if calls["n"] == 1:  # a colleague publishes between our fetch and our submit
                monkeypatch.setattr(publisher, "verified_bin", real)
                assert published(server)["status"] == "published"
                monkeypatch.setattr(publisher, "verified_bin", racing)
            return result

        monkeypatch.setattr(publisher, "verified_bin", racing)
        second = server.publish("digits_v2", same_bin)
        assert second.code == 0, second.err
        assert json.loads(second.out)["bin_version"] == 3
        assert calls["n"] == 2


def test_snapshot_omitting_a_bin_is_refused_over_http(
    server: RunningServer, tmp_path: Path
) -> None:
    from datetime import timedelta

    from edgeota.server.context import load_key_signer
    from edgeota.server.repo.image import next_version, sign

    published(server)
    image = image_updater(server, tmp_path / "image")
    image.refresh()
    expires = server.ctx.clock() + timedelta(days=1)
    snapshot = next_version(server.ctx.image.current("snapshot"), expires=expires)
    dropped = next(name for name in snapshot.signed.meta if name.startswith("bins-"))
    del snapshot.signed.meta[dropped]
    sign(snapshot, load_key_signer(server.config.image_snapshot_key))
    store = server.ctx.store
    store.write_metadata("image", "snapshot", snapshot.signed.version, snapshot.to_bytes())
    timestamp = next_version(server.ctx.image.current("timestamp"), expires=expires)
    from tuf.api.metadata import MetaFile

    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    sign(timestamp, load_key_signer(server.config.image_timestamp_key))
    store.write_metadata("image", "timestamp", timestamp.signed.version, timestamp.to_bytes())
    with pytest.raises(tuf_errors.RepositoryError, match="missing info for"):
        image_updater(server, tmp_path / "image").refresh()


def test_director_metadata_signed_by_a_key_outside_the_root_is_refused(
    server: RunningServer, tmp_path: Path
) -> None:
    from datetime import timedelta

    from securesystemslib.signer import CryptoSigner

    from edgeota.server.repo.image import next_version, sign

    device = server.enroll("pi-1")
    director_updater(device, tmp_path / "director").refresh()
    rogue = CryptoSigner.generate_ed25519()
    store = server.ctx.store
    repo = "director/pi-1"
    current = server.ctx.director.current_targets("pi-1")
    forged = next_version(current, expires=server.ctx.clock() + timedelta(days=1))
    sign(forged, rogue)
    store.write_metadata(repo, "targets", forged.signed.version, forged.to_bytes())
    from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp

    snapshot = next_version(Metadata[Snapshot].from_bytes(store.read_metadata(repo, "snapshot")),
                            expires=server.ctx.clock() + timedelta(days=1))
    snapshot.signed.meta["targets.json"] = MetaFile(version=forged.signed.version)
    sign(snapshot, rogue)
    store.write_metadata(repo, "snapshot", snapshot.signed.version, snapshot.to_bytes())
    timestamp = next_version(Metadata[Timestamp].from_bytes(store.read_metadata(repo,
                                                                                "timestamp")),
                             expires=server.ctx.clock() + timedelta(days=1))
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    sign(timestamp, rogue)
    store.write_metadata(repo, "timestamp", timestamp.signed.version, timestamp.to_bytes())
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        director_updater(device, tmp_path / "director").refresh()


def test_metrics_parse_and_move_when_a_device_fetches(
    server: RunningServer, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple], float]:
        with httpx.Client(base_url=server.url) as client:
            text = client.get("/metrics").text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples}

    device = server.enroll("pi-1")
    published(server)
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    before = scrape()
    assert before[("edgeota_releases", (("status", "published"),))] == 1
    assert before[("edgeota_devices", (("state", "unknown"),))] == 1
    assert before[("edgeota_publish_seconds_count", ())] == 1
    assert before[("edgeota_director_sign_seconds_count", ())] == 1
    director_updater(device, tmp_path / "director").refresh()
    after = scrape()
    key = ("edgeota_fetch_requests_total", (("kind", "director_metadata"), ("transport", "http")))
    assert after[key] >= before.get(key, 0) + 3  # timestamp, snapshot, targets
    byte_key = ("edgeota_fetch_bytes_total",
                (("kind", "director_metadata"), ("transport", "http")))
    assert after[byte_key] > before.get(byte_key, 0)
