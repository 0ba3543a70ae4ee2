"""A device updates over MQTT: embedded broker with TLS and the device ACL, the fetch
bridge, the agent's MQTT fetcher, an unmodified ngclient underneath."""

from __future__ import annotations

import json

import numpy as np
from server_support import RunningServer, wait_for

from edgeota.agent.config import AgentConfig
from edgeota.agent.runner import Agent, AgentSettings


def test_device_installs_a_release_entirely_over_mqtt(mqtt_server) -> None:
    server, transport = mqtt_server
    device = server.enroll("pi-1")
    config = AgentConfig.load(device / "agent.toml")
    assert config.mqtt_url == transport.address.url
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    agent = Agent(config, AgentSettings(probation_seconds=0, probation_min_inferences=1),
                  transport="mqtt")
    try:
        agent.start()
        assert agent.session.wait_ready(20)
        # A deployment notifies the device over MQTT: the agent's wake event is set.
        agent.wake.clear()
        assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
        assert agent.wake.wait(20)
        assert agent.run_cycle().states == {"digits": "probation"}
        x = np.zeros((1, 64), dtype=np.float32)
        for _ in range(3):
            agent.host.predict("digits", {"input": x})
        assert agent.publish_telemetry()

        def reports_arrived() -> bool:
            # Status, presence and telemetry travel on three topics: wait for all of them.
            transport.sink.flush()
            device = json.loads(server.cli("fleet", "status", "--json").out)[0]
            state = device["reported_state"] or {}
            return (state.get("state") == "probation" and "telemetry" in state
                    and device["online"])

        wait_for(reports_arrived, 20, "status, presence and telemetry in the database")
    finally:
        agent.close()
    # The agent reported over MQTT: signed, on its own status topic, into the database.
    fleet = server.cli("fleet", "status", "--json").out
    assert '"state": "probation"' in fleet
    assert '"online": true' in fleet
    telemetry = json.loads(fleet)[0]["reported_state"]["telemetry"]["models"]["digits"]
    assert (telemetry["version"], telemetry["inferences"]) == ("1.0.0", 3)
    counters = transport.bridge.counters()
    assert counters.served_bytes("pi-1", "image/targets/models/digits/"
                                 + _stored_name(server)) > 0
    assert counters.bytes_sent > 0


def _stored_name(server: RunningServer) -> str:
    (path,) = (server.config.blob_dir / "image" / "targets" / "models" / "digits").iterdir()
    return path.name
