"""The device's verified check-and-install against a real server, with attacks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from server_support import RunningServer
from tuf.api import exceptions as tuf_errors

from edgeota.agent.config import AgentConfig
from edgeota.agent.update_cycle import UpdateClient
from edgeota.agent.uptane import RefusalReason, UptaneRefusal
from edgeota.protocol.errors import KeyUnwrapError
from edgeota.samples import accuracy, load_catalog, load_test_split


def client_for(device: Path) -> UpdateClient:
    return UpdateClient(AgentConfig.load(device / "agent.toml"))


def test_fresh_device_installs_what_it_is_assigned(server: RunningServer) -> None:
    device = server.enroll("pi-1", "rpi4")
    assert client_for(device).check() == []
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    client = client_for(device)
    (decision,) = client.check()
    installed = client.install(decision)
    x, y = load_test_split()
    assert accuracy(installed.model_path, x, y) == pytest.approx(
        load_catalog()["digits_v1"].test_accuracy, abs=1e-4)
    assert installed.report.ok
    # v2 replaces v1 in the director; the device sees exactly v2.
    assert server.publish("digits_v2", "2.0.0").code == 0
    assert server.cli("deploy", "digits@2.0.0", "--devices", "pi-1").code == 0
    (decision,) = client_for(device).check()
    assert decision.image.version == "2.0.0"


def test_release_counter_floor_is_enforced_on_the_device(server: RunningServer) -> None:
    device = server.enroll("pi-1")
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    with pytest.raises(UptaneRefusal) as caught:
        client_for(device).check(release_floor=2)
    assert caught.value.reason is RefusalReason.BELOW_FLOOR


def test_a_key_wrapped_for_another_device_does_not_open(server: RunningServer) -> None:
    victim = server.enroll("pi-a")
    thief = server.enroll("pi-b")
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-a,pi-b").code == 0
    (victim_decision,) = client_for(victim).check()
    thief_client = client_for(thief)
    (own,) = thief_client.check()
    # The thief copies the victim's wrapped key into its own (otherwise valid) decision.
    stolen = dataclasses.replace(
        own, director=dataclasses.replace(own.director,
                                          wrapped_key=victim_decision.director.wrapped_key))
    with pytest.raises(KeyUnwrapError):
        thief_client.install(stolen)
    assert not any((thief / "state" / "models").rglob("model.onnx"))


def test_replayed_director_metadata_is_refused(server: RunningServer) -> None:
    device = server.enroll("pi-1")
    metadata = server.config.blob_dir / "director" / "devices" / "pi-1" / "metadata"
    old = (metadata / "timestamp.json").read_bytes()
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    assert len(client_for(device).check()) == 1
    (metadata / "timestamp.json").write_bytes(old)  # replay the pre-deployment timestamp
    with pytest.raises(tuf_errors.BadVersionNumberError):
        client_for(device).check()


def test_tampered_bundle_is_refused_and_nothing_is_installed(server: RunningServer) -> None:
    device = server.enroll("pi-1")
    release = json.loads(server.publish("digits_v1", "1.0.0").out)
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    stored = server.ctx.store.target_file_for_request(
        f"models/digits/{release['sha256']}.1.0.0.eotb")
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0x40
    stored.write_bytes(bytes(data))
    client = client_for(device)
    (decision,) = client.check()
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        client.install(decision)
    assert not any((device / "state" / "models").rglob("*"))


def _with_external_weights(tmp: Path) -> Path:
    """digits v1 with its large initializers in a file beside it (as large models are)."""
    import onnx

    from edgeota.samples import sample_path

    model = onnx.load(str(sample_path("digits_v1.onnx")))
    for tensor in model.graph.initializer:  # only raw_data tensors can move out of the file
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor),
                                                     tensor.name))
    tmp.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="digits.weights", size_threshold=1024)
    return tmp / "model.onnx"


def test_a_model_with_external_data_ships_its_weights_and_installs(
        server: RunningServer, tmp_path: Path) -> None:
    from edgeota.samples import sample_path

    model = _with_external_weights(tmp_path / "external")
    assert model.stat().st_size < 4096 < (tmp_path / "external" / "digits.weights").stat().st_size
    device = server.enroll("pi-1", "rpi4")
    published = server.cli("release", "publish", str(model), "--name", "digits", "--version",
                           "1.0.0", "--hardware", "rpi4", "--vectors",
                           str(sample_path("digits_v1.vectors.json")), "--json")
    assert published.code == 0, published.err
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    client = client_for(device)
    (decision,) = client.check()
    installed = client.install(decision)
    assert installed.report.ok
    assert [f.path for f in installed.bundle.manifest.external_data] == ["digits.weights"]
    weights = installed.model_path.parent / "digits.weights"
    assert weights.read_bytes() == (tmp_path / "external" / "digits.weights").read_bytes()
    x, y = load_test_split()
    assert accuracy(installed.model_path, x, y) == pytest.approx(
        load_catalog()["digits_v1"].test_accuracy, abs=1e-4)


def test_external_data_outside_the_models_folder_is_refused_at_publish(
        server: RunningServer, tmp_path: Path) -> None:
    import onnx

    model = _with_external_weights(tmp_path / "m")  # onnx itself refuses to write ".."
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../escape.weights"
    model.write_bytes(proto.SerializeToString())
    (tmp_path / "m" / "digits.weights").rename(tmp_path / "escape.weights")
    result = server.cli("release", "publish", str(model), "--name", "digits", "--version",
                        "1.0.0", "--hardware", "rpi4")
    assert result.code != 0
    assert "outside the model's folder" in result.err
